"""The policy's backends and its optional sections as typed values, with their defaults.

Declared below the schema (``extproc.policy._schema`` takes each key's default from these classes)
and built by ``extproc.policy._loading`` from a validated file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Backend", "CaptureConfig", "ModelsConfig", "RoutingConfig", "TenantsConfig"]


@dataclass(frozen=True)
class Backend:
    name: str
    cluster: str
    model: str
    cost: float = 1.0
    supports_images: bool = True
    max_context_tokens: int | None = None


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
