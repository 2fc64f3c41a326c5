"""Money budgets (policy ``budgets:``) through a real Envoy and switchyard.

Tenant `acme` may spend 5 a day; each request it sends to `large` costs 2.004 (4 prompt tokens
at 1000 per million, 1000 output tokens at 2000 per million), so two fit and the third goes to
the budget backend `small` (`x-switchyard-rule: budget`, body rewritten to `small-model`).
Tenant `beta` has its own budget and is unaffected. Tenant `narrow` may use only `large`, so
once its budget is spent it is answered 429 with the OpenAI-style JSON error `budget_exhausted`.
Two gateways (each its own Envoy and `switchyard serve`) sharing one Valkey spend one budget:
concurrent requests through both stop at the limit.

The demo backends' SSE streams carry no `usage` chunk, so above (requests with `"stream": true`)
every charge stays the estimate. With a
`large` stub that reports `usage` (10 output tokens, JSON or an SSE stream with a usage chunk),
the usage filter corrects each charge to 0.024, so far more requests of one tenant reach `large`
before its budget is spent; the bytes the client receives are the stub's, unchanged.
"""

from __future__ import annotations

import http.client
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.processes import Child, free_port
from harness.redis import RedisServer
from tests.integration.gateway import Gateway, chat

POLICY = """
version: 1
backends:
  small: {cluster: small, model: small-model, price: {input_per_mtok: 1, output_per_mtok: 1}}
  large: {cluster: large, model: large-model, price: {input_per_mtok: 1000, output_per_mtok: 2000}}
default: large
tenants:
  allow:
    narrow: [large]
budgets:
  limits: {default: 5}
  when_spent: {backend: small}
"""
ASK = chat("what is it", max_tokens=1000)  # 3 words, 10 characters: (8 + 9) // 4 = 4 tokens
#: The demo backends' streams carry no `usage` chunk, so each charge stays the estimate.
STREAMED = {**ASK, "stream": True}


@pytest.fixture(scope="module")
def gw(gateway, tmp_path_factory) -> Gateway:
    path = tmp_path_factory.mktemp("budgets") / "budgets.yaml"
    path.write_text(textwrap.dedent(POLICY).lstrip())
    return gateway(path)


def test_a_tenant_that_spends_its_budget_goes_to_the_cheaper_backend_and_another_is_unaffected(gw):
    acme = [gw.post(STREAMED, {"x-tenant-id": "acme"}) for _ in range(3)]
    assert [r.status for r in acme] == [200, 200, 200], acme
    assert [r.header("x-demo-backend") for r in acme] == ["large", "large", "small"], acme
    assert [r.header("x-switchyard-rule") for r in acme] == ["default", "default", "budget"], acme
    assert acme[2].header("x-demo-received-model") == "small-model", acme[2]
    beta = gw.post(STREAMED, {"x-tenant-id": "beta"})
    assert beta.status == 200 and beta.header("x-demo-backend") == "large", beta


def test_a_spent_budget_whose_cheaper_backend_the_tenant_may_not_use_is_a_429_json_error(gw):
    first, second, third = (gw.post(STREAMED, {"x-tenant-id": "narrow"}) for _ in range(3))
    assert first.header("x-demo-backend") == "large" and second.header("x-demo-backend") == "large"
    assert third.status == 429, third
    assert third.header("content-type") == "application/json", third
    assert 1 <= int(third.header("retry-after")) <= 86400, third  # seconds to the next window
    error = third.json()["error"]
    assert error["code"] == "budget_exhausted" and "narrow" in error["message"], error
    assert third.header("x-demo-backend") is None, third


def test_two_replicas_sharing_a_store_spend_one_budget_and_stop_at_its_limit(tmp_path):
    """12 concurrent requests of one tenant, alternating between two gateways: exactly two fit
    the budget of 5 (2.004 each) and reach `large`; the other ten go to `small`."""
    redis = RedisServer(tmp_path / "redis").start()
    policy = tmp_path / "budgets.yaml"
    policy.write_text(textwrap.dedent(POLICY).lstrip() + f'state:\n  redis: {{url: "{redis.url}", timeout_ms: 200}}\n')
    gateways = []
    try:
        for name in ("a", "b"):
            gateways.append(Gateway(policy, tmp_path / name))
            gateways[-1].start()
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: gateways[i % 2].post(STREAMED, {"x-tenant-id": "shared"}), range(12)))
    finally:
        for gateway in gateways:
            gateway.stop()
        redis.stop()
    assert [a.status for a in answers] == [200] * 12, answers
    backends = sorted(a.header("x-demo-backend") for a in answers)
    assert backends == ["large"] * 2 + ["small"] * 10, answers
    assert {a.header("x-switchyard-rule") for a in answers if a.header("x-demo-backend") == "small"} == {"budget"}


