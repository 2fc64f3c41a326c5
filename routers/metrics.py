"""Routing metrics for a small/large model pair. Pure numpy; nothing here imports torch.

A probe predicts ``p = P(small model answers correctly)``. Routing the share ``s`` of
requests with the *lowest* ``p`` (the hardest) to the large model gives a system quality;
sweeping ``s`` from 0 to 1 traces the routing curve. Definitions follow RouteLLM
(Ong et al., 2024):

- PGR(s)  = (quality(s) - quality_small) / (quality_large - quality_small), the
  "performance gap recovered" when the share ``s`` of calls goes to the large model.
- APGR    = the area under PGR(s) for s in [0, 1] (trapezoid rule over the curve's steps).
- CPT(x)  = the smallest share of calls to the large model whose PGR reaches ``x``
  ("call-performance threshold"), e.g. CPT(50%), CPT(80%), interpolated between steps.

Bad input (NaN, mismatched lengths) raises :class:`routers.data.DataError`.

``quality`` is the mean outcome: 0/1 correctness or a graded score. Ties in ``p`` are
broken by input order (a stable sort), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from routers.data import DataError

__all__ = [
    "roc_auc",
    "curve_shares",
    "routing_curve",
    "apgr",
    "cpt",
    "threshold_for_share",
]

ArrayLike = Sequence[float] | np.ndarray


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise DataError(f"`{name}` is empty.")
    if not np.all(np.isfinite(array)):
        raise DataError(f"`{name}` contains NaN or infinite values.")
    return array


def _same_length(first: np.ndarray, first_name: str, other: np.ndarray, other_name: str) -> None:
    if first.size != other.size:
        raise DataError(
            f"`{first_name}` has {first.size} values but `{other_name}` has {other.size}."
        )


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U; tied scores count one half).

    ``labels`` are 0/1. NaN when only one class is present (AUC is undefined).
    """
    y = _vector(labels, "labels")
    s = _vector(scores, "scores")
    _same_length(y, "labels", s, "scores")
    if not np.all((y == 0) | (y == 1)):
        raise DataError("`labels` must be 0 or 1.")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    i = 0
    while i < s.size:  # average ranks over runs of tied scores
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def curve_shares(steps: int = 101) -> np.ndarray:
    """The shares routed to the large model at which :func:`routing_curve` is evaluated."""
    if steps < 2:
        raise DataError(f"`steps` must be >= 2, got {steps}.")
    return np.linspace(0.0, 1.0, steps)


def routing_curve(
    small_correct: ArrayLike,
    large_correct: ArrayLike,
    p_small_correct: ArrayLike,
    steps: int = 101,
) -> np.ndarray:
    """System quality when the hardest share goes to the large model, at ``curve_shares(steps)``.

    At share ``s`` the ``round(s * n)`` requests with the lowest ``p_small_correct`` are sent
    to the large model (k = 0..100 % by default).
    """
    small = _vector(small_correct, "small_correct")
    large = _vector(large_correct, "large_correct")
    p = _vector(p_small_correct, "p_small_correct")
    _same_length(small, "small_correct", large, "large_correct")
    _same_length(small, "small_correct", p, "p_small_correct")
    shares = curve_shares(steps)
    order = np.argsort(p, kind="mergesort")
    gain = (large - small)[order]
    by_count = (small.sum() + np.concatenate([[0.0], np.cumsum(gain)])) / small.size
    counts = np.rint(shares * small.size).astype(int)
    return by_count[counts]


def _curve_and_shares(curve: ArrayLike, shares: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    q = _vector(curve, "curve")
    x = curve_shares(q.size) if shares is None else _vector(shares, "shares")
    _same_length(q, "curve", x, "shares")
    if q.size < 2 or np.any(np.diff(x) <= 0):
        raise DataError("`shares` must hold at least two strictly increasing values.")
    return q, x


def apgr(
    curve: ArrayLike, small_quality: float, large_quality: float, shares: ArrayLike | None = None
) -> float:
    """Average performance gap recovered: the trapezoid area under PGR(share).

    PGR = (quality - small_quality) / (large_quality - small_quality). NaN when the two
    models are equally good (the gap is zero).
    """
    q, x = _curve_and_shares(curve, shares)
    gap = large_quality - small_quality
    if gap == 0:
        return float("nan")
    pgr = (q - small_quality) / gap
    return float(np.sum((pgr[1:] + pgr[:-1]) / 2.0 * np.diff(x)))


def cpt(
    curve: ArrayLike,
    small_quality: float,
    large_quality: float,
    target: float,
    shares: ArrayLike | None = None,
) -> float:
    """Call-performance threshold: the smallest share of large-model calls with PGR >= target.

    The crossing is interpolated linearly between curve points. 0 when the large model is
    no better than the small one; NaN when the curve never reaches the target.
    ``target`` is a fraction (0.5 for CPT(50%)).
    """
    if not 0.0 <= target <= 1.0:
        raise DataError(f"`target` must be in [0, 1], got {target!r}.")
    q, x = _curve_and_shares(curve, shares)
    gap = large_quality - small_quality
    if gap <= 0:
        return 0.0
    goal = small_quality + target * gap
    if q[0] >= goal:
        return float(x[0])
    for i in range(1, q.size):
        if q[i] >= goal:
            return float(x[i - 1] + (goal - q[i - 1]) / (q[i] - q[i - 1]) * (x[i] - x[i - 1]))
    return float("nan")


def threshold_for_share(p_small_correct: ArrayLike, large_share: float) -> float:
    """A threshold ``t`` such that routing ``p < t`` to large sends ``large_share`` of ``p``.

    The midpoint between the k-th and (k+1)-th lowest scores, k = round(share * n); 0 sends
    nothing (below the minimum), 1 sends everything (above the maximum).
    """
    if not 0.0 <= large_share <= 1.0:
        raise DataError(f"`large_share` must be in [0, 1], got {large_share!r}.")
    p = np.sort(_vector(p_small_correct, "p_small_correct"))
    k = int(round(large_share * p.size))
    if k == 0:
        return float(np.nextafter(p[0], -np.inf))
    if k == p.size:
        return float(np.nextafter(p[-1], np.inf))
    return float((p[k - 1] + p[k]) / 2.0)
