"""Failover without Envoy: the policy's ``fallbacks``, each request's chain, the body answer and
the rendered Envoy pieces (a real Envoy runs them in tests/integration/test_failover.py)."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from google.protobuf.json_format import MessageToDict

from extproc import PolicyEngine, load_policy
from extproc._errors import EnvoyConfigError, PolicyError
from extproc.engine._engine import SignalMemo
from extproc.envoy._render import Address, EnvoyOptions, Upstream, check_envoy_config, render_envoy, rewrite_growth
from extproc.request._body import RoutingRequest
from extproc.server._servicer import RequestStream
from extproc.telemetry._instruments import Telemetry
from extproc.traffic._failover import SLOT_IN_BODY, SLOT_JSON, failover_for
from tests.extproc.conftest import chat

POLICY = """
version: 1
backends:
  a: {cluster: ca, model: model-a, fallbacks: [b, shared, c, t]}
  b: {cluster: cb, model: model-b}
  shared: {cluster: ca, model: model-a2}
  c: {cluster: cc, model: model-c, supports_images: false}
  t: {cluster: ct, model: model-t, max_context_tokens: 10}
  d: {cluster: cd, model: model-d}
default: a
tenants:
  allow:
    narrow: [a, c, t, d]
signals:
  dee: {kind: keywords, keywords: [deeee]}
  eff: {kind: keywords, keywords: [effff]}
rules:
  - {name: to-d, when: dee, backend: d}
  - {name: to-d-then-c, when: eff, backend: d, fallbacks: [c, b]}
