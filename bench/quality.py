"""LatentRouter routing quality next to simple references, on one labelled set.

    python bench/quality.py --data synthetic
    python bench/quality.py --data /work/shared/data/gsm8k-routing.jsonl

Encodes every request once per query encoder, then for each of ``--repeats`` (3) seeded
random splits into train (70%) and test (30%) trains one LatentRouter per encoder on the
train split (early stopping on an internal validation split), and reports on
the test split, side by side: LatentRouter (each encoder), a random router (a random share p
of requests to the most expensive model, the rest to the cheapest, p = 0..1), always-small,
always-large, and the oracle (per request the best realised utility, swept over the same λ).
Figures: area under the cost–quality frontier (cost normalised to [0, 1] between the
cheapest and the most expensive model), quality and cost at λ = 0 and λ = ``--mid-lambda``,
and for two-model pools APGR and CPT(50%/80%); the table shows the mean over splits (± std
for AUC and APGR). Writes ``bench/results/quality-<dataset>.json``
and prints a table. ``backbone`` uses ``--backbone DIR`` (a local model folder); without it,
the bundled MiniLM-L6 read as a BERT-style truncated backbone at layer 3 of 6 stands in, since
no LLM weights can be fetched here (the row is labelled so).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from routers.data import load_labelled, parse_labelled  # noqa: E402
from routers.latent.encoders import EncoderSpec, build_encoder, minilm_path  # noqa: E402
from routers.latent.evaluation import DEFAULT_LAMBDAS, evaluate_router, frontier_auc, shifted_pools  # noqa: E402
from routers.latent.training import LatentTrainConfig, outcome_matrix, train_latent_router  # noqa: E402
from routers.metrics import apgr, cpt, routing_curve  # noqa: E402
from routers.synthetic import synthetic_rows  # noqa: E402


def _load(data: str, n_synthetic: int, seed: int) -> tuple[str, list[Any]]:
    if data == "synthetic":
        rows = synthetic_rows(n_synthetic, seed=seed, outcome="score")
        return "synthetic", parse_labelled([json.dumps(r) for r in rows], source="synthetic")
    path = Path(data)
    return path.stem, load_labelled(path)


def _norm(c: float, lo: float, hi: float) -> float:
    return min(1.0, max(0.0, (c - lo) / (hi - lo))) if hi > lo else 0.0


def _row(name: str, points: list[tuple[float, float]], lo: float, hi: float, mid: tuple[float, float] | None,
         two: dict[str, float] | None, curve: bool = True) -> dict[str, Any]:
    xs = [_norm(c, lo, hi) for c, _ in points]
    qs = [q for _, q in points]
    row: dict[str, Any] = {
        "router": name,
        "auc": frontier_auc(xs, qs) if curve else None,
        "quality_max": max(qs),
        "cost_at_quality_max": points[int(np.argmax(qs))][0],
    }
    if mid is not None:
        row["quality_mid"], row["cost_mid"] = mid[1], mid[0]
    if two is not None:
        row.update(two)
    return row


def _two_model_figures(sq: np.ndarray, lq: np.ndarray, score: np.ndarray) -> dict[str, float]:
    curve = routing_curve(sq, lq, score)
    sa, la = float(sq.mean()), float(lq.mean())
    return {"apgr": apgr(curve, sa, la), "cpt50": cpt(curve, sa, la, 0.5), "cpt80": cpt(curve, sa, la, 0.8)}


def _oracle_auc(names: list[str], pool: list[str], quality: torch.Tensor, cost: torch.Tensor,
                scale: float, lambdas: list[float]) -> float:
    """AUC of the oracle frontier restricted to ``pool``."""
    cols = [names.index(n) for n in pool]
    q, c = quality[:, cols], cost[:, cols]
    lo, hi = float(c.mean(0).min()), float(c.mean(0).max())
    rows = torch.arange(q.shape[0])
    xs, ys = [], []
    for lam in lambdas:
        idx = (q - lam * c / scale).argmax(dim=1)
        xs.append(_norm(float(c[rows, idx].mean()), lo, hi))
        ys.append(float(q[rows, idx].mean()))
    return frontier_auc(xs, ys)


def references(names: list[str], quality: torch.Tensor, cost: torch.Tensor, scale: float,
               lambdas: list[float], mid_lambda: float, seed: int) -> list[dict[str, Any]]:
    """Random router, always-small, always-large and the oracle on the test split."""
    mean_cost = cost.mean(0)
    small, large = int(mean_cost.argmin()), int(mean_cost.argmax())
    lo, hi = float(mean_cost.min()), float(mean_cost.max())
    n = quality.shape[0]
    rows = torch.arange(n)
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    rand_points = []
    for p in np.linspace(0, 1, 11):
        idx = torch.tensor(np.where(u < p, large, small))
        rand_points.append((float(cost[rows, idx].mean()), float(quality[rows, idx].mean())))
    two = len(names) == 2
    sq, lq = quality[:, small].numpy(), quality[:, large].numpy()
    out = [_row("random", rand_points, lo, hi, None,
                _two_model_figures(sq, lq, rng.random(n)) if two else None)]
    for label, j in (("always-small", small), ("always-large", large)):
        point = (float(cost[:, j].mean()), float(quality[:, j].mean()))
        r = _row(f"{label} ({names[j]})", [point], lo, hi, point, None, curve=False)
        out.append(r)
    oracle_points = []
    mid = None
    for lam in lambdas:
        idx = (quality - lam * cost / scale).argmax(dim=1)
        pt = (float(cost[rows, idx].mean()), float(quality[rows, idx].mean()))
        oracle_points.append(pt)
        if math.isclose(lam, mid_lambda):
            mid = pt
    oracle_two = None
    if two:
        # the oracle sends to large exactly the requests large gets right and small does not
        oracle_two = _two_model_figures(sq, lq, (sq - lq))
    out.append(_row("oracle", oracle_points, lo, hi, mid, oracle_two))
    return out


def _split(args: argparse.Namespace, n: int, seed: int) -> tuple[list[int], int]:
    """Row order and train/test cut: the last ``--test-rows`` rows held out when given (the same
    split for every seed), else a random ``--train-fraction`` split seeded by ``seed``."""
    order = list(range(n))
    if args.test_rows:
        return order, n - args.test_rows
    random.Random(seed).shuffle(order)
    return order, int(round(args.train_fraction * n))


def _one_split(args: argparse.Namespace, requests: list[Any], features: dict[str, Any], names: list[str],
               lambdas: list[float], seed: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]], int, int]:
    """Train (seeded by ``seed``) and evaluate every encoder and the references on one split."""
    order, cut = _split(args, len(requests), seed)
    train = [requests[i] for i in order[:cut]]
    test = [requests[i] for i in order[cut:]]
    tr_idx, te_idx = torch.tensor(order[:cut]), torch.tensor(order[cut:])
    quality, cost = outcome_matrix(test, names)
    rows: list[dict[str, Any]] = []
    shifts: dict[str, dict[str, float]] = {}
    scale = None
    for kind, (encoder, feats) in features.items():
        t = time.perf_counter()
        result = train_latent_router(
            train, encoder, None, LatentTrainConfig(epochs=args.epochs, seed=seed),
            names=names, progress=False, train_features=feats[tr_idx],
        )
        router = result.router
        scale = router.pool.cost_scale
        test_feats = feats[te_idx]
        report = evaluate_router(router, test, lambdas, features=test_feats)
        pts = [(r["cost"], r["quality"]) for r in report["lambdas"]]
        mid = next((r["cost"], r["quality"]) for r in report["lambdas"] if math.isclose(r["lambda"], args.mid_lambda))
        two = {k: report["two_model"][k] for k in ("apgr", "cpt50", "cpt80")} if "two_model" in report else None
        lo = min(s["cost"] for s in report["single_models"])
        hi = max(s["cost"] for s in report["single_models"])
        row = _row(f"LatentRouter[{kind}]", pts, lo, hi, mid, two)
        row["seconds_train"] = round(time.perf_counter() - t, 1)
        row["best_epoch"] = result.best_epoch
        rows.append(row)
        if len(names) > 2:
            for label, pool in shifted_pools(router, "all", seed).items():
                shifts.setdefault(f"LatentRouter[{kind}]", {})[label] = evaluate_router(
                    router, test, lambdas, available=pool, features=test_feats
                )["auc"]
                shifts.setdefault("oracle", {})[label] = _oracle_auc(names, pool, quality, cost, scale, lambdas)
        print(f"  split {seed} {kind}: train {row['seconds_train']}s, best epoch {result.best_epoch}, "
              f"AUC {row['auc']:.3f}", file=sys.stderr)
    if scale is None:
        scale = float(cost.mean(0).max())
    rows += references(names, quality, cost, scale, lambdas, args.mid_lambda, seed)
    return rows, shifts, len(train), len(test)


_CLI = "import sys\nfrom extproc.cli import main\nsys.exit(main(sys.argv[1:]))\n"
TARGET_FIGURES = ("roc_auc", "apgr", "cpt50", "cpt80")


def _switchyard(*argv: str) -> None:
    """Run the real ``switchyard`` CLI; its output goes to stderr, a failure stops the bench."""
    subprocess.run([sys.executable, "-c", _CLI, *argv], cwd=ROOT, check=True, stdout=sys.stderr)


def _write_split(data: Path, test_rows: int, work: Path) -> tuple[Path, Path]:
    """The file's first rows as ``train.jsonl`` and its last ``test_rows`` rows as ``test.jsonl``."""
    lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, test = work / "train.jsonl", work / "test.jsonl"
    train.write_text("\n".join(lines[:-test_rows]) + "\n", encoding="utf-8")
    test.write_text("\n".join(lines[-test_rows:]) + "\n", encoding="utf-8")
    return train, test


