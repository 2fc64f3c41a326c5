"""Evaluating a LatentRouter: λ sweep, cost–quality frontier, reference rows, pool shifts.

For each λ the router picks one model per request; the point is (mean cost, mean quality)
of the picked models. Cost is also shown normalised to [0, 1] between the cheapest and the
most expensive single model of the evaluated pool. ``auc`` is the area under the frontier
over normalised cost: points sorted by cost, quality made non-decreasing (spending more can
always repeat the best cheaper policy), extended flat to 0 and 1, trapezoid rule (mixing two
policies at random gives the straight line between them). Two-model pools also get APGR and
CPT(50%/80%) from :mod:`routers.metrics`, with the router's score
μ̃_small − μ̃_large playing the probe's P(small correct).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from routers.data import DataError, LabelledRequest
from routers.latent.router import LatentRouter, choose
from routers.latent.training import outcome_matrix
from routers.metrics import apgr, cpt, routing_curve

__all__ = [
    "DEFAULT_LAMBDAS",
    "POOL_SHIFTS",
    "frontier_auc",
    "shifted_pools",
    "reference_rows",
    "evaluate_router",
    "evaluate_choices",
    "lambda_for_share",
    "format_report",
    "plot_frontier",
]

#: Default λ sweep (cost is normalised so the most expensive training model costs 1).
DEFAULT_LAMBDAS: tuple[float, ...] = (0.0,) + tuple(float(x) for x in np.geomspace(0.002, 20.0, 31))
POOL_SHIFTS = ("none", "strongest", "cheapest", "random30")


def frontier_auc(cost_norm: Sequence[float], quality: Sequence[float]) -> float:
    """Area under the monotone cost–quality frontier on [0, 1] (see module docstring)."""
    x = np.clip(np.asarray(cost_norm, dtype=float), 0.0, 1.0)
    y = np.asarray(quality, dtype=float)
    if x.size == 0:
        return math.nan
    order = np.lexsort((-y, x))
    x, y = x[order], np.maximum.accumulate(y[order])
    x = np.r_[0.0, x, 1.0]
    y = np.r_[y[0], y, y[-1]]
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def shifted_pools(router: LatentRouter, shift: str, seed: int = 0) -> dict[str, list[str]]:
    """Available pools for ``shift``: none, strongest, cheapest, random30 or all (every one).

    strongest = highest training accuracy removed; cheapest = lowest mean training cost
    removed; random30 = a random 30% (at least one) removed. One model always remains.
    """
    names = list(router.pool.names)
    if shift == "all":
        out: dict[str, list[str]] = {}
        for s in POOL_SHIFTS:
            out.update(shifted_pools(router, s, seed))
        return out
    if shift == "none":
        return {"none": names}
    if len(names) < 2:
        raise DataError(f"Pool shift {shift!r} needs at least two models; the pool is {names}.")
    acc = [p[0] for p in router.pool.profiles]
    if shift == "strongest":
        drop = {names[int(np.argmax(acc))]}
    elif shift == "cheapest":
        drop = {names[int(np.argmin(router.pool.mean_cost))]}
    elif shift == "random30":
        k = min(len(names) - 1, max(1, round(0.3 * len(names))))
        drop = set(random.Random(seed).sample(names, k))
    else:
        raise DataError(f"Unknown pool shift {shift!r}; supported: {', '.join(POOL_SHIFTS + ('all',))}.")
    return {shift: [n for n in names if n not in drop]}


def evaluate_choices(idx: torch.Tensor, quality: torch.Tensor, cost: torch.Tensor) -> tuple[float, float]:
    """(mean quality, mean cost) of choosing column ``idx[i]`` for row ``i``."""
    rows = torch.arange(quality.shape[0])
    return float(quality[rows, idx].mean()), float(cost[rows, idx].mean())


def reference_rows(names: Sequence[str], quality: torch.Tensor, cost: torch.Tensor) -> dict[str, Any]:
    """Single models, the best single model and the oracle (best quality, then cheapest)."""
    singles = [
        {"name": n, "quality": float(quality[:, j].mean()), "cost": float(cost[:, j].mean())}
        for j, n in enumerate(names)
    ]
    best = max(singles, key=lambda r: (r["quality"], -r["cost"]))
    key = quality - 1e-9 * cost / (float(cost.max()) + 1e-12)
    oq, oc = evaluate_choices(key.argmax(dim=1), quality, cost)
    return {"single_models": singles, "best_single": best, "oracle": {"name": "oracle", "quality": oq, "cost": oc}}


def _normaliser(singles: list[dict[str, Any]]) -> tuple[float, float]:
    costs = [r["cost"] for r in singles]
    return min(costs), max(costs)


def _norm(c: float, lo: float, hi: float) -> float:
    return float(min(1.0, max(0.0, (c - lo) / (hi - lo)))) if hi > lo else 0.0


def evaluate_router(
    router: LatentRouter,
    requests: Sequence[LabelledRequest],
    lambdas: Sequence[float] | None = None,
    available: Sequence[str] | None = None,
    small: str | None = None,
    large: str | None = None,
    features: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The λ sweep, AUC, reference rows and (two models) APGR/CPT on ``requests``."""
    lambdas = list(DEFAULT_LAMBDAS if lambdas is None else lambdas)
    names = list(available) if available is not None else list(router.pool.names)
    mask = router.pool.mask(names)
    if features is None:
        features = router.encode([r.messages for r in requests])
    out = router.predict_features(features, mask)
    idx_pool = [router.pool.index(n) for n in names]
    quality, cost = outcome_matrix(requests, names)
    refs = reference_rows(names, quality, cost)
    lo, hi = _normaliser(refs["single_models"])
    for row in refs["single_models"] + [refs["best_single"], refs["oracle"]]:
        row["cost_normalised"] = _norm(row["cost"], lo, hi)
    sweep = []
    mu = out.mu_tilde[:, idx_pool]
    cost_pool = router.cost_tensor().cpu()[idx_pool]
    for lam in lambdas:
        idx = choose(mu, cost_pool, lam)
        q, c = evaluate_choices(idx, quality, cost)
        shares = torch.bincount(idx, minlength=len(names)).float() / len(requests)
        sweep.append({
            "lambda": float(lam), "quality": q, "cost": c, "cost_normalised": _norm(c, lo, hi),
            "utility": q - lam * c / router.pool.cost_scale,
            "share": {n: float(s) for n, s in zip(names, shares)},
        })
    report: dict[str, Any] = {
        "pool": names,
        "n": len(requests),
        "lambdas": sweep,
        "auc": frontier_auc([r["cost_normalised"] for r in sweep], [r["quality"] for r in sweep]),
        **refs,
    }
    report["oracle"]["auc"] = refs["oracle"]["quality"]
    if len(names) == 2:
        report["two_model"] = _two_model(names, quality, cost, mu, small, large)
    return report