"""


@pytest.fixture
def engine(write_policy):
    return PolicyEngine(load_policy(write_policy(POLICY)))


def chain(engine, body, headers=None) -> list[str]:
    request = RoutingRequest.from_json(body, headers or {})
    raw = json.dumps(body).encode()
    failover = failover_for(engine, request, engine.decide(request), raw)
    return [backend.name for backend in failover.chain]


# -- the chain -----------------------------------------------------------------------------
def test_chain_is_the_backend_then_its_usable_fallbacks_one_per_cluster(engine):
    # `shared` shares a's cluster (an attempt is a cluster); t's context is too small for this prompt
    assert chain(engine, chat("hi " * 50)) == ["a", "b", "c"]
    assert chain(engine, chat("x")) == ["a", "b", "c", "t"]


def test_chain_leaves_out_backends_the_request_or_tenant_may_not_use(engine):
    image = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert chain(engine, chat(image)) == ["a", "b", "t"]  # c takes no images
    assert chain(engine, chat("x"), {"x-tenant-id": "narrow"}) == ["a", "c", "t"]  # b is not narrow's


def test_a_rule_s_fallbacks_replace_the_backend_s(engine):
    assert chain(engine, chat("deeee")) == ["d"]
    assert chain(engine, chat("effff")) == ["d", "c", "b"]


def test_no_failover_in_the_policy_means_no_failover_object(write_policy):
    plain = PolicyEngine(load_policy(write_policy(POLICY.replace("fallbacks: [b, shared, c, t]", "cost: 1")
                                                  .replace(", fallbacks: [c, b]", ""))))
    request = RoutingRequest.from_json(chat("x"))
    assert failover_for(plain, request, plain.decide(request), b"{}") is None


def test_a_body_holding_the_slot_text_is_decided_without_fallbacks(engine):
    body = chat("\u0000switchyard-model")
    request = RoutingRequest.from_json(body)
    raw = json.dumps(body).encode()
    assert SLOT_JSON[1:-1] in raw
    failover = failover_for(engine, request, engine.decide(request), raw)
    assert [b.name for b in failover.chain] == ["a"] and failover.refused == SLOT_IN_BODY


# -- policy errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("fallbacks, where, message", [
    ("[b, zz]", "3:45", "`backends.a.fallbacks[1]` names backend 'zz', which is not defined"),
    ("[a]", "3:42", "`backends.a.fallbacks[0]` names 'a' itself"),
    ("[b, b]", "3:45", "`backends.a.fallbacks[1]` names 'b' again; `backends.a.fallbacks[0]` has it"),
])
def test_bad_fallbacks_are_reported_at_their_position(write_policy, fallbacks, where, message):
    path = write_policy(f"""
        version: 1
        backends:
          a: {{cluster: a, model: ma, fallbacks: {fallbacks}}}
          b: {{cluster: b, model: mb}}
        default: a
        signals: {{}}
        rules: []
    """)
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert f"{path}:{where}: {message}" in str(raised.value)


def test_bad_rule_fallbacks_are_reported(write_policy):
    path = write_policy("""
        version: 1
        backends:
          a: {cluster: a, model: ma}
          b: {cluster: b, model: mb}
        default: a
        signals: {}
        rules:
          - {name: r, backend: a, fallbacks: [a, nope]}
    """)
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    text = str(raised.value)
    assert f"{path}:8:39: `rules[0].fallbacks[0]` names 'a' itself" in text
    assert f"{path}:8:42: `rules[0].fallbacks[1]` names backend 'nope'" in text


# -- the body answer -----------------------------------------------------------------------------
def answer(engine, body: dict | bytes, headers=None) -> ext.ProcessingResponse:
    stream = RequestStream(engine, Telemetry())
    head = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json", **(headers or {})}
    stream.handle(ext.ProcessingRequest(request_headers=ext.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in head.items()]))))
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return stream.handle(ext.ProcessingRequest(request_body=ext.HttpBody(body=raw, end_of_stream=True)))


def _headers(response) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode()
            for h in response.request_body.response.header_mutation.set_headers}


def test_answer_carries_the_chain_as_priority_groups_and_the_slot(engine):
    response = answer(engine, chat("hi " * 50))
    common = response.request_body.response
    assert json.loads(common.body_mutation.body)["model"] == "\u0000switchyard-model"
    assert SLOT_JSON in common.body_mutation.body
    assert _headers(response)["x-envoy-max-retries"] == "2"
    assert _headers(response)["x-switchyard-backend"] == "a"
    metadata = MessageToDict(response.dynamic_metadata)
    assert metadata["switchyard.failover"] == {"priority_groups": [
        {"name": c, "clusters": [{"cluster_name": c, "weight": 1.0}]} for c in ("ca", "cb", "cc")]}
    assert metadata["switchyard"]["chain"] == "a,b,c"
    assert metadata["switchyard"]["attempt_models"] == {"ca": '"model-a"', "cb": '"model-b"', "cc": '"model-c"'}


def test_answer_without_usable_fallbacks_caps_retries_at_zero_and_sends_the_real_model(engine):
    response = answer(engine, chat("deeee"))
    assert _headers(response)["x-envoy-max-retries"] == "0"
    assert json.loads(response.request_body.response.body_mutation.body)["model"] == "model-d"
    assert "switchyard.failover" not in response.dynamic_metadata.fields


def test_slot_guard_answers_without_failover(engine):
    response = answer(engine, chat("a \u0000switchyard-model b"))
    assert _headers(response)["x-envoy-max-retries"] == "0"
    assert json.loads(response.request_body.response.body_mutation.body)["model"] == "model-a"


# -- the rendered Envoy pieces ---------------------------------------------------------------------
def rendered(policy, **options):
    upstreams = {c: Upstream(Address("127.0.0.1", 1000 + i)) for i, c in enumerate(sorted({
        b.cluster for b in policy.backends.values()}))}
    return render_envoy(policy, upstreams, EnvoyOptions(**options)).bootstrap


def _hcm(config):
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_render_with_failover(engine):
    policy = engine.policy
    config = rendered(policy, per_try_timeout_s=7)
    hcm = _hcm(config)
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["mutation_rules"] == {"allow_envoy": True}
    assert ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == ["switchyard", "switchyard.failover"]
    assert "upstream_log" in hcm["http_filters"][1]["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    assert vhost["include_attempt_count_in_response"] is True
    assert {"key": "x-switchyard-served-by", "value": "%UPSTREAM_CLUSTER%"} in [h["header"] for h in vhost["response_headers_to_add"]]
    route = vhost["routes"][0]["route"]
    specifier = route["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
    assert specifier["override_metadata_namespace"] == "switchyard.failover"
    assert specifier["priority_groups"] == [{"name": "ca", "clusters": [{"cluster_name": "ca", "weight": 1}]}]
    retry = route["retry_policy"]
    assert retry["num_retries"] == 4 and retry["per_try_timeout"] == "7s" and retry["refresh_cluster_on_retry"]
    assert retry["retriable_status_codes"] == [429] and "connect-failure" in retry["retry_on"]
    assert vhost["routes"][-1]["route"]["cluster"] == "ca"  # requests switchyard did not route: no retries
    for cluster in config["static_resources"]["clusters"][1:]:
        filters = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
        assert [f["name"] for f in filters] == ["envoy.filters.http.header_mutation", "envoy.filters.http.lua",
                                                "envoy.filters.http.upstream_codec"]
        assert f"local CLUSTER = '{cluster['name']}'" in filters[1]["typed_config"]["default_source_code"]["inline_string"]
        assert cluster["circuit_breakers"]["thresholds"][0]["retry_budget"]["min_retry_concurrency"] == 10
        assert cluster["per_connection_buffer_limit_bytes"] >= policy.routing.max_body_bytes
    assert rewrite_growth(policy) >= len('"model":,') + len(SLOT_JSON)
    assert check_envoy_config(policy, config) == []


def test_policy_check_envoy_finds_a_config_without_failover(engine, write_policy):
    plain = load_policy(write_policy(POLICY.replace("fallbacks: [b, shared, c, t]", "cost: 1")
                                     .replace(", fallbacks: [c, b]", ""), "plain.yaml"))
    problems = "\n".join(check_envoy_config(engine.policy, rendered(plain)))
    assert "allow_envoy" in problems and "switchyard.failover" in problems
    assert "priority_group" in problems and "failover upstream filters" in problems


def test_render_refuses_a_per_try_timeout_that_is_not_positive(engine):
    with pytest.raises(EnvoyConfigError, match="--per-try-timeout must be a positive number of seconds, got 0"):
        rendered(engine.policy, per_try_timeout_s=0)


def test_chain_leaves_out_backends_known_to_be_unhealthy(engine):
    request = RoutingRequest.from_json(chat("x"))
    memo = SignalMemo(request, unhealthy=("b",))
    failover = failover_for(engine, request, engine.decide(request, memo=memo), b"{}", memo)
    assert [backend.name for backend in failover.chain] == ["a", "c", "t"]
