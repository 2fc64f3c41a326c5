"""The ext_proc servicer over a real gRPC channel (no Envoy): the messages Envoy would get."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from extproc import ExternalProcessor, PolicyEngine, load_policy
from tests.extproc.conftest import POLICIES, chat

JSON_HEADERS = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}


def headers_message(headers: dict[str, str], end_of_stream: bool = False) -> ext.ProcessingRequest:
    message = ext.HttpHeaders(end_of_stream=end_of_stream)
    for key, value in headers.items():
        message.headers.headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
    return ext.ProcessingRequest(request_headers=message)


def body_message(body: bytes) -> ext.ProcessingRequest:
    return ext.ProcessingRequest(request_body=ext.HttpBody(body=body, end_of_stream=True))


RESPONSE_HEADERS = ext.ProcessingRequest(response_headers=ext.HttpHeaders())


@pytest.fixture(scope="module")
def stub():
    """A real grpc.aio server on a free loopback port, in a background thread."""
    import asyncio
    import threading

    engine = PolicyEngine(load_policy(POLICIES / "default.yaml"))
    started = threading.Event()
    state: dict = {}

    async def run():
        server = grpc.aio.server()
        ext_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(lambda: engine), server)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state["stop"] = asyncio.Event()
        started.set()
        await state["stop"].wait()
        await server.stop(0)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(10)
    channel = grpc.insecure_channel(f"127.0.0.1:{state['port']}")
    yield ext_grpc.ExternalProcessorStub(channel)
    channel.close()
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(10)


def exchange(stub, *messages):
    return list(stub.Process(iter(messages), timeout=10))


def exchange_held_open(stub, *messages):
    """Send ``messages`` and never half-close: the call ends only if the server ends it.

    Returns the answers and the call's status (a server that waits for more times out).
    """
    release = threading.Event()

    def requests():
        yield from messages
        release.wait(10)

    call = stub.Process(requests(), timeout=5)
    try:
        answers = list(call)
    finally:
        release.set()
    return answers, call.code()


def header_values(mutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def test_routed_request_sets_header_clears_route_cache_rewrites_model(stub):
    body = json.dumps(chat("Write a python function to merge two sorted lists")).encode()
    head, routed = exchange(stub, headers_message(JSON_HEADERS), body_message(body))
    assert head.WhichOneof("response") == "request_headers"
    common = routed.request_body.response
    assert common.clear_route_cache
    headers = header_values(common.header_mutation)
    assert headers["x-switchyard-backend"] == "large"
    new_body = json.loads(common.body_mutation.body)
    assert new_body["model"] == "large-model"
    assert new_body["messages"] == json.loads(body)["messages"]
    assert int(headers["content-length"]) == len(common.body_mutation.body)
    metadata = routed.dynamic_metadata.fields["switchyard"].struct_value.fields
    assert metadata["rule"].string_value == "code" and metadata["cluster"].string_value == "large"


def test_rewrite_keeps_every_other_value_exactly(stub):
    raw = ('{"model": "auto", "messages": [{"role": "user", "content": "h\u00e9 \\u263a"}], '
           '"seed": 123456789012345678901234567890, "temperature": 0.1, "logit_bias": {"50256": -100}}').encode()
    _, routed = exchange(stub, headers_message(JSON_HEADERS), body_message(raw))
    new_body = routed.request_body.response.body_mutation.body
    assert b"123456789012345678901234567890" in new_body  # not turned into a float
    assert json.loads(new_body) == {**json.loads(raw), "model": "small-model"}


def test_body_is_not_rewritten_when_the_model_already_matches(stub):
    body = json.dumps(chat("hi", model="small-model")).encode()
    _, routed = exchange(stub, headers_message(JSON_HEADERS), body_message(body))
    common = routed.request_body.response
    assert not common.HasField("body_mutation")
    assert header_values(common.header_mutation) == {"x-switchyard-backend": "small"}


@pytest.mark.parametrize(
    "raw,status,code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_body"),
        (b'{"model": "auto"}', 400, "invalid_messages"),
        (b'{"model": "auto", "messages": []}', 400, "invalid_messages"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_model"),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_encoding"),
        (b"", 400, "missing_body"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}', 400, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', 400, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "x"}], "seed": 1e999, "n": 123456789012345678901}', 400, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "' + b"a" * (1 << 20) + b'"}]}', 413, "request_too_large"),
    ],
)
def test_bad_bodies_get_an_immediate_json_error(stub, raw, status, code):
    _, answer = exchange(stub, headers_message(JSON_HEADERS), body_message(raw))
    immediate = answer.immediate_response
    assert immediate.status.code == status
    error = json.loads(immediate.body)["error"]
    assert error["code"] == code and error["message"]
    assert header_values(immediate.headers)["content-type"] == "application/json"


def test_declared_oversize_body_is_rejected_on_headers(stub):
    (answer,) = exchange(stub, headers_message({**JSON_HEADERS, "content-length": str(5 << 20)}))
    assert answer.immediate_response.status.code == 413


@pytest.mark.parametrize(
    "headers",
    [
        {":method": "GET", ":path": "/v1/models"},
        {":method": "POST", ":path": "/v1/embeddings", "content-type": "application/json"},
        {":method": "POST", ":path": "/v1/chat/completions", "content-type": "text/plain"},
    ],
)
def test_other_requests_pass_through_untouched(stub, headers):
    head, body = exchange(stub, headers_message(headers), body_message(b"not json at all"))
    assert head.request_headers.response == ext.CommonResponse()
    assert body.request_body.response == ext.CommonResponse()


def test_client_switchyard_headers_are_removed(stub):
    spoofed = {**JSON_HEADERS, "x-switchyard-backend": "large", "x-switchyard-rule": "fake"}
    body = json.dumps(chat("hi")).encode()
    head, routed = exchange(stub, headers_message(spoofed), body_message(body))
    assert set(head.request_headers.response.header_mutation.remove_headers) == {"x-switchyard-backend", "x-switchyard-rule"}
    assert header_values(routed.request_body.response.header_mutation)["x-switchyard-backend"] == "small"


def test_request_without_body_is_answered_on_headers(stub):
    (answer,) = exchange(stub, headers_message(JSON_HEADERS, end_of_stream=True))
    assert answer.immediate_response.status.code == 400
    assert json.loads(answer.immediate_response.body)["error"]["code"] == "missing_body"


def test_get_without_body_passes_through_on_headers(stub):
    (answer,) = exchange(stub, headers_message({":method": "GET", ":path": "/v1/models"}, end_of_stream=True))
    assert answer.request_headers.response == ext.CommonResponse()


@pytest.mark.parametrize(
    ("messages", "answers"),
    [
        ([headers_message(JSON_HEADERS), body_message(json.dumps(chat("hi")).encode())], ["request_headers", "request_body"]),
        ([headers_message(JSON_HEADERS), body_message(b"{not json")], ["request_headers", "immediate_response"]),
        ([headers_message({**JSON_HEADERS, "content-length": str(5 << 20)})], ["immediate_response"]),
        ([headers_message({":method": "GET", ":path": "/v1/models"}, end_of_stream=True)], ["request_headers"]),
        # a pass-through POST still gets its body answered (Envoy sends it in BUFFERED mode)
        ([headers_message({**JSON_HEADERS, "content-type": "text/plain"}), body_message(b"x")],
         ["request_headers", "request_body"]),
    ],
    ids=["routed", "bad-body", "refused-on-headers", "get", "pass-through-post"],
)
def test_stream_ends_after_the_last_answer_the_request_needs(stub, messages, answers):
    # Envoy keeps its side open; the server's gRPC OK tells it processing is complete, so
    # the request no longer depends on switchyard. A later response phase is never answered.
    got, code = exchange_held_open(stub, *messages, RESPONSE_HEADERS)
    assert code == grpc.StatusCode.OK
    assert [answer.WhichOneof("response") for answer in got] == answers


def test_repeated_headers_are_joined_and_plain_values_are_read():
    from extproc.server._servicer import _header_map

    message = ext.HttpHeaders()
    for key, value in [("x-tier", "gold"), (":method", "POST"), ("x-tier", "silver")]:
        message.headers.headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
    message.headers.headers.append(base_pb2.HeaderValue(key="x-old-envoy", value="text"))
    assert _header_map(message) == {"x-tier": "gold,silver", ":method": "POST", "x-old-envoy": "text"}


BUDGET_POLICY = """
version: 1
backends:
  large: {cluster: large, model: large-model, price: {input_per_mtok: 1000, output_per_mtok: 2000}}
