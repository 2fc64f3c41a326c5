"""Shadow policies (``serve --shadow``): a second decision per request, after the live answer.

The servicer is driven directly (its ``Process`` generator, no gRPC) so the order of events
is exact: the live answer comes out of the generator before the shadow task exists, and a
shadow that is gated, raises or runs past its timeout leaves the live answers unchanged. The
pair counter the shadow records over a thousand requests equals ``policy diff`` on the same
requests.
"""

from __future__ import annotations

import asyncio
import io
import json
import random

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc import ExternalProcessor, PolicyEngine, RequestError, load_policy, parse_policy
from extproc.cli._explain_many import diff_many
from extproc.scoring._cache import ScorerCache
from extproc.scoring._decide import decide_with_scores
from extproc.server._shadow import Shadow, ShadowPolicy, SharedScorers, large_backends
from extproc.telemetry._instruments import Telemetry
from extproc.cli import main
from tests.extproc.conftest import POLICIES, chat
from tests.extproc.test_scoring import POLICY as SCORED_POLICY
from tests.extproc.test_scoring import FixedScorer
from tests.extproc.test_servicer import JSON_HEADERS, body_message, headers_message
from tests.extproc.test_telemetry import points

LIVE = POLICIES / "default.yaml"
#: The candidate: code goes to small.
CODE_RULE = "  - name: code\n    when:\n      all:\n        - any: [code, code_block]\n        - not: short_prompt\n"
CANDIDATE = LIVE.read_text().replace(CODE_RULE + "    backend: large", CODE_RULE + "    backend: small")
WORDS = ["hello", "python", "prove", "the", "theorem", "think step by step", "```", "weather", "refactor", "integral",
         "a", "cat", "stack trace", "sql", "poem"]
REQUESTS = 1000


def bodies(count: int = REQUESTS, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        body = chat(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))))
        if i % 17 == 0:
            body["tools"] = [{"type": "function", "function": {"name": "f"}}]
        out.append(body)
    return out


