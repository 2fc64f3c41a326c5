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

from routers.config_options import add_config_options, config_values

__all__ = [
    "add_train_latent_router_parser",
    "run_train_latent_router",
    "run_latent_router_eval",
    "run_latent_router_calibrate",
]

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


#: LatentRouterConfig fields set from the data, not from flags.
_DERIVED_MODEL_FIELDS = ("input_dim", "num_models", "profile_dim")


def add_train_latent_router_parser(train_subparsers: argparse._SubParsersAction) -> None:
    """Add ``latent-router`` to ``switchyard train``; flag defaults and help come from the
    config dataclasses (:class:`EncoderSpec`, :class:`LatentRouterConfig`,
    :class:`LatentTrainConfig`)."""
    from routers.latent.encoders import ENCODER_KINDS, EncoderSpec
    from routers.latent.router import LatentRouterConfig
    from routers.latent.training import LatentTrainConfig

    p = train_subparsers.add_parser(
        "latent-router",
        help="Train a LatentRouter (predicts every model's quality; picks μ̃ − λ·cost).",
        description="Train a LatentRouter on labelled JSONL with outcomes (quality and cost) for every pool model.",
    )
    p.add_argument("--data", type=Path, required=True, help="Labelled JSONL training set.")
    p.add_argument("--val", type=Path, help="Labelled JSONL validation set (default: hold out --val-fraction of --data).")
    p.add_argument("--out", type=Path, required=True, help="Checkpoint folder to write (replaced atomically).")
    e = p.add_argument_group("query encoder")
    add_config_options(
        e,
        EncoderSpec,
        flags={"kind": ["--encoder"], "model": ["--encoder-model"], "dim": ["--hash-dim"], "max_length": ["--max-tokens"]},
        choices={"kind": ENCODER_KINDS},
    )
    e.add_argument("--sizes", type=_sizes, default={}, help="Known model sizes, NAME=BILLIONS,... (profile feature).")
    add_config_options(p.add_argument_group("model hyperparameters"), LatentRouterConfig, exclude=_DERIVED_MODEL_FIELDS)
    add_config_options(p.add_argument_group("training"), LatentTrainConfig)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    p.add_argument("--no-progress", "--quiet", dest="progress", action="store_false", help="No progress bars.")
    p.set_defaults(handler=run_train_latent_router)


def run_train_latent_router(args: argparse.Namespace) -> int:
    """Handler of ``switchyard train latent-router``; returns the exit code."""
    from extproc import SwitchyardError
    from routers.checkpoints import VALIDATION_FILE, save_latent_router
    from routers.data import dataset_hash, load_labelled, select_lines
    from routers.latent.encoders import EncoderSpec, build_encoder
    from routers.latent.router import LatentRouterConfig
    from routers.latent.training import LatentTrainConfig, train_latent_router

    device = args.device or _default_device()
    train = load_labelled(args.data)
    val = load_labelled(args.val) if args.val else None
    try:
        spec = EncoderSpec(**config_values(EncoderSpec, args))
        cfg = LatentTrainConfig(**config_values(LatentTrainConfig, args))
        overrides = config_values(LatentRouterConfig, args, exclude=_DERIVED_MODEL_FIELDS)
    except ValueError as exc:
        raise SwitchyardError(str(exc)) from exc
    encoder = build_encoder(spec, device=device)
    result = train_latent_router(train, encoder, overrides, cfg, val=val, sizes=args.sizes, progress=args.progress)
    training = {
        "history": result.history,
        "train_data": str(args.data),
        "train_data_hash": dataset_hash(args.data),
        "val_data": str(args.val) if args.val else None,
        "val_data_hash": dataset_hash(args.val) if args.val else None,
    }
    rows = select_lines(args.data, result.validation_ids) if result.validation_ids else None
    if rows is not None:
        result.router.extra["validation"]["file"] = VALIDATION_FILE
    out = save_latent_router(result.router, args.out, training=training, validation_rows=rows)
    validation = result.router.extra.get("validation", {})
    where = {"given": "--val", "held_out": f"{100 * cfg.val_fraction:g}% held out"}.get(validation.get("source"))
    scored = f"validation utility {result.best_val_utility:.4f} ({where})" if where else "no validation set"
    print(
        f"Saved LatentRouter ({encoder.spec.kind} encoder, pool {', '.join(result.router.pool.names)}) to {out}; "
        f"best epoch {result.best_epoch}, {scored}."
    )
    return 0


def _write_scores(path: Path, router: Any, requests: list[Any], features: Any) -> None:
    """``eval --scores-out``: each row's predicted quality μ̃ per pool model (the whole pool
    available) and the normalised costs its utility subtracts."""
    from routers.probes.cli import write_scores

    out = router.predict_features(features, router.pool.mask(None))
    names, costs = list(router.pool.names), router.pool.cost_normalised
    write_scores(Path(path), [
        {"id": r.id, "quality": dict(zip(names, (round(float(x), 6) for x in row), strict=True)),
         "cost": dict(zip(names, costs, strict=True))}
        for r, row in zip(requests, out.mu_tilde.cpu(), strict=True)
    ])


def run_latent_router_calibrate(args: argparse.Namespace) -> int:
    """``switchyard calibrate`` for a LatentRouter: store the λ that sends ``--large-share``
    of the requests to the ``--large`` pool model (default: the most expensive)."""
    from extproc import SwitchyardError
    from routers.checkpoints import load_latent_router, store_lambda
    from routers.data import dataset_hash, load_labelled
    from routers.latent.evaluation import lambda_for_share

    router = load_latent_router(args.checkpoint, device=getattr(args, "device", None) or _default_device())
    names, costs = list(router.pool.names), list(router.pool.cost_normalised)
    large = getattr(args, "large", None) or names[max(range(len(names)), key=costs.__getitem__)]
    if large not in names:
        raise SwitchyardError(f"--large {large!r} is not a pool model of {args.checkpoint}; the pool: {', '.join(names)}.")
    requests = load_labelled(args.data)
    features = router.encoder.encode([r.messages for r in requests], batch_size=args.batch_size or 16, progress=False)
    mu = router.predict_features(features, router.pool.mask(None)).mu_tilde.cpu()
    lam, achieved = lambda_for_share(mu, router.cost_tensor().cpu(), names.index(large), args.large_share)
    store_lambda(args.checkpoint, {
        "large_share": args.large_share, "lambda": lam, "large": large, "achieved_share": achieved,
        "data": str(args.data), "data_hash": dataset_hash(args.data), "n": len(requests),
    })
    print(
        f"Stored lambda {lam:.6f} in {args.checkpoint}/config.json: at it {100 * achieved:.1f}% of "
        f"{len(requests)} requests on {args.data} go to {large} (a utility rule's `large_share: {args.large_share:g}`)."
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
    from routers.checkpoints import load_latent_router
    from routers.data import load_labelled
    from routers.latent.evaluation import evaluate_router, format_report, plot_frontier, shifted_pools

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
    if getattr(args, "scores_out", None):
        _write_scores(args.scores_out, router, requests, features)
    if getattr(args, "plot", None):
        plot_frontier({"LatentRouter": reports["none"]}, str(args.plot), title=f"LatentRouter on {Path(args.data).name}")
        print(f"Wrote {args.plot}")
    return 0
