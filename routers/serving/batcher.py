"""The micro-batcher: concurrent requests in, one padded forward on a worker thread, results out.

::

    event loop                                   worker thread (one per batcher)
    submit(item, deadline)
      admission: predicted wait > time left? ─► ScorerOverloaded at once
      └─► pending (bounded) ─┐
           collector task: worker idle and a   │
           request waiting? dispatch at once   │
           (up to max_size), dropping entries  │
           past their deadline ────────────────┴─► drop entries now past their deadline
                                                   forward([items]) ─► results
    futures resolved ◄── loop.call_soon_threadsafe ◄───────────────────────┘

- One forward at a time. A request that finds the worker idle goes to it at once: nothing
  is held back waiting for company. While a forward runs, the requests that arrive wait
  for it and form the next batch (up to ``max_size``), so batches grow with load and stay
  at one request when there is none. ``max_wait_ms`` is accepted but no longer holds a
  request (holding one while the worker is idle only added latency: 4–6 ms of p50 below
  saturation, with no capacity gained, since a busy worker is what forms batches).
- ``forward`` returns one result per item, in order; an item's result may be an exception
  (e.g. that request's score was NaN), which fails only that item. A ``forward`` that
  raises, or returns the wrong number of results, fails every item of its batch.
- A ``forward`` that runs a batch as several passes may instead be a generator yielding
  ``(indices, results)`` as each pass finishes: those requests are answered at once, not
  when the whole batch is done. Items it raises before answering, or never answers, fail.
- A request past its deadline never reaches a forward: when a batch is formed, and again
  on the worker just before its forward starts, such entries get a :class:`ScorerError`
  and are left out (as is an entry whose caller has gone).
- Admission: :meth:`submit` predicts the request's wait — the rest of the forward running
  now, the batches queued ahead of it and its own — at the forward cost ``cost(n)`` (the
  predicted seconds of one forward of ``n`` requests: passed in by the scorer, or by
  default fitted from this batcher's own forwards as they run, see
  :class:`routers.forward_cost.LiveCost`) and fails at once with
  :class:`~extproc.ScorerOverloaded` when that is past the request's deadline. Until
  forwards have confirmed a cost (``cost`` answers 0) every request is admitted.
- Backpressure: at most ``max_queue`` entries wait; one more fails at once with
  :class:`~extproc.ScorerOverloaded` instead of queueing past every deadline.
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

from extproc import BatchConfig, ScorerDeadline, ScorerError, ScorerOverloaded, scorer_message
from routers.forward_cost import ForwardCost, LiveCost

__all__ = ["MicroBatcher", "BatchStats", "scorer_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a forward must end before its earliest deadline to count as in time: the answer
#: still has to reach the event loop and the request be decided (about 1 ms at p50 on a busy
#: 2-core sidecar; twice that for jitter).
ANSWER_SLACK_S = 0.002
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
    expired: int = 0  # dropped before their forward: past their deadline
    overloaded: int = 0  # refused at submit: queue full, or the predicted wait past the deadline
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
    ``max_wait_ms`` (validated; it no longer holds requests, see the module's notes);
    ``max_queue`` bounds the waiting entries (default ``max(64, 8 * max_size)``). ``cost(n)``
    predicts the seconds of one forward of ``n`` requests, for admission (default: fitted
    from this batcher's own forwards). ``clock`` is the deadline clock (``time.monotonic``,
    which :meth:`extproc.Scorer.score` deadlines use; tests may inject their own).
    """

    def __init__(
        self,
        forward: Forward,
        config: BatchConfig,
        *,
        name: str,
        max_queue: int | None = None,
        cost: Callable[[int], float] | None = None,
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
        # its own forwards, as (requests, 1 "token" each, seconds): a fixed + per-request fit
        self.own_cost = LiveCost(ForwardCost(fixed=0.0, per_token=0.0), width=1)
        self._cost = cost if cost is not None else self.own_cost.batch_seconds
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"switchyard-batcher-{name}", daemon=True)
        self._thread.start()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: collections.deque[_Entry] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._busy = False
        self._running = 0  # requests in the forward now running
        self._started = 0.0  # when it was handed to the worker (deadline clock)
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
        event loop. Fails at once with :class:`~extproc.ScorerOverloaded` when ``max_queue``
        entries already wait, or when the predicted wait is past ``deadline``."""
        if self._closed:
            raise ScorerError(f"{self.name} is closed.")
        self._bind(asyncio.get_running_loop())
        self._prune()
        if len(self._pending) >= self.max_queue:
            self.stats.overloaded += 1
            raise ScorerOverloaded(f"{self.name} is overloaded: {len(self._pending)} requests already wait.")
        left = deadline - self._clock()
        if left <= 0:
            self.stats.expired += 1
            raise ScorerDeadline(f"{self.name}: the request's deadline passed before its forward.")
        wait = self.predicted_wait()
        if wait > left:
            self.stats.overloaded += 1
            ahead = len(self._pending)
            raise ScorerOverloaded(
                f"{self.name} is overloaded: the predicted wait of {wait * 1e3:.1f} ms ({ahead} "
                f"request{'' if ahead == 1 else 's'} queued ahead) is longer than the {left * 1e3:.1f} ms "
                "left before the request's deadline.")
        future = self._loop.create_future()
        future.add_done_callback(_retrieve)
        self._pending.append(_Entry(item, deadline, future))
        self._wake.set()
        return future

    def predicted_wait(self) -> float:
        """Seconds until a request submitted now would be answered: the rest of the forward
        running now, the batches queued ahead of it, and its own (at ``cost``)."""
        size = self.config.max_size
        full, rest = divmod(len(self._pending) + 1, size)
        wait = full * self._cost(size) + (self._cost(rest) if rest else 0.0)
        if self._busy:
            wait += max(0.0, self._cost(self._running) - (self._clock() - self._started))
        return wait

    async def run(self, item: T, deadline: float) -> R:
        """:meth:`submit` and wait, at most until ``deadline``; a miss is a :class:`ScorerError`."""
        future = self.submit(item, deadline)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - self._clock()))
        except asyncio.TimeoutError:
            future.cancel()  # still waiting: dropped before its forward
            raise ScorerDeadline(f"{self.name} missed its deadline.") from None

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed() and self._loop.is_running():
            raise ScorerError(f"{self.name} is already serving another event loop.")
        # first use, or the previous loop ended (e.g. one asyncio.run per CLI call)
        self._loop = loop
        self._pending.clear()
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
        if all(not entry.future.done() and entry.deadline > now for entry in self._pending):
            return
        self._expire([entry for entry in self._pending if not entry.future.done() and entry.deadline <= now])
        self._pending = collections.deque(entry for entry in self._pending if not entry.future.done())

    def _expire(self, entries: list[_Entry]) -> None:
        """Fail ``entries`` (not yet answered) as past their deadline before their forward."""
        for entry in entries:
            if not entry.future.done():
                self.stats.expired += 1
                entry.future.set_exception(
                    ScorerDeadline(f"{self.name}: the request's deadline passed before its forward."))

    async def _collect(self) -> None:
        wake = self._wake
        while True:
            self._prune()
            if self._pending and not self._busy:  # an idle worker takes what waits, at once
                self._dispatch()
                continue
            wake.clear()
            await wake.wait()  # a new arrival, or the worker's end

    def _dispatch(self) -> None:
        batch = self._batch_in_time()
        if not batch:
            return
        self._busy = True
        self._running = len(batch)
        self._started = self._clock()
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.sizes[len(batch)] += 1
        self._jobs.put((self._loop, batch))

    def _batch_in_time(self) -> list[_Entry]:
        """The next batch: the waiting entries, earliest deadline first, as many as one
        forward can answer before the earliest of their deadlines (at ``cost``). An entry
        that no forward would answer in time (neither this one nor the next, on its own) is
        refused at once (:class:`~extproc.ScorerOverloaded`: its request takes the fallback
        now, not at its deadline); the others left out wait for the next forward. Until a cost is confirmed
        (``cost`` answers 0), the first ``max_size`` entries go, in arrival order."""
        if self._cost(1) <= 0:  # no confirmed cost yet: nothing to predict by
            return [self._pending.popleft() for _ in range(min(self.config.max_size, len(self._pending)))]
        waiting = sorted(self._pending, key=lambda entry: entry.deadline)
        self._pending.clear()
        batch: list[_Entry] = []
        now = self._clock() + ANSWER_SLACK_S
        for entry in waiting:
            if len(batch) < self.config.max_size and now + self._cost(len(batch) + 1) <= (
                    batch[0].deadline if batch else entry.deadline):
                batch.append(entry)
            elif batch and now + self._cost(len(batch)) + self._cost(1) <= entry.deadline:
                self._pending.append(entry)  # the next forward can still answer it
            else:
                self._refuse(entry, now + self._cost(len(batch)) + self._cost(1))
        return batch

    def _refuse(self, entry: _Entry, answered: float) -> None:
        """Fail ``entry`` at once: no forward would answer it before its deadline."""
        self.stats.overloaded += 1
        entry.future.set_exception(ScorerOverloaded(
            f"{self.name} is overloaded: its forward would end {(answered - entry.deadline) * 1e3:.1f} ms "
            "after the request's deadline."))

    def _answer(self, entries: list[_Entry], results: Sequence[Any] | BaseException) -> None:
        for i, entry in enumerate(entries):
            if entry.future.done():
                continue
            result = results if isinstance(results, BaseException) else results[i]
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)

    def _finish(self, took: float, ran: int) -> None:
        self._busy = False
        self.stats.forward_seconds += took
        if ran:
            self.own_cost.observe(ran, 1, took)
        if self._wake is not None:
            self._wake.set()

    def _fail_pending(self, error: ScorerError) -> None:
        for entry in self._pending:
            if not entry.future.done():
                entry.future.set_exception(error)
        self._pending.clear()

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
            try:
                live = self._live(loop, batch)
                started = time.perf_counter()
                if live:
                    for indices, results in self._parts([entry.item for entry in live]):
                        loop.call_soon_threadsafe(self._answer, [live[i] for i in indices], results)
                loop.call_soon_threadsafe(self._finish, time.perf_counter() - started, len(live))
            except RuntimeError:  # the loop was closed while the forward ran
                pass

    def _live(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry]) -> list[_Entry]:
        """The entries of ``batch`` still wanted as its forward starts; those past their
        deadline are failed (on the loop), those whose caller has gone are left out."""
        now = self._clock()
        late = [entry for entry in batch if entry.deadline <= now]
        if late:
            loop.call_soon_threadsafe(self._expire, late)
        return [entry for entry in batch if entry.deadline > now and not entry.future.done()]

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


def scorer_error(exc: ScorerError, scorer: str) -> ScorerError:
    """``exc`` as scorer ``scorer``'s error: its message starts with ``Scorer 'name':``
    (once: a message that already names the scorer keeps its own start), and it stays the
    same kind (an overload is still a :class:`~extproc.ScorerOverloaded`)."""
    return type(exc)(scorer_message(scorer, exc))


def _retrieve(future: asyncio.Future) -> None:
    """Mark a failed future's exception as seen (its caller may have stopped waiting)."""
    if not future.cancelled():
        future.exception()
