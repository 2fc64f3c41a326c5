from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"


@pytest.fixture
def write_policy(tmp_path):
    """Write dedented YAML to a file and return its path."""

    def write(text: str, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


def chat(content, model: str = "auto", **fields) -> dict:
    """A chat completions body with one user message."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}
