"""A shadow policy through a real Envoy: ``switchyard serve --shadow FILE``.

Every request is routed by the live policy exactly as without a shadow (the backend that
answers is the one the live policy names, checked against ``policy explain``'s engine), and
the (live, shadow) pair counter scraped from ``--metrics-listen`` equals ``switchyard policy
diff`` of the same requests, once every shadow decision has landed.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from extproc import PolicyEngine, RoutingRequest, load_policy
from extproc.cli._explain_many import diff_many
from tests.extproc.test_shadow import CANDIDATE, bodies
from tests.integration.gateway import DEFAULT_POLICY
from tests.integration.test_metrics import MetricsGateway, total, wait_for

REQUESTS = 1000
THREADS = 8


@pytest.fixture(scope="module")
def shadow_gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shadow")
    shadow = workdir / "candidate.yaml"
    shadow.write_text(CANDIDATE)
    gateway = MetricsGateway(DEFAULT_POLICY, workdir / "stack", "--shadow", str(shadow))
    gateway.start()
    try:
        yield gateway, shadow
    finally:
        gateway.stop()


def test_requests_route_as_without_the_shadow_and_the_pair_metric_equals_policy_diff(shadow_gateway, tmp_path):
    gateway, shadow = shadow_gateway
    requests = bodies(REQUESTS, seed=11)
    live = PolicyEngine(load_policy(DEFAULT_POLICY))
    decisions = [live.decide(RoutingRequest.from_json(body)) for body in requests]
    expected = [decision.backend.name for decision in decisions]
    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(gateway.post, requests))
    for body, decision, response in zip(requests, decisions, answers):
        assert response.status == 200, response
        assert response.header("x-switchyard-backend") == decision.backend.name, body
        assert response.json()["model"] == decision.backend.model  # the backend that answered

    def landed() -> float:  # compared or skipped: every routed request's shadow has ended
        scrape = gateway.scrape()
        return total(scrape, "switchyard_shadow_decisions_total") + total(scrape, "switchyard_shadow_skipped_total")

    wait_for("every shadow decision", lambda: landed() == REQUESTS, gateway)
    scrape = gateway.scrape()
    skipped = {dict(labels)["reason"]: value for (name, labels), value in scrape.items()
               if name == "switchyard_shadow_skipped_total" and value}
    assert not skipped, f"shadow decisions skipped: {skipped}\n{gateway.logs()}"
    pairs = {(dict(labels)["live"], dict(labels)["shadow"]): value
             for (name, labels), value in scrape.items() if name == "switchyard_shadow_decisions_total"}
    lines = tmp_path / "requests.jsonl"
    lines.write_text("".join(json.dumps(body) + "\n" for body in requests))
    out = io.StringIO()
    assert diff_many(load_policy(DEFAULT_POLICY), load_policy(shadow), lines, {}, out) == 0
    summary = json.loads(out.getvalue().splitlines()[-1])["summary"]
    assert {(p["a"], p["b"]): p["requests"] for p in summary["pairs"]} == {k: v for k, v in pairs.items() if v}
    assert total(scrape, "switchyard_shadow_cost_total", policy="shadow") == pytest.approx(summary["b"]["cost"])
    assert total(scrape, "switchyard_shadow_large_total", policy="live") / REQUESTS == pytest.approx(
        summary["a"]["large_share"])
