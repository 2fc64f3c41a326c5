"""The policy's backends and its optional sections as typed values, with their defaults.

Declared below the schema (``extproc.policy._schema`` takes each key's default from these classes)
and built by ``extproc.policy._loading`` from a validated file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Backend",
    "BudgetsConfig",
    "CaptureConfig",
    "DEFAULT_LIMIT",
    "ModelsConfig",
    "Price",
    "RoutingConfig",
    "SESSION_KEYS",
    "SessionsConfig",
    "ShareConfig",
    "TenantsConfig",
]


@dataclass(frozen=True)
class Price:
    """``backends.<name>.price``: what the backend charges, in currency units per million tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


@dataclass(frozen=True)
class Backend:
    name: str
    cluster: str
    model: str
    cost: float = 1.0
    supports_images: bool = True
    max_context_tokens: int | None = None
    #: Money per token, for ``budgets:``; ``None``: requests routed here cost nothing.
    price: Price | None = None
    #: Backends Envoy retries a failed attempt on, in order (``extproc.traffic._failover``).
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelsConfig:
    routed: frozenset[str] = frozenset({"auto"})
    direct: bool = True
    unknown: str = "route"


@dataclass(frozen=True)
class TenantsConfig:
    header: str = "x-tenant-id"
    allow: dict[str, tuple[str, ...]] = field(default_factory=dict)
    otherwise: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RoutingConfig:
    paths: frozenset[str] = frozenset({"/v1/chat/completions"})
    max_body_bytes: int = 1 << 20
    rewrite_model: bool = True


@dataclass(frozen=True)
class CaptureConfig:
    """The policy's ``capture:`` section; these defaults are the schema's."""

    #: The JSONL file (relative paths: to the policy file); ``None``: capture is off.
    path: str | None = None
    #: Share of requests captured, 0..1.
    sample_rate: float = 1.0
    #: Tenants (``tenants.header`` values) whose requests are never captured.
    exclude_tenants: frozenset[str] = frozenset()
    #: Largest size of the file in bytes; it is rotated before a write would pass it.
    max_bytes: int = 100 * 1024 * 1024
    #: Rotated files kept (``<path>.1`` … ``<path>.<keep>``); 0: the full file is deleted.
    keep: int = 1
    #: Samples waiting for the writer thread; more are dropped (and counted).
    queue: int = 1024

    @property
    def enabled(self) -> bool:
        return self.path is not None and self.sample_rate > 0


#: The key of ``budgets.limits`` that sets the limit of every key not listed.
DEFAULT_LIMIT = "default"


@dataclass(frozen=True)
class BudgetsConfig:
    """The policy's ``budgets:`` section (``None`` on :class:`Policy`: no budgets); these defaults
    are the schema's."""

    #: The request header whose value names the budget; ``None``: ``tenants.header``.
    header: str | None = None
    #: Length of a budget window in seconds; windows are aligned to the epoch (UTC days for 86400).
    window_s: float = 86400.0
    #: Budget key -> money per window; ``default`` is every other key's (absent: unlisted keys
    #: have no budget).
    limits: dict[str, float] = field(default_factory=dict)
    #: The output tokens a request without ``max_tokens`` / ``max_completion_tokens`` is charged for.
    output_tokens: int = 256
    #: Where a request goes once its budget is spent; ``None``: it is answered 429 ``budget_exhausted``.
    when_spent_backend: str | None = None

    def limit(self, key: str) -> float | None:
        """The limit of budget ``key``, or ``None`` when it has none."""
        return self.limits.get(key, self.limits.get(DEFAULT_LIMIT))



@dataclass(frozen=True)
class ShareConfig:
    """The policy's ``share:`` section: hold the share of requests on ``large`` backends near
    ``target`` by moving score signal ``signal``'s threshold within ``[min_threshold, max_threshold]``."""

    signal: str
    target: float
    large: tuple[str, ...]
    min_threshold: float
    max_threshold: float
    #: Sliding window (seconds) over which the share is observed.
    window_s: float = 600.0
    #: Threshold change per unit of share error at each update (threshold units).
    gain: float = 0.02
    #: Seconds between two updates of the threshold, fleet-wide.
    update_s: float = 10.0
    #: Requests the window must hold before the threshold moves.
    min_requests: int = 50


#: What ``sessions.key`` may name: the ``sessions.header`` request header, the OpenAI ``user``
#: body field, or a hash of the conversation's start (tenant, system prompt, first user message).
SESSION_KEYS = ("conversation", "header", "user")


@dataclass(frozen=True)
class SessionsConfig:
    """The policy's ``sessions:`` section (``None`` on :class:`Policy`: no stickiness); these
    defaults are the schema's."""

    #: Where a request's session key comes from: one of :data:`SESSION_KEYS`.
    key: str = "conversation"
    #: The request header holding the session id when ``key`` is ``header`` (lower case).
    header: str = "x-session-id"
    #: Seconds a pin lives after its session's last request.
    ttl_s: float = 1800.0
