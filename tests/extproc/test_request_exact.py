"""The forwarded body is the client's bytes except the top-level ``model`` value.

``rewrite_model`` splices bytes; these tests pin what it keeps (numbers, escapes, spacing,
key order, duplicates), what it replaces (every top-level ``model`` however spelled), and
that ``parse_json_body`` answers every body it cannot read with a defined 4xx.
"""

from __future__ import annotations

import json

import orjson
import pytest

from extproc import RequestError, parse_json_body
from extproc.request._body import MAX_JSON_DEPTH, rewrite_model

MESSAGES = '"messages": [{"role": "user", "content": "hi"}]'
LIMIT = 1 << 20


def rewrite(raw: bytes, model: str = "large-model") -> bytes:
    return rewrite_model(raw, parse_json_body(raw, max_bytes=LIMIT), model)


def exact(raw: bytes):
    """``raw`` decoded with numbers kept as their source text (no float, no int rounding)."""
    return json.loads(raw, parse_float=lambda s: ("float", s), parse_int=lambda s: ("int", s))


@pytest.mark.parametrize("extra", [
    '"seed": -9999999999999999999',
    '"seed": 123456789012345678901234567890',
    '"temperature": 0.30000000000000000001',
    '"max_tokens": 1E2',
    '"top_p": -0',
    '"top_p": -0.0e-0',
    '"x": 1e-999',
    '"logit_bias": {"50256": -100, "1": 1.000}',
    '"stop": ["\\u263a", "h\\u00e9", "\\ud83d\\ude00", "\\"quoted\\"", "\\/"]',
    '"user": "h\u00e9 \u263a"',
])
def test_every_other_byte_is_kept(extra):
    raw = ('{ "model" :  "auto",\n\t' + MESSAGES + ", " + extra + " }").encode()
    out = rewrite(raw)
    assert out == raw.replace(b'"auto"', b'"large-model"', 1)
    assert exact(out) == {**exact(raw), "model": "large-model"}


def test_model_after_messages_as_the_openai_sdk_sends_it():
    raw = ("{" + MESSAGES + ', "model": "auto", "stream": false}').encode()
    assert rewrite(raw) == raw.replace(b'"auto"', b'"large-model"')


def test_missing_model_is_inserted_after_the_opening_brace():
    raw = ("  \n{" + MESSAGES + ', "n": 1}').encode()
    out = rewrite(raw)
    assert out == b'  \n{"model":"large-model",' + raw[4:]
    assert orjson.loads(out)["model"] == "large-model"


@pytest.mark.parametrize("model_member", [
    '"model": null',
    '"model": 7',
    '"model": {"a": ["}", {"model": 1}]}',
    '"model": ["auto", "x"]',
    '"model": true',
    '"mod\\u0065l": "auto"',
    '"\\u006d\\u006F\\u0064\\u0065\\u006c": "auto"',
])
def test_every_top_level_model_is_replaced_whichever_a_parser_keeps(model_member):
    raw = ('{' + model_member + ", " + MESSAGES + ', "model": "auto"}').encode()
    out = rewrite(raw)
    assert orjson.loads(out)["model"] == "large-model"  # orjson keeps the last duplicate
    first = json.loads(out, object_pairs_hook=lambda pairs: pairs)
    assert [value for key, value in first if key == "model"] == ["large-model", "large-model"]
    assert out.endswith(b'"model": "large-model"}')
    assert b"messages" in out and out.count(b'"large-model"') == 2


def test_model_as_a_value_or_a_nested_key_is_not_touched():
    raw = ('{"model": "auto", "messages": [{"role": "user", "content": "model", "model": "x"}], '
           '"metadata": {"model": "keep"}, "tag": "model", "models": ["model"]}').encode()
    assert rewrite(raw) == raw.replace(b'"auto"', b'"large-model"')


def test_a_quote_or_escape_in_the_new_model_name_is_json_escaped():
    raw = ("{" + MESSAGES + ', "model": "auto"}').encode()
    out = rewrite(raw, 'we"ird\\m\u00f6del')
    assert orjson.loads(out)["model"] == 'we"ird\\m\u00f6del'


