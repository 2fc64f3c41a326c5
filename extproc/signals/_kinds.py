"""Cheap signals: the named facts about a request that rules test.

Each signal kind is a small class built from its validated policy entry
(:meth:`from_config`) and evaluated against a :class:`SignalContext`, which memoises the
expensive intermediate values (the text of a scope, a token count, the language) so that
several signals on the same text pay once. Signals are only evaluated when a rule's
condition reaches them, and each at most once per request.

The kinds are registered in :data:`SIGNAL_TYPES`: the cheap ones, then ``score``, whose
value comes from a learned scorer the caller runs (see ``_scoring``).

Every signal is linear in the length of the request's text. Patterns a policy writes
(``regex`` signals, a ``header`` signal's ``pattern``) run on RE2, whose matching time is
linear in the text whatever the pattern; a pattern RE2 cannot take (backreferences,
lookaround) is a policy problem. Python's ``re`` only runs patterns switchyard builds itself
from escaped literals (keywords), which cannot backtrack more than a literal's length.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import re2

from extproc._errors import SwitchyardError
from extproc._schema import DESCRIPTION_KEY, Bool, Int, Key, ListOf, Num, Obj, Scalar, Str, kind_key
from extproc.signals._language import detect_language
from extproc.request._messages import conversation_text, last_user_text, message_text
from extproc.request._body import RoutingRequest
from extproc.scorers._interface import ScorerFailure, Scores, ScoresNeeded, ScoringFailed
from extproc.signals._tokens import ESTIMATE, TokenCounter, TokenizerFileCounter

__all__ = ["Signal", "SignalResult", "SignalContext", "ScoreSignal", "SIGNAL_TYPES", "SCOPES", "build_signal", "signal_schemas"]

#: ``report(key_path, message)`` records a problem at a key of the signal's entry.
Report = Callable[[tuple[str, ...], str], None]

SCOPES = ("last_user", "all", "system")

_scope = Key(
    Str(enum=SCOPES),
    "Which text is searched: `last_user` the last user message, `all` every message, "
    "`system` the system/developer messages.",
    "last_user",
)


_WORD = re.compile(r"\w+")


class SignalResult(NamedTuple):
    """A signal's outcome: whether it ``matched``, and the ``value`` it looked at."""

    matched: bool
    value: Any = None


_NO_MATCH = SignalResult(False, ())


class SignalContext:
    """Per-request memo of the values signals share (texts, token counts, language)."""

    def __init__(self, request: RoutingRequest, scores: Mapping[str, Scores | ScorerFailure] | None = None,
                 thresholds: Mapping[str, float] | None = None) -> None:
        self.request = request
        #: scorer name -> its scores (or why it has none) for this request, given by the caller
        self.scores = scores if scores is not None else {}
        #: score signal name -> the threshold that replaces its written one for this request
        #: (the ``share:`` controller's); the frozen policy is never changed
        self.thresholds: Mapping[str, float] = thresholds if thresholds is not None else {}
        self._texts: dict[str, str] = {}
        self._lower_texts: dict[str, str] = {}
        self._tokens: dict[tuple[str, str], int] = {}
        self._languages: dict[str, str] = {}
        self._words: dict[tuple[str, bool], frozenset[str]] = {}
        self._utf8: dict[str, bytes] = {}

    def text(self, scope: str) -> str:
        if scope not in self._texts:
            messages = self.request.messages
            if scope == "last_user":
                text = last_user_text(messages)
            elif scope == "system":
                text = "\n".join(
                    message_text(m) for m in messages if m.get("role") in ("system", "developer")
                )
            else:
                text = conversation_text(messages)
            self._texts[scope] = text
        return self._texts[scope]

    def utf8(self, scope: str) -> bytes:
        """A scope's text as the UTF-8 bytes RE2 searches (a lone surrogate stays an invalid
        byte sequence that no pattern matches, instead of an encoding error)."""
        if scope not in self._utf8:
            self._utf8[scope] = _utf8(self.text(scope))
        return self._utf8[scope]

    def lower_text(self, scope: str) -> str:
        if scope not in self._lower_texts:
            self._lower_texts[scope] = self.text(scope).lower()
        return self._lower_texts[scope]

    def words(self, scope: str, case_sensitive: bool) -> frozenset[str]:
        """The set of ``\\w+`` words of a scope's text (lower-cased unless ``case_sensitive``)."""
        key = (scope, case_sensitive)
        if key not in self._words:
            text = self.text(scope) if case_sensitive else self.lower_text(scope)
            self._words[key] = frozenset(_WORD.findall(text))
        return self._words[key]

    def token_count(self, scope: str, counter: TokenCounter) -> int:
        key = (scope, getattr(counter, "name", "estimate"))
        if key not in self._tokens:
            self._tokens[key] = counter.count(self.text(scope))
        return self._tokens[key]

    def language(self, scope: str) -> str:
        if scope not in self._languages:
            self._languages[scope] = detect_language(self.text(scope))
        return self._languages[scope]


