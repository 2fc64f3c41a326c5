"""A fast language guess: Unicode script first, then stop words for Latin-script text.

No model and no dictionary files: good enough to route "Chinese prompts to the model that
speaks Chinese", not a linguistic tool. Returns an ISO 639-1 code, or ``und`` when the
text is too short or ambiguous.
"""

from __future__ import annotations

import re

__all__ = ["detect_language", "SUPPORTED_LANGUAGES"]

_SCRIPTS: list[tuple[str, re.Pattern[str]]] = [
    ("ja", re.compile(r"[\u3040-\u30ff]")),  # kana: before Han, which Japanese also uses
    ("ko", re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")),
    ("zh", re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")),
    ("ar", re.compile(r"[\u0600-\u06ff]")),
    ("he", re.compile(r"[\u0590-\u05ff]")),
    ("hi", re.compile(r"[\u0900-\u097f]")),
    ("th", re.compile(r"[\u0e00-\u0e7f]")),
    ("el", re.compile(r"[\u0370-\u03ff]")),
    ("ru", re.compile(r"[\u0400-\u04ff]")),
]

_STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the and is are of to in that it for you with on this what how be was not can".split()),
    "es": frozenset("el la los las de que y en un una es por con para no se lo como del qué".split()),
    "fr": frozenset("le la les de des et est un une que en du pour pas qui dans ce il je vous".split()),
    "de": frozenset("der die das und ist nicht ein eine zu den mit von sie ich es auf für wie".split()),
    "it": frozenset("il lo la gli le di che e è un una per non con sono come del della".split()),
    "pt": frozenset("o a os as de que e é um uma para não com do da em por como você".split()),
    "nl": frozenset("de het een en is van dat niet ik je op te zijn met voor hoe wat".split()),
}

SUPPORTED_LANGUAGES = tuple(sorted({code for code, _ in _SCRIPTS} | set(_STOPWORDS) | {"uk", "fa"}))

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def detect_language(text: str, *, sample_chars: int = 2000) -> str:
    """Guess the language of ``text`` (only its first ``sample_chars`` characters are read)."""
    sample = text[:sample_chars]
    letters = sum(1 for ch in sample if ch.isalpha())
    if letters < 3:
        return "und"
    best, best_count = "und", 0
    for code, pattern in _SCRIPTS:
        count = len(pattern.findall(sample))
        if count > best_count:
            best, best_count = code, count
    if best_count * 3 >= letters:  # at least a third of the letters are in one script
        if best == "ru" and re.search(r"[іїєґ]", sample):
            return "uk"
        if best == "ar" and re.search(r"[پچژگ]", sample):
            return "fa"
        return best
    words = [w.lower() for w in _WORD.findall(sample)]
    if len(words) < 2:
        return "und"
    scores = {code: sum(1 for w in words if w in stop) for code, stop in _STOPWORDS.items()}
    code, score = max(scores.items(), key=lambda item: item[1])
    ranked = sorted(scores.values(), reverse=True)
    if score == 0 or (len(ranked) > 1 and ranked[1] == score):
        return "und"
    return code