def test_the_usual_body_and_the_full_scan_agree():
    # One literal "model" (fast path) vs. the same body with an escape elsewhere (full scan).
    fast = ('{"messages": [{"role": "user", "content": "hi"}], "model": "auto"}').encode()
    slow = ('{"messages": [{"role": "user", "content": "\\u0065"}], "model": "auto"}').encode()
    assert rewrite(fast) == fast.replace(b'"auto"', b'"large-model"')
    assert rewrite(slow) == slow.replace(b'"auto"', b'"large-model"')


def _nested(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"a":' * depth + inner + b"}" * depth


@pytest.mark.parametrize("depth", [300, 999, MAX_JSON_DEPTH - 2])
def test_deep_nesting_within_the_limit_is_rewritten(depth):
    # `extra` holds `depth` nested objects: with the top object the body nests depth + 1 deep.
    raw = b'{"model": "auto", ' + MESSAGES.encode() + b', "extra": ' + _nested(depth, b"-99999999999999999999") + b"}"
    out = rewrite(raw)
    assert out == raw.replace(b'"auto"', b'"large-model"', 1)


def test_nesting_past_orjsons_limit_is_a_defined_400():
    at_limit = b"{" + MESSAGES.encode() + b', "x": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    parse_json_body(at_limit, max_bytes=LIMIT)  # exactly MAX_JSON_DEPTH deep: accepted
    over = b"{" + MESSAGES.encode() + b', "x": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    with pytest.raises(RequestError) as info:
        parse_json_body(over, max_bytes=LIMIT)
    assert (info.value.status, info.value.code) == (400, "json_too_deep")
    assert str(MAX_JSON_DEPTH) in str(info.value)


@pytest.mark.parametrize(("raw", "code"), [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_json"),  # lone surrogate
    (b'{"messages": [{"role": "user", "content": "\\udc00\\ud800"}]}', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "a\x00b"}]}', "invalid_json"),  # raw NUL
    (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "invalid_encoding"),  # UTF-8 surrogate
    (b'{"messages": [{"role": "user", "content": "\xc3"}]}', "invalid_encoding"),
    (b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "x"}]}', "invalid_json"),  # BOM
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 1e999}', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": -1e999}', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 01}', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": +1}', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": .5}', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}]} {}', "invalid_json"),  # trailing data
    (b'{"messages": [{"role": "user", "content": "x"}],}', "invalid_json"),
    (b'{"messages": {"role": "user"}}', "invalid_messages"),
    (b'{"messages": [{"role": 1}]}', "invalid_messages"),
    (b'{"messages": [{"role": "user"}], "model": ["a"]}', "invalid_model"),
    (b'"just a string"', "invalid_body"),
    (b"null", "invalid_body"),
    (b"   \n", "missing_body"),
])
def test_bodies_that_cannot_be_read_get_a_defined_400(raw, code):
    with pytest.raises(RequestError) as info:
        parse_json_body(raw, max_bytes=LIMIT)
    assert (info.value.status, info.value.code) == (400, code)


def test_valid_but_odd_bodies_are_accepted_and_kept():
    # A NUL written as an escape, a paired surrogate, and an earlier non-string duplicate `model`.
    raw = b'{"model": 5, "messages": [{"role": "user", "content": "a\\u0000b \\ud83d\\ude00"}], "model": "auto"}'
    body = parse_json_body(raw, max_bytes=LIMIT)
    assert body["model"] == "auto" and body["messages"][0]["content"] == "a\x00b \U0001F600"
    assert rewrite(raw) == raw.replace(b"5", b'"large-model"', 1).replace(b'"auto"', b'"large-model"')


def test_every_top_level_model_is_rewritten_whatever_its_value():
    # found by the property test: a duplicate `model` that is not a string is rewritten too
    raw = b'{"messages":[{"role":"user","content":""}],"model":0,"extra":{"k":0},"model":"auto"}'
    body = parse_json_body(raw, max_bytes=1 << 20)
    assert rewrite_model(raw, body, "m") == (
        b'{"messages":[{"role":"user","content":""}],"model":"m","extra":{"k":0},"model":"m"}')
