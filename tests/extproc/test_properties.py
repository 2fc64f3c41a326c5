"""Properties of the request path over generated bodies, header sets and tenants (hypothesis).

For any body (odd Unicode, lone surrogate escapes, big/negative/exotic numbers, deep nesting,
duplicate and escaped keys), any headers and any tenant value:

- parsing and deciding raise nothing but :class:`RequestError`;
- the chosen backend is one the policy lets every reading of the tenant reach, and one that
  can hold the request (images, context size);
- the forwarded body is the input with only the top-level ``model`` values replaced: byte for
  byte (the generator knows each member's text), and read back with an exact decoder.

Bodies are generated as JSON *text*, so number spellings and escapes survive as written.
"""

from __future__ import annotations

import json

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc import PolicyEngine, RequestError, RoutingRequest, parse_json_body, parse_policy
from extproc.request._body import rewrite_model
from extproc.server._servicer import RequestStream
from extproc.telemetry._instruments import Telemetry
from extproc.signals._tokens import ESTIMATE
from tests.extproc.test_servicer import JSON_HEADERS, body_message, headers_message

POLICY = """
version: 1
backends:
  small: {cluster: small, model: small-model, supports_images: false, max_context_tokens: 60}
  medium: {cluster: medium, model: medium-model, max_context_tokens: 400}
  large: {cluster: large, model: large-model}
default: small
models: {routed: [auto], direct: true, unknown: %(unknown)s}
tenants:
  header: x-tenant
  allow:
    free: [small]
    pro: [small, medium]
    vip: [large, medium]
%(otherwise)s
signals:
  code: {kind: keywords, keywords: [python, model]}
  fence: {kind: regex, patterns: ['```', '\\bdef \\w+\\(']}
  long: {kind: token_count, above: 30}
  image: {kind: modality}
  plan: {kind: header, header: x-plan, values: [gold]}
  hot: {kind: request_field, field: temperature, above: 1}
  streamed: {kind: request_field, field: stream, equals: true}
rules:
  - {name: images, when: image, backend: large}
  - {name: code, when: {any: [code, fence]}, backend: medium}
  - {name: long, when: {all: [long, {not: streamed}]}, backend: large}
  - {name: gold, when: plan, backend: large}
  - {name: hot, when: hot, backend: medium}
"""
ENGINES = [
    PolicyEngine(parse_policy(POLICY % {"unknown": "route", "otherwise": ""})),
    PolicyEngine(parse_policy(POLICY % {"unknown": "reject", "otherwise": "  otherwise: [small]"})),
]
MAX_BYTES = ENGINES[0].policy.routing.max_body_bytes

# -- JSON text ------------------------------------------------------------------------------
def rarely(one_in: int) -> st.SearchStrategy[bool]:
    """True about once in ``one_in`` draws (hypothesis biases ``integers`` towards 0)."""
    return st.sampled_from([True] + [False] * (one_in - 1))


space = st.sampled_from(["", " ", "\n", "\t", " \r\n  "])
number = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.from_regex(r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,22})?([eE][+-]?[0-9]{1,2})?", fullmatch=True),
    st.sampled_from(["-0", "1E2", "0.30000000000000000001", "-9999999999999999999", "1e-999", "-0.0E+0"]),
    st.sampled_from(["1e999"] + ["1"] * 30),  # now and then a number a double cannot hold
)
odd_text = st.text(st.characters(codec=None, exclude_categories=["Cs"]), max_size=12) | st.sampled_from(
    ["model", "mod\u0065l", "\u263a", "\U0001F600", "a\x00b", "\u2028", "\ufeff", "```", "def f(", "python"]
)


@st.composite
def string(draw, text=odd_text) -> str:
    """A JSON string: escaped or raw Unicode, sometimes with a lone surrogate escape."""
    value = draw(text)
    encoded = json.dumps(value, ensure_ascii=draw(st.booleans()))
    if draw(rarely(300)):  # a lone or reversed surrogate: valid JSON text, not UTF-16
        encoded = encoded[:-1] + draw(st.sampled_from(["\\ud800", "\\udfff", "\\udc00\\ud800"])) + '"'
    return encoded


literal = st.sampled_from(["true", "false", "null"])


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


value = st.recursive(
    number | string() | literal,
    lambda inner: st.lists(inner, max_size=4).map(_array)
    | st.lists(st.tuples(string(), inner), max_size=4).map(_object),
    max_leaves=12,
)


