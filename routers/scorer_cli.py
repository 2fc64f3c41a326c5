"""The ``scorer`` command group of the ``switchyard`` CLI.

- ``switchyard scorer serve --config FILE --listen HOST:PORT [--grace S]
  [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]`` serves the scorers of ``FILE``
  (a ``scorers:`` section in the policy format) over the ``switchyard.v1.ScorerService`` gRPC API (:mod:`routers.serving.remote_server`), for
  sidecars whose policies name them with ``remote: {target: ...}`` (and ``remote.tls`` when
  the server runs TLS).

Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_scorer_parser", "run_serve"]


def add_scorer_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``scorer serve`` to the top-level CLI's subparsers."""
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
    serve.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                       help="Seconds in-flight calls get to finish on shutdown (default 5).")
    serve.add_argument("--tls-cert", type=Path, metavar="FILE",
                       help="PEM certificate (chain) to serve TLS with; needs --tls-key. Default: plaintext. "
                            "The health service answers on the same port over the same TLS.")
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert.")
    serve.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                       help="PEM CA certificate(s) of the clients to accept: clients must present a certificate "
                            "signed by it (mutual TLS). Needs --tls-cert.")
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """``switchyard scorer serve``."""
    from routers.serving.remote_server import ServerTls, serve_scorers

    tls = ServerTls.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
    return serve_scorers(args.config, args.listen, grace=args.grace, tls=tls)