class Signal:
    """Base class of signal kinds. A kind declares itself once: ``kind``, ``doc`` and
    ``keys`` (its policy entry, from which the validator, the JSON Schema and the policy reference
    table come), :meth:`from_config` and :meth:`evaluate`."""

    kind: ClassVar[str]
    doc: ClassVar[str]
    keys: ClassVar[dict[str, Key]]
    name: str

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], base_dir: Path, report: Report) -> Signal | None:
        raise NotImplementedError

    def evaluate(self, ctx: SignalContext) -> SignalResult:
        raise NotImplementedError


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


#: Said of a pattern Python's ``re`` takes but RE2 does not.
_RE2_LACKS = ("switchyard matches with RE2, whose time is linear in the text, so it has no backreferences "
              "(`\\1`, `(?P=name)`), lookaround (`(?=`, `(?!`, `(?<=`, `(?<!`), atomic groups or possessive "
              "quantifiers; rewrite the pattern without them")


def _re2_options(case_sensitive: bool) -> re2.Options:
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.log_errors = False  # a refused pattern is reported as a policy problem, not on stderr
    return options


def _compile(pattern: str, case_sensitive: bool, field: str, key: tuple[str, ...], report: Report) -> Any:
    """``pattern`` compiled by RE2 (searched on UTF-8 bytes), or None with the problem reported
    at ``key``; ``field`` names the policy key in the message."""
    try:
        return re2.compile(_utf8(pattern), _re2_options(case_sensitive))
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    try:
        re.compile(pattern)  # compiled, never matched: only to tell the user why RE2 refused it
    except re.error:
        why = reason
    else:
        why = f"{reason}. {_RE2_LACKS}"
    report(key, f"Invalid regular expression {pattern!r} in `{field}`: {why}.")
    return None


@dataclass
class KeywordsSignal(Signal):
    """Single-word keywords are looked up in the text's word set (one pass over the text,
    shared by every keywords signal on the same scope); phrases and keywords with
    punctuation (``stack trace``, ``c++``) are substring searches checked at word edges."""

    kind: ClassVar[str] = "keywords"
    doc: ClassVar[str] = (
        "True when at least `min_matches` of the keywords occur in the chosen text."
    )
    keys: ClassVar[dict[str, Key]] = {
        "keywords": Key(ListOf(Str(min_length=1), min_items=1), "Words or phrases to look for."),
        "case_sensitive": Key(Bool(), "Match case exactly.", False),
        "whole_word": Key(Bool(), "Only match at word boundaries (`code` does not match `decode`).", True),
        "min_matches": Key(Int(minimum=1), "How many distinct keywords must occur.", 1),
        "scope": _scope,
    }
    name: str
    case_sensitive: bool
    words: dict[str, str]  # normalised single word -> keyword as written
    phrases: tuple[tuple[str, str, re.Pattern[str] | None], ...]  # (normalised, keyword, edge check)
    min_matches: int
    scope: str

    def __post_init__(self) -> None:
        self.word_set = frozenset(self.words)
        # All phrases in one search, for the common case where none occurs. These patterns
        # are built here from escaped literals with one-character edge checks, so Python's
        # `re` tries each start once per phrase: linear in the text, no RE2 needed.
        self.any_phrase: re.Pattern[str] | None = None
        if self.phrases:
            either = "|".join(re.escape(key) for key, _, _ in self.phrases)
            edged = any(edge is not None for _, _, edge in self.phrases)
            self.any_phrase = re.compile(rf"(?<!\w)(?:{either})(?!\w)" if edged else either)

    @classmethod
    def from_config(cls, name, config, base_dir, report):
        case_sensitive = config["case_sensitive"]
        words: dict[str, str] = {}
        phrases = []
        for keyword in config["keywords"]:
            key = keyword if case_sensitive else keyword.lower()
            if config["whole_word"] and _WORD.fullmatch(key):
                words[key] = keyword
            else:
                edge = None
                if config["whole_word"]:
                    edge = re.compile(rf"(?<!\w){re.escape(key)}(?!\w)")
                phrases.append((key, keyword, edge))
        return cls(name, case_sensitive, words, tuple(phrases), config["min_matches"], config["scope"])

    def _phrase_text(self, ctx: SignalContext) -> str:
        return ctx.text(self.scope) if self.case_sensitive else ctx.lower_text(self.scope)

    def evaluate(self, ctx):
        hits = self.word_set.intersection(ctx.words(self.scope, self.case_sensitive)) if self.words else ()
        if not hits and (self.any_phrase is None or self.any_phrase.search(self._phrase_text(ctx)) is None):
            return _NO_MATCH
        found = [self.words[word] for word in hits]
        if self.phrases and len(found) < self.min_matches:
            text = self._phrase_text(ctx)  # memoised by the context
            for key, keyword, edge in self.phrases:
                if key in text and (edge is None or edge.search(text)):
                    found.append(keyword)
        return SignalResult(len(found) >= self.min_matches, sorted(found))


