"""The micro-batcher: own results, real batches, deadlines, failures, backpressure, threads,
no request held while the worker is idle (admission by predicted wait: test_admission.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from extproc import BatchConfig, ScorerError, ScorerOverloaded
from routers.serving.batcher import MicroBatcher


class FakeClock:
    """A deadline clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Gate:
    """A forward that records its batches and can be held closed by the test."""

    def __init__(self, fn=lambda x: x * 10) -> None:
        self.batches: list[list] = []
        self.threads: set[int] = set()
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.fn = fn

    def __call__(self, items):
        self.threads.add(threading.get_ident())
        self.entered.set()
        self.open.wait(10)
        self.batches.append(list(items))
        return [self.fn(x) for x in items]


def far() -> float:
    return time.monotonic() + 30.0


def test_concurrent_requests_each_get_their_own_result_in_real_batches():
    gate = Gate()

    async def main():
        batcher = MicroBatcher(gate, BatchConfig(max_size=16, max_wait_ms=20), name="scorer 't'")
        try:
            results = await asyncio.gather(*(batcher.run(i, far()) for i in range(64)))
        finally:
            await batcher.close()
        return results, batcher

    results, batcher = asyncio.run(main())
    assert results == [i * 10 for i in range(64)]
    assert max(len(b) for b in gate.batches) > 1
    assert all(len(b) <= 16 for b in gate.batches)
    assert sorted(x for b in gate.batches for x in b) == list(range(64))
    assert batcher.stats.requests == 64 and batcher.stats.batches == len(gate.batches)


def test_forward_runs_on_the_worker_thread_not_the_event_loop():
    gate = Gate()

    async def main():
        batcher = MicroBatcher(gate, BatchConfig(max_size=4, max_wait_ms=1), name="scorer 't'")
        loop_thread = threading.get_ident()
        await asyncio.gather(*(batcher.run(i, far()) for i in range(8)))
        await batcher.close()
        return loop_thread, batcher

    loop_thread, batcher = asyncio.run(main())
    assert gate.threads == {batcher.worker_thread.ident}
    assert loop_thread not in gate.threads
    assert not batcher.worker_thread.is_alive()  # close() stopped it


def test_requests_past_their_deadline_are_dropped_before_the_forward():
    clock = FakeClock()
    gate = Gate()

    async def main():
        batcher = MicroBatcher(gate, BatchConfig(max_size=8, max_wait_ms=0), name="scorer 't'", clock=clock)
        gate.open.clear()
        first = batcher.submit("first", clock.now + 100)  # occupies the worker
        await asyncio.to_thread(gate.entered.wait, 10)
        late = batcher.submit("late", clock.now + 5)
        on_time = batcher.submit("on time", clock.now + 100)
        clock.now += 10  # "late" is now past its deadline, still waiting for the worker
        gate.open.set()
        outcome = await asyncio.gather(first, late, on_time, return_exceptions=True)
        await batcher.close()
        return outcome, batcher

    (first, late, on_time), batcher = asyncio.run(main())
    assert first == "firstfirstfirstfirstfirstfirstfirstfirstfirstfirst"
    assert isinstance(late, ScorerError) and "deadline passed before its forward" in str(late)
    assert on_time == "on time" * 10
    assert all("late" not in batch for batch in gate.batches)
    assert batcher.stats.expired == 1


def test_a_caller_gives_up_at_its_deadline_and_its_entry_is_dropped():
    gate = Gate()

    async def main():
        batcher = MicroBatcher(gate, BatchConfig(max_size=8, max_wait_ms=0), name="scorer 't'")
        gate.open.clear()
        first = batcher.submit(1, far())
        await asyncio.to_thread(gate.entered.wait, 10)
        with pytest.raises(ScorerError, match="missed its deadline"):
            await batcher.run(2, time.monotonic() + 0.05)
        gate.open.set()
        assert await first == 10
        assert await batcher.run(3, far()) == 30
        await batcher.close()

    asyncio.run(main())
    assert all(2 not in batch for batch in gate.batches)


