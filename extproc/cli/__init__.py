"""The ``switchyard`` command: ``serve``, ``policy`` (check, explain, diff, schema), ``envoy``
(render, check), and the learned-scorer commands that ``routers`` registers when installed."""

from extproc.cli._main import build_parser, main

__all__ = ["build_parser", "main"]
