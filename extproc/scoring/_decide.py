"""Deciding a request that may need learned scores: the loop around the pure engine.

:func:`decide_with_scores` asks the engine to decide with the scores gathered so far; when
the engine answers :class:`ScoresNeeded`, it awaits that scorer (within the scorer's
deadline, counted from the request's arrival) and asks again. A scorer that misses its
deadline, is overloaded, raises, returns a non-finite number or cannot be reached is recorded
as a :class:`ScorerFailure`, and the engine then takes the fallback, never a 5xx. A scorer
whose circuit breaker is open (:mod:`extproc.scoring._breaker`) is not called: the request takes the
fallback at once. The servicer and ``switchyard policy explain`` both decide through here,
so they agree.

Failure reasons: ``deadline`` (no answer in time, whoever noticed first: this loop, the
gRPC deadline or the batcher), ``overload`` (:class:`ScorerOverloaded`: refused at once),
``breaker_open``, ``error`` (any other failure), ``non_finite``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from extproc.scoring._breaker import BREAKERS, COUNTED_REASONS, Admission, Breakers
from extproc.engine._decision import Decision
from extproc.engine._engine import PolicyEngine, SignalMemo
from extproc._errors import ScorerDeadline, ScorerError, ScorerOverloaded
from extproc.request._body import RoutingRequest
from extproc.scorers._interface import Scorer, ScorerFailure, Scores, ScoresNeeded
from extproc.telemetry._instruments import Telemetry, scorer_span

__all__ = ["decide_with_scores", "score_request", "score_within"]

log = logging.getLogger("switchyard.scoring")


@functools.cache
def _plain_telemetry() -> Telemetry:
    """What records the scorer calls of callers that pass no :class:`Telemetry` (``policy
    explain``): metrics into the global providers (no-ops without an SDK), and the warnings."""
    return Telemetry()


async def score_request(
    engine: PolicyEngine, name: str, request: RoutingRequest, arrival: float,
    telemetry: Telemetry | None = None, span=None, available: tuple[str, ...] | None = None,
    breakers: Breakers = BREAKERS,
) -> tuple[Scores | ScorerFailure, float]:
    """Scorer ``name``'s scores for ``request`` (or why there are none), and the ms it took,
    through the scorer's breaker in ``breakers``. The call is recorded in ``telemetry``
    (metrics, the failure warning, and a child span of ``span``)."""
    telemetry = telemetry or _plain_telemetry()
    with scorer_span(telemetry, span, name) as child:
        outcome, latency_ms = await _score(engine, name, request, arrival, available, breakers)
        if child is not None:
            child.set_attribute("switchyard.scorer.result", getattr(outcome, "reason", "ok"))
    telemetry.record_score(name, outcome, latency_ms)
    return outcome, latency_ms


async def _score(
    engine: PolicyEngine, name: str, request: RoutingRequest, arrival: float, available: tuple[str, ...] | None,
    breakers: Breakers,
) -> tuple[Scores | ScorerFailure, float]:
    started = time.monotonic()
    spec = engine.policy.scorers[name]
    scorer = engine.scorers.get(name)
    deadline = arrival + spec.deadline_ms / 1000.0
    outcome: Scores | ScorerFailure
    if scorer is None:
        outcome = ScorerFailure("error", f"scorer {name!r} is not loaded")
    elif deadline <= started:  # the request came late: no fault of the scorer's, so no breaker count
        outcome = ScorerFailure("deadline", f"the {spec.deadline_ms:g} ms deadline passed before scoring began")
    else:
        breaker = breakers.of(scorer)
        admission = breaker.admit(spec.breaker)
        if admission is Admission.REFUSED:
            outcome = ScorerFailure("breaker_open", f"the circuit breaker of scorer {name!r} is open, as the "
                                    f"scorer kept failing; one request tries it again after the "
                                    f"{spec.breaker.cool_off_ms:g} ms cool-off")
        else:
            since = breaker.now()
            try:
                outcome = await score_within(scorer, request, deadline, available)
            except BaseException:  # cancelled with its request: neither a success nor a failure
                breaker.abandon(admission)
                raise
            failed = isinstance(outcome, ScorerFailure) and outcome.reason in COUNTED_REASONS
            breaker.record(admission, spec.breaker, failed, since)
    return outcome, (time.monotonic() - started) * 1000.0


async def score_within(scorer: Scorer, request: RoutingRequest, deadline: float,
                       available: tuple[str, ...] | None = None) -> Scores | ScorerFailure:
    """One call of ``scorer``, bounded by ``deadline`` (a ``time.monotonic()`` time); every
    failure is a :class:`ScorerFailure` (reasons in the module docstring), never an exception.
    The sidecar's scoring loop and the remote scorer server (``routers``) both call through here."""
    budget = deadline - time.monotonic()
    try:
        outcome = await asyncio.wait_for(scorer.score(request, deadline=deadline, available=available), timeout=budget)
    except asyncio.TimeoutError:
        return ScorerFailure("deadline", f"did not answer within {max(budget, 0.0) * 1000:.0f} ms")
    except ScorerDeadline as exc:  # e.g. a remote call's DEADLINE_EXCEEDED, the server's cap included
        return ScorerFailure("deadline", str(exc))
    except ScorerOverloaded as exc:
        return ScorerFailure("overload", str(exc))
    except ScorerError as exc:
        # A failure reported once the deadline has passed (a plain ScorerError from a scorer's
        # own deadline check, just before this loop's timeout fires) is a miss all the same.
        late = time.monotonic() >= deadline
        return ScorerFailure("deadline" if late else "error", str(exc))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a scorer bug must give the fallback, not a 5xx
        log.exception("scorer raised", extra={"scorer": scorer.spec.name})
        return ScorerFailure("error", f"{type(exc).__name__}: {exc}")
    if not isinstance(outcome, Scores):
        return ScorerFailure("non_finite", f"the scorer returned a {type(outcome).__name__}, not scores")
    bad = outcome.non_finite()
    if bad is not None:
        return ScorerFailure("non_finite", f"non-finite score {bad}")
    return outcome


