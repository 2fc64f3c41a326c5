"""Grading an answer: against the row's ``reference``, or through a judge model's verdict.

Reference graders (``grading.reference_grader``) return 1 (right) or 0 (wrong):

- ``exact``: the answer equals the reference, surrounding whitespace aside;
- ``normalised``: equal after Unicode NFKC, case folding, and dropping punctuation, the
  articles a/an/the and extra whitespace (SQuAD's normalisation);
- ``number``: GSM8K style: the number after the last ``####``, else the last number in the
  text (``1,234``, ``$5``, ``-0.5``, ``3/4``), compared as numbers; the reference is read the same way;
- ``choice``: the multiple-choice letter A-J (``The answer is (B)``, ``Answer: c``, ``B.``).

The judge's prompt is a template with ``{question}``, ``{reference}`` and ``{answer}``
(absolute) or ``{answer_a}``/``{answer_b}`` (pairwise; A is the strongest model's answer).
Its verdict is parsed from ``[[N]]`` (a 1-10 rating, mapped to ``(N - 1) / 9``) or
``[[A]]``/``[[B]]``/``[[C]]`` (C: a tie), MT-Bench's formats.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from importlib import resources
from typing import Any

__all__ = [
    "GRADERS",
    "PROMPT_FIELDS",
    "grade_exact",
    "grade_normalised",
    "grade_number",
    "grade_choice",
    "extract_number",
    "extract_choice",
    "default_prompt",
    "render_prompt",
    "question_text",
    "parse_rating",
    "parse_preference",
]

#: Placeholders each judge mode's prompt must contain.
PROMPT_FIELDS = {"absolute": ("question", "answer"), "pairwise": ("question", "answer_a", "answer_b")}
_PLACEHOLDER = re.compile(r"\{(question|reference|answer|answer_a|answer_b)\}")
_NO_REFERENCE = "(none given)"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d\u00bf\u00a1")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_CHOICE_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"\(([A-J])\)"),
    re.compile(r"^\s*([A-J])(?:[.):]|\s*$)", re.MULTILINE),
)


def grade_exact(answer: str, reference: str) -> int:
    return int(answer.strip() == reference.strip())


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def grade_normalised(answer: str, reference: str) -> int:
    return int(_normalise(answer) == _normalise(reference))


def extract_number(text: str) -> Fraction | None:
    """The number after the last ``####``, else the last number in ``text``; ``None`` if none."""
    _, marker, tail = text.rpartition("####")
    candidates = _NUMBER.findall(tail if marker else text)
    if marker and candidates:
        return _as_number(candidates[0])
    return _as_number(candidates[-1]) if candidates else None


def _as_number(raw: str) -> Fraction | None:
    raw = raw.replace(",", "")
    try:
        if "/" in raw:
            top, bottom = raw.split("/", 1)
            return Fraction(Decimal(top)) / Fraction(Decimal(bottom)) if Decimal(bottom) else None
        return Fraction(Decimal(raw))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def grade_number(answer: str, reference: str) -> int:
    expected = extract_number(reference)
    return int(expected is not None and extract_number(answer) == expected)


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter (upper case) ``text`` picks, or ``None``."""
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def grade_choice(answer: str, reference: str) -> int:
    expected = extract_choice(reference) or reference.strip().upper()[:1]
    return int(bool(expected) and extract_choice(answer) == expected)


#: ``grading.reference_grader`` -> grader(answer, reference) -> 0 | 1.
GRADERS: Mapping[str, Callable[[str, str], int]] = {
    "exact": grade_exact,
    "normalised": grade_normalised,
    "number": grade_number,
    "choice": grade_choice,
}


def default_prompt(mode: str) -> str:
    """The judge prompt shipped for ``mode`` (``absolute`` or ``pairwise``)."""
    return resources.files("routers.labelling").joinpath("prompts", f"judge_{mode}.txt").read_text(encoding="utf-8")


def render_prompt(template: str, **values: str | None) -> str:
    """``template`` with its placeholders filled in one pass (a value holding ``{answer}``
    stays as written); a missing ``reference`` reads "(none given)"."""
    filled = {key: (value if value is not None else _NO_REFERENCE) for key, value in values.items()}
    filled.setdefault("reference", _NO_REFERENCE)
    return _PLACEHOLDER.sub(lambda m: filled.get(m[1], m[0]), template)


def question_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The conversation as the judge reads it: the last message's text alone, or
    ``role: text`` lines when there are several messages."""
    from extproc import message_text

    if len(messages) == 1:
        return message_text(messages[0])
    return "\n".join(f"{m.get('role')}: {message_text(m)}" for m in messages)


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_LOOSE = re.compile(r"rating\s*[:=]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_PREFERENCE = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(verdict: str) -> float | None:
    """A 1-10 rating (``[[N]]``, else ``Rating: N``; the last one) as a score in [0, 1];
    ``None`` when there is none in range."""
    found = _RATING.findall(verdict) or _RATING_LOOSE.findall(verdict)
    if not found:
        return None
    rating = float(found[-1])
    return (rating - 1.0) / 9.0 if 1.0 <= rating <= 10.0 else None


def parse_preference(verdict: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from the last ``[[A]]``/``[[B]]``/``[[C]]``; else ``None``."""
    found = _PREFERENCE.findall(verdict)
    if not found:
        return None
    return "tie" if found[-1] == "C" else found[-1]
