"""Metrics and traces from a real gateway: Envoy in front of ``switchyard serve``.

- ``--metrics-listen``: after traffic through Envoy, the scrape's counts by backend, rule,
  rejection code and reload result match what was sent, and the policy digest gauge
  follows a reload.
- ``--workers 2``: one scrape endpoint (the parent) serves both workers' series, labelled
  ``worker``; their sum is what was sent. The policy asks a scorer that cannot be reached,
  so every scored request takes the fallback and the scorer metrics show it.
- OTLP: with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a collector run by the test, the
  ``switchyard.decide`` span arrives as a child of the ``traceparent`` the client sent, and
  the metrics arrive too.
- Every metric the Grafana dashboard queries is in a real scrape.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import signal
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from unittest import mock

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from harness import free_port
from tests.extproc.test_telemetry import dashboard_metric_names, exposition_names
from tests.integration.gateway import DEFAULT_POLICY, Gateway, chat

#: Dashboard series only an in-process scorer produces (it knows its micro-batch size; a
#: remote one does not). They need the `ml` extra and a checkpoint, so this module cannot
#: make them; tests/extproc/test_telemetry.py checks their names through the same exporter.
NEEDS_IN_PROCESS_SCORER = {"switchyard_scorer_batch_size_sum", "switchyard_scorer_batch_size_count"}

SCORED_POLICY = """\
version: 1
backends:
  small: {cluster: small, model: small-model}
  large: {cluster: large, model: large-model}
default: small
fallback: large
scorers:
  probe:
    kind: probe
    checkpoints: {relope: unused}
    remote: {target: "127.0.0.1:9"}   # nothing listens: every scored request takes the fallback
    deadline_ms: 100
signals:
  short: {kind: token_count, below: 4, scope: last_user}
  small_ok: {kind: score, scorer: probe, above: 0.5}
rules:
  - {name: short, when: short, backend: small}
  - {name: probe, when: {not: small_ok}, backend: large}
"""


class MetricsGateway(Gateway):
    """A gateway whose switchyard serves metrics on a free port (and ``extra`` arguments)."""

    def __init__(self, policy: Path, workdir: Path, *extra: str) -> None:
        super().__init__(policy, workdir)
        self.metrics_port = free_port()
        self.stack.switchyard.argv += ["--metrics-listen", f"127.0.0.1:{self.metrics_port}", *extra]

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        """(sample name, labels) -> value."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            reply = conn.getresponse()
            text = reply.read().decode()
        finally:
            conn.close()
        assert reply.status == 200, text
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def scrape_text(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def reload(self, text: str) -> None:
        """Write the policy file and tell switchyard (every worker) to re-read it."""
        self.stack.policy.write_text(text)
        self.stack.switchyard.process.send_signal(signal.SIGHUP)


def total(scrape: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (over workers too)."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in scrape.items() if sample == name and wanted <= have)


def wait_for(what: str, check: Callable[[], bool], gateway: Gateway, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout:g} s\n{gateway.logs()}")
        time.sleep(0.1)


def digest(text: str) -> str:
    """The digest switchyard reports: the first 12 hex digits of the file's SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class SpanCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, object]] = []  # (resource attributes, span)

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((resource, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def find(self, trace_id: str):
        return [(resource, span) for resource, span in list(self.spans) if span.trace_id.hex() == trace_id]


class MetricCollector(metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP/gRPC metrics collector that keeps the last export of each metric by name."""

    def __init__(self) -> None:
        self.metrics: dict[str, object] = {}

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                self.metrics.update({metric.name: metric for metric in scope_metrics.metrics})
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture(scope="module")
def collector():
    servicer = SpanCollector()
    servicer.metrics = MetricCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer.metrics, server)
    servicer.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer
    server.stop(0)


@pytest.fixture(scope="module")
def observed(tmp_path_factory, collector):
    """The default policy (a copy we may edit), metrics on, OTLP traces and metrics to ``collector``."""
    workdir = tmp_path_factory.mktemp("metrics")
    policy = workdir / "policy.yaml"
    policy.write_text(DEFAULT_POLICY.read_text())
    gateway = MetricsGateway(policy, workdir / "stack", "--reload-interval", "0")
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "200"}  # ms: exported within a moment
    with mock.patch.dict(os.environ, otel):  # the switchyard child inherits them at start
        gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """``--workers 2`` on a policy whose scorer cannot be reached."""
    workdir = tmp_path_factory.mktemp("metrics-workers")
    policy = workdir / "scored.yaml"
    policy.write_text(SCORED_POLICY)
    gateway = MetricsGateway(policy, workdir / "stack", "--workers", "2").start()
    try:
        # the stack waits for one worker's gRPC; wait until both serve their policy
        wait_for("both workers' policy_info", lambda: total(gateway.scrape(), "switchyard_policy_info") == 2, gateway)
        yield gateway
    finally:
        gateway.stop()


def test_scrape_counts_what_went_through_envoy(observed):
    before = observed.scrape()
    backends_before = observed.backend_requests()
    sent = [("prove the lemma", "large")] * 3 + [("hi", "small")] * 2
    seen: dict[tuple[str, str], int] = {}
    for text, backend in sent:
        reply = observed.post(chat(text))
        assert reply.status == 200, reply
        assert reply.header("x-switchyard-backend") == backend
        key = (backend, reply.header("x-switchyard-rule"))
        seen[key] = seen.get(key, 0) + 1
    assert observed.post(b'{"messages": [').status == 400
    assert observed.get("/v1/models").status == 200  # passed through: no decision
    after = observed.scrape()

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("switchyard_decisions_total", backend="large") == 3
    assert delta("switchyard_decisions_total", backend="small") == 2
    for (backend, rule), count in seen.items():
        assert delta("switchyard_decisions_total", backend=backend, rule=rule, fallback="") == count
    backends_after = observed.backend_requests()
    assert backends_after["large"] - backends_before["large"] == 3
    assert delta("switchyard_rejections_total", status="400", code="invalid_json") == 1
    assert delta("switchyard_rejections_total") == 1
    assert delta("switchyard_decision_duration_seconds_count") == 5
    assert delta("switchyard_decision_duration_seconds_bucket", le="+Inf") == 5
    running = digest(observed.stack.policy.read_text())
    assert total(after, "switchyard_policy_info", digest=running) == 1
    assert total(after, "switchyard_policy_info") == 1
    assert total(after, "process_resident_memory_bytes") > 0


