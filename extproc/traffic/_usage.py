"""Correcting a budget charge from the response's ``usage`` (policy ``budgets:``).

A request is charged before it is routed (:mod:`extproc.traffic._budgets`), from an estimate:
the prompt's estimated tokens and the output it may produce (``max_tokens``). The answer says
what it really used. When the policy has ``budgets:``, the rendered Envoy config runs a second,
observe-only ext_proc filter (:data:`~extproc._contract.USAGE_FILTER`, ``observability_mode``):
Envoy sends it the response headers and body, with the request's ``switchyard`` metadata (the
charge: :func:`~extproc.traffic._budgets.charge_metadata`), and never waits for an answer, so
the response the client sees is not touched in bytes or timing. Such a stream starts with the
response headers; :meth:`UsageCorrections.observe` reads it to its end and then, by result
(:data:`CORRECTION_RESULTS`, the ``result`` of ``switchyard.budget.corrections``):

- ``corrected``: a 2xx answer with ``usage`` (a JSON chat completion's ``usage``, or in an SSE
  stream the last ``data:`` event that carries one, as ``stream_options.include_usage`` asks):
  actual cost − charged is added to the bucket of the window the charge went to;
- ``refunded``: a non-2xx answer (the backend refused or failed: 429, 5xx, or Envoy's own 503/504):
  the whole charge is given back, as providers do not bill failed requests;
- ``no_usage`` (2xx without a readable ``usage``: not JSON, no ``usage``, token counts that are
  not whole numbers >= 0), ``too_large`` (a JSON body over :data:`MAX_USAGE_BODY_BYTES`; an SSE
  stream keeps only its last that many bytes, where its usage event is), ``incomplete`` (the
  response ended without its last chunk: reset, cut), ``bad_charge`` (the forwarded charge does
  not parse): the estimate stays.

Token counts are capped at :data:`~extproc.traffic._budgets.MAX_OUTPUT_TOKENS` each, so every
correction is a finite number. A stream without a charge (a request that was not charged) is
left at its first message. Nothing here raises into the server: a failure is logged.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext

from extproc._contract import (
    BUDGET_CHARGED,
    BUDGET_KEY,
    BUDGET_PRICE,
    BUDGET_WINDOW,
    METADATA_NAMESPACE,
)
from extproc.policy._sections import Price
from extproc.state._store import Store
from extproc.telemetry._instruments import Telemetry
from extproc.traffic._budgets import MAX_OUTPUT_TOKENS, request_cost

__all__ = ["CORRECTION_RESULTS", "MAX_USAGE_BODY_BYTES", "Charge", "UsageCorrections", "correction", "read_usage"]

#: The most response body bytes kept per response: a JSON body past it is not parsed
#: (``too_large``); an SSE stream keeps its last this many bytes (its usage event is the last one).
MAX_USAGE_BODY_BYTES = 1 << 20
#: The results of a correction (see the module docstring).
CORRECTION_RESULTS = ("corrected", "refunded", "no_usage", "too_large", "incomplete", "bad_charge")
#: The ``usage`` fields read, in order: chat completions' names, then the Responses API's.
_PROMPT_FIELDS = ("prompt_tokens", "input_tokens")
_OUTPUT_FIELDS = ("completion_tokens", "output_tokens")

log = logging.getLogger("switchyard.budgets")


@dataclass(frozen=True)
class Charge:
    """A request's budget charge, as the usage filter forwards it (keys from :mod:`extproc._contract`)."""

    key: str
    window_s: float
    index: int
    charged: float
    price: Price

    @classmethod
    def from_metadata(cls, fields: Mapping[str, str]) -> Charge | None:
        """The charge in ``fields``; ``None`` without one. :class:`ValueError` when it does not parse."""
        if BUDGET_KEY not in fields:
            return None
        window_s, index = fields[BUDGET_WINDOW].split(":")
        input_price, output_price = fields[BUDGET_PRICE].split(",")
        charge = cls(fields[BUDGET_KEY], float(window_s), int(index), float(fields[BUDGET_CHARGED]),
                     Price(input_per_mtok=float(input_price), output_per_mtok=float(output_price)))
        numbers = (charge.window_s, charge.charged, charge.price.input_per_mtok, charge.price.output_per_mtok)
        if not charge.key or charge.window_s <= 0 or not all(math.isfinite(n) and n >= 0 for n in numbers):
            raise ValueError(f"the charge {dict(fields)!r} has a value out of range")
        return charge


