"""Last-token probe: an MLP on the last prompt token's state at layer l."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from routers.backbone import BackboneStates
from routers.probes._base import FrozenProbeConfig, Probe
from routers.probes.mlp import MLPHead

__all__ = ["LastTokenProbe", "LastTokenProbeConfig"]


@dataclass(frozen=True)
class LastTokenProbeConfig(FrozenProbeConfig):
    """:class:`FrozenProbeConfig`; the state *leaving* layer l is read."""


class LastTokenProbe(Probe):
    kind = "last_token"
    needs = "last"

    def __init__(self, config: LastTokenProbeConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.norm = nn.LayerNorm(d, elementwise_affine=False) if config.input_norm else nn.Identity()
        self.mlp = MLPHead(d, config.mlp)

    def forward(self, states: BackboneStates) -> torch.Tensor:
        return self.mlp(self.norm(states.last().float()))