@dataclass
class RegexSignal(Signal):
    kind: ClassVar[str] = "regex"
    doc: ClassVar[str] = (
        "True when any pattern matches the chosen text (RE2 syntax, searched, not anchored). RE2 matches "
        "in time linear in the text; patterns with backreferences or lookaround are refused."
    )
    keys: ClassVar[dict[str, Key]] = {
        "patterns": Key(ListOf(Str(min_length=1), min_items=1),
                        "Regular expressions in RE2 syntax (`\\w`, `\\d`, `\\b` are ASCII; `\\pL` is any letter); each must compile."),
        "case_sensitive": Key(Bool(), "Match case exactly.", False),
        "scope": _scope,
    }
    name: str
    patterns: tuple[str, ...]  # as written, the signal's value when one matches
    compiled: tuple[Any, ...]  # RE2, searched on the text's UTF-8 bytes
    case_sensitive: bool
    scope: str

    def __post_init__(self) -> None:
        # One search for all patterns, for the common case where none matches (RE2 has no
        # backreferences, so joining never renumbers one).
        self.any_pattern: Any = None
        if len(self.compiled) > 1:
            try:
                joined = b"|".join(b"(?:" + _utf8(p) + b")" for p in self.patterns)
                self.any_pattern = re2.compile(joined, _re2_options(self.case_sensitive))
            except re2.error:  # e.g. too large joined: search one by one
                pass

    @classmethod
    def from_config(cls, name, config, base_dir, report):
        case_sensitive = config["case_sensitive"]
        compiled = [
            _compile(p, case_sensitive, f"signals.{name}.patterns[{i}]", ("patterns", i), report)
            for i, p in enumerate(config["patterns"])
        ]
        if any(c is None for c in compiled):
            return None
        return cls(name, tuple(config["patterns"]), tuple(compiled), case_sensitive, config["scope"])

    def evaluate(self, ctx):
        text = ctx.utf8(self.scope)
        if self.any_pattern is not None and self.any_pattern.search(text) is None:
            return _NO_MATCH
        for pattern, compiled in zip(self.patterns, self.compiled):
            if compiled.search(text):
                return SignalResult(True, pattern)
        return _NO_MATCH


