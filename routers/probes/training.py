"""Training a probe on a labelled set: cached features, AdamW, early stopping on val AUC.

Requests are sorted by length and cut into fixed batches (little padding). The backbone
runs once per batch and the states a probe needs are cached on the CPU (last-token states
for the last-token probe; layer l-1 states for the Attention Probe; layer l-1 states plus
layer l's call for ReLope, so each ReLope step runs one layer, not the prefix). When the
cache would pass ``cache_budget_gb`` the prefix is re-run every epoch instead.

The label is the probe's **target** (:data:`PROBE_TARGETS`, saved in the checkpoint):

- ``small_ok``: the small backend's ``correct`` (1 = the small model answered correctly; a
  graded value in [0, 1] is a soft label). A high score means "the small model will do".
- ``gain``: how much better the large backend does, ``quality(large) − quality(small)``
  clipped to [0, 1] (with 0/1 outcomes: 1 exactly when the large model is right and the
  small one wrong). A high score means "send it to the large model".

A request whose needed outcome failed (``error``) is skipped and counted. Validation AUC is
taken against the label rounded at 0.5. Without a validation
set, ``val_fraction`` of the training set is held out for early stopping
(:func:`routers.data.holdout_split`, the same split LatentRouter uses).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from extproc import ScorerError, conversation_text
from routers.backbone import BackboneStates, TruncatedBackbone
from routers.checkpoints import PROBE_TARGETS
from routers.config_options import option
from routers.data import DataError, LabelledRequest, holdout_split, val_fraction_option, without_failed
from routers.metrics import roc_auc
from routers.probes._base import reads_output

__all__ = ["TrainConfig", "TrainResult", "labels_for", "target_labels", "needed_backends", "train_probe", "predict"]

log = logging.getLogger(__name__)

#: Default AdamW learning rate per probe kind (ReLope's LoRA wants a smaller step).
DEFAULT_LR = {"last_token": 1e-3, "attention": 1e-3, "relope": 1e-4}


@dataclass(frozen=True)
class TrainConfig:
    """How a probe trains (saved in the checkpoint under ``training``). Each field's help
    is in its metadata; ``switchyard train probe`` has one flag per field, with the default
    given here."""

    epochs: int = option(10, "Passes over the training set.")
    batch_size: int = option(16, "Requests per step (and per cached forward).")
    lr: float | None = option(
        None, "AdamW learning rate (not set: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")."
    )
    weight_decay: float = option(0.01, "AdamW weight decay.")
    patience: int = option(3, "Stop after this many epochs without a better validation AUC (0: never).")
    val_fraction: float = val_fraction_option()
    grad_clip: float = option(1.0, "Max gradient norm (0: off).")
    seed: int = option(0, "Seeds the split, batch order, dropout and ReLope's sampling.")
    cache_budget_gb: float = option(
        4.0, "CPU memory (GiB) for cached states; above it the prefix re-runs each epoch."
    )
    progress: bool = option(True, "Show progress bars.")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"`patience` must be an integer >= 0, got {self.patience!r}.")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr!r}.")
        for name in ("weight_decay", "grad_clip", "cache_budget_gb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {self.val_fraction!r}.")


@dataclass
class TrainResult:
    """What training did: per-epoch history, the epoch whose weights were kept, and where
    the validation set came from (``validation``: ``source`` = ``given``, ``held_out`` or
    ``none``, ``fraction``, ``n_train``, ``n_val``)."""

    best_epoch: int
    best_val_auc: float | None
    history: list[dict[str, float | None]] = field(default_factory=list)
    cached: bool = True
    validation: dict[str, Any] = field(default_factory=dict)
    #: ids of the held-out validation requests (``validation.source == "held_out"``); not
    #: saved in ``config.json``: ``train probe`` writes those rows to ``validation.jsonl``.
    validation_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["validation_ids"]
        return out


def labels_for(requests: Sequence[LabelledRequest], backend: str) -> np.ndarray:
    """Array of ``outcomes.<backend>.correct`` (0/1, or graded values in [0, 1]);
    :class:`DataError` naming a request without it."""
    labels = []
    for request in requests:
        correct = request.outcome(backend).correct
        if correct is None:
            raise DataError(f"Request {request.id!r}: `outcomes.{backend}.correct` is needed to train a probe.")
        labels.append(correct)
    graded = any(isinstance(x, float) for x in labels)
    return np.asarray(labels, dtype=np.float64 if graded else np.int64)


def needed_backends(target: str, small: str, large: str | None) -> tuple[str, ...]:
    """The backends whose outcomes a ``target`` label reads; :class:`DataError` when a
    ``gain`` target has no large backend or the target is unknown."""
    if target not in PROBE_TARGETS:
        raise DataError(f"The probe target must be one of {', '.join(PROBE_TARGETS)}, got {target!r}.")
    if target == "small_ok":
        return (small,)
    if not large:
        raise DataError("The `gain` target needs the large backend's name (--large).")
    if large == small:
        raise DataError(f"The `gain` target needs two backends; --small and --large are both {small!r}.")
    return (small, large)


def target_labels(
    requests: Sequence[LabelledRequest], target: str, small: str, large: str | None = None
) -> np.ndarray:
    """Labels in [0, 1] for ``target`` (see the module docstring); :class:`DataError` naming a
    request without the outcome it needs."""
    if target == "small_ok":
        return labels_for(requests, small).astype(np.float64)
    needed_backends(target, small, large)
    labels = []
    for request in requests:
        small_q, large_q = request.outcome(small).quality, request.outcome(large).quality
        if small_q is None or large_q is None:
            raise DataError(f"Request {request.id!r}: the `gain` target needs the quality of {small!r} and {large!r}.")
        labels.append(min(1.0, max(0.0, large_q - small_q)))
    return np.asarray(labels, dtype=np.float64)


def _auc_labels(labels: np.ndarray) -> np.ndarray:
    """0/1 labels for ROC AUC: graded labels rounded at 0.5."""
    return (labels >= 0.5).astype(np.int64)


def _bar(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, **kwargs)


class _Batches:
    """Fixed, length-sorted batches of states for one probe: cached on CPU or re-computed."""

    def __init__(
        self,
        backbone: TruncatedBackbone,
        requests: Sequence[LabelledRequest],
        layer: int,
        need: str,
        batch_size: int,
        budget_bytes: float,
        progress: bool,
        desc: str,
    ) -> None:
        self.backbone, self.requests, self.layer, self.need = backbone, requests, layer, need
        order = sorted(range(len(requests)), key=lambda i: len(conversation_text(requests[i].messages)))
        self.index = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.cache: list[BackboneStates] | None = None
        estimate = self._estimate(batch_size)
        if estimate <= budget_bytes:
            self.cache = [
                self._compute(ix).slim(need).to("cpu") for ix in _bar(self.index, progress, desc=desc)
            ]
        else:
            log.info("States for %s (~%.1f GiB) exceed the cache budget; re-running the prefix each epoch.", desc, estimate / 2**30)

    def _estimate(self, batch_size: int) -> float:
        per = self.backbone.hidden_size * 4
        if self.need == "last":
            return len(self.requests) * per
        chars = sum(len(conversation_text(r.messages)) for r in self.requests)
        # ~1 token per 3 characters plus template tokens; ReLope also keeps the layer call
        tokens = chars / 3 + 32 * len(self.requests)
        factor = 2.0 if self.need == "layer" else 1.0
        return tokens * per * factor * 1.5

    def _compute(self, index: Sequence[int]) -> BackboneStates:
        conversations = [self.requests[i].messages for i in index]
        input_only = () if reads_output(self.need) else [self.layer]  # then layer l itself need not run
        return self.backbone.run(conversations, [self.layer], input_only=input_only, grad_safe=True).at(self.layer)

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[tuple[list[int], BackboneStates]]:
        return self.iterate(None)

    def iterate(self, rng: random.Random | None) -> Iterator[tuple[list[int], BackboneStates]]:
        """(request indices, states on the backbone's device), batches shuffled by ``rng``."""
        order = list(range(len(self.index)))
        if rng is not None:
            rng.shuffle(order)
        for b in order:
            if self.cache is not None:
                yield self.index[b], self.cache[b].to(self.backbone.device)
            else:
                yield self.index[b], self._compute(self.index[b])


def predict(probe: Any, batches: _Batches, n: int) -> np.ndarray:
    """Probe logits for every request of ``batches`` (eval mode, no grad), input order."""
    probe.eval()
    out = np.zeros(n, dtype=np.float64)
    with torch.inference_mode():
        for index, states in batches:
            out[index] = probe(states).float().cpu().numpy()
    return out


def train_probe(
    probe: Any,
    backbone: TruncatedBackbone,
    train: Sequence[LabelledRequest],
    small: str,
    val: Sequence[LabelledRequest] | None = None,
    config: TrainConfig | None = None,
    target: str = "small_ok",
    large: str | None = None,
) -> TrainResult:
    """Train ``probe`` in place to predict ``target`` (``small_ok``: ``outcomes.<small>.correct``;
    ``gain``: how much better ``large`` does); keeps the weights of the best validation-AUC
    epoch. Without ``val``, ``config.val_fraction`` of ``train`` is held out; with neither,
    the last epoch's weights are kept. Requests whose needed outcome failed are skipped."""
    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    needed = needed_backends(target, small, large)
    train = without_failed(train, needed, "train on")
    val = without_failed(val, needed, "validate on") if val else val
    if not train:
        raise DataError("No training request is left once those whose outcome failed are skipped.")
    held_ids: list[str] = []
    if val:
        validation = {"source": "given", "fraction": None}
    else:
        kept, held = holdout_split([r.id for r in train], config.val_fraction, config.seed)
        train, val = [train[i] for i in kept], [train[i] for i in held]
        held_ids = [r.id for r in val]
        validation = {"source": "held_out" if val else "none", "fraction": config.val_fraction if val else 0.0}
        if not val:
            log.warning("No validation set: training %d epochs without early stopping.", config.epochs)
    validation.update(n_train=len(train), n_val=len(val))
    y_train = torch.tensor(target_labels(train, target, small, large), dtype=torch.float32)
    y_val = _auc_labels(target_labels(val, target, small, large)) if val else None
    budget = config.cache_budget_gb * 2**30
    data = _Batches(backbone, train, probe.layer, probe.needs, config.batch_size, budget, config.progress, "caching train")
    val_batches = (
        _Batches(backbone, val, probe.layer, probe.needs, config.batch_size, budget, config.progress, "caching val")
        if val
        else None
    )
    probe.to(backbone.device)
    params = [p for p in probe.parameters() if p.requires_grad]
    lr = config.lr if config.lr is not None else DEFAULT_LR[probe.kind]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    best_state, best_auc, best_epoch, stale = None, -math.inf, config.epochs, 0
    history: list[dict[str, float | None]] = []
    for epoch in range(1, config.epochs + 1):
        probe.train()
        total, count = 0.0, 0
        for index, states in _bar(data.iterate(rng), config.progress, total=len(data), desc=f"epoch {epoch}/{config.epochs}"):
            labels = y_train[index].to(backbone.device)
            loss, _ = probe.loss(states, labels)
            if not torch.isfinite(loss):
                raise ScorerError(f"Training loss became {loss.item()} at epoch {epoch}; try a lower --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            total += loss.item() * len(index)
            count += len(index)
        record: dict[str, float | None] = {"epoch": epoch, "train_loss": total / max(count, 1), "val_auc": None}
        if val_batches is not None:
            auc = roc_auc(y_val, predict(probe, val_batches, len(val)))
            record["val_auc"] = None if math.isnan(auc) else auc
            score = -math.inf if math.isnan(auc) else auc
            if score > best_auc:
                best_auc, best_epoch, stale = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in probe.saved_state().items()}
            else:
                stale += 1
        history.append(record)
        log.info("epoch %d: train loss %.4f, val AUC %s", epoch, record["train_loss"], record["val_auc"])
        if val_batches is not None and config.patience and stale >= config.patience:
            break
    if best_state is not None:
        probe.load_saved_state(best_state)
    else:
        best_epoch = len(history)
    probe.eval()
    return TrainResult(
        best_epoch=best_epoch,
        best_val_auc=None if best_auc == -math.inf else best_auc,
        history=history,
        cached=data.cache is not None,
        validation=validation,
        validation_ids=held_ids,
    )
