"""Each signal kind, table-driven."""

from __future__ import annotations

import pytest

from extproc import PolicyEngine, RoutingRequest, parse_policy
from extproc.signals._language import detect_language
from extproc.signals._tokens import EstimatedTokenCounter


def evaluate(signal_yaml: str, body: dict, headers: dict | None = None):
    policy = parse_policy(
        "version: 1\nbackends: {a: {cluster: a, model: a}}\ndefault: a\n"
        f"signals:\n  s: {signal_yaml}\nrules: [{{name: r, when: s, backend: a}}]\n"
    )
    return PolicyEngine(policy).decide(RoutingRequest.from_json(body, headers)).signals["s"]


def msgs(*pairs, **fields):
    return {"model": "auto", "messages": [{"role": r, "content": c} for r, c in pairs], **fields}


U = lambda text, **f: msgs(("user", text), **f)  # noqa: E731

CASES = [
    ("{kind: keywords, keywords: [python]}", U("I like Python"), True),
    ("{kind: keywords, keywords: [python], case_sensitive: true}", U("I like Python"), False),
    ("{kind: keywords, keywords: [code]}", U("decode this"), False),
    ("{kind: keywords, keywords: [code], whole_word: false}", U("decode this"), True),
    ("{kind: keywords, keywords: [c++]}", U("in c++ please"), True),
    ("{kind: keywords, keywords: [a, b], min_matches: 2}", U("a then a"), False),
    ("{kind: keywords, keywords: [a, b], min_matches: 2}", U("a then b"), True),
    ("{kind: keywords, keywords: [secret]}", msgs(("user", "secret"), ("assistant", "x"), ("user", "hi")), False),
    ("{kind: keywords, keywords: [secret], scope: all}", msgs(("user", "secret"), ("assistant", "x"), ("user", "hi")), True),
    ("{kind: keywords, keywords: [pirate], scope: system}", msgs(("system", "talk like a pirate"), ("user", "hi")), True),
    ("{kind: regex, patterns: ['\\d{4}-\\d{2}']}", U("due 2024-05"), True),
    ("{kind: regex, patterns: ['^hello$']}", U("say hello"), False),
    # Several patterns are searched as one alternation first; each must still count alone.
    ("{kind: regex, patterns: ['^never', 'due \\d+$']}", U("due 2024"), True),
    ("{kind: regex, patterns: ['^never', 'due \\d+$']}", U("due 2024!"), False),
    ("{kind: regex, patterns: ['(\\w)o\\pL', 'zzz']}", U("balloon"), True),  # groups, Unicode classes
    ("{kind: regex, patterns: ['ÉTÉ', 'zzz']}", U("un été"), True),  # case folds beyond ASCII
    ("{kind: regex, patterns: ['ÉTÉ', 'zzz'], case_sensitive: true}", U("un été"), False),
    ("{kind: regex, patterns: ['(?i)HELLO', 'zzz'], case_sensitive: true}", U("hello"), True),  # inline flag
    # Phrases are searched together first, then matched one by one at word edges.
    ("{kind: keywords, keywords: [stack trace, unit test]}", U("here is the Stack Trace:"), True),
    ("{kind: keywords, keywords: [stack trace, unit test]}", U("the stack traces"), False),
    ("{kind: keywords, keywords: [stack trace, python], min_matches: 2}", U("python stack trace"), True),
    ("{kind: keywords, keywords: [stack trace, python], min_matches: 2}", U("python stack"), False),
    ("{kind: keywords, keywords: [stack trace], whole_word: false}", U("the stack traces"), True),
    ("{kind: token_count, above: 3}", U("one two three four"), True),
    ("{kind: token_count, above: 3}", U("one two"), False),
    ("{kind: token_count, above: 1, below: 5}", U("one two"), True),
    ("{kind: token_count, above: 1, below: 5}", U("one two three four five six"), False),
    ("{kind: modality}", U([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]), True),
    ("{kind: modality, min_count: 2}", U([{"type": "image_url", "image_url": {"url": "data:,"}}]), False),
    ("{kind: modality}", U([{"type": "text", "text": "no image"}]), False),
    ("{kind: request_field, field: stream, equals: true}", U("x", stream=True), True),
    ("{kind: request_field, field: stream, equals: true}", U("x", stream=1), False),
    ("{kind: request_field, field: tools, present: true}", U("x", tools=[{"type": "function"}]), True),
    ("{kind: request_field, field: tools, present: true}", U("x", tools=[]), False),
    ("{kind: request_field, field: tools, present: false}", U("x"), True),
    ("{kind: request_field, field: max_tokens, above: 1000}", U("x", max_tokens=4096), True),
    ("{kind: request_field, field: max_tokens, above: 1000}", U("x", max_tokens="4096"), False),
    ("{kind: request_field, field: model, in: [auto, best]}", U("x"), True),
    ("{kind: language, languages: [zh]}", U("请帮我把这段话翻译成英文"), True),
    ("{kind: language, languages: [zh]}", U("Please translate this paragraph"), False),
    ("{kind: language, languages: [es]}", U("¿Cuál es la capital de Francia y por qué?"), True),
]