@dataclass
class TokenCountSignal(Signal):
    kind: ClassVar[str] = "token_count"
    doc: ClassVar[str] = (
        "The prompt's token count compared with thresholds. Set `above`, `below` or both "
        "(both: true inside the range). Counted with `tokenizer` when set, else estimated."
    )
    keys: ClassVar[dict[str, Key]] = {
        "above": Key(Int(minimum=0), "True when the count is strictly greater than this.", None),
        "below": Key(Int(minimum=1), "True when the count is strictly less than this.", None),
        "scope": Key(Str(enum=SCOPES), "Which messages are counted (see `scope` above).", "all"),
        "tokenizer": Key(
                Str(min_length=1),
                "Path to a Hugging Face `tokenizer.json` (relative to the policy file). Loaded with "
                "the `tokenizers` library at policy load; never downloaded. Default: the fast "
                "estimate, one token per 4 characters of Latin text and one per CJK character.",
                None,
            ),
    }
    name: str
    above: int | None
    below: int | None
    scope: str
    counter: TokenCounter

    @classmethod
    def from_config(cls, name, config, base_dir, report):
        above, below = config["above"], config["below"]
        if above is None and below is None:
            report((), f"Signal `{name}` (token_count) needs `above`, `below` or both.")
            return None
        if above is not None and below is not None and below <= above + 1:
            report(("below",), f"`below` ({below}) must be greater than `above` + 1 ({above + 1}); the range is empty.")
            return None
        counter: TokenCounter = ESTIMATE
        if config["tokenizer"] is not None:
            path = (base_dir / config["tokenizer"]).resolve()
            if not path.is_file():
                report(("tokenizer",), f"Tokenizer file {str(path)!r} does not exist.")
                return None
            try:
                counter = TokenizerFileCounter(path)
            except SwitchyardError as exc:
                report(("tokenizer",), str(exc))
                return None
        return cls(name, above, below, config["scope"], counter)

    def evaluate(self, ctx):
        count = ctx.token_count(self.scope, self.counter)
        matched = (self.above is None or count > self.above) and (self.below is None or count < self.below)
        return SignalResult(matched, count)


@dataclass
class ModalitySignal(Signal):
    kind: ClassVar[str] = "modality"
    doc: ClassVar[str] = (
        "True when the request carries at least `min_count` parts of the modality."
    )
    keys: ClassVar[dict[str, Key]] = {
        "modality": Key(Str(enum=("image",)), "The modality to look for.", "image"),
        "min_count": Key(Int(minimum=1), "How many parts are needed.", 1),
    }
    name: str
    modality: str
    min_count: int

    @classmethod
    def from_config(cls, name, config, base_dir, report):
        return cls(name, config["modality"], config["min_count"])

    def evaluate(self, ctx):
        count = ctx.request.image_count
        return SignalResult(count >= self.min_count, count)


def _exactly_one(name: str, config: dict[str, Any], keys: tuple[str, ...], report: Report) -> bool:
    given = [k for k in keys if config.get(k) is not None]
    if len(given) != 1:
        shown = ", ".join(f"`{k}`" for k in keys)
        report((), f"Signal `{name}` needs exactly one of {shown}; got {len(given)}.")
        return False
    return True


@dataclass
class HeaderSignal(Signal):
    kind: ClassVar[str] = "header"
    doc: ClassVar[str] = (
        "A request header compared with `values` (exact), `pattern` (regex, full match) or "
        "`present`. Set exactly one. Use only headers a trusted layer sets; `x-switchyard-*` "
        "headers from clients are removed by Envoy before switchyard sees them."
    )
    keys: ClassVar[dict[str, Key]] = {
        "header": Key(Str(min_length=1), "Header name (case-insensitive)."),
        "values": Key(ListOf(Str(), min_items=1), "True when the header equals one of these.", None),
        "pattern": Key(Str(min_length=1), "True when the header fully matches this regex (RE2 syntax, like `regex`).", None),
        "present": Key(Bool(), "True when the header is present (`true`) or absent (`false`).", None),
    }
    name: str
    header: str
    values: frozenset[str] | None
    pattern: Any  # RE2, matched on the value's UTF-8 bytes
    present: bool | None

    @classmethod
    def from_config(cls, name, config, base_dir, report):
        if not _exactly_one(name, config, ("values", "pattern", "present"), report):
            return None
        pattern = None
        if config["pattern"] is not None:
            pattern = _compile(config["pattern"], True, f"signals.{name}.pattern", ("pattern",), report)
            if pattern is None:
                return None
        values = frozenset(config["values"]) if config["values"] is not None else None
        return cls(name, config["header"].lower(), values, pattern, config["present"])

    def evaluate(self, ctx):
        value = ctx.request.header(self.header)
        if self.present is not None:
            return SignalResult((value is not None) == self.present, value)
        if value is None:
            return SignalResult(False, None)
        if self.values is not None:
            return SignalResult(value in self.values, value)
        return SignalResult(self.pattern.fullmatch(_utf8(value)) is not None, value)