@st.composite
def deep(draw) -> str:
    """A value nested ``depth`` arrays/objects deep (built flat: no recursion here either)."""
    depth = draw(st.sampled_from([1, 40, 300, 1000, 1100]))
    inner = draw(number | string())
    if draw(st.booleans()):
        return "[" * depth + inner + "]" * depth
    return '{"k":' * depth + inner + "}" * depth


MODEL_KEYS = st.sampled_from(['"model"', '"mod\\u0065l"', '"\\u006dodel"'])
MODEL_VALUES = st.sampled_from(["auto", "small-model", "medium", "large-model", "gpt-x", "model"]).map(json.dumps)

IMAGE = '{"type":"image_url","image_url":{"url":"data:image/png;base64,AA"}}'


@st.composite
def message(draw) -> str:
    role = draw(st.sampled_from(['"user"', '"system"', '"assistant"', '"us\\u0065r"']))
    words = st.sampled_from(["hello", "python", "model", "```", "def f(x):", "word", "\u00e9t\u00e9"])
    text = " ".join(draw(st.lists(words, max_size=80)))
    content = draw(st.sampled_from(["plain", "parts", "image", "odd"]))
    if content == "plain":
        body = json.dumps(text, ensure_ascii=draw(st.booleans()))
    elif content == "parts":
        body = _array([_object([('"type"', '"text"'), ('"text"', json.dumps(text))])])
    elif content == "image":
        body = _array([_object([('"type"', '"text"'), ('"text"', json.dumps(text))]), IMAGE])
    else:
        body = draw(value)
    extra = [(draw(string()), draw(value))] if draw(rarely(5)) else []
    return _object([('"role"', role), ('"content"', body), *extra])


@st.composite
def members(draw) -> list[tuple[str, str, bool]]:
    """Top-level members as ``(key text, value text, is a model member)``, in order."""
    out: list[tuple[str, str, bool]] = []
    if not draw(rarely(10)):  # nearly always a valid messages list
        out.append(('"messages"', _array(draw(st.lists(message(), min_size=1, max_size=3))), False))
    else:
        out.append(('"messages"', draw(value), False))
    extras = st.one_of(
        st.tuples(string(), value),
        st.tuples(st.just('"temperature"'), number),
        st.tuples(st.just('"stream"'), literal),
        st.tuples(st.just('"extra"'), deep()),
        st.tuples(st.just('"metadata"'), st.just('{"model":"nested"}')),
    )
    for key, val in draw(st.lists(extras, max_size=4)):
        out.append((key, val, _spells_model(key)))  # a random key may spell `model` too
    if draw(rarely(5)):
        out.append(('"extra"', draw(deep()), False))
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):  # no model, one, or duplicates
        model = draw(value) if draw(rarely(6)) else draw(MODEL_VALUES)  # mostly a string
        out.append((draw(MODEL_KEYS), model, True))
    permuted = draw(st.permutations(out))
    return list(permuted)


def _spells_model(key: str) -> bool:
    try:
        return json.loads(key) == "model"
    except ValueError:  # e.g. a lone surrogate escape: not a valid key for the parser anyway
        return False


@st.composite
def body_text(draw) -> tuple[bytes, list[tuple[str, str, bool]], list[str]]:
    """``(raw body, members, the whitespace after each separator)``."""
    parts = draw(members())
    gaps = [draw(space) for _ in range(len(parts) * 3 + 2)]
    return _render(parts, gaps), parts, gaps


def _render(parts: list[tuple[str, str, bool]], gaps: list[str], model: str | None = None) -> bytes:
    """The body text; with ``model``, every model member's value replaced by it."""
    items = []
    for index, (key, val, is_model) in enumerate(parts):
        shown = json.dumps(model) if model is not None and is_model else val
        items.append(key + gaps[3 * index] + ":" + gaps[3 * index + 1] + shown + gaps[3 * index + 2])
    return (gaps[-2] + "{" + ",".join(items) + "}" + gaps[-1]).encode("utf-8", "surrogatepass")


TENANTS = st.one_of(
    st.none(),
    st.sampled_from(["free", "pro", "vip", "nobody", "", " pro ", "pro,free", "vip, pro", "free,vip", "pro,pro", "pro,"]),
    st.text(st.sampled_from("frepovi, \t"), max_size=12),
)
HEADERS = st.dictionaries(
    st.sampled_from(["x-plan", "x-switchyard-backend", "authorization", "x-other", "content-type"]),
    st.sampled_from(["gold", "large", "Bearer x", "", "\u00e9"]),
    max_size=3,
)


