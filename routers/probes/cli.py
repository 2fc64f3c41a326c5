"""``switchyard train probe``, ``switchyard eval`` (probe checkpoints) and ``switchyard calibrate``.

    switchyard train probe --method relope --backbone ./Qwen2.5-1.5B-Instruct --layer 14 \\
        --data train.jsonl --small qwen-1.5b --out ckpt/relope
    switchyard eval --checkpoint ckpt/relope --data test.jsonl --small qwen-1.5b \\
        --large qwen-72b --plot curve.png --out report.json
    switchyard calibrate --checkpoint ckpt/relope --data ckpt/relope/validation.jsonl --large-share 0.2

Flags, their defaults and help come from the config dataclasses (:class:`TrainConfig`,
:class:`MLPConfig`, the probe configs, :class:`BackboneConfig`) through
:mod:`routers.config_options`. Handlers take the parsed ``argparse.Namespace`` and return an
exit code; errors are raised as :class:`SwitchyardError` for the top-level CLI to print.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from extproc import SwitchyardError
from routers.config_options import add_config_options, config_values, field_default

__all__ = [
    "add_train_probe_parser",
    "add_calibrate_parser",
    "add_scoring_options",
    "run_probe_eval",
    "eval_report",
]

#: ReLope settings offered as flags (its other fields come from the backbone and --layer).
RELOPE_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "bottleneck", "beta")
#: Backbone settings ``train probe`` offers; eval, calibrate and serving take the truncation
#: from the checkpoint.
TRAIN_BACKBONE_OPTIONS = ("device", "dtype", "max_tokens", "head_tokens")
SCORING_BACKBONE_OPTIONS = ("device", "dtype")


def _kind_mlps() -> dict[str, Any]:
    """Probe kind -> the MLP head its config has by default."""
    from routers.probes import PROBE_KINDS

    return {
        kind: field_default(next(f for f in fields(config_class) if f.name == "mlp"))
        for kind, (_, config_class) in PROBE_KINDS.items()
    }


def _mlp_default_text() -> dict[str, str]:
    from routers.probes.mlp import MLPConfig

    mlps = _kind_mlps()
    text = {}
    for f in fields(MLPConfig):
        values = {kind: getattr(mlp, f.name) for kind, mlp in mlps.items()}
        if len(set(values.values())) == 1:
            text[f.name] = str(next(iter(values.values())))
        else:
            text[f.name] = ", ".join(f"{kind} {value}" for kind, value in values.items())
    return text


def add_train_probe_parser(train_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``probe`` to ``switchyard train``; flag defaults and help come from the configs."""
    from routers.backbone import BackboneConfig
    from routers.checkpoints import PROBE_TARGETS
    from routers.probes import PROBE_KINDS, LastTokenProbeConfig, ReLopeConfig
    from routers.probes.mlp import MLPConfig
    from routers.probes.training import TrainConfig

    p = train_subparsers.add_parser(
        "probe",
        help="Train a hidden-state probe (last_token, attention, relope).",
        description="Train a probe on the small model's hidden states that predicts P(the small model "
        "answers well enough) (--target small_ok) or how much better the large model does (--target gain), "
        "and save it as a checkpoint folder (with its held-out validation rows in validation.jsonl).",
    )
    p.add_argument("--method", choices=tuple(PROBE_KINDS), required=True, help="Probe kind.")
    p.add_argument("--backbone", type=Path, required=True, help="Local folder of the small model (HF format).")
    p.add_argument("--layer", type=int, help="Probe layer l, 1-based (default: half the model's layers).")
    p.add_argument("--data", type=Path, required=True, help="Labelled JSONL training set.")
    p.add_argument("--small", required=True, help="The small backend: `outcomes.<small>.correct` is the small_ok label.")
    p.add_argument(
        "--target", choices=PROBE_TARGETS, default=PROBE_TARGETS[0],
        help="What the score predicts: small_ok, P(the small model is good enough; a high score keeps it on "
        "--small), or gain, how much better --large does (quality(large) - quality(small) clipped to [0, 1]; "
        f"a high score sends it to --large). Saved in the checkpoint (default: {PROBE_TARGETS[0]}).",
    )
    p.add_argument("--large", help="The large backend (needed by --target gain).")
    p.add_argument(
        "--val", type=Path, help="Labelled JSONL validation set for early stopping (default: hold out --val-fraction of --data)."
    )
    p.add_argument("--out", type=Path, required=True, help="Checkpoint folder to write (replaced atomically).")
    add_config_options(p.add_argument_group("training"), TrainConfig)
    head = p.add_argument_group("probe head")
    add_config_options(
        head,
        MLPConfig,
        prefix="mlp",
        flags={"dropout": ["--mlp-dropout", "--dropout"]},
        defaults={f.name: None for f in fields(MLPConfig)},
        default_text=_mlp_default_text(),
    )
    add_config_options(head, LastTokenProbeConfig, only=["input_norm"])
    add_config_options(
        p.add_argument_group("relope"), ReLopeConfig, only=RELOPE_OPTIONS, flags={"target_modules": ["--lora-targets"]}
    )
    add_config_options(p.add_argument_group("backbone"), BackboneConfig, only=TRAIN_BACKBONE_OPTIONS)
    p.set_defaults(handler=run_train_probe)
    return p


