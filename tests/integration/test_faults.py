"""Faults through a real Envoy: switchyard killed, stopped, restarted, its policy file broken.

One gateway (demo backends, switchyard, Envoy) runs a copy of policies/default.yaml that
the tests edit. The demo backends answer slowly when asked (``x-demo-delay-ms``), so a
request can be in flight at a backend, or an SSE stream half-way, while switchyard dies.
The rules these tests hold:

- a request switchyard has answered (routed, or passed through) never depends on it again:
  ``kill -9`` or SIGTERM leaves it to finish, its body or stream whole;
- a request switchyard cannot route gets Envoy's 5xx ``router_unavailable`` and reaches no
  backend (fail closed); once switchyard is back, requests route again by themselves;
- after SIGTERM, switchyard says NOT_SERVING but routes new requests for ``--drain-seconds``
  (a second SIGTERM ends that at once), then stops and exits 0;
- a broken policy file never replaces the running policy.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.backend import ECHO_CHARS
from extproc import PolicyEngine, RoutingRequest, load_policy
from extproc.server._serve import EXT_PROC_SERVICE
from tests.integration.gateway import DEFAULT_POLICY, Gateway, Response, chat

CODE = "Please refactor this python function so it streams rows from the database."
CHAT = "hi, how are you today?"
GRACE_S = 2  # switchyard's --grace here (the harness default is 1 s)
DRAIN_S = 2  # switchyard's --drain-seconds in the drain tests (0 elsewhere, as in the harness)
SLOW_MS = 3000  # a plain completion's wait at the backend: longer than the grace period
EVENT_MS = 250  # an SSE stream's pause between events: about 3 s for a stream


# -- the gateway and its helpers --------------------------------------------------------------
@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults-policy") / "policy.yaml"
    shutil.copyfile(DEFAULT_POLICY, path)
    return path


@pytest.fixture(scope="module")
def gw(policy_file, tmp_path_factory) -> Iterator[Gateway]:
    gateway = Gateway(policy_file, tmp_path_factory.mktemp("faults-gateway"))
    argv = gateway.stack.switchyard.argv
    argv[argv.index("--grace") + 1] = str(GRACE_S)
    argv[argv.index("--drain-seconds") + 1] = "0"  # refuse new streams at once, unless a test asks for a drain
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(autouse=True)
def switchyard_running(gw) -> Iterator[None]:
    """Every test starts and leaves with switchyard serving, whatever it did to it."""
    yield
    if not gw.stack.switchyard.running:
        restart(gw)


def restart(gw: Gateway) -> None:
    gw.stack.switchyard.start()
    gw.stack.wait_switchyard(time.monotonic() + 20)


def serve_with_drain(gw: Gateway, seconds: float) -> None:
    """switchyard serving with ``--drain-seconds seconds`` (restarted when that changes it)."""
    argv = gw.stack.switchyard.argv
    flag = argv.index("--drain-seconds") + 1
    if argv[flag] == f"{seconds:g}" and gw.stack.switchyard.running:
        return
    argv[flag] = f"{seconds:g}"
    if gw.stack.switchyard.running:
        kill_9(gw)  # nothing is in flight here
    restart(gw)


@pytest.fixture
def drain(gw) -> Iterator[Callable[[float], None]]:
    """``drain(seconds)`` restarts switchyard with that ``--drain-seconds``; 0 again afterwards."""
    yield lambda seconds: serve_with_drain(gw, seconds)
    serve_with_drain(gw, 0)


def kill_9(gw: Gateway) -> None:
    process = gw.stack.switchyard.process
    process.send_signal(signal.SIGKILL)
    process.wait(10)


def expected_backend(policy: Path, body: dict) -> str:
    """The backend `switchyard policy explain` names for ``body`` under ``policy``."""
    return PolicyEngine(load_policy(policy)).decide(RoutingRequest.from_json(body)).backend.name


def assert_fail_closed(reply: Response) -> None:
    """Envoy's own 5xx: switchyard could not be used, so nothing was routed."""
    assert 500 <= reply.status < 600, reply
    assert reply.json()["error"]["code"] == "router_unavailable", reply
    assert reply.header("x-demo-backend") is None, reply


