"""``Decision``: everything one routing decision carries.

The same object feeds the Envoy mutations, the response headers, the dynamic metadata,
the metrics and ``switchyard policy explain``, so they can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extproc.policy._sections import Backend
from extproc.scorers._interface import Scores
from extproc.signals._kinds import SignalResult

__all__ = ["Decision", "DIRECT_RULE", "DEFAULT_RULE", "FALLBACK_RULE", "SESSION_RULE"]

#: ``rule`` of a decision made because the request named a backend's model.
DIRECT_RULE = "direct"
#: ``rule`` of a decision where no rule matched.
DEFAULT_RULE = "default"
#: ``rule`` of a decision made because a scorer a rule needed failed (``Decision.fallback`` says why).
FALLBACK_RULE = "fallback"
#: ``rule`` of a decision that followed the session's pin (``sessions:``), without running scorers.
SESSION_RULE = "session"


@dataclass
class Decision:
    """The chosen backend and why.

    ``signals`` holds every signal that was evaluated, in evaluation order; signals no
    rule reached are absent. ``skipped`` lists rules that matched or were passed over
    because their backend was not eligible for this request, with the reason.
    """

    backend: Backend
    rule: str
    requested_model: str | None = None
    rewrite_model: bool = False
    tenant: str | None = None
    signals: dict[str, SignalResult] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    scores: dict[str, Scores] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    utilities: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None
    #: scorer -> its circuit breaker's state after this request asked it (``closed``,
    #: ``open``, ``half_open``); only scorers the decision asked for.
    breakers: dict[str, str] = field(default_factory=dict)
    #: With ``sessions:``: ``pinned`` (the pin decided), ``new`` (decided and pinned), ``moved``
    #: (the pin broke, ``session_break`` says why, and the session was pinned again); ``None``: no session.
    session: str | None = None
    session_break: str | None = None
    #: With ``budgets:``: the charge of this request (metadata key -> value, keys from
    #: :mod:`extproc._contract`), added to :meth:`metadata` so the usage filter can correct it.
    charge: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.backend.model

    def metadata(self) -> dict[str, str]:
        """The Envoy dynamic metadata (namespace ``switchyard``) for access logs: the route,
        and when learned scores took part, the scores that decided it (``scores``, e.g.
        ``probe.relope=0.8123``), the utilities and any fallback."""
        out = {
            "backend": self.backend.name,
            "cluster": self.backend.cluster,
            "model": self.backend.model,
            "rule": self.rule,
            "requested_model": self.requested_model or "",
        }
        if self.scores:
            out["scores"] = ",".join(
                f"{scorer}.{output}={value:.4f}"
                for scorer, scores in self.scores.items() for output, value in scores.values.items()
            )
        if self.utilities:
            out["utilities"] = ",".join(f"{name}={value:.4f}" for name, value in self.utilities.items())
        if self.fallback:
            out["fallback"] = self.fallback
        if self.session:
            out["session"] = self.session
            if self.session_break:
                out["session_break"] = self.session_break
        out.update(self.charge)
        return out

    def explain(self) -> dict[str, Any]:
        """The decision as a JSON-ready object (``switchyard policy explain``)."""
        return {
            "backend": self.backend.name,
            "cluster": self.backend.cluster,
            "model": self.backend.model,
            "rule": self.rule,
            "requested_model": self.requested_model,
            "model_rewritten": self.rewrite_model,
            "tenant": self.tenant,
            "signals": {
                name: {"matched": result.matched, "value": result.value} for name, result in self.signals.items()
            },
            "skipped_rules": [{"rule": rule, "reason": reason} for rule, reason in self.skipped],
            "scores": {
                scorer: {"values": dict(scores.values), "costs": dict(scores.costs), "batch_size": scores.batch_size,
                         "latency_ms": round(self.latency_ms.get(scorer, 0.0), 3)}
                for scorer, scores in self.scores.items()
            },
            "utilities": self.utilities,
            "fallback": self.fallback,
            "breakers": self.breakers,
        } | ({"session": self.session, "session_break": self.session_break} if self.session else {})