def add_scoring_options(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--batch-size`` of the commands that score a checkpoint
    (``eval``, ``calibrate``); the truncation is the checkpoint's."""
    from routers.backbone import BackboneConfig
    from routers.probes.offline import ProbeScorer

    g = p.add_argument_group("scoring")
    add_config_options(g, BackboneConfig, only=SCORING_BACKBONE_OPTIONS)
    batch = inspect.signature(ProbeScorer).parameters["batch_size"].default
    g.add_argument("--batch-size", type=int, default=batch, help=f"Requests per forward (default: {batch}).")


def add_calibrate_parser(top_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``calibrate`` to the top-level CLI."""
    p = top_subparsers.add_parser(
        "calibrate",
        help="Store the probe threshold, or the LatentRouter λ, that sends a given share of requests to the large model.",
        description="Score a labelled set with a checkpoint and store, in its config.json, what sends that share "
        "of requests to the large model: a probe's threshold (a small_ok probe's requests scoring below it, a "
        "gain probe's scoring at or above it), or a LatentRouter's cost weight λ (the requests whose best "
        "utility is the --large pool model's; a utility rule's `large_share` uses it).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="Probe or LatentRouter checkpoint folder.")
    p.add_argument("--data", type=Path, required=True, help="Labelled JSONL set to calibrate on (only its messages are used).")
    p.add_argument("--large-share", type=float, required=True, help="Share of requests for the large model, 0..1.")
    p.add_argument("--large", help="LatentRouter: the pool model counted as large (default: the most expensive).")
    add_scoring_options(p)
    p.set_defaults(handler=run_calibrate)
    return p


def _build_probe(args: argparse.Namespace, backbone: Any, layer: int) -> Any:
    from routers.probes import ReLopeConfig, build_probe, probe_config_class
    from routers.probes.mlp import MLPConfig

    config_class = probe_config_class(args.method)
    mlp = replace(_kind_mlps()[args.method], **config_values(MLPConfig, args, prefix="mlp", skip_none=True))
    settings: dict[str, Any] = {"hidden_size": backbone.hidden_size, "layer": layer, "mlp": mlp, "input_norm": args.input_norm}
    if config_class is ReLopeConfig:
        settings.update(config_values(ReLopeConfig, args, only=RELOPE_OPTIONS))
    return build_probe(args.method, config_class(**settings), backbone.layer_module(layer))


def run_train_probe(args: argparse.Namespace) -> int:
    """``switchyard train probe``."""
    import torch

    from routers.backbone import BackboneConfig, TruncatedBackbone, default_layer
    from routers.checkpoints import VALIDATION_FILE, save_probe
    from routers.data import dataset_hash, load_labelled, select_lines
    from routers.probes.training import TrainConfig, needed_backends, train_probe

    needed_backends(args.target, args.small, args.large)  # a --target gain without --large fails first
    layer = args.layer or default_layer(args.backbone)
    train = load_labelled(args.data)
    val = load_labelled(args.val) if args.val else None
    try:
        runtime = config_values(BackboneConfig, args, only=TRAIN_BACKBONE_OPTIONS)
        backbone = TruncatedBackbone(BackboneConfig(path=str(args.backbone), layer=layer, **runtime))
        config = TrainConfig(**config_values(TrainConfig, args))
        torch.manual_seed(config.seed)
        probe = _build_probe(args, backbone, layer)
    except ValueError as exc:
        raise SwitchyardError(str(exc)) from exc
    result = train_probe(probe, backbone, train, args.small, val, config, target=args.target, large=args.large)
    rows = select_lines(args.data, result.validation_ids) if result.validation_ids else None
    if rows is not None:
        result.validation["file"] = VALIDATION_FILE
    training = {
        "config": asdict(config),
        "small": args.small,
        "large": args.large,
        "train_data": str(args.data),
        "train_data_hash": dataset_hash(args.data),
        "val_data": str(args.val) if args.val else None,
        "val_data_hash": dataset_hash(args.val) if args.val else None,
        **result.to_dict(),
    }
    save_probe(args.out, probe, backbone, training=training, target=args.target, large=args.large, validation_rows=rows)
    print(
        f"Saved {args.method} probe (target {args.target}, layer {layer}, epoch {result.best_epoch}, "
        f"{_validation_text(result.validation, result.best_val_auc)}; prompts cut to "
        f"{backbone.truncation.max_tokens} tokens) to {args.out}"
    )
    if rows is not None:
        share = _labelled_large_share(train, result.validation_ids, args)
        print(f"Held-out validation rows: {args.out / VALIDATION_FILE}; the labels send {share:.0%} of them to "
              f"the large model (calibrate on them: switchyard calibrate --checkpoint {args.out} "
              f"--data {args.out / VALIDATION_FILE} --large-share {max(0.01, round(share, 2)):g})")
    return 0


def _labelled_large_share(train: list, ids: list[str], args: argparse.Namespace) -> float:
    """The share of the held-out requests whose labels say "large": the small model failed
    (``small_ok``), or the large one does better (``gain``); graded labels cut at 0.5. The
    held-out ids never include a request whose needed outcome failed (training skipped those
    before it split)."""
    from routers.probes.training import target_labels

    wanted = set(ids)
    labels = target_labels([r for r in train if r.id in wanted], args.target, args.small, args.large)
    large = labels < 0.5 if args.target == "small_ok" else labels >= 0.5
    return float(large.mean()) if len(labels) else 0.0


def _validation_text(validation: dict[str, Any], auc: float | None) -> str:
    source = validation.get("source")
    if source == "none":
        return "no validation set, no early stopping"
    where = "--val" if source == "given" else f"{100 * validation['fraction']:g}% held out"
    shown = "n/a (one class only)" if auc is None else f"{auc:.4f}"
    return f"val AUC {shown} on {validation['n_val']} requests ({where})"


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in SCORING_BACKBONE_OPTIONS}


def _scores(args: argparse.Namespace, conversations: list[Any]) -> tuple[Any, list[float]]:
    from routers.checkpoints import read_checkpoint
    from routers.probes.offline import ProbeScorer

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


def _keep_small(target: str, scores: list[float]) -> list[float]:
    """Scores ordered like P(small is good enough): the lowest go to the large model first
    (a ``gain`` probe's high score means "send to large", so it is negated)."""
    return [-s for s in scores] if target == "gain" else list(scores)


def _auc_truth(target: str, small: list[Any], large: list[Any]) -> list[int] | None:
    """Per request, 1 when keeping the small model is right by the checkpoint's target, for
    ROC AUC against :func:`_keep_small` (graded values rounded at 0.5); ``None`` when an
    outcome lacks what the target reads."""
    if target == "gain":
        if any(o.quality is None for o in (*small, *large)):
            return None
        return [int(min(1.0, max(0.0, lo.quality - so.quality)) < 0.5) for so, lo in zip(small, large, strict=True)]
    if any(o.correct is None for o in small):
        return None
    return [int(o.correct >= 0.5) for o in small]


def write_scores(path: Path, rows: list[dict[str, Any]]) -> None:
    """``eval --scores-out``: one JSON object a line, one line per request evaluated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def run_probe_eval(args: argparse.Namespace) -> int:
    """``switchyard eval`` for probe checkpoints (ordered by the checkpoint's target)."""
    from routers.checkpoints import read_checkpoint
    from routers.data import dataset_hash, load_labelled, without_failed

    if not args.small or not args.large:
        raise SwitchyardError("Evaluating a probe needs --small and --large backend names.")
    target = read_checkpoint(args.checkpoint).target
    requests = without_failed(load_labelled(args.data), (args.small, args.large), "evaluate on")
    if not requests:
        raise SwitchyardError(f"No request of {args.data} is left once those whose outcome failed are skipped.")
    small = [r.outcome(args.small) for r in requests]
    large = [r.outcome(args.large) for r in requests]
    checkpoint, scores = _scores(args, [r.messages for r in requests])
    report = {
        "checkpoint": str(args.checkpoint),
        "kind": checkpoint.kind,
        "target": target,
        "data": str(args.data),
        "data_hash": dataset_hash(args.data),
        "small": args.small,
        "large": args.large,
        **eval_report(
            [o.quality for o in small],
            [o.quality for o in large],
            _keep_small(target, scores),
            _auc_truth(target, small, large),
        ),
    }
    if getattr(args, "scores_out", None):
        write_scores(args.scores_out, [{"id": r.id, "score": s} for r, s in zip(requests, scores, strict=True)])
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
    out.write(f"{report['kind']} probe ({report['target']}) on {report['data']} (n={report['n']})\n")
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
    """``switchyard calibrate``: a probe's threshold, or a LatentRouter's λ, for a large share."""
    from routers.checkpoints import read_config

    if not 0.0 <= args.large_share <= 1.0:
        raise SwitchyardError(f"--large-share must be in [0, 1], got {args.large_share}.")
    if read_config(args.checkpoint).scorer_kind != "probe":
        from routers.latent import cli as latent_cli

        return latent_cli.run_latent_router_calibrate(args)
    return _calibrate_probe(args)


def _calibrate_probe(args: argparse.Namespace) -> int:
    """The threshold that sends ``--large-share`` to the large model: below it for a
    ``small_ok`` probe, at or above it for a ``gain`` probe."""
    import numpy as np

    from routers.checkpoints import store_threshold
    from routers.data import dataset_hash, load_labelled
    from routers.metrics import threshold_for_share

    requests = load_labelled(args.data)
    checkpoint, scores = _scores(args, [r.messages for r in requests])
    gain = checkpoint.target == "gain"
    if gain:  # the share scoring highest goes to large: the same cut on negated scores
        threshold = -threshold_for_share([-s for s in scores], args.large_share)
        achieved = float(np.mean(np.asarray(scores) >= threshold))
    else:
        threshold = threshold_for_share(scores, args.large_share)
        achieved = float(np.mean(np.asarray(scores) < threshold))
    store_threshold(
        args.checkpoint,
        {
            "large_share": args.large_share,
            "threshold": threshold,
            "large_when": "above" if gain else "below",
            "achieved_share": achieved,
            "data": str(args.data),
            "data_hash": dataset_hash(args.data),
            "n": len(scores),
        },
    )
    where = "at or above" if gain else "below"
    print(
        f"Stored threshold {threshold:.6f} in {args.checkpoint}/config.json: requests scoring {where} it "
        f"go to the large model ({100 * achieved:.1f}% of {len(scores)} on {args.data})."
    )
    return 0
