"""Conversation stickiness through real Envoys, with two switchyard processes sharing one Valkey.

- A five-turn conversation stays on the backend its first turn got, while turn 3 alone would be
  routed elsewhere (rule `hard`); Envoy copies `x-switchyard-rule: session` and
  `x-switchyard-session` to the response, and the backend that answered is the pinned one.
- An image on a pinned backend that takes none moves the session, and the move is reported
  (`x-switchyard-session: moved`, the break counted by reason).
- Two gateways (each its own Envoy and `switchyard serve`) with one Valkey: a session pinned
  through one is honoured by the other.
- The Valkey killed: requests keep flowing (answered in process, counted in
  `switchyard_state_fallbacks_total`); started again: a pin written before the kill is honoured.
"""

from __future__ import annotations

import time

import pytest

from harness.redis import RedisServer
from tests.integration.test_metrics import MetricsGateway, total, wait_for

POLICY = """\
version: 1
backends:
  small: {{cluster: small, model: small-model, supports_images: false}}
  large: {{cluster: large, model: large-model}}
default: small
signals:
  hard: {{kind: keywords, keywords: [prove]}}
rules:
  - {{name: hard, when: hard, backend: large}}
sessions: {{ttl_s: 600}}
state:
  redis: {{url: "{url}", timeout_ms: 100}}
"""

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def conversation(first: str, *later) -> dict:
    """A chat body: a system prompt, the first user message, then each later user message (answers between)."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": first}]
    for text in later:
        messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": text}]
    return {"model": "auto", "messages": messages}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """(gateway A, gateway B, the Valkey they share)."""
    workdir = tmp_path_factory.mktemp("sessions")
    redis = RedisServer(workdir / "redis").start()
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY.format(url=redis.url))
    gateways = []
    try:
        for name in ("a", "b"):
            gateways.append(MetricsGateway(policy, workdir / name))
            gateways[-1].start()
        yield gateways[0], gateways[1], redis
    finally:
        for gateway in gateways:
            gateway.stop()
        redis.stop()


def routed(response) -> tuple[str, str, str | None]:
    assert response.status == 200, response
    backend = response.header("x-switchyard-backend")
    assert response.json()["model"] == f"{backend}-model"  # the backend that answered
    return backend, response.header("x-switchyard-rule"), response.header("x-switchyard-session")


def test_a_five_turn_conversation_stays_on_its_backend(fleet):
    a, _, _ = fleet
    turns = ["hello there", "tell me more", "now prove it", "and again", "thanks"]
    answers = [routed(a.post(conversation(*turns[:n]))) for n in range(1, 6)]
    assert answers[0] == ("small", "default", "new")
    assert answers[1:] == [("small", "session", "pinned")] * 4
    assert routed(a.post(conversation("now prove it")))[:2] == ("large", "hard")  # turn 3 alone goes elsewhere


def test_an_image_the_pinned_backend_cannot_take_moves_the_session(fleet):
    a, _, _ = fleet
    assert routed(a.post(conversation("describe things")))[0] == "small"
    moved = routed(a.post(conversation("describe things", [{"type": "text", "text": "this"}, IMAGE])))
    assert moved == ("large", "default", "moved")
    assert routed(a.post(conversation("describe things", "x", "thanks"))) == ("large", "session", "pinned")
    wait_for("the break counted", lambda: total(a.scrape(), "switchyard_sessions_breaks_total",
                                                reason="images_not_supported") >= 1, a)


def test_a_pin_made_through_one_replica_is_honoured_by_the_other(fleet):
    a, b, _ = fleet
    assert routed(a.post(conversation("shared chat"))) == ("small", "default", "new")
    assert routed(b.post(conversation("shared chat", "prove it"))) == ("small", "session", "pinned")
    # and the other way round, a session whose first turn went to large
    assert routed(b.post(conversation("prove this first"))) == ("large", "hard", "new")
    assert routed(a.post(conversation("prove this first", "simple now"))) == ("large", "session", "pinned")


def test_requests_flow_while_the_store_is_down_and_pins_resume_after(fleet):
    a, b, redis = fleet
    assert routed(a.post(conversation("before the crash")))[0] == "small"
    redis.kill()
    try:
        for n in range(5):  # new and pinned sessions alike are answered, in process
            assert routed(b.post(conversation(f"during the crash {n}")))[0] == "small"
        assert routed(a.post(conversation("before the crash", "prove"))) == ("small", "session", "pinned")
        wait_for("fallbacks counted", lambda: total(b.scrape(), "switchyard_state_fallbacks_total") >= 1, b)
    finally:
        redis.start()
    time.sleep(1.2)  # the fallback store's retry interval: then the server is tried again
    # b never saw this session: its pin comes from the restarted server (written before the kill)
    deadline = time.monotonic() + 10
    while True:
        answer = routed(b.post(conversation("before the crash", "prove again")))
        if answer == ("small", "session", "pinned") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer == ("small", "session", "pinned")
    assert total(b.scrape(), "switchyard_state_up") == 1
