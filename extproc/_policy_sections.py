"""The policy's backends and its optional sections as typed values, with their defaults.

Declared below the schema (``_policy_schema`` takes each key's default from these classes)
and re-exported by ``_policy``, which builds them from a validated file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Backend", "ModelsConfig", "RoutingConfig", "TenantsConfig"]


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
