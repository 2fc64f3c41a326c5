"""A gateway whose backends fail on demand: :mod:`harness.faulty_backends` + switchyard + Envoy.

For the failover tests and bench. Like :class:`harness.Stack`, but every backend of the policy
is served by one :mod:`harness.faulty_backends` process (its behaviour set at run time with
:meth:`FaultyStack.mode`), and Envoy's config is ``switchyard envoy render``'s with a credential
file per backend named in ``credentials`` and the given per-try timeout.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from pathlib import Path

from extproc.envoy._render import Address, Credential, EnvoyOptions, Upstream, render_envoy
from extproc.policy._loading import load_policy
from harness.envoy_config import LOOPBACK
from harness.processes import Child, StackError, envoy_binary, free_port, grpc_serving, http_ok

__all__ = ["FaultyStack"]


class FaultyStack:
    """``credentials``: backend -> the ``authorization`` value Envoy injects for it (``Bearer`` + key)."""

    def __init__(self, policy: Path, workdir: Path, *, credentials: dict[str, str] | None = None,
                 per_try_timeout_s: float = 2.0, envoy_concurrency: int = 1) -> None:
        self.policy = load_policy(policy)
        self.policy_path = Path(policy)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.credentials = credentials or {}
        self.per_try_timeout_s = per_try_timeout_s
        self.listen, self.admin, self.extproc, self.control = free_port(), free_port(), free_port(), free_port()
        self.ports = {name: free_port() for name in self.policy.backends}
        self.backends = Child("faulty-backends", [
            sys.executable, "-m", "harness.faulty_backends", "--control", str(self.control),
            *(f"{name}={port}" for name, port in self.ports.items())], self.workdir / "backends.log")
        self.switchyard = Child("switchyard", [
            sys.executable, "-m", "extproc", "serve", "--policy", str(self.policy_path.resolve()),
            "--listen", f"{LOOPBACK}:{self.extproc}", "--drain-seconds", "0", "--grace", "1"],
            self.workdir / "switchyard.log")
        self.envoy_config = self.workdir / "envoy.yaml"
        self.envoy = Child("envoy", [
            envoy_binary(), "-c", str(self.envoy_config), "--log-level", "warn", "--base-id", str(self.admin),
            "--file-flush-interval-msec", "100", "--concurrency", str(envoy_concurrency)], self.workdir / "envoy.log")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.listen}"

    def write_config(self) -> Path:
        upstreams = {}
        for name, port in self.ports.items():
            credential = None
            if name in self.credentials:
                key = self.workdir / "keys" / name
                key.parent.mkdir(exist_ok=True)
                key.write_text(self.credentials[name])
                credential = Credential("authorization", str(key.resolve()))
            upstreams[name] = Upstream(Address(LOOPBACK, port), credential=credential)
        options = EnvoyOptions(listen=Address(LOOPBACK, self.listen), admin=Address(LOOPBACK, self.admin),
                               extproc=Address(LOOPBACK, self.extproc), credentials_dir=str(self.workdir / "sds"),
                               per_try_timeout_s=self.per_try_timeout_s)
        return render_envoy(self.policy, upstreams, options).write(self.envoy_config)

    def start(self, timeout: float = 30.0) -> FaultyStack:
        self.write_config()
        children = (self.backends, self.switchyard, self.envoy)
        try:
            for child in children:
                child.start()
            deadline = time.monotonic() + timeout
            for child, ready in ((self.backends, lambda: self._control("GET", "/log") is not None),
                                 (self.switchyard, lambda: grpc_serving(self.extproc)),
                                 (self.envoy, lambda: http_ok(self.admin, "/ready"))):
                while not ready():
                    if not child.running or time.monotonic() > deadline:
                        raise StackError(f"{child.name} did not start.\n{self.logs()}")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for child in (self.envoy, self.switchyard, self.backends):
            child.stop()

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"----- {c.name} -----\n{c.tail(lines)}" for c in (self.backends, self.switchyard, self.envoy))

    # -- the backends' behaviour and what they saw ------------------------------------------
    def _control(self, method: str, path: str):
        try:
            conn = http.client.HTTPConnection(LOOPBACK, self.control, timeout=5)
            conn.request(method, path)
            body = conn.getresponse().read()
            conn.close()
        except OSError:
            return None
        return json.loads(body)

    def mode(self, backend: str, mode: str) -> None:
        """Set ``backend``'s behaviour (see :mod:`harness.faulty_backends`)."""
        self._control("POST", f"/mode/{backend}/{mode}")

    def reset(self) -> None:
        """Every backend answers normally again, and the log is emptied."""
        for name in self.ports:
            self.mode(name, "ok")
        self._control("POST", "/clear")

    def seen(self) -> list[dict]:
        """What the backends received, in order: one entry per request (per attempt)."""
        return self._control("GET", "/log")

    def stats(self) -> dict[str, int]:
        """Envoy's counters (admin ``/stats``), by name."""
        conn = http.client.HTTPConnection(LOOPBACK, self.admin, timeout=5)
        conn.request("GET", "/stats?format=json&type=Counters")
        data = json.loads(conn.getresponse().read())
        conn.close()
        return {s["name"]: s.get("value", 0) for s in data["stats"] if "name" in s}
