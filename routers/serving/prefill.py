"""One loaded backbone per process and one backbone prefill per request, shared by scorers.

What is shared, and when:

- **Weights.** Truncated backbones live in a process-wide registry keyed by
  ``(path, device, dtype, truncation)``; a scorer that needs layers up to ``l`` reuses a
  loaded backbone that keeps at least ``l`` layers (a policy reload that keeps the backbone
  loads no second copy).
- **The prefill.** Scorers on one backbone with the same ``batch`` and ``images`` settings
  are *members* of one :class:`PrefillGroup`: one micro-batcher whose forward runs the
  backbone once per batch and computes, for every request in it, what every member needs —
  each probe set's P(small model correct), and the mean-pooled states a LatentRouter
  ``backbone`` encoder reads. The result is kept in the request's ``scratch``, so a second
  scorer asking about the same request awaits the same prefill instead of running another
  (also when both ask at once). Members with different ``batch``/``images`` settings, or
  checkpoints saved with different ``max_tokens``, get their own group (their own prefill).
- **The forwards.** A batch is sorted by length and cut into the forwards with the least
  predicted time (:mod:`routers.forward_cost`), from the backbone's forward cost measured
  when it is first grouped and refitted from every text forward the group runs
  (:class:`~routers.forward_cost.LiveCost`: a load-time measurement taken on a busy machine
  corrects itself). The same cost predicts a request's wait for admission: the
  micro-batcher refuses at once (:class:`~extproc.ScorerOverloaded`) a request that cannot
  be answered before its deadline.
- A failure of one request (a bad image, a chat template error, a NaN) fails that request
  only; a failure of the forward itself fails its batch.
- **One forward.** :func:`prefill_forward` (encode → chunk plan → states → each member's
  ``compute``) is the only probe forward: offline scoring (``switchyard eval`` and
  ``calibrate``, through :class:`routers.probes.offline.ProbeScorer`) runs it too, without the
  micro-batcher, so offline and served scores are the same numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc import BatchConfig, ImageLimits, RoutingRequest, ScorerError
from routers.forward_cost import ForwardCost, LiveCost, plan_chunks
from routers.serving.batcher import MicroBatcher
from routers.serving.images import has_images, with_loaded_images

__all__ = [
    "BATCH_SIZE",
    "BackboneKey",
    "PrefillGroup",
    "ProbeMember",
    "PooledMember",
    "acquire_group",
    "chunk_plan",
    "prefill_forward",
    "release_group",
]

#: Key of a prefill row holding how many requests shared its forward.
BATCH_SIZE = "__batch_size__"

_ids = itertools.count(1)


@dataclass(frozen=True)
class BackboneKey:
    """What makes two loaded backbones interchangeable (besides how many layers they keep):
    ``truncation`` holds the saved :class:`routers.backbone.BackboneConfig` truncation fields
    (``max_tokens``, ``head_tokens``) as sorted pairs; empty means the defaults."""

    path: str
    device: str
    dtype: str
    truncation: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, path: str, device: str, dtype: str | None, truncation: tuple[tuple[str, int], ...] = ()) -> BackboneKey:
        resolved = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
        return cls(str(path), str(device), resolved, tuple(truncation))


class ProbeMember:
    """A set of named probes (one scorer's outputs) read from one prefill."""

    def __init__(self, probes: Mapping[str, Any]) -> None:
        from routers.probes._base import output_layers  # imports torch: only once probes are loaded

        self.key = f"probes-{next(_ids)}"
        self.probes = {name: probe.eval() for name, probe in probes.items()}
        self.layers = frozenset(probe.layer for probe in self.probes.values())
        # probes read the last token of their layer's output, or its input: none needs the
        # full output, so the deepest layer's feed-forward may run on the last token only,
        # and a layer no probe reads the output of need not run at all
        self.full_layers: frozenset[int] = frozenset()
        self.output_layers = output_layers(self.probes.values())

    def compute(self, out: Any, rows: int) -> list[Any]:
        import torch

        values: list[dict[str, float] | ScorerError] = [{} for _ in range(rows)]
        for name, probe in self.probes.items():
            logits = probe(out.at(probe.layer)).float().cpu()
            probs = torch.sigmoid(logits).tolist()
            finite = torch.isfinite(logits).tolist()
            for i in range(rows):
                if isinstance(values[i], ScorerError):
                    continue
                if not finite[i]:
                    values[i] = ScorerError(f"Probe {name!r} returned a NaN or infinite score for this request.")
                else:
                    values[i][name] = float(probs[i])
        return values


class PooledMember:
    """Mean-pooled token states leaving ``layer`` (LatentRouter's ``backbone`` encoder)."""

    def __init__(self, layer: int) -> None:
        self.key = f"pooled-{next(_ids)}"
        self.layer = layer
        self.layers = frozenset({layer})
        self.full_layers = frozenset({layer})
        self.output_layers = frozenset({layer})

    def compute(self, out: Any, rows: int) -> list[Any]:
        import torch

        hidden = out.layer(self.layer).float()
        mask = out.at(self.layer).mask.unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu()
        finite = torch.isfinite(pooled).all(dim=1).tolist()
        return [
            pooled[i] if finite[i] else ScorerError("The backbone gave non-finite states for this request.")
            for i in range(rows)
        ]


class PrefillGroup:
    """The members sharing one backbone prefill per request, behind one micro-batcher."""

    def __init__(self, backbone: Any, key: BackboneKey, batch: BatchConfig, images: ImageLimits, name: str) -> None:
        self.backbone = backbone
        self.key = key
        self.batch = batch
        self.images = images
        self.name = name
        self._members: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.cost = backbone.forward_cost  # measured once per loaded backbone, then kept live
        self.batcher = MicroBatcher(self._forward, batch, name=name, cost=self._batch_seconds)

    @property
    def cost(self) -> ForwardCost:
        """The forward cost batches are cut and requests admitted by, as last refitted."""
        return self.live_cost.current

    @cost.setter
    def cost(self, seed: ForwardCost) -> None:
        self.live_cost = LiveCost(seed)

    def _batch_seconds(self, requests: int) -> float:
        """Predicted seconds of one forward of ``requests`` prompts (for admission)."""
        return self.live_cost.batch_seconds(requests)

    @property
    def members(self) -> tuple[Any, ...]:
        return tuple(self._members.values())

    @property
    def kept_layers(self) -> int:
        return int(self.backbone.config.layer)

    def join(self, member: Any) -> None:
        with self._lock:
            self._members = {**self._members, member.key: member}

    def leave(self, member: Any) -> bool:
        """Remove ``member``; True when the group has no member left."""
        with self._lock:
            self._members = {k: v for k, v in self._members.items() if k != member.key}
            return not self._members

    # ---- event-loop side ----------------------------------------------------------------

    async def prefill(self, request: RoutingRequest, deadline: float, member: Any) -> dict[str, Any]:
        """This request's prefill row (member key -> result, plus :data:`BATCH_SIZE`),
        shared through ``request.scratch`` with the other members asking about it."""
        memo = ("switchyard.prefill", id(self))
        task = request.scratch.get(memo)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.ensure_future(self._prefill(request.messages, deadline))
            task.add_done_callback(_retrieve)
            request.scratch[memo] = task
        row = await _wait(task, deadline, self.name)
        if member.key not in row:  # joined after this request's prefill ran (a reload)
            row = await _wait(asyncio.ensure_future(self._prefill(request.messages, deadline)), deadline, self.name)
        return row

    async def _prefill(self, messages: Sequence[Mapping[str, Any]], deadline: float) -> dict[str, Any]:
        if has_images(messages):
            if not self.backbone.has_images:
                raise ScorerError(f"Backbone {self.key.path} takes no images, but the request has one.")
            messages = await asyncio.to_thread(with_loaded_images, messages, self.images, deadline)
        return await self.batcher.submit(list(messages), deadline)

    async def close(self) -> None:
        await self.batcher.close()

    # ---- worker thread ------------------------------------------------------------------

    def _forward(self, items: list[list[Mapping[str, Any]]]) -> Iterator[tuple[list[int], list[Any]]]:
        """Each request's prefill row, yielded forward by forward (:func:`prefill_forward`
        with this group's members and live cost), each row also telling how many requests
        shared the batch (:data:`BATCH_SIZE`)."""
        members = list(self._members.values())  # copy-on-write: a consistent snapshot
        for requests, answers in prefill_forward(self.backbone, members, items, self.cost, self.live_cost.observe):
            for answer in answers:
                if isinstance(answer, dict):
                    answer[BATCH_SIZE] = len(items)
            yield requests, answers

    def _chunks(self, batch: Mapping[str, Any]) -> list[list[int]]:
        """Rows of ``batch`` grouped into forwards by :attr:`cost` (:func:`chunk_plan`)."""
        return chunk_plan(self.backbone, batch, self.cost)


# ---- the probe forward (serving and offline scoring alike) -------------------------------


def prefill_forward(
    backbone: Any,
    members: Sequence[Any],
    items: Sequence[Sequence[Mapping[str, Any]]],
    cost: ForwardCost,
    observe: Callable[[int, int, float], None] | None = None,
) -> Iterator[tuple[list[int], list[Any]]]:
    """The one forward that scores with a backbone's prefill, served
    (:class:`PrefillGroup`) or offline (:class:`routers.probes.offline.ProbeScorer`).

    ``items`` (OpenAI ``messages`` lists) are encoded as one right-padded batch, cut into the
    forwards ``cost`` predicts cheapest (:func:`chunk_plan`), and each forward runs the
    backbone up to the deepest layer a member reads, then every member's ``compute``.
    Yields ``(indices into items, rows)`` forward by forward, shortest prompts first; a row
    maps each member's ``key`` to its result, or is the :class:`ScorerError` that failed
    that request (one that cannot be encoded fails alone; a failed forward fails its
    requests). ``observe(requests, width, seconds)`` is told what each text forward took,
    its share of encoding included (a :class:`~routers.forward_cost.LiveCost` refits from
    it).
    """
    import torch

    good = list(range(len(items)))
    encoding = time.perf_counter()
    try:
        batch = backbone.encode(items)
    except ScorerError:  # find the request(s) that cannot be encoded; score the rest
        good, failed = [], []
        for i, item in enumerate(items):
            try:
                backbone.encode([item])
                good.append(i)
            except ScorerError as exc:
                failed.append((i, exc))
        yield [i for i, _ in failed], [exc for _, exc in failed]
        if not good:
            return
        batch = backbone.encode([items[i] for i in good])
    layers = sorted(set().union(*(m.layers for m in members))) or [int(backbone.config.layer)]
    full = set().union(*(m.full_layers for m in members))
    last_only = [layer for layer in layers if layer not in full]
    outputs = set().union(*(m.output_layers for m in members))
    input_only = [layer for layer in layers if layer not in outputs]
    timed = observe is not None and set(batch) <= _SLICEABLE  # the cost model knows text forwards only
    # a request's share of tokenizing is part of what its forward costs it: admission
    # and batch cutting predict the whole wait, not the model's part alone
    encode_share = (time.perf_counter() - encoding) / len(good)
    for chunk in chunk_plan(backbone, batch, cost):
        requests = [good[j] for j in chunk]
        rows = _rows(batch, chunk)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                out = backbone.states(rows, layers, last_only=last_only, input_only=input_only)
                values = {m.key: m.compute(out, len(chunk)) for m in members}
        except ScorerError as exc:  # this chunk's forward failed: its requests fail
            yield requests, [exc] * len(chunk)
            continue
        if timed:
            took = time.perf_counter() - started + encode_share * len(chunk)
            observe(len(chunk), int(rows["attention_mask"].shape[1]), took)
        yield requests, [{key: column[k] for key, column in values.items()} for k in range(len(chunk))]


def chunk_plan(backbone: Any, batch: Mapping[str, Any], cost: ForwardCost) -> list[list[int]]:
    """Rows of an encoded ``batch`` grouped into the forwards with the least predicted time
    (:func:`~routers.forward_cost.plan_chunks` with ``cost``). Batches with images run as
    one forward."""
    mask = batch["attention_mask"]
    n = int(mask.shape[0])
    if n == 1 or not set(batch) <= _SLICEABLE:
        return [list(range(n))]
    return plan_chunks(mask.sum(dim=1).tolist(), cost, pad_multiple=backbone.pad_multiple)


#: Encoded inputs that can be cut into row chunks (text only; images are not sliced).
_SLICEABLE = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})


