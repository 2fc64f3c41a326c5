"""Batched scoring with several probes that share one truncated prefill.

:class:`ProbeScorer` sorts a batch of requests by token length, cuts it into the forwards with
the least predicted time (bounded in requests and padded tokens; :mod:`routers.forward_cost`),
pads each chunk once, runs the backbone once up to the deepest probe layer, and applies every
probe to the states it reads (ReLope re-runs only its own layer). Scores are P(small model answers correctly).
A NaN or infinite score raises :class:`ScorerError`, so the policy takes its fallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from extproc import CheckpointError, ScorerError
from routers.forward_cost import ForwardCost, plan_chunks
from routers.probes._base import output_layers

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
        self.probes = {name: probe.eval() for name, probe in probes.items()}
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self._cost = cost
        self.layers = sorted({probe.layer for probe in self.probes.values()})
        # no probe needs the full output of its layer (the last-token probe reads its last
        # token; ReLope and the Attention Probe read its input), so the backbone may cut the
        # deepest layer's feed-forward block to the last token
        self.last_only = self.layers
        # and a layer no probe reads the output of need not run at all
        self.input_only = sorted(set(self.layers) - output_layers(self.probes.values()))

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
        logits = self.logits(conversations)
        return {name: torch.sigmoid(values).tolist() for name, values in logits.items()}

    def logits(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        """Raw probe logits per name, [N] float32 on CPU, input order."""
        n = len(conversations)
        out = {name: torch.empty(n) for name in self.probes}
        if n == 0:
            return out
        with torch.inference_mode():
            for index in self.chunks(conversations):
                states = self.backbone.run(
                    [conversations[i] for i in index], self.layers, last_only=self.last_only, input_only=self.input_only
                )
                for name, probe in self.probes.items():
                    values = probe(states.at(probe.layer)).float().cpu()
                    if not torch.isfinite(values).all():
                        raise ScorerError(f"Probe {name!r} returned a NaN or infinite score.")
                    out[name][index] = values
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
