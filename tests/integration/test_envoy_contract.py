"""The Envoy side of the contract, through a real Envoy (envoy/standalone.yaml, rendered).

One gateway runs policies/default.yaml: backends ``small`` (model small-model, the default)
and ``large`` (large-model). The demo backends answer with ``x-demo-backend`` (who
answered), ``x-demo-received-model`` (the body.model that arrived) and
``x-demo-received-switchyard`` (the x-switchyard-* headers that arrived).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.gateway import DEFAULT_POLICY, REPO, chat

MODEL = {"small": "small-model", "large": "large-model"}
PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
LONG = " ".join(f"paragraph {i} of the quarterly report, with figures and remarks." for i in range(700))
LIMIT = 1024 * 1024  # policies/default.yaml routing.max_body_bytes and standalone.yaml's limit

ROUTED = [  # (id, body, backend, rule)
    ("chit-chat", chat("hi, how are you today?"), "small", "default"),
    ("code", chat("Can you refactor this python function so it streams rows instead of building a list?"), "large", "code"),
    ("long-context", chat(f"Summarise this: {LONG}"), "large", "long-context"),
    ("maths", chat("Prove that the square root of 2 is irrational."), "large", "maths-reasoning"),
    ("image", chat([{"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": PIXEL}}]), "large", "images"),
    ("tools", chat("What's the weather in Oslo?", tools=[{"type": "function", "function": {"name": "weather", "parameters": {}}}]),
     "large", "agentic-tools"),
    ("direct-model", {**chat("hello"), "model": "large-model"}, "large", "direct"),
]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- routing ------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "backend", "rule"), [r[1:] for r in ROUTED], ids=[r[0] for r in ROUTED])
def test_rule_routes_to_its_backend(default_gateway, body, backend, rule):
    reply = default_gateway.post(body)
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == backend, reply
    assert reply.header("x-demo-received-model") == MODEL[backend], "body.model was not rewritten"
    assert reply.header("x-switchyard-backend") == backend
    assert reply.header("x-switchyard-rule") == rule
    assert reply.json()["model"] == MODEL[backend]
    # The routing header is the only x-switchyard-* header a backend sees.
    assert json.loads(reply.header("x-demo-received-switchyard")) == {"x-switchyard-backend": backend}


def test_openai_sdk_through_envoy(default_gateway):
    client = default_gateway.openai_client()
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Think step by step: is 91 prime?"}]
    )
    completion = raw.parse()
    assert raw.headers["x-switchyard-backend"] == "large"
    assert raw.headers["x-switchyard-rule"] == "maths-reasoning"
    assert raw.headers["x-demo-backend"] == "large"
    assert completion.model == "large-model"
    assert completion.choices[0].message.content.startswith("[large] you asked: Think step by step")


def test_decision_reaches_envoy_dynamic_metadata(default_gateway):
    text = "access log check: please debug this javascript stack trace"
    reply = default_gateway.post(chat(text))
    assert reply.header("x-demo-backend") == "large"
    entries = default_gateway.access_log_entries(cluster="large", method="POST", status=200)
    assert any(e["switchyard"] == {"backend": "large", "cluster": "large", "model": "large-model",
                                   "rule": "code", "requested_model": "auto"} for e in entries), entries


# -- streaming ----------------------------------------------------------------------------
def test_sse_stream_passes_through_intact(default_gateway):
    reply = default_gateway.post(chat("Prove the lemma, streaming please.", stream=True))
    assert reply.status == 200, reply
    assert reply.header("content-type").startswith("text/event-stream")
    assert reply.header("content-length") is None  # streamed by Envoy, not buffered and re-framed
    assert reply.header("x-switchyard-backend") == "large" and reply.header("x-demo-backend") == "large"
    events = [line[len("data: "):] for line in reply.body.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 3
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"large-model"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "[large] you asked: Prove the lemma, streaming please."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_sdk_stream(default_gateway):
    client = default_gateway.openai_client()
    raw = client.chat.completions.with_raw_response.create(
        model="auto", stream=True, messages=[{"role": "user", "content": "tell me a joke"}]
    )
    assert raw.headers["x-switchyard-backend"] == "small"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    assert text == "[small] you asked: tell me a joke"


# -- spoofing -----------------------------------------------------------------------------
SPOOF = {
    "x-switchyard-backend": "large",
    "X-Switchyard-Rule": "images",
    "x-switchyard-cluster": "large",
    "X-SWITCHYARD-Anything": "1",
}


def test_client_cannot_choose_the_backend(default_gateway):
    reply = default_gateway.post(chat("hi there"), headers=SPOOF)
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == "small"
    assert reply.header("x-switchyard-backend") == "small"  # switchyard's answer, not the client's
    assert reply.header("x-switchyard-rule") == "default"
    assert json.loads(reply.header("x-demo-received-switchyard")) == {"x-switchyard-backend": "small"}


@pytest.mark.parametrize("path", ["/v1/models", "/health"])
def test_spoofed_header_on_passthrough_request_is_ignored(default_gateway, path):
    # switchyard passes these through without touching the route cache, so only Envoy's
    # early header removal keeps the spoofed header from selecting the route.
    reply = default_gateway.get(path, headers=SPOOF)
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == "small"


def test_spoofed_header_on_non_json_post_is_ignored(default_gateway):
    reply = default_gateway.request(
        "POST", "/v1/chat/completions", b"hello", {"content-type": "text/plain", **SPOOF}
    )
    assert reply.header("x-demo-backend") == "small", reply
    assert reply.header("x-demo-received-switchyard") == "{}"


# -- bad bodies ---------------------------------------------------------------------------
BAD = [  # (raw body, error code)
    pytest.param(b"{this is not json", "invalid_json", id="not-json"),
    pytest.param(b'[{"role": "user", "content": "hi"}]', "invalid_body", id="json-array"),
    pytest.param(b'{"model": "auto"}', "invalid_messages", id="no-messages"),
    pytest.param(b'{"model": "auto", "messages": []}', "invalid_messages", id="empty-messages"),
    pytest.param(b'{"model": "auto", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_encoding",
                 id="invalid-utf8"),
    pytest.param(b"", "missing_body", id="empty"),
    pytest.param(b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                 "invalid_json", id="nan"),
]


@pytest.mark.parametrize(("raw", "code"), BAD)
def test_bad_body_gets_400_json_and_reaches_no_backend(default_gateway, raw, code):
    before = default_gateway.backend_requests()
    reply = default_gateway.post(raw)
    assert reply.status == 400, reply
    assert reply.header("content-type") == "application/json"
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert default_gateway.backend_requests() == before


def _oversized() -> bytes:
    return json.dumps(chat("x" * (LIMIT + 1000))).encode()


def test_over_limit_body_gets_413_from_switchyard(default_gateway):
    before = default_gateway.backend_requests()
    reply = default_gateway.post(_oversized())  # Content-Length announces it
    assert reply.status == 413, reply
    assert reply.json()["error"]["code"] == "request_too_large"
    assert default_gateway.backend_requests() == before


def test_over_limit_chunked_body_gets_413_and_reaches_no_backend(default_gateway):
    data = _oversized()
    chunks = (data[i:i + 65536] for i in range(0, len(data), 65536))  # no Content-Length
    before = default_gateway.backend_requests()
    reply = default_gateway.request("POST", "/v1/chat/completions", chunks, {"content-type": "application/json"}, chunked=True)
    assert reply.status == 413, reply
    assert reply.json()["error"]["code"] == "request_too_large"
    assert default_gateway.backend_requests() == before


def test_body_just_under_limit_is_routed(default_gateway):
    body = chat("")
    body["messages"][0]["content"] = "y " * ((LIMIT - len(json.dumps(body)) - 100) // 2)
    data = json.dumps(body).encode()
    assert LIMIT - 200 < len(data) <= LIMIT
    reply = default_gateway.post(data)
    assert reply.status == 200, reply
    assert reply.header("x-switchyard-rule") == "long-context"


def test_chunked_body_is_routed_and_rewritten(default_gateway):
    data = json.dumps(chat("Please debug this rust borrow checker error in my parser.")).encode()
    chunks = (data[i:i + 7] for i in range(0, len(data), 7))
    reply = default_gateway.request("POST", "/v1/chat/completions", chunks, {"content-type": "application/json"}, chunked=True)
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == "large"
    assert reply.header("x-demo-received-model") == "large-model"


# -- pass-through -------------------------------------------------------------------------
def test_get_models_passes_through_to_default(default_gateway):
    reply = default_gateway.get("/v1/models")
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == "small"
    assert reply.header("x-switchyard-backend") is None  # nothing was decided
    assert reply.json()["data"][0]["id"] == "small-model"


@pytest.mark.parametrize(
    ("path", "content_type", "raw"),
    [
        ("/v1/chat/completions", "text/plain", b"please route me to large: prove this theorem"),
        ("/v1/chat/completions", "application/x-www-form-urlencoded", b"model=large-model&q=1"),
        ("/v1/embeddings", "application/json", b'{"model": "large-model", "input": "prove the theorem"}'),
    ],
    ids=["text-plain", "form", "other-path"],
)
def test_unrouted_post_passes_through_unchanged(default_gateway, path, content_type, raw):
    reply = default_gateway.request("POST", path, raw, {"content-type": content_type})
    assert reply.header("x-demo-backend") == "small", reply
    assert reply.header("x-demo-received-sha256") == _sha(raw)
    assert reply.header("x-switchyard-backend") is None


# -- fail closed --------------------------------------------------------------------------
def test_switchyard_down_fails_closed(default_gateway):
    before = default_gateway.backend_requests()
    with default_gateway.switchyard_stopped():
        routed = default_gateway.post(chat("hi"))
        passthrough = default_gateway.get("/v1/models")
    for reply in (routed, passthrough):
        assert 500 <= reply.status < 600, reply
        assert reply.json()["error"]["code"] == "router_unavailable"
        assert reply.header("x-demo-backend") is None
    assert default_gateway.backend_requests() == before
    assert default_gateway.post(chat("hi")).header("x-demo-backend") == "small"  # back after restart


def test_switchyard_too_slow_fails_closed_after_message_timeout(default_gateway):
    before = default_gateway.backend_requests()
    with default_gateway.switchyard_paused():
        started = time.monotonic()
        reply = default_gateway.post(chat("hi"))
        waited = time.monotonic() - started
    assert reply.status == 504, reply
    assert reply.json()["error"]["code"] == "router_unavailable"
    assert 0.9 < waited < 4, "message_timeout is 1 s (MESSAGE_TIMEOUT_MS)"
    assert default_gateway.backend_requests() == before
    assert default_gateway.post(chat("hi")).status == 200


# -- tenant tiers -------------------------------------------------------------------------
TENANTS = REPO / "policies" / "examples" / "tenant-tiers.yaml"
HARD = [
    "Prove that every bounded monotone sequence converges.",
    "Derive the closed form of the Fibonacci numbers.",
    "Optimize this architecture for a million users and debug its cache.",
    "hello there",
]


@pytest.fixture(scope="module")
def tenant_gateway(gateway):
    return gateway(TENANTS)


@pytest.mark.parametrize("text", HARD)
def test_free_tenant_never_reaches_large(tenant_gateway, text):
    reply = tenant_gateway.post(chat(text), headers={"x-tenant-tier": "free"})
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == "small", reply
    assert reply.header("x-demo-received-model") == "small-model"


def test_free_tenant_asking_for_large_model_is_refused(tenant_gateway):
    before = tenant_gateway.backend_requests()
    reply = tenant_gateway.post({**chat("prove it"), "model": "large-model"}, headers={"x-tenant-tier": "free"})
    assert reply.status == 403, reply
    assert reply.json()["error"]["code"] == "model_not_allowed"
    assert tenant_gateway.backend_requests() == before


@pytest.mark.parametrize("text", HARD)
def test_enterprise_tenant_reaches_large(tenant_gateway, text):
    reply = tenant_gateway.post(chat(text), headers={"x-tenant-tier": "enterprise"})
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == "large", reply
    assert reply.header("x-switchyard-rule") == "enterprise-default"


# -- policy explain agrees with Envoy -----------------------------------------------------
EXPLAINED = [  # (policy, body, headers)
    *[(DEFAULT_POLICY, body, {}) for _, body, *_ in ROUTED],
    *[(TENANTS, chat(text), {"x-tenant-tier": tier}) for text in HARD[:2] for tier in ("free", "pro", "enterprise")],
    (TENANTS, chat("prove it"), {}),
]


def _explain(policy: Path, body: dict, headers: dict[str, str], tmp_path: Path) -> dict:
    request = tmp_path / "body.json"
    request.write_text(json.dumps(body))
    argv = [sys.executable, "-m", "extproc", "policy", "explain", str(policy), "--request", str(request)]
    argv += [f"--header={k}={v}" for k, v in headers.items()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout)


@pytest.mark.parametrize(("policy", "body", "headers"), EXPLAINED,
                         ids=[f"{p.stem}-{i}" for i, (p, *_) in enumerate(EXPLAINED)])
def test_policy_explain_agrees_with_envoy(gateway, tmp_path, policy, body, headers):
    explained = _explain(policy, body, headers, tmp_path)
    reply = gateway(policy).post(body, headers=headers)
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == explained["backend"], (explained, reply)
    assert reply.header("x-switchyard-rule") == explained["rule"]
    assert reply.header("x-demo-received-model") == explained["model"]

