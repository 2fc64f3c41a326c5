"""Correcting budget charges from the response's ``usage`` (:mod:`extproc.traffic._usage`): reading
``usage`` from JSON and SSE bodies, the correction's arithmetic and results, and the observer
stream's handling of whole, cut and odd responses, against a MemoryStore on a fake clock.
The same through a real Envoy: tests/integration/test_budgets.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc._contract import BUDGET_CHARGED, METADATA_NAMESPACE
from extproc.policy._sections import Price
from extproc.state import MemoryStore
from extproc.state._store import window_index
from extproc.telemetry._instruments import Telemetry
from extproc.traffic._budgets import MAX_OUTPUT_TOKENS, charge_metadata, request_cost
from extproc.traffic._usage import Charge, UsageCorrections, correction, read_usage
from tests.extproc.test_telemetry import points

PRICE = Price(input_per_mtok=1000, output_per_mtok=2000)
WINDOW_S = 60.0
NOW = 6_000.0  # window 100
ESTIMATE = request_cost(PRICE, 4, 1000)  # 2.004
CHARGE = Charge("budget:acme", WINDOW_S, 100, ESTIMATE, PRICE)


def completion(usage) -> bytes:
    return json.dumps({"object": "chat.completion", "choices": [], "usage": usage}).encode()


def sse(*chunks, done: bool = True) -> bytes:
    events = [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks]
    return b"".join(events) + (b"data: [DONE]\n\n" if done else b"")


USAGE = {"prompt_tokens": 4, "completion_tokens": 10}
CHUNK = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "ok"}}], "usage": None}


# -- reading usage -------------------------------------------------------------------------------

@pytest.mark.parametrize("body, event_stream, expected", [
    (completion(USAGE), False, (4, 10)),
    (completion({"input_tokens": 7, "output_tokens": 3}), False, (7, 3)),  # the Responses API's names
    (sse(CHUNK, {**CHUNK, "choices": [], "usage": USAGE}), True, (4, 10)),  # include_usage: the last chunk
    (sse(CHUNK, CHUNK), True, None),  # a stream without a usage chunk
    (sse(CHUNK, {**CHUNK, "usage": USAGE}, done=False), True, (4, 10)),  # no [DONE]: the usage chunk counts
    (completion(None), False, None),
    (b'{"usage": {"prompt_tokens": 4, "completion_tok', False, None),  # truncated
    (b"<html>bad gateway</html>", False, None),  # not JSON
    (b"\xff\xfe\x00garbage", False, None),  # not UTF-8
    (completion({"prompt_tokens": 4, "completion_tokens": "\u2028\ud800"}), False, None),  # odd Unicode text
    (b"[" * 100_000 + b"]" * 100_000, False, None),  # nested too deep for the parser
    (completion({"prompt_tokens": -1, "completion_tokens": 10}), False, None),  # negative
    (completion({"prompt_tokens": 4, "completion_tokens": 2.5}), False, None),  # a fraction
    (completion({"prompt_tokens": True, "completion_tokens": 10}), False, None),  # a bool
    (completion({"prompt_tokens": 4}), False, None),  # half a usage
    (completion({"prompt_tokens": 10**400, "completion_tokens": 10**30}), False,
     (MAX_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)),  # huge: capped, the cost stays finite
    (completion(USAGE), True, None),  # a JSON body under an SSE content type has no data: lines
])
def test_usage_is_read_from_json_and_sse_bodies_or_not_at_all(body, event_stream, expected):
    assert read_usage(body, event_stream) == expected


# -- the correction ------------------------------------------------------------------------------

def test_a_usage_below_the_estimate_gives_the_difference_back():
    result, amount = correction(CHARGE, 200, completion(USAGE), len(completion(USAGE)), False)
    assert result == "corrected"
    assert amount == pytest.approx((4 * 1000 + 10 * 2000) / 1e6 - ESTIMATE)  # 0.024 - 2.004


def test_a_usage_above_the_estimate_adds_the_difference():
    body = completion({"prompt_tokens": 5000, "completion_tokens": 1000})
    assert correction(CHARGE, 200, body, len(body), False) == ("corrected", pytest.approx(5.0 + 2.0 - ESTIMATE))


@pytest.mark.parametrize("status", [429, 500, 503, 504, 400, 0])
def test_a_non_2xx_answer_refunds_the_whole_charge(status):
    assert correction(CHARGE, status, completion(USAGE), 10, False) == ("refunded", -ESTIMATE)


def test_a_json_body_over_the_limit_keeps_the_estimate_but_a_long_stream_is_read_from_its_tail():
    assert correction(CHARGE, 200, b"", 2_000_000, False, limit=1_000_000) == ("too_large", 0.0)
    assert correction(CHARGE, 200, b"{}", 2, False) == ("no_usage", 0.0)
    tail = sse({**CHUNK, "choices": [], "usage": USAGE})
    assert correction(CHARGE, 200, tail, 5_000_000, True, limit=1_000_000)[0] == "corrected"


def test_a_charge_round_trips_through_the_metadata_and_a_bad_one_is_refused():
    fields = charge_metadata("budget:acme", WINDOW_S, 100, ESTIMATE, PRICE)
    assert Charge.from_metadata(fields) == CHARGE
    assert Charge.from_metadata({}) is None  # not charged
    for bad in ({BUDGET_CHARGED: "nan"}, {BUDGET_CHARGED: "-1"}, {BUDGET_CHARGED: "two"}):
        with pytest.raises(ValueError):
            Charge.from_metadata(fields | bad)


# -- the observer stream -------------------------------------------------------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def headers(status: int, content_type: str = "application/json", charge: dict | None = None,
            end: bool = False) -> ext.ProcessingRequest:
    message = ext.ProcessingRequest()
    message.response_headers.end_of_stream = end
    for key, value in ((":status", str(status)), ("content-type", content_type)):
        message.response_headers.headers.headers.add(key=key, raw_value=value.encode())
    fields = message.metadata_context.filter_metadata[METADATA_NAMESPACE].fields
    for key, value in (charge if charge is not None else charge_metadata(
            "budget:acme", WINDOW_S, 100, ESTIMATE, PRICE)).items():
        fields[key].string_value = value
    return message


def body(data: bytes, end: bool) -> ext.ProcessingRequest:
    return ext.ProcessingRequest(response_body=ext.HttpBody(body=data, end_of_stream=end))


async def _messages(items):
    for item in items:
        yield item


class Observer:
    def __init__(self) -> None:
        self.clock = Clock(NOW + WINDOW_S)  # the response ends in the next window: the charge's still counts
        self.store = MemoryStore(clock=self.clock)
        self.reader = InMemoryMetricReader()
        self.corrections = UsageCorrections(self.store, Telemetry(MeterProvider(metric_readers=[self.reader])),
                                            max_body_bytes=1000)

    def run(self, first, *rest) -> float:
        """Charge the estimate, observe the stream; the charged bucket's total after."""
        async def scenario():
            await self.store.incr_bucket("budget:acme", ESTIMATE, WINDOW_S, 100)
            await self.corrections.observe(first, _messages(rest))
            return await self.store.incr_bucket("budget:acme", 0.0, WINDOW_S, 100)
        return asyncio.run(asyncio.wait_for(scenario(), 10))

    def results(self) -> dict[str, float]:
        if self.reader.get_metrics_data() is None:  # nothing recorded at all
            return {}
        data = points(self.reader).get("switchyard.budget.corrections", [])
        return {attributes["result"]: value for attributes, value in data}


