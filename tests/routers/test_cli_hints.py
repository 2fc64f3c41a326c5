"""Every command an error message tells the user to run exists: it parses with the real CLI
parser (the learned-scorer commands registered), placeholders filled."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from extproc.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
#: "run `switchyard ...`" (or try/use) inside a message.
HINT = re.compile(r"\b(?:run|try|use)\s+`(switchyard [^`]+)`", re.IGNORECASE)
#: What a placeholder is filled with: f-string fields and <...> alike (a number parses as a
#: path and as a share).
FILLED = "0.2"


def _text(node: ast.AST) -> str | None:
    """A string literal's text, f-string fields as :data:`FILLED`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else FILLED for v in node.values)
    return None


def hints() -> list[tuple[str, str]]:
    found = []
    for folder in ("extproc", "routers"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            docstrings = {id(node) for node in _docstrings(tree)}
            for node in ast.walk(tree):
                text = _text(node)
                if text is not None and id(node) not in docstrings:
                    for command in HINT.findall(text):
                        found.append((f"{path.relative_to(REPO)}:{node.lineno}", command))
    return sorted(set(found))


def _docstrings(tree: ast.Module) -> list[ast.AST]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.append(first.value)
    return out


def test_the_hints_are_found():
    commands = [command for _, command in hints()]
    assert any(c.startswith("switchyard calibrate --checkpoint") for c in commands), commands


@pytest.mark.parametrize(("where", "command"), hints())
def test_every_hinted_command_parses(where, command):
    words = [FILLED if re.fullmatch(r"<[^>]+>", w) else w for w in shlex.split(command)]
    assert words[0] == "switchyard"
    try:
        build_parser(with_routers=True).parse_args(words[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{command}` does not parse (exit {exc.code}).")
