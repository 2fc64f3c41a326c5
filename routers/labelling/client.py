"""Calls to OpenAI-compatible ``/chat/completions`` endpoints: bounded, timed, retried.

Each model gets its own worker threads (``max_concurrency`` of them; ``http.client``), so at
most that many of its calls are in flight. Each worker keeps its connection open between calls
(HTTP keep-alive), so a labelling run opens about ``max_concurrency`` connections a model, not one
a call; a kept connection the server has closed meanwhile is replaced once, before the call is
counted as failed. A call ends within
``timeout_s`` (from sending to the last byte); an answer of 429 or 5xx is retried up to
``retries.max_attempts`` tries in all, after the answer's ``Retry-After`` (seconds or an
HTTP date, at most :data:`MAX_RETRY_AFTER_S`) or else ``backoff_s`` doubled each time (at
most :data:`MAX_BACKOFF_S`), slept on the event loop, not in a worker. A call that still
fails raises :class:`CallFailed` whose ``kind`` is one of :data:`FAILURE_KINDS`.

The API key goes only into the ``Authorization`` header; no error message or log line
carries headers, bodies or prompts.
"""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import json
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from routers.labelling.config import Endpoint, Retries
from routers.labelling.errors import LabelError

__all__ = ["FAILURE_KINDS", "MAX_BACKOFF_S", "MAX_RETRY_AFTER_S", "Completion", "CallFailed", "ChatClient",
           "check_reachable"]

