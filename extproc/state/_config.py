"""The policy's ``state:`` section: where fleet state lives, declared once, and the store it builds.

::

    state:
      redis:
        url: redis://redis.switchyard.svc:6379/0   # redis://, rediss:// (TLS) or unix://
        timeout_ms: 50                             # each store call; then the in-process answer
        key_prefix: "switchyard:"                  # prepended to every key
        password_env: REDIS_PASSWORD               # optional: the password from this variable

Without ``state.redis`` fleet state lives in process (:class:`~extproc.state.MemoryStore`);
with it, in that server behind a :class:`~extproc.state.FallbackStore`. :data:`STATE_KEY` is
the section's declaration for the policy schema (keys, types, defaults, documentation);
:meth:`StateConfig.from_mapping` builds the typed config from the validated section and
checks what a schema cannot (the URL).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc._contract import MESSAGE_TIMEOUT_MS
from extproc._schema import REQUIRED, Key, Num, Obj, Str
from extproc.state._errors import StateConfigError
from extproc.state._fallback import DEFAULT_TIMEOUT_MS, FallbackStore
from extproc.state._memory import MemoryStore
from extproc.state._redis import RedisStore
from extproc.state._store import Store
from extproc.state._url import redact_url, url_problem

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "MAX_TIMEOUT_MS",
    "RedisConfig",
    "StateConfig",
    "STATE_SCHEMA",
    "STATE_KEY",
    "build_store",
]

#: Prepended to every key switchyard writes, so it can share a database with other users.
DEFAULT_KEY_PREFIX = "switchyard:"
#: The longest ``state.redis.timeout_ms``: a request may await a few store calls (a session
#: pin, a budget, the share) inside Envoy's ``message_timeout``, with its scorers.
MAX_TIMEOUT_MS = MESSAGE_TIMEOUT_MS // 4
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Report = Callable[[tuple[str, ...], str], None]


@dataclass(frozen=True)
class RedisConfig:
    """``state.redis``: the Redis or Valkey server every replica shares. ``repr`` hides the password."""

    url: str = field(repr=False)
    timeout_ms: float = DEFAULT_TIMEOUT_MS
    key_prefix: str = DEFAULT_KEY_PREFIX
    password_env: str | None = None

    def __repr__(self) -> str:
        return (f"RedisConfig(url={redact_url(self.url)!r}, timeout_ms={self.timeout_ms}, "
                f"key_prefix={self.key_prefix!r}, password_env={self.password_env!r})")

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000.0


@dataclass(frozen=True)
class StateConfig:
    """The policy's ``state:`` section; ``redis=None`` (the default): fleet state in process."""

    redis: RedisConfig | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, source: str = "policy",
                     report: Report | None = None) -> StateConfig:
        """The config of a ``state:`` section (``None``: not set).

        Each problem is a sentence naming the key, the bad value (a URL with its password
        redacted) and ``source``. With ``report(path, message)`` every problem is reported
        (``path`` like ``("state", "redis", "url")``, for the policy loader to locate as
        ``file:line:column``) and a `redis` entry with a problem is left out; without it the
        problems are raised together as one :class:`StateConfigError`.
        """
        problems: list[str] = []

        def problem(path: tuple[str, ...], message: str) -> None:
            if report is not None:
                report(path, message)
            else:
                problems.append(f"{source}: {message}")

        config = _state(data, problem)
        if problems:
            raise StateConfigError("\n".join(problems))
        return config


def _state(data: Any, problem: Report) -> StateConfig:
    if data is None:
        return StateConfig()
    if not isinstance(data, Mapping):
        problem(("state",), f"`state` must be a mapping, got {_shown(data)}.")
        return StateConfig()
    _unknown(data, STATE_SCHEMA, ("state",), lambda key, message: problem(("state", key), message))
    redis = data.get("redis")
    if redis is None:
        return StateConfig()
    if not isinstance(redis, Mapping):
        problem(("state", "redis"), f"`state.redis` must be a mapping, got {_shown(redis)}.")
        return StateConfig()
    return StateConfig(redis=_redis(redis, problem))


