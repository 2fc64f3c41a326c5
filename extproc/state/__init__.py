"""Fleet state: session pins, budgets and share counters, in process or in Redis/Valkey.

The server awaits a :class:`Store` on the request path. :func:`build_store` makes the one the
policy's ``state:`` section (:class:`StateConfig`) names: a :class:`MemoryStore` by default,
or a :class:`RedisStore` wrapped in a :class:`FallbackStore`, which bounds every call by the
configured timeout and answers from process memory when the server is slow or down, counting
it (:class:`StateTelemetry`). redis-py is imported only when a Redis store is built.
"""

from extproc.state._config import (
    DEFAULT_KEY_PREFIX,
    MAX_TIMEOUT_MS,
    STATE_KEY,
    STATE_SCHEMA,
    RedisConfig,
    StateConfig,
    build_store,
)
from extproc.state._errors import StateConfigError
from extproc.state._fallback import (
    DEFAULT_RETRY_S,
    DEFAULT_TIMEOUT_MS,
    FALLBACK_REASONS,
    FallbackStore,
)
from extproc.state._memory import MemoryStore
from extproc.state._redis import RedisStore
from extproc.state._store import Store
from extproc.state._telemetry import StateTelemetry
from extproc.state._url import redact_url

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_RETRY_S",
    "DEFAULT_TIMEOUT_MS",
    "FALLBACK_REASONS",
    "MAX_TIMEOUT_MS",
    "STATE_KEY",
    "STATE_SCHEMA",
    "FallbackStore",
    "MemoryStore",
    "RedisConfig",
    "RedisStore",
    "StateConfig",
    "StateConfigError",
    "StateTelemetry",
    "Store",
    "build_store",
    "redact_url",
]