_MISSING = object()


@dataclass
class RequestFieldSignal(Signal):
    kind: ClassVar[str] = "request_field"
    doc: ClassVar[str] = (
        "A top-level field of the JSON body (`stream`, `tools`, `max_tokens`, `model`, ...). Set "
        "exactly one of `present`, `equals`, `in`, or `above`/`below` (numbers; both: a range)."
    )
    keys: ClassVar[dict[str, Key]] = {
        "field": Key(Str(min_length=1), "Top-level body field name."),
        "present": Key(Bool(), "True when the field is present and not null/empty (`true`), or absent (`false`).", None),
        "equals": Key(Scalar(), "True when the field equals this value.", None),
        "in": Key(ListOf(Scalar(), min_items=1), "True when the field equals one of these.", None),
        "above": Key(Num(), "True when the field is a number greater than this.", None),
        "below": Key(Num(), "True when the field is a number less than this.", None),
    }
    name: str
    field: str
    present: bool | None
    equals: Any
    one_of: tuple[Any, ...] | None
    above: float | None
    below: float | None

    @classmethod
    def from_config(cls, name, config, base_dir, report):
        given = {k for k in ("present", "equals", "in") if config[k] is not None}
        if config["above"] is not None or config["below"] is not None:
            given.add("above/below")
        if len(given) != 1:
            report((), f"Signal `{name}` needs exactly one of `present`, `equals`, `in`, `above`/`below`; got {len(given)}.")
            return None
        one_of = tuple(config["in"]) if config["in"] is not None else None
        return cls(name, config["field"], config["present"], config["equals"], one_of, config["above"], config["below"])

    def evaluate(self, ctx):
        body = ctx.request.body or {}
        value = body.get(self.field, _MISSING)
        shown = None if value is _MISSING else value
        if isinstance(shown, (list, dict)):
            shown = f"<{type(shown).__name__} of {len(shown)}>"
        if self.present is not None:
            is_present = value is not _MISSING and value is not None and value != [] and value != {}
            return SignalResult(is_present == self.present, shown)
        if value is _MISSING:
            return SignalResult(False, None)
        if self.equals is not None:
            return SignalResult(_same(value, self.equals), shown)
        if self.one_of is not None:
            return SignalResult(any(_same(value, v) for v in self.one_of), shown)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return SignalResult(False, shown)
        matched = (self.above is None or value > self.above) and (self.below is None or value < self.below)
        return SignalResult(matched, value)


