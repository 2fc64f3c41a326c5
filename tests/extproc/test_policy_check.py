"""`policy check`: every kind of error, located at the right line and column."""

from __future__ import annotations

import pytest

from extproc import PolicyError, load_policy
from extproc.cli import main

BASE = """\
version: 1
backends:
  small: {cluster: small, model: s}
  large: {cluster: large, model: l}
default: small
"""


def problems(write_policy, text):
    path = write_policy(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return [(p.line, p.column, p.message) for p in info.value.problems], path


CASES = [
    # (name, policy text, expected (line, column), substring of the message)
    ("unknown key", BASE + "rulez: []\n", (6, 1), "Unknown key `rulez`"),
    ("unknown backend key", BASE.replace("model: s}", "model: s, pricing: 3}"), (3, 37), "Unknown key `pricing` in `backends.small`"),
    ("wrong type", BASE.replace("version: 1", "version: one"), (1, 10), "`version` must be an integer"),
    ("missing required", "version: 1\nbackends:\n  small: {model: s}\ndefault: small\n", (3, 10), "`backends.small.cluster` is required"),
    ("undefined default backend", BASE.replace("default: small", "default: medium"), (5, 1), "names backend 'medium', which is not defined"),
    (
        "undefined signal in rule",
        BASE + "rules:\n  - name: r\n    when: {all: [nope]}\n    backend: large\n",
        (8, 18), "refers to signal 'nope', which is not defined",
    ),
    (
        "undefined backend in rule",
        BASE + "signals:\n  s: {kind: modality}\nrules:\n  - name: r\n    when: s\n    backend: huge\n",
        (11, 5), "names backend 'huge'",
    ),
    (
        "duplicate rule name",
        BASE + "signals:\n  s: {kind: modality}\nrules:\n  - {name: r, when: s, backend: large}\n  - {name: r, when: s, backend: small}\n",
        (10, 6), "Duplicate rule name 'r'",
    ),
    ("duplicate key", BASE + "signals:\n  s: {kind: modality}\n  s: {kind: modality}\n", (8, 3), "Duplicate key `s`"),
    (
        "bad regex",
        BASE + "signals:\n  r:\n    kind: regex\n    patterns: ['ok', '(unclosed']\n",
        (9, 22), "Invalid regular expression '(unclosed'",
    ),
    ("unknown signal kind", BASE + "signals:\n  s: {kind: sentiment}\n", (7, 13), "Unknown kind 'sentiment'"),
    (
        "bad condition operator",
        BASE + "signals:\n  s: {kind: modality}\nrules:\n  - {name: r, when: {xor: [s]}, backend: large}\n",
        (9, 22), "Unknown operator `xor`",
    ),
    ("header signal needs one test", BASE + "signals:\n  h: {kind: header, header: x-a}\n", (7, 3), "needs exactly one of"),
    ("token_count needs a threshold", BASE + "signals:\n  t: {kind: token_count}\n", (7, 3), "needs `above`, `below` or both"),
    ("tenant names unknown backend", BASE + "tenants:\n  allow:\n    free: [tiny]\n", (8, 12), "names backend 'tiny'"),
    ("invalid yaml", BASE + "rules: [\n", (7, 1), "Invalid YAML"),
    ("bad language code", BASE + "signals:\n  l: {kind: language, languages: [xx]}\n", (7, 23), "Unsupported language code(s) xx"),
    ("enum value", BASE + "signals:\n  k: {kind: keywords, keywords: [a], scope: everything}\n", (7, 45), "must be one of last_user, all, system"),
]


@pytest.mark.parametrize("name,text,where,message", CASES, ids=[c[0] for c in CASES])
def test_each_problem_is_reported_at_its_position(write_policy, name, text, where, message):
    found, _ = problems(write_policy, text)
    assert any((line, column) == where and message in text_ for line, column, text_ in found), found


def test_every_problem_is_reported_not_just_the_first(write_policy):
    text = BASE.replace("version: 1", "version: 2") + "signals:\n  s: {kind: nope}\nextra: 1\n"
    found, _ = problems(write_policy, text)
    assert len(found) == 3
    assert [line for line, _, _ in found] == [1, 7, 8]


MIXED = """\
version: 1
backends:
  small: {cluster: small, model: s, cost: cheap}
  large: {cluster: large, model: l}
default: small
tenants:
  allow:
    free: [small, medium]
signals:
  code: {kind: keywords, keywords: [python]}
  broken_re: {kind: regex, patterns: ['(unclosed']}
  odd: {kind: nosuch}
rules:
  - {name: code, when: code, backend: large}
  - {name: code, when: code, backend: large}
  - {name: ghost, when: ghost_signal, backend: large}
  - {name: nowhere, when: code, backend: huge}
  - {name: to-small, when: odd, backend: small}
  - {name: bad, when: code, backend: large, extra: 1}
  - {name: uses-broken, when: broken_re, backend: small}
"""


def test_schema_reference_and_regex_problems_are_all_listed(write_policy):
    found, _ = problems(write_policy, MIXED)
    expected = [  # (line, column, message part): schema problems, then what the later checks find
        (3, 43, "`backends.small.cost` must be a number"),
        (8, 19, "names backend 'medium', which is not defined"),
        (11, 39, "Invalid regular expression '(unclosed'"),
        (12, 15, "Unknown kind 'nosuch'"),
        (15, 6, "Duplicate rule name 'code'"),
        (16, 19, "refers to signal 'ghost_signal', which is not defined"),
        (17, 33, "names backend 'huge', which is not defined"),
        (19, 45, "Unknown key `extra` in `rules[5]`"),
    ]
    assert [(line, column) for line, column, _ in found] == [(line, column) for line, column, _ in expected], found
    for (_, _, message), (_, _, part) in zip(found, expected):
        assert part in message
    # an entry with a schema problem still counts as defined: no "not defined" for `small`,
    # `odd` or `broken_re`, and a broken backend's name is listed among the defined ones
    assert not any("'small', which is not defined" in m or "'odd'" in m for _, _, m in found)
    assert "defined: small, large." in found[1][2]


@pytest.mark.parametrize("text", [
    BASE.replace("backends:\n  small: {cluster: small, model: s}\n  large: {cluster: large, model: l}\n", "backends: 5\n")
    + "rules:\n  - {name: r, when: nope, backend: large}\n",
    BASE.replace("default: small", "default: [small]") + "rules: [{name: r, when: nope, backend: large}]\ntenants: {header: 5}\n",
])
def test_a_broken_section_never_hides_or_invents_problems(write_policy, text):
    found, _ = problems(write_policy, text)
    messages = [m for _, _, m in found]
    if "backends: 5" in text:  # nothing to check references against: schema problems only
        assert len(messages) == 1 and "`backends` must be a mapping" in messages[0], messages
    else:  # the broken default and tenants are skipped; the rule's reference is still checked
        assert len(messages) == 3, messages
        assert any("refers to signal 'nope'" in m for m in messages)
        assert not any("names backend None" in m for m in messages)


def test_cli_check_prints_path_line_column_and_exits_1(write_policy, capsys):
    path = write_policy(BASE + "rulez: []\n")
    assert main(["policy", "check", str(path)]) == 1
    out = capsys.readouterr().out.strip()
    assert out == f"{path}:6:1: Unknown key `rulez` in `<document>`; known keys: version, backends, default, fallback, scorers, signals, rules, models, tenants, routing, capture, budgets, sessions, state, share."


def test_cli_check_accepts_valid_policies(capsys):
    from tests.extproc.conftest import POLICIES

    paths = [POLICIES / "default.yaml", *sorted((POLICIES / "examples").glob("*.yaml"))]
    assert main(["policy", "check", *map(str, paths)]) == 0
    assert capsys.readouterr().out.count(": ok") == len(paths)


def test_missing_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="Cannot read the policy file"):
        load_policy(tmp_path / "absent.yaml")


def test_empty_file_is_a_policy_error(write_policy):
    with pytest.raises(PolicyError, match="empty"):
        load_policy(write_policy(""))
