"""The circuit breaker per scorer, on a fake clock: it opens after repeated failures, sends
requests to the fallback at once while open, lets one trial through after the cool-off; its
state is a metric and is in ``explain``. Also how failures are named (a deadline miss is
``deadline``, a refusal ``overload``) and the rate-limited warning a fallback storm logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc import PolicyEngine, RoutingRequest, ScorerError, ScorerOverloaded, parse_policy
from extproc.scoring._breaker import COUNTED_REASONS, Admission, Breaker, Breakers, BreakerState
from extproc.scorers._interface import BreakerConfig, ScorerFailure
from extproc.scoring._decide import decide_with_scores
from extproc.telemetry._instruments import FailureLog, JsonFormatter, Telemetry

from .conftest import chat
from .test_scoring import LONG, POLICY, FixedScorer, engine
from .test_telemetry import points

CONFIG = BreakerConfig(failures=3, cool_off_ms=1000)


class Clock:
    """A fake ``time.monotonic``: moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def policy_text(probe_keys: str = "") -> str:
    """test_scoring's policy with ``probe_keys`` (YAML lines) added to its `probe` scorer."""
    return POLICY.replace("LAMBDA", "0").replace("    deadline_ms: 150\n  utility:",
                                                 f"    deadline_ms: 150\n{probe_keys}  utility:")


def fail(breaker: Breaker, times: int, config: BreakerConfig = CONFIG) -> None:
    for _ in range(times):
        admission = breaker.admit(config)
        assert admission is Admission.CALL
        breaker.record(admission, config, failed=True)


# -- the breaker alone ------------------------------------------------------------------------
def test_it_opens_after_the_configured_failures_in_a_row():
    breaker = Breaker(Clock())
    fail(breaker, 2)
    assert (breaker.state, breaker.failures) == (BreakerState.CLOSED, 2)
    breaker.record(breaker.admit(CONFIG), CONFIG, failed=False)  # a success starts the count again
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    assert breaker.admit(CONFIG) is Admission.REFUSED


def test_a_failure_while_other_calls_succeed_is_load_not_a_fault():
    """Under load, calls that miss their deadline while others are answered do not open the
    breaker: only the scorer's admission sheds load (measured: with 8 clients at an 80 ms
    deadline, counting them opened the breaker and sent 99.8% of requests to the fallback)."""
    clock = Clock()
    breaker = Breaker(clock)
    started = [breaker.now() for _ in range(5)]  # five calls wait together
    calls = [breaker.admit(CONFIG) for _ in started]
    clock.advance(0.05)
    breaker.record(calls[0], CONFIG, failed=False, since=started[0])  # one is answered
    for call, since in zip(calls[1:], started[1:]):
        breaker.record(call, CONFIG, failed=True, since=since)  # the rest miss: the scorer is busy
    assert (breaker.state, breaker.failures) == (BreakerState.CLOSED, 0)
    clock.advance(0.05)
    for _ in range(3):  # a hang: no call answered since these started
        since = breaker.now()
        call = breaker.admit(CONFIG)
        clock.advance(0.1)
        breaker.record(call, CONFIG, failed=True, since=since)
    assert breaker.state is BreakerState.OPEN


def test_an_overload_refusal_never_counts():
    assert "overload" not in COUNTED_REASONS and {"deadline", "error"} <= COUNTED_REASONS


def test_after_the_cool_off_one_trial_runs_and_its_success_closes_it():
    clock = Clock()
    breaker = Breaker(clock)
    fail(breaker, 3)
    clock.advance(0.999)
    assert breaker.admit(CONFIG) is Admission.REFUSED
    clock.advance(0.001)
    assert breaker.state is BreakerState.HALF_OPEN
    trial = breaker.admit(CONFIG)
    assert trial is Admission.TRIAL
    assert breaker.admit(CONFIG) is Admission.REFUSED  # while the trial runs, the others still fall back
    breaker.record(trial, CONFIG, failed=False)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.admit(CONFIG) is Admission.CALL


def test_a_failed_trial_opens_it_for_another_cool_off():
    clock = Clock()
    breaker = Breaker(clock)
    fail(breaker, 3)
    clock.advance(1.0)
    trial = breaker.admit(CONFIG)
    breaker.record(trial, CONFIG, failed=True)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.5)
    assert breaker.admit(CONFIG) is Admission.REFUSED
    clock.advance(0.5)
    assert breaker.admit(CONFIG) is Admission.TRIAL