#: What a failed call is recorded as (``outcomes.<model>.error``):
#: ``timeout`` (no full answer within ``timeout_s``), ``http_5xx`` / ``http_429`` (still
#: failing after the retries), ``http_4xx`` (another client error: a bad key or model name;
#: not retried), ``refused`` (connection refused: nothing listens), ``unreachable`` (no route,
#: DNS, TLS or another connection error), ``malformed`` (an answer that is not an
#: OpenAI chat completion).
FAILURE_KINDS = ("timeout", "http_5xx", "http_429", "http_4xx", "refused", "unreachable", "malformed")
#: The longest wait between tries without a ``Retry-After``.
MAX_BACKOFF_S = 60.0
#: The longest ``Retry-After`` honoured (a longer one is cut to this).
MAX_RETRY_AFTER_S = 300.0
#: Largest answer body read; a bigger one is ``malformed``.
_MAX_ANSWER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Completion:
    """One successful call: the answer's text, its ``usage`` and how many tries it took."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int = 1


class CallFailed(Exception):
    """A call that did not give an answer: ``kind`` (see :data:`FAILURE_KINDS`), ``attempts``."""

    def __init__(self, kind: str, attempts: int, detail: str = "") -> None:
        super().__init__(f"{kind} after {attempts} attempt(s){': ' + detail if detail else ''}")
        self.kind = kind
        self.attempts = attempts
        self.detail = detail


@dataclass(frozen=True)
class _Reply:
    status: int
    retry_after: str | None
    body: bytes


class _Retry(Exception):
    def __init__(self, kind: str, delay: float | None) -> None:
        self.kind = kind
        self.delay = delay


class ChatClient:
    """Calls one :class:`Endpoint`; ``sleep`` and ``clock`` are injectable for tests."""

    def __init__(self, endpoint: Endpoint, retries: Retries, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        self.endpoint = endpoint
        self._retries = retries
        self._sleep = sleep
        self._clock = clock
        self._url = urlsplit(endpoint.base_url + "/chat/completions")
        if self._url.scheme not in ("http", "https") or not self._url.hostname:
            raise LabelError(f"`{endpoint.name}`'s base_url must be an http(s) URL, got {endpoint.base_url!r}.")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if endpoint.api_key:
            self._headers["Authorization"] = f"Bearer {endpoint.api_key}"
        self._executor = ThreadPoolExecutor(endpoint.max_concurrency, thread_name_prefix=f"label-{endpoint.name}")
        self._local = threading.local()  # each worker's kept connection
        self._connections: set[http.client.HTTPConnection] = set()
        self._connections_lock = threading.Lock()

    def close(self) -> None:
        """Stop the workers without waiting for calls still running (their sockets time out),
        and close the kept connections."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._connections_lock:
            kept, self._connections = self._connections, set()
        for connection in kept:
            connection.close()

    async def complete(self, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any] | None = None) -> Completion:
        """The model's answer to ``messages``; :class:`CallFailed` when there is none."""
        body = {"model": self.endpoint.model, "messages": list(messages), "stream": False}
        if self.endpoint.max_tokens is not None:
            body["max_tokens"] = self.endpoint.max_tokens
        body.update(params or {})
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._completion(await self._send(payload), attempt)
            except _Retry as retry:
                if attempt >= self._retries.max_attempts:
                    raise CallFailed(retry.kind, attempt) from None
                await self._sleep(self._delay(retry.delay, attempt))
            except CallFailed as failed:
                raise CallFailed(failed.kind, attempt, failed.detail) from None

    def _delay(self, retry_after: float | None, attempt: int) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_S)
        return min(self._retries.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)

    async def _send(self, payload: bytes) -> _Reply:
        loop = asyncio.get_running_loop()
        try:
            reply = await asyncio.wait_for(loop.run_in_executor(self._executor, self._post, payload),
                                           self.endpoint.timeout_s)
        except (asyncio.TimeoutError, TimeoutError, socket.timeout):
            raise CallFailed("timeout", 1) from None
        except ConnectionRefusedError:
            raise CallFailed("refused", 1) from None
        except http.client.HTTPException as exc:
            raise CallFailed("malformed", 1, type(exc).__name__) from None
        except OSError as exc:
            raise CallFailed("unreachable", 1, exc.strerror or type(exc).__name__) from None
        if reply.status == 429 or reply.status >= 500:
            raise _Retry("http_429" if reply.status == 429 else "http_5xx", self._retry_after(reply.retry_after))
        if reply.status >= 400:
            raise CallFailed("http_4xx", 1, f"HTTP {reply.status}")
        if reply.status != 200:
            raise CallFailed("malformed", 1, f"HTTP {reply.status}")
        return reply

    def _post(self, payload: bytes) -> _Reply:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            try:
                return self._exchange(connection, payload)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                pass  # the server closed the kept connection while it was idle: one fresh try
        return self._exchange(self._connect(), payload)

    def _connect(self) -> http.client.HTTPConnection:
        url = self._url
        connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(url.hostname, url.port, timeout=self.endpoint.timeout_s)
        self._local.connection = connection
        with self._connections_lock:
            self._connections.add(connection)
        return connection

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        with self._connections_lock:
            self._connections.discard(connection)

    def _exchange(self, connection: http.client.HTTPConnection, payload: bytes) -> _Reply:
        """One request and its whole answer on ``connection``, kept open when both sides allow."""
        url = self._url
        path = url.path + (f"?{url.query}" if url.query else "")
        try:
            connection.request("POST", path, body=payload, headers=self._headers)
            response = connection.getresponse()
            body = response.read(_MAX_ANSWER_BYTES + 1)
        except BaseException:
            self._drop(connection)
            raise
        if response.will_close or not response.isclosed():  # closing, or an answer left unread
            self._drop(connection)
        return _Reply(response.status, response.getheader("Retry-After"), body)

    def _retry_after(self, raw: str | None) -> float | None:
        if raw is None:
            return None
        try:
            seconds = float(raw)
        except ValueError:
            when = email.utils.parsedate_to_datetime(raw) if raw.strip() else None
            if when is None or when.tzinfo is None:
                return None
            seconds = when.timestamp() - self._clock()
        return max(0.0, seconds) if math.isfinite(seconds) else None

    def _completion(self, reply: _Reply, attempts: int) -> Completion:
        if len(reply.body) > _MAX_ANSWER_BYTES:
            raise CallFailed("malformed", attempts, "answer too large")
        try:
            data = json.loads(reply.body)
            message = data["choices"][0]["message"]
            text = message.get("content")
            if text is None and isinstance(message.get("refusal"), str):
                text = message["refusal"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise CallFailed("malformed", attempts, "not a chat completion") from None
        return Completion(text=text, prompt_tokens=_tokens(usage.get("prompt_tokens")),
                          completion_tokens=_tokens(usage.get("completion_tokens")), attempts=attempts)


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def check_reachable(endpoint: Endpoint, timeout_s: float = 5.0) -> None:
    """:class:`LabelError` when nothing accepts a connection at ``endpoint``'s host and port."""
    url = urlsplit(endpoint.base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=min(timeout_s, endpoint.timeout_s)):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LabelError(f"The `{endpoint.name}` endpoint at {endpoint.base_url} is unreachable ({reason}); "
                         "nothing was labelled.") from exc
