"""Backend health from Envoy's admin endpoint (``serve --envoy-admin``), and the decision.

The admin answer sample (``envoy_clusters_small_ejected.json``) is what the Envoy of this venv
(1.40) answered to ``GET /clusters?format=json`` for a config rendered from
policies/default.yaml after the ``small`` host failed to connect twice in a row
(``outlier=OutlierDetection(consecutive_local_origin_failure=2)``): its ``small`` host carries
``failed_outlier_check``. Polls run against fake fetches, or a tiny loopback server for the
HTTP reading; clocks are fake.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc import PolicyEngine, RoutingRequest
from extproc.engine._engine import UNHEALTHY, SignalMemo
from extproc.envoy._render import EXTPROC_CLUSTER, EnvoyOptions, OutlierDetection, Upstream, Address, render_envoy
from extproc._errors import EnvoyConfigError, SwitchyardError
from extproc.policy._loading import load_policy, parse_policy
from extproc.scoring._decide import decide_with_scores
from extproc.server._servicer import RequestStream
from extproc.telemetry._instruments import Telemetry
from extproc.traffic._health import (
    AdminAnswerError,
    BackendHealth,
    HealthPoller,
    _read_admin,
    parse_admin_url,
    parse_unhealthy_clusters,
)
from tests.extproc.conftest import POLICIES, chat
from tests.extproc.test_scoring import LONG, _body_message, _headers_message, _metadata
from tests.extproc.test_scoring import engine as scored_engine
from tests.extproc.test_telemetry import points

SAMPLE = Path(__file__).with_name("envoy_clusters_small_ejected.json").read_bytes()

POLICY = """
version: 1
backends:
  small: {cluster: small, model: s-model, supports_images: false}
  large: {cluster: large, model: l-model, supports_images: false}
  large-eu: {cluster: large, model: l-model-eu, supports_images: false}
  vision: {cluster: vision, model: v-model, supports_images: true}
default: small
tenants:
  allow:
    free: [small]
signals:
  hard: {kind: keywords, keywords: [prove]}
rules:
  - {name: hard, when: hard, backend: large}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sample(**health_status) -> bytes:
    """The sample with ``small``'s host status replaced by ``health_status``."""
    data = json.loads(SAMPLE)
    for cluster in data["cluster_statuses"]:
        if cluster["name"] == "small":
            cluster["host_statuses"][0]["health_status"] = health_status
    return json.dumps(data).encode()


# --- reading Envoy's answer -------------------------------------------------------------------

def test_the_real_sample_names_the_ejected_cluster_only():
    assert parse_unhealthy_clusters(SAMPLE) == {"small"}
    assert parse_unhealthy_clusters(_sample(eds_health_status="HEALTHY")) == frozenset()


@pytest.mark.parametrize("status, down", [
    ({"failed_outlier_check": True, "eds_health_status": "HEALTHY"}, True),
    ({"failed_active_health_check": True}, True),
    ({"excluded_via_immediate_hc_fail": True}, True),
    ({"eds_health_status": "UNHEALTHY"}, True),
    ({"eds_health_status": "DRAINING"}, True),
    ({"eds_health_status": "TIMEOUT"}, True),
    ({"eds_health_status": "DEGRADED"}, False),  # degraded hosts still serve
    ({"failed_active_degraded_check": True}, False),
    ({"failed_outlier_check": False}, False),
    ({}, False),
])
def test_host_flags_that_take_a_host_out(status, down):
    assert (parse_unhealthy_clusters(_sample(**status)) == {"small"}) is down


