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
first and last tokens kept), the same way in training, evaluation and serving. Images are
read from ``data:`` URLs or given as PIL images; remote URLs are never fetched.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import hashlib
import inspect
import io
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extproc import CheckpointError, ScorerError, message_text
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
    - ``max_image_bytes`` / ``max_image_pixels``: limits on one decoded ``data:`` image
      (default 20 MiB and 25 megapixels).
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
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    pad_to_multiple: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"`path` must be a non-empty string, got {self.path!r}.")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"`layer` must be an integer >= 1, got {self.layer!r}.")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(_DTYPES)} or None, got {self.dtype!r}.")
        for name in ("max_tokens", "max_image_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
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
        if not isinstance(messages, Sequence) or not messages:
            raise ScorerError("A request must have a non-empty list of messages.")
        images: list[Any] = []
        rendered: list[dict[str, Any]] = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise ScorerError(f"A message must be an object, got {type(message).__name__}.")
            content = message.get("content")
            parts: list[dict[str, Any]] = []
            if isinstance(content, list):
                for part in content:
                    image = self._image_of(part) if isinstance(part, Mapping) else None
                    if image is not None:
                        images.append(image)
                        parts.append({"type": "image"})
                    elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        parts.append({"type": "text", "text": part["text"]})
            role = str(message.get("role", "user"))
            if images and not self.has_images:
                raise ScorerError(f"Backbone {self.source} takes no images, but the request has one.")
            if self.has_images and isinstance(content, list):
                rendered.append({"role": role, "content": parts})
            else:
                rendered.append({"role": role, "content": message_text(message)})
        template_owner = self.processor if self.has_images else self.tokenizer
        if getattr(self.tokenizer, "chat_template", None) or getattr(template_owner, "chat_template", None):
            try:
                text = template_owner.apply_chat_template(rendered, tokenize=False, add_generation_prompt=not self.is_encoder)
            except Exception as exc:  # jinja errors have no common base class
                raise ScorerError(f"The chat template of {self.source} failed on the request: {exc}") from exc
        else:
            text = "\n".join(f"{m['role']}: {message_text(m)}" for m in rendered)
        return text, images

    def _image_of(self, part: Mapping[str, Any]) -> Any:
        from PIL import Image

        kind = part.get("type")
        if kind == "image" and isinstance(part.get("image"), Image.Image):
            return part["image"].convert("RGB")
        if kind not in ("image_url", "input_image"):
            return None
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, Mapping) else ref
        if isinstance(url, Image.Image):
            return url.convert("RGB")
        if not isinstance(url, str):
            raise ScorerError("An image part has no URL.")
        return self._decode_data_url(url)

    def _decode_data_url(self, url: str) -> Any:
        from PIL import Image

        if not url.startswith("data:"):
            scheme = url.split(":", 1)[0] if ":" in url else "(none)"
            raise ScorerError(f"Image URLs must be data: URLs; remote images are never fetched (got scheme {scheme!r}).")
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ScorerError("A data: image URL must be base64-encoded (';base64,').")
        if len(payload) * 3 // 4 > self.config.max_image_bytes:
            raise ScorerError(f"An image is over max_image_bytes={self.config.max_image_bytes}.")
        try:
            raw = base64.b64decode(payload, validate=True)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > self.config.max_image_pixels:
                raise ScorerError(
                    f"An image is {image.width}x{image.height}, over max_image_pixels={self.config.max_image_pixels}."
                )
            return image.convert("RGB")
        except ScorerError:
            raise
        except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as exc:
            raise ScorerError(f"Cannot decode a data: image: {exc}") from exc

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

    The one tokenization of the scorers (backbone and LatentRouter's text encoder): special
    tokens are added first, so a cut keeps ``[CLS]`` in its head and ``[SEP]`` in its tail.
    Returns ``input_ids``, ``attention_mask`` and any other per-token field the tokenizer
    gives (``token_type_ids``), each ``[B, T]``.
    """
    encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens, verbose=False)
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
    """The model's processor (multimodal) or tokenizer (text), from a local folder."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        processor = None
    if processor is None or not (hasattr(processor, "tokenizer") or hasattr(processor, "pad_token")):
        try:
            processor = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"Cannot load a tokenizer or processor from {path}: {exc}") from exc
    return processor


def shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the original ones."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)