def test_reloads_are_counted_by_result_and_the_digest_follows(observed):
    original = observed.stack.policy.read_text()
    before = observed.scrape()
    observed.reload("version: [\n")  # not YAML: rejected, the running policy stays
    wait_for("a rejected reload", lambda: total(observed.scrape(), "switchyard_policy_reloads_total", result="rejected")
             == total(before, "switchyard_policy_reloads_total", result="rejected") + 1, observed)
    assert total(observed.scrape(), "switchyard_policy_info", digest=digest(original)) == 1

    changed = original + "\n# reviewed\n"
    observed.reload(changed)
    wait_for("a reload", lambda: total(observed.scrape(), "switchyard_policy_reloads_total", result="reloaded")
             == total(before, "switchyard_policy_reloads_total", result="reloaded") + 1, observed)
    after = observed.scrape()
    assert total(after, "switchyard_policy_info", digest=digest(changed)) == 1
    assert total(after, "switchyard_policy_info") == 1, "the old digest is no longer reported"
    assert observed.post(chat("prove the lemma")).header("x-switchyard-backend") == "large"


def test_decide_span_joins_the_traceparent_sent_through_envoy(observed, collector):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    reply = observed.post(chat("prove the lemma"), headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert reply.status == 200, reply
    wait_for("the decide span at the collector", lambda: collector.find(trace_id), observed)
    [(resource, span)] = collector.find(trace_id)
    assert span.name == "switchyard.decide"
    assert span.parent_span_id.hex() == parent_id
    assert resource["service.name"] == "switchyard"
    attributes = {a.key: a.value.string_value for a in span.attributes}
    assert attributes["switchyard.backend"] == reply.header("x-switchyard-backend") == "large"
    assert attributes["switchyard.rule"] == "maths-reasoning"


def test_metrics_are_pushed_over_otlp_too(observed, collector):
    for _ in range(2):
        assert observed.post(chat("prove the lemma")).status == 200
    scraped = total(observed.scrape(), "switchyard_decisions_total", backend="large", rule="maths-reasoning")

    def pushed() -> float:
        metric = collector.metrics.metrics.get("switchyard.decisions")
        if metric is None:
            return 0
        return sum(point.as_int for point in metric.sum.data_points
                   if {a.key: a.value.string_value for a in point.attributes}.get("rule") == "maths-reasoning")

    wait_for("the pushed count to reach the scraped one", lambda: pushed() >= scraped, observed)
    metric = collector.metrics.metrics["switchyard.decisions"]
    assert metric.sum.is_monotonic and metric.unit == "{request}"
    assert "switchyard.decision.duration" in collector.metrics.metrics


def test_workers_share_one_scrape_endpoint(workers):
    before = workers.scrape()
    for _ in range(4):  # the scorer is needed and unreachable: the policy's fallback
        reply = workers.post(chat("please write a long essay about boats"))
        assert reply.status == 200, reply
        assert (reply.header("x-switchyard-backend"), reply.header("x-switchyard-rule")) == ("large", "fallback")
    for _ in range(2):
        assert workers.post(chat("hi")).header("x-switchyard-rule") == "short"
    after = workers.scrape()

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("switchyard_decisions_total", backend="large", rule="fallback") == 4
    assert delta("switchyard_decisions_total", backend="small", rule="short", fallback="") == 2
    fallbacks = {dict(labels)["fallback"] for (name, labels), _ in after.items()
                 if name == "switchyard_decisions_total" and dict(labels)["rule"] == "fallback"}
    assert fallbacks and all(reason.startswith("probe: ") for reason in fallbacks)
    assert delta("switchyard_scorer_failures_total", scorer="probe") == 4
    assert delta("switchyard_scorer_duration_seconds_count", scorer="probe") == 4
    for worker in ("0", "1"):
        assert total(after, "switchyard_worker_up", worker=worker) == 1
        assert total(after, "switchyard_policy_info", worker=worker, digest=digest(SCORED_POLICY)) == 1
        assert total(after, "process_resident_memory_bytes", worker=worker) > 0
    unlabelled = [name for (name, labels), _ in after.items()
                  if name != "switchyard_worker_up" and "worker" not in dict(labels)]
    assert unlabelled == []


def test_every_metric_the_dashboard_queries_is_in_a_real_scrape(observed, workers):
    # make sure each kind of series exists, whatever ran before
    observed.post(chat("prove the lemma"))
    observed.post(b"nope")
    observed.reload(observed.stack.policy.read_text() + "\n# touched\n")
    wait_for("a reload", lambda: "switchyard_policy_reloads_total" in observed.scrape_text(), observed)
    workers.post(chat("please write a long essay about boats"))
    scraped = exposition_names(observed.scrape_text()) | exposition_names(workers.scrape_text())
    missing = dashboard_metric_names() - scraped
    assert missing <= NEEDS_IN_PROCESS_SCORER, f"the dashboard queries series no scrape has: {sorted(missing)}"
