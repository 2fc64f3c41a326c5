"""Render the Helm chart with the Helm library (helm-python-sdk) and read its manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "switchyard"
RELEASE, NAMESPACE = "gw", "llm"


def _render_files(values: dict[str, Any] | None) -> dict[str, str]:
    import helm_python

    return helm_python.Chart.load(CHART).render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest the chart renders for ``values`` (NOTES.txt left out), as dicts."""
    rendered = _render_files(values)
    manifests = []
    for name, text in sorted(rendered.items()):
        if name.endswith("NOTES.txt"):
            continue
        manifests += [doc for doc in yaml.safe_load_all(text) if doc]
    return manifests


def notes(values: dict[str, Any] | None = None) -> str:
    """The NOTES.txt that ``helm install`` prints for ``values``."""
    return next(text for name, text in _render_files(values).items() if name.endswith("NOTES.txt"))


def find(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{len(matches)} {kind} named {name}: {[m['metadata']['name'] for m in manifests]}"
    return matches[0]


def kinds(manifests: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((m["kind"], m["metadata"]["name"]) for m in manifests)


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART
