"""The ``train``, ``eval``, ``calibrate`` and ``scorer`` command groups of the ``switchyard`` CLI.

``extproc.cli`` calls :func:`register` only when one of these commands is run, so the
Envoy-facing server never imports this package. This module imports nothing heavy at
import time: each handler imports torch & co. when it runs.

- ``switchyard train probe ...``          -> routers.probes.cli
- ``switchyard train latent-router ...``  -> routers.latent.cli
- ``switchyard eval --checkpoint DIR ...`` dispatches on ``config.json``'s ``kind``
- ``switchyard calibrate ...``            -> routers.probes.cli (probes), routers.latent.cli (λ)
- ``switchyard scorer serve ...``         -> routers.serving.cli
- ``switchyard label ...``                -> routers.labelling.cli (needs no torch: registered without the ml extra)
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from extproc import LEARNED_COMMANDS, ML_INSTALL_HINT

__all__ = ["register", "TORCH_FREE_COMMANDS"]

#: The commands of ``extproc.LEARNED_COMMANDS`` (the ones this module adds) that run without the ``ml`` extra.
TORCH_FREE_COMMANDS = ("label",)

#: Modules the command parsers take their defaults from (they need torch & co.).
_PARSER_MODULES = (
    "routers.backbone",
    "routers.probes",
    "routers.probes.training",
    "routers.probes.offline",
    "routers.latent.router",
    "routers.latent.training",
    "routers.latent.encoders",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval``, ``calibrate``, ``scorer`` and ``label`` to the top-level CLI's subparsers.

    Without the ``ml`` extra (torch & co.), each command but :data:`TORCH_FREE_COMMANDS` is
    added as a stub that says how to install it. To add a command group, name it in
    ``extproc.LEARNED_COMMANDS`` and add its parser here.
    """
    from routers.labelling import cli as label_cli

    label_cli.add_label_parser(subparsers)
    try:
        for module in _PARSER_MODULES:
            importlib.import_module(module)
    except ModuleNotFoundError as exc:
        for command in (c for c in LEARNED_COMMANDS if c not in TORCH_FREE_COMMANDS):
            stub = subparsers.add_parser(command, help=f"(needs the ml extra: {exc.name} is missing)")
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(handler=_missing_extra(exc))
        return
    _register(subparsers)


def _missing_extra(exc: ModuleNotFoundError) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from extproc import SwitchyardError

        raise SwitchyardError(f"`switchyard {args.command}` needs {exc.name}, which is not installed; {ML_INSTALL_HINT}.")

    return handler


def _register(subparsers: argparse._SubParsersAction) -> None:
    from routers.latent import cli as latent_cli
    from routers.probes import cli as probe_cli
    from routers.serving import cli as scorer_cli

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
        "--scores-out", type=Path, metavar="FILE",
        help="Write each row's scores here, one JSON object a line ({id, score} for a probe; {id, quality, "
        "cost} per pool model for LatentRouter).",
    )
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
    probe_cli.add_scoring_options(ev)
    ev.add_argument("--seed", type=int, default=0, help="Seed for random pool shifts.")
    ev.set_defaults(handler=run_eval)

    probe_cli.add_calibrate_parser(subparsers)
    scorer_cli.add_scorer_parser(subparsers)


def run_eval(args: argparse.Namespace) -> int:
    """Dispatch ``switchyard eval`` on the checkpoint's kind (an unknown kind is a
    :class:`CheckpointError` listing the supported ones)."""
    from routers.checkpoints import read_config

    if read_config(args.checkpoint).scorer_kind == "probe":
        from routers.probes import cli as probe_cli

        return probe_cli.run_probe_eval(args)
    from routers.latent import cli as latent_cli

    return latent_cli.run_latent_router_eval(args)
