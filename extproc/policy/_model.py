"""The typed policy: its rules, their conditions and routes, as :func:`load_policy` returns them.

Built only by :mod:`extproc.policy._loading`; read by the engine, the Envoy renderer and the
server. Frozen: a policy is replaced whole on reload, never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from extproc._schema import Path, nearest_mark
from extproc.policy._sections import (
    Backend,
    BudgetsConfig,
    CaptureConfig,
    ModelsConfig,
    RoutingConfig,
    SessionsConfig,
    ShareConfig,
    TenantsConfig,
)
from extproc.scorers._interface import ScorerSpec
from extproc.state import StateConfig
from extproc.signals._kinds import Signal

__all__ = [
    "Rule",
    "Condition",
    "SignalRef",
    "AllOf",
    "AnyOf",
    "Not",
    "Always",
    "ALWAYS",
    "UtilityRoute",
    "Policy",
]


@dataclass(frozen=True)
class SignalRef:
    name: str


@dataclass(frozen=True)
class AllOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    item: Condition


@dataclass(frozen=True)
class Always:
    """The condition of a rule without ``when`` (or ``when: always``): it always holds."""


#: ``when: always``: the reserved name of the condition that always holds (no signal may take it).
ALWAYS = "always"

Condition = Union[SignalRef, AllOf, AnyOf, Not, Always]


@dataclass(frozen=True)
class UtilityRoute:
    """A rule's ``route``: the backend among ``among`` with the best predicted quality − λ·cost."""

    scorer: str
    lam: float
    among: tuple[str, ...]
    backends: tuple[tuple[str, str], ...] = ()  # the scorer's pool model -> backend


@dataclass(frozen=True)
class Rule:
    """``backend`` for a fixed route, or ``route`` to pick by utility (exactly one is set)."""

    name: str
    when: Condition
    backend: str | None
    route: UtilityRoute | None = None
    #: ``breaks_session``: when it holds, a pinned session's request goes by this rule and is re-pinned.
    breaks_session: bool = False
    #: Failover backends for this rule's requests, replacing its backend's ``fallbacks``; ``None``: the backend's.
    fallbacks: tuple[str, ...] | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """The backends this rule can send a request to."""
        return self.route.among if self.route is not None else (self.backend,)


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build it with :func:`load_policy` or :func:`parse_policy`."""

    source: str
    backends: dict[str, Backend]
    default: str
    signals: dict[str, Signal]
    rules: tuple[Rule, ...]
    models: ModelsConfig
    tenants: TenantsConfig
    routing: RoutingConfig
    fallback: str | None = None
    scorers: dict[str, ScorerSpec] = field(default_factory=dict)
    #: Where each value of the file sits (line, column) by its path (``("scorers", "probe")``),
    #: for problems found after validation (a scorer that fails to load): see :meth:`position`.
    positions: dict[Path, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    #: ``budgets:``; ``None``: no money budgets.
    budgets: BudgetsConfig | None = None
    #: ``share:``; ``None``: no large-share controller.
    share: ShareConfig | None = None
    #: ``sessions:``; ``None``: no conversation stickiness.
    sessions: SessionsConfig | None = None
    #: ``state:``: where fleet state (session pins, budgets, the share) lives.
    state: StateConfig = field(default_factory=StateConfig)

    def position(self, path: Path) -> tuple[int, int]:
        """Where the value at ``path`` sits in :attr:`source` (line, column), or the nearest
        enclosing value that does; ``(1, 1)`` for a policy built without positions."""
        return nearest_mark(self.positions, path)

    def backend_for_model(self, model: str) -> Backend | None:
        """The backend whose served model (or name) is ``model``, if any."""
        for backend in self.backends.values():
            if backend.model == model:
                return backend
        return self.backends.get(model)
