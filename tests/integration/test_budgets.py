"""Money budgets (policy ``budgets:``) through a real Envoy and switchyard.

Tenant `acme` may spend 5 a day; each request it sends to `large` costs 2.004 (4 prompt tokens
at 1000 per million, 1000 output tokens at 2000 per million), so two fit and the third goes to
the budget backend `small` (`x-switchyard-rule: budget`, body rewritten to `small-model`).
Tenant `beta` has its own budget and is unaffected. Tenant `narrow` may use only `large`, so
once its budget is spent it is answered 429 with the OpenAI-style JSON error `budget_exhausted`.
Two gateways (each its own Envoy and `switchyard serve`) sharing one Valkey spend one budget:
concurrent requests through both stop at the limit.
"""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

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


@pytest.fixture(scope="module")
def gw(gateway, tmp_path_factory) -> Gateway:
    path = tmp_path_factory.mktemp("budgets") / "budgets.yaml"
    path.write_text(textwrap.dedent(POLICY).lstrip())
    return gateway(path)


def test_a_tenant_that_spends_its_budget_goes_to_the_cheaper_backend_and_another_is_unaffected(gw):
    acme = [gw.post(ASK, {"x-tenant-id": "acme"}) for _ in range(3)]
    assert [r.status for r in acme] == [200, 200, 200], acme
    assert [r.header("x-demo-backend") for r in acme] == ["large", "large", "small"], acme
    assert [r.header("x-switchyard-rule") for r in acme] == ["default", "default", "budget"], acme
    assert acme[2].header("x-demo-received-model") == "small-model", acme[2]
    beta = gw.post(ASK, {"x-tenant-id": "beta"})
    assert beta.status == 200 and beta.header("x-demo-backend") == "large", beta


def test_a_spent_budget_whose_cheaper_backend_the_tenant_may_not_use_is_a_429_json_error(gw):
    first, second, third = (gw.post(ASK, {"x-tenant-id": "narrow"}) for _ in range(3))
    assert first.header("x-demo-backend") == "large" and second.header("x-demo-backend") == "large"
    assert third.status == 429, third
    assert third.header("content-type") == "application/json", third
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
            answers = list(pool.map(lambda i: gateways[i % 2].post(ASK, {"x-tenant-id": "shared"}), range(12)))
    finally:
        for gateway in gateways:
            gateway.stop()
        redis.stop()
    assert [a.status for a in answers] == [200] * 12, answers
    backends = sorted(a.header("x-demo-backend") for a in answers)
    assert backends == ["large"] * 2 + ["small"] * 10, answers
    assert {a.header("x-switchyard-rule") for a in answers if a.header("x-demo-backend") == "small"} == {"budget"}
