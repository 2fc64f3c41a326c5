"""``switchyard train latent-router`` and the LatentRouter side of ``switchyard eval``.

Nothing heavy is imported at import time; handlers import torch & co. when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_train_latent_router_parser", "run_train_latent_router", "run_latent_router_eval"]

log = logging.getLogger(__name__)


def _sizes(text: str) -> dict[str, float]:
    sizes: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            sizes[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--sizes expects NAME=BILLIONS[,NAME=BILLIONS], got {part!r}.") from None
    return sizes


def add_train_latent_router_parser(train_subparsers: argparse._SubParsersAction) -> None:
    """Add ``latent-router`` to ``switchyard train``."""
    p = train_subparsers.add_parser(
        "latent-router",
        help="Train a LatentRouter (predicts every model's quality; picks μ̃ − λ·cost).",
        description="Train a LatentRouter on labelled JSONL with outcomes (quality and cost) for every pool model.",
    )
    p.add_argument("--data", type=Path, required=True, help="Labelled JSONL training set.")
    p.add_argument("--val", type=Path, help="Labelled JSONL validation set (default: a --val-fraction split of --data).")
    p.add_argument("--out", type=Path, required=True, help="Checkpoint folder to write.")
    p.add_argument("--encoder", choices=("text", "backbone", "hashing"), default="text",
                   help="Query encoder: text (bundled MiniLM, default), backbone (the probes' truncated backbone), hashing (no model).")
    p.add_argument("--encoder-model", help="text: a local sentence-encoder folder (default: bundled MiniLM); backbone: the local model folder (required).")
    p.add_argument("--layer", type=int, help="backbone: decoder layer whose states are pooled (default: half the layers).")
    p.add_argument("--hash-dim", type=int, default=1024, help="hashing: feature width (default 1024).")
    p.add_argument("--sizes", type=_sizes, default={}, help="Known model sizes, NAME=BILLIONS,... (profile feature).")
    g = p.add_argument_group("model hyperparameters")
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-query-tokens", type=int, default=4)
    g.add_argument("--num-capsules", type=int, default=4)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--rounds", type=int, default=2)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--correction-bound", type=float, default=0.05)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=1e-2)
    t.add_argument("--patience", type=int, default=10, help="Epochs without validation-utility gain before stopping.")
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--pool-dropout", type=float, default=0.2, help="Share of models hidden per training query.")
    t.add_argument("--nll-weight", type=float, default=1.0)
    t.add_argument("--rank-weight", type=float, default=0.5)
    t.add_argument("--listwise-weight", type=float, default=0.5)
    t.add_argument("--correction-weight", type=float, default=0.01)
    t.add_argument("--num-categories", type=int, default=4, help="Query clusters for per-category accuracy profiles.")
    t.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(handler=run_train_latent_router)


def run_train_latent_router(args: argparse.Namespace) -> int:
    """Handler of ``switchyard train latent-router``; returns the exit code."""
    from routers.data import dataset_hash, load_labelled
    from routers.latent_checkpoint import save_latent_router
    from routers.latent_training import LatentTrainConfig, train_latent_router
    from routers.query_encoders import EncoderSpec, build_encoder

    device = args.device or _default_device()
    train = load_labelled(args.data)
    val = load_labelled(args.val) if args.val else None
    spec = EncoderSpec(kind=args.encoder, model=args.encoder_model, dim=args.hash_dim, layer=args.layer)
    encoder = build_encoder(spec, device=device)
    cfg = LatentTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        patience=args.patience, seed=args.seed, val_fraction=args.val_fraction,
        nll_weight=args.nll_weight, rank_weight=args.rank_weight, listwise_weight=args.listwise_weight,
        correction_weight=args.correction_weight, pool_dropout=args.pool_dropout,
        num_categories=args.num_categories,
    )
    overrides = dict(
        hidden_size=args.hidden_size, num_query_tokens=args.num_query_tokens, num_capsules=args.num_capsules,
        num_heads=args.num_heads, rounds=args.rounds, dropout=args.dropout, correction_bound=args.correction_bound,
    )
    result = train_latent_router(
        train, encoder, overrides, cfg, val=val, sizes=args.sizes, progress=not args.quiet
    )
    result.router.extra["history"] = result.history
    out = save_latent_router(result.router, args.out, training_set_hash=dataset_hash(args.data))
    print(
        f"Saved LatentRouter ({args.encoder} encoder, pool {', '.join(result.router.pool.names)}) to {out}; "
        f"best epoch {result.best_epoch}, validation utility {result.best_val_utility:.4f}."
    )
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _lambdas(text: str | None) -> list[float] | None:
    from routers.data import DataError

    if not text:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise DataError(f"--lambdas must be comma-separated numbers, got {text!r}.") from exc
    if not values or any(v < 0 or v != v for v in values):
        raise DataError(f"--lambdas must be numbers >= 0, got {text!r}.")
    return values


def run_latent_router_eval(args: argparse.Namespace) -> int:
    """The LatentRouter branch of ``switchyard eval``: prints tables, writes JSON / PNG."""
    from routers.data import load_labelled
    from routers.latent_checkpoint import load_latent_router
    from routers.latent_eval import evaluate_router, format_report, plot_frontier, shifted_pools

    device = getattr(args, "device", None) or _default_device()
    router = load_latent_router(args.checkpoint, device=device)
    requests = load_labelled(args.data)
    lambdas = _lambdas(getattr(args, "lambdas", None))
    features = router.encoder.encode(
        [r.messages for r in requests], batch_size=getattr(args, "batch_size", 16) or 16, progress=True
    )
    pools = shifted_pools(router, getattr(args, "pool_shift", "none") or "none", getattr(args, "seed", 0))
    if "none" not in pools:
        pools = {"none": list(router.pool.names), **pools}
    reports: dict[str, Any] = {}
    for label, names in pools.items():
        reports[label] = evaluate_router(
            router, requests, lambdas, available=names,
            small=getattr(args, "small", None), large=getattr(args, "large", None), features=features,
        )
        print(format_report(reports[label], title=f"[{label}]"))
    result = {
        "checkpoint": str(args.checkpoint), "data": str(args.data), "encoder": router.encoder.spec.kind,
        "reports": reports,
    }
    if getattr(args, "out", None):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.out}")
    else:
        json.dump({k: {"auc": v["auc"], **({"two_model": v["two_model"]} if "two_model" in v else {})}
                   for k, v in reports.items()}, sys.stdout)
        print()
    if getattr(args, "plot", None):
        plot_frontier({"LatentRouter": reports["none"]}, str(args.plot), title=f"LatentRouter on {Path(args.data).name}")
        print(f"Wrote {args.plot}")
    return 0
