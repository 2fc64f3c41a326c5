"""Bad and odd input through a real Envoy: every kind gets its defined answer.

One gateway (demo backends + switchyard + Envoy, the rendered config) runs the policy below
for the whole module. Each case in ``CASES`` sends one kind of input, with ``http.client``
or a raw socket where a client library would refuse to, and asserts the answer: the status
and ``error.code`` of a rejection, or the backend and rule a request was routed by, and for
routed bodies the exact bytes the backend received (the demo backends echo a SHA-256). The
first table of "Bad input: what each gets" in docs/envoy.md lists the same cases.

Envoy's ``request_timeout`` and ``request_headers_timeout`` are cut to 2 s here so the
stalled-request cases answer quickly; everything else is the config users render.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import harness.stack
from tests.integration.gateway import Gateway, Response

POLICY = """\
version: 1
backends:
  small: {cluster: small, model: small-model, supports_images: false, max_context_tokens: 2000}
  large: {cluster: large, model: large-model-with-a-much-longer-served-name-v2}
default: small
models: {routed: [auto], direct: true, unknown: route}
tenants:
  header: x-tenant
  allow:
    free: [small]
    pro: [small, large]
    vip: [large]
signals:
  maths: {kind: keywords, keywords: [prove, theorem]}
  long_prompt: {kind: token_count, above: 2000}
  has_image: {kind: modality}
rules:
  - {name: images, when: has_image, backend: large}
  - {name: long-context, when: long_prompt, backend: large}
  - {name: maths, when: maths, backend: large}
routing: {max_body_bytes: 65536}
"""
LIMIT = 65536
SMALL, LARGE = "small-model", "large-model-with-a-much-longer-served-name-v2"
PATH = "/v1/chat/completions"
STALL_TIMEOUT_S = 2
PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def _short_timeouts(write):
    """Wrap the stack's config writer: the rendered config with 2 s request timeouts."""

    def patched(path, *args, **kwargs):
        written = write(path, *args, **kwargs)
        config = yaml.safe_load(Path(written).read_text())
        for listener in config["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                for network_filter in chain["filters"]:
                    hcm = network_filter["typed_config"]
                    if "request_timeout" in hcm:
                        hcm["request_timeout"] = hcm["request_headers_timeout"] = f"{STALL_TIMEOUT_S}s"
        Path(written).write_text(yaml.safe_dump(config, sort_keys=False))
        return written

    return patched


@pytest.fixture(scope="module")
def gw(tmp_path_factory, monkeypatch_module) -> Gateway:
    workdir = tmp_path_factory.mktemp("bad-input")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    monkeypatch_module.setattr(harness.stack, "write_envoy_config", _short_timeouts(harness.stack.write_envoy_config))
    gateway = Gateway(policy, workdir).start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# -- sending ----------------------------------------------------------------------------------
def _read_response(sock: socket.socket) -> Response:
    """One HTTP/1.1 response from ``sock`` (skipping 1xx), read by hand."""
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before a response; got {buffer[:200]!r}")
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            headers[key] = f"{headers[key]},{value.strip()}" if key in headers else value.strip()
        if 100 <= status < 200:
            continue
        length = int(headers.get("content-length", "0"))
        while len(buffer) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        return Response(status, headers, buffer[:length])


def send_raw(gw: Gateway, *parts: bytes | float, timeout: float = 10) -> Response:
    """Write ``parts`` to a fresh connection (a float pauses that many seconds); read the answer."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        for part in parts:
            if isinstance(part, float):
                time.sleep(part)
            else:
                sock.sendall(part)
        return _read_response(sock)


def request_bytes(body: bytes, headers: dict[str, str] | None = None, *, version: str = "HTTP/1.1",
                  method: str = "POST", path: str = PATH) -> bytes:
    fields = {"host": "gateway", "content-type": "application/json", "content-length": str(len(body)), **(headers or {})}
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return head.encode("latin-1") + b"\r\n" + body


def h2c_prior_knowledge(gw: Gateway, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` over cleartext HTTP/2 (prior knowledge); returns (status, response body).

    Frames are written by hand (HPACK literals, no Huffman), so no HTTP/2 library is needed.
    """

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

    def literal(name: str, value: str) -> bytes:  # literal header field without indexing, new name
        return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

    block = b"".join(literal(k, v) for k, v in [(":method", "POST"), (":scheme", "http"), (":path", PATH),
                                                (":authority", "gateway"), ("content-type", "application/json"),
                                                ("content-length", str(len(body)))])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
                     + frame(1, 0x4, 1, block) + frame(0, 0x1, 1, body))
        status, data, buffer = None, b"", b""
        while True:
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                chunk = sock.recv(65536)
                assert chunk, f"HTTP/2 connection closed; status {status}, data {data[:200]!r}"
                buffer += chunk
            length = int.from_bytes(buffer[:3], "big")
            kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            payload, buffer = buffer[9:9 + length], buffer[9 + length:]
            if kind == 4 and not flags & 0x1:
                sock.sendall(frame(4, 0x1, 0, b""))  # ACK the server's SETTINGS
            elif kind == 1 and stream == 1:  # :status comes first, from HPACK's static table
                status = {0x88: 200, 0x89: 204, 0x8C: 400, 0x8D: 404, 0x8E: 500}.get(payload[0])
            elif kind == 0 and stream == 1:
                data += payload
            if stream == 1 and kind in (0, 1) and flags & 0x1:
                return status, data


