"""What every fleet-state store answers, and the window arithmetic they share.

A store holds three kinds of state, each keyed by a string the caller chooses:

- **values with a TTL** (session pins: session key -> backend name): :meth:`Store.get`,
  :meth:`Store.set`, and :meth:`Store.set_if_absent`, where the first writer wins and every
  caller learns the winning value, so two replicas pinning one new session agree;
- **fixed-window counters** (spend, request counts): :meth:`Store.incr_window` adds to the
  bucket of the current window (its key carries the window's index; it expires after two
  windows), :meth:`Store.incr_bucket` to the bucket of a window the caller names (a budget
  charge and its later correction land in one bucket even across a window boundary), and
  :meth:`Store.read_window` reads the current one;
- **a sliding-window read** over those buckets (:meth:`Store.read_sliding`): the current bucket
  plus the previous one weighted by the share of it still inside the window, the estimate
  rate limiters use; a share controller divides two of them (large requests / all requests).

Windows are aligned to the epoch on the wall clock (``time.time``), so replicas whose clocks
agree (NTP) share buckets; a skew of *d* seconds moves a replica's boundaries by *d*.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

__all__ = ["Store", "window_index", "bucket_key", "sliding_weight", "bucket_ttl_s"]


@runtime_checkable
class Store(Protocol):
    """The fleet-state API the server awaits on the request path (see the module docstring)."""

    async def get(self, key: str) -> str | None:
        """The value at ``key``, or ``None`` when it is absent or expired."""
        ...

    async def set(self, key: str, value: str, ttl_s: float) -> None:
        """Store ``value`` at ``key`` for ``ttl_s`` seconds, replacing any value."""
        ...

    async def set_if_absent(self, key: str, value: str, ttl_s: float) -> str:
        """Store ``value`` for ``ttl_s`` seconds unless ``key`` holds one; the value ``key``
        holds afterwards (``value`` when this call won)."""
        ...

    async def incr_window(self, key: str, amount: float, window_s: float) -> float:
        """Add ``amount`` to ``key``'s bucket of the current ``window_s`` window; its total after."""
        ...

    async def incr_bucket(self, key: str, amount: float, window_s: float, index: int) -> float:
        """Add ``amount`` to ``key``'s bucket ``index`` of ``window_s`` windows (:func:`window_index`);
        its total after. The bucket is kept :func:`bucket_ttl_s` from now, as :meth:`incr_window`'s."""
        ...

    async def read_window(self, key: str, window_s: float) -> float:
        """The total of ``key``'s bucket of the current ``window_s`` window (0 when empty)."""
        ...

    async def read_sliding(self, key: str, window_s: float) -> float:
        """``key``'s total over the last ``window_s`` seconds, estimated from two buckets."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


def window_index(now: float, window_s: float) -> int:
    """The number of whole ``window_s`` windows between the epoch and ``now``."""
    return math.floor(now / window_s)


def bucket_key(key: str, window_s: float, index: int) -> str:
    """The key of ``key``'s bucket ``index`` of ``window_s`` windows (``spend:60s:29000000``):
    each window length has its own buckets, so two readers with different windows never mix."""
    return f"{key}:{window_s:g}s:{index}"


def sliding_weight(now: float, window_s: float) -> float:
    """The share of the previous bucket still inside a window of ``window_s`` ending at ``now``:
    1 at the current bucket's start, falling to 0 at its end."""
    elapsed = (now - window_index(now, window_s) * window_s) / window_s
    return min(1.0, max(0.0, 1.0 - elapsed))


def bucket_ttl_s(window_s: float) -> float:
    """How long a bucket is kept: two windows, so the sliding read still finds the previous one."""
    return 2.0 * window_s