def lambda_for_share(
    mu_tilde: torch.Tensor, cost_normalised: torch.Tensor, large: int, share: float
) -> tuple[float, float]:
    """``(λ, achieved share)``: the cost weight at which ``share`` of the rows choose model
    ``large`` (by :func:`choose`), for ``switchyard calibrate`` on a LatentRouter.

    For row *i* the large model wins while λ < λ*ᵢ = minⱼ (μ̃_large − μ̃ⱼ) / (c_large − cⱼ)
    over the cheaper models j, so the share is a step function of λ, falling as λ grows
    (when ``large`` is the priciest model; a pricier one makes it only approximate). λ is
    the midpoint between the two λ*ᵢ around the wanted share (as a probe threshold is),
    never below 0; the achieved share is measured with :func:`choose`.
    """
    from routers.metrics import threshold_for_share

    mu = mu_tilde.double()
    cost = cost_normalised.double()
    cheaper = cost < cost[large]
    if not bool(cheaper.any()):
        lam = 0.0
    else:
        gap = (mu[:, large : large + 1] - mu[:, cheaper]) / (cost[large] - cost[cheaper])
        crossing = gap.min(dim=1).values.numpy()
        # the rows whose crossing is above λ choose large: 1 - share of them lie below it
        lam = max(0.0, threshold_for_share(crossing, 1.0 - share))
    achieved = float((choose(mu_tilde, cost_normalised, lam) == large).float().mean())
    return lam, achieved