def _tokens(usage: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = usage.get(name)
        if value is not None:
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return min(value, MAX_OUTPUT_TOKENS)
            return None
    return None


def _usage_tokens(document: Any) -> tuple[int, int] | None:
    """``(prompt, output)`` tokens of a parsed body's ``usage``; ``None`` without readable ones."""
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, output = _tokens(usage, _PROMPT_FIELDS), _tokens(usage, _OUTPUT_FIELDS)
    return None if prompt is None or output is None else (prompt, output)


def _json(text: bytes | str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, bad UTF-8, or nested too deep
        return None


def read_usage(body: bytes, event_stream: bool) -> tuple[int, int] | None:
    """``(prompt, output)`` tokens from a response body: a JSON object's ``usage``, or with
    ``event_stream`` the last SSE ``data:`` event whose JSON carries one (``None``: none readable).
    ``body`` may be an SSE stream's tail: its first, partial line is never a whole event."""
    if not event_stream:
        return _usage_tokens(_json(body))
    for line in reversed(body.splitlines()):
        if line.startswith(b"data:"):
            found = _usage_tokens(_json(line[5:].strip()))
            if found is not None:
                return found
    return None


def correction(charge: Charge, status: int, body: bytes, body_size: int, event_stream: bool,
               limit: int = MAX_USAGE_BODY_BYTES) -> tuple[str, float]:
    """The result and the amount to add to the charge's bucket for a whole response: ``status``,
    its ``body`` (all of it, or an SSE stream's last ``limit`` bytes) of ``body_size`` bytes."""
    if not 200 <= status < 300:
        return "refunded", -charge.charged
    if body_size > limit and not event_stream:
        return "too_large", 0.0
    tokens = read_usage(body, event_stream)
    if tokens is None:
        return "no_usage", 0.0
    return "corrected", request_cost(charge.price, *tokens) - charge.charged


class _Body:
    """A response body as it streams in: all of it up to ``limit`` bytes, then its last ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.data += chunk
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]

    def tail(self) -> bytes:
        """What is kept; once some was dropped, without the first (partial) line."""
        data = bytes(self.data)
        if self.size > len(data):
            data = data.partition(b"\n")[2]
        return data


def _response_head(message: ext.HttpHeaders) -> tuple[int, bool]:
    """``(status, is an SSE stream)`` from the response headers (status 0 when unreadable)."""
    status, event_stream = 0, False
    for header in message.headers.headers:
        value = (header.raw_value or header.value.encode()).decode("latin-1").strip()
        if header.key == ":status":
            status = int(value) if value.isdigit() else 0
        elif header.key == "content-type":
            event_stream = value.lower().startswith("text/event-stream")
    return status, event_stream


def _forwarded(message: ext.ProcessingRequest) -> dict[str, str]:
    """The ``switchyard`` metadata Envoy forwarded with ``message`` (string values only)."""
    namespace = message.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    if namespace is None:
        return {}
    return {key: value.string_value for key, value in namespace.fields.items()
            if value.WhichOneof("kind") == "string_value"}


class UsageCorrections:
    """Reads the usage filter's streams and corrects their charges in the store (module docstring).

    One per server. ``store``: the store, or what returns the current one (a reload may swap it).
    """

    def __init__(self, store: Store | Callable[[], Store], telemetry: Telemetry | None = None,
                 max_body_bytes: int = MAX_USAGE_BODY_BYTES) -> None:
        self._store = store if callable(store) else (lambda: store)
        self.telemetry = telemetry or Telemetry()
        self.max_body_bytes = max_body_bytes

    async def observe(self, first: ext.ProcessingRequest, rest: AsyncIterator[ext.ProcessingRequest]) -> None:
        """Read a usage stream (``first``: its response headers) up to the response's end, then
        correct its charge. A stream without a charge returns at once: ending it is all Envoy,
        which observes without waiting, needs."""
        try:
            charge = Charge.from_metadata(_forwarded(first))
        except (KeyError, ValueError) as exc:
            log.warning("a forwarded budget charge does not parse; its estimate stays", extra={"error": str(exc)})
            self.telemetry.budget_corrections.add(1, {"result": "bad_charge"})
            return
        if charge is None:
            return
        status, event_stream = _response_head(first.response_headers)
        body = _Body(self.max_body_bytes)
        ended = first.response_headers.end_of_stream or await self._read_body(rest, body)
        result, amount = "incomplete", 0.0
        if ended:
            result, amount = correction(charge, status, body.tail(), body.size, event_stream, self.max_body_bytes)
        try:
            if amount != 0.0 and math.isfinite(amount):
                await self._store().incr_bucket(charge.key, amount, charge.window_s, charge.index)
        except Exception:
            log.exception("correcting a budget charge failed")
            return
        self.telemetry.budget_corrections.add(1, {"result": result})

    @staticmethod
    async def _read_body(rest: AsyncIterator[ext.ProcessingRequest], body: _Body) -> bool:
        """Add the body chunks to ``body`` up to the response's end (``True``), or until the stream
        ends without it (``False``). Returns at the end, not when Envoy closes the stream."""
        async for message in rest:
            phase = message.WhichOneof("request")
            if phase == "response_trailers":
                return True
            if phase == "response_body":
                body.add(message.response_body.body)
                if message.response_body.end_of_stream:
                    return True
        return False
