"""Decisions reach OpenTelemetry metrics and traces; logs are JSON and carry no prompt."""

from __future__ import annotations

import json
import logging

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extproc import PolicyEngine, load_policy
from extproc._servicer import RequestStream
from extproc._telemetry import JsonFormatter, Telemetry
from tests.extproc.conftest import POLICIES, chat
from tests.extproc.test_servicer import JSON_HEADERS, body_message, headers_message


def run_stream(telemetry, body: bytes):
    stream = RequestStream(PolicyEngine(load_policy(POLICIES / "default.yaml")), telemetry)
    stream.handle(headers_message(JSON_HEADERS))
    return stream.handle(body_message(body))


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