def _rows(batch: Mapping[str, Any], rows: list[int]) -> dict[str, Any]:
    """``rows`` of a right-padded encoded batch, in that order, cut to their longest row."""
    if rows == list(range(int(batch["attention_mask"].shape[0]))):
        return dict(batch)
    index = batch["attention_mask"].new_tensor(rows)
    width = int(batch["attention_mask"][index].sum(dim=1).max())
    return {key: value[index][:, :width] for key, value in batch.items()}


async def _wait(task: asyncio.Future, deadline: float, name: str) -> Any:
    try:
        return await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise ScorerError(f"{name} missed its deadline.") from None


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


# ---- the process-wide registry -----------------------------------------------------------

_REGISTRY_LOCK = threading.Lock()
_BACKBONES: list[tuple[BackboneKey, weakref.ref]] = []
_GROUPS: list[PrefillGroup] = []


def acquire_group(
    key: BackboneKey,
    layer: int,
    batch: BatchConfig,
    images: ImageLimits,
    name: str,
    load: Callable[[BackboneKey, int], Any],
    member: Callable[[Any], Any],
) -> tuple[PrefillGroup, Any]:
    """Join ``member(backbone)`` to the live group for ``key``/``batch``/``images`` whose
    backbone keeps ``layer``, or to a new one (on a loaded backbone that keeps ``layer``, or
    on ``load(key, layer)``). Returns the group and the member. Blocking (loads models);
    call off the event loop."""
    with _REGISTRY_LOCK:
        group = _find_or_create(key, layer, batch, images, name, load)
        try:
            joined = member(group.backbone)
        except BaseException:
            if not group.members:  # created for this member: nobody else holds it
                _GROUPS.remove(group)
                group.batcher.close_now()
            raise
        group.join(joined)
        return group, joined


