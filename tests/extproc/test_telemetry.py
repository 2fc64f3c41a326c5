"""Decisions reach OpenTelemetry metrics and traces; logs are JSON and carry no prompt.

Also: the decide span joins the caller's ``traceparent``, scorer spans are its children,
the scorer and policy instruments, the ``OTEL_*`` configuration, the scrape endpoint and
the worker aggregation behind ``--workers N``, and the dashboard's PromQL names.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import struct
import threading

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc import ScorerSpec
from extproc import PolicyEngine, load_policy
from extproc._errors import SwitchyardError
from extproc.telemetry._metrics_http import MetricsServer, WorkerCollector, answer_scrapes
from extproc.scorers._interface import ScorerFailure, Scores
from extproc.server._servicer import RequestStream
from extproc.telemetry._instruments import JsonFormatter, Telemetry, scorer_span, start_decide_span
from extproc.telemetry._setup import TelemetryConfig
from extproc.cli import main
from tests.extproc.conftest import POLICIES, chat
from tests.extproc.test_servicer import JSON_HEADERS, body_message, headers_message


REPO = POLICIES.parent
DASHBOARD = REPO / "charts" / "switchyard" / "dashboards" / "switchyard.json"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def run_stream(telemetry, body: bytes, headers: dict[str, str] | None = None):
    stream = RequestStream(PolicyEngine(load_policy(POLICIES / "default.yaml")), telemetry)
    stream.handle(headers_message({**JSON_HEADERS, **(headers or {})}))
    return stream.handle(body_message(body))


def traced() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # default sampler: follow the parent's sampled flag
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(MeterProvider(), provider), exporter


def points(reader: InMemoryMetricReader) -> dict[str, list]:
    """metric name -> [(attributes, value or histogram (count, sum, bounds))]."""
    out = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = [
                    (dict(p.attributes), p.value if hasattr(p, "value") else (p.count, p.sum, tuple(p.explicit_bounds)))
                    for p in metric.data.data_points
                ]
    return out


_PROMQL_WORDS = {
    "sum", "count", "max", "min", "avg", "rate", "increase", "irate", "histogram_quantile", "by", "without", "on",
    "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "topk", "bottomk",
}


def dashboard_metric_names(path=DASHBOARD) -> set[str]:
    """Every metric name in the dashboard's PromQL expressions (targets and variables)."""
    dashboard = json.loads(path.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [var["definition"] for var in dashboard["templating"]["list"] if var.get("definition")]
    names = set()
    for expr in exprs:
        expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
        expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
        expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
        expr = re.sub(r"label_values\(([^,)]*),[^)]*\)", r"\1", expr)  # a variable's metric, not its label
        for name in re.findall(r"(?<![\w:])[A-Za-z_:][\w:]*\b(?!\s*\()", expr):
            if name not in _PROMQL_WORDS and not name.startswith("$"):
                names.add(name)
    return names


def exposition_names(text: str) -> set[str]:
    """Every sample name in a Prometheus text exposition."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_decisions_and_rejections_are_counted_and_traced():
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]), tracer_provider)

    run_stream(telemetry, json.dumps(chat("prove the lemma")).encode())
    run_stream(telemetry, json.dumps(chat("hi")).encode())
    run_stream(telemetry, b"nope")

    points = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = [(dict(p.attributes), getattr(p, "value", None)) for p in metric.data.data_points]
    assert sorted(points["switchyard.decisions"], key=str) == sorted(
        [({"backend": "large", "rule": "maths-reasoning", "fallback": ""}, 1), ({"backend": "small", "rule": "default", "fallback": ""}, 1)], key=str)
    assert points["switchyard.rejections"] == [({"status": 400, "code": "invalid_json"}, 1)]
    assert "switchyard.decision.duration" in points
    spans = exporter.get_finished_spans()
    assert [s.attributes.get("switchyard.rule") for s in spans] == ["maths-reasoning", "default", None]
    assert spans[2].attributes["switchyard.error"] == "invalid_json"


def test_info_logs_never_carry_the_prompt(caplog):
    secret = "my password is hunter2"
    with caplog.at_level(logging.INFO):
        run_stream(Telemetry(), b'{"messages": [{"role": "user", "content": "' + secret.encode() + b'"}], "model": 5}')
    assert caplog.records, "the rejection should be logged"
    for record in caplog.records:
        line = JsonFormatter().format(record)
        assert json.loads(line)["event"]
        assert "hunter2" not in line


# -- traces ------------------------------------------------------------------------------


def test_decide_span_joins_the_callers_traceparent():
    telemetry, exporter = traced()
    run_stream(telemetry, json.dumps(chat("prove the lemma")).encode(),
               {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=x"})
    [span] = exporter.get_finished_spans()
    assert span.name == "switchyard.decide"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert span.parent.is_remote
    assert span.context.trace_state.get("vendor") == "x"
    assert span.attributes["switchyard.rule"] == "maths-reasoning"


def test_decide_span_without_traceparent_starts_a_trace_and_an_unsampled_caller_is_followed():
    telemetry, exporter = traced()
    run_stream(telemetry, json.dumps(chat("hi")).encode())
    run_stream(telemetry, json.dumps(chat("hi")).encode(), {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    run_stream(telemetry, json.dumps(chat("hi")).encode(), {"traceparent": "garbage"})
    spans = exporter.get_finished_spans()
    assert len(spans) == 2, "the caller said not sampled: that request records no span"
    assert all(span.parent is None for span in spans)
    assert all(format(span.context.trace_id, "032x") != TRACE_ID for span in spans)


def test_scorer_spans_are_children_of_the_decide_span_and_record_failures():
    telemetry, exporter = traced()
    decide = start_decide_span(telemetry, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    with scorer_span(telemetry, decide, "probe") as span:
        assert span is not None
    with pytest.raises(TimeoutError), scorer_span(telemetry, decide, "router"):
        raise TimeoutError("deadline")
    decide.end()
    probe, router, parent = exporter.get_finished_spans()
    assert parent.name == "switchyard.decide"
    for child, name in ((probe, "probe"), (router, "router")):
        assert child.name == "switchyard.scorer"
        assert child.attributes["switchyard.scorer"] == name
        assert child.parent.span_id == parent.context.span_id
        assert child.context.trace_id == parent.context.trace_id
    assert probe.status.status_code is StatusCode.UNSET
    assert router.status.status_code is StatusCode.ERROR
    assert router.events[0].name == "exception"


def test_no_spans_without_a_tracing_sdk():
    telemetry = Telemetry()  # the global providers of a test process: the API's proxies
    assert start_decide_span(telemetry, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) is None
    with scorer_span(telemetry, None, "probe") as span:
        assert span is None


# -- metrics -----------------------------------------------------------------------------


def test_scorer_calls_are_timed_counted_and_batched():
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]))
    telemetry.record_score("probe", Scores({"p": 0.7}, batch_size=3), 12.0)
    telemetry.record_score("probe", Scores({"p": 0.2}), 8.0)  # batch size unknown: not recorded
    telemetry.record_score("probe", ScorerFailure("deadline", "late"), 80.0)
    telemetry.record_score("router", ScorerFailure("non_finite"), 5.0)
    got = points(reader)
    durations = {tuple(sorted(attrs.items())): value[:2] for attrs, value in got["switchyard.scorer.duration"]}
    assert durations == {
        (("result", "ok"), ("scorer", "probe")): (2, pytest.approx(0.020)),
        (("result", "deadline"), ("scorer", "probe")): (1, pytest.approx(0.080)),
        (("result", "non_finite"), ("scorer", "router")): (1, pytest.approx(0.005)),
    }
    assert sorted(got["switchyard.scorer.failures"], key=str) == [
        ({"scorer": "probe", "reason": "deadline"}, 1), ({"scorer": "router", "reason": "non_finite"}, 1)]
    [(attrs, (count, total, bounds))] = got["switchyard.scorer.batch.size"]
    assert (attrs, count, total) == ({"scorer": "probe"}, 1, 3)
    assert bounds[:4] == (1, 2, 4, 8)


def test_policy_info_reports_the_running_digest():
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]))
    running = {"digest": "aaaaaaaaaaaa"}
    telemetry.observe_policy(lambda: running["digest"])
    assert points(reader)["switchyard.policy.info"] == [({"digest": "aaaaaaaaaaaa"}, 1)]
    running["digest"] = "bbbbbbbbbbbb"
    assert points(reader)["switchyard.policy.info"] == [({"digest": "bbbbbbbbbbbb"}, 1)]


def test_latency_buckets_fit_what_they_measure():
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]))
    run_stream(telemetry, json.dumps(chat("hi")).encode())
    telemetry.record_score("probe", Scores({"p": 0.5}), 30.0)
    got = points(reader)
    [(_, (_, _, decision_bounds))] = got["switchyard.decision.duration"]
    [(_, (_, _, scorer_bounds))] = got["switchyard.scorer.duration"]
    assert decision_bounds[0] <= 0.0001 and decision_bounds[-1] >= 0.5  # microseconds to a stuck decision
    default_deadline = ScorerSpec.__dataclass_fields__["deadline_ms"].default / 1000.0
    assert scorer_bounds[0] <= 0.001 and default_deadline in scorer_bounds  # a bucket ends at the default deadline


def test_every_metric_the_dashboard_queries_is_exported_under_that_name():
    """Every instrument recorded once through the real Prometheus exporter (and the process
    collectors the endpoint adds): the dashboard's names must all be there. The integration
    test checks the same against a scrape after real traffic."""
    registry = CollectorRegistry()
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    telemetry = Telemetry(MeterProvider(metric_readers=[PrometheusMetricReader(scope_info_enabled=False,
                                                                                 registry=registry)]))
    run_stream(telemetry, json.dumps(chat("hi")).encode())
    run_stream(telemetry, b"nope")
    telemetry.policy_reloads.add(1, {"result": "reloaded"})
    telemetry.observe_policy(lambda: "aaaaaaaaaaaa")
    telemetry.observe_breakers(lambda: {"probe": 0})
    telemetry.record_score("probe", Scores({"p": 0.5}, batch_size=2), 10.0)
    telemetry.record_score("probe", ScorerFailure("error"), 10.0)
    names = exposition_names(generate_latest(registry).decode())
    # with --workers N the parent adds this one (see test_worker_collector_labels_every_workers_series)
    names.add("switchyard_worker_up")
    wanted = dashboard_metric_names()
    assert {"switchyard_decisions_total", "switchyard_scorer_duration_seconds_bucket"} <= wanted
    assert wanted - names == set()


def test_dashboard_is_a_grafana_dashboard_with_unique_panel_ids():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "switchyard" and dashboard["schemaVersion"] >= 36
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["datasource"]["uid"] == "${datasource}"


# -- OTEL_* configuration ------------------------------------------------------------------


@pytest.mark.parametrize(("env", "listen", "expected"), [
    ({}, None, TelemetryConfig()),
    ({}, "127.0.0.1:9464", TelemetryConfig(metrics_listen="127.0.0.1:9464")),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, None, TelemetryConfig(traces=("otlp",), metrics=("otlp",))),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, None, TelemetryConfig(traces=("otlp",))),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_METRICS_EXPORTER": "none"}, None,
     TelemetryConfig(traces=("otlp",))),
    ({"OTEL_TRACES_EXPORTER": "console, otlp"}, None, TelemetryConfig(traces=("console", "otlp"))),
    ({"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "9000"}, None,
     TelemetryConfig(metrics_listen="localhost:9000")),
    ({"OTEL_METRICS_EXPORTER": "prometheus"}, "0.0.0.0:9100", TelemetryConfig(metrics_listen="0.0.0.0:9100")),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, "0.0.0.0:1",
     TelemetryConfig(metrics_listen="0.0.0.0:1")),
])
def test_telemetry_config_from_env(env, listen, expected):
    assert TelemetryConfig.from_env(listen, env) == expected
    assert TelemetryConfig.from_env(listen, env).enabled == (expected != TelemetryConfig())


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER='jaeger' names jaeger"),
    ({"OTEL_METRICS_EXPORTER": "otlp,zipkin"}, "names zipkin"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"}, "OTEL_EXPORTER_OTLP_PROTOCOL='thrift'"),
])
def test_telemetry_config_names_the_bad_variable(env, message):
    with pytest.raises(SwitchyardError, match=re.escape(message)):
        TelemetryConfig.from_env(None, env)


def test_serve_refuses_bad_telemetry_settings_before_starting(monkeypatch, capsys):
    policy = str(POLICIES / "default.yaml")
    assert main(["serve", "--policy", policy, "--metrics-listen", "9464"]) == 1
    assert "--metrics-listen must be HOST:PORT, got '9464'" in capsys.readouterr().err
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    assert main(["serve", "--policy", policy]) == 1
    assert "OTEL_TRACES_EXPORTER='jaeger'" in capsys.readouterr().err


# -- the scrape endpoint and --workers N -----------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.getheader("content-type", ""), reply.read().decode()
    finally:
        conn.close()


def test_metrics_server_serves_the_registry_at_metrics_only():
    registry = CollectorRegistry()
    Counter("demo_requests", "Requests.", registry=registry).inc(3)
    server = MetricsServer.bind("127.0.0.1", 0, registry).start()
    try:
        status, content_type, text = http_get(server.port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert "demo_requests_total 3.0" in text
        assert http_get(server.port, "/")[0] == 404
        with pytest.raises(SwitchyardError, match=rf"--metrics-listen 127.0.0.1:{server.port}"):
            MetricsServer.bind("127.0.0.1", server.port, registry)  # taken
    finally:
        server.close()


def worker_registry(decisions: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("switchyard_decisions", "Decisions.", ["backend"], registry=registry).labels("small").inc(decisions)
    return registry


def samples(collector: WorkerCollector) -> dict[tuple, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_worker_collector_labels_every_workers_series():
    pairs = [socket.socketpair() for _ in range(2)]
    for index, (_, worker_end) in enumerate(pairs):
        answer_scrapes(worker_end, worker_registry(decisions=index + 2))
    collector = WorkerCollector([parent_end for parent_end, _ in pairs])
    try:
        got = samples(collector)
        assert got[("switchyard_decisions_total", (("backend", "small"), ("worker", "0")))] == 2
        assert got[("switchyard_decisions_total", (("backend", "small"), ("worker", "1")))] == 3
        assert got[("switchyard_worker_up", (("worker", "0"),))] == 1
        assert got[("switchyard_worker_up", (("worker", "1"),))] == 1
        pairs[1][1].shutdown(socket.SHUT_RDWR)  # worker 1 is gone
        got = samples(collector)
        assert got[("switchyard_worker_up", (("worker", "1"),))] == 0
        assert ("switchyard_decisions_total", (("backend", "small"), ("worker", "1"))) not in got
        assert got[("switchyard_decisions_total", (("backend", "small"), ("worker", "0")))] == 2
    finally:
        collector.close()


def test_worker_collector_drops_a_late_answer_and_stays_in_step():
    parent_end, worker_end = socket.socketpair()
    release = threading.Event()

    def slow_worker():  # holds its first answer until released, then answers normally
        for value in (1, 2):
            (number,) = struct.unpack("!I", worker_end.recv(4, socket.MSG_WAITALL))
            if value == 1:
                release.wait(30)
            text = generate_latest(worker_registry(decisions=value))
            worker_end.sendall(struct.pack("!II", number, len(text)) + text)

    thread = threading.Thread(target=slow_worker, daemon=True)
    thread.start()
    collector = WorkerCollector([parent_end], timeout=0.2)
    try:
        first = samples(collector)  # the worker holds its answer: left out of this scrape
        assert first[("switchyard_worker_up", (("worker", "0"),))] == 0
        release.set()
        collector.timeout = 30.0  # no race with the machine's load from here on
        second = samples(collector)  # the late answer (1) is dropped; this scrape's (2) is used
        assert second[("switchyard_worker_up", (("worker", "0"),))] == 1
        assert second[("switchyard_decisions_total", (("backend", "small"), ("worker", "0")))] == 2
    finally:
        collector.close()
        worker_end.close()
