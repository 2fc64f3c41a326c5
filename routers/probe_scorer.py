"""Batched scoring with several probes that share one truncated prefill.

:class:`ProbeScorer` sorts a batch of requests by token length, cuts it into chunks of similar
length (bounded in requests and padded tokens), pads each chunk once, runs the
backbone once up to the deepest probe layer, and applies every probe to the states it
reads (ReLope re-runs only its own layer). Scores are P(small model answers correctly).
A NaN or infinite score raises :class:`ScorerError`, so the policy takes its fallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from extproc import CheckpointError, ScorerError

__all__ = ["ProbeScorer"]


class ProbeScorer:
    """Score conversations with named probes on one :class:`TruncatedBackbone`."""

    def __init__(
        self,
        backbone: Any,
        probes: Mapping[str, Any],
        batch_size: int = 16,
        max_batch_tokens: int = 8192,
        max_padding: float | None = None,
    ) -> None:
        """``batch_size`` caps requests per forward; ``max_batch_tokens`` caps padded tokens
        (requests x longest prompt), so long prompts go in smaller batches; ``max_padding``
        caps the share of padding tokens in a batch. Not set, it is 0.2 on a GPU and 0 on a
        CPU, where batching gains nothing and padding is pure waste (so only prompts of equal
        length share a forward)."""
        if not probes:
            raise ValueError("`probes` must name at least one probe.")
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.backbone = backbone
        self.probes = {name: probe.eval() for name, probe in probes.items()}
        if max_padding is None:
            max_padding = 0.0 if backbone.device.type == "cpu" else 0.2
        if not 0.0 <= max_padding < 1.0:
            raise ValueError(f"`max_padding` must be in [0, 1), got {max_padding!r}.")
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding
        self.layers = sorted({probe.layer for probe in self.probes.values()})
        # no probe needs the full output of its layer (the last-token probe reads its last
        # token; ReLope and the Attention Probe read its input), so the backbone may cut the
        # deepest layer's feed-forward block to the last token
        self.last_only = self.layers

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Mapping[str, str | Path],
        *,
        backbone: Any = None,
        batch_size: int = 16,
        max_batch_tokens: int = 8192,
        max_padding: float | None = None,
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
        return cls(
            backbone, probes, batch_size=batch_size, max_batch_tokens=max_batch_tokens, max_padding=max_padding
        )

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
                states = self.backbone.run([conversations[i] for i in index], self.layers, last_only=self.last_only)
                for name, probe in self.probes.items():
                    values = probe(states.at(probe.layer)).float().cpu()
                    if not torch.isfinite(values).all():
                        raise ScorerError(f"Probe {name!r} returned a NaN or infinite score.")
                    out[name][index] = values
        return out

    def chunks(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[int]]:
        """Indices grouped into forwards: sorted by token length, cut before a request would
        pass ``batch_size``, ``max_batch_tokens`` or ``max_padding``."""
        lengths = self.backbone.token_lengths(conversations)
        chunks: list[list[int]] = []
        current: list[int] = []
        real = 0
        for i in sorted(range(len(conversations)), key=lengths.__getitem__):
            padded = (len(current) + 1) * lengths[i]  # sorted: request i is the longest so far
            if current and (
                len(current) >= self.batch_size
                or padded > self.max_batch_tokens
                or padded - real - lengths[i] > self.max_padding * padded
            ):
                chunks.append(current)
                current, real = [], 0
            current.append(i)
            real += lengths[i]
        return chunks + [current] if current else chunks
