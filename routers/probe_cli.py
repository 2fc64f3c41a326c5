"""``switchyard train probe``, ``switchyard eval`` (probe checkpoints) and ``switchyard calibrate``.

    switchyard train probe --method relope --backbone ./Qwen2.5-1.5B-Instruct --layer 14 \\
        --data train.jsonl --val val.jsonl --small qwen-1.5b --out ckpt/relope
    switchyard eval --checkpoint ckpt/relope --data test.jsonl --small qwen-1.5b \\
        --large qwen-72b --plot curve.png --out report.json
    switchyard calibrate --checkpoint ckpt/relope --data val.jsonl --large-share 0.2

Handlers take the parsed ``argparse.Namespace`` and return an exit code; errors are raised
as :class:`SwitchyardError` for the top-level CLI to print.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from extproc._errors import SwitchyardError

__all__ = ["add_train_probe_parser", "add_calibrate_parser", "run_probe_eval", "eval_report"]

METHODS = ("last_token", "attention", "relope")


def _half_depth(path: Path) -> int | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    layers = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    return max(1, int(layers) // 2) if isinstance(layers, int) else None


def add_train_probe_parser(train_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``probe`` to ``switchyard train``."""
    p = train_subparsers.add_parser(
        "probe",
        help="Train a hidden-state probe (last_token, attention, relope).",
        description="Train a probe that predicts P(small model answers correctly) from the "
        "small model's hidden states, and save it as a checkpoint folder.",
    )
    p.add_argument("--method", choices=METHODS, required=True, help="Probe kind.")
    p.add_argument("--backbone", type=Path, required=True, help="Local folder of the small model (HF format).")
    p.add_argument("--layer", type=int, help="Probe layer l, 1-based (default: half the model's layers).")
    p.add_argument("--data", type=Path, required=True, help="Labelled JSONL training set.")
    p.add_argument("--small", required=True, help="Backend whose `outcomes.<small>.correct` is the label.")
    p.add_argument("--val", type=Path, help="Labelled JSONL validation set (early stopping on its AUC).")
    p.add_argument("--out", type=Path, required=True, help="Checkpoint folder to write.")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=10, help="Epochs (default 10).")
    t.add_argument("--batch-size", type=int, default=16, help="Batch size (default 16).")
    t.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3; 1e-4 for relope).")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01).")
    t.add_argument("--patience", type=int, default=3, help="Early-stopping patience in epochs (0 = off; default 3).")
    t.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    t.add_argument("--cache-budget-gb", type=float, default=4.0, help="CPU memory for cached states (default 4).")
    t.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    h = p.add_argument_group("probe")
    h.add_argument("--mlp-depth", type=int, default=5, help="MLP linear layers incl. output (default 5).")
    h.add_argument("--mlp-width", type=int, help="First MLP hidden width, halved per layer (default 256; relope 64).")
    h.add_argument("--dropout", type=float, default=0.1, help="MLP dropout (default 0.1).")
    h.add_argument("--no-input-norm", action="store_true", help="Do not LayerNorm the states first.")
    r = p.add_argument_group("relope")
    r.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16).")
    r.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32).")
    r.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0).")
    r.add_argument("--lora-targets", help="Comma-separated linear modules of layer l (default: all of them).")
    r.add_argument("--bottleneck", type=int, default=128, help="Size of z (default 128).")
    r.add_argument("--beta", type=float, default=1e-3, help="KL weight (default 1e-3).")
    _add_runtime(p)
    p.set_defaults(handler=run_train_probe)
    return p


