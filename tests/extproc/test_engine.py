"""PolicyEngine: rule order, lazy signals, direct models, tenants, eligibility."""

from __future__ import annotations

import pytest

from extproc import PolicyEngine, PolicyError, RequestError, RoutingRequest, load_policy, parse_policy
from tests.extproc.conftest import POLICIES, chat

POLICY = """
version: 1
backends:
  small: {cluster: c-small, model: s, supports_images: false, max_context_tokens: 50}
  large: {cluster: c-large, model: l}
default: small
tenants:
  header: x-tenant
  allow:
    free: [small]
signals:
  code: {kind: keywords, keywords: [python]}
  long: {kind: token_count, above: 20}
  image: {kind: modality}
  stream: {kind: request_field, field: stream, equals: true}
  vip: {kind: header, header: x-plan, values: [vip]}
rules:
  - {name: code, when: code, backend: large}
  - {name: long, when: {all: [long, {not: stream}]}, backend: large}
  - {name: vip, when: vip, backend: large}
"""


@pytest.fixture
def engine():
    return PolicyEngine(parse_policy(POLICY))


def decide(engine, body, **headers):
    return engine.decide(RoutingRequest.from_json(body, {k.replace("_", "-"): v for k, v in headers.items()}))


def test_first_matching_rule_wins_and_model_is_rewritten(engine):
    decision = decide(engine, chat("write python please"))
    assert (decision.backend.name, decision.rule, decision.model) == ("large", "code", "l")
    assert decision.rewrite_model
    assert decision.metadata()["cluster"] == "c-large"


def test_no_rule_means_default(engine):
    decision = decide(engine, chat("hello"))
    assert (decision.backend.name, decision.rule) == ("small", "default")


def test_signals_are_lazy_and_short_circuit(engine):
    decision = decide(engine, chat("python"))
    assert list(decision.signals) == ["code"]  # later rules' signals never computed
    decision = decide(engine, chat("short"))
    assert "stream" not in decision.signals  # `all` stopped at `long` = false
    assert decision.signals["long"].value == 2


def test_nested_not(engine):
    long_text = "word " * 100
    assert decide(engine, chat(long_text)).rule == "long"
    assert decide(engine, chat(long_text, stream=True)).backend.name == "large"  # small cannot hold it
    assert decide(engine, chat(long_text, stream=True)).rule == "default"


def test_header_signal(engine):
    assert decide(engine, chat("hi"), x_plan="vip").rule == "vip"
    assert decide(engine, chat("hi"), x_plan="basic").rule == "default"


def test_direct_model_goes_straight_to_its_backend(engine):
    decision = decide(engine, chat("python", model="s"))
    assert (decision.backend.name, decision.rule, decision.rewrite_model) == ("small", "direct", False)
    assert decide(engine, chat("hi", model="large")).backend.name == "large"  # backend name works too
    assert decision.signals == {}


def test_tenant_restricted_to_small_never_reaches_large(engine):
    for body in (chat("python"), chat("word " * 10), chat("hi")):
        assert decide(engine, body, x_tenant="free").backend.name == "small"
    decision = decide(engine, chat("python"), x_tenant="free")
    assert ("code", "backend not allowed for tenant") in decision.skipped
    with pytest.raises(RequestError) as info:
        decide(engine, chat("hi", model="l"), x_tenant="free")
    assert (info.value.status, info.value.code) == (403, "model_not_allowed")


def test_images_never_go_to_a_text_only_backend(engine):
    body = {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]}
    decision = decide(engine, body)
    assert decision.backend.name == "large" and decision.rule == "default"
    with pytest.raises(RequestError) as info:  # the free tenant has no backend for images
        decide(engine, body, x_tenant="free")
    assert (info.value.status, info.value.code) == (503, "no_eligible_backend")


def test_unknown_model_routed_or_rejected():
    policy = load_policy(POLICIES / "examples" / "three-tier-vision.yaml")
    with pytest.raises(RequestError) as info:
        PolicyEngine(policy).decide(RoutingRequest.from_json(chat("hi", model="gpt-17")))
    assert (info.value.status, info.value.code) == (404, "model_not_found")
    routed = PolicyEngine(parse_policy(POLICY)).decide(RoutingRequest.from_json(chat("hi", model="gpt-17")))
    assert routed.rule == "default" and routed.requested_model == "gpt-17"


def test_request_without_body_is_decided_on_headers(engine):
    request = RoutingRequest(headers={"x-plan": "vip"}, body=None)
    decision = engine.decide(request)
    assert decision.rule == "vip" and not decision.rewrite_model