def test_a_raising_forward_fails_its_batch_and_a_failed_item_only_itself():
    def forward(items):
        if "boom" in items:
            raise RuntimeError("CUDA error: device-side assert")
        return [ValueError("nan for this one") if x == "bad" else x.upper() for x in items]

    async def main():
        batcher = MicroBatcher(forward, BatchConfig(max_size=8, max_wait_ms=50), name="scorer 't'")
        mixed = await asyncio.gather(*(batcher.run(x, far()) for x in ("a", "bad", "b")), return_exceptions=True)
        broken = await asyncio.gather(*(batcher.run(x, far()) for x in ("c", "boom")), return_exceptions=True)
        after = await batcher.run("d", far())
        await batcher.close()
        return mixed, broken, after

    mixed, broken, after = asyncio.run(main())
    assert mixed[0] == "A" and mixed[2] == "B"
    assert isinstance(mixed[1], ScorerError) and "nan for this one" in str(mixed[1])
    assert all(isinstance(r, ScorerError) and "RuntimeError: CUDA error" in str(r) for r in broken)
    assert after == "D"  # the batcher survives a failed forward


def test_a_wrong_number_of_results_fails_the_batch():
    async def main():
        batcher = MicroBatcher(lambda items: [1], BatchConfig(max_size=8, max_wait_ms=30), name="scorer 't'")
        out = await asyncio.gather(*(batcher.run(x, far()) for x in range(3)), return_exceptions=True)
        await batcher.close()
        return out

    out = asyncio.run(main())
    assert all(isinstance(r, ScorerError) and "returned 1 results for" in str(r) for r in out)


def test_a_full_queue_fails_fast_as_overloaded():
    gate = Gate()

    async def main():
        batcher = MicroBatcher(gate, BatchConfig(max_size=1, max_wait_ms=0), name="scorer 't'", max_queue=3)
        gate.open.clear()
        running = batcher.submit(0, far())
        await asyncio.to_thread(gate.entered.wait, 10)
        waiting = [batcher.submit(i, far()) for i in (1, 2, 3)]
        with pytest.raises(ScorerOverloaded, match="overloaded: 3 requests already wait"):
            batcher.submit(4, far())
        gate.open.set()
        out = await asyncio.gather(running, *waiting)
        await batcher.close()
        return out, batcher

    out, batcher = asyncio.run(main())
    assert out == [0, 10, 20, 30] and batcher.stats.overloaded == 1


def test_close_fails_waiting_requests_and_refuses_new_ones():
    gate = Gate()

    async def main():
        batcher = MicroBatcher(gate, BatchConfig(max_size=1, max_wait_ms=0), name="scorer 't'")
        gate.open.clear()
        running = batcher.submit(0, far())
        await asyncio.to_thread(gate.entered.wait, 10)
        waiting = batcher.submit(1, far())
        gate.open.set()
        await batcher.close()
        with pytest.raises(ScorerError, match="closed"):
            batcher.submit(2, far())
        return await asyncio.gather(running, waiting, return_exceptions=True), batcher

    (running, waiting), batcher = asyncio.run(main())
    assert running == 0  # the forward in flight finished
    assert isinstance(waiting, ScorerError) and "closed" in str(waiting)
    assert not batcher.worker_thread.is_alive()


def test_a_new_event_loop_can_use_the_batcher_after_the_old_one_ended():
    batcher = MicroBatcher(Gate(), BatchConfig(max_size=4, max_wait_ms=1), name="scorer 't'")
    assert asyncio.run(batcher.run(1, far())) == 10
    assert asyncio.run(batcher.run(2, far())) == 20

    async def close():
        await batcher.close()

    asyncio.run(close())


@pytest.mark.parametrize("config", [BatchConfig(max_size=0), BatchConfig(max_wait_ms=-1.0), BatchConfig(max_wait_ms=float("nan"))])
def test_bad_batch_settings_name_the_field(config):
    with pytest.raises(ValueError, match="batch.max_"):
        MicroBatcher(lambda items: items, config, name="scorer 't'")


def test_a_forward_in_parts_answers_each_part_as_it_finishes():
    second_part = threading.Event()

    def forward(items):  # two passes: the first half, then (once let through) the rest
        half = len(items) // 2
        yield range(half), [x * 10 for x in items[:half]]
        second_part.wait(10)
        yield range(half, len(items)), [x * 10 for x in items[half:]]

    async def main():
        batcher = MicroBatcher(forward, BatchConfig(max_size=4, max_wait_ms=50), name="scorer 't'")
        try:
            calls = [asyncio.ensure_future(batcher.run(i, far())) for i in range(4)]
            first = await asyncio.wait_for(asyncio.gather(*calls[:2]), 5)  # answered while the rest still run
            assert not any(call.done() for call in calls[2:])
            second_part.set()
            return first, await asyncio.gather(*calls[2:]), batcher.stats.batches
        finally:
            second_part.set()
            await batcher.close()

    first, rest, batches = asyncio.run(main())
    assert first == [0, 10] and rest == [20, 30] and batches == 1