def test_a_cancelled_trial_lets_the_next_request_try():
    clock = Clock()
    breaker = Breaker(clock)
    fail(breaker, 3)
    clock.advance(1.0)
    breaker.abandon(breaker.admit(CONFIG))
    assert breaker.admit(CONFIG) is Admission.TRIAL


def test_calls_admitted_before_it_opened_do_not_close_or_reopen_it():
    clock = Clock()
    breaker = Breaker(clock)
    stragglers = [breaker.admit(CONFIG) for _ in range(2)]
    fail(breaker, 3)
    breaker.record(stragglers[0], CONFIG, failed=False)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.9)
    breaker.record(stragglers[1], CONFIG, failed=True)  # does not restart the cool-off
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN


def test_failures_0_turns_it_off_and_closes_an_open_one():
    breaker = Breaker(Clock())
    fail(breaker, 3)
    off = BreakerConfig(failures=0)
    fail(breaker, 50, off)
    assert breaker.state is BreakerState.CLOSED


def test_the_breaker_belongs_to_the_loaded_scorer_so_a_reload_that_keeps_it_keeps_its_state():
    breakers = Breakers(Clock())
    first = engine()
    scorer = first.scorers["probe"]
    fail(breakers.of(scorer), 5, first.policy.scorers["probe"].breaker)
    reloaded = PolicyEngine(parse_policy(policy_text()), {"probe": scorer})
    assert breakers.states(reloaded.scorers) == {"probe": BreakerState.OPEN}
    fresh = engine()  # a scorer loaded anew (another checkpoint or target): closed
    assert breakers.states(fresh.scorers)["probe"] is BreakerState.CLOSED


# -- through the scoring loop -----------------------------------------------------------------
def scored(eng, breakers, telemetry=None, body=None):
    request = RoutingRequest(body=body or chat(LONG))
    return asyncio.run(decide_with_scores(eng, request, breakers=breakers, telemetry=telemetry))


def test_an_open_breaker_takes_the_fallback_without_calling_the_scorer():
    clock = Clock()
    breakers = Breakers(clock)
    eng = engine(probe=0.9, error=ScorerError("unreachable"))
    probe = eng.scorers["probe"]
    for _ in range(5):  # the declared default: 5 failures in a row
        assert scored(eng, breakers).fallback == "probe: error"
    assert probe.calls == 5
    decision = scored(eng, breakers)
    assert (decision.backend.name, decision.rule, decision.fallback) == ("large", "fallback", "probe: breaker_open")
    assert probe.calls == 5, "an open breaker never calls the scorer"
    assert decision.explain()["breakers"] == {"probe": "open"}

    probe.error = None  # the scorer is back; nothing calls it until the cool-off (5 s by default) ends
    clock.advance(4.9)
    assert scored(eng, breakers).fallback == "probe: breaker_open" and probe.calls == 5
    clock.advance(0.1)
    decision = scored(eng, breakers)
    assert (decision.backend.name, decision.rule, decision.fallback) == ("small", "default", None)
    assert probe.calls == 6 and decision.explain()["breakers"] == {"probe": "closed"}


def test_deadline_misses_open_the_breaker_and_then_requests_do_not_wait():
    breakers = Breakers(Clock())
    text = policy_text("    breaker: {failures: 2, cool_off_ms: 300}\n").replace("deadline_ms: 150", "deadline_ms: 50", 1)
    policy = parse_policy(text)
    assert policy.scorers["probe"].breaker == BreakerConfig(failures=2, cool_off_ms=300.0)
    hung = FixedScorer(policy.scorers["probe"], {"relope": 0.9}, delay=30.0)
    eng = PolicyEngine(policy, {"probe": hung})
    assert [scored(eng, breakers).fallback for _ in range(3)] == [
        "probe: deadline", "probe: deadline", "probe: breaker_open"]
    assert hung.calls == 2


def test_a_failure_that_is_no_scorer_fault_is_not_counted():
    breakers = Breakers(Clock())
    eng = engine(probe=float("nan"))
    for _ in range(6):
        assert scored(eng, breakers).fallback == "probe: non_finite"
    assert breakers.of(eng.scorers["probe"]).state is BreakerState.CLOSED


class LateError(FixedScorer):
    """Blocks past the deadline, then raises ScorerError, as a gRPC DEADLINE_EXCEEDED or the
    batcher's own deadline check do just before the loop's timeout fires."""

    async def score(self, request, *, deadline, available=None):
        self.calls += 1
        time.sleep(max(0.0, deadline - time.monotonic()) + 0.01)
        raise ScorerError("Remote scorer 'probe' did not answer within 150 ms (DEADLINE_EXCEEDED).")


