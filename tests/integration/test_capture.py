"""Capture through a real Envoy: the policy's ``capture:`` section under load.

Several client threads send a few hundred requests, some from a tenant that opted out, each
with its own ``x-request-id`` (Envoy keeps a client's id on an internal request, and
switchyard samples by a hash of it, so the test knows which ids the sample holds). Every
request is answered as without capture (status 200, the backend its rule names); the file's
lines parse and hold exactly the sampled ids of the other tenants, about ``sample_rate`` of
them; the opted-out tenant never appears; the prompts, which carry a unique marker, reach the
file but neither switchyard's log (at debug level) nor its metrics.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from extproc.server._capture import sampled
from tests.integration.gateway import chat
from tests.integration.test_metrics import MetricsGateway, total, wait_for

RATE = 0.5
REQUESTS = 300
THREADS = 6
MARKER = f"CAPTURE-MARKER-{uuid.uuid4().hex}"
POLICY = """\
version: 1
backends:
  small: {cluster: small, model: small-model}
  large: {cluster: large, model: large-model}
default: small
signals:
  code: {kind: keywords, keywords: [python]}
rules:
  - {name: code, when: code, backend: large}
capture:
  path: capture/requests.jsonl
  sample_rate: 0.5
  exclude_tenants: [opted-out]
"""


@pytest.fixture(scope="module")
def capture_gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("capture")
    (workdir / "capture").mkdir()
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    gateway = MetricsGateway(policy, workdir / "stack")
    gateway.stack.switchyard.argv[3:3] = ["--log-level", "debug"]  # `extproc --log-level debug serve ...`
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def tenant(i: int) -> str | None:
    return ("opted-out", "acme", None)[i % 3]


def send(gateway, i: int):
    code = i % 4 == 0
    text = f"{MARKER} request {i}" + (" about python" if code else "")
    headers = {"x-request-id": f"capture-{i}"}
    if tenant(i):
        headers["x-tenant-id"] = tenant(i)
    return i, code, gateway.post(chat(text), headers)


def test_capture_under_load_samples_the_share_skips_the_opted_out_and_routes_as_usual(capture_gateway):
    gateway = capture_gateway
    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(lambda i: send(gateway, i), range(REQUESTS)))
    for i, code, response in answers:
        assert response.status == 200, response
        expected = "large" if code else "small"
        assert response.header("x-switchyard-backend") == expected, response
        assert response.header("x-demo-backend") == expected, response

    wanted = {f"capture-{i}" for i in range(REQUESTS) if tenant(i) != "opted-out" and sampled(f"capture-{i}", RATE)}
    path = Path(gateway.stack.policy).parent / "capture" / "requests.jsonl"

    def written() -> list[dict]:
        data = path.read_bytes() if path.exists() else b""
        return [json.loads(line) for line in data.split(b"\n")[:-1]]  # every line parses

    wait_for("every sampled request in the capture file", lambda: len(written()) >= len(wanted), gateway)
    lines = written()
    assert {line["id"] for line in lines} == wanted and len(lines) == len(wanted)
    others = sum(tenant(i) != "opted-out" for i in range(REQUESTS))
    assert abs(len(lines) / others - RATE) < 0.1
    assert all(line["tenant"] in ("acme", None) for line in lines)
    by_id = {line["id"]: line for line in lines}
    for i, code, _ in answers:
        line = by_id.get(f"capture-{i}")
        if line is not None:
            assert line["messages"][0]["content"].startswith(f"{MARKER} request {i}")
            assert line["decision"]["backend"] == ("large" if code else "small")
            assert line["decision"]["rule"] == ("code" if code else "default")

    scrape = gateway.scrape()
    assert total(scrape, "switchyard_capture_written_total") == len(wanted)
    assert total(scrape, "switchyard_capture_dropped_total") == 0
    assert MARKER not in gateway.scrape_text()
    assert MARKER not in gateway.stack.switchyard.log.read_text(errors="replace")
    assert '"level": "debug"' in gateway.stack.switchyard.log.read_text(errors="replace")  # debug lines were on