def probe_targets(args: argparse.Namespace, requests: list[Any], names: list[str]) -> dict[str, Any]:
    """``--targets``: for each seed, a probe trained with ``--target small_ok`` and one with
    ``--target gain`` on the same train rows, each scored by ``switchyard eval`` on the held-out
    rows; mean and std of its figures per target (small, large: the cheapest and the dearest model)."""
    mean_cost = outcome_matrix(requests, names)[1].mean(0)
    small, large = names[int(mean_cost.argmin())], names[int(mean_cost.argmax())]
    backbone, layer = args.backbone or str(minilm_path()), args.layer or 3
    per_seed: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="quality-targets-") as tmp:
        work = Path(tmp)
        train, test = _write_split(Path(args.data), args.test_rows, work)
        for target in ("small_ok", "gain"):
            for seed in range(args.seed, args.seed + args.repeats):
                ckpt, out = work / f"{target}-{seed}", work / f"{target}-{seed}.json"
                t = time.perf_counter()
                _switchyard("train", "probe", "--method", args.probe_method, "--backbone", backbone,
                            "--layer", str(layer), "--data", str(train), "--small", small, "--large", large,
                            "--target", target, "--seed", str(seed), "--no-progress", "--out", str(ckpt))
                _switchyard("eval", "--checkpoint", str(ckpt), "--data", str(test), "--small", small,
                            "--large", large, "--out", str(out))
                report = json.loads(out.read_text())
                row = {k: report[k] for k in TARGET_FIGURES}
                row.update(seed=seed, seconds=round(time.perf_counter() - t, 1))
                per_seed.setdefault(target, []).append(row)
                print(f"  {target} seed {seed}: APGR {row['apgr']:.3f}, CPT(50%) {row['cpt50']:.3f}", file=sys.stderr)
    summary = {
        target: {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
                 for k in TARGET_FIGURES}
        for target, rows in per_seed.items()
    }
    return {"method": args.probe_method, "backbone": backbone, "layer": layer, "small": small, "large": large,
            "summary": summary, "per_seed": per_seed}