def envoy_counter(gw: Gateway, name: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", gw.stack.ports.admin, timeout=5)
    conn.request("GET", f"/stats?filter=^{name}$&format=json")
    stats = json.loads(conn.getresponse().read())["stats"]
    conn.close()
    return int(stats[0]["value"]) if stats else 0


def wait_for(condition, what: str, gw: Gateway, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out waiting for {what}.\n{gw.logs()}")
        time.sleep(0.02)


# -- slow requests in flight --------------------------------------------------------------------
class SlowPlain:
    """A request whose answer waits ``SLOW_MS`` at its backend, sent on its own thread: a
    completion (``text``), or with ``method``/``path``/``raw`` a request switchyard passes through."""

    def __init__(self, gw: Gateway, text: str = "", *, method: str = "POST", path: str = "/v1/chat/completions",
                 raw: bytes | None = None, content_type: str = "application/json") -> None:
        self.body = chat(text)
        data = json.dumps(self.body).encode() if raw is None else raw
        headers = {"x-demo-delay-ms": str(SLOW_MS), **({"content-type": content_type} if method == "POST" else {})}
        pool = concurrent.futures.ThreadPoolExecutor(1)
        self._future = pool.submit(gw.request, method, path, data if method == "POST" else None, headers)
        pool.shutdown(wait=False)

    def result(self) -> Response:
        return self._future.result(30)


class SlowStream:
    """An SSE completion whose first event has arrived: the stream is mid-way."""

    def __init__(self, gw: Gateway, text: str) -> None:
        self.body = chat(text, stream=True)
        self.conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        self.conn.request("POST", "/v1/chat/completions", json.dumps(self.body),
                          {"content-type": "application/json", "x-demo-delay-ms": str(EVENT_MS)})
        self.reply = self.conn.getresponse()
        self.first = self.reply.readline()
        assert self.first.startswith(b"data: "), self.first

    def finish(self) -> tuple[int, dict[str, str], list[dict]]:
        """Reads the rest; returns the status, the headers and the parsed events ([DONE] last)."""
        raw = self.first + self.reply.read()
        self.conn.close()
        events = [part[len("data: "):] for part in raw.decode().split("\n\n") if part.startswith("data: ")]
        assert events[-1] == "[DONE]", raw[-200:]
        headers = {k.lower(): v for k, v in self.reply.getheaders()}
        return self.reply.status, headers, [json.loads(e) for e in events[:-1]]


def echo(backend: str, text: str) -> str:
    """What a demo backend answers to ``text`` (it echoes the first 60 characters)."""
    return f"[{backend}] you asked: {text[:ECHO_CHARS]}"


def assert_whole_completion(reply: Response, backend: str, text: str) -> None:
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == backend and reply.header("x-switchyard-backend") == backend, reply
    assert reply.json()["choices"][0]["message"]["content"] == echo(backend, text)


def assert_whole_stream(stream: SlowStream, backend: str, text: str) -> None:
    status, headers, chunks = stream.finish()
    assert status == 200
    assert headers["x-demo-backend"] == backend and headers["x-switchyard-backend"] == backend, headers
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == echo(backend, text)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def start_in_flight(gw: Gateway):
    """Slow requests, all at their backends: two completions and two SSE streams (one per
    backend), and two that switchyard passes through (a GET, a non-JSON POST)."""
    before = sum(gw.backend_requests().values())
    plain = [(SlowPlain(gw, CHAT), "small"), (SlowPlain(gw, CODE), "large")]
    streams = [(SlowStream(gw, CHAT), "small"), (SlowStream(gw, CODE), "large")]
    passed = [SlowPlain(gw, method="GET", path="/v1/models"),
              SlowPlain(gw, raw=b"plain text", content_type="text/plain")]
    wait_for(lambda: sum(gw.backend_requests().values()) == before + 6, "the slow requests to reach the backends", gw)
    return plain, streams, passed


def finish_in_flight(plain, streams, passed) -> None:
    for request, backend in plain:
        assert_whole_completion(request.result(), backend, request.body["messages"][0]["content"])
    for stream, backend in streams:
        assert_whole_stream(stream, backend, stream.body["messages"][0]["content"])
    models, not_json = (request.result() for request in passed)  # the default backend's own answers
    assert models.status == 200 and models.json()["data"][0]["id"] == "small-model", models
    assert not_json.status == 400 and not_json.json()["error"]["code"] == "invalid_json", not_json
    for reply in (models, not_json):
        assert reply.header("x-demo-backend") == "small" and reply.header("x-switchyard-backend") is None, reply


class Upload:
    """A client still sending its body: switchyard has answered its headers and waits."""

    def __init__(self, gw: Gateway, body: bytes) -> None:
        self.body = body
        answered = envoy_counter(gw, "http.ingress.ext_proc.stream_msgs_received")
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
        self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        wait_for(lambda: envoy_counter(gw, "http.ingress.ext_proc.stream_msgs_received") > answered,
                 "switchyard's answer to the upload's headers", gw)

    def answer(self, send_body: bool = True) -> tuple[bytes, bytes]:
        """Sends the body (or not), reads the answer to the end: (status line + headers, body)."""
        if send_body:
            self.sock.sendall(self.body)
        answer = b""
        while chunk := self.sock.recv(65536):
            answer += chunk
        self.sock.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        return head, payload


# -- kill -9 ----------------------------------------------------------------------------------
def test_kill_9_leaves_requests_in_flight_whole(gw):
    in_flight = start_in_flight(gw)
    upload = Upload(gw, json.dumps(chat(CODE)).encode())  # not routed yet: switchyard waits for its body
    kill_9(gw)
    before = gw.backend_requests()
    assert_fail_closed(gw.post(chat(CHAT)))  # while it is down: not routed, reaches nothing
    head, payload = upload.answer(send_body=False)
    assert head.startswith(b"HTTP/1.1 500") and b"x-demo-backend" not in head, head
    assert json.loads(payload)["error"]["code"] == "router_unavailable"
    assert gw.backend_requests() == before
    finish_in_flight(*in_flight)  # routed before the kill: every one whole
    restart(gw)
    assert_whole_completion(gw.post(chat(CODE)), "large", CODE)


# -- SIGTERM ----------------------------------------------------------------------------------
def _health(port: int, service: str = "") -> int | None:
    """switchyard's health status for ``service``, or None once it refuses calls (it is stopping)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            return None


def _drain_events(gw: Gateway) -> list[dict]:
    """switchyard's log lines about its drain, oldest first."""
    events = [json.loads(line) for line in gw.stack.switchyard.log.read_text(errors="replace").splitlines()
              if line.startswith("{")]
    return [e for e in events if e["event"] in ("draining", "drain ended")]


def _log_since(gw: Gateway, offset: int) -> str:
    """switchyard's log from byte ``offset`` on."""
    with gw.stack.switchyard.log.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _log_size(gw: Gateway) -> int:
    return gw.stack.switchyard.log.stat().st_size


def assert_stopped_quietly(stopping_log: str) -> None:
    """No traceback, nor an error-level line, as switchyard stops (a call still open when
    the grace period ends is cancelled quietly)."""
    assert "Traceback" not in stopping_log and "CancelledError" not in stopping_log, stopping_log
    errors = [line for line in stopping_log.splitlines() if line.startswith("{") and json.loads(line)["level"] == "error"]
    assert errors == []


def test_sigterm_with_no_drain_finishes_in_flight_requests_and_refuses_new_ones(gw, drain):
    drain(0)  # --drain-seconds 0: switchyard refuses new streams as soon as it gets SIGTERM
    offset = _log_size(gw)
    in_flight = start_in_flight(gw)
    body = json.dumps(chat(CODE)).encode()
    in_time, too_late = Upload(gw, body), Upload(gw, body)

    gw.stack.switchyard.process.send_signal(signal.SIGTERM)
    wait_for(lambda: _health(gw.stack.ports.extproc) is None, "switchyard to stop accepting streams", gw)
    assert gw.stack.switchyard.running, "the uploads' streams keep switchyard in its grace period"
    before = gw.backend_requests()
    for text in (CHAT, CODE):  # new requests while it stops: Envoy's 500, not routed
        reply = gw.post(chat(text))
        assert reply.status == 500, reply
        assert_fail_closed(reply)
    assert gw.backend_requests() == before

    head, payload = in_time.answer()  # a stream in flight is still served within the grace period
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"x-demo-backend: large" in head and json.loads(payload)["model"] == "large-model"

    gw.stack.switchyard.process.wait(GRACE_S + 10)  # the grace period ends: the late upload is cut
    assert gw.stack.switchyard.process.returncode == 0
    assert_stopped_quietly(_log_since(gw, offset))
    head, payload = too_late.answer(send_body=False)
    assert head.startswith(b"HTTP/1.1 500") and b"x-demo-backend" not in head, head
    assert json.loads(payload)["error"]["code"] == "router_unavailable"

    finish_in_flight(*in_flight)  # routed before SIGTERM: whole, though switchyard has exited
    assert gw.backend_requests() == {k: v + 1 if k == "large" else v for k, v in before.items()}
    assert_fail_closed(gw.post(chat(CHAT)))


def test_sigterm_drains_routing_new_requests_then_exits_0(gw, drain):
    drain(DRAIN_S)
    process, port = gw.stack.switchyard.process, gw.stack.ports.extproc
    offset = _log_size(gw)
    late = Upload(gw, json.dumps(chat(CODE)).encode())  # still sending when the drain and grace end
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for(lambda: _health(port) == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING", gw)
    assert _health(port, EXT_PROC_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING

    before = gw.backend_requests()
    for text, backend in ((CODE, "large"), (CHAT, "small"), (CODE, "large"), (CHAT, "small")):
        assert_whole_completion(gw.post(chat(text)), backend, text)  # new requests while it drains: routed
    assert gw.backend_requests() == {k: v + 2 for k, v in before.items()}
    assert process.poll() is None and _health(port) == health_pb2.HealthCheckResponse.NOT_SERVING, "still draining"

    assert process.wait(DRAIN_S + GRACE_S + 10) == 0
    assert time.monotonic() - signalled > DRAIN_S * 0.8  # the drain lasted, and then it stopped by itself
    assert_stopped_quietly(_log_since(gw, offset))
    head, _ = late.answer(send_body=False)  # cut when the grace period ended: failed closed
    assert head.startswith(b"HTTP/1.1 500"), head
    assert [(e["event"], e.get("drain_s"), e.get("cut_short")) for e in _drain_events(gw)[-2:]] == [
        ("draining", DRAIN_S, None), ("drain ended", None, False)]
    assert_fail_closed(gw.post(chat(CHAT)))  # once it has exited: Envoy's 500, nothing routed


def test_a_second_sigterm_ends_the_drain_at_once(gw, drain):
    long_drain = 120
    drain(long_drain)
    process, port = gw.stack.switchyard.process, gw.stack.ports.extproc
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: _health(port) == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING", gw)
    assert_whole_completion(gw.post(chat(CODE)), "large", CODE)  # draining
    assert process.poll() is None

    process.send_signal(signal.SIGTERM)
    assert process.wait(GRACE_S + 10) == 0  # far sooner than the drain's 120 s
    assert [(e["event"], e.get("drain_s"), e.get("cut_short")) for e in _drain_events(gw)[-2:]] == [
        ("draining", long_drain, None), ("drain ended", None, True)]
    assert_fail_closed(gw.post(chat(CHAT)))


# -- restart under load -------------------------------------------------------------------------
LOAD = [  # (body, extra headers): cheap rule hits, the default, a direct model, streaming
    (chat(CODE), {}),
    (chat(CHAT), {}),
    (chat("Prove that the square root of 2 is irrational."), {}),
    ({**chat("hello"), "model": "large-model"}, {}),
    (chat("tell me a joke", stream=True), {}),
]


def test_restart_under_load_recovers_by_itself_and_never_misroutes(gw, policy_file):
    expected = [expected_backend(policy_file, body) for body, _ in LOAD]
    assert set(expected) == {"small", "large"}
    results: list[tuple[int, float, Response]] = []  # (LOAD index, sent at, reply)
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            body, headers = LOAD[i % len(LOAD)]
            sent = time.monotonic()
            results.append((i % len(LOAD), sent, gw.post(body, headers)))
            i += 1

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: len(results) >= 30, "30 answers before the kill", gw)
        kill_9(gw)
        killed = time.monotonic()
        wait_for(lambda: sum(1 for _, sent, _ in results if sent > killed) >= 5, "requests during the outage", gw)
        restart(gw)
        back = time.monotonic()
        wait_for(lambda: sum(1 for _, sent, _ in results if sent > back) >= 60, "60 answers after the restart", gw)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)

    failed_while_up = []
    for index, sent, reply in results:
        if reply.status == 200:  # every answer came from the backend the policy names
            assert reply.header("x-demo-backend") == expected[index], (LOAD[index], reply)
            assert reply.header("x-switchyard-backend") == expected[index], (LOAD[index], reply)
        else:
            assert_fail_closed(reply)
            if sent > back:
                failed_while_up.append(reply)
    outage = [reply for _, sent, reply in results if killed < sent < back]
    assert any(reply.status != 200 for reply in outage), "the outage was seen"
    assert not failed_while_up, "requests recover once switchyard serves again, without any retry or restart of Envoy"


# -- the policy file broken -------------------------------------------------------------------
def _rejections_logged(gw: Gateway) -> int:
    """How many policy versions switchyard has logged as rejected (errors of its policy logger)."""
    count = 0
    for line in gw.stack.switchyard.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            count += entry.get("logger") == "switchyard.policy" and entry.get("level") == "error"
    return count


def _reload(gw: Gateway) -> None:
    gw.stack.switchyard.process.send_signal(signal.SIGHUP)


def _routes_like(gw: Gateway, default: str) -> None:
    """Requests follow the policy whose default backend is ``default`` (code always → large)."""
    assert_whole_completion(gw.post(chat(CHAT)), default, CHAT)
    assert_whole_completion(gw.post(chat(CODE)), "large", CODE)


def _chmod_stops_reads(path: Path) -> bool:
    """False as root (or with CAP_DAC_OVERRIDE): chmod 000 does not stop this process reading."""
    try:
        path.read_bytes()
    except PermissionError:
        return True
    return False


def test_broken_policy_file_never_replaces_the_running_policy(gw, policy_file):
    good = {"small": DEFAULT_POLICY.read_text()}
    good["large"] = good["small"].replace("\ndefault: small\n", "\ndefault: large\n")
    assert good["large"] != good["small"]
    chmod_effective = None

    def make_unreadable(path: Path, cycle: int) -> str:
        nonlocal chmod_effective
        path.write_text(good[running])  # the running policy's own text, then no read permission
        os.chmod(path, 0)
        chmod_effective = _chmod_stops_reads(path)
        if chmod_effective:
            return "chmod 000"
        # As root chmod does not stop reads (the file still holds the running policy): make
        # it unreadable for root too, a directory where the file was.
        os.chmod(path, 0o644)
        path.unlink()
        path.mkdir()
        return "a directory in its place"

    faults = [
        ("garbage", lambda path, cycle: path.write_text(f"{{{{{{ not: [a policy\n# cycle {cycle}\n")),
        ("removed", lambda path, cycle: path.unlink()),
        ("emptied", lambda path, cycle: path.write_text("")),
        ("unreadable", make_unreadable),
    ]
    running = "small"
    try:
        _routes_like(gw, running)
        for cycle in range(3):
            for name, break_it in faults:
                logged = _rejections_logged(gw)
                how = break_it(policy_file, cycle) or name
                _reload(gw)
                wait_for(lambda: _rejections_logged(gw) > logged, f"the rejection of the {how} policy (cycle {cycle})", gw)
                _routes_like(gw, running)  # the last good policy still routes
                assert gw.stack.switchyard.running
                if policy_file.is_dir():
                    policy_file.rmdir()
                elif policy_file.exists():
                    os.chmod(policy_file, 0o644)
            # a good version again: it takes over, so reloading still works after the faults
            running = "large" if running == "small" else "small"
            policy_file.write_text(good[running])
            _reload(gw)
            wait_for(lambda: gw.post(chat(CHAT)).header("x-demo-backend") == running,
                     f"the good policy with default {running} to take over", gw)
            _routes_like(gw, running)
    finally:
        if policy_file.is_dir():
            policy_file.rmdir()
        elif policy_file.exists():
            os.chmod(policy_file, 0o644)
        policy_file.write_text(good["small"])
        _reload(gw)
    assert chmod_effective is not None
