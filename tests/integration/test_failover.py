"""Failover through a real Envoy (``backends.<name>.fallbacks``, issue #16 item 3).

Backends that fail on demand (:mod:`harness.faulty_backends`) behind switchyard and the Envoy
config ``switchyard envoy render`` writes: a failed attempt (connect refused, reset, 503, 429,
no response headers within the per-try timeout) moves to the next backend of the chain, with
that backend's model and credential; never after response bytes reached the client; never to
a backend the tenant may not use.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import pytest
import yaml

from extproc.cli import main as cli_main
from extproc.envoy._render import check_envoy_config
from harness import envoy_binary
from harness.failover import FaultyStack
from tests.integration.gateway import chat

POLICY = """\
version: 1
backends:
  a: {cluster: a, model: model-a, fallbacks: [b, c]}
  b: {cluster: b, model: model-b, fallbacks: [c]}
  c: {cluster: c, model: model-c}
  d: {cluster: d, model: model-d}
default: a
tenants:
  allow:
    restricted: [a, c, d]
signals:
  dee: {kind: keywords, keywords: [deeee]}
  eff: {kind: keywords, keywords: [effff]}
rules:
  - {name: to-d, when: dee, backend: d}
  - {name: to-d-with-fallback, when: eff, backend: d, fallbacks: [c]}
routing:
  max_body_bytes: 3000000
