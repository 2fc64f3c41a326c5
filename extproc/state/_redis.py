"""The fleet-state store in Redis or Valkey, shared by every replica (redis-py's asyncio client).

Each operation is one round trip and atomic on the server: ``SET .. PX`` for values, a Lua
script for first-writer-wins (``SET NX`` then ``GET`` in one step, so the winner is read
before it can expire), and ``INCRBYFLOAT`` + ``PEXPIRE`` in one ``MULTI`` for a window bucket.
Errors (connection refused, timeouts, a server loading its data) are raised as redis-py's
exceptions; :class:`~extproc.state.FallbackStore` is what turns them into in-process answers.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from extproc.state._errors import StateConfigError
from extproc.state._store import bucket_key, bucket_ttl_s, sliding_weight, window_index
from extproc.state._url import redact_url, without_password

__all__ = ["RedisStore", "REDIS_INSTALL_HINT", "import_redis"]

#: What to run when redis-py is missing (it is a core dependency; a trimmed image may lack it).
REDIS_INSTALL_HINT = "pip install 'redis>=5'"

#: First writer wins: store ARGV[1] for ARGV[2] ms unless KEYS[1] holds a value; the value held after.
_SET_IF_ABSENT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return ARGV[1]
end
return redis.call('GET', KEYS[1])
"""


def import_redis() -> Any:
    """``redis.asyncio``, imported on first use; a missing package says how to install it."""
    try:
        return importlib.import_module("redis.asyncio")
    except ImportError as exc:
        raise StateConfigError(
            f"`state.redis` needs the redis package, which is not installed: run `{REDIS_INSTALL_HINT}`."
        ) from exc


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisStore:
    """:class:`~extproc.state.Store` in the Redis or Valkey server at ``url``.

    ``timeout_s`` bounds connecting and each reply on the socket; redis-py's own retries are
    off (a retry would outlive the caller's deadline). Keys are prefixed with ``key_prefix`` so
    several deployments can share a database. ``password``, when given, overrides the URL's.
    The client is created on the first call, in the running event loop; after a failed call
    the next one connects again, so a server that comes back is used again without a new
    store. ``repr`` and logs show the URL without its password.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float,
        *,
        key_prefix: str = "",
        password: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self.timeout_s = timeout_s
        self.key_prefix = key_prefix
        self._password = password
        self._clock = clock
        self._client: Any = None
        self._set_if_absent: Any = None
        import_redis()  # fail at build time, not on the first request

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, timeout_s={self.timeout_s}, key_prefix={self.key_prefix!r})"

    @property
    def url(self) -> str:
        """The server's URL with its password redacted."""
        return redact_url(self._url)

    def _redis(self) -> Any:
        if self._client is None:
            redis = import_redis()
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            options: dict[str, Any] = {
                "decode_responses": True,
                "socket_connect_timeout": self.timeout_s,
                "socket_timeout": self.timeout_s,
                "retry": Retry(NoBackoff(), 0),
            }
            url = self._url
            if self._password is not None:
                url, options["password"] = without_password(url), self._password
            self._client = redis.from_url(url, **options)
            self._set_if_absent = self._client.register_script(_SET_IF_ABSENT)
        return self._client

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    async def get(self, key: str) -> str | None:
        return await self._redis().get(self._key(key))

    async def set(self, key: str, value: str, ttl_s: float) -> None:
        await self._redis().set(self._key(key), value, px=_ms(ttl_s))

    async def set_if_absent(self, key: str, value: str, ttl_s: float) -> str:
        self._redis()
        held = await self._set_if_absent(keys=[self._key(key)], args=[value, _ms(ttl_s)])
        return value if held is None else held

    async def incr_window(self, key: str, amount: float, window_s: float) -> float:
        return await self.incr_bucket(key, amount, window_s, window_index(self._clock(), window_s))

    async def incr_bucket(self, key: str, amount: float, window_s: float, index: int) -> float:
        bucket = self._key(bucket_key(key, window_s, index))
        async with self._redis().pipeline(transaction=True) as pipe:
            pipe.incrbyfloat(bucket, amount)
            pipe.pexpire(bucket, _ms(bucket_ttl_s(window_s)))
            total, _ = await pipe.execute()
        return float(total)

    async def read_window(self, key: str, window_s: float) -> float:
        bucket = self._key(bucket_key(key, window_s, window_index(self._clock(), window_s)))
        return float(await self._redis().get(bucket) or 0.0)

    async def read_sliding(self, key: str, window_s: float) -> float:
        now = self._clock()
        index = window_index(now, window_s)
        current, previous = await self._redis().mget(
            self._key(bucket_key(key, window_s, index)), self._key(bucket_key(key, window_s, index - 1)))
        return float(current or 0.0) + float(previous or 0.0) * sliding_weight(now, window_s)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
