"""Money budgets per tenant (or per the value of another header), held fleet-wide in the store.

The policy's ``budgets:`` section (:class:`~extproc.policy._sections.BudgetsConfig`) gives each
budget name a limit per window. Once the engine has decided, the request's cost is worked out
for the chosen backend (:func:`request_cost`: the prompt's estimated tokens at the backend's
input price, plus the output tokens it may produce at its output price) and charged to the
budget with one atomic :meth:`~extproc.state.Store.incr_bucket` in the current window. A charge that takes the
window's total over the limit is given back at once and the request goes to
``when_spent.backend`` (rule ``budget``, not charged) or is answered 429 ``budget_exhausted``.

Charging first and checking the total after is what holds the limit across replicas: each
increment is atomic in the store, so every charge that stays is one that fitted, and the
spend admitted in a window never passes the limit. (Reading the spend first and adding the
cost afterwards would let every replica's concurrent requests through on the same reading.)
A charge that was given back may have turned away a request that raced it near the limit;
it never lets one through. While the store is down (:class:`~extproc.state.FallbackStore`),
each replica holds the budget on its own view of the spend.

A charge that stays is written into the decision's metadata (:func:`charge_metadata`: the
store key, the window, the money, the price), and the rendered usage filter sends it back with
the response, whose ``usage`` corrects the charge (:mod:`extproc.traffic._usage`).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from extproc._contract import BUDGET_CHARGED, BUDGET_KEY, BUDGET_PRICE, BUDGET_WINDOW
from extproc._errors import RequestError
from extproc.engine._decision import Decision
from extproc.engine._engine import PolicyEngine, SignalMemo
from extproc.policy._sections import DEFAULT_LIMIT, BudgetsConfig, Price
from extproc.request._body import RoutingRequest
from extproc.policy._model import Policy
from extproc.state._store import Store, window_index
from extproc.telemetry._instruments import Telemetry
from extproc.traffic._share import ShareController

__all__ = [
    "BUDGET_RULE",
    "BUDGET_EXHAUSTED",
    "MAX_OUTPUT_TOKENS",
    "Budgets",
    "FleetLimits",
    "budget_name",
    "charge_metadata",
    "output_tokens",
    "request_cost",
    "store_key",
]

#: ``rule`` of a decision sent to ``budgets.when_spent.backend`` because its budget was spent.
BUDGET_RULE = "budget"
#: The error code (and the 429 body's ``code``) of a request refused because its budget was spent.
BUDGET_EXHAUSTED = "budget_exhausted"
#: The most output tokens a request is charged for: a larger ``max_tokens`` is charged as this
#: many (no model writes more in one answer; it keeps every cost a finite number).
MAX_OUTPUT_TOKENS = 10_000_000
#: The body fields that bound the output, in the order they are read (the newer name first).
OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens")
#: Budget names kept as they are in store keys; any other is stored by its hash.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
#: A window total this close over the limit is float rounding, not spend.
_ROUNDING = 1e-9


def output_tokens(body: Mapping[str, Any] | None, default: int) -> int:
    """The output tokens a request is charged for: its ``max_completion_tokens`` or
    ``max_tokens`` when that is a whole number >= 0 (capped at :data:`MAX_OUTPUT_TOKENS`), else
    ``default``. A bad value (text, a fraction, negative, ``true``) is the backend's to refuse;
    the budget charges the default for it."""
    for name in OUTPUT_FIELDS:
        value = body.get(name) if body is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return min(value, MAX_OUTPUT_TOKENS)
    return default


def request_cost(price: Price | None, prompt_tokens: int, output: int) -> float:
    """The money a request costs on a backend with ``price`` (per million tokens); 0 without one."""
    if price is None:
        return 0.0
    return (prompt_tokens * price.input_per_mtok + output * price.output_per_mtok) / 1_000_000


def charge_metadata(key: str, window_s: float, index: int, cost: float, price: Price) -> dict[str, str]:
    """The ``switchyard`` metadata of a charge (keys from :mod:`extproc._contract`), which the
    usage filter sends back with the response (:mod:`extproc.traffic._usage` reads it)."""
    return {
        BUDGET_KEY: key,
        BUDGET_WINDOW: f"{window_s!r}:{index}",
        BUDGET_CHARGED: repr(cost),
        BUDGET_PRICE: f"{price.input_per_mtok!r},{price.output_per_mtok!r}",
    }


def _getter(store: Store | Callable[[], Store]) -> Callable[[], Store]:
    """``store`` as a function returning the store to use now."""
    return store if callable(store) else (lambda: store)


def budget_name(config: BudgetsConfig, request: RoutingRequest) -> str:
    """The budget ``request`` spends: its ``budgets.key.header`` value without surrounding
    spaces (``""`` when the header is missing)."""
    value = request.header(config.header) if config.header is not None else None
    return value.strip() if value else ""


def store_key(name: str) -> str:
    """The store key of budget ``name``'s spend: the name itself when it is short and plain,
    else its hash, so a header value never makes an odd or unbounded key."""
    if _PLAIN_NAME.match(name):
        return f"budget:{name}"
    return "budget:#" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Budgets:
    """Charges each decided request to its budget in ``store`` (see the module docstring).

    One per server, shared by every request; it holds no state of its own (the spend is in
    the store), so a reloaded policy applies to the next request.
    """

    def __init__(self, store: Store | Callable[[], Store], telemetry: Telemetry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``store``: the store, or what returns the current one (a reload may swap it).
        ``clock`` (wall-clock seconds, as the store's windows) picks the window a charge goes to
        (charge, give-back and the usage correction all use that one) and dates the 429's reset time."""
        self._store = _getter(store)
        self.telemetry = telemetry or Telemetry()
        self._clock = clock

    async def charge(self, engine: PolicyEngine, request: RoutingRequest, decision: Decision,
                     memo: SignalMemo | None = None) -> Decision:
        """``decision`` once charged to its budget; when the budget cannot take its cost, the
        decision for ``when_spent.backend`` or :class:`RequestError` 429 ``budget_exhausted``."""
        config = engine.policy.budgets
        if config is None:
            return decision
        name = budget_name(config, request)
        limit = config.limit(name)
        if limit is None:
            return decision
        prompt = (memo or SignalMemo(request)).prompt_tokens()
        cost = request_cost(decision.backend.price, prompt, output_tokens(request.body, config.output_tokens))
        if cost <= 0.0:
            return decision
        key, store = store_key(name), self._store()
        if cost <= limit:
            index = window_index(self._clock(), config.window_s)  # the charge and its give-back: one bucket
            total = await store.incr_bucket(key, cost, config.window_s, index)
            if total <= limit + _ROUNDING:
                self.telemetry.budget_spent.add(cost, {"budget": self._label(config, name)})
                return replace(decision, charge=charge_metadata(key, config.window_s, index, cost,
                                                                  decision.backend.price))
            await store.incr_bucket(key, -cost, config.window_s, index)  # give the charge back
        return self._spent(engine, request, decision, memo, config, name, limit)

    def _spent(self, engine: PolicyEngine, request: RoutingRequest, decision: Decision, memo: SignalMemo | None,
               config: BudgetsConfig, name: str, limit: float) -> Decision:
        backend = config.when_spent_backend
        why = None if backend is None else engine.cannot_serve(request, backend, memo)
        if backend is None or why is not None:
            self.telemetry.budget_exhausted.add(1, {"action": "reject"})
            now = self._clock()
            resets = (window_index(now, config.window_s) + 1) * config.window_s  # the window's end
            raise RequestError(self._message(config, name, limit, backend, why, resets), status=429,
                               code=BUDGET_EXHAUSTED, retry_after_s=max(1, math.ceil(resets - now)))
        self.telemetry.budget_exhausted.add(1, {"action": "backend"})
        return engine.rerouted(decision, backend, BUDGET_RULE, request, "budget spent")

    @staticmethod
    def _message(config: BudgetsConfig, name: str, limit: float, backend: str | None, why: str | None,
                 resets: float) -> str:
        whose = f"The budget {name!r}" if name else "The budget of requests without a budget name"
        message = (f"{whose} ({limit:g} per {config.window_s:g} s window) cannot take this request's cost; "
                   f"it starts again at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(resets))}.")
        if backend is not None:
            message += f" Its budget backend `{backend}` cannot serve it: {why}."
        return message

    @staticmethod
    def _label(config: BudgetsConfig, name: str) -> str:
        """The metric label of budget ``name``: the name when the policy lists it, else ``other``
        (header values are not labels: their number has no bound)."""
        return name if name in config.limits and name != DEFAULT_LIMIT else "other"


