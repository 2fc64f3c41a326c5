"""``RoutingRequest``: what the policy sees of one HTTP request.

Built from the request headers (always) and the buffered body (when there is one). Parsing
is strict on routed paths: a body that is not a UTF-8 JSON object with a non-empty
``messages`` list is a :class:`RequestError` with a status and an OpenAI-style code, which
the servicer turns into an immediate JSON error response.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import orjson

from extproc._errors import RequestError
from extproc._messages import image_urls

__all__ = ["RoutingRequest", "parse_json_body", "rewrite_model", "is_json_content_type", "body_too_large"]


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


def _reject_constant(name: str) -> None:
    # NaN / Infinity are not JSON; the stdlib decoder accepts them, strict backends do not.
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"number {text} is out of range", text, 0)
    return value


# orjson parses and writes bodies. It reads an integer beyond 64 bits as a float, which is
# harmless to signals but would change the number in a rewritten body, so a body with a run
# of 20+ digits is rewritten from an exact (stdlib) decoding. The run is found with one
# translate (digits -> "9", the rest -> " ") and one substring search: ~1 ms a MiB.
_EXACT_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_DIGITS_ONLY = bytes(0x39 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_DIGIT_RUN = b"9" * 20


def rewrite_model(raw: bytes, body: dict[str, Any], model: str) -> bytes:
    """``raw`` (already parsed into ``body``) with ``model`` set, every other value kept exactly."""
    if _LONG_DIGIT_RUN in raw.translate(_DIGITS_ONLY):
        exact = _EXACT_DECODER.decode(raw.decode("utf-8"))
        exact["model"] = model
        return json.dumps(exact, ensure_ascii=False, separators=(",", ":")).encode()
    return orjson.dumps({**body, "model": model})


def parse_json_body(raw: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Decode a chat completions body, or raise :class:`RequestError` saying what is wrong.

    Strict JSON: ``NaN``, ``Infinity`` and numbers that overflow a double are rejected, as
    strict backends would.
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
