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

A cost measured at load can be wrong for the life of the process: measured while the
machine was busy, it read 25 ms fixed against 2.8 ms quiet. Serving therefore keeps the
cost it plans and admits by in a :class:`LiveCost`, which refits it from the forwards that
really run, so a bad load-time measurement corrects itself after a few forwards.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ForwardCost", "LiveCost", "UNMEASURED_COST", "measure", "measure_backbone", "measure_model", "plan_chunks"]

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


#: Forwards a :class:`LiveCost` refits from (the most recent), and how many it must have
#: seen before they replace the cost it was seeded with.
RECENT_FORWARDS = 64
TRUSTED_AFTER = 8
#: Padded tokens a prompt is assumed to take before any forward has been seen.
ASSUMED_WIDTH = 64
#: Weight of each new forward in :attr:`LiveCost.width`, the running mean padded width.
WIDTH_SMOOTHING = 0.1


class LiveCost:
    """A :class:`ForwardCost` kept up to date from the forwards that really run.

    Starts as ``seed`` (the cost measured at load). Each forward that runs reports its
    shape and time to :meth:`observe` (from any one thread at a time); once
    :data:`TRUSTED_AFTER` have, :attr:`current` is fitted from the last
    :data:`RECENT_FORWARDS` alone. As in :func:`measure` the fastest counts (a busy
    neighbour only ever adds time; a load that lasts slows every recent forward and so
    still shows): the recent forwards are grouped by padded tokens (powers of two), the
    fastest of each group is kept, and :meth:`ForwardCost.fit` runs over those. When they
    span less than a doubling of tokens the per-token term cannot be told from them: it
    stays the seed's, and the fixed term is set so the fastest forward is predicted exactly.

    :attr:`width` is the running mean padded width of a prompt (tokens), for predicting a
    batch's forward before its prompts are tokenized (:meth:`batch_seconds`, which admission
    uses only once forwards have confirmed the cost: a measurement taken on a busy machine,
    or :data:`UNMEASURED_COST`, never refuses a request).
    """

    def __init__(self, seed: ForwardCost, *, width: float = ASSUMED_WIDTH) -> None:
        self.seed = seed
        self.current = seed  # replaced whole, never mutated: safe to read from any thread
        self.width = float(width)
        self.observed = 0
        self._recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=RECENT_FORWARDS)

    def observe(self, rows: int, width: int, seconds: float) -> None:
        """One forward of ``rows`` prompts padded to ``width`` tokens took ``seconds``."""
        if rows < 1 or width < 1 or not (math.isfinite(seconds) and seconds >= 0.0):
            return
        self.observed += 1
        self._recent.append((rows * width, seconds))
        self.width += WIDTH_SMOOTHING * (width - self.width)
        if self.observed >= TRUSTED_AFTER:
            self.current = self._refit()

    @property
    def confirmed(self) -> bool:
        """Whether :attr:`current` comes from forwards observed, not from the seed alone."""
        return self.observed >= TRUSTED_AFTER

    def batch_seconds(self, rows: int) -> float:
        """Predicted seconds of one forward of ``rows`` prompts of the running mean width;
        0 until the cost is :attr:`confirmed`."""
        if rows < 1 or not self.confirmed:
            return 0.0
        return self.current.seconds(rows, max(1, round(self.width)))

    def _refit(self) -> ForwardCost:
        fastest: dict[int, tuple[int, float]] = {}
        for tokens, seconds in self._recent:
            group = tokens.bit_length()
            if group not in fastest or seconds < fastest[group][1]:
                fastest[group] = (tokens, seconds)
        samples = sorted(fastest.values())
        if samples[-1][0] >= 2 * samples[0][0]:
            return ForwardCost.fit([(1, tokens, seconds) for tokens, seconds in samples])
        tokens, seconds = min(samples, key=lambda sample: sample[1])
        per_token = self.seed.per_token if self.seed.per_token * tokens <= seconds else seconds / tokens
        return ForwardCost(fixed=seconds - per_token * tokens, per_token=per_token)


#: The cost assumed when measuring fails: one forward per batch.
UNMEASURED_COST = ForwardCost(fixed=1.0, per_token=0.0)


def measure_model(
    encode: Callable[[list[list[dict[str, str]]]], Any], run: Callable[[Any], Any], *, what: str, field: str,
    source: str, device: Any, pad_multiple: int = 1,
) -> ForwardCost:
    """:func:`measure` ``run`` (one forward of an encoded batch, waiting for the device) on
    batches cut from ``encode`` of a repeated one-token word (cut to the model's token limit
    by ``encode``), logged as ``<what> forward cost measured`` with ``<field>: source``;
    :data:`UNMEASURED_COST` (logged) if it cannot run."""
    try:
        words = " ".join(["hello"] * 2 * max(MEASURED_WIDTHS))
        encoded = encode([[{"role": "user", "content": words}]])

        def forward(rows: int, width: int) -> None:
            run({key: value[:, :width].expand(rows, -1).contiguous() for key, value in encoded.items()})

        cost = measure(forward, max_width=int(encoded["input_ids"].shape[1]), pad_multiple=pad_multiple)
    except Exception as exc:  # noqa: BLE001 - a model library's error; planning falls back
        log.warning(f"{what} forward cost not measured; one forward per batch",
                    extra={field: source, "error": f"{type(exc).__name__}: {exc}"})
        return UNMEASURED_COST
    log.info(f"{what} forward cost measured", extra={
        field: source, "device": str(device),
        "fixed_ms": round(cost.fixed * 1e3, 3), "per_token_us": round(cost.per_token * 1e6, 3)})
    return cost


def measure_backbone(backbone: Any) -> ForwardCost:
    """:func:`measure_model` of a :class:`routers.backbone.TruncatedBackbone` up to the layer it keeps."""
    import torch

    layer = int(backbone.config.layer)

    def run(part: Any) -> None:
        with torch.inference_mode():
            backbone.states(part, [layer], last_only=[layer])
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)

    return measure_model(backbone.encode, run, what="backbone", field="backbone", source=backbone.source,
                         device=backbone.device, pad_multiple=backbone.pad_multiple)


def _padded(length: int, multiple: int) -> int:
    return max(1, -(-length // multiple) * multiple)
