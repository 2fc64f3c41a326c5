"""``RoutingRequest``: what the policy sees of one HTTP request.

Built from the request headers (always) and the buffered body (when there is one). Parsing
is strict on routed paths: a body that is not a UTF-8 JSON object with a non-empty
``messages`` list is a :class:`RequestError` with a status and an OpenAI-style code, which
the servicer turns into an immediate JSON error response.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import orjson

from extproc._errors import RequestError
from extproc.request._messages import image_urls

__all__ = [
    "RoutingRequest",
    "parse_json_body",
    "rewrite_model",
    "is_json_content_type",
    "body_too_large",
    "MAX_JSON_DEPTH",
]


def is_json_content_type(content_type: str | None) -> bool:
    """True for ``application/json`` (any parameters) and ``application/*+json``; absent counts as JSON."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def body_too_large(size: int, max_bytes: int) -> RequestError:
    """The 413 for a body of ``size`` bytes over the ``max_bytes`` limit."""
    return RequestError(
        f"The request body is {size} bytes; this gateway accepts at most {max_bytes}.",
        status=413,
        code="request_too_large",
    )


# Rewriting ``model`` splices bytes: the forwarded body is the client's body with only the
# value of each top-level ``model`` member replaced (or one member inserted), so numbers,
# escapes, key order, duplicates and whitespace reach the backend exactly as sent. The scan
# visits string tokens and brackets only; it needs no decoding, since '"' and '\\' never
# occur inside a multi-byte UTF-8 sequence, and no recursion, however deep the nesting.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]', re.DOTALL)
_SPACE = re.compile(rb"[ \t\n\r]*")
_SCALAR_END = re.compile(rb"[ \t\n\r,}\]]")
_MODEL_KEY = b'"model"'
_LONGEST_MODEL_KEY = len(_MODEL_KEY) + 5 * 5  # every letter written as a \uXXXX escape
_ESCAPED_LETTER = b"\\u006"  # how every escape of a letter of "model" starts (\u006d, ...)
_QUOTE, _COLON, _CLOSE_OBJECT = 0x22, 0x3A, 0x7D
_OPENERS = b"{["

#: The deepest nesting orjson (the body parser) accepts; deeper bodies are a 400.
MAX_JSON_DEPTH = 1024


def _is_model_key(token: bytes) -> bool:
    """Whether the JSON string ``token`` (quotes included) spells ``model``, escapes decoded."""
    if token == _MODEL_KEY:
        return True
    return b"\\" in token and len(token) <= _LONGEST_MODEL_KEY and json.loads(token) == "model"


def _value_start(raw: bytes, string_end: int) -> int:
    """Where the member value starts when the string ending at ``string_end`` is a key, else -1."""
    colon = _SPACE.match(raw, string_end).end()
    return _SPACE.match(raw, colon + 1).end() if raw[colon] == _COLON else -1


def _scalar_span(raw: bytes, start: int) -> tuple[int, int]:
    """The span of the string, number, ``true``, ``false`` or ``null`` starting at ``start``."""
    if raw[start] == _QUOTE:
        return start, _TOKEN.match(raw, start).end()
    return start, _SCALAR_END.search(raw, start).start()


def _model_value_spans(raw: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of the value of every top-level ``model`` member of the object ``raw``."""
    spans: list[tuple[int, int]] = []
    depth = 0
    container_at = -1  # start of a `model` value that is an object or array, until it closes
    for token in _TOKEN.finditer(raw):
        first = raw[token.start()]
        if first == _QUOTE:
            if depth == 1 and _is_model_key(token.group()):
                start = _value_start(raw, token.end())
                if start < 0:  # a string value that reads "model"
                    continue
                if raw[start] in _OPENERS:
                    container_at = start
                else:
                    spans.append(_scalar_span(raw, start))
        elif first in _OPENERS:
            depth += 1
        else:
            depth -= 1
            if depth == 1 and container_at >= 0:
                spans.append((container_at, token.end()))
                container_at = -1
            elif depth == 0:
                break
    return spans


@lru_cache(maxsize=256)  # model names come from the policy
def _json_string(model: str) -> bytes:
    return json.dumps(model).encode("ascii")


def rewrite_model(raw: bytes, body: dict[str, Any], model: str) -> bytes:
    """``raw`` with its top-level ``model`` set to ``model``; every other byte is kept.

    ``raw`` is a body :func:`parse_json_body` accepted and ``body`` what it returned. Every
    top-level ``model`` member is replaced (duplicates included, whichever one a backend's
    parser keeps); without one, ``"model":...`` is inserted right after the opening brace.
    """
    value = _json_string(model)
    if "model" not in body:
        spans = []
    elif raw.count(_MODEL_KEY) == 1 and _ESCAPED_LETTER not in raw:
        # The usual body: the top-level key has no other spelling, so this one is it.
        key_end = raw.index(_MODEL_KEY) + len(_MODEL_KEY)
        spans = [_scalar_span(raw, _value_start(raw, key_end))]  # `model` is a string or null
    else:
        spans = _model_value_spans(raw)
    if not spans:
        brace = raw.index(b"{")
        empty = raw[_SPACE.match(raw, brace + 1).end()] == _CLOSE_OBJECT
        return b"".join((raw[: brace + 1], b'"model":', value, b"" if empty else b",", raw[brace + 1 :]))
    pieces: list[bytes] = []
    kept = 0
    for start, end in spans:
        pieces += (raw[kept:start], value)
        kept = end
    pieces.append(raw[kept:])
    return b"".join(pieces)


def parse_json_body(raw: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Decode a chat completions body, or raise :class:`RequestError` saying what is wrong.

    Strict JSON, as strict backends read it: ``NaN``, ``Infinity``, numbers that overflow a
    double, lone UTF-16 surrogate escapes (``"\\ud800"``) and nesting deeper than
    :data:`MAX_JSON_DEPTH` are rejected. The values are only read (by the signals); the
    forwarded body is the client's bytes (:func:`rewrite_model`), so a number beyond 64 bits,
    which reads as a float here, still reaches the backend digit for digit.
    """
    if len(raw) > max_bytes:
        raise body_too_large(len(raw), max_bytes)
    if not raw or raw.isspace():
        raise RequestError("The request body is empty; expected a JSON object.", code="missing_body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise RequestError(
                f"The request body is not valid UTF-8 (byte {bad.start}).", code="invalid_encoding"
            ) from exc
        if "depth limit" in exc.msg:  # orjson's own limit; pinned by tests/extproc/test_request_exact.py
            raise RequestError(
                f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels "
                f"(at line {exc.lineno} column {exc.colno}).",
                code="json_too_deep",
            ) from exc
        raise RequestError(
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.",
            code="invalid_json",
        ) from exc
    if not isinstance(body, dict):
        raise RequestError(
            f"The request body must be a JSON object, got a JSON {type(body).__name__}.", code="invalid_body"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("The request body needs a non-empty `messages` list.", code="invalid_messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(
                f"`messages[{index}]` must be an object with a string `role`.", code="invalid_messages"
            )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"`model` must be a string, got {type(model).__name__}.", code="invalid_model")
    return body


@dataclass
class RoutingRequest:
    """One request as the policy engine sees it.

    ``headers`` keys are lower-case. ``body`` is the decoded JSON object, or ``None`` when
    the request has no body (then only header signals can be true).
    """

    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    #: Per-request memo for scorers (e.g. backbone features shared by two scorers). Not
    #: part of the request's identity; the engine never reads it.
    scratch: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> RoutingRequest:
        """A POST to /v1/chat/completions carrying ``body`` (for ``explain`` and tests)."""
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        return cls(headers=lowered, body=dict(body))

    @property
    def messages(self) -> list[dict[str, Any]]:
        if self.body is None:
            return []
        messages = self.body.get("messages")
        return messages if isinstance(messages, list) else []

    @property
    def model(self) -> str | None:
        model = self.body.get("model") if self.body else None
        return model if isinstance(model, str) else None

    @cached_property
    def image_count(self) -> int:
        return len(image_urls(self.messages))

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())
