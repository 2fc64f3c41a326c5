"""Learned scores in the engine and the servicer, with scorers injected (no torch).

The scorers here are small in-test implementations of the ``Scorer`` interface: they let
each test fix the numbers, the delay or the failure. The real in-process and remote
scorers are tested in tests/routers/serving and tests/remote, and end to end through Envoy
in tests/integration/test_learned_routing.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext

from extproc import PolicyEngine, PolicyError, RoutingRequest, ScorerError, Scores, parse_policy
from extproc.scoring._cache import ScorerCache
from extproc.scorers._interface import Scorer, ScoresNeeded
from extproc.scoring._decide import decide_with_scores
from extproc.server._servicer import RequestStream
from extproc.telemetry._instruments import Telemetry

from .conftest import chat

POLICY = """
version: 1
backends:
  small: {cluster: small, model: s-model, cost: 1}
  large: {cluster: large, model: l-model, cost: 10}
  vision: {cluster: vision, model: v-model}
default: small
fallback: large
tenants:
  allow:
    free: [small]
scorers:
  probe:
    kind: probe
    checkpoints: {relope: unused}
    remote: {target: "127.0.0.1:9"}
    deadline_ms: 150
  utility:
    kind: latent_router
    backends: {m-small: small, m-large: large, m-vision: vision}
    remote: {target: "127.0.0.1:9"}
    deadline_ms: 150
signals:
  short: {kind: token_count, below: 4, scope: last_user}
  small_ok: {kind: score, scorer: probe, above: 0.5}
  tools: {kind: request_field, field: tools, present: true}
rules:
  - {name: short, when: short, backend: small}
  - {name: utility, when: tools, route: {utility: utility, lambda: LAMBDA, among: [small, large]}}
  - {name: probe, when: {not: small_ok}, backend: large}
