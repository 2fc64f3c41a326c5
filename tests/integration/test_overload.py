"""A hung remote scorer through a real Envoy: the circuit breaker stops the waiting.

The scorer service (a scriptable scorer behind the real scorer server, in its own process)
is stopped with SIGSTOP: it keeps its connection but never answers. The first requests
each wait their deadline and take the fallback (reason ``deadline``); once the breaker has
seen ``failures`` of them in a row it opens, and requests take the fallback at once (reason
``breaker_open``) without calling the scorer. After SIGCONT, the first request after the
cool-off tries the scorer again, and requests are scored again.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.integration.gateway import Gateway, Response, chat
from tests.remote.support import ServerProcess

pytestmark = pytest.mark.envoy

FAILURES = 3
POLICY = """\
version: 1
backends:
  small: {{cluster: small, model: small-model}}
  large: {{cluster: large, model: large-model}}
default: large
fallback: large
scorers:
  probe:
    kind: probe
    checkpoints: {{p: remote}}
    remote: {{target: "127.0.0.1:{port}"}}
    deadline_ms: 250
    breaker: {{failures: {failures}, cool_off_ms: 1000}}
signals:
  small_ok: {{kind: score, scorer: probe, output: p, above: 0.1}}
rules:
  - {{name: scored, when: small_ok, backend: small}}
"""
PROMPT = "please summarise the attached meeting notes for me"


@pytest.fixture
def scored_gateway(tmp_path) -> Iterator[tuple[Gateway, ServerProcess]]:
    scorer = ServerProcess(value=0.25)  # above the threshold: scored requests go to `small`
    try:
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(port=scorer.port, failures=FAILURES))
        gw = Gateway(policy, tmp_path / "gw").start()
        try:
            yield gw, scorer
        finally:
            gw.stop()
    finally:
        if scorer.proc.poll() is None:
            scorer.proc.send_signal(signal.SIGCONT)
        scorer.kill()


def route(reply: Response) -> tuple[int, str | None, str | None]:
    return reply.status, reply.header("x-switchyard-backend"), reply.header("x-switchyard-rule")


def fallback_reasons(gw: Gateway, count: int) -> list[str]:
    """The ``fallback`` of the last ``count`` routed requests, from Envoy's access log (the
    decision's dynamic metadata), waiting for the log to show them all."""
    deadline = time.monotonic() + 10
    while True:
        decisions = [entry["switchyard"] for entry in gw.access_log_entries()
                     if isinstance(entry.get("switchyard"), dict) and entry["switchyard"].get("rule")]
        if len(decisions) >= count or time.monotonic() > deadline:
            return [decision.get("fallback", "") for decision in decisions[-count:]]
        time.sleep(0.1)


def test_a_stopped_scorer_opens_the_breaker_then_requests_are_scored_again(scored_gateway):
    gw, scorer = scored_gateway
    assert route(gw.post(chat(PROMPT))) == (200, "small", "scored")

    scorer.proc.send_signal(signal.SIGSTOP)  # connected, silent: every call waits its deadline
    missed = [route(gw.post(chat(PROMPT))) for _ in range(FAILURES)]
    at_once = [route(gw.post(chat(PROMPT))) for _ in range(3)]
    assert missed + at_once == [(200, "large", "fallback")] * (FAILURES + 3)
    reasons = fallback_reasons(gw, FAILURES + 3)
    assert reasons[:FAILURES] == ["probe: deadline"] * FAILURES  # a gRPC deadline miss, not an "error"
    # The breaker is open for 1 s: the next request falls back without calling the scorer.
    # (Later ones may be the half-open trial on a slow machine: it waits its deadline and fails.)
    assert reasons[FAILURES] == "probe: breaker_open"
    assert set(reasons[FAILURES:]) <= {"probe: breaker_open", "probe: deadline"}

    scorer.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 15
    while True:  # after the cool-off, one request tries the scorer: it answers, the breaker closes
        reply = route(gw.post(chat(PROMPT)))
        if reply != (200, "large", "fallback") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply == (200, "small", "scored")
    assert [route(gw.post(chat(PROMPT))) for _ in range(3)] == [(200, "small", "scored")] * 3