#: A `large` backend that reports `usage` (4 prompt, 10 output tokens): a JSON chat completion,
#: or with `"stream": true` an SSE stream whose last chunk before `[DONE]` carries the usage;
#: 503 for a request with `x-stub-fail`. Each answer's bytes are fixed, so the client's can be compared.
USAGE_BACKEND = """\
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USAGE = {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}
ANSWER = json.dumps({"object": "chat.completion", "model": "large-model", "usage": USAGE, "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok \u00e9\u2028"}, "finish_reason": "stop"}]}).encode()
CHUNK = {"object": "chat.completion.chunk", "model": "large-model", "usage": None,
         "choices": [{"index": 0, "delta": {"content": "ok"}}]}
STREAM = (b"data: " + json.dumps(CHUNK).encode() + b"\\n\\n"
          + b"data: " + json.dumps({**CHUNK, "choices": [], "usage": USAGE}).encode() + b"\\n\\n"
          + b"data: [DONE]\\n\\n")

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self, status, data, content_type="application/json"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer(200, b'{"status": "ok"}')

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        if self.headers.get("x-stub-fail"):
            self._answer(503, b'{"error": {"message": "down", "code": "down"}}')
        elif body.get("stream"):
            self._answer(200, STREAM, "text/event-stream")
        else:
            self._answer(200, ANSWER)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""
#: What the stub sends (its constants, run here), as the client must receive it byte for byte.
STUB: dict = {}
exec(USAGE_BACKEND.split("class Handler")[0], STUB)  # noqa: S102 - the test's own stub text
USAGE = STUB["USAGE"]
CORRECTED_COST = (4 * 1000 + 10 * 2000) / 1e6  # 0.024 on large, against 2.004 charged
DEADLINE_S = 30.0


class UsageGateway(Gateway):
    """The budgets gateway with the usage-reporting `large` stub and switchyard's metrics on a port."""

    def __init__(self, policy, workdir) -> None:
        super().__init__(policy, workdir)
        stack = self.stack
        script = stack.workdir / "usage_backend.py"
        script.write_text(USAGE_BACKEND)
        stack.backends["large"] = Child("backend-large", [sys.executable, str(script), str(stack.ports.backends["large"])],
                                        stack.workdir / "backend-large.log")
        self.metrics_port = free_port()
        stack.switchyard.argv += ["--metrics-listen", f"127.0.0.1:{self.metrics_port}"]

    def corrections(self) -> dict[str, float]:
        """``switchyard_budget_corrections_total`` by result."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        return {sample.labels["result"]: sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "switchyard_budget_corrections_total"}

    def corrected(self, count: int) -> dict[str, float]:
        """Wait until ``count`` responses have been through the usage filter (no timing asserted)."""
        deadline = time.monotonic() + DEADLINE_S
        while sum((seen := self.corrections()).values()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} corrections never counted: {seen}\n{self.logs()}")
            time.sleep(0.05)
        return seen


@pytest.fixture(scope="module")
def usage_gw(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("usage")
    path = workdir / "budgets.yaml"
    path.write_text(textwrap.dedent(POLICY).lstrip())
    gateway = UsageGateway(path, workdir / "stack").start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_charges_corrected_from_usage_let_far_more_requests_through_and_bytes_are_unchanged(usage_gw):
    """Without usage two requests fit the budget of 5 (above); corrected to 0.024 each, ten do."""
    routes = []
    for n in range(1, 11):
        answer = usage_gw.post(ASK, {"x-tenant-id": "frugal"})
        assert answer.status == 200, answer
        routes.append(answer.header("x-demo-backend") or answer.header("x-switchyard-backend"))
        assert answer.body == STUB["ANSWER"], answer
        assert usage_gw.corrected(n) == {"corrected": n}
    assert routes == ["large"] * 10, routes


def test_an_sse_stream_with_a_usage_chunk_is_corrected_and_reaches_the_client_unchanged(usage_gw):
    before = usage_gw.corrections()
    streamed = usage_gw.post(chat("what is it", max_tokens=1000, stream=True,
                                  stream_options={"include_usage": True}), {"x-tenant-id": "streamer"})
    assert streamed.status == 200 and streamed.header("content-type") == "text/event-stream", streamed
    assert streamed.body == STUB["STREAM"], streamed
    after = usage_gw.corrected(sum(before.values()) + 1)
    assert after.get("corrected", 0) == before.get("corrected", 0) + 1, after


def test_a_failed_backend_answer_refunds_the_whole_charge(usage_gw):
    """503s from `large`: each charge (2.004) is given back, so the tenant's budget of 5 never fills."""
    before = usage_gw.corrections()
    for n in range(1, 5):
        failed = usage_gw.post(ASK, {"x-tenant-id": "unlucky", "x-stub-fail": "1"})
        assert failed.status == 503 and failed.header("x-switchyard-backend") == "large", failed
        usage_gw.corrected(sum(before.values()) + n)
    assert usage_gw.corrections().get("refunded", 0) == before.get("refunded", 0) + 4