"""
KEYS = {"a": "Bearer key-a", "b": "Bearer key-b"}  # c and d have no credential


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("failover")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    running = FaultyStack(policy, workdir, credentials=KEYS, per_try_timeout_s=1.0).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def gw(stack):
    stack.reset()
    return stack


def post(stack: FaultyStack, body, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", stack.listen, timeout=15)
    try:
        conn.request("POST", "/v1/chat/completions", raw, {"content-type": "application/json", **(headers or {})})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def attempts(stack: FaultyStack) -> list[tuple[str, str | None, str | None]]:
    """(backend, model, authorization) of every request the backends received, in order."""
    return [(s["backend"], s["model"], s["authorization"]) for s in stack.seen()]


def test_healthy_first_backend_answers_with_its_model_and_key(gw):
    status, headers, body = post(gw, chat("hello"), {"authorization": "Bearer client-key"})
    assert status == 200, body
    assert json.loads(body)["backend"] == "a"
    assert attempts(gw) == [("a", "model-a", "Bearer key-a")]
    assert headers["x-switchyard-backend"] == "a" and headers["x-switchyard-served-by"] == "a"
    assert headers["x-envoy-attempt-count"] == "1"
    assert gw.seen()[0]["switchyard"] == []  # the routing header stays at the edge


@pytest.mark.parametrize("failure", ["refuse", "reset", "s503", "s429", "stall"])
def test_failed_attempt_moves_to_the_next_backend(gw, failure):
    gw.mode("a", failure)
    status, headers, body = post(gw, chat("hello"), {"authorization": "Bearer client-key"})
    assert status == 200, body
    assert json.loads(body) | {"choices": None} == {"backend": "b", "model": "model-b", "choices": None}
    tried = attempts(gw)
    assert tried[-1] == ("b", "model-b", "Bearer key-b")  # b's model and b's key, and only b's
    assert [t[0] for t in tried] == ([] if failure == "refuse" else ["a"]) + ["b"]
    assert all(t[1] == "model-a" and t[2] == "Bearer key-a" for t in tried[:-1])
    assert headers["x-switchyard-backend"] == "a"  # the first choice
    assert headers["x-switchyard-served-by"] == "b"  # who answered
    assert headers["x-envoy-attempt-count"] == "2"


def test_third_backend_without_credential_gets_no_key(gw):
    gw.mode("a", "s503")
    gw.mode("b", "s429")
    status, headers, body = post(gw, chat("hello"), {"authorization": "Bearer client-key", "x-api-key": "k"})
    assert status == 200, body
    assert attempts(gw) == [("a", "model-a", "Bearer key-a"), ("b", "model-b", "Bearer key-b"), ("c", "model-c", None)]
    assert gw.seen()[-1]["x-api-key"] is None  # neither the client's key nor an earlier attempt's
    assert headers["x-switchyard-served-by"] == "c" and headers["x-envoy-attempt-count"] == "3"


def test_every_backend_failing_gives_the_last_answer_after_one_try_each(gw):
    for name in "abc":
        gw.mode(name, "s503")
    status, headers, _ = post(gw, chat("hello"))
    assert status == 503
    assert [t[0] for t in attempts(gw)] == ["a", "b", "c"]  # no backend tried twice
    assert headers["x-envoy-attempt-count"] == "3"


def test_backend_without_fallbacks_is_tried_once(gw):
    gw.mode("d", "s503")
    status, _, _ = post(gw, chat("deeee"))
    assert status == 503
    assert attempts(gw) == [("d", "model-d", None)]


def test_a_rule_s_fallbacks_replace_the_backend_s(gw):
    gw.mode("d", "s503")
    status, headers, body = post(gw, chat("effff"))
    assert status == 200, body
    assert attempts(gw) == [("d", "model-d", None), ("c", "model-c", None)]
    assert headers["x-switchyard-rule"] == "to-d-with-fallback"


def test_a_tenant_never_fails_over_to_a_backend_it_may_not_use(gw):
    gw.mode("a", "s503")
    status, headers, body = post(gw, chat("hello"), {"x-tenant-id": "restricted"})
    assert status == 200, body
    assert [t[0] for t in attempts(gw)] == ["a", "c"]  # b is not the tenant's
    assert headers["x-switchyard-served-by"] == "c"


def test_no_failover_once_response_bytes_were_sent(gw):
    gw.mode("a", "sse_cut")
    conn = http.client.HTTPConnection("127.0.0.1", gw.listen, timeout=15)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat("hello", stream=True)).encode(),
                 {"content-type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200
    received = b""
    with pytest.raises(http.client.IncompleteRead):  # the stream is cut, not replayed elsewhere
        while chunk := reply.read1(65536):
            received += chunk
    conn.close()
    events = [json.loads(line[6:]) for line in received.decode().splitlines() if line.startswith("data: {")]
    assert [e["backend"] for e in events] == ["a", "a"] and b"[DONE]" not in received
    assert [t[0] for t in attempts(gw)] == ["a"]


def test_a_body_holding_the_model_slot_gets_no_failover(gw):
    gw.mode("a", "s503")
    raw = json.dumps(chat("look: \u0000switchyard-model")).encode()
    assert b"\\u0000switchyard-model" in raw
    status, _, _ = post(gw, raw)
    assert status == 503  # decided without fallbacks: a alone
    assert attempts(gw) == [("a", "model-a", "Bearer key-a")]  # its real model, never the slot


def test_a_body_over_one_mib_fails_over_whole(gw):
    gw.mode("a", "s503")
    body = chat("x" * 2_000_000)
    status, _, reply = post(gw, body)
    assert status == 200, reply[:300]
    seen = gw.seen()
    assert [(s["backend"], s["model"]) for s in seen] == [("a", "model-a"), ("b", "model-b")]
    assert seen[1]["bytes"] == len(json.dumps(body | {"model": "model-b"}).encode())


def test_unrouted_requests_pass_the_model_slot_filter_unchanged(gw):
    conn = http.client.HTTPConnection("127.0.0.1", gw.listen, timeout=15)
    raw = json.dumps({"model": "whatever", "input": "x"}).encode()
    conn.request("POST", "/v1/embeddings", raw, {"content-type": "application/json"})
    reply = conn.getresponse()
    reply.read()
    conn.close()
    assert reply.status == 200
    assert attempts(gw) == [("a", "whatever", "Bearer key-a")]


def test_envoy_counts_the_retries(gw):
    before = gw.stats().get("cluster.b.upstream_rq_retry_success", 0)
    gw.mode("a", "s503")
    assert post(gw, chat("hello"))[0] == 200
    assert gw.stats()["cluster.b.upstream_rq_retry_success"] == before + 1


def test_rendered_config_passes_policy_check(gw):
    assert check_envoy_config(gw.policy, yaml.safe_load(gw.envoy_config.read_text())) == []


def test_rendered_failover_config_with_tls_and_credentials_validates(tmp_path, capsys):
    """Envoy accepts the failover pieces with every kind of cluster (TLS with SNI, a credential, plain)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    key = tmp_path / "keys" / "a"
    key.parent.mkdir()
    key.write_text("key-a")
    out = tmp_path / "envoy.yaml"
    code = cli_main(["envoy", "render", "--policy", str(policy), "--backend", "a=127.0.0.1:1", "--backend", "b=127.0.0.1:2",
                     "--backend", "c=api.example.com:443", "--tls", "c", "--backend", "d=127.0.0.1:4",
                     "--credential", f"a=authorization:{key}", "--credential-prefix", "a=Bearer ",
                     "--per-try-timeout", "5", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    config = yaml.safe_load(out.read_text())
    tls = next(c for c in config["static_resources"]["clusters"] if c["name"] == "c")
    assert tls["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["hostname"] == "api.example.com"
    done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
