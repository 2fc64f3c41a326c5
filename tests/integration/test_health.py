"""Backend health through a real Envoy: outlier ejection takes a backend out of the decision
and brings it back (``envoy render`` outlier detection + ``serve --envoy-admin``).

The gateway's ``large`` backend is a stub that answers 503 while a flag file exists. Hard
requests go to ``large`` by rule. Once it answers 5xx, Envoy ejects it after
``consecutive_5xx`` in a row; switchyard reads the ejection from Envoy's admin endpoint and
the next hard requests go to ``small`` (rule ``hard`` skipped: ``backend unhealthy``). With
the flag removed and the short ejection time over, Envoy returns the host and switchyard
routes hard requests to ``large`` again. No timing is asserted: each state change is polled
for with a generous deadline.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import pytest

from extproc.envoy._render import OutlierDetection
from harness.processes import Child
from tests.integration.gateway import Gateway, Response, chat

POLICY = """\
version: 1
backends:
  small: {cluster: small, model: small-model}
  large: {cluster: large, model: large-model}
default: small
signals:
  hard: {kind: keywords, keywords: [prove]}
rules:
  - {name: hard, when: hard, backend: large}
sessions: {key: header, header: x-session-id}  # only requests carrying the header have a session
"""

#: A backend that answers 503 while the file argv[2] exists, else a chat completion.
FLAKY_BACKEND = """\
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer(200, {"status": "ok"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if os.path.exists(sys.argv[2]):
            self._answer(503, {"error": {"message": "flaky backend is down", "code": "down"}})
        else:
            self._answer(200, {"object": "chat.completion", "model": "large-model", "choices": []})

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

DEADLINE_S = 30.0
HARD = chat("prove that the lemma holds")


@pytest.fixture
def health_gateway(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Gateway(policy, tmp_path / "stack")
    stack = gateway.stack
    script, down = tmp_path / "flaky_backend.py", tmp_path / "large-is-down"
    script.write_text(FLAKY_BACKEND)
    stack.backends["large"] = Child("backend-large", [sys.executable, str(script), str(stack.ports.backends["large"]),
                                                      str(down)], stack.workdir / "backend-large.log")
    stack.envoy_options = {"outlier": OutlierDetection(consecutive_5xx=3, consecutive_gateway_failure=3,
                                                       interval_s=0.2, base_ejection_s=3.0, max_ejection_s=3.0)}
    stack.switchyard.argv += ["--envoy-admin", f"http://127.0.0.1:{stack.ports.admin}"]
    gateway.start()
    try:
        yield gateway, down
    finally:
        gateway.stop()


def _until(what: str, gateway: Gateway, done: Callable[[Response], bool]) -> Response:
    """Send the hard request until ``done`` holds for its answer (within :data:`DEADLINE_S`)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        response = gateway.post(HARD)
        if done(response):
            return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: never happened; last answer {response!r}\n{gateway.logs()}")
        time.sleep(0.1)


def test_an_ejected_backend_leaves_the_decision_and_comes_back(health_gateway):
    gateway, down = health_gateway
    first = gateway.post(HARD)
    assert (first.status, first.header("x-switchyard-backend"), first.header("x-switchyard-rule")) == (
        200, "large", "hard"), first

    down.touch()  # large answers 503 from now on: Envoy ejects it, switchyard reads the ejection
    moved = _until("hard requests moved to small", gateway, lambda r: r.header("x-switchyard-backend") == "small")
    assert (moved.status, moved.header("x-switchyard-rule")) == (200, "default"), moved
    for _ in range(3):  # while ejected (3 s), hard requests avoid it
        again = gateway.post(HARD)
        assert (again.status, again.header("x-switchyard-backend")) == (200, "small"), again

    down.unlink()  # large recovers; after the ejection time Envoy returns it, and so does switchyard
    back = _until("hard requests back on large", gateway, lambda r: r.header("x-switchyard-backend") == "large")
    assert (back.status, back.header("x-switchyard-rule")) == (200, "hard"), back


def test_a_session_pinned_to_a_backend_that_goes_down_moves_and_says_so(health_gateway):
    gateway, down = health_gateway
    session = {"x-session-id": "chat-1"}
    first = gateway.post(HARD, session)
    assert (first.status, first.header("x-switchyard-backend"), first.header("x-switchyard-session")) == (
        200, "large", "new"), first
    pinned = gateway.post(chat("thanks, go on"), session)  # alone, this would go to small
    assert (pinned.header("x-switchyard-backend"), pinned.header("x-switchyard-rule")) == ("large", "session"), pinned

    down.touch()
    _until("large ejected", gateway, lambda r: r.header("x-switchyard-backend") == "small")
    moved = gateway.post(chat("thanks, go on"), session)
    assert (moved.status, moved.header("x-switchyard-backend"), moved.header("x-switchyard-session")) == (
        200, "small", "moved"), moved
    after = gateway.post(chat("and then?"), session)
    assert (after.header("x-switchyard-backend"), after.header("x-switchyard-rule"),
            after.header("x-switchyard-session")) == ("small", "session", "pinned"), after
