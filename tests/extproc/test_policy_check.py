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
    ("unknown backend key", BASE.replace("model: s}", "model: s, price: 3}"), (3, 37), "Unknown key `price` in `backends.small`"),
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


def test_cli_check_prints_path_line_column_and_exits_1(write_policy, capsys):
    path = write_policy(BASE + "rulez: []\n")
    assert main(["policy", "check", str(path)]) == 1
    out = capsys.readouterr().out.strip()
    assert out == f"{path}:6:1: Unknown key `rulez` in `<document>`; known keys: version, backends, default, fallback, scorers, signals, rules, models, tenants, routing."


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
