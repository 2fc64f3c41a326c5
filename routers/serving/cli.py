"""The ``scorer`` command group of the ``switchyard`` CLI.

- ``switchyard scorer serve --config FILE --listen HOST:PORT [--grace S]
  [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]] [limits]`` serves the scorers of
  ``FILE`` (a ``scorers:`` section in the policy format) over the ``switchyard.v1.ScorerService``
  gRPC API (:mod:`routers.serving.remote_server`), for sidecars whose policies name them with
  ``remote: {target: ...}`` (and ``remote.tls`` when the server runs TLS). The limits
  (``--max-message-bytes``, ``--max-messages``, ``--max-parts``, ``--max-deadline-ms``,
  ``--max-in-flight``, ``--max-in-flight-per-caller``) are the fields of
  :class:`~routers.serving.remote_server.ServerLimits`, whose defaults are theirs.

torch is not imported until the command runs (building the parser imports the server's
gRPC module, for the limits' defaults).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from extproc import DEFAULT_GRACE_S

__all__ = ["add_scorer_parser", "run_serve"]

#: ServerLimits field -> (metavar, help); the default is appended from ServerLimits.
_LIMIT_HELP = {
    "max_message_bytes": ("BYTES", "Largest call accepted; a bigger one is refused with RESOURCE_EXHAUSTED "
                                   "before it is parsed. Keep it above the sidecars' routing.max_body_bytes."),
    "max_messages": ("N", "Most chat messages in one call (INVALID_ARGUMENT beyond)."),
    "max_parts": ("N", "Most content parts in one call, over all its messages; a string content counts one "
                       "(INVALID_ARGUMENT beyond)."),
    "max_deadline_ms": ("MS", "Longest deadline honoured: a call asking more (or none) is scored within this."),
    "max_in_flight": ("N", "Most calls in flight on the server; beyond, RESOURCE_EXHAUSTED (busy) at once."),
    "max_in_flight_per_caller": ("N", "Most calls in flight from one caller (the host of its connection); "
                                      "beyond, RESOURCE_EXHAUSTED (busy) at once."),
}


def add_scorer_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``scorer serve`` to the top-level CLI's subparsers."""
    from routers.serving.remote_server import ServerLimits

    scorer = subparsers.add_parser("scorer", help="Serve learned scorers over gRPC to remote sidecars.")
    actions = scorer.add_subparsers(dest="scorer_command", required=True, metavar="ACTION")
    serve = actions.add_parser(
        "serve",
        help="Serve the scorers of a config file (switchyard.v1.ScorerService + gRPC health).",
        description="Load every scorer of --config, then serve them on --listen until SIGTERM/SIGINT. "
                    "The gRPC health service reports SERVING once all scorers have loaded.",
    )
    serve.add_argument("--config", type=Path, required=True,
                       help="YAML file whose `scorers:` section (same format as a policy's) lists the scorers to serve.")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT",
                       help="Address to listen on, e.g. 0.0.0.0:50061 (port 0 picks a free port).")
    serve.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                       help=f"Seconds in-flight calls get to finish on shutdown (default {DEFAULT_GRACE_S:g}).")
    serve.add_argument("--tls-cert", type=Path, metavar="FILE",
                       help="PEM certificate (chain) to serve TLS with; needs --tls-key. Default: plaintext. "
                            "The health service answers on the same port over the same TLS.")
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert.")
    serve.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                       help="PEM CA certificate(s) of the clients to accept: clients must present a certificate "
                            "signed by it (mutual TLS). Needs --tls-cert.")
    defaults = ServerLimits()
    for field, (metavar, text) in _LIMIT_HELP.items():
        default = getattr(defaults, field)
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        serve.add_argument(ServerLimits.flag(field), dest=field, type=type(default), default=default,
                           metavar=metavar, help=f"{text} Default {shown}.")
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """``switchyard scorer serve``."""
    from routers.serving.remote_server import ServerLimits, ServerTls, serve_scorers

    tls = ServerTls.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
    limits = ServerLimits(**{field: getattr(args, field) for field in _LIMIT_HELP})
    return serve_scorers(args.config, args.listen, grace=args.grace, tls=tls, limits=limits)