def _two_model(names: list[str], quality: torch.Tensor, cost: torch.Tensor, mu: torch.Tensor,
               small: str | None, large: str | None) -> dict[str, Any]:
    if small is None or large is None or {small, large} != set(names):
        order = sorted(range(2), key=lambda j: float(cost[:, j].mean()))
        small, large = names[order[0]], names[order[1]]
    s, l = names.index(small), names.index(large)
    sq, lq = quality[:, s].numpy(), quality[:, l].numpy()
    score = (mu[:, s] - mu[:, l]).numpy()
    curve = routing_curve(sq, lq, score)
    sa, la = float(sq.mean()), float(lq.mean())
    return {
        "small": small, "large": large,
        "apgr": apgr(curve, sa, la), "cpt50": cpt(curve, sa, la, 0.5), "cpt80": cpt(curve, sa, la, 0.8),
    }


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def format_report(report: dict[str, Any], title: str = "") -> str:
    """A plain-text table of one evaluation report."""
    lines = [f"== {title} pool: {', '.join(report['pool'])} (n={report['n']})"]
    lines.append(f"{'lambda':>9} {'quality':>8} {'cost':>10} {'cost_norm':>9}  share")
    last = None
    for r in report["lambdas"]:
        share = ", ".join(f"{k}={v:.2f}" for k, v in r["share"].items() if v > 0)
        key = (round(r["quality"], 4), round(r["cost"], 8))
        if key == last:
            continue
        last = key
        lines.append(f"{r['lambda']:>9.4f} {r['quality']:>8.4f} {r['cost']:>10.4g} {r['cost_normalised']:>9.3f}  {share}")
    for r in report["single_models"]:
        lines.append(f"{'single':>9} {r['quality']:>8.4f} {r['cost']:>10.4g} {r['cost_normalised']:>9.3f}  {r['name']}")
    o = report["oracle"]
    lines.append(f"{'oracle':>9} {o['quality']:>8.4f} {o['cost']:>10.4g} {o['cost_normalised']:>9.3f}")
    b = report["best_single"]
    lines.append(f"AUC (quality over normalised cost) {report['auc']:.4f}; best single {b['name']} {b['quality']:.4f}; oracle {o['quality']:.4f}")
    if "two_model" in report:
        t = report["two_model"]
        lines.append(f"APGR {_fmt(t['apgr'])}  CPT(50%) {_fmt(t['cpt50'])}  CPT(80%) {_fmt(t['cpt80'])}  (small={t['small']}, large={t['large']})")
    return "\n".join(lines)


def plot_frontier(reports: dict[str, dict[str, Any]], path: str, title: str = "LatentRouter") -> None:
    """Cost–quality frontier PNG: one line per report, single models as points, oracle as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, report in reports.items():
        xs = [r["cost"] for r in report["lambdas"]]
        ys = [r["quality"] for r in report["lambdas"]]
        order = np.argsort(xs)
        ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], marker=".", label=f"{label} (AUC {report['auc']:.3f})")
    first = next(iter(reports.values()))
    for r in first["single_models"]:
        ax.scatter([r["cost"]], [r["quality"]], s=40)
        ax.annotate(r["name"], (r["cost"], r["quality"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    o = first["oracle"]
    ax.scatter([o["cost"]], [o["quality"]], marker="*", s=120, label="oracle")
    ax.set_xlabel("mean cost per request")
    ax.set_ylabel("mean quality")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
