"""Money budgets (policy ``budgets:``): the cost of a request, the charge, what a spent budget
does, the policy's checks, and two replicas spending one budget in one real Valkey.

The engine is the real one; the stores are a MemoryStore on a fake clock, or RedisStores
standing for two replicas. No scorer, no network beyond loopback Valkey.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from extproc import PolicyEngine, PolicyError, RoutingRequest, parse_policy
from extproc._errors import RequestError
from extproc.engine._engine import SignalMemo
from extproc.policy._sections import BudgetsConfig, Price
from extproc.state import MemoryStore, RedisStore
from extproc.traffic._budgets import (
    BUDGET_RULE,
    MAX_OUTPUT_TOKENS,
    Budgets,
    budget_name,
    output_tokens,
    request_cost,
    store_key,
)

from tests.extproc.conftest import chat

#: Hang guard for calls that must return: generous, never a timing assertion.
RETURNS_WITHIN_S = 10.0

# small: 1 per million tokens both ways; large: 1000 per million in, 2000 out. A 4-token prompt
# with max_tokens 1000 costs 0.001004 on small and 2.004 on large.
POLICY = """
version: 1
backends:
  small: {cluster: small, model: s-model, price: {input_per_mtok: 1, output_per_mtok: 1}}
  large: {cluster: large, model: l-model, price: {input_per_mtok: 1000, output_per_mtok: 2000}}
  text: {cluster: text, model: t-model, supports_images: false, price: {input_per_mtok: 1, output_per_mtok: 1}}
  free: {cluster: free, model: f-model}
default: large
tenants:
  allow:
    narrow: [large]
budgets:
  limits: {default: 5, acme: 9}
  when_spent: WHEN
