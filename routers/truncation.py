"""How a prompt longer than a scorer's token limit is cut: one rule for training, eval and serving.

A routing decision depends most on the end of the conversation (the last user turn and the
chat template's generation prompt, where the last-token probe reads), so a long prompt keeps
its **last** tokens. It also keeps its first ``head`` tokens (default 4): the BOS / chat
template opening that decoder LLMs use as an attention sink (StreamingLLM, Xiao et al. 2023,
found 4 initial tokens enough), and ``[CLS]`` for BERT-style encoders (whose ``[SEP]`` is in
the tail). The limit is never above what the model can take: its position embeddings and its
tokenizer's ``model_max_length``.

A text is first cut by **characters**, before any tokenizer sees it, so a 10 MiB prompt costs
what a prompt at the limit costs: :meth:`Truncation.cut_texts` keeps the first
``head × CHARS_PER_TOKEN`` and the last ``(max_tokens - head) × CHARS_PER_TOKEN`` characters
(each at least :data:`MIN_KEPT_CHARS`). A token spans at most :data:`CHARS_PER_TOKEN`
characters in any text a scorer is meant to read, so the kept characters hold every token
the token cut keeps, and the cut changes no token id the model reads. (A text of tokens
longer than that, such as one character repeated thousands of times, keeps fewer tokens.)

:class:`Truncation` is saved in every checkpoint, and the truncated backbone, the
LatentRouter text encoder and the serving path all cut with :meth:`Truncation.cut_texts`
and :meth:`Truncation.apply`. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_HEAD_TOKENS",
    "MIN_KEPT_CHARS",
    "Truncation",
    "position_limit",
]

#: Default token budget of a scorer's prompt (before the model's own limit caps it).
DEFAULT_MAX_TOKENS = 4096
#: Tokens kept from the start of a cut prompt (the rest comes from its end).
DEFAULT_HEAD_TOKENS = 4
#: The most characters one token is taken to span when a text is cut by characters before
#: tokenizing. Natural text averages 3-5 characters a token; chat-template markers such as
#: ``<|im_start|>`` span about 12.
CHARS_PER_TOKEN = 16
#: Characters always kept at each end of a text cut by characters, however small the limit.
MIN_KEPT_CHARS = 1024
#: Tokenizers without a known limit report ``model_max_length`` as a huge sentinel.
_UNSET_TOKENIZER_LIMIT = 10**8

T = TypeVar("T")


@dataclass(frozen=True)
class Truncation:
    """Keep at most ``max_tokens`` tokens: the first ``head`` and the last ``max_tokens - head``.

    - ``max_tokens``: the most tokens a prompt keeps (>= 1).
    - ``head``: tokens kept from the start (0 <= head < max_tokens; cut to ``max_tokens - 1``
      when the limit is smaller).
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    head: int = DEFAULT_HEAD_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"`max_tokens` must be a positive integer, got {self.max_tokens!r}.")
        if isinstance(self.head, bool) or not isinstance(self.head, int) or self.head < 0:
            raise ValueError(f"`head` must be an integer >= 0, got {self.head!r}.")
        if self.head >= self.max_tokens:
            object.__setattr__(self, "head", self.max_tokens - 1)

    def capped(self, limit: int | None) -> Truncation:
        """This truncation with ``max_tokens`` at most ``limit`` (``None``: unchanged)."""
        if limit is None or limit >= self.max_tokens:
            return self
        return replace(self, max_tokens=max(1, int(limit)))

    def apply(self, tokens: Sequence[T]) -> list[T]:
        """``tokens`` cut to ``max_tokens``: the first ``head`` and the last ``max_tokens - head``."""
        if len(tokens) <= self.max_tokens:
            return list(tokens)
        tail = self.max_tokens - self.head
        return list(tokens[: self.head]) + list(tokens[len(tokens) - tail :])

    @property
    def char_budget(self) -> tuple[int, int]:
        """Characters a text keeps from its start and from its end before it is tokenized:
        ``head`` and ``max_tokens - head`` tokens' worth at :data:`CHARS_PER_TOKEN` each
        (at least :data:`MIN_KEPT_CHARS` each; none from the start when ``head`` is 0)."""
        head = max(self.head * CHARS_PER_TOKEN, MIN_KEPT_CHARS) if self.head else 0
        tail = max((self.max_tokens - self.head) * CHARS_PER_TOKEN, MIN_KEPT_CHARS)
        return head, tail

    @property
    def max_chars(self) -> int:
        """The most characters a text keeps before it is tokenized (head and tail together)."""
        return sum(self.char_budget)

    def cut_text(self, text: str) -> str:
        """``text`` cut by characters as :meth:`cut_texts` cuts one text."""
        return self.cut_texts((text,))[0]

    def cut_texts(self, texts: Sequence[str]) -> list[str]:
        """The pieces of one prompt, in reading order, cut by characters before tokenizing.

        The pieces together keep their first and last characters (:attr:`char_budget`);
        a piece wholly in between becomes empty, one across the edge keeps its part of the
        ends. Cutting the pieces before a chat template joins them, then the joined text
        with :meth:`cut_text`, gives the text cutting the joined text alone gives (the
        template's own characters are never dropped from the ends). Linear in the kept
        characters plus the number of pieces."""
        head, tail = self.char_budget
        lengths = [len(t) for t in texts]
        if sum(lengths) <= head + tail:
            return list(texts)
        from_start = _spend(lengths, head)
        from_end = _spend(lengths[::-1], tail)[::-1]
        out = []
        for text, size, start, end in zip(texts, lengths, from_start, from_end):
            out.append(text if start + end >= size else text[:start] + text[size - end :])
        return out

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Truncation:
        return cls(**{k: data[k] for k in ("max_tokens", "head") if k in data})


def _spend(lengths: Sequence[int], budget: int) -> list[int]:
    """How much of each length a budget spent in order covers."""
    out = []
    for size in lengths:
        take = min(size, budget)
        out.append(take)
        budget -= take
    return out


def position_limit(model_config: Any, tokenizer: Any = None) -> int | None:
    """The most tokens the model takes: the least of its (text) config's
    ``max_position_embeddings`` and the tokenizer's ``model_max_length``; ``None`` if neither
    is known. (RoBERTa-style configs count two reserved positions; their tokenizers say 512.)"""
    limits: list[int] = []
    get_text = getattr(model_config, "get_text_config", None)
    text_config = get_text() if callable(get_text) else model_config
    for config in (text_config, model_config):
        value = getattr(config, "max_position_embeddings", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits.append(value)
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _UNSET_TOKENIZER_LIMIT:
        limits.append(value)
    return min(limits) if limits else None
