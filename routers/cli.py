"""The ``train``, ``eval`` and ``calibrate`` command groups of the ``switchyard`` CLI.

``extproc.cli`` calls :func:`register` only when one of these commands is run, so the
Envoy-facing server never imports this package. This module imports nothing heavy at
import time: each handler imports torch & co. when it runs.

- ``switchyard train probe ...``          -> routers.probe_cli
- ``switchyard train latent-router ...``  -> routers.latent_cli
- ``switchyard eval --checkpoint DIR ...`` dispatches on ``config.json``'s ``kind``
- ``switchyard calibrate ...``            -> routers.probe_cli
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "COMMANDS"]

#: Top-level command names this module adds to the CLI.
COMMANDS = ("train", "eval", "calibrate")

PROBE_KINDS = ("last_token", "attention", "relope")
LATENT_ROUTER_KINDS = ("latent_router",)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval`` and ``calibrate`` to the top-level CLI's subparsers."""
    from routers import latent_cli, probe_cli

    train = subparsers.add_parser("train", help="Train a learned scorer.")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="KIND")
    probe_cli.add_train_probe_parser(train_sub)
    latent_cli.add_train_latent_router_parser(train_sub)

    ev = subparsers.add_parser(
        "eval",
        help="Evaluate a checkpoint (probe or LatentRouter) on a labelled JSONL set.",
        description="Evaluate a checkpoint on labelled JSONL; prints a table and writes JSON.",
    )
    ev.add_argument("--checkpoint", type=Path, required=True, help="Checkpoint folder.")
    ev.add_argument("--data", type=Path, required=True, help="Labelled JSONL test set.")
    ev.add_argument("--small", help="Small backend name (probes; two-model LatentRouter pools).")
    ev.add_argument("--large", help="Large backend name (probes; two-model LatentRouter pools).")
    ev.add_argument("--plot", type=Path, help="Write a PNG plot here.")
    ev.add_argument("--out", type=Path, help="Write the JSON report here (default: stdout only).")
    ev.add_argument(
        "--pool-shift",
        choices=("none", "strongest", "cheapest", "random30", "all"),
        default="none",
        help="LatentRouter: remove models from the pool at test time and report again.",
    )
    ev.add_argument(
        "--lambdas",
        help="LatentRouter: comma-separated cost weights to sweep (default: built-in sweep).",
    )
    ev.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    ev.add_argument("--batch-size", type=int, default=16, help="Scoring batch size.")
    ev.add_argument("--seed", type=int, default=0, help="Seed for random pool shifts.")
    ev.set_defaults(handler=run_eval)

    probe_cli.add_calibrate_parser(subparsers)


def checkpoint_kind(checkpoint: Path) -> str:
    """The ``kind`` recorded in a checkpoint folder's ``config.json``."""
    from extproc import CheckpointError
    from routers.checkpoint_config import CONFIG_FILE, read_checkpoint_config

    kind = read_checkpoint_config(checkpoint).get("kind")
    if not isinstance(kind, str):
        raise CheckpointError(f"{checkpoint / CONFIG_FILE} has no string `kind`, got {kind!r}.")
    return kind


def run_eval(args: argparse.Namespace) -> int:
    """Dispatch ``switchyard eval`` on the checkpoint's kind."""
    from extproc import CheckpointError

    kind = checkpoint_kind(args.checkpoint)
    if kind in PROBE_KINDS:
        from routers import probe_cli

        return probe_cli.run_probe_eval(args)
    if kind in LATENT_ROUTER_KINDS:
        from routers import latent_cli

        return latent_cli.run_latent_router_eval(args)
    supported = ", ".join(PROBE_KINDS + LATENT_ROUTER_KINDS)
    raise CheckpointError(
        f"{args.checkpoint}/config.json has kind {kind!r}; supported kinds: {supported}."
    )
