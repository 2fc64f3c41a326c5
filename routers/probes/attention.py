"""Attention Probe: a learned query pools all token states of layer l-1, then an MLP.

weights = softmax(q . h_t / sqrt(d)) over the real tokens (padding masked). q starts at
zero, i.e. at mean pooling. The backbone is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from routers.backbone import BackboneStates
from routers.probes._base import FrozenProbeConfig, Probe
from routers.probes.mlp import MLPHead

__all__ = ["AttentionProbe", "AttentionProbeConfig"]


@dataclass(frozen=True)
class AttentionProbeConfig(FrozenProbeConfig):
    """:class:`FrozenProbeConfig`; the states *entering* layer l (layer l-1) are pooled."""


class AttentionProbe(Probe):
    kind = "attention"
    needs = "tokens"

    def __init__(self, config: AttentionProbeConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.query = nn.Parameter(torch.zeros(d))
        self.norm = nn.LayerNorm(d, elementwise_affine=False) if config.input_norm else nn.Identity()
        self.mlp = MLPHead(d, config.mlp)

    def attention(self, states: BackboneStates) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooling weights [B, T] (zero on padding) and the normalised tokens [B, T, d]."""
        tokens = self.norm(states.prev.float())
        scores = tokens @ self.query / math.sqrt(tokens.shape[-1])
        scores = scores.masked_fill(~states.mask.bool().to(scores.device), float("-inf"))
        return torch.softmax(scores, dim=-1), tokens

    def forward(self, states: BackboneStates) -> torch.Tensor:
        weights, tokens = self.attention(states)
        return self.mlp(torch.einsum("bt,btd->bd", weights, tokens))