def test_a_forward_in_parts_that_fails_midway_fails_only_the_unanswered():
    def forward(items):
        yield [0], ["a"]
        raise RuntimeError("CUDA error: out of memory")

    def forgetful(items):
        yield [1], ["b"]  # never answers item 0

    async def main():
        out = {}
        for name, fn in (("fails", forward), ("forgets", forgetful)):
            batcher = MicroBatcher(fn, BatchConfig(max_size=3, max_wait_ms=50), name="scorer 't'")
            out[name] = await asyncio.gather(*(batcher.run(x, far()) for x in range(3 if fn is forward else 2)),
                                             return_exceptions=True)
            await batcher.close()
        return out

    out = asyncio.run(main())
    assert out["fails"][0] == "a"
    assert all(isinstance(r, ScorerError) and "out of memory" in str(r) for r in out["fails"][1:])
    assert isinstance(out["forgets"][0], ScorerError) and "no result" in str(out["forgets"][0])
    assert out["forgets"][1] == "b"


def test_an_entry_that_expires_between_its_batch_and_its_forward_never_reaches_the_forward():
    # the worker looks at the clock again just before the forward: here it reads 10 s later
    # than the event loop, as if the batch had waited that long for the worker
    clock = FakeClock()
    gate = Gate()
    batcher: MicroBatcher | None = None

    def worker_clock() -> float:
        late = batcher is not None and threading.current_thread() is batcher.worker_thread
        return clock.now + (10.0 if late else 0.0)

    async def main():
        nonlocal batcher
        batcher = MicroBatcher(gate, BatchConfig(max_size=8, max_wait_ms=0), name="scorer 't'", clock=worker_clock)
        outcome = await asyncio.gather(batcher.submit("late", clock.now + 5), batcher.submit("on time", clock.now + 100),
                                       return_exceptions=True)
        await batcher.close()
        return outcome

    late, on_time = asyncio.run(main())
    assert isinstance(late, ScorerError) and "deadline passed before its forward" in str(late)
    assert on_time == "on time" * 10
    assert gate.batches == [["on time"]]  # the forward saw only the request still in time
    assert batcher.stats.expired == 1


def test_requests_that_expire_while_a_slow_forward_runs_are_never_forwarded():
    gate = Gate()

    async def main():
        batcher = MicroBatcher(gate, BatchConfig(max_size=8, max_wait_ms=0), name="scorer 't'")
        gate.open.clear()  # a slow forward: held until the waiting requests' deadlines pass
        running = batcher.submit("running", far())
        await asyncio.to_thread(gate.entered.wait, 10)
        doomed = [batcher.submit(f"doomed {i}", time.monotonic() + 0.05) for i in range(3)]
        kept = batcher.submit("kept", far())
        await asyncio.sleep(0.1)
        gate.open.set()
        outcome = await asyncio.gather(running, *doomed, kept, return_exceptions=True)
        await batcher.close()
        return outcome, batcher

    outcome, batcher = asyncio.run(main())
    assert all(isinstance(r, ScorerError) and "deadline" in str(r) for r in outcome[1:4])
    assert gate.batches == [["running"], ["kept"]]
    assert batcher.stats.expired == 3


def test_an_idle_worker_takes_a_request_at_once_without_waiting_max_wait():
    gate = Gate()

    async def main():
        batcher = MicroBatcher(gate, BatchConfig(max_size=32, max_wait_ms=10_000), name="scorer 't'")
        try:  # the old batcher held the first request for max_wait_ms (here 10 s)
            return await asyncio.wait_for(batcher.run(1, far()), 5)
        finally:
            await batcher.close()

    assert asyncio.run(main()) == 10
    assert gate.batches == [[1]]


def test_requests_arriving_during_a_forward_form_the_next_batch():
    gate = Gate()

    async def main():
        batcher = MicroBatcher(gate, BatchConfig(max_size=8, max_wait_ms=10_000), name="scorer 't'")
        gate.open.clear()
        first = batcher.submit(0, far())
        await asyncio.to_thread(gate.entered.wait, 10)
        rest = [batcher.submit(i, far()) for i in (1, 2, 3)]
        gate.open.set()
        try:
            return await asyncio.wait_for(asyncio.gather(first, *rest), 5)
        finally:
            await batcher.close()

    assert asyncio.run(main()) == [0, 10, 20, 30]
    assert gate.batches == [[0], [1, 2, 3]]
