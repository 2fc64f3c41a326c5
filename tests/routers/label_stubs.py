"""Stub OpenAI-compatible backends on loopback for ``switchyard label``'s tests and bench.

:class:`StubBackend` is a real HTTP server (threads) answering ``POST .../chat/completions``
by a rule: ``answer(messages) -> text``. Behaviours: ``ok``; ``hang`` (answers after
``hang_s``, longer than the client's timeout); ``malformed`` (200 with a body that is not
JSON); ``rate_limited`` (each distinct prompt first gets 429 with ``Retry-After``, then an
answer); ``server_error`` (always 503). :func:`down_url` is a URL where nothing listens.

The arithmetic prompts (:func:`sum_prompt`) make right and wrong answers easy to predict:
``What is A+B?`` with reference ``A+B``; :func:`right` answers it GSM8K style, :func:`short_only`
only when the prompt is short, :func:`rule_judge` grades like a careful judge would.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Answer = Callable[[list[dict[str, Any]]], str]

#: A prompt longer than this is one ``short_only`` gets wrong.
SHORT_PROMPT_CHARS = 24


def sum_prompt(a: int, b: int, padding: str = "") -> dict[str, Any]:
    """A prompt row: ``What is A+B?`` (plus ``padding``), reference ``A+B``."""
    return {"id": f"q{a}-{b}{'-long' if padding else ''}",
            "messages": [{"role": "user", "content": f"What is {a}+{b}?{padding}"}], "reference": str(a + b)}


def _operands(messages: list[dict[str, Any]]) -> tuple[int, int]:
    a, b = re.search(r"What is (\d+)\+(\d+)\?", messages[-1]["content"]).groups()
    return int(a), int(b)


def right(messages: list[dict[str, Any]]) -> str:
    a, b = _operands(messages)
    return f"{a} plus {b} is {a + b}.\n#### {a + b}"


def short_only(messages: list[dict[str, Any]]) -> str:
    a, b = _operands(messages)
    total = a + b if len(messages[-1]["content"]) <= SHORT_PROMPT_CHARS else a + b + 1
    return f"I think it is {total}.\n#### {total}"


def _section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def _is_right(answer: str, reference: str) -> bool:
    found = re.findall(r"####\s*(-?\d+)", answer)
    return bool(found) and found[-1] == reference.strip()


def rule_judge(messages: list[dict[str, Any]]) -> str:
    """Judges the shipped prompts by the rule: an answer ending ``#### <reference>`` is right.
    Absolute: ``[[9]]`` right, ``[[2]]`` wrong. Pairwise: the right one wins, else a tie."""
    prompt = messages[-1]["content"]
    reference = _section(prompt, "[Reference Answer]\n", "\n\n")
    if "[The Start of Assistant A's Answer]" not in prompt:
        answer = _section(prompt, "[The Start of Assistant's Answer]\n", "\n[The End of Assistant's Answer]")
        return f"Judged by the rule. Rating: [[{9 if _is_right(answer, reference) else 2}]]"
    a = _is_right(_section(prompt, "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's"), reference)
    b = _is_right(_section(prompt, "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's"), reference)
    return "Verdict: " + ("[[A]]" if a and not b else "[[B]]" if b and not a else "[[C]]")


def first_position_judge(messages: list[dict[str, Any]]) -> str:
    """A judge that always prefers the answer shown first (position bias): ``[[A]]``."""
    return "Verdict: [[A]]"


def down_url() -> str:
    """A base URL on a loopback port where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class StubBackend:
    """A loopback OpenAI-compatible server; use as a context manager. ``calls`` counts the
    requests, ``prompts`` how often each prompt text came, ``authorizations`` the headers,
    ``connections`` the connections accepted."""

    def __init__(self, answer: Answer = right, *, behaviour: str = "ok", delay_s: float = 0.0,
                 hang_s: float = 5.0, retry_after: str = "0", keep_alive: str = "yes") -> None:
        self.answer = answer
        self.behaviour = behaviour
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.retry_after = retry_after
        #: "yes": connections stay open between requests; "close": each answer says
        #: ``Connection: close``; "drop": the server closes each connection after its answer
        #: without saying so (as one that times idle connections out does).
        self.keep_alive = keep_alive
        self.connections = 0
        self.calls = 0
        self.prompts: Counter[str] = Counter()
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> StubBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _reply(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        messages = body["messages"]
        text = messages[-1]["content"] if isinstance(messages[-1].get("content"), str) else ""
        with self._lock:
            self.calls += 1
            self.prompts[text] += 1
            seen = self.prompts[text]
        if self.behaviour == "server_error":
            return 503, {}, b'{"error": "overloaded"}'
        if self.behaviour == "rate_limited" and seen == 1:
            return 429, {"Retry-After": self.retry_after}, b'{"error": "rate limited"}'
        if self.behaviour == "hang":
            time.sleep(self.hang_s)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.behaviour == "malformed":
            return 200, {}, b'{"choices": [{"message": '
        answer = self.answer(messages)
        usage = {"prompt_tokens": len(text), "completion_tokens": len(answer), "total_tokens": len(text) + len(answer)}
        payload = {"id": "stub", "object": "chat.completion", "model": body.get("model"),
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop"}], "usage": usage}
        return 200, {}, json.dumps(payload, ensure_ascii=False).encode("utf-8")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with stub._lock:
                    stub.connections += 1

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                with stub._lock:
                    stub.authorizations.append(self.headers.get("Authorization"))
                status, headers, payload = stub._reply(body)
                try:
                    self.send_response(status)
                    if stub.keep_alive == "close":
                        headers = {**headers, "Connection": "close"}
                    for name, value in {**headers, "Content-Type": "application/json",
                                        "Content-Length": str(len(payload))}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                    self.wfile.flush()
                    if stub.keep_alive == "drop":
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