@pytest.mark.parametrize("signal,body,expected", CASES)
def test_signal(signal, body, expected):
    assert evaluate(signal, body).matched is expected


@pytest.mark.parametrize(
    "headers,signal,expected",
    [
        ({"x-tier": "gold"}, "{kind: header, header: X-Tier, values: [gold]}", True),
        ({"x-tier": "silver"}, "{kind: header, header: x-tier, values: [gold]}", False),
        ({"x-tier": "gold-2"}, "{kind: header, header: x-tier, pattern: 'gold-\\d'}", True),
        ({"x-tier": "xgold-2"}, "{kind: header, header: x-tier, pattern: 'gold-\\d'}", False),
        ({}, "{kind: header, header: x-tier, present: false}", True),
        ({"x-tier": ""}, "{kind: header, header: x-tier, present: true}", True),
    ],
)
def test_header_signal(headers, signal, expected):
    assert evaluate(signal, U("x"), headers).matched is expected


def test_token_count_with_a_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nbackends: {a: {cluster: a, model: a}}\ndefault: a\n"
        "signals:\n  s: {kind: token_count, above: 4, tokenizer: tokenizer.json}\n"
        "rules: [{name: r, when: s, backend: a}]\n"
    )
    from extproc import load_policy

    engine = PolicyEngine(load_policy(policy))
    # the estimate says 3 tokens for this; the word-level tokenizer splits punctuation: 7
    result = engine.decide(RoutingRequest.from_json(U("hi,hi,hi,hi"))).signals["s"]
    assert result.value == 7 and result.matched


def test_missing_tokenizer_file_is_a_policy_problem(write_policy):
    from extproc import PolicyError, load_policy

    path = write_policy(
        "version: 1\nbackends: {a: {cluster: a, model: a}}\ndefault: a\n"
        "signals:\n  s: {kind: token_count, above: 4, tokenizer: nope.json}\n"
    )
    with pytest.raises(PolicyError, match=r"policy.yaml:5:\d+: Tokenizer file .*nope.json' does not exist"):
        load_policy(path)


def test_estimate():
    counter = EstimatedTokenCounter()
    assert counter.count("") == 0
    assert counter.count("a b c") == 3
    assert counter.count("internationalization") == 5  # 20 chars / 4
    assert counter.count("你好世界") == 4


@pytest.mark.parametrize(
    "text,code",
    [("The cat is on the mat and it is happy", "en"), ("Le chat est sur le tapis et il est content", "fr"),
     ("Der Hund ist nicht in dem Haus", "de"), ("これは日本語の文です", "ja"), ("한국어 문장입니다", "ko"),
     ("Это русский текст", "ru"), ("Це українська мова і її історія", "uk"), ("12345 !!!", "und")],
)
def test_language_detection(text, code):
    assert detect_language(text) == code