# -- bodies -----------------------------------------------------------------------------------
def body(content: str | list = "hello there", *, model: str | None = "auto", **extra) -> bytes:
    doc = ({"model": model} if model is not None else {}) | {"messages": [{"role": "user", "content": content}]} | extra
    return json.dumps(doc).encode()


def with_member(raw_member: str, content: str = "hello there", model: str = "auto") -> bytes:
    """A body with one member written as raw JSON text (kept exactly as written)."""
    return f'{{"model": "{model}", "messages": [{{"role": "user", "content": "{content}"}}], {raw_member}}}'.encode()


def sized(total: int, *, model: str | None = "auto") -> bytes:
    """A body of exactly ``total`` bytes, long enough for the long-context rule."""
    empty = body("", model=model)
    filler = ("y " * total)[: total - len(empty)]
    raw = body(filler, model=model)
    assert len(raw) == total
    return raw


def deep(depth: int) -> bytes:
    return with_member('"extra": ' + '{"k":' * depth + "-99999999999999999999" + "}" * depth)


def switch(raw: bytes, old: bytes, new: str) -> bytes:
    """``raw`` with the ``old`` model value (bytes, quotes included) replaced by ``new``."""
    assert raw.count(old) == 1
    return raw.replace(old, json.dumps(new).encode())


IMAGE = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": PIXEL}}]
LONG = "word " * 2500


# -- the cases --------------------------------------------------------------------------------
@dataclass
class Case:
    """One kind of input: how it is sent and the answer it must get."""

    id: str
    send: Callable[[Gateway], Response]
    status: int
    code: str | None = None  # error.code of a rejection
    backend: str | None = None  # routed: the backend that answered ...
    rule: str | None = None  # ... and the rule (None: not routed by switchyard)
    forwarded: bytes | None = None  # routed: the exact body the backend received
    passthrough: bool = False  # not routed by switchyard: default backend, no decision headers
    headers: dict[str, str] = field(default_factory=dict)


def post(raw: bytes, headers: dict[str, str] | None = None, path: str = PATH) -> Callable[[Gateway], Response]:
    return lambda gw: gw.request("POST", path, raw, {"content-type": "application/json", **(headers or {})})


def raw_post(raw: bytes, headers: dict[str, str] | None = None, **kwargs) -> Callable[[Gateway], Response]:
    return lambda gw: send_raw(gw, request_bytes(raw, headers, **kwargs))


def chunked(raw: bytes, size: int = 4096) -> Callable[[Gateway], Response]:
    parts = [raw[i:i + size] for i in range(0, len(raw), size)]
    return lambda gw: gw.request("POST", PATH, iter(parts), {"content-type": "application/json"}, chunked=True)


def routed(case_id: str, raw: bytes, backend: str, rule: str, forwarded: bytes | None = None, *,
           send: Callable[[Gateway], Response] | None = None, headers: dict[str, str] | None = None) -> Case:
    """A case that must be routed to ``backend`` by ``rule``; ``forwarded`` defaults to ``raw``."""
    return Case(case_id, send or post(raw, headers), 200, backend=backend, rule=rule,
                forwarded=raw if forwarded is None else forwarded)


def rejected(case_id: str, send: Callable[[Gateway], Response], status: int, code: str) -> Case:
    return Case(case_id, send, status, code=code)


