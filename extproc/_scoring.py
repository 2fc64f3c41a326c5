"""Deciding a request that may need learned scores: the loop around the pure engine.

:func:`decide_with_scores` asks the engine to decide with the scores gathered so far; when
the engine answers :class:`ScoresNeeded`, it awaits that scorer (within the scorer's
deadline, counted from the request's arrival) and asks again. A scorer that misses its
deadline, raises, returns a non-finite number or cannot be reached is recorded as a
:class:`ScorerFailure`, and the engine then takes the policy's fallback, never a 5xx. The
servicer and ``switchyard policy explain`` both decide through here, so they agree.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from extproc._decision import Decision
from extproc._engine import PolicyEngine
from extproc._errors import ScorerError
from extproc._request import RoutingRequest
from extproc._scorers import ScorerFailure, Scores, ScoresNeeded

from extproc._telemetry import scorer_span

if TYPE_CHECKING:
    from extproc._telemetry import Telemetry

__all__ = ["decide_with_scores", "score_request"]

log = logging.getLogger("switchyard.scoring")


def _finite(scores: Scores) -> bool:
    return all(math.isfinite(v) for v in scores.values.values()) and all(
        math.isfinite(v) for v in scores.costs.values()
    )


async def score_request(
    engine: PolicyEngine, name: str, request: RoutingRequest, arrival: float,
    telemetry: Telemetry | None = None, span=None, available: tuple[str, ...] | None = None,
) -> tuple[Scores | ScorerFailure, float]:
    """Scorer ``name``'s scores for ``request`` (or why there are none), and the ms it took.
    With ``telemetry``, the call is recorded (metrics, and a child span of ``span``)."""
    if telemetry is None:
        return await _score(engine, name, request, arrival, available)
    with scorer_span(telemetry, span, name) as child:
        outcome, latency_ms = await _score(engine, name, request, arrival, available)
        if child is not None:
            child.set_attribute("switchyard.scorer.result", getattr(outcome, "reason", "ok"))
    telemetry.record_score(name, outcome, latency_ms)
    return outcome, latency_ms


async def _score(
    engine: PolicyEngine, name: str, request: RoutingRequest, arrival: float, available: tuple[str, ...] | None
) -> tuple[Scores | ScorerFailure, float]:
    started = time.monotonic()
    spec = engine.policy.scorers[name]
    scorer = engine.scorers.get(name)
    deadline = arrival + spec.deadline_ms / 1000.0
    remaining = deadline - started
    outcome: Scores | ScorerFailure
    if scorer is None:
        outcome = ScorerFailure("error", f"scorer {name!r} is not loaded")
    elif remaining <= 0:
        outcome = ScorerFailure("deadline", f"the {spec.deadline_ms:g} ms deadline passed before scoring began")
    else:
        try:
            outcome = await asyncio.wait_for(
                scorer.score(request, deadline=deadline, available=available), timeout=remaining)
        except asyncio.TimeoutError:
            outcome = ScorerFailure("deadline", f"no scores within the {spec.deadline_ms:g} ms deadline")
        except ScorerError as exc:
            outcome = ScorerFailure("error", str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a scorer bug must give the fallback, not a 5xx
            log.exception("scorer raised", extra={"scorer": name})
            outcome = ScorerFailure("error", f"{type(exc).__name__}: {exc}")
        else:
            if not isinstance(outcome, Scores) or not _finite(outcome):
                outcome = ScorerFailure("non_finite", "the scorer returned a NaN or infinite score")
    latency_ms = (time.monotonic() - started) * 1000.0
    if isinstance(outcome, ScorerFailure):
        log.warning("scorer failed; the policy's fallback applies",
                    extra={"scorer": name, "reason": outcome.reason, "detail": outcome.detail})
    return outcome, latency_ms


async def decide_with_scores(
    engine: PolicyEngine,
    request: RoutingRequest,
    *,
    arrival: float | None = None,
    first_need: ScoresNeeded | None = None,
    telemetry: Telemetry | None = None,
    span=None,
) -> Decision:
    """Decide ``request``, scoring it with the scorers the engine asks for.

    ``arrival``: ``time.monotonic()`` when the request reached switchyard (deadlines count
    from it; default now). ``first_need``: the :class:`ScoresNeeded` of a decide call the
    caller already made. ``telemetry`` / ``span``: record each scorer call (metrics, and a
    child span of the decide ``span``). Raises :class:`RequestError` like :meth:`PolicyEngine.decide`.
    """
    arrival = time.monotonic() if arrival is None else arrival
    scores: dict[str | tuple, Scores | ScorerFailure] = {}
    latency: dict[str, float] = {}
    need = first_need
    while True:
        if need is not None:
            name, key = need.scorer, need.key
            if key in scores:  # the engine asked twice for the same scores: a bug, never loop
                raise RuntimeError(f"The engine asked again for scorer {name!r}.")
            scores[key], took = await score_request(
                engine, name, request, arrival, telemetry, span, need.available)
            latency[name] = latency.get(name, 0.0) + took
        try:
            decision = engine.decide(request, scores)
        except ScoresNeeded as again:
            need = again
            continue
        decision.latency_ms = latency
        return decision