def _same(a: Any, b: Any) -> bool:
    """Equality that does not confuse ``True`` with ``1``."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


@dataclass
class LanguageSignal(Signal):
    kind: ClassVar[str] = "language"
    doc: ClassVar[str] = (
        "The detected language of the chosen text (ISO 639-1: en, es, fr, de, it, pt, nl, "
        "ru, uk, el, he, ar, fa, hi, th, zh, ja, ko). True when it is one of `languages`. "
        "Detection is a fast script + stop-word heuristic; short texts detect as `und`."
    )
    keys: ClassVar[dict[str, Key]] = {
        "languages": Key(ListOf(Str(min_length=2), min_items=1), "Language codes that make the signal true."),
        "scope": _scope,
    }
    name: str
    languages: frozenset[str]
    scope: str

    @classmethod
    def from_config(cls, name, config, base_dir, report):
        from extproc.signals._language import SUPPORTED_LANGUAGES

        unknown = [code for code in config["languages"] if code not in SUPPORTED_LANGUAGES]
        if unknown:
            report(("languages",), f"Unsupported language code(s) {', '.join(unknown)}; supported: {', '.join(SUPPORTED_LANGUAGES)}.")
            return None
        return cls(name, frozenset(config["languages"]), config["scope"])

    def evaluate(self, ctx):
        language = ctx.language(self.scope)
        return SignalResult(language in self.languages, language)


@dataclass
class ScoreSignal(Signal):
    """A learned score compared with a threshold. The engine never runs a scorer: when the
    score is not in :attr:`SignalContext.scores` this raises :class:`ScoresNeeded`, and the
    caller scores the request and decides again; a failed scorer raises
    :class:`ScoringFailed` so the engine takes the policy's fallback. ``output`` and the
    ``large_share`` threshold are resolved from the scorer's checkpoints at policy load."""

    kind: ClassVar[str] = "score"
    doc: ClassVar[str] = (
        "A learned score from `scorers.<scorer>` compared with a threshold: `above` and/or `below` "
    "(numbers; both: true inside the range), or `large_share`, the threshold the probe checkpoint was "
    "calibrated at (`switchyard calibrate`) for that share of requests on the large backend (true when the "
    "score is at or above it). The scorer runs only when a rule that can still win reaches this signal; "
    "if it fails or misses its deadline the request takes `fallback`."
    )
    keys: ClassVar[dict[str, Key]] = {
        "scorer": Key(Str(min_length=1), "The scorer (a key of `scorers`)."),
        "output": Key(
            Str(min_length=1),
            "Which of the scorer's outputs: a probe checkpoint's name in `checkpoints`, or a LatentRouter pool "
            "model. May be left out when the scorer has exactly one output.",
            None,
        ),
        "above": Key(Num(), "True when the score is greater than this.", None),
        "below": Key(Num(), "True when the score is less than this.", None),
        "large_share": Key(
            Num(minimum=0, maximum=1),
            "Use the checkpoint's calibrated threshold for this share of traffic on the large backend "
            "(cannot be combined with `above`/`below`).",
            None,
        ),
    }
    name: str
    scorer: str
    output: str | None
    above: float | None
    below: float | None
    large_share: float | None
    at_least: float | None = None  # the calibrated threshold for ``large_share``

    @classmethod
    def from_config(cls, name, config, base_dir, report):
        above, below, share = config["above"], config["below"], config["large_share"]
        if share is not None and (above is not None or below is not None):
            report(("large_share",), f"Signal `{name}`: `large_share` cannot be combined with `above`/`below`.")
            return None
        if share is None and above is None and below is None:
            report((), f"Signal `{name}` (score) needs `above`, `below` or `large_share`.")
            return None
        if above is not None and below is not None and below <= above:
            report(("below",), f"`below` ({below}) must be greater than `above` ({above}); the range is empty.")
            return None
        return cls(name, config["scorer"], config["output"], above, below, share)

    def evaluate(self, ctx):
        outcome = ctx.scores.get(self.scorer)
        if outcome is None:
            raise ScoresNeeded(self.scorer)
        if isinstance(outcome, ScorerFailure):
            raise ScoringFailed(self.scorer, outcome)
        value = outcome.values.get(self.output)
        if value is None:
            raise ScoringFailed(self.scorer, ScorerFailure("missing_output", f"no output {self.output!r}"))
        moved = ctx.thresholds.get(self.name)
        if moved is not None:  # the share controller's threshold replaces the one bound
            return SignalResult(self._beyond(value, moved), value)
        if self.at_least is not None:
            return SignalResult(value >= self.at_least, value)
        matched = (self.above is None or value > self.above) and (self.below is None or value < self.below)
        return SignalResult(matched, value)

    def _beyond(self, value: float, threshold: float) -> bool:
        """Whether ``value`` matches with ``threshold`` in place of this signal's one bound
        (``share:`` allows only one-sided score signals)."""
        if self.below is not None:
            return value < threshold
        if self.at_least is not None:
            return value >= threshold
        return value > threshold


#: Signal kinds by ``kind``; the policy schema's ``SIGNAL_KINDS`` declares their keys.
SIGNAL_TYPES: dict[str, type[Signal]] = {
    cls.kind: cls
    for cls in (
        KeywordsSignal, RegexSignal, TokenCountSignal, ModalitySignal, HeaderSignal, RequestFieldSignal,
        LanguageSignal, ScoreSignal,
    )
}


def signal_schemas() -> dict[str, Obj]:
    """Each kind's policy entry (``kind``, its keys, ``description``) for the validator, the
    JSON Schema and the policy reference, from the one declaration on its class."""
    return {
        kind: Obj(title=kind, doc=cls.doc, keys={"kind": kind_key(kind), **cls.keys, "description": DESCRIPTION_KEY})
        for kind, cls in SIGNAL_TYPES.items()
    }


def build_signal(name: str, config: dict[str, Any], base_dir: Path, report: Report) -> Signal | None:
    """Build the signal ``name`` from its validated entry; problems go to ``report``."""
    return SIGNAL_TYPES[config["kind"]].from_config(name, config, base_dir, report)
