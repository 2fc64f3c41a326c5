"""How a prompt longer than a scorer's token limit is cut: one rule for training, eval and serving.

A routing decision depends most on the end of the conversation (the last user turn and the
chat template's generation prompt, where the last-token probe reads), so a long prompt keeps
its **last** tokens. It also keeps its first ``head`` tokens (default 4): the BOS / chat
template opening that decoder LLMs use as an attention sink (StreamingLLM, Xiao et al. 2023,
found 4 initial tokens enough), and ``[CLS]`` for BERT-style encoders (whose ``[SEP]`` is in
the tail). The limit is never above what the model can take: its position embeddings and its
tokenizer's ``model_max_length``.

:class:`Truncation` is saved in every checkpoint, and the truncated backbone, the
LatentRouter text encoder and the serving path all cut with :meth:`Truncation.apply`.
Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_HEAD_TOKENS", "Truncation", "position_limit"]

#: Default token budget of a scorer's prompt (before the model's own limit caps it).
DEFAULT_MAX_TOKENS = 4096
#: Tokens kept from the start of a cut prompt (the rest comes from its end).
DEFAULT_HEAD_TOKENS = 4
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

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Truncation:
        return cls(**{k: data[k] for k in ("max_tokens", "head") if k in data})


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
