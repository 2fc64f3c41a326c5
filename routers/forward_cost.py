"""How long one backbone forward takes, measured at load, and the cheapest way to cut a batch.

A forward of a backbone on ``rows`` prompts right-padded to ``width`` tokens costs about::

    seconds = fixed + per_token * rows * width

``fixed`` is what every forward pays whatever its size (reading every weight from memory on
a CPU, launching every kernel on a GPU: milliseconds); ``per_token`` is the work per padded
token. Both are measured once per loaded backbone, on the device and threads it runs on
(:func:`measure_backbone`, read through ``TruncatedBackbone.forward_cost``); timing the
forward shapes also warms them.

:func:`plan_chunks` then cuts a batch, sorted by length, into the forwards with the least
predicted time: short prompts beside a long one share its forward when the fixed cost
outweighs their padding, and run apart when it does not. The exact best cut of a sorted
batch is found by dynamic programming over where chunks start (O(n²) for n requests).
Serving (:mod:`routers.serving.prefill`) and offline scoring (:class:`routers.ProbeScorer`)
both cut batches this way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ForwardCost", "UNMEASURED_COST", "measure", "measure_backbone", "plan_chunks"]

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
    lengths: Sequence[int],
    cost: ForwardCost,
    *,
    pad_multiple: int = 1,
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Indices of ``lengths`` (prompt lengths in tokens) grouped into forwards with the least
    total predicted time: each chunk holds prompts adjacent in length order (shortest first)
    and is padded to its longest, rounded up to ``pad_multiple``; at most ``max_rows`` each,
    and at most ``max_tokens`` padded tokens unless it is one prompt alone."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    widths = [_padded(lengths[i], pad_multiple) for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: least time for the j shortest prompts
    start = [0] * (n + 1)  # where the last chunk of that best plan starts
    for j in range(1, n + 1):
        width = widths[j - 1]  # the longest of any chunk ending at j
        lowest = 1 if max_rows is None else max(1, j - max_rows + 1)
        for i in range(lowest, j + 1):
            rows = j - i + 1
            if max_tokens is not None and rows > 1 and rows * width > max_tokens:
                continue
            total = best[i - 1] + cost.seconds(rows, width)
            if total < best[j]:
                best[j], start[j] = total, i - 1
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[start[j]:j])
        j = start[j]
    return chunks[::-1]


#: The cost assumed when measuring fails: one forward per batch.
UNMEASURED_COST = ForwardCost(fixed=1.0, per_token=0.0)


def measure_backbone(backbone: Any) -> ForwardCost:
    """:func:`measure` a :class:`routers.backbone.TruncatedBackbone` on a repeated one-token
    word, up to the layer it keeps; :data:`UNMEASURED_COST` (logged) if it cannot run."""
    import torch

    layer = int(backbone.config.layer)
    try:
        words = " ".join(["hello"] * 2 * max(MEASURED_WIDTHS))  # cut to max_tokens by encode
        encoded = backbone.encode([[{"role": "user", "content": words}]])

        def forward(rows: int, width: int) -> None:
            part = {key: value[:, :width].expand(rows, -1).contiguous() for key, value in encoded.items()}
            with torch.inference_mode():
                backbone.states(part, [layer], last_only=[layer])
            if backbone.device.type == "cuda":
                torch.cuda.synchronize(backbone.device)

        cost = measure(forward, max_width=int(encoded["input_ids"].shape[1]), pad_multiple=backbone.pad_multiple)
    except Exception as exc:  # noqa: BLE001 - a model library's error; planning falls back
        log.warning("backbone forward cost not measured; one forward per batch",
                    extra={"backbone": backbone.source, "error": f"{type(exc).__name__}: {exc}"})
        return UNMEASURED_COST
    log.info("backbone forward cost measured", extra={
        "backbone": backbone.source, "device": str(backbone.device),
        "fixed_ms": round(cost.fixed * 1e3, 3), "per_token_us": round(cost.per_token * 1e6, 3)})
    return cost


def _padded(length: int, multiple: int) -> int:
    return max(1, -(-length // multiple) * multiple)
