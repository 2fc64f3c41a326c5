"""A tiny OpenAI-compatible backend for the demo and the integration tests.

    python -m demo.backend --name small --port 18001 [--model small-model]

``POST /v1/chat/completions`` answers ``"[<name>] you asked: <last user message>"`` as a
``chat.completion`` (or, with ``"stream": true``, as SSE ``chat.completion.chunk`` events and
``data: [DONE]``) whose ``model`` is the model it received. Every response carries
``x-demo-backend: <name>``; completions also ``x-demo-received-model``, and every POST
``x-demo-received-sha256`` (of the body) and ``x-demo-received-switchyard`` (the
``x-switchyard-*`` request headers that reached it, as JSON) and
``x-demo-received-credentials`` (the ``authorization``, ``api-key`` and ``x-api-key``
headers that reached it, as JSON: a demo backend holds no secrets). ``GET /health`` and
``GET /v1/models`` answer too, and ``GET /demo/stats`` counts the requests seen so far, in
memory only (tests use it to prove that a request never reached a backend). A request
header ``x-demo-delay-ms: N`` makes an answer slow, for fault tests: a plain answer (any
path or status) waits N ms before its headers, a stream pauses N ms between events.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["make_server", "main"]

ECHO_CHARS = 60
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")


def _last_user_text(messages: object) -> str:
    """The text of the last user message (text parts of a multimodal message joined)."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connection pool expects
    disable_nagle_algorithm = True  # headers and body are two writes: without this, +40 ms (delayed ACK)
    server: _BackendServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: prompts are user data

    # -- plumbing -----------------------------------------------------------------------
    def _send(self, status: int, payload: object, extra: dict[str, str] | None = None) -> None:
        time.sleep(self._delay())
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-demo-backend", self.server.name)
        for key, value in {**self._echo, **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    _echo: dict[str, str] = {}

    def _remember(self, raw: bytes) -> None:
        """Echo headers: what this backend received (for tests to check what Envoy forwarded)."""
        seen = {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-switchyard-")}
        keys = {k.lower(): v for k, v in self.headers.items() if k.lower() in CREDENTIAL_HEADERS}
        self._echo = {
            "x-demo-received-sha256": hashlib.sha256(raw).hexdigest(),
            "x-demo-received-switchyard": json.dumps(seen, sort_keys=True),
            "x-demo-received-credentials": json.dumps(keys, sort_keys=True),
        }

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    # -- endpoints ----------------------------------------------------------------------
    def do_GET(self) -> None:
        self._echo = {}
        self.server.count(self.path, 0)
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, {"status": "ok", "backend": self.server.name})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model", "owned_by": "demo"}]})
        elif path == "/demo/stats":
            self._send(200, self.server.stats())
        else:
            self._send(404, {"error": {"message": f"No route {path}.", "type": "invalid_request_error", "code": "not_found"}})

    def do_POST(self) -> None:
        raw = self._read_body()
        self.server.count(self.path, len(raw))
        self._remember(raw)
        if self.path.split("?", 1)[0] != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"No route {self.path}.", "type": "invalid_request_error", "code": "not_found"}})
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._send(400, {"error": {"message": "Body is not a JSON object.", "type": "invalid_request_error", "code": "invalid_json"}})
            return
        model = str(body.get("model", ""))
        text = f"[{self.server.name}] you asked: {_last_user_text(body.get('messages'))[:ECHO_CHARS]}"
        delay = self._delay()
        if body.get("stream"):
            self._stream(model, text, delay or 0.005)
        else:
            self._send(200, _completion(model, text), {"x-demo-received-model": model})

    def _delay(self) -> float:
        """Seconds from the ``x-demo-delay-ms`` request header (0 when absent or not a number)."""
        value = self.headers.get("x-demo-delay-ms", "")
        return min(int(value), 60_000) / 1000 if value.isdigit() else 0.0

    def _stream(self, model: str, text: str, pause: float) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("x-demo-backend", self.server.name)
        self.send_header("x-demo-received-model", model)
        for key, value in self._echo.items():
            self.send_header(key, value)
        self.end_headers()
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        words = text.split(" ")
        pieces = [{"role": "assistant", "content": ""}]
        pieces += [{"content": (" " if i else "") + w} for i, w in enumerate(words)]
        for i, delta in enumerate([*pieces, None]):
            choice = {"index": 0, "delta": delta or {}, "finish_reason": None if delta else "stop"}
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            if i < len(pieces):
                time.sleep(pause)  # a visible stream, not one write
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def _completion(model: str, text: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": len(text.split()), "total_tokens": len(text.split())},
    }


class _BackendServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], name: str, model: str) -> None:
        super().__init__(address, _Handler)
        self.name, self.model = name, model
        self._lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._bytes = 0

    def count(self, path: str, size: int) -> None:
        if path.startswith("/demo/") or path == "/health":
            return
        with self._lock:
            key = path.split("?", 1)[0]
            self._requests[key] = self._requests.get(key, 0) + 1
            self._bytes += size

    def stats(self) -> dict:
        with self._lock:
            return {"backend": self.name, "requests": sum(self._requests.values()),
                    "by_path": dict(self._requests), "body_bytes": self._bytes}


def make_server(name: str, port: int, host: str = "127.0.0.1", model: str | None = None) -> _BackendServer:
    """A backend server bound to ``host:port`` (port 0 picks one); call ``serve_forever()``."""
    return _BackendServer((host, port), name, model or f"{name}-model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.backend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="Backend name, echoed in answers and x-demo-backend.")
    parser.add_argument("--port", type=int, required=True, help="TCP port on --host.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", help="Model id for GET /v1/models (default NAME-model).")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.name, args.port, args.host, args.model)
    except OSError as exc:
        print(f"demo backend {args.name}: cannot listen on {args.host}:{args.port}: {exc.strerror}.", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop like Ctrl-C: close the socket
    print(f"demo backend {args.name}: serving on {args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