def test_a_deadline_miss_the_scorer_reports_is_reason_deadline_not_error():
    eng = engine()
    eng.scorers["probe"] = LateError(eng.policy.scorers["probe"], {})
    assert scored(eng, Breakers()).fallback == "probe: deadline"


def test_a_refusal_is_reason_overload_and_takes_the_scorers_fallback():
    policy = parse_policy(policy_text("    fallback: small\n"))
    busy = FixedScorer(policy.scorers["probe"], {}, error=ScorerOverloaded("the queue is full"))
    decision = scored(PolicyEngine(policy, {"probe": busy}), Breakers())
    assert (decision.backend.name, decision.rule, decision.fallback) == ("small", "fallback", "probe: overload")


# -- visible: the metric and the log line -----------------------------------------------------
def test_the_breaker_state_is_a_gauge_per_scorer():
    clock = Clock()
    breakers = Breakers(clock)
    eng = engine(error=ScorerError("down"))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]))
    telemetry.observe_breakers(lambda: breakers.states(eng.scorers))
    assert sorted(points(reader)["switchyard.scorer.breaker.state"], key=str) == [
        ({"scorer": "probe"}, 0), ({"scorer": "utility"}, 0)]
    for _ in range(6):
        scored(eng, breakers, telemetry)
    assert ({"scorer": "probe"}, 1) in points(reader)["switchyard.scorer.breaker.state"]
    clock.advance(5.0)
    assert ({"scorer": "probe"}, 2) in points(reader)["switchyard.scorer.breaker.state"]
    failures = dict((attrs["reason"], value) for attrs, value in points(reader)["switchyard.scorer.failures"])
    assert failures == {"error": 5, "breaker_open": 1}


def log_lines(caplog) -> list[dict]:
    return [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.getMessage().startswith("scorer failed")]


def test_a_fallback_storm_logs_one_warning_per_scorer_per_interval_counting_the_rest(caplog):
    clock = Clock()
    failures = FailureLog(every_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="switchyard.scoring"):
        failures.failed("probe", ScorerFailure("deadline", "late"))
        for _ in range(40):
            failures.failed("probe", ScorerFailure("breaker_open"))
        failures.failed("probe", ScorerFailure("deadline"))
        failures.failed("utility", ScorerFailure("error", "down"))  # another scorer: its own line
        clock.advance(10.0)
        failures.failed("probe", ScorerFailure("error", "refused"))
    lines = [(line["scorer"], line["reason"], line["suppressed"], line["suppressed_reasons"])
             for line in log_lines(caplog)]
    assert lines == [("probe", "deadline", 0, {}), ("utility", "error", 0, {}),
                     ("probe", "error", 41, {"breaker_open": 40, "deadline": 1})]
    assert all(line["level"] == "warning" for line in log_lines(caplog))


def test_the_scoring_loop_logs_through_the_rate_limit(caplog):
    eng = engine(error=ScorerError("down"))
    telemetry = Telemetry(clock=Clock())
    with caplog.at_level(logging.WARNING, logger="switchyard.scoring"):
        for _ in range(8):
            scored(eng, Breakers(Clock()), telemetry)
    assert [line["reason"] for line in log_lines(caplog)] == ["error"]


@pytest.mark.parametrize(("failures", "cool_off_ms", "message"), [
    (-1, 100, "`scorers.probe.breaker.failures`"),
    (5, 0, "`scorers.probe.breaker.cool_off_ms`"),
])
def test_bad_breaker_settings_are_policy_errors(failures, cool_off_ms, message):
    from extproc import PolicyError

    text = policy_text(f"    breaker: {{failures: {failures}, cool_off_ms: {cool_off_ms}}}\n")
    with pytest.raises(PolicyError) as error:
        parse_policy(text, source="p.yaml")
    assert message in str(error.value) and "p.yaml:" in str(error.value)


def test_policy_explain_shows_the_breaker_of_each_scorer_it_asked(tmp_path, capsys):
    from extproc.cli import main

    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text())  # the scorers' remote target refuses connections
    body = tmp_path / "body.json"
    body.write_text(json.dumps(chat(LONG)))
    assert main(["policy", "explain", str(policy), "--request", str(body)]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert (explained["backend"], explained["fallback"]) == ("large", "probe: error")
    assert explained["breakers"] == {"probe": "closed"}  # one failure: far from opening
