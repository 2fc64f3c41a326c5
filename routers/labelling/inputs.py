"""The prompts to label: JSONL of OpenAI chat requests, read as a stream.

Each line is ``{"messages": [...], "id": optional, "reference": optional, ...}``; the id
defaults to :func:`default_id` (a stable hash of the messages). Generation parameters the
request sets (:data:`FORWARDED_PARAMS`) are sent with it; every other key (a capture's
decision, ``model``, ``stream``) is not. Lines end at ``\\n`` only (JSON strings may hold
U+2028 and U+0085 raw); blank lines are skipped.

:func:`check_prompts` reads the whole file first and raises :class:`LabelError` naming
``file:line`` at the first bad line, so that nothing is labelled from a file that is
broken further down; :func:`read_prompts` then streams it (nothing is held but one line).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routers.data import chat_messages
from routers.labelling.errors import LabelError

__all__ = ["FORWARDED_PARAMS", "Prompt", "default_id", "check_prompts", "read_prompts"]

#: Request keys sent to every model along with ``messages``.
FORWARDED_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed")


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict[str, Any]]
    reference: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


def default_id(messages: list[Any]) -> str:
    """A stable id for a request without one: the first 16 hex digits of the sha256 of its
    messages as canonical JSON."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _parse(line: bytes, where: str, need_reference: bool) -> Prompt:
    try:
        raw = json.loads(line)
    except UnicodeDecodeError as exc:
        raise LabelError(f"{where}: not UTF-8 ({exc.reason}).") from exc
    except json.JSONDecodeError as exc:
        raise LabelError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).") from exc
    if not isinstance(raw, Mapping):
        raise LabelError(f"{where}: a line must be a JSON object (an OpenAI chat request), got {type(raw).__name__}.")
    messages = chat_messages(raw, where, LabelError)
    rid = raw.get("id")
    if rid is None:
        rid = default_id(messages)
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise LabelError(f"{where}: `id` must be a string or integer, got {rid!r:.80}.")
    reference = raw.get("reference")
    if reference is not None and (isinstance(reference, bool) or not isinstance(reference, (str, int, float))):
        raise LabelError(f"{where}: `reference` must be a string or number, got {reference!r:.80}.")
    if need_reference and reference is None:
        raise LabelError(f"{where}: `reference` is required: `grading.mode` is `reference`.")
    params = {key: raw[key] for key in FORWARDED_PARAMS if key in raw}
    return Prompt(id=str(rid), messages=[dict(m) for m in messages],
                  reference=None if reference is None else str(reference), params=params)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with open(path, "rb") as handle:
            for lineno, line in enumerate(handle, start=1):
                if line.strip():
                    yield lineno, line
    except OSError as exc:
        raise LabelError(f"Cannot read the prompt file {path}: {exc.strerror or exc}.") from exc


def check_prompts(path: str | Path, *, need_reference: bool = False) -> int:
    """The number of prompts in ``path``; :class:`LabelError` at the first bad line or
    repeated id. Holds only the ids."""
    path = Path(path)
    seen: dict[str, int] = {}
    for lineno, line in _lines(path):
        prompt = _parse(line, f"{path}:{lineno}", need_reference)
        if prompt.id in seen:
            raise LabelError(f"{path}:{lineno}: duplicate `id` {prompt.id!r} (first at line {seen[prompt.id]}).")
        seen[prompt.id] = lineno
    if not seen:
        raise LabelError(f"{path}: no prompts (the file is empty).")
    return len(seen)


def read_prompts(path: str | Path, *, need_reference: bool = False) -> Iterator[Prompt]:
    """Stream the prompts of ``path`` (checked first with :func:`check_prompts`)."""
    path = Path(path)
    for lineno, line in _lines(path):
        yield _parse(line, f"{path}:{lineno}", need_reference)