"""


class FixedScorer(Scorer):
    """Returns ``values`` (or ``values(request)``) after ``delay`` seconds, or raises ``error``."""

    def __init__(self, spec, values, costs=None, delay=0.0, error=None):
        self.spec, self.values, self.costs, self.delay, self.error = spec, values, costs or {}, delay, error
        self.calls = 0
        self.available = []  # the availability each call was made with
        self.closed = False

    async def score(self, request, *, deadline, available=None):
        self.calls += 1
        self.available.append(available)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        values = self.values(request) if callable(self.values) else self.values
        if available is not None:  # masked models get no score
            values = {name: value for name, value in values.items() if name in available}
        return Scores(values, self.costs, 1)

    async def close(self):
        self.closed = True


def engine(lam=0.0, probe=0.9, utility=None, probe_deadline_ms=150, **probe_kwargs):
    policy = parse_policy(POLICY.replace("LAMBDA", str(lam)).replace(
        "deadline_ms: 150\n  utility", f"deadline_ms: {probe_deadline_ms}\n  utility"))
    scorers = {
        "probe": FixedScorer(policy.scorers["probe"], {"relope": probe} if not callable(probe) else probe, **probe_kwargs),
        "utility": FixedScorer(
            policy.scorers["utility"],
            utility or {"m-small": 0.6, "m-large": 0.9, "m-vision": 0.99},
            costs={"m-small": 0.1, "m-large": 1.0, "m-vision": 0.5},
        ),
    }
    return PolicyEngine(policy, scorers)


def decide(eng, body, headers=None):
    request = RoutingRequest(headers=headers or {}, body=body)
    return asyncio.run(decide_with_scores(eng, request))


LONG = "please explain in detail how the lemma follows from the axioms"


def test_a_cheap_rule_decides_without_running_a_scorer():
    eng = engine()
    decision = decide(eng, chat("hi"))
    assert (decision.backend.name, decision.rule) == ("small", "short")
    assert eng.scorers["probe"].calls == 0 and eng.scorers["utility"].calls == 0
    with pytest.raises(ScoresNeeded) as need:  # the pure engine asks instead of scoring
        eng.decide(RoutingRequest(body=chat(LONG)))
    assert need.value.scorer == "probe"


@pytest.mark.parametrize(("score", "backend", "rule"), [(0.2, "large", "probe"), (0.8, "small", "default")])
def test_the_probe_score_decides(score, backend, rule):
    eng = engine(probe=score)
    decision = decide(eng, chat(LONG))
    assert (decision.backend.name, decision.rule, decision.fallback) == (backend, rule, None)
    assert decision.scores["probe"].values == {"relope": score}
    assert decision.signals["small_ok"].value == score
    assert eng.scorers["probe"].calls == 1
    explained = decision.explain()
    assert explained["scores"]["probe"]["values"] == {"relope": score}
    assert "probe.relope=" in decision.metadata()["scores"]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"error": ScorerError("scorer unreachable")}, "error"),
        ({"probe": math.nan}, "non_finite"),
        ({"probe": math.inf}, "non_finite"),
        ({"error": RuntimeError("a bug in the scorer")}, "error"),
        ({"delay": 5.0}, "deadline"),
    ],
)
def test_a_failed_scorer_gives_the_fallback_with_the_reason(kwargs, reason):
    eng = engine(**kwargs)
    started = time.monotonic()
    decision = decide(eng, chat(LONG))
    elapsed = time.monotonic() - started
    assert (decision.backend.name, decision.rule) == ("large", "fallback")
    assert decision.fallback == f"probe: {reason}"
    assert decision.metadata()["fallback"] == f"probe: {reason}"
    assert elapsed < 2.0  # a 5 s scorer is abandoned at its 150 ms deadline, not waited for


def test_a_rule_the_tenant_cannot_use_never_runs_its_scorer():
    eng = engine(probe=0.1)
    decision = decide(eng, chat(LONG), {"x-tenant-id": "free"})  # free may not reach large
    assert (decision.backend.name, decision.rule) == ("small", "default")
    assert eng.scorers["probe"].calls == 0


def test_the_fallback_respects_the_tenant():
    eng = engine()
    eng.scorers["utility"].error = ScorerError("down")
    decision = decide(eng, chat(LONG, tools=[{"type": "function"}]), {"x-tenant-id": "free"})
    assert (decision.backend.name, decision.rule, decision.fallback) == ("small", "fallback", "utility: error")


def test_the_deadline_counts_from_arrival():
    eng = engine()
    request = RoutingRequest(body=chat(LONG))
    arrival = time.monotonic() - 1.0  # arrived a second ago: the 150 ms deadline has passed
    decision = asyncio.run(decide_with_scores(eng, request, arrival=arrival))
    assert decision.fallback == "probe: deadline" and eng.scorers["probe"].calls == 0


@pytest.mark.parametrize(("lam", "backend"), [(0.0, "large"), (0.3, "large"), (1.0, "small")])
def test_a_utility_rule_follows_lambda(lam, backend):
    # utilities: small 0.6 - 0.1λ, large 0.9 - 1.0λ (vision is not in `among`)
    decision = decide(engine(lam=lam), chat(LONG, tools=[{"type": "function"}]))
    assert (decision.backend.name, decision.rule) == (backend, "utility")
    assert set(decision.utilities) == {"small", "large"}
    assert decision.utilities["large"] == pytest.approx(0.9 - lam)


def test_a_utility_rule_masks_backends_the_tenant_may_not_reach():
    eng = engine(lam=0.0)
    decision = decide(eng, chat(LONG, tools=[{"type": "function"}]), {"x-tenant-id": "free"})
    assert (decision.backend.name, decision.rule) == ("small", "utility")
    assert set(decision.utilities) == {"small"}
    assert eng.scorers["utility"].available == [("m-small",)]  # the scorer masked the rest


def test_a_utility_rule_asks_only_for_the_pool_models_among_its_backends():
    eng = engine(lam=0.0)
    decide(eng, chat(LONG, tools=[{"type": "function"}]))
    assert eng.scorers["utility"].available == [("m-small", "m-large")]  # not m-vision: not in `among`


def test_a_failed_utility_scorer_gives_the_fallback():
    eng = engine()
    eng.scorers["utility"].error = ScorerError("down")
    decision = decide(eng, chat(LONG, tools=[{"type": "function"}]))
    assert (decision.backend.name, decision.fallback) == ("large", "utility: error")


def test_concurrent_requests_each_get_their_own_score():
    # a deadline far above the 10 ms each score takes: a GC pause in a long test run must not
    # turn this test of which score goes to which request into a test of timing
    eng = engine(probe=lambda request: {"relope": 0.1 if "hard" in request.messages[0]["content"] else 0.9}, delay=0.01,
                 probe_deadline_ms=900)

    async def many():
        bodies = [chat(f"{'hard' if i % 2 else 'easy'} question number {i} about the lemma") for i in range(64)]
        return await asyncio.gather(*(decide_with_scores(eng, RoutingRequest(body=b)) for b in bodies))

    decisions = asyncio.run(many())
    assert [d.backend.name for d in decisions] == ["small" if i % 2 == 0 else "large" for i in range(64)]


# --- the servicer -------------------------------------------------------------------------

JSON_HEADERS = [(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")]


def _headers_message():
    message = ext.ProcessingRequest()
    for key, value in JSON_HEADERS:
        message.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    return message


def _body_message(body: bytes):
    message = ext.ProcessingRequest()
    message.request_body.body = body
    message.request_body.end_of_stream = True
    return message


def _route(eng, body):
    stream = RequestStream(eng, Telemetry())
    stream.handle(_headers_message())
    response = stream.handle(_body_message(json.dumps(body).encode()))
    if not isinstance(response, ext.ProcessingResponse):
        response = asyncio.run(response)
    return response


def _metadata(response):
    fields = response.dynamic_metadata.fields["switchyard"].struct_value.fields
    return {key: value.string_value for key, value in fields.items()}


def test_the_servicer_answers_cheap_rules_without_awaiting():
    stream = RequestStream(engine(), Telemetry())
    stream.handle(_headers_message())
    response = stream.handle(_body_message(json.dumps(chat("hi")).encode()))
    assert isinstance(response, ext.ProcessingResponse)  # decided inline, no coroutine


def test_the_servicer_routes_by_score_and_puts_the_scores_in_metadata():
    response = _route(engine(probe=0.2), chat(LONG))
    metadata = _metadata(response)
    assert (metadata["backend"], metadata["rule"]) == ("large", "probe")
    assert metadata["scores"] == "probe.relope=0.2000"
    assert json.loads(response.request_body.response.body_mutation.body)["model"] == "l-model"


def test_the_servicer_answers_a_scorer_failure_with_the_fallback_not_an_error():
    response = _route(engine(error=ScorerError("unreachable")), chat(LONG))
    assert not response.HasField("immediate_response")
    metadata = _metadata(response)
    assert (metadata["backend"], metadata["rule"], metadata["fallback"]) == ("large", "fallback", "probe: error")


# --- policy problems -----------------------------------------------------------------------


def _problems(text):
    with pytest.raises(PolicyError) as error:
        parse_policy(text)
    return [(p.line, p.message) for p in error.value.problems]


def test_scorer_references_are_checked_with_line_numbers():
    text = POLICY.replace("LAMBDA", "0.1")
    text = text.replace("small_ok: {kind: score, scorer: probe, above: 0.5}",
                        "small_ok: {kind: score, scorer: nope, above: 0.5}")
    text = text.replace("among: [small, large]", "among: [small, missing]")
    text = text.replace("deadline_ms: 150\n  utility", "deadline_ms: 5000\n  utility")
    problems = _problems(text)
    messages = " | ".join(m for _, m in problems)
    assert "uses scorer 'nope', which is not defined" in messages
    assert "`route.among[1]` names backend 'missing'" in messages
    assert "deadline_ms` (5000) must be below" in messages
    lines = text.splitlines()
    for line, message in problems:
        assert 1 <= line <= len(lines)
    assert any("nope" in lines[line - 1] for line, _ in problems)


def test_a_rule_needs_exactly_one_of_backend_and_route():
    text = POLICY.replace("LAMBDA", "0.1").replace(
        "{name: short, when: short, backend: small}",
        "{name: short, when: short, backend: small, route: {utility: utility, lambda: 1}}")
    assert any("exactly one of `backend` and `route`" in m for _, m in _problems(text))


def test_a_utility_rule_among_a_backend_no_pool_model_maps_to_is_an_error():
    text = POLICY.replace("LAMBDA", "0.1").replace("m-vision: vision", "m-other: small")
    text = text.replace("among: [small, large]", "among: [small, vision]")
    assert any("which no pool model of scorer `utility` maps to" in m for _, m in _problems(text))


def test_large_share_needs_local_checkpoints():
    text = POLICY.replace("LAMBDA", "0.1").replace("scorer: probe, above: 0.5", "scorer: probe, large_share: 0.2")
    assert any("`large_share` needs the checkpoint's calibration" in m for _, m in _problems(text))


def test_old_policies_stay_valid_and_have_no_scorers():
    policy = parse_policy("version: 1\nbackends: {a: {cluster: a, model: a}}\ndefault: a\n")
    assert policy.scorers == {} and policy.fallback is None


# --- reloads keep loaded scorers -------------------------------------------------------------


def test_a_reload_reuses_an_unchanged_scorer_and_a_failed_load_rejects_the_policy(monkeypatch):
    loads = []

    def fake_load(spec):
        if spec.remote.target == "broken:1":
            raise ScorerError("cannot load")
        loads.append(spec.name)
        return FixedScorer(spec, {"relope": 0.5})

    monkeypatch.setattr("extproc.scoring._cache.load_scorer", fake_load)
    cache = ScorerCache()
    first = parse_policy(POLICY.replace("LAMBDA", "0.1"))
    scorers = cache.prepare(first)
    assert cache.commit(scorers) == [] and sorted(loads) == ["probe", "utility"]

    second = parse_policy(POLICY.replace("LAMBDA", "0.5").replace("deadline_ms: 150\n  utility", "deadline_ms: 90\n  utility"))
    again = cache.prepare(second)
    assert again["probe"] is scorers["probe"] and again["utility"] is scorers["utility"]  # deadline is not a reload
    assert sorted(loads) == ["probe", "utility"]

    text = POLICY.replace("LAMBDA", "0.1").replace('checkpoints: {relope: unused}\n    remote: {target: "127.0.0.1:9"}',
                                                   'checkpoints: {relope: unused}\n    remote: {target: "broken:1"}')
    with pytest.raises(PolicyError) as error:
        cache.prepare(parse_policy(text))
    problem = error.value.problems[0]
    assert "Scorer 'probe' failed to load" in problem.message
    assert text.splitlines()[problem.line - 1].strip().startswith("probe:")

    changed = parse_policy(POLICY.replace("LAMBDA", "0.1").replace("127.0.0.1:9\"}\n    deadline_ms: 150\n  utility",
                                                                   "127.0.0.1:10\"}\n    deadline_ms: 150\n  utility"))
    new = cache.prepare(changed)
    assert new["probe"] is not scorers["probe"] and new["utility"] is scorers["utility"]
    assert cache.commit(new) == [scorers["probe"]]  # the old probe is retired


def test_scorer_calls_are_child_spans_of_the_decision_and_are_measured():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]), tracer_provider)
    stream = RequestStream(engine(error=ScorerError("down")), telemetry)
    stream.handle(_headers_message())
    asyncio.run(stream.handle(_body_message(json.dumps(chat(LONG)).encode())))

    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert spans["switchyard.scorer"].parent.span_id == spans["switchyard.decide"].context.span_id
    assert spans["switchyard.scorer"].attributes["switchyard.scorer.result"] == "error"
    points = {
        metric.name: [dict(p.attributes) for p in metric.data.data_points]
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics for metric in scope.metrics
    }
    assert points["switchyard.scorer.failures"] == [{"scorer": "probe", "reason": "error"}]
    assert {"backend": "large", "rule": "fallback", "fallback": "probe: error"} in points["switchyard.decisions"]


def test_two_scorers_with_the_same_settings_share_one_loaded_model(monkeypatch):
    loads = []

    def fake_load(spec):
        loads.append(spec.name)
        return FixedScorer(spec, {"relope": 0.5})

    monkeypatch.setattr("extproc.scoring._cache.load_scorer", fake_load)
    text = POLICY.replace("LAMBDA", "0.1").replace(
        '    deadline_ms: 150\n  utility:',
        '    deadline_ms: 150\n  probe2:\n    kind: probe\n    checkpoints: {relope: unused}\n'
        '    remote: {target: "127.0.0.1:9", scorer: probe}\n  utility:').replace(
        'remote: {target: "127.0.0.1:9"}\n    deadline_ms: 150\n  probe2',
        'remote: {target: "127.0.0.1:9", scorer: probe}\n    deadline_ms: 150\n  probe2')
    scorers = ScorerCache().prepare(parse_policy(text))
    assert scorers["probe"] is scorers["probe2"] and loads.count("probe") + loads.count("probe2") == 1


class _Counted:
    """A signal that counts in ``counts`` its evaluations that gave a result (a score signal
    asked before its scores arrived raises ScoresNeeded instead, having done nothing)."""

    def __init__(self, signal, counts):
        self.signal, self.counts = signal, counts

    def evaluate(self, ctx):
        result = self.signal.evaluate(ctx)
        self.counts[self.signal.name] = self.counts.get(self.signal.name, 0) + 1
        return result


def test_each_signal_is_evaluated_once_across_the_scorer_re_entries():
    """A decide that needs both scorers enters the engine three times (no scores, the probe's,
    then the utility's); the signals an earlier entry evaluated are not evaluated again."""
    text = POLICY.replace("LAMBDA", "0.0").replace(
        "  - {name: utility, when: tools, route: {utility: utility, lambda: 0.0, among: [small, large]}}\n"
        "  - {name: probe, when: {not: small_ok}, backend: large}\n",
        "  - {name: probe, when: {all: [tools, {not: small_ok}]}, backend: large}\n"
        "  - {name: utility, when: {all: [tools, not_huge]}, route: {utility: utility, lambda: 0.0, among: [small, large]}}\n",
    ).replace("signals:\n", "signals:\n  not_huge: {kind: token_count, below: 100000, scope: last_user}\n")
    policy = parse_policy(text)
    counts: dict[str, int] = {}
    for name, signal in list(policy.signals.items()):
        policy.signals[name] = _Counted(signal, counts)
    scorers = {"probe": FixedScorer(policy.scorers["probe"], {"relope": 0.9}),  # small_ok holds: no probe route
               "utility": FixedScorer(policy.scorers["utility"], {"m-small": 0.6, "m-large": 0.9})}
    decision = decide(PolicyEngine(policy, scorers), chat(LONG, tools=[{"type": "function"}]))
    assert (decision.rule, decision.backend.name) == ("utility", "large")
    assert scorers["probe"].calls == 1 and scorers["utility"].calls == 1
    assert counts == {"short": 1, "tools": 1, "small_ok": 1, "not_huge": 1}
    assert list(decision.signals) == ["short", "tools", "small_ok", "not_huge"]