IMAGE_BODY = {"model": "s", "messages": [{"role": "user", "content": [
    {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]}


@pytest.mark.parametrize(("body", "code"), [
    (IMAGE_BODY, "images_not_supported"),
    (chat("word " * 100, model="s"), "context_length_exceeded"),
    (chat("word " * 100, model="small"), "context_length_exceeded"),  # by backend name too
])
def test_a_direct_model_keeps_its_backends_limits(engine, body, code):
    with pytest.raises(RequestError) as info:
        decide(engine, body)
    assert (info.value.status, info.value.code) == (400, code)
    assert "'s'" in str(info.value) or "'small'" in str(info.value)
    # the same request sent to the router goes where it fits
    assert decide(engine, {**body, "model": "auto"}).backend.name == "large"


def test_a_direct_model_within_its_limits_goes_there(engine):
    decision = decide(engine, chat("word " * 10, model="s"))
    assert (decision.backend.name, decision.rule) == ("small", "direct")


TIERS = POLICY.replace("    free: [small]\n", "    free: [small]\n    pro: [small, large]\n    vip: [large]\n")


@pytest.mark.parametrize(("tenant", "allowed"), [
    ("free", ("small",)),
    (" pro ", ("small", "large")),  # surrounding whitespace is not part of the name
    ("pro,free", ("small",)),  # a repeated header, joined by Envoy: the least privileged reading
    ("free, pro", ("small",)),
    ("pro,nobody", ("small", "large")),  # unlisted and no `otherwise`: everything
    ("pro,pro", ("small", "large")),
])
def test_an_ambiguous_tenant_gets_what_every_reading_allows(tenant, allowed):
    engine = PolicyEngine(parse_policy(TIERS))
    assert engine.allowed_backends(tenant) == allowed
    backend = decide(engine, chat("python"), x_tenant=tenant).backend.name
    assert backend == ("large" if "large" in allowed else "small")


def test_tenant_readings_that_share_nothing_are_refused():
    engine = PolicyEngine(parse_policy(TIERS))
    for tenant in ("free,vip", "vip, free", "free,pro,vip"):
        with pytest.raises(RequestError) as info:
            decide(engine, chat("hi"), x_tenant=tenant)
        assert (info.value.status, info.value.code) == (403, "ambiguous_tenant")


def test_with_otherwise_an_ambiguous_tenant_never_gets_more_than_an_unlisted_one():
    engine = PolicyEngine(parse_policy(TIERS.replace("  allow:\n", "  otherwise: [small]\n  allow:\n")))
    assert engine.allowed_backends("vip") == ("large",)
    assert engine.allowed_backends("nobody") == ("small",)
    assert engine.allowed_backends("pro,nobody") == ("small",)
    with pytest.raises(RequestError) as info:  # vip alone may reach only large; unlisted only small
        engine.allowed_backends("vip,vip")
    assert info.value.code == "ambiguous_tenant"


# -- a scorer's own fallback (scorers.<name>.fallback) ------------------------------------------
SCORED = """
version: 1
backends:
  small: {cluster: small, model: s}
  medium: {cluster: medium, model: m}
  large: {cluster: large, model: l}
default: small
fallback: large
tenants:
  allow:
    free: [small, large]
scorers:
  probe:
    kind: probe
    checkpoints: {p: unused}
    remote: {target: "127.0.0.1:9"}
    fallback: medium
  other:
    kind: probe
    checkpoints: {q: unused}
    remote: {target: "127.0.0.1:9"}
signals:
  tools: {kind: request_field, field: tools, present: true}
  p_ok: {kind: score, scorer: probe, above: 0.5}
  q_ok: {kind: score, scorer: other, above: 0.5}
rules:
  - {name: other, when: {all: [tools, {not: q_ok}]}, backend: large}
  - {name: probe, when: {not: p_ok}, backend: large}
"""


@pytest.mark.parametrize("reason", ["overload", "breaker_open", "deadline", "error", "non_finite"])
def test_a_failed_scorer_takes_its_own_fallback(reason):
    from extproc import ScorerFailure

    engine = PolicyEngine(parse_policy(SCORED))
    decision = engine.decide(RoutingRequest.from_json(chat("hello")), {"probe": ScorerFailure(reason)})
    assert (decision.backend.name, decision.rule, decision.fallback) == ("medium", "fallback", f"probe: {reason}")


def test_a_scorer_without_its_own_fallback_takes_the_policys():
    from extproc import ScorerFailure

    engine = PolicyEngine(parse_policy(SCORED))
    decision = engine.decide(RoutingRequest.from_json(chat("hello", tools=[{"type": "function"}])),
                             {"other": ScorerFailure("overload")})
    assert (decision.backend.name, decision.fallback) == ("large", "other: overload")


def test_a_scorers_fallback_the_tenant_cannot_reach_gives_the_tenants_first_backend():
    from extproc import ScorerFailure

    engine = PolicyEngine(parse_policy(SCORED))
    request = RoutingRequest.from_json(chat("hello"), {"x-tenant-id": "free"})
    decision = engine.decide(request, {"probe": ScorerFailure("breaker_open")})
    assert (decision.backend.name, decision.fallback) == ("small", "probe: breaker_open")


def test_a_scorers_fallback_must_name_a_backend():
    from extproc import PolicyError

    text = SCORED.replace("fallback: medium", "fallback: nowhere")
    with pytest.raises(PolicyError) as error:
        parse_policy(text, source="p.yaml")
    line = text.splitlines().index("    fallback: nowhere") + 1
    assert f"p.yaml:{line}:" in str(error.value)
    assert "`scorers.probe.fallback` names backend 'nowhere', which is not defined" in str(error.value)


CATCH_ALL = """
version: 1
backends:
  small: {cluster: small, model: s, supports_images: false}
  large: {cluster: large, model: l}
default: small
signals:
  code: {kind: keywords, keywords: [python]}
rules:
  - {name: code, when: code, backend: large}
  - {name: rest, backend: large}
  - {name: never, when: code, backend: small}
"""


@pytest.mark.parametrize("when", ["", "when: always, "])
def test_a_rule_without_when_or_with_always_is_a_catch_all(when):
    text = CATCH_ALL.replace("{name: rest, ", "{name: rest, " + when)
    engine = PolicyEngine(parse_policy(text))
    decision = engine.decide(RoutingRequest.from_json(chat("hello there")))
    assert (decision.rule, decision.backend.name) == ("rest", "large")
    assert engine.decide(RoutingRequest.from_json(chat("python please"))).rule == "code"
    assert set(decision.signals) == {"code"}  # only the rule before it evaluated one


def test_always_is_a_reserved_signal_name():
    text = CATCH_ALL.replace("  code: {kind", "  always: {kind: keywords, keywords: [x]}\n  code: {kind")
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="p.yaml")
    assert "p.yaml:8:3: `always` is reserved" in str(info.value)
