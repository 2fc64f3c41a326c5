"""The micro-batcher: concurrent requests in, one padded forward on a worker thread, results out.

::

    event loop                                   worker thread (one per batcher)
    submit(item, deadline) ─► pending (bounded) ─┐
                   collector task: waits from the │
                   first arrival up to max_wait_ms│
                   or max_size (longer while the  │
                   worker is still busy), drops   │
                   entries past their deadline ───┴─► forward([items]) ─► results
    futures resolved ◄── loop.call_soon_threadsafe ◄───────────────────────┘

- One forward at a time; while it runs, the next batch keeps collecting (up to
  ``max_size``), so under load batches grow instead of queueing.
- ``forward`` returns one result per item, in order; an item's result may be an exception
  (e.g. that request's score was NaN), which fails only that item. A ``forward`` that
  raises, or returns the wrong number of results, fails every item of its batch.
- A ``forward`` that runs a batch as several passes may instead be a generator yielding
  ``(indices, results)`` as each pass finishes: those requests are answered at once, not
  when the whole batch is done. Items it raises before answering, or never answers, fail.
- An entry whose deadline passed before its forward starts is dropped: its future gets a
  :class:`ScorerError` and the forward never sees it.
- Backpressure: at most ``max_queue`` entries wait; one more fails at once with
  :class:`ScorerError` ("overloaded") instead of queueing past every deadline.
- The forward never runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from extproc import BatchConfig, ScorerError

__all__ = ["MicroBatcher", "BatchStats"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: What a forward returns: one result, or one exception, per item; or, as a generator,
#: ``(indices, results)`` parts as they finish.
Forward = Callable[[list[Any]], Sequence[Any] | Iterator[tuple[Sequence[int], Sequence[Any]]]]


@dataclass
class _Entry:
    item: Any
    deadline: float
    future: asyncio.Future


@dataclass
class BatchStats:
    """What a batcher has done so far (read by benchmarks and tests)."""

    batches: int = 0
    requests: int = 0
    expired: int = 0
    overloaded: int = 0
    sizes: collections.Counter = field(default_factory=collections.Counter)
    forward_seconds: float = 0.0  # total time the worker spent in forwards

    @property
    def mean_forward_ms(self) -> float:
        return 1000.0 * self.forward_seconds / self.batches if self.batches else 0.0

    @property
    def mean_size(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class MicroBatcher(Generic[T, R]):
    """Groups concurrent :meth:`submit` calls into batches for ``forward``.

    ``forward(items) -> results`` runs on this batcher's own worker thread. ``name`` starts
    its error messages (e.g. ``scorer 'utility'``). ``config`` gives ``max_size`` and
    ``max_wait_ms``; ``max_queue`` bounds the waiting entries (default
    ``max(64, 8 * max_size)``). ``clock`` is the deadline clock (``time.monotonic``, which
    :meth:`extproc.Scorer.score` deadlines use; tests may inject their own).
    """

    def __init__(
        self,
        forward: Forward,
        config: BatchConfig,
        *,
        name: str,
        max_queue: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(config.max_size, bool) or not isinstance(config.max_size, int) or config.max_size < 1:
            raise ValueError(f"`batch.max_size` must be a positive integer, got {config.max_size!r}.")
        if not (math.isfinite(config.max_wait_ms) and config.max_wait_ms >= 0):
            raise ValueError(f"`batch.max_wait_ms` must be a finite number >= 0, got {config.max_wait_ms!r}.")
        max_queue = max(64, 8 * config.max_size) if max_queue is None else max_queue
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"`max_queue` must be a positive integer, got {max_queue!r}.")
        self.name = name
        self.config = config
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._forward = forward
        self._clock = clock
        self._max_wait = config.max_wait_ms / 1000.0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"switchyard-batcher-{name}", daemon=True)
        self._thread.start()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: collections.deque[_Entry] = collections.deque()
        self._arrivals: collections.deque[float] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._busy = False
        self._collector: asyncio.Task | None = None

    @property
    def worker_thread(self) -> threading.Thread:
        return self._thread

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- event-loop side ----------------------------------------------------------------

    def submit(self, item: T, deadline: float) -> asyncio.Future:
        """Queue ``item``; the future resolves to its result, or raises :class:`ScorerError`
        (deadline passed before its forward, forward failed, batcher closed). Call on the
        event loop. Fails at once when ``max_queue`` entries already wait."""
        if self._closed:
            raise ScorerError(f"{self.name} is closed.")
        self._bind(asyncio.get_running_loop())
        if len(self._pending) >= self.max_queue:
            self.stats.overloaded += 1
            raise ScorerError(f"{self.name} is overloaded: {len(self._pending)} requests already wait.")
        future = self._loop.create_future()
        future.add_done_callback(_retrieve)
        self._pending.append(_Entry(item, deadline, future))
        self._arrivals.append(self._clock())
        self._wake.set()
        return future

    async def run(self, item: T, deadline: float) -> R:
        """:meth:`submit` and wait, at most until ``deadline``; a miss is a :class:`ScorerError`."""
        future = self.submit(item, deadline)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - self._clock()))
        except asyncio.TimeoutError:
            future.cancel()  # still waiting: dropped before its forward
            raise ScorerError(f"{self.name} missed its deadline.") from None

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed() and self._loop.is_running():
            raise ScorerError(f"{self.name} is already serving another event loop.")
        # first use, or the previous loop ended (e.g. one asyncio.run per CLI call)
        self._loop = loop
        self._pending.clear()
        self._arrivals.clear()
        self._busy = False
        self._wake = asyncio.Event()
        self._collector = loop.create_task(self._collect(), name=f"switchyard-batcher-{self.name}")
        self._collector.add_done_callback(self._collector_ended)

    def _collector_ended(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("scorer batcher stopped unexpectedly", extra={"scorer": self.name}, exc_info=exc)
            self._fail_pending(ScorerError(f"{self.name}: batcher stopped: {exc}"))

    def _prune(self) -> None:
        """Drop entries already answered (their caller gave up) or past their deadline."""
        now = self._clock()
        keep: collections.deque[_Entry] = collections.deque()
        arrivals: collections.deque[float] = collections.deque()
        for entry, arrived in zip(self._pending, self._arrivals):
            if entry.future.done():
                continue
            if entry.deadline <= now:
                self.stats.expired += 1
                entry.future.set_exception(
                    ScorerError(f"{self.name}: the request's deadline passed before its forward.")
                )
                continue
            keep.append(entry)
            arrivals.append(arrived)
        self._pending, self._arrivals = keep, arrivals

    async def _collect(self) -> None:
        wake = self._wake
        while True:
            self._prune()
            if not self._pending:
                wake.clear()
                await wake.wait()
                continue
            full = len(self._pending) >= self.config.max_size
            waited = self._clock() - self._arrivals[0]
            if not self._busy and (full or waited >= self._max_wait):
                self._dispatch()
                continue
            wake.clear()
            if self._busy:  # the worker's end (or a new arrival) wakes us
                await wake.wait()
            else:
                try:
                    await asyncio.wait_for(wake.wait(), self._max_wait - waited)
                except asyncio.TimeoutError:
                    pass

    def _dispatch(self) -> None:
        batch = [self._pending.popleft() for _ in range(min(self.config.max_size, len(self._pending)))]
        for _ in batch:
            self._arrivals.popleft()
        self._busy = True
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.sizes[len(batch)] += 1
        self._jobs.put((self._loop, batch))

    def _answer(self, entries: list[_Entry], results: Sequence[Any] | BaseException) -> None:
        for i, entry in enumerate(entries):
            if entry.future.done():
                continue
            result = results if isinstance(results, BaseException) else results[i]
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)

    def _finish(self, took: float) -> None:
        self._busy = False
        self.stats.forward_seconds += took
        if self._wake is not None:
            self._wake.set()

    def _fail_pending(self, error: ScorerError) -> None:
        for entry in self._pending:
            if not entry.future.done():
                entry.future.set_exception(error)
        self._pending.clear()
        self._arrivals.clear()

    async def close(self) -> None:
        """Fail waiting requests, stop the collector, and stop the worker after its forward."""
        if self._closed:
            return
        self._closed = True
        self._fail_pending(ScorerError(f"{self.name} is closed."))
        collector = self._collector
        if collector is not None and not collector.done() and self._loop is asyncio.get_running_loop():
            collector.cancel()
            await asyncio.wait([collector])  # never raises the collector's CancelledError
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join, 30.0)

    def close_now(self) -> None:
        """Stop without an event loop (e.g. at interpreter exit); waiting requests are failed."""
        if not self._closed:
            self._closed = True
            if self._loop is None or self._loop.is_closed():
                self._pending.clear()
            self._jobs.put(None)

    # ---- worker thread ------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, batch = job
            started = time.perf_counter()
            try:
                for indices, results in self._parts([entry.item for entry in batch]):
                    loop.call_soon_threadsafe(self._answer, [batch[i] for i in indices], results)
                loop.call_soon_threadsafe(self._finish, time.perf_counter() - started)
            except RuntimeError:  # the loop was closed while the forward ran
                pass

    def _parts(self, items: list[Any]) -> Iterator[tuple[list[int], Sequence[Any] | BaseException]]:
        """``(indices, results)`` as the forward answers them, each index exactly once;
        results are values or :class:`ScorerError`, or one ScorerError for all."""
        n = len(items)
        answered: set[int] = set()
        error: ScorerError | None = None
        try:
            out = self._forward(items)
            if isinstance(out, Iterator):
                for indices, results in out:
                    indices, results = list(indices), list(results)
                    if len(indices) != len(results) or not answered.isdisjoint(indices) or not set(indices) <= set(range(n)):
                        raise ValueError(f"a part answered {indices!r} with {len(results)} results")
                    answered.update(indices)
                    yield indices, [self._wrapped(r) for r in results]
            else:
                results = list(out)
                if len(results) != n:
                    error = ScorerError(f"{self.name}: returned {len(results)} results for {n} requests.")
                else:
                    answered.update(range(n))
                    yield list(range(n)), [self._wrapped(r) for r in results]
        except ScorerError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a model library's error, wrapped for the policy
            log.warning("scorer forward failed", extra={"scorer": self.name, "error": f"{type(exc).__name__}: {exc}"})
            error = ScorerError(f"{self.name}: forward failed: {type(exc).__name__}: {exc}")
        missing = [i for i in range(n) if i not in answered]
        if missing:
            yield missing, error or ScorerError(f"{self.name}: the forward gave no result for this request.")

    def _wrapped(self, result: Any) -> Any:
        if isinstance(result, BaseException) and not isinstance(result, ScorerError):
            return ScorerError(f"{self.name}: failed on a request: {type(result).__name__}: {result}")
        return result


def _retrieve(future: asyncio.Future) -> None:
    """Mark a failed future's exception as seen (its caller may have stopped waiting)."""
    if not future.cancelled():
        future.exception()