default: large
budgets: {limits: {default: 5}, when_spent: {reject: true}}
"""


def test_a_charged_body_answer_carries_the_charge_and_the_usage_stream_corrects_it():
    """The charge goes out in the body answer's metadata; Envoy's usage filter sends it back with
    the response (a stream that starts with the response headers), which gets no answer and
    corrects the charge in the store from the response's usage."""
    import asyncio

    from extproc import parse_policy
    from extproc._contract import BUDGET_CHARGED, BUDGET_KEY, BUDGET_PRICE, BUDGET_WINDOW, METADATA_NAMESPACE
    from extproc.state import MemoryStore
    from extproc.traffic._budgets import FleetLimits
    from extproc.traffic._usage import UsageCorrections

    store = MemoryStore()
    engine = PolicyEngine(parse_policy(BUDGET_POLICY))
    servicer = ExternalProcessor(lambda: engine, limits=FleetLimits(store), usage=UsageCorrections(store))

    async def stream(*messages):
        async def requests():
            for message in messages:
                yield message
        return [answer async for answer in servicer.Process(requests(), None)]

    async def scenario():
        body = json.dumps(chat("what is it", max_tokens=1000)).encode()
        answers = await stream(headers_message({**JSON_HEADERS, "x-tenant-id": "acme"}), body_message(body))
        metadata = answers[-1].dynamic_metadata.fields[METADATA_NAMESPACE].struct_value
        charged = {key: metadata.fields[key].string_value for key in (BUDGET_KEY, BUDGET_WINDOW, BUDGET_CHARGED,
                                                                       BUDGET_PRICE)}
        spent = await store.read_window("budget:acme", 86400)
        usage = ext.ProcessingRequest(response_headers=ext.HttpHeaders())
        usage.response_headers.headers.headers.append(base_pb2.HeaderValue(key=":status", raw_value=b"200"))
        usage.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(metadata)
        answer = json.dumps({"usage": {"prompt_tokens": 4, "completion_tokens": 10}}).encode()
        observed = await stream(usage, ext.ProcessingRequest(
            response_body=ext.HttpBody(body=answer, end_of_stream=True)))
        return charged, spent, observed, await store.read_window("budget:acme", 86400)

    charged, spent, observed, corrected = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert charged[BUDGET_KEY] == "budget:acme" and float(charged[BUDGET_CHARGED]) == pytest.approx(2.004) == spent
    assert charged[BUDGET_PRICE] == "1000.0,2000.0" and charged[BUDGET_WINDOW].startswith("86400.0:")
    assert observed == []  # observability mode: Envoy waits for nothing
    assert corrected == pytest.approx(0.024)
