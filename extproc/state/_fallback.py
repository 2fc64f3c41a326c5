"""A remote store that never fails a request: each call bounded, the in-process answer on failure.

Every call goes to the remote store within ``timeout_s``. When it times out or fails (the
server is down, slow, refusing, still loading its data) the call is answered by an in-process
:class:`~extproc.state.MemoryStore`, counted by operation and reason, and for ``retry_s``
seconds after that every call is answered in process at once (reason ``down``), so a store
that is down costs one timeout, not one per request. After ``retry_s`` the next call tries the
remote again (the calls made while it waits are answered in process); redis-py reconnects on
it, so a server that comes back is used again by the same store object.

Writes also go to the in-process store, so while the remote is down a replica still knows the
pins it set and the spend it added itself: the in-process decision is this replica's own view.
What a replica wrote in process while the remote was down is not copied to it afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

from extproc.state._memory import MemoryStore
from extproc.state._store import Store

__all__ = ["FallbackStore", "DEFAULT_TIMEOUT_MS", "DEFAULT_RETRY_S", "FALLBACK_REASONS"]

#: How long one store call may take before the in-process answer is used (``state.redis.timeout_ms``).
#: A loopback or same-zone Redis answers in well under 1 ms; 50 ms rides out a GC pause or a
#: busy server and is still small beside a request's scorer deadline.
DEFAULT_TIMEOUT_MS = 50
#: Seconds a failed remote store is left alone (every call answered in process at once)
#: before the next call tries it again.
DEFAULT_RETRY_S = 1.0
#: Why a call was answered in process: ``timeout`` (no answer within the timeout), ``error``
#: (the call failed: refused, reset, the server loading or erroring), ``down`` (the remote
#: failed less than ``retry_s`` ago and was not tried).
FALLBACK_REASONS = ("timeout", "error", "down")

log = logging.getLogger("switchyard.state")
T = TypeVar("T")


class FallbackStore:
    """:class:`~extproc.state.Store` over ``remote``, answering from ``local`` when it fails.

    ``fallbacks`` counts the calls answered in process by ``(operation, reason)`` (reasons:
    :data:`FALLBACK_REASONS`); ``on_fallback(operation, reason)`` is called for each, e.g.
    :meth:`~extproc.state.StateTelemetry.fallback`. ``clock`` (monotonic seconds) paces the
    retries and is injectable for tests. No call raises, and none waits longer than
    ``timeout_s`` (plus the moment a cancelled call takes to close its connection).
    """

    def __init__(
        self,
        remote: Store,
        local: MemoryStore | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_MS / 1000,
        retry_s: float = DEFAULT_RETRY_S,
        on_fallback: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.remote = remote
        self.local = local if local is not None else MemoryStore()
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.fallbacks: Counter[tuple[str, str]] = Counter()
        self._on_fallback = on_fallback
        self._clock = clock
        self._down_since: float | None = None  # when the remote last failed; None while it answers
        self._probing = False  # a call is trying the remote after it failed

    def __repr__(self) -> str:
        return f"FallbackStore({self.remote!r}, timeout_s={self.timeout_s}, retry_s={self.retry_s})"

    @property
    def remote_up(self) -> bool:
        """False from a failed remote call until a remote call succeeds again."""
        return self._down_since is None

    async def get(self, key: str) -> str | None:
        ok, value = await self._remote("get", lambda: self.remote.get(key))
        return value if ok else await self.local.get(key)

    async def set(self, key: str, value: str, ttl_s: float) -> None:
        await self.local.set(key, value, ttl_s)
        await self._remote("set", lambda: self.remote.set(key, value, ttl_s))

    async def set_if_absent(self, key: str, value: str, ttl_s: float) -> str:
        ok, held = await self._remote("set_if_absent", lambda: self.remote.set_if_absent(key, value, ttl_s))
        if not ok:
            return await self.local.set_if_absent(key, value, ttl_s)
        await self.local.set(key, held, ttl_s)  # the fleet's winner, for when the remote is down
        return held

    async def incr_window(self, key: str, amount: float, window_s: float) -> float:
        local_total = await self.local.incr_window(key, amount, window_s)
        ok, total = await self._remote("incr_window", lambda: self.remote.incr_window(key, amount, window_s))
        return total if ok else local_total

    async def incr_bucket(self, key: str, amount: float, window_s: float, index: int) -> float:
        local_total = await self.local.incr_bucket(key, amount, window_s, index)
        ok, total = await self._remote("incr_bucket", lambda: self.remote.incr_bucket(key, amount, window_s, index))
        return total if ok else local_total

    async def read_window(self, key: str, window_s: float) -> float:
        ok, total = await self._remote("read_window", lambda: self.remote.read_window(key, window_s))
        return total if ok else await self.local.read_window(key, window_s)

    async def read_sliding(self, key: str, window_s: float) -> float:
        ok, total = await self._remote("read_sliding", lambda: self.remote.read_sliding(key, window_s))
        return total if ok else await self.local.read_sliding(key, window_s)

    async def aclose(self) -> None:
        try:
            await asyncio.wait_for(self.remote.aclose(), self.timeout_s)
        except Exception:  # closing a dead connection: nothing left to release
            pass

    async def _remote(self, operation: str, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """``(True, result)`` of the remote call, or ``(False, None)`` after counting why not."""
        if self._down_since is not None:
            if self._probing or self._clock() - self._down_since < self.retry_s:
                self._fell_back(operation, "down")
                return False, None
            self._probing = True  # this call tries the remote; the calls meanwhile answer in process
        try:
            result = await asyncio.wait_for(call(), self.timeout_s)
        except asyncio.TimeoutError:
            self._failed(operation, "timeout", None)
            return False, None
        except Exception as exc:  # never raise to the request path: every failure is counted
            self._failed(operation, "error", exc)
            return False, None
        finally:
            self._probing = False
        if self._down_since is not None:
            self._down_since = None
            log.info("fleet-state store answers again", extra={"store": repr(self.remote)})
        return True, result

    def _failed(self, operation: str, reason: str, exc: Exception | None) -> None:
        if self._down_since is None:
            log.warning("fleet-state store failed; answering in process", extra={
                "store": repr(self.remote), "operation": operation, "reason": reason,
                "error": type(exc).__name__ if exc is not None else None, "retry_s": self.retry_s})
        self._down_since = self._clock()
        self._fell_back(operation, reason)

    def _fell_back(self, operation: str, reason: str) -> None:
        self.fallbacks[(operation, reason)] += 1
        if self._on_fallback is not None:
            self._on_fallback(operation, reason)

