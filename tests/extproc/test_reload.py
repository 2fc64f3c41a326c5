"""Policy reload: a valid change takes effect for new requests, a bad one never does."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc import RoutingRequest
from extproc.server._reload import PolicyFile
from extproc.server._servicer import RequestStream
from extproc.telemetry._instruments import Telemetry
from tests.extproc.conftest import REPO, chat
from tests.extproc.test_cli import _free_port, _wait_serving
from tests.extproc.test_servicer import JSON_HEADERS, body_message, headers_message

POLICY = """\
version: 1
backends:
  small: {cluster: small, model: small-model}
  large: {cluster: large, model: large-model}
default: small
signals:
  maths: {kind: keywords, keywords: [%s]}
rules:
  - {name: maths, when: maths, backend: large}
"""
PROOF = RoutingRequest.from_json(chat("prove it"))


def route(policy: PolicyFile, request: RoutingRequest = PROOF) -> str:
    return policy.current().decide(request).backend.name


def test_a_valid_change_takes_effect(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY % "integral")
    policy = PolicyFile.load(path)
    assert route(policy) == "small"
    assert policy.reload() == "unchanged"
    path.write_text(POLICY % "prove")
    assert policy.reload() == "reloaded"
    assert route(policy) == "large"


def test_a_bad_change_is_logged_once_and_never_replaces_the_running_policy(tmp_path, caplog):
    reader = InMemoryMetricReader()
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY % "prove")
    policy = PolicyFile.load(path, Telemetry(MeterProvider(metric_readers=[reader])))
    path.write_text((POLICY % "prove").replace("backend: large", "backend: huge"))
    with caplog.at_level(logging.INFO, logger="switchyard.policy"):
        assert policy.reload() == "rejected"
        assert policy.reload() == "rejected"  # the same bad version: not logged again
    assert route(policy) == "large"
    (record,) = caplog.records
    assert record.levelname == "ERROR"
    assert any(problem.startswith(f"{path}:9:") and "huge" in problem for problem in record.problems)
    points = [(dict(p.attributes), p.value) for r in reader.get_metrics_data().resource_metrics
              for s in r.scope_metrics for m in s.metrics if m.name == "switchyard.policy.reloads"
              for p in m.data.data_points]
    assert points == [({"result": "rejected"}, 1)]

    path.write_text("version: 1\nbackends: [\n")  # not even YAML
    assert policy.reload() == "rejected"
    path.unlink()  # gone (e.g. a broken ConfigMap mount)
    assert policy.reload() == "rejected"
    assert route(policy) == "large"
    path.write_text(POLICY % "integral")
    assert policy.reload() == "reloaded"
    assert route(policy) == "small"


def test_every_turn_from_good_to_bad_is_logged(tmp_path, caplog):
    path = tmp_path / "policy.yaml"
    good, bad = POLICY % "prove", (POLICY % "prove").replace("backend: large", "backend: huge")
    path.write_text(good)
    policy = PolicyFile.load(path)
    steps = [  # (what the file becomes, reload result, policy errors logged by this step)
        (None, "rejected", 1),  # deleted
        (good, "unchanged", 0),  # restored: the running version again
        (None, "rejected", 1),  # deleted again: logged again
        (None, "rejected", 0),  # still deleted: nothing new
        (bad, "rejected", 1),
        (good, "unchanged", 0),
        (bad, "rejected", 1),  # the same bad version as before, but after a good one
        ("version: 1\nrules: 7\n", "rejected", 1),  # another bad version in a row
    ]
    with caplog.at_level(logging.INFO, logger="switchyard.policy"):
        for text, result, logged in steps:
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)
            caplog.clear()
            assert policy.reload() == result, text
            assert sum(r.levelname == "ERROR" for r in caplog.records) == logged, (text, caplog.records)
            assert route(policy) == "large"


def test_a_request_in_flight_keeps_the_policy_it_started_with(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY % "integral")
    policy = PolicyFile.load(path)
    stream = RequestStream(policy.current(), Telemetry())
    stream.handle(headers_message(JSON_HEADERS))
    path.write_text(POLICY % "prove")
    assert policy.reload() == "reloaded"
    routed = stream.handle(body_message(json.dumps(chat("prove it")).encode()))
    assert routed.dynamic_metadata.fields["switchyard"].struct_value.fields["backend"].string_value == "small"


def _routed_backend(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        messages = [headers_message(JSON_HEADERS), body_message(json.dumps(chat("prove it")).encode())]
        _, routed = ext_grpc.ExternalProcessorStub(channel).Process(iter(messages), timeout=5)
    return routed.dynamic_metadata.fields["switchyard"].struct_value.fields["backend"].string_value


def _eventually(port: int, expected: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (got := _routed_backend(port)) != expected:
        assert time.monotonic() < deadline, f"still routed to {got!r}, expected {expected!r}"
        time.sleep(0.1)


def test_the_server_reloads_on_its_interval_and_on_sighup(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY % "integral")
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--policy", str(path), "--listen", f"127.0.0.1:{port}",
         "--reload-interval", "0.2", "--grace", "1", "--drain-seconds", "0"], cwd=REPO, stderr=log)
    try:
        _wait_serving(port)
        assert _routed_backend(port) == "small"
        path.write_text("version: 1\nrules: 7\n")  # bad: the running policy stays
        time.sleep(1)
        assert _routed_backend(port) == "small"
        path.write_text(POLICY % "prove")
        _eventually(port, "large")
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    log.seek(0)
    events = [json.loads(line) for line in log if line.startswith("{")]
    assert [e["event"] for e in events if "policy" in e["event"]] == [
        "policy rejected; the running policy stays", "policy reloaded"]

    # --reload-interval 0: the file is read again only on SIGHUP.
    path.write_text(POLICY % "integral")
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--policy", str(path), "--listen", f"127.0.0.1:{port}",
         "--reload-interval", "0", "--grace", "1", "--drain-seconds", "0"], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        _wait_serving(port)
        path.write_text(POLICY % "prove")
        time.sleep(0.5)
        assert _routed_backend(port) == "small"
        os.kill(proc.pid, signal.SIGHUP)
        _eventually(port, "large")
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