def format_targets(res: dict[str, Any], n_train: int, n_test: int) -> str:
    """Markdown table of ``--targets``."""
    t = res["targets"]
    backbone = "the bundled MiniLM-L6 (stand-in)" if t["backbone"] == str(minilm_path()) else t["backbone"]
    lines = [f"{t['method']} probe on {backbone}, layer {t['layer']}: train {n_train}, test {n_test} "
             f"(the last rows); mean ± std over {res['repeats']} seeds", "",
             "| target | ROC AUC | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|---|"]
    for target, figures in t["summary"].items():
        cells = [f"{_f(figures[k]['mean'])} ± {_f(figures[k]['std'])}" for k in TARGET_FIGURES]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _aggregate(per_split: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean over splits of every numeric field (``<field>_std`` for AUC and APGR)."""
    out = []
    for i, first in enumerate(per_split[0]):
        row: dict[str, Any] = {"router": first["router"]}
        for key, value in first.items():
            if key == "router":
                continue
            values = [split[i][key] for split in per_split]
            if value is None or any(v is None for v in values):
                row[key] = None
                continue
            arr = np.asarray(values, dtype=float)
            row[key] = float(np.nanmean(arr)) if not np.all(np.isnan(arr)) else math.nan
            if key in ("auc", "apgr", "cpt50") and len(values) > 1:
                row[f"{key}_std"] = float(np.nanstd(arr))
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="labelled JSONL, or `synthetic`")
    ap.add_argument("--encoders", default="hashing,text,backbone")
    ap.add_argument("--backbone", help="local backbone model folder (default: the bundled MiniLM-L6 as a stand-in)")
    ap.add_argument("--layer", type=int, help="backbone layer to pool (default: 3 for the stand-in, else half the layers)")
    ap.add_argument("--train-fraction", type=float, default=0.7)
    ap.add_argument("--test-rows", type=int, default=0,
                    help="hold out the file's last N rows (one split; --repeats then varies the training seed only)")
    ap.add_argument("--targets", action="store_true",
                    help="also train a probe per target (small_ok, gain) and seed on that split and compare them "
                         "with `switchyard eval` (needs --test-rows and a two-model file)")
    ap.add_argument("--probe-method", default="attention", help="probe kind for --targets")
    ap.add_argument("--repeats", type=int, default=3,
                    help="random train/test splits, or training seeds with --test-rows (seeds seed..seed+repeats-1)")
    ap.add_argument("--n-synthetic", type=int, default=1600)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--mid-lambda", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the router is tiny; 1 avoids oversubscription)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.targets and (not args.test_rows or args.data == "synthetic"):
        ap.error("--targets needs --test-rows N and a labelled file as --data")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    dataset, requests = _load(args.data, args.n_synthetic, args.seed)
    names = list(requests[0].outcomes)
    targets = probe_targets(args, requests, names) if args.targets else None
    lambdas = sorted(set(DEFAULT_LAMBDAS) | {args.mid_lambda})
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    features: dict[str, Any] = {}
    encode_seconds: dict[str, float] = {}
    for kind in [k.strip() for k in args.encoders.split(",") if k.strip()]:
        t = time.perf_counter()
        model, layer = None, None
        if kind == "backbone":
            model, layer = args.backbone, args.layer
            if model is None:
                model, layer = str(minilm_path()), args.layer or 3
                notes[kind] = f"stand-in backbone: bundled MiniLM-L6 (BERT-style), layer {layer} of 6"
        spec = EncoderSpec(kind=kind, model=model, layer=layer)
        encoder = build_encoder(spec)
        features[kind] = (encoder, encoder.encode([r.messages for r in requests]))
        encode_seconds[kind] = round(time.perf_counter() - t, 1)
        print(f"  {kind}: encoded {len(requests)} requests in {encode_seconds[kind]}s", file=sys.stderr)

    per_split, shift_splits = [], []
    for seed in range(args.seed, args.seed + args.repeats):
        rows, shifts, n_train, n_test = _one_split(args, requests, features, names, lambdas, seed)
        per_split.append(rows)
        shift_splits.append(shifts)
    shifts_mean = {
        router: {label: float(np.mean([s[router][label] for s in shift_splits])) for label in labels}
        for router, labels in shift_splits[0].items()
    }
    result_json = {
        "dataset": dataset,
        "data": args.data,
        "n_train": n_train,
        "n_test": n_test,
        "repeats": args.repeats,
        "fixed_split": bool(args.test_rows),
        "pool": names,
        "mid_lambda": args.mid_lambda,
        "rows": _aggregate(per_split),
        "rows_per_split": per_split,
        "pool_shift_auc": shifts_mean,
        "encode_seconds": encode_seconds,
        "skipped": skipped,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
    }
    if targets is not None:
        result_json["targets"] = targets
    out = args.out or ROOT / "bench" / "results" / f"quality-{dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result_json, indent=2) + "\n")
    print(format_table(result_json))
    if targets is not None:
        print()
        print(format_targets(result_json, n_train, n_test))
    print(f"wrote {out}")
    return 0


def _f(x: Any, d: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{d}f}"
    return str(x)


def _pm(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    std = row.get(f"{key}_std")
    return _f(value) if std is None or value is None else f"{_f(value)} ± {_f(std)}"


def format_table(res: dict[str, Any]) -> str:
    """Markdown table of one bench result."""
    two = len(res["pool"]) == 2
    head = ["router", "AUC", "max quality", "cost @max", f"quality @λ={res['mid_lambda']}", f"cost @λ={res['mid_lambda']}"]
    if two:
        head += ["APGR", "CPT(50%)", "CPT(80%)"]
    over = (f"{res['repeats']} training seeds on one split (the last {res['n_test']} rows held out)"
            if res.get("fixed_split") else f"{res['repeats']} random splits")
    lines = [f"{res['dataset']}: pool {', '.join(res['pool'])}; train {res['n_train']}, test {res['n_test']}; "
             f"mean (± std) over {over}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [r["router"], _pm(r, "auc"), _f(r["quality_max"]), _f(r["cost_at_quality_max"], 5),
                 _f(r.get("quality_mid")), _f(r.get("cost_mid"), 5)]
        if two:
            cells += [_pm(r, "apgr"), _pm(r, "cpt50"), _f(r.get("cpt80"))]
        lines.append("| " + " | ".join(cells) + " |")
    if res["pool_shift_auc"]:
        shifts = list(next(iter(res["pool_shift_auc"].values())))
        lines += ["", "Pool shift (AUC on the remaining pool):", "| router | " + " | ".join(shifts) + " |",
                  "|" + "---|" * (len(shifts) + 1)]
        for name, v in sorted(res["pool_shift_auc"].items(), key=lambda kv: kv[0] == "oracle"):
            lines.append(f"| {name} | " + " | ".join(_f(v[s]) for s in shifts) + " |")
    for k, why in res["skipped"].items():
        lines.append("")
        lines.append(f"skipped {k}: {why}")
    for k, note in res.get("notes", {}).items():
        lines.append(f"{k}: {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
