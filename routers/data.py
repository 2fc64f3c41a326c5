"""Labelled routing sets: JSONL, one request a line (docs/learned-scorers.md, "Data").

    {"id": "q1", "messages": [...OpenAI chat messages...],
     "outcomes": {"small": {"correct": 1, "cost": 0.2}, "large": {"score": 0.8}}}

``correct`` is 0/1 (or a JSON boolean), or a grader's graded value: a number in [0, 1];
``score`` any finite number, ``cost`` a finite number >= 0; each outcome needs ``correct``
or ``score``, unless the call failed: ``{"error": "<kind>", "cost": 0.0}`` (what
``switchyard label`` writes for a timeout, a 5xx, a refusal) is a failed outcome, neither
right nor wrong. Training and evaluation skip a request whose needed outcome failed
(:func:`without_failed`, which logs how many). Errors name ``file:line`` and the field.
Lines end at ``\n`` only: JSON strings may hold U+2028, U+2029 and U+0085 raw.

Training without a separate validation set holds out :data:`DEFAULT_VAL_FRACTION` of the
training set (:func:`holdout_split`), for probes and LatentRouter alike. Nothing here
imports torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc import SwitchyardError
from routers.config_options import option

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "MIN_HOLDOUT_SIZE",
    "DataError",
    "Outcome",
    "LabelledRequest",
    "load_labelled",
    "without_failed",
    "select_lines",
    "parse_labelled",
    "split_lines",
    "chat_messages",
    "holdout_split",
    "val_fraction_option",
    "dataset_hash",
]

log = logging.getLogger(__name__)

#: Share of the training set held out for validation (early stopping) when no validation
#: set is given: the one default of ``train probe`` and ``train latent-router``.
DEFAULT_VAL_FRACTION = 0.15


def val_fraction_option() -> Any:
    """The ``val_fraction`` field of both trainers' configs (and so their CLI flag)."""
    return option(
        DEFAULT_VAL_FRACTION,
        "Share of the training set held out for validation when no validation set is given "
        "(0: none, no early stopping).",
    )


#: A training set smaller than this is not split (too few requests to validate on).
MIN_HOLDOUT_SIZE = 10


class DataError(SwitchyardError):
    """A labelled data file is missing, malformed, or lacks a field a command needs."""


@dataclass(frozen=True)
class Outcome:
    """How one backend did on one request: ``correct`` (0/1, or a graded value in [0, 1])
    and/or ``score``, and ``cost``; or ``error`` (the call failed: neither right nor wrong)."""

    correct: int | float | None = None
    score: float | None = None
    cost: float | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        """The call failed (``error`` set): no quality to learn from."""
        return self.error is not None

    @property
    def quality(self) -> float | None:
        """``score`` when set, else ``correct`` (as a float), else ``None``."""
        if self.score is not None:
            return self.score
        return None if self.correct is None else float(self.correct)


@dataclass(frozen=True)
class LabelledRequest:
    """One request of a labelled set: its chat ``messages`` and per-backend outcomes."""

    id: str
    messages: list[dict[str, Any]]
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def outcome(self, backend: str) -> Outcome:
        """The outcome for ``backend``; :class:`DataError` naming the request if absent."""
        try:
            return self.outcomes[backend]
        except KeyError:
            known = ", ".join(sorted(self.outcomes)) or "none"
            raise DataError(
                f"Request {self.id!r} has no outcome for backend {backend!r} (has: {known})."
            ) from None


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: `{name}` must be a finite number, got {value!r}.")
    return float(value)


def _correct(value: Any, where: str) -> int | float:
    """0/1 (a boolean too) as an int; a graded value in [0, 1] as a float."""
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise DataError(f"{where}: `correct` must be 0, 1, true, false or a graded value in [0, 1], got {value!r}.")
    return int(value) if value in (0, 1) else float(value)


def _cost(raw: Mapping[str, Any], where: str) -> float | None:
    cost = raw.get("cost")
    if cost is None:
        return None
    cost = _number(cost, where, "cost")
    if cost < 0:
        raise DataError(f"{where}: `cost` must be >= 0, got {cost!r}.")
    return cost


def _outcome(raw: Any, where: str) -> Outcome:
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: must be an object, got {type(raw).__name__}.")
    error = raw.get("error")
    if error is not None:
        if not isinstance(error, str) or not error:
            raise DataError(f"{where}: `error` must be a non-empty string (the kind of failure), got {error!r}.")
        if raw.get("correct") is not None or raw.get("score") is not None:
            raise DataError(f"{where}: a failed outcome (`error` {error!r}) cannot also have `correct` or `score`.")
        return Outcome(cost=_cost(raw, where), error=error)
    correct = raw.get("correct")
    if correct is not None:
        correct = _correct(correct, where)
    score = raw.get("score")
    if score is not None:
        score = _number(score, where, "score")
    if correct is None and score is None:
        raise DataError(f"{where}: needs `correct` (0/1 or graded in [0, 1]), `score` (number) or `error` (failed).")
    return Outcome(correct=correct, score=score, cost=_cost(raw, where))