def _readings(engine: PolicyEngine, tenant: str | None) -> list[set[str]]:
    """What each reading of ``tenant`` may reach: every comma-separated part, stripped."""
    tenants = engine.policy.tenants
    everything = tenants.otherwise if tenants.otherwise is not None else tuple(engine.policy.backends)
    parts = [None] if tenant is None else [part.strip() for part in tenant.split(",")]
    return [set(tenants.allow.get(part, everything) if part else everything) for part in parts]


def _exact(raw: bytes):
    return json.loads(raw, object_pairs_hook=lambda pairs: pairs,
                      parse_float=lambda s: ("number", s), parse_int=lambda s: ("number", s))


def _check_request(engine: PolicyEngine, raw: bytes, parts, gaps, tenant, headers) -> None:
    try:
        body = parse_json_body(raw, max_bytes=MAX_BYTES)
    except RequestError:
        return
    request_headers = {**headers, **({"x-tenant": tenant} if tenant is not None else {})}
    request = RoutingRequest(headers=request_headers, body=body)
    try:
        decision = engine.decide(request)
    except RequestError as error:
        assert 400 <= error.status < 600 and error.code
        return
    backend = decision.backend
    for reading in _readings(engine, tenant):
        assert backend.name in reading, (tenant, backend.name)
    if request.image_count:
        assert backend.supports_images
    if backend.max_context_tokens is not None and decision.rule != "direct":
        from extproc.signals._kinds import SignalContext

        assert SignalContext(request).token_count("all", ESTIMATE) <= backend.max_context_tokens

    if not decision.rewrite_model:
        return
    out = rewrite_model(raw, body, decision.model)
    has_model = any(is_model for *_, is_model in parts)
    expected = _render(parts, gaps, decision.model) if has_model else raw.replace(
        b"{", b'{"model":' + json.dumps(decision.model).encode() + b",", 1)
    assert out == expected
    assert orjson.loads(out)["model"] == decision.model
    if not any(key == '"extra"' and val.startswith(("[" * 300, '{"k":' * 300)) for key, val, _ in parts):
        got, sent = _exact(out), _exact(raw)  # the stdlib decoder recurses: shallow bodies only
        want = [(k, decision.model if k == "model" else v) for k, v in sent]
        assert got == (want if has_model else [("model", decision.model), *sent])


SETTINGS = settings(max_examples=250, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(body=body_text(), tenant=TENANTS, headers=HEADERS, which=st.sampled_from([0, 1]))
def test_engine_answers_within_policy_and_forwards_the_body_exactly(body, tenant, headers, which):
    raw, parts, gaps = body
    _check_request(ENGINES[which], raw, parts, gaps, tenant, headers)


@SETTINGS
@given(raw=st.binary(max_size=200) | body_text().map(lambda b: b[0][: len(b[0]) // 2]))
def test_any_bytes_get_a_request_error_or_a_body(raw):
    try:
        body = parse_json_body(raw, max_bytes=MAX_BYTES)
    except RequestError as error:
        assert error.status in (400, 413) and error.code
        return
    assert isinstance(body, dict) and body["messages"]


@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=body_text(), tenant=TENANTS, headers=HEADERS)
def test_servicer_never_fails_internally_and_sends_the_exact_body(body, tenant, headers):
    raw, parts, gaps = body
    engine = ENGINES[1]
    stream = RequestStream(engine, Telemetry())
    sent = {**JSON_HEADERS, **headers, "content-type": "application/json", **({"x-tenant": tenant} if tenant else {})}
    first = stream.handle(headers_message(sent))
    assert not first.HasField("immediate_response")
    answer = stream.handle(body_message(raw))
    if answer.HasField("immediate_response"):
        status = answer.immediate_response.status.code
        error = json.loads(answer.immediate_response.body)["error"]
        assert 400 <= status < 500 or (status == 503 and error["code"] == "no_eligible_backend"), error
        assert error["code"] != "internal_error"
        return
    common = answer.request_body.response
    backend = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    assert backend["x-switchyard-backend"] in engine.policy.backends
    if common.HasField("body_mutation"):
        forwarded = common.body_mutation.body
        assert backend["content-length"] == str(len(forwarded))
        model = engine.policy.backends[backend["x-switchyard-backend"]].model
        has_model = any(is_model for *_, is_model in parts)
        assert forwarded == (_render(parts, gaps, model) if has_model
                             else raw.replace(b"{", b'{"model":' + json.dumps(model).encode() + b",", 1))