def _redis(data: Mapping[str, Any], problem: Report) -> RedisConfig | None:
    """``state.redis``, or ``None`` when any of its keys has a problem (each one reported)."""
    path = ("state", "redis")
    reported: list[str] = []

    def bad(key: str, message: str) -> None:
        reported.append(key)
        problem(path + (key,), message)

    _unknown(data, REDIS_SCHEMA, path, bad)
    url = data.get("url")
    if url is None:
        bad("url", "`state.redis.url` is required (redis://host:6379/0).")
    elif not isinstance(url, str):
        bad("url", f"`state.redis.url` must be a string, got {_shown(url)}.")
    elif (wrong := url_problem(url)) is not None:
        bad("url", f"`state.redis.url` {wrong}; got {redact_url(url)!r}.")
    timeout_ms = data.get("timeout_ms", DEFAULT_TIMEOUT_MS)
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) \
            or not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
        bad("timeout_ms",
            f"`state.redis.timeout_ms` must be a number from 1 to {MAX_TIMEOUT_MS}, got {_shown(timeout_ms)}.")
    key_prefix = data.get("key_prefix", DEFAULT_KEY_PREFIX)
    if not isinstance(key_prefix, str):
        bad("key_prefix", f"`state.redis.key_prefix` must be a string, got {_shown(key_prefix)}.")
    password_env = data.get("password_env")
    if password_env is not None and (not isinstance(password_env, str) or not _ENV_NAME.match(password_env)):
        bad("password_env",
            f"`state.redis.password_env` must name an environment variable, got {_shown(password_env)}.")
    if reported:
        return None
    return RedisConfig(url, float(timeout_ms), key_prefix, password_env)


def _unknown(data: Mapping[str, Any], schema: Obj, path: tuple[str, ...], problem: Callable[..., None]) -> None:
    """Report each key of ``data`` that ``schema`` does not declare (``problem(key, message)``)."""
    for key in data:
        if key not in schema.keys:
            where = ".".join(path)
            problem(str(key), f"Unknown key `{key}` in `{where}`; known keys: {', '.join(schema.keys)}.")


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)


def build_store(config: StateConfig, *, on_fallback: Callable[[str, str], None] | None = None,
                environ: Mapping[str, str] | None = None) -> Store:
    """The store ``config`` names: in process, or its Redis behind a :class:`FallbackStore`
    (``on_fallback`` counts its in-process answers, e.g. ``StateTelemetry().fallback``).

    Connects to nothing yet: the first call does. Raises :class:`StateConfigError` when
    ``password_env`` names a variable that is not set (``environ``: ``os.environ``) or redis-py
    is missing.
    """
    redis = config.redis
    if redis is None:
        return MemoryStore()
    password = None
    if redis.password_env is not None:
        environ = os.environ if environ is None else environ
        password = environ.get(redis.password_env)
        if password is None:
            raise StateConfigError(
                f"`state.redis.password_env` names {redis.password_env!r}, which is not set in switchyard's "
                "environment.")
    remote = RedisStore(redis.url, redis.timeout_s, key_prefix=redis.key_prefix, password=password)
    return FallbackStore(remote, MemoryStore(), timeout_s=redis.timeout_s, on_fallback=on_fallback)


REDIS_SCHEMA = Obj(
    title="state.redis",
    keys={
        "url": Key(
            Str(min_length=1),
            "The Redis or Valkey server every replica shares: `redis://host:6379/0`, `rediss://` for TLS, "
            "`unix:///path.sock`. It may carry a user and password (`redis://user:pass@host:6379/0`); "
            "logs and errors show it with the password replaced by `***`. Prefer `password_env`.",
            REQUIRED,
        ),
        "timeout_ms": Key(
            Num(minimum=1, maximum=MAX_TIMEOUT_MS),
            "Longest wait for one store call (milliseconds). A call that takes longer, or fails, is answered "
            "in process (this replica's own view) and counted in `switchyard_state_fallbacks_total`; after a "
            "failure the server is left alone for a second, then tried again.",
            DEFAULT_TIMEOUT_MS,
        ),
        "key_prefix": Key(
            Str(),
            "Prepended to every key switchyard writes, so deployments can share a database.",
            DEFAULT_KEY_PREFIX,
        ),
        "password_env": Key(
            Str(min_length=1),
            "Name of an environment variable holding the server's password (e.g. from a Kubernetes "
            "Secret); it overrides a password in `url`. Not set: the URL's, if any.",
            None,
        ),
    },
)

STATE_SCHEMA = Obj(
    title="state",
    keys={
        "redis": Key(
            REDIS_SCHEMA,
            "Keep fleet state (session pins, budgets, the large-share controller) in this Redis or Valkey "
            "server, so every replica agrees. Not set: each replica keeps its own, in process.",
            None,
        ),
    },
)

#: The ``state:`` section's declaration for the policy schema: ``"state": STATE_KEY``.
STATE_KEY = Key.section(
    STATE_SCHEMA,
    "Where fleet state lives: in process (the default) or in a Redis or Valkey server shared by every "
    "replica. A store that is slow or down never fails a request.",
)
