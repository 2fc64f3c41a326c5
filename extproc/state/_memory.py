"""The in-process store: the default, and the answer when the remote store is down."""

from __future__ import annotations

import time
from collections.abc import Callable

from extproc.state._store import bucket_key, bucket_ttl_s, sliding_weight, window_index

__all__ = ["MemoryStore", "SWEEP_EVERY"]

#: Writes between two sweeps of expired entries (reads drop the expired entry they meet).
SWEEP_EVERY = 1024


class MemoryStore:
    """:class:`~extproc.state.Store` in a dict, for one process.

    TTLs and windows follow ``clock`` (wall-clock seconds; injectable for tests). Expired
    entries are dropped when read and swept every :data:`SWEEP_EVERY` writes, so memory stays
    bounded by what is live. Every method is a coroutine that never awaits: it runs to the end
    on the caller's turn of the event loop.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[str, tuple[str, float]] = {}  # key -> (value, expires at)
        self._counts: dict[str, tuple[float, float]] = {}  # bucket key -> (total, expires at)
        self._writes = 0

    def __len__(self) -> int:
        """Entries held, expired ones not yet swept included."""
        return len(self._values) + len(self._counts)

    async def get(self, key: str) -> str | None:
        return self._live_value(key)

    async def set(self, key: str, value: str, ttl_s: float) -> None:
        self._put_value(key, value, ttl_s)

    async def set_if_absent(self, key: str, value: str, ttl_s: float) -> str:
        held = self._live_value(key)
        if held is not None:
            return held
        self._put_value(key, value, ttl_s)
        return value

    async def incr_window(self, key: str, amount: float, window_s: float) -> float:
        return await self.incr_bucket(key, amount, window_s, window_index(self._clock(), window_s))

    async def incr_bucket(self, key: str, amount: float, window_s: float, index: int) -> float:
        now = self._clock()
        bucket = bucket_key(key, window_s, index)
        total = self._live_count(bucket, now) + amount
        self._counts[bucket] = (total, now + bucket_ttl_s(window_s))
        self._wrote(now)
        return total

    async def read_window(self, key: str, window_s: float) -> float:
        now = self._clock()
        return self._live_count(bucket_key(key, window_s, window_index(now, window_s)), now)

    async def read_sliding(self, key: str, window_s: float) -> float:
        now = self._clock()
        index = window_index(now, window_s)
        current = self._live_count(bucket_key(key, window_s, index), now)
        previous = self._live_count(bucket_key(key, window_s, index - 1), now)
        return current + previous * sliding_weight(now, window_s)

    async def aclose(self) -> None:
        return None

    def _live_value(self, key: str) -> str | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._values[key]
            return None
        return entry[0]

    def _put_value(self, key: str, value: str, ttl_s: float) -> None:
        now = self._clock()
        self._values[key] = (value, now + ttl_s)
        self._wrote(now)

    def _live_count(self, bucket: str, now: float) -> float:
        entry = self._counts.get(bucket)
        if entry is None:
            return 0.0
        if entry[1] <= now:
            del self._counts[bucket]
            return 0.0
        return entry[0]

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._writes % SWEEP_EVERY == 0:
            self.sweep(now)

    def sweep(self, now: float | None = None) -> None:
        """Drop every expired entry."""
        now = self._clock() if now is None else now
        self._values = {k: e for k, e in self._values.items() if e[1] > now}
        self._counts = {k: e for k, e in self._counts.items() if e[1] > now}
