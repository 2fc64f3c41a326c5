"""Start and stop the local stack: demo backends, switchyard and Envoy, each a child process.

Used by ``python -m demo.run`` (fixed ports), tests/integration (free ports) and the benches.
Every child writes to its own log file under ``workdir``; :meth:`Stack.logs` gathers their
tails for error messages. :meth:`Stack.stop` always stops every child: SIGTERM, wait, SIGKILL.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.envoy_config import write_envoy_config
from harness.processes import Child, StackError, envoy_binary, free_port, grpc_serving, http_ok

__all__ = ["Ports", "Stack", "policy_backends"]


def policy_backends(policy: Path) -> tuple[list[str], str]:
    """The backend names and the default backend of a policy file (read, not validated)."""
    data = yaml.safe_load(Path(policy).read_text())
    try:
        return list(data["backends"]), str(data["default"])
    except (TypeError, KeyError) as exc:
        raise StackError(f"{policy}: a policy needs `backends` and `default`; missing {exc}.") from exc


@dataclass
class Ports:
    listen: int
    admin: int
    extproc: int
    backends: dict[str, int] = field(default_factory=dict)

    @classmethod
    def free(cls, backends: list[str]) -> Ports:
        return cls(free_port(), free_port(), free_port(), {name: free_port() for name in backends})


class Stack:
    """Backends + switchyard + Envoy for one policy. ``start()`` returns once all are ready."""

    def __init__(
        self,
        policy: Path,
        workdir: Path,
        ports: Ports | None = None,
        *,
        max_body_bytes: int | None = None,
        fail_open: bool = False,
        envoy_args: tuple[str, ...] = ("--concurrency", "1"),
    ) -> None:
        self.policy = Path(policy)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        names, self.default_backend = policy_backends(self.policy)
        self.ports = ports or Ports.free(names)
        self.max_body_bytes, self.fail_open, self.envoy_args = max_body_bytes, fail_open, envoy_args
        self.envoy_options: dict[str, Any] = {}  # more EnvoyOptions fields for the rendered config
        self.backends = {
            name: Child(f"backend-{name}", [sys.executable, "-m", "demo.backend", "--name", name, "--port", str(port)],
                        self.workdir / f"backend-{name}.log")
            for name, port in self.ports.backends.items()
        }
        self.switchyard = Child(
            "switchyard",
            # No drain: nothing sits in front of this Envoy, and stop() ends every child at once.
            [sys.executable, "-m", "extproc", "serve", "--policy", str(self.policy.resolve()),
             "--listen", f"127.0.0.1:{self.ports.extproc}", "--drain-seconds", "0", "--grace", "1"],
            self.workdir / "switchyard.log",
        )
        self.envoy_config = self.workdir / "envoy.yaml"
        self.envoy = Child(
            "envoy",
            [envoy_binary(), "-c", str(self.envoy_config), "--log-level", "warn",
             "--base-id", str(self.ports.admin),  # the admin port: unique while we run
             "--file-flush-interval-msec", "100",  # access log lines show up at once
             *envoy_args],
            self.workdir / "envoy.log",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listen}"

    @property
    def children(self) -> list[Child]:
        return [*self.backends.values(), self.switchyard, self.envoy]

    def start(self, timeout: float = 30.0) -> Stack:
        write_envoy_config(
            self.envoy_config, self.policy, listen_port=self.ports.listen, admin_port=self.ports.admin,
            extproc_port=self.ports.extproc, backends=self.ports.backends, max_body_bytes=self.max_body_bytes,
            fail_open=self.fail_open, envoy_options=self.envoy_options,
        )
        try:
            for child in self.children:
                child.start()
            deadline = time.monotonic() + timeout
            for name, port in self.ports.backends.items():
                self._wait(self.backends[name], lambda p=port: http_ok(p, "/health"), deadline)
            self.wait_switchyard(deadline)
            self._wait(self.envoy, lambda: http_ok(self.ports.admin, "/ready"), deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_switchyard(self, deadline: float) -> None:
        self._wait(self.switchyard, lambda: grpc_serving(self.ports.extproc), deadline)

    def _wait(self, child: Child, ready: Callable[[], bool], deadline: float) -> None:
        while not ready():
            if not child.running:
                raise StackError(f"{child.name} exited (code {child.process.returncode}) before it was ready.\n{self.logs()}")
            if time.monotonic() > deadline:
                raise StackError(f"{child.name} was not ready in time.\n{self.logs()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every child: all get SIGTERM at once, then each is waited for (SIGKILL after 5 s)."""
        children = list(reversed(self.children))
        for child in children:
            child.terminate()
        for child in children:
            child.stop()

    def logs(self, lines: int = 40) -> str:
        """The last ``lines`` lines of every child's log, for error messages."""
        parts = []
        for child in self.children:
            state = "running" if child.running else f"exited {child.process.returncode}" if child.process else "not started"
            parts.append(f"----- {child.name} ({state}; {child.log}) -----\n{child.tail(lines)}")
        return "\n".join(parts)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

