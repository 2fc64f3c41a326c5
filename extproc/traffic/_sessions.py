"""Conversation stickiness (the policy's ``sessions:``): a session's later turns go where its
first routed turn went, without running scorers.

A request's session key (:func:`session_key`) comes from ``sessions.key``: the
``sessions.header`` header, the OpenAI ``user`` body field, or by default a hash of the
tenant, the system prompt and the first user message (every turn of one chat repeats them).
The key is always a hash scoped by the tenant, so its length is bounded and two tenants never
share a session. A request without a key, one naming a backend's model directly, and every
request of a policy without ``sessions:`` never reach this module: the servicer decides them
synchronously, exactly as before.

One request of a session (:meth:`Sessions.decide`)::

    pin = store.get(key)
    pinned and the backend can serve it (tenant, images, context, health)
        └─ a `breaks_session` rule holds ─► that rule decides; pinned again     (session: moved, rule)
        └─ otherwise ─► the pinned backend, rule `session`, no scorers          (session: pinned)
    pinned but the backend cannot serve it ─► decided as usual; pinned again    (session: moved, reason)
    not pinned ─► decided as usual; set_if_absent(key) — the first writer wins:
        └─ this replica won ─► as decided                                       (session: new)
        └─ another replica pinned first ─► its backend, as a pin               (session: pinned)

A pin is the backend's name and the wall-clock second it was written, for ``ttl_s`` seconds;
a hit rewrites it once a quarter of ``ttl_s`` has passed, so a pin lives ``ttl_s`` after its
session's last request, at one store write per quarter TTL. A decision that took a scorer's
fallback is not pinned (the next turn is decided again). The store never fails a request: a
slow or down store answers in process (:class:`~extproc.state.FallbackStore`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from extproc.engine._decision import Decision
from extproc.engine._engine import PolicyEngine, SignalMemo
from extproc.policy._sections import SessionsConfig
from extproc.request._body import RoutingRequest
from extproc.scoring._decide import decide_with_scores
from extproc.state import Store
from extproc.telemetry._instruments import Telemetry

__all__ = ["Sessions", "session_key", "KEY_PREFIX", "REFRESH_SHARE"]

#: Every session pin's store key starts so (after the store's own ``key_prefix``).
KEY_PREFIX = "session:"
#: A hit rewrites its pin (renewing the TTL) once this share of ``ttl_s`` has passed since it was written.
REFRESH_SHARE = 0.25
#: Roles whose first message is the conversation's system prompt.
_SYSTEM_ROLES = ("system", "developer")


def session_key(config: SessionsConfig, request: RoutingRequest, tenant: str | None) -> str | None:
    """The store key of ``request``'s session, or ``None`` when it has none (a missing or blank
    header / ``user`` field, a conversation without a user message). A hash of the tenant and the
    key's material, so its length is fixed whatever the input (odd Unicode included)."""
    if config.key == "header":
        material: Any = request.header(config.header)
    elif config.key == "user":
        material = request.body.get("user") if request.body else None
    else:
        material = _conversation_start(request.messages)
    if not isinstance(material, str) or not material.strip():  # missing, blank, or not a string
        return None
    material = material.strip()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{config.key}\0{(tenant or '').strip()}\0".encode("utf-8", "surrogatepass"))
    digest.update(material.encode("utf-8", "surrogatepass"))
    return KEY_PREFIX + digest.hexdigest()


def _conversation_start(messages: list[Any]) -> str | None:
    """The system prompt and the first user message's content as one JSON text (escaped to ASCII,
    so lone surrogates hash too), or ``None`` without a user message."""
    system = user = None
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = message.get("role")
        if system is None and user is None and role in _SYSTEM_ROLES:
            system = message.get("content")
        elif role == "user":
            user = message.get("content")
            break
    if user is None:
        return None
    return json.dumps([system, user], ensure_ascii=True, sort_keys=True, separators=(",", ":"), default=str)


def _pin_value(backend: str, now: float) -> str:
    return f"{backend}@{int(now)}"


def _read_pin(value: str | None) -> tuple[str, float] | None:
    """``(backend, written at)`` of a stored pin; a value without a time reads as written long ago."""
    if not value:
        return None
    backend, sep, written = value.rpartition("@")
    if not sep or not written.isdigit():
        return value, 0.0
    return backend, float(written)


class Sessions:
    """Sessions for the servicer: which requests have one (:meth:`key`), and their decisions
    (:meth:`decide`).

    ``store``: the fleet-state store to use now (called per request: a reload may swap it).
    ``unhealthy``: the backends known to be down right now (a pin on one breaks, reason
    ``unhealthy``); default none. ``clock``: wall-clock seconds (pins are shared by replicas).
    """

    def __init__(self, store: Callable[[], Store], telemetry: Telemetry, *,
                 unhealthy: Callable[[], Collection[str]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._telemetry = telemetry
        self._unhealthy = unhealthy or (lambda: ())
        self._clock = clock

    def key(self, engine: PolicyEngine, request: RoutingRequest) -> str | None:
        """``request``'s session key under ``engine``'s policy, or ``None``: no ``sessions:``,
        no key, or a request the rules do not decide (a backend's model named directly)."""
        config = engine.policy.sessions
        if config is None or not engine.routes_by_rules(request):
            return None
        return session_key(config, request, request.header(engine.policy.tenants.header))

    async def decide(self, engine: PolicyEngine, request: RoutingRequest, key: str, *, memo: SignalMemo,
                     arrival: float, span=None) -> Decision:
        """The decision for a request of session ``key`` (module docstring); raises
        :class:`RequestError` as :meth:`PolicyEngine.decide` does."""
        store, ttl_s = self._store(), engine.policy.sessions.ttl_s
        pin = _read_pin(await store.get(key))
        if pin is None:
            decision = await decide_with_scores(engine, request, arrival=arrival, memo=memo,
                                                telemetry=self._telemetry, span=span)
            if decision.fallback:  # a scorer failed: not a decision to hold the session to
                return decision
            pin = _read_pin(await store.set_if_absent(key, _pin_value(decision.backend.name, self._clock()), ttl_s))
            if pin is None or pin[0] == decision.backend.name:
                self._telemetry.session_pins.add(1, {"result": "new"})
                decision.session = "new"
                return decision
            # another replica pinned this session first: follow its pin
        return await self._follow(engine, request, key, pin, memo=memo, arrival=arrival, span=span, store=store,
                                  ttl_s=ttl_s)

    async def _follow(self, engine: PolicyEngine, request: RoutingRequest, key: str, pin: tuple[str, float], *,
                      memo: SignalMemo, arrival: float, span, store: Store, ttl_s: float) -> Decision:
        backend, written = pin
        decision, broke = engine.decide_pinned(request, backend, memo, self._unhealthy())
        now = self._clock()
        if broke is None:
            self._telemetry.session_hits.add(1)
            if now - written >= ttl_s * REFRESH_SHARE:
                await store.set(key, _pin_value(backend, now), ttl_s)
            decision.session = "pinned"
            return decision
        self._telemetry.session_breaks.add(1, {"reason": broke})
        if decision is None:
            decision = await decide_with_scores(engine, request, arrival=arrival, memo=memo,
                                                telemetry=self._telemetry, span=span)
        if not decision.fallback:
            await store.set(key, _pin_value(decision.backend.name, now), ttl_s)
            self._telemetry.session_pins.add(1, {"result": "moved"})
        decision.session, decision.session_break = "moved", broke
        return decision
