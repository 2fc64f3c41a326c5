"""RedisStore and FallbackStore against a real Valkey/Redis server (harness.redis).

Two store objects stand for two switchyard replicas sharing one server. The server is killed,
paused and restarted under them: every call still returns (from process memory, counted),
and the same store objects use the server again once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio

from extproc.state import FallbackStore, MemoryStore, RedisStore, Store

#: Hang guard for calls that must return: generous, never a timing assertion.
RETURNS_WITHIN_S = 10.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, RETURNS_WITHIN_S))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def redis_store(server, **options) -> RedisStore:
    return RedisStore(server.url, 1.0, key_prefix="test:", **options)


def fallback_store(server, calls: list | None = None, **options) -> FallbackStore:
    on_fallback = (lambda op, reason: calls.append((op, reason))) if calls is not None else None
    return FallbackStore(redis_store(server), MemoryStore(), timeout_s=0.2, retry_s=0.0, on_fallback=on_fallback,
                         **options)


async def raw(server, *command):
    client = redis.asyncio.from_url(server.url, decode_responses=True)
    try:
        return await client.execute_command(*command)
    finally:
        await client.aclose()


def test_is_a_store(redis_server):
    assert isinstance(redis_store(redis_server), Store)
    assert isinstance(fallback_store(redis_server), Store)


def test_set_get_with_ttl_and_prefix(redis_server):
    async def scenario():
        store = redis_store(redis_server)
        try:
            await store.set("session:a", "large", ttl_s=30)
            assert await store.get("session:a") == "large"
            assert await store.get("session:none") is None
            ttl_ms = await raw(redis_server, "PTTL", "test:session:a")  # the prefix is applied
            assert 0 < ttl_ms <= 30_000
            await store.set("short", "x", ttl_s=0.05)
            await raw(redis_server, "PEXPIRE", "test:short", 1)
            await asyncio.sleep(0.01)
            assert await store.get("short") is None
        finally:
            await store.aclose()

    run(scenario())


def test_set_if_absent_two_replicas_agree_on_first_writer(redis_server):
    async def scenario():
        a, b = redis_store(redis_server), redis_store(redis_server)
        try:
            tries = [s.set_if_absent("pin:new", f"backend{i}", 30) for i in range(20) for s in (a, b)]
            answers = await asyncio.gather(*tries)
            assert len(set(answers)) == 1  # everyone learned the same winner
            winner = answers[0]
            assert winner in {f"backend{i}" for i in range(20)}
            assert await b.get("pin:new") == winner == await a.get("pin:new")
            ttl_ms = await raw(redis_server, "PTTL", "test:pin:new")
            assert 0 < ttl_ms <= 30_000
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario())


def test_incr_window_totals_across_two_replicas(redis_server):
    async def scenario():
        a, b = redis_store(redis_server), redis_store(redis_server)
        try:
            adds = [s.incr_window("spend:t1", 1.5, 60) for _ in range(25) for s in (a, b)]
            totals = await asyncio.gather(*adds)
            assert sorted(totals) == [1.5 * n for n in range(1, 51)]  # atomic: each add saw a distinct total
            assert await a.read_window("spend:t1", 60) == 75.0 == await b.read_window("spend:t1", 60)
            keys = await raw(redis_server, "KEYS", "test:spend:t1:*")
            assert len(keys) == 1
            ttl_ms = await raw(redis_server, "PTTL", keys[0])
            assert 60_000 < ttl_ms <= 120_000  # kept two windows
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario())


def test_incr_bucket_adds_to_the_named_window_in_one_shared_bucket(redis_server):
    clock = Clock(600.0)  # window 10 of 60 s

    async def scenario():
        a, b = redis_store(redis_server, clock=clock), redis_store(redis_server, clock=clock)
        try:
            assert await a.incr_window("spend", 5.0, 60) == 5.0
            clock.now = 660.0  # window 11: b corrects a's charge in window 10
            assert await b.incr_bucket("spend", -3.5, 60, 10) == 1.5
            assert await a.read_window("spend", 60) == 0.0
            assert await a.read_sliding("spend", 60) == 1.5
            ttl_ms = await raw(redis_server, "PTTL", "test:spend:60s:10")
            assert 60_000 < ttl_ms <= 120_000  # kept two windows from the correction
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario())


def test_read_sliding_over_two_buckets(redis_server):
    clock = Clock(540.0)

    async def scenario():
        a, b = redis_store(redis_server, clock=clock), redis_store(redis_server, clock=clock)
        try:
            await a.incr_window("large", 10, 60)
            clock.now = 600.0
            await b.incr_window("large", 4, 60)
            clock.now = 615.0
            assert await a.read_sliding("large", 60) == pytest.approx(4 + 10 * 0.75)
            assert await b.read_window("large", 60) == 4
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario())


def test_killed_server_answers_in_process_and_counts_then_recovers_on_same_port(redis_server):
    calls: list[tuple[str, str]] = []

    async def scenario():
        store, other = fallback_store(redis_server, calls), redis_store(redis_server)
        try:
            await store.set("pin", "large", 300)
            assert await store.incr_window("spend", 2.0, 60) == 2.0
            assert await other.incr_window("spend", 3.0, 60) == 5.0  # another replica's spend
            assert store.fallbacks == {}

            redis_server.kill()
            assert await store.get("pin") == "large"  # what this replica wrote itself
            assert await store.set_if_absent("pin2", "small", 300) == "small"
            assert await store.incr_window("spend", 1.0, 60) == 3.0  # this replica's own view
            assert await store.incr_bucket("spend", -0.5, 60, int(time.time() // 60)) == 2.5  # a correction, too
            assert await store.read_window("spend", 60) == 2.5
            assert await store.read_sliding("spend", 60) >= 2.5
            await store.set("pin3", "x", 300)
            assert not store.remote_up
            operations = {op for op, _ in calls}
            assert operations == {"get", "set_if_absent", "incr_window", "incr_bucket", "read_window", "read_sliding",
                                  "set"}
            assert {reason for _, reason in calls} <= {"error", "timeout"}
            assert sum(store.fallbacks.values()) == len(calls) == 7

            redis_server.start()  # same port, same folder: the append-only file brings the data back
            assert await store.get("pin") == "large"
            assert store.remote_up
            assert await store.incr_window("spend", 1.0, 60) == 6.0  # 2 + 3 before the crash, + 1
            assert await other.read_window("spend", 60) == 6.0  # the other replica reconnected too
            assert await store.set_if_absent("pin2", "large", 300) == "large"  # the remote is the truth again
            assert len(calls) == 7
        finally:
            await store.aclose()
            await other.aclose()

    run(scenario())


def test_down_server_is_not_retried_until_retry_interval_passes(redis_server):
    clock = Clock(0.0)

    async def scenario():
        store = FallbackStore(redis_store(redis_server), timeout_s=0.2, retry_s=1.0, clock=clock)
        try:
            redis_server.kill()
            assert await store.get("k") is None
            assert await store.get("k") is None
            assert store.fallbacks == {("get", "error"): 1, ("get", "down"): 1}
            redis_server.start()
            assert await store.get("k") is None  # within retry_s: still answered in process
            assert store.fallbacks[("get", "down")] == 2
            clock.now = 1.0
            await store.set("k", "v", 30)
            assert store.remote_up
            assert await raw(redis_server, "GET", "test:k") == "v"
        finally:
            await store.aclose()

    run(scenario())


def test_after_retry_interval_one_call_tries_the_server_and_the_others_do_not_wait(redis_server):
    clock = Clock(0.0)

    async def scenario():
        store = FallbackStore(redis_store(redis_server), timeout_s=0.2, retry_s=1.0, clock=clock)
        try:
            await store.set("k", "v", 30)
            redis_server.pause()
            assert await store.get("k") == "v"
            assert store.fallbacks == {("get", "timeout"): 1}
            clock.now = 1.0
            answers = await asyncio.gather(*(store.get("k") for _ in range(5)))
            assert answers == ["v"] * 5
            assert store.fallbacks == {("get", "timeout"): 2, ("get", "down"): 4}
        finally:
            redis_server.resume()
            await store.aclose()

    run(scenario())


def test_stalled_server_times_out_to_in_process_answer(redis_server):
    async def scenario():
        store = fallback_store(redis_server)
        try:
            await store.set("pin", "large", 300)  # connected, and mirrored in process
            redis_server.pause()
            assert await store.get("pin") == "large"
            assert await store.incr_window("n", 1, 60) == 1
            assert store.fallbacks[("get", "timeout")] == 1
            assert store.fallbacks[("incr_window", "timeout")] == 1
            redis_server.resume()
            assert await store.get("pin") == "large"
            assert store.remote_up
        finally:
            redis_server.resume()
            await store.aclose()

    run(scenario())


def test_nothing_listening_never_raises(redis_server):
    redis_server.stop()

    async def scenario():
        store = FallbackStore(RedisStore(redis_server.url, 0.2), timeout_s=0.2, retry_s=0.0)
        try:
            assert await store.get("k") is None
            assert await store.set_if_absent("k", "a", 10) == "a"
            assert await store.read_sliding("n", 60) == 0
            assert store.fallbacks[("get", "error")] == 1
        finally:
            await store.aclose()

    run(scenario())


def test_password_from_option_authenticates_and_is_never_shown(tmp_path, caplog):
    from harness.redis import RedisServer

    with RedisServer(tmp_path / "auth", args=("--requirepass", "s3cret-pw")) as server:
        url = f"redis://:wrong-pw@127.0.0.1:{server.port}/0"

        async def scenario():
            good = RedisStore(url, 1.0, password="s3cret-pw")
            bad = FallbackStore(RedisStore(url, 1.0), timeout_s=0.5, retry_s=0.0)
            try:
                await good.set("k", "v", 10)
                assert await good.get("k") == "v"
                assert await bad.get("k") is None  # wrong password: answered in process
                assert bad.fallbacks[("get", "error")] == 1
            finally:
                await good.aclose()
                await bad.aclose()

        with caplog.at_level(logging.INFO, logger="switchyard.state"):
            run(scenario())
        shown = repr(RedisStore(url, 1.0)) + repr(FallbackStore(RedisStore(url, 1.0))) + caplog.text
        shown += " ".join(str(vars(r)) for r in caplog.records)
        assert "wrong-pw" not in shown and "s3cret-pw" not in shown
        assert caplog.records, "the failure is logged"
