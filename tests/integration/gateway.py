"""A real gateway for tests: demo backends + switchyard + Envoy on free loopback ports.

``Gateway`` wraps :class:`harness.Stack` with small HTTP helpers. Responses are plain
``Response`` objects (status, lower-cased headers, body), never exceptions, so a test can
assert on 4xx/5xx answers directly.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Stack

__all__ = ["DEFAULT_POLICY", "REPO", "Gateway", "Response", "chat"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = REPO / "policies" / "default.yaml"


def chat(text: str | list, **extra: Any) -> dict[str, Any]:
    """A chat completions body asking ``model="auto"`` with one user message."""
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def __repr__(self) -> str:  # shows up in assertion messages
        return f"Response({self.status}, headers={self.headers}, body={self.body[:300]!r})"


class Gateway:
    """One running stack for one policy. ``url`` is Envoy's listener."""

    def __init__(
        self, policy: Path, workdir: Path, *, max_body_bytes: int | None = None, fail_open: bool = False,
    ) -> None:
        self.stack = Stack(policy, workdir, max_body_bytes=max_body_bytes, fail_open=fail_open)

    def start(self) -> Gateway:
        self.stack.start()
        return self

    def stop(self) -> None:
        self.stack.stop()

    @property
    def url(self) -> str:
        return self.stack.url

    @property
    def port(self) -> int:
        return self.stack.ports.listen

    def logs(self, lines: int = 60) -> str:
        return self.stack.logs(lines)

    # -- HTTP -----------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        *,
        chunked: bool = False,
        timeout: float = 10.0,
    ) -> Response:
        """One request on a fresh connection; ``chunked`` sends ``body`` (an iterable) chunked."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            reply = conn.getresponse()
            data = reply.read()
        except (ConnectionError, http.client.HTTPException) as exc:
            raise AssertionError(f"{method} {path} failed: {exc!r}\n{self.logs()}") from exc
        finally:
            conn.close()
        headers_out: dict[str, str] = {}
        for key, value in reply.getheaders():
            key = key.lower()
            headers_out[key] = f"{headers_out[key]},{value}" if key in headers_out else value
        return Response(reply.status, headers_out, data)

    def post(self, body: Any, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions") -> Response:
        """POST ``body`` (a dict/list is sent as JSON, bytes/str as is) with a JSON content type."""
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return self.request("POST", path, body, {"content-type": "application/json", **(headers or {})})

    def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return self.request("GET", path, headers=headers)

    def openai_client(self, **kwargs: Any):
        """An ``openai.OpenAI`` client on the gateway (no retries, so errors surface at once)."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="test", max_retries=0, timeout=10, **kwargs)

    # -- what happened behind Envoy ----------------------------------------------------------
    def backend_requests(self) -> dict[str, int]:
        """Requests each demo backend has seen so far (asked directly, not through Envoy)."""
        counts = {}
        for name, port in self.stack.ports.backends.items():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/demo/stats")
            counts[name] = json.loads(conn.getresponse().read())["requests"]
            conn.close()
        return counts

    def access_log_entries(self, timeout: float = 5.0, **match: Any) -> list[dict[str, Any]]:
        """Envoy access-log lines (JSON) whose fields equal ``match``; waits for the log flush."""
        deadline = time.monotonic() + timeout
        while True:
            entries = []
            for line in self.stack.envoy.log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    entry = json.loads(line)
                    if all(entry.get(k) == v for k, v in match.items()):
                        entries.append(entry)
            if entries or time.monotonic() > deadline:
                return entries
            time.sleep(0.1)

    @contextlib.contextmanager
    def switchyard_paused(self) -> Iterator[None]:
        """SIGSTOP switchyard for the ``with`` block (connected but silent), then SIGCONT."""
        process = self.stack.switchyard.process
        process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            process.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def switchyard_stopped(self) -> Iterator[None]:
        """Stop switchyard for the ``with`` block, then start it again and wait until it serves."""
        self.stack.switchyard.stop()
        try:
            yield
        finally:
            self.stack.switchyard.start()
            self.stack.wait_switchyard(time.monotonic() + 20)
