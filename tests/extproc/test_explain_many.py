"""``switchyard policy explain --requests FILE``: many requests, one process, one decision a line."""

from __future__ import annotations

import io
import json

from extproc.cli import main
from tests.extproc.conftest import POLICIES, chat


def _explain_many(tmp_path, capsys, lines, policy="default.yaml", *args):
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = main(["policy", "explain", str(POLICIES / policy), "--requests", str(path), *args])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_every_request_gets_its_decision_in_order(tmp_path, capsys):
    code, out = _explain_many(tmp_path, capsys, [
        json.dumps(chat("Please prove this theorem about primes")),
        "",
        json.dumps({"id": "r2", "body": chat("hi")}),
    ])
    assert code == 0
    assert [(row["line"], row["backend"], row["rule"]) for row in out] == [
        (1, "large", "maths-reasoning"), (3, "small", "default")]
    assert out[1]["id"] == "r2" and "id" not in out[0]
    assert out[0]["signals"]["maths"]["matched"] and "scores" in out[0]


def test_headers_per_line_and_for_all(tmp_path, capsys):
    lines = [json.dumps({"body": chat("hello"), "headers": {"X-Tenant-Tier": "enterprise"}}), json.dumps(chat("hello"))]
    code, out = _explain_many(tmp_path, capsys, lines, "examples/tenant-tiers.yaml")
    assert code == 0 and [row["tenant"] for row in out] == ["enterprise", None]
    code, out = _explain_many(tmp_path, capsys, lines, "examples/tenant-tiers.yaml", "--header", "x-tenant-tier=free")
    assert [row["tenant"] for row in out] == ["enterprise", "free"]  # a line's own header wins


def test_a_bad_line_is_an_error_answer_and_the_rest_are_decided(tmp_path, capsys):
    code, out = _explain_many(tmp_path, capsys, ["[1]", "{not json", json.dumps(chat("hi"))])
    assert code == 2
    assert [row.get("error", {}).get("code") for row in out] == ["invalid_body", "invalid_json", None]
    assert out[2]["backend"] == "small"


def test_requests_from_stdin(monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO((json.dumps(chat("hi")) + "\n").encode()))
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["policy", "explain", str(POLICIES / "default.yaml"), "--requests", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == "default"


def test_request_and_requests_exclude_each_other(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["policy", "explain", str(POLICIES / "default.yaml"), "--request", "a", "--requests", "b"])
    assert "not allowed with argument" in capsys.readouterr().err
