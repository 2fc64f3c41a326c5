"""Failover: the ordered backends Envoy tries for one request (``backends.<name>.fallbacks``).

The engine decides the first backend; this module adds the rest of the chain: the decision's
rule's ``fallbacks`` when it names them, else the chosen backend's, keeping only backends this
request and tenant may use (:meth:`~extproc.engine._engine.PolicyEngine.cannot_serve`, the
checks rules skip backends by) and one backend per Envoy cluster (an attempt is a cluster).

Envoy does the retrying (the routes ``switchyard envoy render`` writes): the body answer
carries the chain as ``priority_group`` metadata, caps the attempts with
``x-envoy-max-retries``, and sends ``model`` as :data:`~extproc._contract.MODEL_SLOT`, which each
cluster's upstream Lua filter replaces with its attempt's model from ``attempt_models``. A
client body that already holds the slot's JSON text could be mistaken for it: such a request
gets no failover (:data:`SLOT_IN_BODY`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from extproc._contract import MODEL_SLOT
from extproc.engine._decision import Decision
from extproc.engine._engine import PolicyEngine, SignalMemo
from extproc.policy._model import Policy
from extproc.policy._sections import Backend
from extproc.request._body import RoutingRequest
from extproc.telemetry._instruments import Telemetry

__all__ = ["Failover", "SLOT_IN_BODY", "SLOT_JSON", "chain_names", "failover_for", "has_failover", "record_failover"]

#: The slot's JSON text, as it stands in the body switchyard sends (and the Lua filters look for).
SLOT_JSON = json.dumps(MODEL_SLOT).encode()
#: What a client body holding the slot's text is checked by (inside a JSON string, quotes aside).
_SLOT_MARK = SLOT_JSON[1:-1]
#: ``Failover.refused``: the client's body holds the slot's text, so the request goes without failover.
SLOT_IN_BODY = "slot_in_body"

#: Policies seen, by id: (the policy, rule name -> its ``fallbacks``, whether any failover exists).
_PLANS: dict[int, tuple[Policy, dict[str, tuple[str, ...]], bool]] = {}


@dataclass(frozen=True)
class Failover:
    """One request's attempts: ``chain[0]`` is the decision's backend. ``refused``: why a request
    that had fallbacks goes without them (:data:`SLOT_IN_BODY`); ``None`` otherwise."""

    chain: tuple[Backend, ...]
    refused: str | None = None

    @property
    def retries(self) -> int:
        return len(self.chain) - 1


def _plan(policy: Policy) -> tuple[dict[str, tuple[str, ...]], bool]:
    seen = _PLANS.get(id(policy))
    if seen is None or seen[0] is not policy:
        rules = {rule.name: rule.fallbacks for rule in policy.rules if rule.fallbacks is not None}
        any_failover = bool(rules) or any(backend.fallbacks for backend in policy.backends.values())
        if len(_PLANS) >= 8:  # policies change only on reload
            _PLANS.clear()
        seen = _PLANS[id(policy)] = (policy, rules, any_failover)
    return seen[1], seen[2]


def has_failover(policy: Policy) -> bool:
    """Whether any backend or rule of ``policy`` names ``fallbacks`` (else every answer is as without failover)."""
    return _plan(policy)[1]


def chain_names(policy: Policy, decision: Decision) -> tuple[str, ...]:
    """The fallbacks that apply to ``decision``, before the per-request checks: its rule's, else its backend's."""
    rules, _ = _plan(policy)
    return rules.get(decision.rule, decision.backend.fallbacks)


def failover_for(engine: PolicyEngine, request: RoutingRequest, decision: Decision, raw: bytes,
                 memo: SignalMemo | None = None) -> Failover | None:
    """The attempts for ``decision``; ``None`` when the policy has no failover at all (the answer is
    then exactly as without this feature)."""
    policy = engine.policy
    if not has_failover(policy):
        return None
    first = decision.backend
    names = chain_names(policy, decision)
    if not names:
        return Failover((first,))
    clusters = {first.cluster}
    chain = [first]
    for name in names:
        backend = policy.backends[name]
        if backend.cluster in clusters or engine.cannot_serve(request, name, memo) is not None:
            continue
        clusters.add(backend.cluster)
        chain.append(backend)
    if len(chain) > 1 and _SLOT_MARK in raw:
        return Failover((first,), refused=SLOT_IN_BODY)
    return Failover(tuple(chain))


def record_failover(telemetry: Telemetry, decision: Decision, failover: Failover) -> None:
    """Count one routed request of a policy with failover (and why it went without, if it did)."""
    telemetry.failover_chains.add(1, {"backend": decision.backend.name, "attempts": len(failover.chain)})
    if failover.refused is not None:
        telemetry.failover_refused.add(1, {"reason": failover.refused})