def _find_or_create(
    key: BackboneKey, layer: int, batch: BatchConfig, images: ImageLimits, name: str,
    load: Callable[[BackboneKey, int], Any],
) -> PrefillGroup:
    """Under the registry lock: a live group that fits, else a new one on a backbone that fits."""
    _GROUPS[:] = [g for g in _GROUPS if not g.batcher.closed]
    for group in _GROUPS:
        if group.batch == batch and group.images == images and _fits(group.backbone, group.key, key, layer):
            return group
    _BACKBONES[:] = [(k, ref) for k, ref in _BACKBONES if ref() is not None]
    alive = [(k, ref()) for k, ref in _BACKBONES]
    backbone = next((b for k, b in alive if b is not None and _fits(b, k, key, layer)), None)
    if backbone is None:
        backbone = load(key, layer)
        _BACKBONES.append((key, weakref.ref(backbone)))
    group = PrefillGroup(backbone, key, batch, images, name)
    _GROUPS.append(group)
    return group


def _fits(backbone: Any, loaded_as: BackboneKey, key: BackboneKey, layer: int) -> bool:
    """Whether ``backbone`` (loaded for ``loaded_as``) can serve ``key`` up to ``layer``: same
    model, device and dtype, enough layers kept, and prompts cut exactly alike."""
    from routers.truncation import DEFAULT_HEAD_TOKENS, DEFAULT_MAX_TOKENS, Truncation, position_limit

    if (loaded_as.path, loaded_as.device, loaded_as.dtype) != (key.path, key.device, key.dtype):
        return False
    if int(backbone.config.layer) < layer:
        return False
    fields = dict(key.truncation)
    wanted = Truncation(fields.get("max_tokens", DEFAULT_MAX_TOKENS), fields.get("head_tokens", DEFAULT_HEAD_TOKENS))
    return wanted.capped(position_limit(backbone.model.config, backbone.tokenizer)) == backbone.truncation


async def release_group(group: PrefillGroup, member: Any) -> None:
    """``member`` leaves ``group``; the last one out closes it (its backbone is freed once
    no other group holds it)."""
    with _REGISTRY_LOCK:
        empty = group.leave(member)
        if empty and group in _GROUPS:
            _GROUPS.remove(group)
    if empty:
        await group.close()