def add_calibrate_parser(top_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``calibrate`` to the top-level CLI."""
    p = top_subparsers.add_parser(
        "calibrate",
        help="Store the probe threshold that sends a given share of requests to the large model.",
        description="Score a labelled set with a probe checkpoint and store, in its config.json, "
        "the threshold below which that share of requests would go to the large model.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="Probe checkpoint folder.")
    p.add_argument("--data", type=Path, required=True, help="Labelled JSONL set to calibrate on (only its messages are used).")
    p.add_argument("--large-share", type=float, required=True, help="Share of requests for the large model, 0..1.")
    _add_runtime(p)
    p.set_defaults(handler=run_calibrate)
    return p


def _add_runtime(p: argparse.ArgumentParser) -> None:
    if not any(a.dest == "device" for a in p._actions):
        p.add_argument("--device", help="torch device (default: cuda if available, else cpu).")
    if not any(a.dest == "batch_size" for a in p._actions):
        p.add_argument("--batch-size", type=int, default=16, help="Scoring batch size (default 16).")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="Backbone dtype (default: bf16 on CUDA, fp32 on CPU).")
    p.add_argument("--max-tokens", type=int, default=4096, help="Keep the last N tokens of long prompts (default 4096).")


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": getattr(args, "device", None),
        "dtype": getattr(args, "dtype", None),
        "max_tokens": getattr(args, "max_tokens", None),
    }


def _build_probe(args: argparse.Namespace, backbone: Any, layer: int) -> Any:
    from routers.mlp import MLPConfig
    from routers.probes import AttentionProbeConfig, LastTokenProbeConfig, ReLopeConfig, build_probe

    width = args.mlp_width or (64 if args.method == "relope" else 256)
    mlp = MLPConfig(depth=args.mlp_depth, width=width, dropout=args.dropout)
    common = {"hidden_size": backbone.hidden_size, "layer": layer, "mlp": mlp, "input_norm": not args.no_input_norm}
    if args.method == "last_token":
        config: Any = LastTokenProbeConfig(**common)
    elif args.method == "attention":
        config = AttentionProbeConfig(**common)
    else:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
        config = ReLopeConfig(
            **common,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            bottleneck=args.bottleneck,
            beta=args.beta,
        )
    return build_probe(args.method, config, backbone.layer_module(layer))


def run_train_probe(args: argparse.Namespace) -> int:
    """``switchyard train probe``."""
    import torch

    from routers.backbone import BackboneConfig, TruncatedBackbone
    from routers.data import dataset_hash, load_labelled
    from routers.probe_checkpoint import save_probe
    from routers.probe_training import TrainConfig, train_probe

    layer = args.layer or _half_depth(args.backbone)
    if layer is None:
        raise SwitchyardError(f"Cannot read the depth of {args.backbone}; pass --layer.")
    train = load_labelled(args.data)
    val = load_labelled(args.val) if args.val else None
    try:
        runtime = {k: v for k, v in _runtime(args).items() if v is not None}
        backbone = TruncatedBackbone(BackboneConfig(path=str(args.backbone), layer=layer, **runtime))
        torch.manual_seed(args.seed)
        probe = _build_probe(args, backbone, layer)
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            patience=args.patience,
            seed=args.seed,
            cache_budget_gb=args.cache_budget_gb,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        raise SwitchyardError(str(exc)) from exc
    result = train_probe(probe, backbone, train, args.small, val, config)
    training = {
        **config.__dict__,
        "small": args.small,
        "train_data": str(args.data),
        "train_data_hash": dataset_hash(args.data),
        "val_data": str(args.val) if args.val else None,
        "val_data_hash": dataset_hash(args.val) if args.val else None,
        **result.to_dict(),
    }
    save_probe(args.out, probe, backbone, training=training)
    auc = "n/a" if result.best_val_auc is None else f"{result.best_val_auc:.4f}"
    print(f"Saved {args.method} probe (layer {layer}, epoch {result.best_epoch}, val AUC {auc}) to {args.out}")
    return 0


def _scores(args: argparse.Namespace, conversations: list[Any]) -> tuple[Any, list[float]]:
    from routers.probe_checkpoint import read_checkpoint
    from routers.probe_scorer import ProbeScorer

    checkpoint = read_checkpoint(args.checkpoint)
    try:
        scorer = ProbeScorer.from_checkpoints(
            {"probe": args.checkpoint}, batch_size=args.batch_size, **_runtime(args)
        )
    except ValueError as exc:
        raise SwitchyardError(str(exc)) from exc
    return checkpoint, scorer.score(conversations)["probe"]


def eval_report(
    small_quality: list[float],
    large_quality: list[float],
    p_small: list[float],
    small_correct: list[int] | None,
) -> dict[str, Any]:
    """The metrics ``switchyard eval`` prints and writes, from per-request arrays."""
    import numpy as np

    from routers.metrics import apgr, cpt, curve_shares, roc_auc, routing_curve

    curve = routing_curve(small_quality, large_quality, p_small)
    small_acc, large_acc = float(np.mean(small_quality)), float(np.mean(large_quality))

    def clean(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    return {
        "n": len(p_small),
        "small_accuracy": small_acc,
        "large_accuracy": large_acc,
        "roc_auc": None if small_correct is None else clean(roc_auc(small_correct, p_small)),
        "apgr": clean(apgr(curve, small_acc, large_acc)),
        "cpt50": clean(cpt(curve, small_acc, large_acc, 0.5)),
        "cpt80": clean(cpt(curve, small_acc, large_acc, 0.8)),
        "curve": {"large_share": curve_shares(curve.size).round(4).tolist(), "accuracy": curve.tolist()},
    }


def run_probe_eval(args: argparse.Namespace) -> int:
    """``switchyard eval`` for probe checkpoints."""
    from routers.data import dataset_hash, load_labelled

    if not args.small or not args.large:
        raise SwitchyardError("Evaluating a probe needs --small and --large backend names.")
    requests = load_labelled(args.data)
    small = [r.outcome(args.small) for r in requests]
    large = [r.outcome(args.large) for r in requests]
    checkpoint, p_small = _scores(args, [r.messages for r in requests])
    correct = [o.correct for o in small]
    report = {
        "checkpoint": str(args.checkpoint),
        "kind": checkpoint.kind,
        "data": str(args.data),
        "data_hash": dataset_hash(args.data),
        "small": args.small,
        "large": args.large,
        **eval_report(
            [o.quality for o in small],
            [o.quality for o in large],
            p_small,
            None if any(c is None for c in correct) else correct,
        ),
    }
    _print_report(report)
    if args.plot:
        _plot(report, args.plot)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.4f}"


def _print_report(report: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"{report['kind']} probe on {report['data']} (n={report['n']})\n")
    rows = [
        ("small accuracy", _fmt(report["small_accuracy"])),
        ("large accuracy", _fmt(report["large_accuracy"])),
        ("ROC AUC", _fmt(report["roc_auc"])),
        ("APGR", _fmt(report["apgr"])),
        ("CPT(50%)", _fmt(report["cpt50"], pct=True)),
        ("CPT(80%)", _fmt(report["cpt80"], pct=True)),
    ]
    for name, value in rows:
        out.write(f"  {name:<16}{value:>10}\n")
    out.write("  large share -> accuracy\n")
    shares, acc = report["curve"]["large_share"], report["curve"]["accuracy"]
    for k in range(0, len(shares), max(1, (len(shares) - 1) // 10)):
        out.write(f"  {100 * shares[k]:>10.0f}%   {acc[k]:.4f}\n")


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [100 * s for s in report["curve"]["large_share"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(shares, report["curve"]["accuracy"], label=f"{report['kind']} probe")
    ax.plot([0, 100], [report["small_accuracy"], report["large_accuracy"]], "--", color="grey", label="random")
    ax.axhline(report["small_accuracy"], color="tab:blue", linestyle=":", label=f"small ({report['small']})")
    ax.axhline(report["large_accuracy"], color="tab:red", linestyle=":", label=f"large ({report['large']})")
    ax.set_xlabel("requests routed to the large model (%)")
    ax.set_ylabel("system accuracy")
    ax.set_title(f"APGR {_fmt(report['apgr'])}, AUC {_fmt(report['roc_auc'])}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_calibrate(args: argparse.Namespace) -> int:
    """``switchyard calibrate``."""
    import numpy as np

    from routers.data import dataset_hash, load_labelled
    from routers.metrics import threshold_for_share
    from routers.probe_checkpoint import store_threshold

    if not 0.0 <= args.large_share <= 1.0:
        raise SwitchyardError(f"--large-share must be in [0, 1], got {args.large_share}.")
    requests = load_labelled(args.data)
    _, p_small = _scores(args, [r.messages for r in requests])
    threshold = threshold_for_share(p_small, args.large_share)
    achieved = float(np.mean(np.asarray(p_small) < threshold))
    store_threshold(
        args.checkpoint,
        {
            "large_share": args.large_share,
            "threshold": threshold,
            "achieved_share": achieved,
            "data": str(args.data),
            "data_hash": dataset_hash(args.data),
            "n": len(p_small),
        },
    )
    print(
        f"Stored threshold {threshold:.6f} in {args.checkpoint}/config.json: requests scoring below it "
        f"go to the large model ({100 * achieved:.1f}% of {len(p_small)} on {args.data})."
    )
    return 0
