"""Opt-in fail-open (`envoy render --fail-open`) through a real Envoy.

With fail-open, a request switchyard cannot answer (killed, stopped, over ext_proc's
``message_timeout``) goes to the policy's default backend, its body as the client sent it
(``model`` not rewritten), instead of Envoy's 5xx. Client-sent ``x-switchyard-*`` headers are
still removed before routing, so a spoofed ``x-switchyard-backend: large`` never picks a
backend. Without it (the default) the same requests fail closed: 5xx ``router_unavailable``,
nothing routed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.integration.gateway import DEFAULT_POLICY, Gateway, Response, chat
from tests.integration.test_faults import Upload, envoy_counter

# policies/default.yaml sends this to `large`; fail-open must send it to `small` (the default).
CODE = "Please refactor this python function so it streams rows from the database."
SPOOFS = [{"x-switchyard-backend": "large"}, {"X-Switchyard-Backend": "large", "x-switchyard-rule": "code"}]


@pytest.fixture(scope="module", params=[True, False], ids=["fail-open", "fail-closed"])
def gw(request, tmp_path_factory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("fail-open" if request.param else "fail-closed")
    policy = workdir / "policy.yaml"
    shutil.copyfile(DEFAULT_POLICY, policy)
    gateway = Gateway(policy, workdir, fail_open=request.param).start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def fail_open(gw) -> bool:
    return gw.stack.fail_open


@contextlib.contextmanager
def switchyard_killed(gw: Gateway) -> Iterator[None]:
    """``kill -9`` switchyard for the ``with`` block (Envoy cannot connect), then start it again."""
    process = gw.stack.switchyard.process
    process.kill()
    process.wait()
    try:
        yield
    finally:
        gw.stack.switchyard.start()
        gw.stack.wait_switchyard(time.monotonic() + 20)


def assert_reached_the_default_unrouted(reply: Response) -> None:
    """200 from the default backend with the client's body and no switchyard header at all."""
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == "small", reply
    assert reply.header("x-demo-received-model") == "auto", reply  # nothing rewrote `model`
    assert json.loads(reply.header("x-demo-received-switchyard")) == {}, reply  # spoofs stripped
    assert reply.header("x-switchyard-backend") is None and reply.header("x-switchyard-rule") is None, reply


def assert_fail_closed(reply: Response) -> None:
    assert 500 <= reply.status < 600, reply
    assert reply.json()["error"]["code"] == "router_unavailable", reply
    assert reply.header("x-demo-backend") is None, reply


def test_switchyard_running_routes_by_the_policy_whatever_the_client_sends(gw):
    """The baseline: the prompt goes to `large` by the rules, a spoof to `small` changes nothing."""
    reply = gw.post(chat(CODE), {"x-switchyard-backend": "small"})
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == "large" and reply.header("x-switchyard-backend") == "large", reply
    assert reply.header("x-demo-received-model") == "large-model", reply


@pytest.mark.parametrize("spoof", [{}, *SPOOFS], ids=["no-spoof", "spoof", "spoof-mixed-case"])
def test_switchyard_killed(gw, fail_open, spoof):
    before = gw.backend_requests()
    with switchyard_killed(gw):
        reply = gw.post(chat(CODE), spoof)
        after = gw.backend_requests()
    if fail_open:
        assert_reached_the_default_unrouted(reply)
        assert after == {**before, "small": before["small"] + 1}
    else:
        assert_fail_closed(reply)
        assert after == before


def test_switchyard_stopped_with_sigterm(gw, fail_open):
    with gw.switchyard_stopped():
        reply = gw.post(chat(CODE), SPOOFS[0])
    if fail_open:
        assert_reached_the_default_unrouted(reply)
    else:
        assert_fail_closed(reply)


def test_switchyard_over_the_message_timeout(gw, fail_open):
    """A silent switchyard (SIGSTOP): ext_proc's message_timeout passes, then fail-open or 504."""
    allowed = envoy_counter(gw, "http.ingress.ext_proc.failure_mode_allowed")
    before = gw.backend_requests()
    with gw.switchyard_paused():
        reply = gw.post(chat(CODE), SPOOFS[0])
    if fail_open:
        assert_reached_the_default_unrouted(reply)
        assert envoy_counter(gw, "http.ingress.ext_proc.failure_mode_allowed") > allowed
    else:
        assert reply.status == 504, reply
        assert_fail_closed(reply)
        assert gw.backend_requests() == before


def test_switchyard_killed_while_the_body_arrives(gw, fail_open):
    """Headers answered, body not yet sent: the body phase fails open (or the request fails closed)."""
    before = gw.backend_requests()
    upload = Upload(gw, json.dumps(chat(CODE)).encode())
    with switchyard_killed(gw):
        head, payload = upload.answer(send_body=fail_open)
    if fail_open:
        assert head.startswith(b"HTTP/1.1 200") and b"x-demo-backend: small" in head.lower(), head
        assert b"x-demo-received-model: auto" in head.lower(), head
        assert gw.backend_requests() == {**before, "small": before["small"] + 1}
    else:
        assert head.startswith(b"HTTP/1.1 500"), head
        assert json.loads(payload)["error"]["code"] == "router_unavailable"
        assert gw.backend_requests() == before


def test_switchyard_back_routes_by_the_policy_again(gw):
    with switchyard_killed(gw):
        gw.post(chat(CODE))
    reply = gw.post(chat(CODE), {"x-switchyard-backend": "small"})
    assert reply.header("x-demo-backend") == "large" and reply.header("x-switchyard-rule"), reply