AUTO = b'"auto"'
BIG = with_member('"seed": 123456789012345678901234567890, "n": -9999999999999999999')
EXOTIC = with_member('"a": 1E2, "b": -0, "c": 0.30000000000000000001, "d": 1e-999, "e": -0.0E+0')
DUPLICATE = b'{"model": "large", "messages": [{"role": "user", "content": "hi"}], "model": "auto"}'
ESCAPED_KEY = b'{"mod\\u0065l": "auto", "messages": [{"role": "user", "content": "prove it"}]}'
UNICODE = with_member('"stop": ["\\ud83d\\ude00", "\\u2028", "h\\u00e9"], "user": "\u263a \u00e9t\u00e9"')  # escapes and raw UTF-8
AT_LIMIT = sized(LIMIT)
AT_LIMIT_NO_MODEL = sized(LIMIT, model=None)
AT_LIMIT_DIRECT = sized(LIMIT, model=LARGE)
BODY = body()

CASES = [
    # -- numbers and JSON forms: routed, the body forwarded byte for byte -------------------------
    routed("big-integers", BIG, "small", "default", switch(BIG, AUTO, SMALL)),
    routed("exotic-numbers", EXOTIC, "small", "default", switch(EXOTIC, AUTO, SMALL)),
    rejected("number-overflowing-a-double", post(with_member('"seed": 1e999')), 400, "invalid_json"),
    rejected("nan", post(with_member('"temperature": NaN')), 400, "invalid_json"),
    rejected("leading-zero-number", post(with_member('"n": 012')), 400, "invalid_json"),
    routed("duplicate-model-keys", DUPLICATE, "small", "default", DUPLICATE.replace(b'"large"', b'"small-model"').replace(AUTO, b'"small-model"')),
    routed("escaped-model-key", ESCAPED_KEY, "large", "maths", switch(ESCAPED_KEY, AUTO, LARGE)),
    routed("model-missing", body(model=None), "small", "default", b'{"model":"small-model",' + body(model=None)[1:]),
    routed("model-after-messages", b'{"messages": [{"role": "user", "content": "hi"}], "model": "auto"}', "small", "default",
           b'{"messages": [{"role": "user", "content": "hi"}], "model": "small-model"}'),
    routed("pretty-printed-crlf", b'{\r\n  "model" : "auto" ,\r\n  "messages" : [ {"role":"user","content":"hi"} ]\r\n}\r\n',
           "small", "default", b'{\r\n  "model" : "small-model" ,\r\n  "messages" : [ {"role":"user","content":"hi"} ]\r\n}\r\n'),
    routed("deep-nesting-900", deep(900), "small", "default", switch(deep(900), AUTO, SMALL)),
    rejected("deep-nesting-1100", post(deep(1100)), 400, "json_too_deep"),
    # -- strings and encodings ---------------------------------------------------------------------
    routed("unicode-escapes-and-raw-utf8", UNICODE, "small", "default", switch(UNICODE, AUTO, SMALL)),
    routed("nul-escaped", with_member('"user": "a\\u0000b"'), "small", "default", switch(with_member('"user": "a\\u0000b"'), AUTO, SMALL)),
    rejected("nul-raw", post(with_member('"user": "a\x00b"')), 400, "invalid_json"),
    rejected("lone-surrogate-escape", post(with_member('"user": "\\ud800"')), 400, "invalid_json"),
    rejected("reversed-surrogate-escapes", post(with_member('"user": "\\udc00\\ud800"')), 400, "invalid_json"),
    rejected("invalid-utf8", post(body("caf\xe9").replace(b"caf\\u00e9", b"caf\xe9")), 400, "invalid_encoding"),
    rejected("utf8-encoded-surrogate", post(with_member('"user": "x"').replace(b'"x"', b'"\xed\xa0\x80"')), 400, "invalid_encoding"),
    rejected("utf8-bom", post(b"\xef\xbb\xbf" + BODY), 400, "invalid_json"),
    # -- body shapes -------------------------------------------------------------------------------
    rejected("empty-body", post(b""), 400, "missing_body"),
    rejected("whitespace-body", post(b" \r\n\t "), 400, "missing_body"),
    rejected("not-json", post(b"model=auto&q=hi"), 400, "invalid_json"),
    rejected("truncated-json", post(BODY[:-5]), 400, "invalid_json"),
    rejected("trailing-data", post(BODY + b" {}"), 400, "invalid_json"),
    rejected("json-array", post(b"[" + BODY + b"]"), 400, "invalid_body"),
    rejected("json-string", post(b'"hello"'), 400, "invalid_body"),
    rejected("messages-missing", post(b'{"model": "auto"}'), 400, "invalid_messages"),
    rejected("messages-empty", post(b'{"model": "auto", "messages": []}'), 400, "invalid_messages"),
    rejected("message-without-role", post(b'{"messages": [{"content": "hi"}]}'), 400, "invalid_messages"),
    rejected("model-not-a-string", post(b'{"model": 4, "messages": [{"role": "user", "content": "hi"}]}'), 400, "invalid_model"),
    routed("model-unknown", body(model="gpt-17"), "small", "default", switch(body(model="gpt-17"), b'"gpt-17"', SMALL)),
    routed("model-empty-string", body(model=""), "small", "default", switch(body(model=""), b'""', SMALL)),
    # -- direct models keep their backend's limits (issue #10 item 5) ------------------------------
    rejected("direct-model-image-to-text-only", post(body(IMAGE, model=SMALL)), 400, "images_not_supported"),
    rejected("direct-model-over-context", post(body(LONG, model="small")), 400, "context_length_exceeded"),
    routed("direct-model-within-limits", body("hi", model=LARGE), "large", "direct"),
    rejected("direct-model-not-allowed-for-tenant", post(body("hi", model=LARGE), {"x-tenant": "free"}), 403, "model_not_allowed"),
    # -- sizes: exactly at the policy's limit, one byte over ---------------------------------------
    routed("at-limit-rewrite-grows", AT_LIMIT, "large", "long-context", switch(AT_LIMIT, AUTO, LARGE)),
    routed("at-limit-model-inserted", AT_LIMIT_NO_MODEL, "large", "long-context",
           b'{"model":' + json.dumps(LARGE).encode() + b"," + AT_LIMIT_NO_MODEL[1:]),
    routed("at-limit-no-rewrite", AT_LIMIT_DIRECT, "large", "direct"),
    routed("at-limit-chunked", AT_LIMIT, "large", "long-context", switch(AT_LIMIT, AUTO, LARGE), send=chunked(AT_LIMIT)),
    rejected("one-over-limit", post(sized(LIMIT + 1)), 413, "request_too_large"),
    rejected("one-over-limit-chunked", chunked(sized(LIMIT + 1)), 413, "request_too_large"),
    # -- content types -----------------------------------------------------------------------------
    routed("content-type-missing", BODY, "small", "default", switch(BODY, AUTO, SMALL), send=raw_post(BODY, {"content-type": None})),
    routed("content-type-with-charset", BODY, "small", "default", switch(BODY, AUTO, SMALL),
           headers={"content-type": "application/json; charset=utf-8"}),
    routed("content-type-upper-case", BODY, "small", "default", switch(BODY, AUTO, SMALL), headers={"content-type": "Application/JSON"}),
    routed("content-type-plus-json", BODY, "small", "default", switch(BODY, AUTO, SMALL), headers={"content-type": "application/vnd.api+json"}),
    Case("content-type-text-plain", post(body("prove it"), {"content-type": "text/plain"}), 200, backend="small",
         forwarded=body("prove it"), passthrough=True),
    Case("content-type-form", post(b"model=large-model&q=prove", {"content-type": "application/x-www-form-urlencoded"}), 400,  # the backend's own answer
         backend="small", forwarded=b"model=large-model&q=prove", passthrough=True),
    # -- methods and paths -------------------------------------------------------------------------
    Case("get-on-chat-path", lambda gw: gw.get(PATH), 404, backend="small", passthrough=True),
    Case("other-path", post(body("prove it"), path="/v1/chat/completions/"), 404, backend="small", passthrough=True),
    routed("query-string", body("prove it"), "large", "maths", switch(body("prove it"), AUTO, LARGE),
           send=post(body("prove it"), path=PATH + "?api-version=1")),
    # -- headers -----------------------------------------------------------------------------------
    routed("spoofed-routing-header", body("hi"), "small", "default", switch(body("hi"), AUTO, SMALL),
           headers={"x-switchyard-backend": "large", "x-switchyard-rule": "maths"}),
    routed("tenant-repeated", body("prove it"), "small", "default", switch(body("prove it"), AUTO, SMALL),
           send=lambda gw: send_raw(gw, request_bytes(body("prove it"), {"x-tenant": "pro"}).replace(
               b"\r\n\r\n", b"\r\nx-tenant: free\r\n\r\n", 1))),
    rejected("tenant-repeated-no-common-backend", lambda gw: send_raw(gw, request_bytes(body("hi"), {"x-tenant": "vip"}).replace(
        b"\r\n\r\n", b"\r\nx-tenant: free\r\n\r\n", 1)), 403, "ambiguous_tenant"),
    routed("tenant-comma-list", body("prove it"), "small", "default", switch(body("prove it"), AUTO, SMALL),
           headers={"x-tenant": "pro, free"}),
    routed("tenant-padded", body("prove it"), "large", "maths", switch(body("prove it"), AUTO, LARGE),
           send=raw_post(body("prove it"), {"x-tenant": "  pro\t"})),
    rejected("header-flood", raw_post(BODY, {f"x-flood-{i}": "v" for i in range(150)}), 431, "request_headers_too_large"),
    rejected("header-too-large", raw_post(BODY, {"x-big": "a" * 70_000}), 431, "request_headers_too_large"),
    rejected("header-with-nul", lambda gw: send_raw(gw, request_bytes(BODY, {"x-odd": "a"}).replace(b"x-odd: a", b"x-odd: a\x00b")),
             400, "invalid_request"),
    rejected("content-length-not-a-number", raw_post(BODY, {"content-length": "12abc"}), 400, "invalid_request"),
    rejected("content-length-and-chunked", lambda gw: send_raw(gw, request_bytes(b"", {"transfer-encoding": "chunked", "content-length": "5"})
                                                              + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"), 400, "invalid_request"),
    # -- protocols ---------------------------------------------------------------------------------
    rejected("http-1.0", raw_post(BODY, version="HTTP/1.0"), 426, "invalid_request"),
    rejected("http-0.9", lambda gw: send_raw(gw, b"GET /\r\n\r\n"), 426, "invalid_request"),
    rejected("unknown-method", raw_post(BODY, method="BREW"), 400, "invalid_request"),
    routed("h2c-upgrade-header-ignored", body("prove it"), "large", "maths", switch(body("prove it"), AUTO, LARGE),
           send=raw_post(body("prove it"), {"connection": "Upgrade, HTTP2-Settings", "upgrade": "h2c",
                                            "http2-settings": "AAMAAABkAARAAAAAAAIAAAAA"})),
    routed("expect-100-continue", body("prove it"), "large", "maths", switch(body("prove it"), AUTO, LARGE),
           send=lambda gw: send_raw(gw, request_bytes(b"", {"expect": "100-continue",
                                                           "content-length": str(len(body("prove it")))}), 0.2, body("prove it"))),
    rejected("stalled-body", lambda gw: send_raw(gw, request_bytes(b"", {"content-length": "100"}) + b'{"model"',
                                                 timeout=STALL_TIMEOUT_S + 8), 408, "request_timeout"),
    Case("stalled-headers", lambda gw: send_raw(gw, b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n",
                                                timeout=STALL_TIMEOUT_S + 8), 408, code="request_timeout"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_its_defined_answer(gw, case: Case):
    before = gw.backend_requests()
    reply = case.send(gw)
    assert reply.status == case.status, reply
    after = gw.backend_requests()
    if case.code is not None:
        assert reply.header("content-type") == "application/json", reply
        error = json.loads(reply.body)["error"]
        assert error["code"] == case.code and error["message"] and error["type"], error
        assert after == before, "a rejected request reached a backend"
        return
    assert reply.header("x-demo-backend") == case.backend, reply
    if case.passthrough:
        assert reply.header("x-switchyard-backend") is None, reply
    else:
        assert (reply.header("x-switchyard-backend"), reply.header("x-switchyard-rule")) == (case.backend, case.rule), reply
    if case.forwarded is not None:
        assert reply.header("x-demo-received-sha256") == hashlib.sha256(case.forwarded).hexdigest(), (
            "the backend did not receive the expected bytes", reply)


def test_h2c_prior_knowledge_is_routed_and_rewritten(gw):
    status, data = h2c_prior_knowledge(gw, body("prove it"))
    assert status == 200, data
    answer = json.loads(data)
    assert answer["model"] == LARGE and answer["choices"][0]["message"]["content"].startswith("[large]")


def test_the_gateway_still_serves_after_all_of_it(gw):
    reply = gw.post(json.loads(body("prove it")))
    assert reply.status == 200 and reply.header("x-switchyard-backend") == "large", reply
    assert gw.stack.switchyard.running and gw.stack.envoy.running
    assert "Traceback" not in gw.stack.switchyard.tail(400)