def metered() -> tuple[Telemetry, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return Telemetry(MeterProvider(metric_readers=[reader])), reader


def values(reader: InMemoryMetricReader, name: str) -> dict[tuple, float]:
    return {tuple(sorted(attrs.items())): value for attrs, value in points(reader).get(name, [])}


async def answer(processor: ExternalProcessor, body: dict) -> list:
    async def messages():
        yield headers_message(JSON_HEADERS)
        yield body_message(json.dumps(body).encode())

    return [response async for response in processor.Process(messages(), None)]


def candidate_engine(tmp_path) -> PolicyEngine:
    path = tmp_path / "candidate.yaml"
    path.write_text(CANDIDATE)
    return PolicyEngine(load_policy(path))


async def answers(processor: ExternalProcessor, shadow: Shadow | None, requests: list[dict]) -> list[bytes]:
    out = []
    for body in requests:
        out.append(b"".join(r.SerializeToString(deterministic=True) for r in await answer(processor, body)))
        await asyncio.sleep(0)  # the loop turns between requests, as it does in a server
    if shadow is not None:
        await shadow.drain(30)
    return out


def test_a_thousand_live_answers_are_identical_with_and_without_the_shadow_and_the_pairs_equal_policy_diff(tmp_path):
    live = PolicyEngine(load_policy(LIVE))
    shadow_engine = candidate_engine(tmp_path)
    requests = bodies()
    telemetry, reader = metered()
    shadow = Shadow(lambda: shadow_engine, telemetry, max_in_flight=REQUESTS)
    without = asyncio.run(answers(ExternalProcessor(lambda: live), None, requests))
    with_shadow = asyncio.run(answers(ExternalProcessor(lambda: live, telemetry, shadow=shadow), shadow, requests))
    assert with_shadow == without

    pairs = values(reader, "switchyard.shadow.decisions")
    assert sum(pairs.values()) == REQUESTS and values(reader, "switchyard.shadow.skipped") == {}
    lines = tmp_path / "requests.jsonl"
    lines.write_text("".join(json.dumps(body) + "\n" for body in requests))
    out = io.StringIO()
    assert diff_many(live.policy, shadow_engine.policy, lines, {}, out) == 0
    summary = json.loads(out.getvalue().splitlines()[-1])["summary"]
    assert {(("live", p["a"]), ("shadow", p["b"])): p["requests"] for p in summary["pairs"]} == pairs
    assert any(p["a"] != p["b"] for p in summary["pairs"])  # the policies do disagree somewhere
    assert summary["requests"] == REQUESTS
    agreeing = sum(p["requests"] for p in summary["pairs"] if p["a"] == p["b"])
    assert summary["agreement"] == pytest.approx(agreeing / REQUESTS)
    cost = values(reader, "switchyard.shadow.cost")
    large = values(reader, "switchyard.shadow.large")
    assert cost[(("policy", "live"),)] == pytest.approx(summary["a"]["cost"])
    assert cost[(("policy", "shadow"),)] == pytest.approx(summary["b"]["cost"])
    assert large[(("policy", "live"),)] / REQUESTS == pytest.approx(summary["a"]["large_share"])
    assert large[(("policy", "shadow"),)] / REQUESTS == pytest.approx(summary["b"]["large_share"])
    differing = [json.loads(line) for line in out.getvalue().splitlines()[:-1]]
    assert len(differing) >= sum(p["requests"] for p in summary["pairs"] if p["a"] != p["b"])
    assert all(row["a"] != row["b"] for row in differing)


def test_the_live_answer_is_out_before_the_shadow_task_starts_and_a_stuck_shadow_never_holds_it(tmp_path):
    events: list[str] = []

    async def run():
        gate = asyncio.Event()  # never set: the shadow never finishes

        async def gated(engine, request, **kwargs):
            events.append("shadow started")
            await gate.wait()

        live = PolicyEngine(load_policy(LIVE))
        shadow_engine = candidate_engine(tmp_path)
        telemetry, reader = metered()
        shadow = Shadow(lambda: shadow_engine, telemetry, decide=gated, timeout_s=3600)

        async def messages():
            yield headers_message(JSON_HEADERS)
            yield body_message(json.dumps(chat("please refactor this python function for me")).encode())

        stream = ExternalProcessor(lambda: live, telemetry, shadow=shadow).Process(messages(), None)
        first = await stream.__anext__()
        body = await stream.__anext__()
        events.append("live answered")
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()  # the stream ends; the shadow task is created, not yet run
        events.append("stream ended")
        assert shadow.in_flight == 1 and events == ["live answered", "stream ended"]
        for _ in range(5):  # a few turns of the loop: the task, then the timeout's inner task
            await asyncio.sleep(0)
        assert events == ["live answered", "stream ended", "shadow started"]
        plain = await answer(ExternalProcessor(lambda: live), chat("please refactor this python function for me"))
        assert [first, body] == plain  # the live answer is the answer without a shadow
        await shadow.drain(0)  # shutdown cancels what is still stuck
        assert shadow.in_flight == 0 and values(reader, "switchyard.shadow.decisions") == {}

    asyncio.run(run())


def test_a_stream_closed_right_after_the_live_answer_is_still_shadowed(tmp_path):
    # Envoy may end the stream as soon as it has the body answer; gRPC then closes the
    # generator at its yield instead of asking for the next message.
    async def run():
        live = PolicyEngine(load_policy(LIVE))
        telemetry, reader = metered()
        shadow = Shadow(lambda: candidate_engine(tmp_path), telemetry)

        async def messages():
            yield headers_message(JSON_HEADERS)
            yield body_message(json.dumps(chat("please refactor this python function for me")).encode())

        stream = ExternalProcessor(lambda: live, telemetry, shadow=shadow).Process(messages(), None)
        await stream.__anext__()
        await stream.__anext__()  # the body answer
        await stream.aclose()
        await shadow.drain(30)
        return values(reader, "switchyard.shadow.decisions")

    assert sum(asyncio.run(run()).values()) == 1


@pytest.mark.parametrize("behaviour, reason", [("raise", "error"), ("hang", "timeout")])
def test_a_shadow_that_raises_or_times_out_is_counted_and_changes_no_live_answer(tmp_path, behaviour, reason):
    async def failing(engine, request, **kwargs):
        if behaviour == "raise":
            raise RuntimeError("the candidate policy has a bug")
        await asyncio.Event().wait()

    live = PolicyEngine(load_policy(LIVE))
    shadow_engine = candidate_engine(tmp_path)
    requests = bodies(40)
    telemetry, reader = metered()
    shadow = Shadow(lambda: shadow_engine, telemetry, decide=failing, timeout_s=0.001)
    without = asyncio.run(answers(ExternalProcessor(lambda: live), None, requests))
    assert asyncio.run(answers(ExternalProcessor(lambda: live, telemetry, shadow=shadow), shadow, requests)) == without
    assert values(reader, "switchyard.shadow.skipped") == {(("reason", reason),): 40}
    assert values(reader, "switchyard.shadow.decisions") == {}


def test_a_shadow_raising_on_every_request_logs_once_an_interval(tmp_path, caplog):
    async def failing(engine, request, **kwargs):
        raise RuntimeError("the candidate policy has a bug")

    now = [0.0]
    live = PolicyEngine(load_policy(LIVE))
    shadow_engine = candidate_engine(tmp_path)
    shadow = Shadow(lambda: shadow_engine, Telemetry(), decide=failing, clock=lambda: now[0])
    with caplog.at_level("ERROR", logger="switchyard.shadow"):
        asyncio.run(answers(ExternalProcessor(lambda: live, shadow=shadow), shadow, bodies(10)))
        now[0] = 60.0
        asyncio.run(answers(ExternalProcessor(lambda: live, shadow=shadow), shadow, bodies(1)))
    logged = [r for r in caplog.records if r.name == "switchyard.shadow"]
    assert [getattr(r, "suppressed", None) for r in logged] == [0, 9]


def test_a_shadow_that_rejects_the_request_is_a_rejected_pair():
    telemetry, reader = metered()
    live = PolicyEngine(load_policy(LIVE))

    async def rejecting(engine, request, **kwargs):
        raise RequestError("no backend for this tenant", status=403, code="tenant_not_allowed")

    shadow = Shadow(lambda: live, telemetry, decide=rejecting)
    asyncio.run(answers(ExternalProcessor(lambda: live, telemetry, shadow=shadow), shadow, [chat("hello")]))
    assert values(reader, "switchyard.shadow.decisions") == {(("live", "small"), ("shadow", "rejected")): 1}


def test_beyond_max_in_flight_requests_are_not_shadowed_and_are_counted(tmp_path):
    async def run():
        gate = asyncio.Event()
        started = []

        async def gated(engine, request, **kwargs):
            started.append(1)
            await gate.wait()
            return await decide_with_scores(engine, request)

        live = PolicyEngine(load_policy(LIVE))
        telemetry, reader = metered()
        shadow = Shadow(lambda: candidate_engine(tmp_path), telemetry, decide=gated, max_in_flight=2)
        processor = ExternalProcessor(lambda: live, telemetry, shadow=shadow)
        for body in bodies(5):
            await answer(processor, body)
        assert shadow.in_flight == 2
        gate.set()
        await shadow.drain(10)
        assert len(started) == 2
        assert values(reader, "switchyard.shadow.skipped") == {(("reason", "dropped"),): 3}
        assert sum(values(reader, "switchyard.shadow.decisions").values()) == 2

    asyncio.run(run())


def test_no_shadow_engine_means_nothing_is_offered():
    live = PolicyEngine(load_policy(LIVE))
    telemetry, reader = metered()
    shadow = Shadow(lambda: None, telemetry)
    asyncio.run(answers(ExternalProcessor(lambda: live, telemetry, shadow=shadow), shadow, bodies(3)))
    assert values(reader, "switchyard.shadow.decisions") == {} and values(reader, "switchyard.shadow.skipped") == {}


def test_a_bad_shadow_file_leaves_no_shadow_until_it_is_good_and_never_replaces_a_good_one(tmp_path):
    path = tmp_path / "shadow.yaml"
    path.write_text("version: 1\nbackends: {}\n")
    shadow = ShadowPolicy(path)  # never raises: the server starts without a shadow
    shadow.load_scorers(SharedScorers().owner("shadow"))
    assert shadow.current() is None and shadow.reload() == "rejected"
    path.write_text(CANDIDATE)
    assert shadow.reload() == "reloaded"
    good = shadow.current()
    assert good is not None and good.policy.rules[3].backend == "small"
    path.write_text(CANDIDATE.replace("default: small", "default: nowhere"))
    assert shadow.reload() == "rejected" and shadow.current() is good


def test_the_shadow_shares_the_live_policys_loaded_scorers_and_keeps_its_own(monkeypatch):
    loads = []

    def fake_load(spec):
        loads.append(spec.remote.target)
        return FixedScorer(spec, {"relope": 0.5})

    monkeypatch.setattr("extproc.scoring._cache.load_scorer", fake_load)
    shared = SharedScorers(ScorerCache())
    live, shadow = shared.owner("live"), shared.owner("shadow")
    live_policy = parse_policy(SCORED_POLICY.replace("LAMBDA", "0.1"))
    live_scorers = live.prepare(live_policy)
    assert live.commit(live_scorers) == []
    # The shadow names the same probe, and a utility scorer of its own (another target).
    shadow_policy = parse_policy(SCORED_POLICY.replace("LAMBDA", "0.5").replace(
        'backends: {m-small: small, m-large: large, m-vision: vision}\n    remote: {target: "127.0.0.1:9"}',
        'backends: {m-small: small, m-large: large, m-vision: vision}\n    remote: {target: "127.0.0.1:10"}'))
    shadow_scorers = shadow.prepare(shadow_policy)
    assert shadow.commit(shadow_scorers) == []
    assert shadow_scorers["probe"] is live_scorers["probe"]  # one loaded model for both
    assert shadow_scorers["utility"] is not live_scorers["utility"]
    assert sorted(loads) == ["127.0.0.1:10", "127.0.0.1:9", "127.0.0.1:9"]
    # A live reload that drops the probe keeps it loaded: the shadow still uses it.
    no_probe = {name: scorer for name, scorer in live_scorers.items() if name != "probe"}
    assert live.commit(no_probe) == []
    # The shadow dropping it too retires it.
    assert shadow.commit({"utility": shadow_scorers["utility"]}) == [live_scorers["probe"]]


def test_large_backends_are_the_most_expensive_ones():
    assert large_backends(load_policy(LIVE)) == {"large"}


def test_policy_diff_prints_the_differences_and_a_summary(tmp_path, capsys):
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(CANDIDATE)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([
        json.dumps(chat("hello there")),
        json.dumps({"id": "r2", "body": chat("please refactor this python function for me")}),
        "not json",
    ]) + "\n")
    assert main(["policy", "diff", str(LIVE), str(candidate), "--requests", str(requests)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"line": 2, "id": "r2", "a": {"backend": "large", "rule": "code"},
                        "b": {"backend": "small", "rule": "code"}}
    summary = lines[-1]["summary"]
    assert len(lines) == 2 and summary["requests"] == 3
    assert summary["agreement"] == pytest.approx(2 / 3)
    assert {(p["a"], p["b"]): p["requests"] for p in summary["pairs"]} == {
        ("small", "small"): 1, ("large", "small"): 1, ("rejected", "rejected"): 1}
    assert summary["a"]["large_share"] == pytest.approx(1 / 3) and summary["b"]["large_share"] == 0
    assert summary["a"]["cost"] == 16 and summary["b"]["cost"] == 2
