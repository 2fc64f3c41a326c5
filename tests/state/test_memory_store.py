"""MemoryStore: TTLs, first writer wins, fixed and sliding windows, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from extproc.state import MemoryStore, Store
from extproc.state._memory import SWEEP_EVERY


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_is_a_store():
    assert isinstance(MemoryStore(), Store)


def test_value_lives_for_its_ttl():
    clock = Clock()
    store = MemoryStore(clock)
    run(store.set("session:a", "large", ttl_s=10))
    clock.now += 9.9
    assert run(store.get("session:a")) == "large"
    clock.now += 0.1
    assert run(store.get("session:a")) is None
    assert run(store.get("never")) is None


def test_set_replaces_value_and_ttl():
    clock = Clock()
    store = MemoryStore(clock)
    run(store.set("k", "a", ttl_s=1))
    run(store.set("k", "b", ttl_s=100))
    clock.now += 50
    assert run(store.get("k")) == "b"


def test_set_if_absent_first_writer_wins_until_expiry():
    clock = Clock()
    store = MemoryStore(clock)
    assert run(store.set_if_absent("pin", "small", 30)) == "small"
    assert run(store.set_if_absent("pin", "large", 30)) == "small"  # the winner, not the loser's value
    clock.now += 30
    assert run(store.set_if_absent("pin", "large", 30)) == "large"


def test_incr_window_totals_per_fixed_window():
    clock = Clock(600.0)  # the start of a 60 s window
    store = MemoryStore(clock)
    assert run(store.incr_window("spend:t1", 1.5, 60)) == 1.5
    clock.now += 59
    assert run(store.incr_window("spend:t1", 2.0, 60)) == 3.5
    assert run(store.read_window("spend:t1", 60)) == 3.5
    clock.now += 1  # the next window: a new bucket
    assert run(store.read_window("spend:t1", 60)) == 0.0
    assert run(store.incr_window("spend:t1", 1.0, 60)) == 1.0


def test_incr_bucket_adds_to_the_named_window_even_after_it_ended():
    """A budget's correction lands in the bucket its charge went to, not in the current one."""
    clock = Clock(600.0)  # window 10 of 60 s
    store = MemoryStore(clock)
    assert run(store.incr_bucket("spend", 5.0, 60, 10)) == 5.0
    clock.now += 60  # window 11
    assert run(store.incr_bucket("spend", -3.0, 60, 10)) == 2.0
    assert run(store.read_window("spend", 60)) == 0.0  # the current window is untouched
    assert run(store.read_sliding("spend", 60)) == 2.0  # the previous bucket, at its full weight
    assert run(store.incr_window("spend", 1.0, 60)) == 1.0


def test_windows_of_different_lengths_do_not_mix():
    store = MemoryStore(Clock(600.0))
    run(store.incr_window("n", 1, 60))
    run(store.incr_window("n", 5, 3600))
    assert run(store.read_window("n", 60)) == 1
    assert run(store.read_window("n", 3600)) == 5


@pytest.mark.parametrize(("elapsed", "expected"), [(0.0, 14.0), (15.0, 4 + 10 * 0.75), (30.0, 9.0), (59.0, 4 + 10 / 60)])
def test_read_sliding_weights_previous_bucket_by_what_is_left_of_it(elapsed, expected):
    clock = Clock(540.0)  # inside window [540, 600)
    store = MemoryStore(clock)
    run(store.incr_window("large", 10, 60))
    clock.now = 600.0
    run(store.incr_window("large", 4, 60))
    clock.now = 600.0 + elapsed
    assert run(store.read_sliding("large", 60)) == pytest.approx(expected)


def test_buckets_expire_after_two_windows():
    clock = Clock(600.0)
    store = MemoryStore(clock)
    run(store.incr_window("n", 7, 60))
    clock.now = 660.0  # next window: the old bucket still counts for the sliding read
    assert run(store.read_sliding("n", 60)) == 7
    clock.now = 720.0  # two windows later: gone
    assert run(store.read_sliding("n", 60)) == 0
    assert run(store.read_window("n", 60)) == 0
    clock.now = 719.0
    assert len(store) == 1
    clock.now = 720.0
    store.sweep()
    assert len(store) == 0


def test_expired_entries_are_swept_by_writes():
    clock = Clock()
    store = MemoryStore(clock)
    for i in range(10):
        run(store.set(f"old{i}", "x", ttl_s=1))
    clock.now += 2
    for i in range(SWEEP_EVERY):
        run(store.set("live", "y", ttl_s=100))
    assert len(store) == 1
