"""Every shipped policy routes its intended requests where its comments say."""

from __future__ import annotations

import pytest

from extproc import PolicyEngine, RequestError, RoutingRequest, load_policy
from tests.extproc.conftest import POLICIES, chat

IMAGE = [{"type": "text", "text": "What is in this picture?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]

CASES = {
    "default.yaml": [
        (chat("hi there, how are you?"), {}, "small", "default"),
        (chat(IMAGE), {}, "large", "images"),
        (chat("word " * 4000), {}, "large", "long-context"),
        (chat("look up the weather", tools=[{"type": "function", "function": {"name": "w"}}]), {}, "large", "agentic-tools"),
        (chat("Why does this python script raise a KeyError when I read the config?"), {}, "large", "code"),
        (chat("python?"), {}, "small", "default"),  # too short to be a real coding question
        (chat("Think step by step: how many weekdays are in March 2025?"), {}, "large", "maths-reasoning"),
        (chat("hello", model="large-model"), {}, "large", "direct"),
        (chat("hello", model="gpt-4o"), {}, "small", "default"),  # unknown names are routed
    ],
    "examples/tenant-tiers.yaml": [
        (chat("please debug my architecture"), {"x-tenant-tier": "free"}, "small", "default"),
        (chat("please debug my architecture"), {"x-tenant-tier": "pro"}, "large", "hard-question"),
        (chat("hello"), {"x-tenant-tier": "pro"}, "small", "default"),
        (chat("hello"), {"x-tenant-tier": "enterprise"}, "large", "enterprise-default"),
        (chat("please debug my architecture"), {}, "small", "default"),
        (chat("please debug my architecture"), {"x-tenant-tier": "made-up"}, "small", "default"),
    ],
    "examples/multilingual.yaml": [
        (chat("What is the capital of France?"), {}, "english", "default"),
        (chat("法国的首都是哪里？请详细说明。"), {}, "cjk", "cjk-language"),
        (chat("フランスの首都はどこですか"), {}, "cjk", "cjk-language"),
        (chat("Please translate this sentence into Japanese"), {}, "cjk", "cjk-language"),
        (chat("Please translate this sentence into German"), {}, "english", "default"),
        (chat("Translate 'good morning' in Korean"), {}, "cjk", "cjk-language"),
        (chat("¿Cuál es la capital de Francia y por qué es tan famosa?"), {}, "multilingual", "european-language"),
        (chat("Quelle est la capitale de la France et pourquoi est-elle connue ?"), {}, "multilingual", "european-language"),
    ],
    "examples/three-tier-vision.yaml": [
        (chat("hi!"), {}, "tiny", "small-talk"),
        (chat(IMAGE), {}, "vision", "vision"),
        (chat("summarise " + "text " * 300), {}, "mid", "default"),
        (chat("write a report", max_tokens=8000), {}, "vision", "long-or-big"),
        (chat("go", stream=True, tools=[{"type": "function"}]), {}, "mid", "streaming-agent"),
        (chat("word " * 20000), {}, "vision", "long-or-big"),
        (chat("hi", model="tiny-chat"), {}, "tiny", "direct"),
    ],
}


@pytest.mark.parametrize(
    "policy,body,headers,backend,rule",
    [(policy, *case) for policy, cases in CASES.items() for case in cases],
)
def test_policy_routes(policy, body, headers, backend, rule):
    decision = PolicyEngine(load_policy(POLICIES / policy)).decide(RoutingRequest.from_json(body, headers))
    assert (decision.backend.name, decision.rule) == (backend, rule), decision.explain()


def test_every_shipped_policy_is_exercised():
    shipped = {str(p.relative_to(POLICIES)) for p in POLICIES.rglob("*.yaml")}
    assert shipped == set(CASES)
    assert len(shipped) >= 4


def test_three_tier_rejects_unknown_models():
    engine = PolicyEngine(load_policy(POLICIES / "examples" / "three-tier-vision.yaml"))
    with pytest.raises(RequestError, match="does not exist"):
        engine.decide(RoutingRequest.from_json(chat("hi", model="gpt-9")))