async def decide_with_scores(
    engine: PolicyEngine,
    request: RoutingRequest,
    *,
    arrival: float | None = None,
    first_need: ScoresNeeded | None = None,
    memo: SignalMemo | None = None,
    telemetry: Telemetry | None = None,
    span=None,
    breakers: Breakers = BREAKERS,
) -> Decision:
    """Decide ``request``, scoring it with the scorers the engine asks for.

    ``arrival``: ``time.monotonic()`` when the request reached switchyard (deadlines count
    from it; default now). ``first_need``: the :class:`ScoresNeeded` of a decide call the
    caller already made, and ``memo`` the :class:`SignalMemo` it made that call with (default: a
    new one; either way each signal is evaluated once for the request). ``telemetry`` / ``span``: record each scorer call (metrics, and a
    child span of the decide ``span``). ``breakers``: the scorers' circuit breakers (tests
    pass their own, on a fake clock). Raises :class:`RequestError` like :meth:`PolicyEngine.decide`.
    """
    arrival = time.monotonic() if arrival is None else arrival
    scores: dict[str | tuple, Scores | ScorerFailure] = {}
    latency: dict[str, float] = {}
    breaker_states: dict[str, str] = {}
    need = first_need
    memo = SignalMemo(request) if memo is None else memo  # re-entries evaluate no signal twice
    while True:
        if need is not None:
            name, key = need.scorer, need.key
            if key in scores:  # the engine asked twice for the same scores: a bug, never loop
                raise RuntimeError(f"The engine asked again for scorer {name!r}.")
            scores[key], took = await score_request(
                engine, name, request, arrival, telemetry, span, need.available, breakers)
            latency[name] = latency.get(name, 0.0) + took
            scorer = engine.scorers.get(name)
            if scorer is not None:
                breaker_states[name] = breakers.of(scorer).state.label
        try:
            decision = engine.decide(request, scores, memo)
        except ScoresNeeded as again:
            need = again
            continue
        decision.latency_ms = latency
        decision.breakers = breaker_states
        return decision