class FleetLimits:
    """What the servicer calls for ``budgets:`` and ``share:``: the thresholds a request decides
    with, then, once decided, its charge and its count. One per server, over the server's store."""

    def __init__(self, store: Store | Callable[[], Store], telemetry: Telemetry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``store``: the store, or what returns the current one (a reload may swap it).
        ``clock``: the budgets' wall clock (:class:`Budgets`)."""
        self.budgets = Budgets(store, telemetry, clock)
        self.share = ShareController(store, telemetry)

    @staticmethod
    def applies(policy: Policy) -> bool:
        """Whether ``policy`` has budgets or a share target (else nothing here is awaited)."""
        return policy.budgets is not None or policy.share is not None

    def thresholds(self, policy: Policy) -> Mapping[str, float] | None:
        """The score thresholds ``policy``'s next request decides with (``None``: as written)."""
        return self.share.thresholds(policy) if policy.share is not None else None

    async def settle(self, engine: PolicyEngine, request: RoutingRequest, decision: Decision,
                     memo: SignalMemo | None = None) -> Decision:
        """The decision after its budget (:meth:`Budgets.charge`: perhaps another backend, or a
        429 :class:`RequestError`), counted by the share controller."""
        decision = await self.budgets.charge(engine, request, decision, memo)
        await self.share.observe(engine.policy, decision)
        return decision
