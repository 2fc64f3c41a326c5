"""The truncated backbone: a Hugging Face model cut after the deepest probe layer.

:class:`TruncatedBackbone` loads a causal LM, an image-text-to-text model (vision tower
kept) or a BERT-style encoder with only its first ``config.layer`` decoder layers: the
config is cut before the weights load, so the dropped layers never reach memory. One
prefill (no KV cache, no generation, no LM head) yields, for each layer ``l`` asked for, the
token states entering layer ``l`` (``prev``, = ``hidden_states[l-1]``) and leaving it
(``hidden``, = ``hidden_states[l]`` of the full model for ``l`` < its depth), plus the call
that ran layer ``l`` so ReLope can re-run that one layer with its adapter.

Layers are counted from 1, as in ``output_hidden_states`` (index 0 is the embeddings).
Padding is on the right, so a request's states do not depend on its batch. A prompt longer
than :attr:`TruncatedBackbone.truncation` allows is cut by :mod:`routers.truncation` (its
first and last tokens kept), the same way in training, evaluation and serving; its text is
cut by characters first, so no tokenizer ever reads more than
:attr:`routers.truncation.Truncation.max_chars` characters of it. Images are read from
``data:`` URLs (under :class:`extproc.ImageLimits`, by :mod:`routers.serving.images`) or
given as PIL images; remote URLs are never fetched.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extproc import CheckpointError, ImageLimits, ScorerError, message_text
from routers.forward_cost import ForwardCost, measure_backbone
from routers.truncation import DEFAULT_HEAD_TOKENS, DEFAULT_MAX_TOKENS, Truncation, position_limit

__all__ = [
    "BackboneConfig",
    "BackboneOutput",
    "BackboneStates",
    "TruncatedBackbone",
    "default_layer",
    "map_tensors",
    "shared_copy",
    "tokenize",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: The per-token inputs of a text-only batch (these may be padded further; others may not).
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids"})

#: Where the decoder layer list lives in a base model, first match wins.
_LAYER_PATHS = (
    "language_model.layers",  # Qwen2-VL, Qwen2.5-VL, Gemma 3, LLaVA-style
    "model.language_model.layers",
    "layers",  # Llama, Qwen2, Phi-3, Gemma 3 text, Mistral
    "model.layers",
    "encoder.layer",  # BERT, MiniLM, RoBERTa
    "h",  # GPT-2 style
    "transformer.h",
)


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone to load and how to run it.

    - ``path``: local folder of a Hugging Face model (causal LM, image-text-to-text, or
      BERT-style encoder) with its tokenizer or processor.
    - ``layer``: deepest probe layer (1-based, as in ``output_hidden_states``); layers after
      it are never loaded. States of any layer up to it can be read.
    - ``device``: torch device; ``None`` picks ``cuda`` when available, else ``cpu``.
    - ``dtype``: ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``None`` picks bfloat16 on
      CUDA and float32 on CPU.
    - ``max_tokens``: the most tokens of a prompt the backbone reads, capped by the model's
      own limit (:func:`routers.truncation.position_limit`); a longer text prompt keeps its
      first ``head_tokens`` and its last tokens (:class:`routers.truncation.Truncation`);
      a longer prompt with images is rejected. A probe checkpoint records the limit it was
      trained with, and evaluation and serving use that.
    - ``head_tokens``: tokens kept from the start of a cut prompt.
    - ``images``: the limits ``data:`` images in a request are read under (per image and
      per request), the policy's ``images`` settings; default :class:`extproc.ImageLimits`'s.
      In serving, images arrive decoded under the scorer's own limits.
    - ``pad_to_multiple``: text batches are right-padded to a multiple of this many tokens
      before the forward, so a GPU sees a few shapes again and again instead of a new one
      per request (each new shape costs kernel selection); padding never changes a real
      token's state (causal attention, masked). ``None``: 64 on CUDA, 1 (off) on CPU, where
      padding costs as much as real tokens.
    """

    path: str
    layer: int
    device: str | None = None
    dtype: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    head_tokens: int = DEFAULT_HEAD_TOKENS
    images: ImageLimits = field(default_factory=ImageLimits)
    pad_to_multiple: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"`path` must be a non-empty string, got {self.path!r}.")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"`layer` must be an integer >= 1, got {self.layer!r}.")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(_DTYPES)} or None, got {self.dtype!r}.")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"`max_tokens` must be a positive integer, got {self.max_tokens!r}.")
        if not isinstance(self.images, ImageLimits):
            raise ValueError(f"`images` must be an extproc.ImageLimits, got {type(self.images).__name__}.")
        Truncation(self.max_tokens, self.head_tokens)  # validates head_tokens
        if self.pad_to_multiple is not None and (
            isinstance(self.pad_to_multiple, bool) or not isinstance(self.pad_to_multiple, int) or self.pad_to_multiple < 1
        ):
            raise ValueError(f"`pad_to_multiple` must be a positive integer or None, got {self.pad_to_multiple!r}.")

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(x, fn) for x in obj)
    if isinstance(obj, list):
        return [map_tensors(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _nbytes(obj: Any) -> int:
    total = 0

    def count(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    map_tensors(obj, count)
    return total


@dataclass
class BackboneStates:
    """Token states around one probe layer ``l`` for a right-padded batch.

    ``prev`` [B, T, d] enters layer ``l``; ``hidden`` [B, T, d] leaves it; ``mask`` [B, T]
    is 1 on real tokens. ``layer_args``/``layer_kwargs`` are what layer ``l`` was called
    with besides the states (attention mask, position embeddings, ...), for :meth:`replay`.
    Any of ``prev``/``hidden`` may be ``None`` in a slimmed copy (see :meth:`slim`).
    ``last_only``: ``hidden`` is right only at each row's last token (see
    :meth:`TruncatedBackbone.states`).
    """

    prev: torch.Tensor | None
    hidden: torch.Tensor | None
    mask: torch.Tensor
    layer_args: tuple = ()
    layer_kwargs: dict[str, Any] = field(default_factory=dict)
    last_only: bool = False

    @property
    def last_index(self) -> torch.Tensor:
        """Index of each row's last real token, [B]."""
        return self.mask.long().sum(dim=1).clamp(min=1) - 1

    def last(self, states: torch.Tensor | None = None) -> torch.Tensor:
        """The last real token's state, [B, d], of ``states`` (default ``hidden``)."""
        states = self.hidden if states is None else states
        rows = torch.arange(states.shape[0], device=states.device)
        return states[rows, self.last_index.to(states.device)]

    def replay(self, layer: nn.Module, states: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``layer`` (e.g. an adapted copy of layer ``l``) on ``prev`` as layer ``l`` ran."""
        out = layer(self.prev if states is None else states, *self.layer_args, **self.layer_kwargs)
        return out[0] if isinstance(out, tuple) else out

    def slim(self, need: str) -> BackboneStates:
        """A detached, minimal copy: ``"last"`` keeps ``hidden`` at the last token only,
        ``"tokens"`` keeps ``prev`` and the mask, ``"layer"`` also keeps the layer call."""
        if need == "last":
            last = self.last().detach().clone()  # right even when last_only
            return BackboneStates(None, last[:, None, :], torch.ones(last.shape[0], 1, dtype=torch.long))
        if need == "tokens":
            return BackboneStates(self.prev.detach().clone(), None, self.mask.clone())
        if need == "layer":
            clone = lambda t: t.detach().clone()  # noqa: E731
            return BackboneStates(
                clone(self.prev),
                None,
                self.mask.clone(),
                map_tensors(self.layer_args, clone),
                map_tensors(self.layer_kwargs, clone),
            )
        raise ValueError(f"`need` must be 'last', 'tokens' or 'layer', got {need!r}.")

    def to(self, device: torch.device | str) -> BackboneStates:
        move = lambda t: t.to(device)  # noqa: E731
        return BackboneStates(
            None if self.prev is None else move(self.prev),
            None if self.hidden is None else move(self.hidden),
            move(self.mask),
            map_tensors(self.layer_args, move),
            map_tensors(self.layer_kwargs, move),
            self.last_only,
        )

    def nbytes(self) -> int:
        return _nbytes((self.prev, self.hidden, self.mask, self.layer_args, self.layer_kwargs))


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for path in _LAYER_PATHS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    raise CheckpointError(
        f"Cannot find the decoder layers of {type(model).__name__}; looked for "
        f"{', '.join(_LAYER_PATHS)}."
    )


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _cut_config(config: Any, keep: int) -> None:
    """Make ``config`` describe only the first ``keep`` decoder layers."""
    text = _text_config(config)
    for cfg in {id(text): text, id(config): config}.values():
        if getattr(cfg, "num_hidden_layers", None) is not None:
            cfg.num_hidden_layers = keep
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)):
            cfg.layer_types = list(types[:keep])


def _tensor_sample(t: torch.Tensor, n: int = 4096) -> bytes:
    flat = t.detach().reshape(-1)[:n].to("cpu", torch.bfloat16)
    return flat.view(torch.int16).numpy().tobytes()


@dataclass
class BackboneOutput:
    """What one truncated prefill read: :class:`BackboneStates` per requested layer."""

    mask: torch.Tensor
    by_layer: dict[int, BackboneStates]

    def at(self, layer: int) -> BackboneStates:
        try:
            return self.by_layer[layer]
        except KeyError:
            raise ValueError(f"Layer {layer} was not read; read: {sorted(self.by_layer)}.") from None

    def layer(self, layer: int) -> torch.Tensor:
        """Token states leaving ``layer``, [B, T, d] (= ``hidden_states[layer]``)."""
        states = self.at(layer)
        if states.last_only:
            raise ValueError(f"Layer {layer} was read for the last token only; use .at({layer}).last().")
        return states.hidden


class TruncatedBackbone:
    """A frozen Hugging Face model that runs only up to ``config.layer``.

    ``TruncatedBackbone(config)`` loads ``config.path`` with the later layers cut from the
    config before the weights load. Passing ``model`` (an ``AutoModel``-style base model
    without LM head) and ``processor`` wraps a model already in memory, truncated in place.
    """

    def __init__(self, config: BackboneConfig, *, model: nn.Module | None = None, processor: Any = None) -> None:
        self.config = config
        if model is None:
            model, self.total_layers = self._load(config)
            processor = processor if processor is not None else _load_processor(config.path)
        else:
            self.total_layers = int(_text_config(model.config).num_hidden_layers)
            self._check_layer(config.layer)
            del _find_layers(model)[1][config.layer :]
            _cut_config(model.config, config.layer)
        if processor is None:
            raise CheckpointError(f"Backbone {config.path} needs a tokenizer or processor.")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.source = config.path
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._layer_path, self._layer_list = _find_layers(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self._lock = threading.Lock()
        self._forward_keys = set(inspect.signature(model.forward).parameters)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.is_encoder = self._layer_path == "encoder.layer"
        self.has_images = getattr(processor, "image_processor", None) is not None
        #: How prompts are cut: ``config.max_tokens`` capped by the model's own limit.
        self.truncation = Truncation(config.max_tokens, config.head_tokens).capped(
            position_limit(model.config, self.tokenizer)
        )

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= self.total_layers:
            raise ValueError(
                f"Probe layer must be an integer in 1..{self.total_layers} for {self.config.path}, got {layer!r}."
            )

    def _load(self, config: BackboneConfig) -> tuple[nn.Module, int]:
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        try:
            hf_config = AutoConfig.from_pretrained(config.path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"Cannot load a model config from {config.path}: {exc}") from exc
        self.total_layers = int(_text_config(hf_config).num_hidden_layers)
        self._check_layer(config.layer)
        _cut_config(hf_config, config.layer)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the dropped layers' weights are "unexpected keys"
        try:
            model = AutoModel.from_pretrained(config.path, config=hf_config, dtype=config.torch_dtype())
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"Cannot load backbone weights from {config.path}: {exc}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        return model.to(config.torch_device()), self.total_layers

    # ---- identity -----------------------------------------------------------------------

    def layer_module(self, layer: int) -> nn.Module:
        """Decoder layer ``layer`` (1-based) of the backbone."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= len(self._layer_list):
            raise ValueError(f"Layer must be in 1..{len(self._layer_list)} (the layers kept), got {layer!r}.")
        return self._layer_list[layer - 1]

    @property
    def hidden_size(self) -> int:
        return int(_text_config(self.model.config).hidden_size)

    def describe(self, layer: int | None = None) -> dict[str, Any]:
        """What a checkpoint records about this backbone read at ``layer`` (default
        ``config.layer``): path, layer, model type, sizes, a weights ``fingerprint`` of the
        embeddings and that layer, and a ``model_fingerprint`` of the embeddings and layer 1
        (the same for every layer, so probes at different layers can be told to share a
        backbone)."""
        layer = self.config.layer if layer is None else layer
        sizes = f"{self.model.config.model_type}|{self.hidden_size}|{self.total_layers}"
        return {
            "path": self.source,
            "layer": layer,
            "model_type": self.model.config.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.total_layers,
            "fingerprint": self._fingerprint(f"{sizes}|{layer}", layer),
            "model_fingerprint": self._fingerprint(sizes, 1),
        }

    def _fingerprint(self, prefix: str, layer: int) -> str:
        digest = hashlib.sha256(prefix.encode())
        embeddings = self.model.get_input_embeddings()
        if embeddings is not None:
            digest.update(_tensor_sample(embeddings.weight))
        for name, param in self.layer_module(layer).named_parameters():
            digest.update(name.encode() + _tensor_sample(param))
        return digest.hexdigest()[:32]

    # ---- inputs -------------------------------------------------------------------------

    @functools.cached_property
    def forward_cost(self) -> ForwardCost:
        """How long a forward takes here, measured on first use (:mod:`routers.forward_cost`)."""
        return measure_backbone(self)

    @property
    def pad_multiple(self) -> int:
        """The multiple text batches are padded to before a forward (see ``pad_to_multiple``)."""
        if self.config.pad_to_multiple is not None:
            return self.config.pad_to_multiple
        return 64 if self.device.type == "cuda" else 1

    def _bucketed(self, batch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if self.pad_multiple <= 1 or not set(batch) <= _TEXT_KEYS:
            return batch  # images: the processor's positions must stay as built
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        return _pad_columns(batch, self.pad_multiple, pad_id if pad_id is not None else 0)

    def encode(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        """Chat-template and tokenize a batch of OpenAI ``messages`` lists (right-padded)."""
        if not conversations:
            raise ScorerError("Cannot score an empty batch.")
        texts: list[str] = []
        images: list[Any] = []
        for messages in conversations:
            text, imgs = self._render(messages)
            texts.append(text)
            images.extend(imgs)
        use_template = bool(getattr(self.tokenizer, "chat_template", None))
        try:
            if images:
                inputs = self.processor(
                    text=texts,
                    images=images,
                    padding=True,
                    max_length=None,
                    return_tensors="pt",
                    add_special_tokens=not use_template,
                )
                if inputs["input_ids"].shape[1] > self.truncation.max_tokens:
                    raise ScorerError(
                        f"A prompt with images has {inputs['input_ids'].shape[1]} tokens, over "
                        f"max_tokens={self.truncation.max_tokens}."
                    )
            else:
                inputs = tokenize(self.tokenizer, texts, self.truncation, add_special_tokens=not use_template)
        except ScorerError:
            raise
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ScorerError(f"Cannot tokenize the request for backbone {self.source}: {exc}") from exc
        return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask") or k in self._forward_keys}

    def token_lengths(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[int]:
        """Prompt length in tokens of each conversation (an image counts as its placeholder),
        for grouping requests of similar length into one padded batch."""
        texts = [self._render(messages)[0] for messages in conversations]
        use_template = bool(getattr(self.tokenizer, "chat_template", None))
        ids = self.tokenizer(texts, add_special_tokens=not use_template, verbose=False)["input_ids"]
        return [min(len(x), self.truncation.max_tokens) for x in ids]

    def _render(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[Any]]:
        """The chat-templated text of one conversation, cut by characters
        (:meth:`~routers.truncation.Truncation.cut_texts`: the message texts before the
        template joins them, the joined text after), and its images, read under
        ``config.images``. A prompt with images is never cut: over the character budget it is
        refused, as it is over ``max_tokens``."""
        if not isinstance(messages, Sequence) or not messages:
            raise ScorerError("A request must have a non-empty list of messages.")
        images: list[Any] = []
        rendered: list[dict[str, Any]] = []
        texts: list[str] = []  # every text the template reads, in order; rendered holds indices
        budget = self._image_budget(messages)
        for message in messages:
            if not isinstance(message, Mapping):
                raise ScorerError(f"A message must be an object, got {type(message).__name__}.")
            content = message.get("content")
            role = str(message.get("role", "user"))
            if not isinstance(content, list) or not self.has_images:
                for part in content if isinstance(content, list) else ():
                    if isinstance(part, Mapping):
                        self._image_of(part, budget)  # refuses an image part
                rendered.append({"role": role, "content": len(texts)})
                texts.append(message_text(message))
                continue
            parts: list[dict[str, Any]] = []
            for part in content:
                image = self._image_of(part, budget) if isinstance(part, Mapping) else None
                if image is not None:
                    images.append(image)
                    parts.append({"type": "image"})
                elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": len(texts)})
                    texts.append(part["text"])
            rendered.append({"role": role, "content": parts})
        limit = self.truncation.max_chars
        if images and sum(len(t) for t in texts) > limit:
            raise self._too_long_with_images(sum(len(t) for t in texts))
        texts = self.truncation.cut_texts(texts)
        rendered = [_with_texts(m, texts) for m in rendered]
        template_owner = self.processor if self.has_images else self.tokenizer
        if getattr(self.tokenizer, "chat_template", None) or getattr(template_owner, "chat_template", None):
            try:
                text = template_owner.apply_chat_template(rendered, tokenize=False, add_generation_prompt=not self.is_encoder)
            except Exception as exc:  # jinja errors have no common base class
                raise ScorerError(f"The chat template of {self.source} failed on the request: {exc}") from exc
        else:
            text = "\n".join(f"{m['role']}: {message_text(m)}" for m in rendered)
        if len(text) > limit:
            if images:
                raise self._too_long_with_images(len(text))
            text = self.truncation.cut_text(text)
        return text, images

    def _too_long_with_images(self, chars: int) -> ScorerError:
        return ScorerError(
            f"A prompt with images has {chars} characters of text, more than max_tokens="
            f"{self.truncation.max_tokens} tokens hold ({self.truncation.max_chars} characters); "
            "prompts with images are never cut."
        )

    def _image_budget(self, messages: Sequence[Mapping[str, Any]]) -> Any:
        """The request's image budget under ``config.images`` (its count and ``data:`` bytes
        checked before any image is decoded); None when it has no image part to decode."""
        from routers.serving.images import ImageBudget, check_request_images, has_images

        if not self.has_images or not has_images(messages):
            return None
        check_request_images(messages, self.config.images)
        return ImageBudget(self.config.images)

    def _image_of(self, part: Mapping[str, Any], budget: Any) -> Any:
        """The RGB image of an image part (decoded under ``budget``), None for another part;
        a backbone without an image processor refuses an image part without decoding it."""
        from PIL import Image

        kind = part.get("type")
        given = kind == "image" and isinstance(part.get("image"), Image.Image)
        if not given and kind not in ("image_url", "input_image"):
            return None
        if not self.has_images:
            raise ScorerError(f"Backbone {self.source} takes no images, but the request has one.")
        if given:
            return part["image"].convert("RGB")
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, Mapping) else ref
        if isinstance(url, Image.Image):
            return url.convert("RGB")
        if not isinstance(url, str):
            raise ScorerError("An image part has no URL.")
        if not url.startswith("data:"):
            scheme = url.split(":", 1)[0] if ":" in url else "(none)"
            raise ScorerError(f"Image URLs must be data: URLs; remote images are never fetched (got scheme {scheme!r}).")
        from routers.serving.images import decode_data_url

        budget.next_image()
        return decode_data_url(url, self.config.images, budget)

    # ---- forward ------------------------------------------------------------------------

    def run(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        layers: Sequence[int] | None = None,
        *,
        last_only: Sequence[int] = (),
        input_only: Sequence[int] = (),
        grad_safe: bool = False,
    ) -> BackboneOutput:
        """:meth:`encode` then :meth:`states`."""
        return self.states(
            self.encode(conversations), layers, last_only=last_only, input_only=input_only, grad_safe=grad_safe
        )

    def states(
        self,
        batch: Mapping[str, torch.Tensor],
        layers: Sequence[int] | None = None,
        *,
        last_only: Sequence[int] = (),
        input_only: Sequence[int] = (),
        grad_safe: bool = False,
    ) -> BackboneOutput:
        """One truncated prefill of an encoded ``batch``, reading ``layers`` (default
        ``[config.layer]``).

        For a layer in ``last_only`` only each row's last token of the output is needed, so
        when it is the deepest layer read (no later layer runs to read its output) its feed-forward
        block (``.mlp``, most of its cost) runs on that token alone and the output is right
        only there (``BackboneStates.last_only``). Other layers run in full.
        For a layer in ``input_only`` only what enters it is needed (``prev`` and the call,
        as the Attention Probe and ReLope read it): when it is the deepest layer read, the
        forward stops before running it (``hidden`` is ``None``). The forward never runs
        past the deepest layer read.
        Runs under ``torch.inference_mode()``; ``grad_safe=True`` uses ``no_grad`` instead so
        the states can feed a layer that trains (ReLope).
        """
        wanted = sorted(set([self.config.layer] if layers is None else layers))
        for layer in wanted:
            self.layer_module(layer)
        batch = self._bucketed(batch)
        mask = batch["attention_mask"].to(self.device)
        last_index = mask.long().sum(dim=1).clamp(min=1) - 1
        rows = torch.arange(mask.shape[0], device=self.device)

        def last_token_mlp(module: nn.Module, args: tuple) -> tuple:
            return (args[0][rows, last_index].unsqueeze(1), *args[1:])

        captured: dict[int, dict[str, Any]] = {layer: {} for layer in wanted}
        deepest = wanted[-1]
        stop_before_deepest = deepest in input_only

        def pre_hook(slot: dict[str, Any], stop: bool) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if args:
                    slot["prev"], slot["args"] = args[0], args[1:]
                else:
                    slot["prev"], slot["args"] = kwargs["hidden_states"], ()
                slot["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if stop:
                    raise _Captured

            return hook

        def post_hook(slot: dict[str, Any], stop: bool) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                slot["hidden"] = output[0] if isinstance(output, tuple) else output
                if stop:
                    raise _Captured

            return hook

        inputs = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        extra = {"use_cache": False} if "use_cache" in self._forward_keys else {}
        mode = torch.no_grad() if grad_safe else torch.inference_mode()
        handles = []
        with self._lock:
            for layer, slot in captured.items():
                module = self._layer_list[layer - 1]
                last = layer == deepest
                handles.append(module.register_forward_pre_hook(pre_hook(slot, last and stop_before_deepest), with_kwargs=True))
                handles.append(module.register_forward_hook(post_hook(slot, last), with_kwargs=True))
                mlp = getattr(module, "mlp", None)
                slot["last_only"] = layer in last_only and last and isinstance(mlp, nn.Module)
                if slot["last_only"]:
                    handles.append(mlp.register_forward_pre_hook(last_token_mlp))
            try:
                with mode:
                    self.model(**inputs, **extra)
            except _Captured:  # every state read is in hand: the rest of the model is not run
                pass
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise ScorerError(f"The backbone forward of {self.source} failed: {exc}") from exc
            finally:
                for handle in handles:
                    handle.remove()
        by_layer = {
            layer: BackboneStates(
                slot["prev"], slot.get("hidden"), mask, tuple(slot["args"]), dict(slot["kwargs"]), slot["last_only"]
            )
            for layer, slot in captured.items()
        }
        return BackboneOutput(mask=mask, by_layer=by_layer)


class _Captured(Exception):
    """Raised from a layer hook once every state a forward reads is captured, to stop it."""


def _pad_columns(batch: Mapping[str, torch.Tensor], multiple: int, pad_id: int) -> Mapping[str, torch.Tensor]:
    """``batch`` right-padded to a width that is a multiple of ``multiple`` (text keys only)."""
    width = int(batch["input_ids"].shape[1])
    extra = -width % multiple
    if not extra:
        return batch
    out = {}
    for key, value in batch.items():
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.nn.functional.pad(value, (0, extra), value=fill)
    return out


def _with_texts(message: dict[str, Any], texts: Sequence[str]) -> dict[str, Any]:
    """A rendered message whose text indices are replaced by ``texts``' entries."""
    content = message["content"]
    if isinstance(content, int):
        return {**message, "content": texts[content]}
    return {**message, "content": [{**p, "text": texts[p["text"]]} if p["type"] == "text" else p for p in content]}


def default_layer(path: str | Path) -> int:
    """Half the depth of the model in folder ``path`` (from its ``config.json``): the default
    probe layer and ``backbone`` encoder layer. :class:`CheckpointError` if it cannot be read."""
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read {config_path} to pick a layer: {exc}; pass a layer explicitly.") from exc
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    layers = config.get("num_hidden_layers") or text.get("num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise CheckpointError(f"{config_path} has no `num_hidden_layers`; pass a layer explicitly.")
    return max(1, layers // 2)


def tokenize(
    tokenizer: Any, texts: Sequence[str], truncation: Truncation, *, add_special_tokens: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenize ``texts``, cut each with ``truncation`` and pad on the right.

    The one tokenization of the scorers (backbone and LatentRouter's text encoder): each
    text is cut by characters first (:meth:`~routers.truncation.Truncation.cut_text`), so
    the tokenizer never reads more than ``truncation.max_chars`` characters of it; special
    tokens are added next, so a cut keeps ``[CLS]`` in its head and ``[SEP]`` in its tail.
    Returns ``input_ids``, ``attention_mask`` and any other per-token field the tokenizer
    gives (``token_type_ids``), each ``[B, T]``.
    """
    texts = [truncation.cut_text(text) for text in texts]
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)
    keys = [k for k in encoded.keys() if k != "attention_mask"]
    rows = [{k: truncation.apply(encoded[k][i]) for k in keys} for i in range(len(texts))]
    width = max((len(row["input_ids"]) for row in rows), default=0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {k: torch.full((len(rows), width), pad_id if k == "input_ids" else 0, dtype=torch.long) for k in keys}
    out["attention_mask"] = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for k in keys:
            out[k][i, :n] = torch.tensor(row[k], dtype=torch.long)
        out["attention_mask"][i, :n] = 1
    return out


def _load_processor(path: str) -> Any:
    """The model's processor (multimodal) or tokenizer (text), from a local folder.

    A processor that also reads video (Qwen2-VL, Qwen2.5-VL) is built from its image
    processor and tokenizer alone (:func:`_images_only_processor`): switchyard reads images,
    never video, and transformers' video processors need torchvision, which the ``ml``
    extra does not install (no torchvision wheel matches every CPU torch)."""
    from transformers import AutoProcessor, AutoTokenizer

    processor_class = _processor_class(path)
    if processor_class is not None and "video_processor" in processor_class.get_attributes():
        return _images_only_processor(processor_class, path)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, ImportError):
        processor = None
    if processor is None or not (hasattr(processor, "tokenizer") or hasattr(processor, "pad_token")):
        try:
            processor = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"Cannot load a tokenizer or processor from {path}: {exc}") from exc
    return processor


def _processor_class(path: str) -> Any:
    """The processor class transformers maps the model in ``path`` to; None for a text model."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    try:
        return PROCESSOR_MAPPING.get(type(AutoConfig.from_pretrained(path)), None)
    except (OSError, ValueError, KeyError, ImportError):
        return None


def _images_only_processor(processor_class: Any, path: str) -> Any:
    """``processor_class`` built from the image processor (Pillow backend, the same pixels
    with or without torchvision) and the tokenizer in ``path``, with no video processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        try:
            image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        except (ValueError, ImportError, TypeError):  # no Pillow image processor for this model
            image_processor = AutoImageProcessor.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        saved, _ = processor_class.get_processor_dict(path)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CheckpointError(f"Cannot load the image processor and tokenizer of {path}: {exc}") from exc
    chat_template = saved.get("chat_template") or getattr(tokenizer, "chat_template", None)
    try:
        build = _images_only(processor_class)
        return build(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"Cannot build the {processor_class.__name__} of {path} without video: {exc}") from exc


@functools.lru_cache(maxsize=None)
def _images_only(processor_class: Any) -> Any:
    """A subclass of ``processor_class`` that may be built with parts left out (None):
    transformers checks each part's class, and without torchvision the check of an absent
    video processor fails."""

    def check_argument_for_proper_class(self: Any, name: str, part: Any) -> Any:
        return None if part is None else processor_class.check_argument_for_proper_class(self, name, part)

    return type(
        f"{processor_class.__name__}ImagesOnly",
        (processor_class,),
        {"check_argument_for_proper_class": check_argument_for_proper_class, "__module__": __name__},
    )


def shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the original ones."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)