"""
PROMPT = "abcd efgh ijkl"  # 3 words, 12 characters: (12 + 9) // 4 = 5 tokens


def engine(when="{backend: small}", extra="") -> PolicyEngine:
    return PolicyEngine(parse_policy(POLICY.replace("WHEN", when) + extra))


def request(tenant="acme", max_tokens=1000, content=PROMPT, **fields) -> RoutingRequest:
    body = chat(content, max_tokens=max_tokens, **fields) if max_tokens is not None else chat(content, **fields)
    headers = {"x-tenant-id": tenant} if tenant is not None else {}
    return RoutingRequest(headers=headers, body=body)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, RETURNS_WITHIN_S))


async def settle(budgets: Budgets, eng: PolicyEngine, req: RoutingRequest):
    memo = SignalMemo(req)
    return await budgets.charge(eng, req, eng.decide(req, memo=memo), memo)


# -- the cost of a request -------------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    ({"max_tokens": 10}, 10),
    ({"max_completion_tokens": 7, "max_tokens": 10}, 7),  # the newer name wins
    ({"max_tokens": 0}, 0),
    ({}, 256),
    (None, 256),
    ({"max_tokens": -5}, 256),
    ({"max_tokens": 2.5}, 256),
    ({"max_tokens": "100"}, 256),
    ({"max_tokens": True}, 256),
    ({"max_tokens": None, "max_completion_tokens": None}, 256),
    ({"max_tokens": 10**400}, MAX_OUTPUT_TOKENS),  # an int too large for a float: capped, finite
])
def test_output_tokens_read_the_body_or_take_the_default(body, expected):
    assert output_tokens(body, 256) == expected


def test_cost_is_per_million_tokens_and_zero_without_a_price():
    price = Price(input_per_mtok=0.15, output_per_mtok=0.6)
    assert request_cost(price, 1_000_000, 0) == pytest.approx(0.15)
    assert request_cost(price, 2_000, 1_000) == pytest.approx((2_000 * 0.15 + 1_000 * 0.6) / 1e6)
    assert request_cost(None, 10**9, 10**9) == 0.0
    huge = request_cost(Price(1e300, 1e300), 10**9, MAX_OUTPUT_TOKENS)
    assert huge > 0 and huge != float("nan")


def test_the_budget_name_is_the_header_value_and_odd_names_are_hashed_in_the_store():
    config = BudgetsConfig(header="x-tenant-id")
    assert budget_name(config, request(tenant="  acme ")) == "acme"
    assert budget_name(config, request(tenant=None)) == ""
    assert store_key("acme") == "budget:acme"
    odd = store_key("a b\n" + "x" * 500)
    assert odd.startswith("budget:#") and len(odd) < 50 and "\n" not in odd


# -- charging and a spent budget -------------------------------------------------------------------

def test_a_tenant_is_charged_until_its_budget_is_spent_then_goes_to_the_budget_backend():
    clock = Clock(1_000.0)
    eng, store = engine(), MemoryStore(clock=clock)
    budgets = Budgets(store, clock=clock)

    async def scenario():
        routes = [(await settle(budgets, eng, request())).backend.name for _ in range(6)]
        return routes, await store.read_window(store_key("acme"), 86400)

    routes, spent = run(scenario())
    cost = (5 * 1000 + 1000 * 2000) / 1e6  # 2.005 on large
    assert routes == ["large"] * 4 + ["small"] * 2  # 4 × 2.005 = 8.02 fits 9; a fifth would not
    assert spent == pytest.approx(4 * cost)  # the budget backend's requests are not charged
    decision = run(settle(budgets, eng, request()))
    assert decision.rule == BUDGET_RULE and decision.rewrite_model
    assert decision.metadata()["rule"] == "budget" and ("default", "budget spent") in decision.skipped


def test_another_tenant_is_unaffected_and_unlisted_tenants_share_nothing_but_the_default_limit():
    clock = Clock(1_000.0)
    eng, store = engine(), MemoryStore(clock=clock)
    budgets = Budgets(store, clock=clock)

    async def scenario():
        for _ in range(5):
            await settle(budgets, eng, request("acme"))
        beta = [(await settle(budgets, eng, request("beta"))).backend.name for _ in range(3)]
        gamma = (await settle(budgets, eng, request("gamma"))).backend.name
        return beta, gamma

    beta, gamma = run(scenario())
    assert beta == ["large", "large", "small"]  # default limit 5: two requests of 2.005
    assert gamma == "large"  # its own budget of 5


def test_a_window_rollover_starts_the_spend_again():
    clock = Clock(86400.0 * 100 + 10)
    eng, store = engine(), MemoryStore(clock=clock)
    budgets = Budgets(store, clock=clock)

    async def scenario():
        first = [(await settle(budgets, eng, request())).backend.name for _ in range(5)]
        clock.now += 86400.0  # the next UTC day
        second = (await settle(budgets, eng, request())).backend.name
        return first, second

    first, second = run(scenario())
    assert first[-1] == "small" and second == "large"


def test_reject_answers_429_budget_exhausted_with_the_seconds_to_the_next_window():
    clock = Clock(86400.0 * 100 + 86400 - 90.5)  # 90.5 s before the day's window ends
    eng, store = engine(when="{reject: true}"), MemoryStore(clock=clock)
    budgets = Budgets(store, clock=clock)

    async def scenario():
        for _ in range(4):
            await settle(budgets, eng, request())
        await settle(budgets, eng, request())

    with pytest.raises(RequestError) as raised:
        run(scenario())
    assert raised.value.status == 429 and raised.value.code == "budget_exhausted"
    assert "'acme'" in str(raised.value) and "starts again at 1970-04-12T00:00:00Z" in str(raised.value)
    assert raised.value.retry_after_s == 91


def test_a_budget_backend_the_request_cannot_use_means_429():
    budgets = Budgets(MemoryStore(clock=Clock(1_000.0)))
    with pytest.raises(RequestError) as raised:  # the tenant may not use `small`
        run(settle(budgets, engine(), request("narrow", max_tokens=10**7)))
    assert raised.value.status == 429 and "not allowed for tenant" in str(raised.value)
    image = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]
    with pytest.raises(RequestError) as raised:  # `text` takes no images
        run(settle(budgets, engine(when="{backend: text}"), request(max_tokens=10**7, content=image)))
    assert raised.value.status == 429 and "images" in str(raised.value)


def test_a_request_dearer_than_the_whole_limit_never_touches_the_spend():
    store = MemoryStore(clock=Clock(1_000.0))
    decision = run(settle(Budgets(store), engine(), request(max_tokens=10**400)))
    assert decision.backend.name == "small"
    assert run(store.read_window(store_key("acme"), 86400)) == 0.0


def test_free_backends_unlisted_budgets_and_policies_without_budgets_are_not_charged():
    store = MemoryStore(clock=Clock(1_000.0))
    budgets = Budgets(store)
    free = run(settle(budgets, engine(), request(model="f-model")))
    assert free.backend.name == "free" and len(store) == 0
    no_default = PolicyEngine(parse_policy(POLICY.replace("WHEN", "{reject: true}").replace("default: 5, ", "")))
    assert run(settle(budgets, no_default, request("beta", max_tokens=10**7))).backend.name == "large"
    plain = PolicyEngine(parse_policy(POLICY.split("budgets:")[0]))
    assert run(settle(budgets, plain, request(max_tokens=10**7))).backend.name == "large"
    assert len(store) == 0


# -- the policy's checks ------------------------------------------------------------------------------

def _problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as raised:
        parse_policy(text, source="p.yaml")
    return [str(problem) for problem in raised.value.problems]


@pytest.mark.parametrize("when, expected", [
    ("{backend: tiny}", "p.yaml:14:16: `budgets.when_spent.backend` names backend 'tiny', which is not defined"),
    ("{backend: small, reject: true}", "p.yaml:14:3: `budgets.when_spent` needs exactly one of"),
    ("{}", "p.yaml:14:3: `budgets.when_spent` needs exactly one of"),
    ("{reject: false}", "p.yaml:14:16: `budgets.when_spent.reject` must be `true`"),
])
def test_when_spent_is_checked_at_its_line_and_column(when, expected):
    problems = _problems(POLICY.replace("WHEN", when))
    assert any(p.startswith(expected) for p in problems), problems


def test_negative_limits_and_bad_prices_are_errors_at_their_line_and_column():
    text = POLICY.replace("WHEN", "{backend: small}").replace("acme: 9", "acme: -9")
    assert any(p.startswith("p.yaml:13:30: `budgets.limits.acme` must be >= 0") for p in _problems(text))
    text = POLICY.replace("WHEN", "{backend: small}").replace("output_per_mtok: 2000", "output_per_mtok: -1")
    assert any(p.startswith("p.yaml:5:90: `backends.large.price.output_per_mtok` must be >= 0") for p in _problems(text))
    text = POLICY.replace("WHEN", "{backend: small}").replace("input_per_mtok: 1000", "input_per_tok: 1000")
    assert any("Unknown key `input_per_tok` in `backends.large.price`" in p and p.startswith("p.yaml:5:")
               for p in _problems(text))


def test_when_spent_is_required_and_the_header_defaults_to_the_tenants_header():
    assert any("`budgets.when_spent` is required" in p for p in _problems(POLICY.replace("  when_spent: WHEN\n", "")))
    policy = parse_policy(POLICY.replace("WHEN", "{reject: true}").replace("tenants:", "tenants:\n  header: X-Org"))
    assert policy.budgets.header == "x-org"
    keyed = parse_policy(POLICY.replace("WHEN", "{reject: true}") + "  key: {header: X-Team}\n")
    assert keyed.budgets.header == "x-team"


# -- two replicas, one real Valkey -------------------------------------------------------------------------

def test_two_replicas_spending_one_budget_stop_at_the_limit(redis_server):
    """Two stores (two replicas) charge one budget concurrently: the spend admitted never passes
    the limit, and together they admit exactly what fits."""
    eng = engine(when="{reject: true}")
    cost = (5 * 1000 + 1000 * 2000) / 1e6
    limit = 9.0

    async def scenario():
        stores = [RedisStore(redis_server.url, timeout_s=5.0, key_prefix="t:") for _ in range(2)]
        replicas = [Budgets(store) for store in stores]

        async def one(budgets):
            try:
                await settle(budgets, eng, request())
                return True
            except RequestError:
                return False

        try:
            admitted = await asyncio.gather(*(one(replicas[i % 2]) for i in range(40)))
            spent = await stores[0].read_window(store_key("acme"), 86400)
        finally:
            for store in stores:
                await store.aclose()
        return admitted, spent

    admitted, spent = run(scenario())
    assert sum(admitted) == int(limit // cost) == 4
    assert spent == pytest.approx(4 * cost) and spent <= limit + cost


# -- the servicer's hook -----------------------------------------------------------------------------

def test_the_servicer_stays_synchronous_without_budgets_and_charges_with_them():
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ext

    from extproc.server._servicer import RequestStream
    from extproc.telemetry._instruments import Telemetry
    from extproc.traffic._budgets import FleetLimits

    def body_answer(eng, limits):
        stream = RequestStream(eng, Telemetry(), limits=limits)
        headers = ext.ProcessingRequest()
        for key, value in [(":method", "POST"), (":path", "/v1/chat/completions"),
                           ("content-type", "application/json"), ("x-tenant-id", "acme")]:
            headers.request_headers.headers.headers.add(key=key, raw_value=value.encode())
        stream.handle(headers)
        body = ext.ProcessingRequest()
        body.request_body.body = json.dumps(chat(PROMPT, max_tokens=10**7)).encode()
        body.request_body.end_of_stream = True
        return stream.handle(body)

    store = MemoryStore(clock=Clock(1_000.0))
    limits = FleetLimits(store)
    plain = PolicyEngine(parse_policy(POLICY.split("budgets:")[0]))
    assert isinstance(body_answer(plain, limits), ext.ProcessingResponse)  # no await on the plain path
    answer = body_answer(engine(when="{reject: true}"), limits)
    assert not isinstance(answer, ext.ProcessingResponse)
    response = run(answer)
    assert response.immediate_response.status.code == 429
    assert json.loads(response.immediate_response.body)["error"]["code"] == "budget_exhausted"
    retry_after = {h.header.key: h.header.raw_value for h in response.immediate_response.headers.set_headers}
    assert 1 <= int(retry_after["retry-after"]) <= 86400