def test_a_streamed_json_answer_in_chunks_corrects_the_bucket_it_was_charged_to():
    observer, answer = Observer(), completion(USAGE)
    spent = observer.run(headers(200), body(answer[:10], False), body(answer[10:], True))
    assert spent == pytest.approx(0.024)
    assert window_index(observer.clock(), WINDOW_S) == 101  # a later window, untouched
    assert asyncio.run(observer.store.read_window("budget:acme", WINDOW_S)) == 0.0
    assert observer.results() == {"corrected": 1}


@pytest.mark.parametrize("first, rest, spent, result", [
    (headers(503), [body(b'{"error": {}}', True)], 0.0, "refunded"),
    (headers(429, end=True), [], 0.0, "refunded"),
    (headers(200), [body(completion(USAGE)[:20], False)], ESTIMATE, "incomplete"),  # cut: no end
    (headers(200), [body(b"x" * 600, False), body(b"x" * 600, True)], ESTIMATE, "too_large"),
    (headers(200), [body(b"\xff" * 10, True)], ESTIMATE, "no_usage"),
    (headers(200, "text/event-stream"),
     [body(b"data: " + b"x" * 900 + b"\n\n", False), body(sse(CHUNK, {**CHUNK, "usage": USAGE}), True)],
     0.024, "corrected"),  # longer than the limit: its tail has the usage
    (headers(200, charge={**charge_metadata("budget:acme", WINDOW_S, 100, ESTIMATE, PRICE), BUDGET_CHARGED: "x"}),
     [body(completion(USAGE), True)], ESTIMATE, "bad_charge"),
])
def test_each_kind_of_response_has_its_outcome(first, rest, spent, result):
    observer = Observer()
    assert observer.run(first, *rest) == pytest.approx(spent)
    assert observer.results() == {result: 1}


def test_a_response_without_a_charge_is_left_alone():
    observer = Observer()
    assert observer.run(headers(200, charge={}), body(completion(USAGE), True)) == pytest.approx(ESTIMATE)
    assert observer.results() == {}