def chat_messages(raw: Mapping[str, Any], where: str, error: type[Exception]) -> list[Any]:
    """``raw["messages"]``, checked to be a non-empty list of objects with a string ``role``;
    otherwise ``error`` naming ``where`` (a labelled row and a prompt to label alike)."""
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise error(f"{where}: `messages` must be a non-empty list, got {messages!r:.80}.")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise error(f"{where}: `messages[{i}]` must be an object with a string `role`.")
    return messages


def _request(raw: Any, where: str) -> LabelledRequest:
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: a line must be a JSON object, got {type(raw).__name__}.")
    rid = raw.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise DataError(f"{where}: `id` must be a string or integer, got {rid!r}.")
    messages = chat_messages(raw, where, DataError)
    outcomes = raw.get("outcomes")
    if not isinstance(outcomes, Mapping) or not outcomes:
        raise DataError(f"{where}: `outcomes` must be a non-empty object of backend -> outcome.")
    parsed = {str(k): _outcome(v, f"{where}: `outcomes.{k}`") for k, v in outcomes.items()}
    return LabelledRequest(id=str(rid), messages=[dict(m) for m in messages], outcomes=parsed)


def parse_labelled(lines: Sequence[str], source: str = "<input>") -> list[LabelledRequest]:
    """Parse JSONL lines (blank lines skipped); ids must be unique."""
    requests: list[LabelledRequest] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).") from exc
        request = _request(raw, where)
        if request.id in seen:
            raise DataError(f"{where}: duplicate `id` {request.id!r} (first at line {seen[request.id]}).")
        seen[request.id] = lineno
        requests.append(request)
    if not requests:
        raise DataError(f"{source}: no requests (the file is empty).")
    return requests


def load_labelled(path: str | Path) -> list[LabelledRequest]:
    """Read a labelled JSONL file; :class:`DataError` naming ``file:line`` and field on bad input."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"Labelled data file {path} does not exist.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read labelled data file {path}: {exc}.") from exc
    return parse_labelled(split_lines(text), source=str(path))


def without_failed(
    requests: Sequence[LabelledRequest], backends: Sequence[str], what: str = "use"
) -> list[LabelledRequest]:
    """``requests`` less those whose outcome for one of ``backends`` failed (``error``);
    how many were skipped is logged (``what``: what the requests are for). A missing
    outcome is not a failure: the caller's own check still reports it."""
    kept = [r for r in requests if not any(b in r.outcomes and r.outcomes[b].failed for b in backends)]
    skipped = len(requests) - len(kept)
    if skipped:
        log.warning(
            "Skipped %d of %d requests whose outcome for %s failed (no quality to %s).",
            skipped, len(requests), ", ".join(backends), what,
        )
    return kept


def select_lines(path: str | Path, ids: Sequence[str]) -> bytes:
    """The lines of the labelled file ``path`` whose ``id`` is in ``ids``, as written (file
    order, ``\n``-terminated): how training writes its held-out rows to
    ``validation.jsonl``. The file must have parsed with :func:`load_labelled` already."""
    wanted = set(ids)
    kept = []
    for line in split_lines(Path(path).read_text(encoding="utf-8")):
        if line.strip() and str(json.loads(line)["id"]) in wanted:
            kept.append(line + "\n")
    return "".join(kept).encode("utf-8")


def split_lines(text: str) -> list[str]:
    """JSONL lines of ``text``: split on ``\n`` only (a trailing ``\r`` is dropped).

    Not :meth:`str.splitlines`, which also splits on U+2028, U+2029, U+0085 and other
    separators that JSON allows raw inside strings (common in scraped text).
    """
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def dataset_hash(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, recorded in checkpoints as the training-set hash."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"Cannot read {path} to hash it: {exc}.") from exc
    return digest.hexdigest()


def holdout_split(ids: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, validation)`` indices of the requests whose ids are ``ids``: a seeded
    ``fraction`` held out (rounded, at least 1), the rest in their original order. Which
    requests are held out depends on their ids and ``seed`` only, never on their order in
    the file (``switchyard label`` writes rows in the order they finish), so the same
    labelled rows give the same split. Nothing is held out when ``fraction`` is 0 or there
    are fewer than :data:`MIN_HOLDOUT_SIZE` requests."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {fraction!r}.")
    n = len(ids)
    if fraction == 0.0 or n < MIN_HOLDOUT_SIZE:
        return list(range(n)), []
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}\0{ids[i]}".encode()).digest())
    held = set(rank[: max(1, round(fraction * n))])
    return [i for i in range(n) if i not in held], sorted(held)
