"""Offline scoring (``switchyard eval`` and ``calibrate``) with several probes on one backbone.

:class:`ProbeScorer` runs the serving prefill's forward
(:func:`routers.serving.prefill.prefill_forward`: encode → chunk plan → states → each
probe), with no event loop or micro-batcher, so what evaluation measures is what serving
scores, to the same numbers. It sorts a whole set by token length and hands it to that
forward in windows bounded in requests and padded tokens (:meth:`ProbeScorer.chunks`, with
the least predicted time: :mod:`routers.forward_cost`). Scores are P(small model answers
correctly). A request that cannot be scored (a prompt that cannot be encoded, a NaN or
infinite score) raises its :class:`ScorerError`: offline, one failed request fails the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from extproc import CheckpointError, ScorerError
from routers.forward_cost import ForwardCost, plan_chunks
from routers.serving.prefill import ProbeMember, prefill_forward

__all__ = ["ProbeScorer"]


class ProbeScorer:
    """Score conversations with named probes on one :class:`TruncatedBackbone`."""

    def __init__(
        self,
        backbone: Any,
        probes: Mapping[str, Any],
        batch_size: int = 16,
        max_batch_tokens: int = 8192,
        cost: ForwardCost | None = None,
    ) -> None:
        """``batch_size`` caps requests per forward; ``max_batch_tokens`` caps padded tokens
        (requests x longest prompt), so long prompts go in smaller batches. Within those, a
        batch is cut by ``cost``, the predicted time of a forward; not given, the backbone's
        own, measured on first use (``TruncatedBackbone.forward_cost``)."""
        if not probes:
            raise ValueError("`probes` must name at least one probe.")
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.backbone = backbone
        self.member = ProbeMember(probes)  # what a served probe scorer is, in its prefill group
        self.probes = self.member.probes
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self._cost = cost

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Mapping[str, str | Path],
        *,
        backbone: Any = None,
        batch_size: int = 16,
        max_batch_tokens: int = 8192,
        cost: ForwardCost | None = None,
        **runtime: Any,
    ) -> ProbeScorer:
        """Load probe checkpoints by name; the backbone is loaded once from their config
        unless given. ``runtime``: :class:`BackboneConfig` fields (device, dtype, ...)."""
        from routers.checkpoints import load_backbone, load_probe, read_checkpoint

        if not checkpoints:
            raise CheckpointError("No probe checkpoints given.")
        if backbone is None:
            backbone = load_backbone([read_checkpoint(f) for f in checkpoints.values()], **runtime)
        probes = {name: load_probe(folder, backbone)[0] for name, folder in checkpoints.items()}
        return cls(backbone, probes, batch_size=batch_size, max_batch_tokens=max_batch_tokens, cost=cost)

    @property
    def cost(self) -> ForwardCost:
        return self._cost if self._cost is not None else self.backbone.forward_cost

    def score(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, list[float]]:
        """P(small model correct) per probe name, one float per conversation, input order."""
        out = {name: [0.0] * len(conversations) for name in self.probes}
        for window in self.chunks(conversations) if conversations else []:
            items = [conversations[i] for i in window]
            for indices, rows in prefill_forward(self.backbone, [self.member], items, self.cost):
                for j, row in zip(indices, rows, strict=True):
                    values = row if isinstance(row, ScorerError) else row[self.member.key]
                    if isinstance(values, ScorerError):
                        raise values
                    for name, value in values.items():
                        out[name][window[j]] = value
        return out

    def chunks(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[int]]:
        """Indices grouped into the forwards with the least predicted time (:attr:`cost`),
        each of prompts adjacent in length, within ``batch_size`` and ``max_batch_tokens``."""
        return plan_chunks(
            self.backbone.token_lengths(conversations),
            self.cost,
            pad_multiple=self.backbone.pad_multiple,
            max_rows=self.batch_size,
            max_tokens=self.max_batch_tokens,
        )