def test_a_cluster_is_down_only_when_no_host_of_it_is_healthy():
    data = json.loads(SAMPLE)
    small = next(c for c in data["cluster_statuses"] if c["name"] == "small")
    healthy = copy.deepcopy(small["host_statuses"][0])
    healthy["health_status"] = {"eds_health_status": "HEALTHY"}
    small["host_statuses"].append(healthy)
    assert parse_unhealthy_clusters(json.dumps(data).encode()) == frozenset()
    small["host_statuses"] = []  # no host at all (a DNS name not resolved yet): nothing to route to
    assert parse_unhealthy_clusters(json.dumps(data).encode()) == {"small"}
    del small["host_statuses"]
    assert parse_unhealthy_clusters(json.dumps(data).encode()) == {"small"}
    small["host_statuses"] = [{"address": {}}]  # a host without health_status has no failure flag
    assert parse_unhealthy_clusters(json.dumps(data).encode()) == frozenset()


@pytest.mark.parametrize("raw, reason", [
    (b"", "bad_json"),
    (b"\xff\xfe{", "bad_json"),
    (b"<html>admin</html>", "bad_json"),
    (b"[]", "bad_answer"),
    (b'{"clusters": []}', "bad_answer"),
    (b'{"cluster_statuses": {}}', "bad_answer"),
    (b'{"cluster_statuses": [{"host_statuses": []}]}', "bad_answer"),
    (b'{"cluster_statuses": [{"name": "a", "host_statuses": {}}]}', "bad_answer"),
    (b'{"cluster_statuses": [{"name": "a", "host_statuses": [7]}]}', "bad_answer"),
    (b'{"cluster_statuses": [{"name": "a", "host_statuses": [{"health_status": "ok"}]}]}', "bad_answer"),
])
def test_garbage_is_an_error_with_its_reason(raw, reason):
    with pytest.raises(AdminAnswerError) as info:
        parse_unhealthy_clusters(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize("url", ["127.0.0.1:9901", "https://127.0.0.1:9901", "http://127.0.0.1", "http://:9901",
                                 "http://127.0.0.1:99999", "http://127.0.0.1:9901/clusters"])
def test_a_bad_admin_url_is_refused_by_name(url):
    with pytest.raises(SwitchyardError, match="--envoy-admin must be http://HOST:PORT"):
        parse_admin_url(url)
    assert parse_admin_url("http://127.0.0.1:9901/") == ("127.0.0.1", 9901)


# --- the view ---------------------------------------------------------------------------------

def test_the_view_maps_clusters_to_backends_and_expires():
    policy = parse_policy(POLICY)
    clock = Clock()
    view = BackendHealth(stale_after_s=10.0, clock=clock)
    assert view.unhealthy(policy) == frozenset()  # no view yet: all healthy
    view.update(frozenset({"large", "not-a-policy-cluster"}))
    assert view.unhealthy(policy) == {"large", "large-eu"}  # both backends of the cluster
    clock.now += 10.0
    assert view.unhealthy(policy) == {"large", "large-eu"}
    clock.now += 0.5  # stale: every backend counts as healthy again
    assert view.unhealthy(policy) == frozenset()
    view.update(frozenset())
    assert view.unhealthy(policy) == frozenset()


# --- polling ----------------------------------------------------------------------------------

def _metered() -> tuple[Telemetry, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return Telemetry(MeterProvider(metric_readers=[reader])), reader


def _failures(reader) -> dict[str, int]:
    return {attrs["reason"]: value for attrs, value in points(reader).get("switchyard.health.poll_failures", [])}


def test_a_failed_poll_keeps_the_last_view_is_counted_and_never_raises():
    policy = parse_policy(POLICY)
    clock = Clock()
    view = BackendHealth(stale_after_s=10.0, clock=clock)
    answers: list = [_sample(failed_outlier_check=True), ConnectionRefusedError(), b"garbage", b"x" * 10]

    async def fetch():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer == b"x" * 10:
            await asyncio.sleep(5)  # over the poll's timeout
        return answer

    telemetry, reader = _metered()
    poller = HealthPoller("http://127.0.0.1:9901", view, telemetry, timeout_s=0.05, fetch=fetch)

    async def run():
        return [await poller.poll() for _ in range(4)]

    assert asyncio.run(run()) == [True, False, False, False]
    assert view.unhealthy(policy) == {"small"}  # the last good view stays while fresh
    assert _failures(reader) == {"unreachable": 1, "bad_json": 1, "timeout": 1}
    clock.now += 11
    assert view.unhealthy(policy) == frozenset()


def test_run_keeps_polling_through_failures_until_cancelled():
    calls = []

    async def fetch():
        calls.append(1)
        raise OSError("admin down")

    telemetry, _ = _metered()
    poller = HealthPoller("http://127.0.0.1:9901", BackendHealth(), telemetry, interval_s=0.001, fetch=fetch)

    async def run():
        task = asyncio.create_task(poller.run())
        while len(calls) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


async def _serve_once(answer: bytes):
    """A loopback server that answers every connection with ``answer`` and closes it."""

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _chunked(body: bytes, size: int = 1000) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n" + chunks + b"0\r\n\r\n")


@pytest.mark.parametrize("answer, max_bytes, expected", [
    (_chunked(SAMPLE), 1 << 20, SAMPLE),  # how Envoy answers
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", 1 << 20, b"{}"),
    (_chunked(SAMPLE), 1000, "too_large"),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b" " * 300_000, 1000, "too_large"),  # cut off while reading
    (b"HTTP/1.1 404 Not Found\r\n\r\nno", 1 << 20, "http_status"),
    (b"SSH-2.0-OpenSSH\r\n", 1 << 20, "bad_answer"),
    (_chunked(SAMPLE)[:-200], 1 << 20, "bad_answer"),  # a chunked body cut short
])
def test_reading_the_admin_answer(answer, max_bytes, expected):
    async def run():
        server, port = await _serve_once(answer)
        async with server:
            return await _read_admin("127.0.0.1", port, max_bytes)

    if isinstance(expected, bytes):
        assert asyncio.run(run()) == expected
    else:
        with pytest.raises(AdminAnswerError) as info:
            asyncio.run(run())
        assert info.value.reason == expected


# --- the decision -----------------------------------------------------------------------------

def _decide(engine, body, unhealthy=(), headers=None):
    request = RoutingRequest(headers=headers or {}, body=body)
    return asyncio.run(decide_with_scores(engine, request, memo=SignalMemo(request, unhealthy=frozenset(unhealthy))))


def test_a_rule_skips_an_unhealthy_backend_and_explain_says_why():
    engine = PolicyEngine(parse_policy(POLICY))
    assert _decide(engine, chat("prove it")).backend.name == "large"
    decision = _decide(engine, chat("prove it"), {"large", "large-eu"})
    assert (decision.backend.name, decision.rule) == ("small", "default")
    assert decision.explain()["skipped_rules"] == [{"rule": "hard", "reason": UNHEALTHY}]


def test_the_default_backend_unhealthy_gives_the_next_one():
    engine = PolicyEngine(parse_policy(POLICY))
    assert _decide(engine, chat("hello"), {"small"}).backend.name == "large"


def test_every_backend_unhealthy_ignores_health():
    engine = PolicyEngine(parse_policy(POLICY))
    everything = {"small", "large", "large-eu", "vision"}
    decision = _decide(engine, chat("prove it"), everything)
    assert (decision.backend.name, decision.rule) == ("large", "hard")
    # the tenant may use only `small`: it is down, so health is ignored for this request
    assert _decide(engine, chat("prove it"), {"small"}, {"x-tenant-id": "free"}).backend.name == "small"
    # images: only `vision` could serve it; down, it still gets it
    image = chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    assert _decide(engine, image, {"vision"}).backend.name == "vision"


def test_cannot_serve_reports_an_unhealthy_backend():
    engine = PolicyEngine(parse_policy(POLICY))
    request = RoutingRequest(body=chat("hello"))
    assert engine.cannot_serve(request, "large", SignalMemo(request, unhealthy={"large"})) == UNHEALTHY
    assert engine.cannot_serve(request, "large", SignalMemo(request)) is None
    everything = {"small", "large", "large-eu", "vision"}
    assert engine.cannot_serve(request, "large", SignalMemo(request, unhealthy=everything)) is None


def test_latent_router_scores_with_unhealthy_backends_masked_out():
    engine = scored_engine(lam=0.0)
    decision = _decide(engine, chat(LONG, tools=[{"type": "function"}]), {"large"})
    assert (decision.backend.name, decision.rule) == ("small", "utility")
    assert engine.scorers["utility"].available == [("m-small",)]  # the mask reached the scorer
    assert set(decision.utilities) == {"small"}


def test_the_servicer_routes_around_what_the_view_reports():
    policy = parse_policy(POLICY)
    view = BackendHealth()
    view.update(frozenset({"large"}))

    def route(health):
        stream = RequestStream(PolicyEngine(policy), Telemetry(), health=health)
        stream.handle(_headers_message())
        return _metadata(stream.handle(_body_message(json.dumps(chat("prove it")).encode())))

    assert route(None)["backend"] == "large"
    assert route(view)["backend"] == "small"


def test_the_healthy_gauge_follows_the_view():
    from extproc.server._serve import _backend_states

    policy = parse_policy(POLICY)
    telemetry, reader = _metered()
    view = BackendHealth()
    telemetry.observe_backend_health(lambda: _backend_states(view, policy))
    view.update(frozenset({"large"}))
    gauge = {attrs["backend"]: value for attrs, value in points(reader)["switchyard.backend.healthy"]}
    assert gauge == {"small": 1, "large": 0, "large-eu": 0, "vision": 1}


def test_policy_explain_takes_unhealthy_backends(tmp_path, capsys):
    from extproc.cli import main

    request = tmp_path / "body.json"
    request.write_text(json.dumps(chat("Please refactor this python function: def f(): pass")))
    args = ["policy", "explain", str(POLICIES / "default.yaml"), "--request", str(request)]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "large"
    assert main([*args, "--unhealthy", "large"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "small"
    assert {"rule": out["skipped_rules"][0]["rule"], "reason": UNHEALTHY} in out["skipped_rules"]
    assert main([*args, "--unhealthy", "huge"]) == 1
    assert "--unhealthy 'huge' is not a backend" in capsys.readouterr().err


# --- the rendered Envoy config ------------------------------------------------------------------

def _clusters(options: EnvoyOptions) -> dict:
    policy = load_policy(POLICIES / "default.yaml")
    upstreams = {"small": Upstream(Address("127.0.0.1", 1)), "large": Upstream(Address("127.0.0.1", 2))}
    bootstrap = render_envoy(policy, upstreams, options).bootstrap
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def test_every_backend_cluster_gets_outlier_detection():
    clusters = _clusters(EnvoyOptions(outlier=OutlierDetection(consecutive_5xx=2, interval_s=0.25)))
    assert "outlier_detection" not in clusters[EXTPROC_CLUSTER]
    for name in ("small", "large"):
        outlier = clusters[name]["outlier_detection"]
        assert outlier["consecutive_5xx"] == 2 and outlier["interval"] == "0.250s"
        assert outlier["max_ejection_percent"] == 100 and outlier["split_external_local_origin_errors"] is True
        assert outlier["enforcing_consecutive_gateway_failure"] == 100
    assert not any("outlier_detection" in c for c in _clusters(EnvoyOptions(outlier=None)).values())


@pytest.mark.parametrize("field, value", [("consecutive_5xx", 0), ("interval_s", 0.0), ("base_ejection_s", float("nan")),
                                          ("max_ejection_s", float("inf"))])
def test_bad_outlier_values_are_refused_by_name(field, value):
    with pytest.raises(EnvoyConfigError, match=f"`{field}` must be"):
        OutlierDetection(**{field: value})
