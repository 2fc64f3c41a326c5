"""How long one backbone forward takes, measured at load, and the cheapest way to cut a batch.

A forward of ``rows`` prompts right-padded to ``width`` tokens costs about::

    seconds = fixed + per_token * rows * width

``fixed`` is what every forward pays whatever its size (reading every weight from memory on
a CPU, launching every kernel on a GPU: milliseconds); ``per_token`` is the work per padded
token. Both are measured when a backbone's prefill group is created (:func:`measure`), on
the device and threads it will serve on; timing the forward shapes also warms them.

:func:`plan_chunks` then cuts a batch, sorted by length, into the forwards with the least
predicted time: many short prompts beside a long one share its forward when the fixed cost
outweighs their padding, and run apart when it does not. The exact best cut of a sorted
batch is found by dynamic programming over where chunks start (O(n²) for n requests).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ForwardCost", "measure", "plan_chunks"]

log = logging.getLogger(__name__)

#: Shapes timed by :func:`measure`: prompts per forward, and padded widths in tokens (kept
#: within the backbone's ``max_tokens`` and rounded up to its padding multiple).
MEASURED_ROWS = (1, 4)
MEASURED_WIDTHS = (16, 64, 128)
#: Timed runs of each shape after its warm-up run.
TIMINGS = 3


@dataclass(frozen=True)
class ForwardCost:
    """Predicted seconds of one forward: ``fixed + per_token * rows * width``."""

    fixed: float
    per_token: float

    def seconds(self, rows: int, width: int) -> float:
        return self.fixed + self.per_token * rows * width

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> ForwardCost:
        """Least squares over ``(rows, width, seconds)`` samples, both terms kept >= 0."""
        tokens = [float(rows * width) for rows, width, _ in samples]
        seconds = [s for *_, s in samples]
        n = len(samples)
        mean_t, mean_s = sum(tokens) / n, sum(seconds) / n
        spread = sum((t - mean_t) ** 2 for t in tokens)
        slope = sum((t - mean_t) * (s - mean_s) for t, s in zip(tokens, seconds)) / spread if spread else 0.0
        slope = max(0.0, slope)
        fixed = mean_s - slope * mean_t
        if fixed < 0.0:  # all cost is per token: refit through the origin
            fixed, slope = 0.0, sum(t * s for t, s in zip(tokens, seconds)) / sum(t * t for t in tokens)
        return cls(fixed=fixed, per_token=slope)


def measure(
    forward: Callable[[int, int], Any],
    *,
    max_width: int,
    pad_multiple: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> ForwardCost:
    """Time ``forward(rows, width)`` (which must block until the forward is done) over
    :data:`MEASURED_ROWS` x :data:`MEASURED_WIDTHS`, each shape once to warm it and then
    :data:`TIMINGS` times (the fastest counts: a busy neighbour only ever adds time), and
    fit :class:`ForwardCost`."""
    widths = sorted({_padded(min(w, max_width), pad_multiple) for w in MEASURED_WIDTHS})
    samples = []
    for rows in MEASURED_ROWS:
        for width in widths:
            forward(rows, width)  # warm: first use of a shape picks kernels, allocates
            fastest = math.inf
            for _ in range(TIMINGS):
                started = clock()
                forward(rows, width)
                fastest = min(fastest, clock() - started)
            samples.append((rows, width, fastest))
    return ForwardCost.fit(samples)


def plan_chunks(
    lengths: Sequence[int], cost: ForwardCost, *, pad_multiple: int = 1, max_rows: int | None = None
) -> list[list[int]]:
    """Indices of ``lengths`` (prompt lengths in tokens) grouped into forwards with the least
    total predicted time: each chunk holds prompts adjacent in length order (shortest first)
    and is padded to its longest, rounded up to ``pad_multiple``; at most ``max_rows`` each."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    widths = [_padded(lengths[i], pad_multiple) for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: least time for the j shortest prompts
    start = [0] * (n + 1)  # where the last chunk of that best plan starts
    for j in range(1, n + 1):
        width = widths[j - 1]  # the longest of any chunk ending at j
        lowest = 1 if max_rows is None else max(1, j - max_rows + 1)
        for i in range(lowest, j + 1):
            total = best[i - 1] + cost.seconds(j - i + 1, width)
            if total < best[j]:
                best[j], start[j] = total, i - 1
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[start[j]:j])
        j = start[j]
    return chunks[::-1]


def _padded(length: int, multiple: int) -> int:
    return max(1, -(-length // multiple) * multiple)
