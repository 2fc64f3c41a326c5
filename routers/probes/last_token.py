"""Last-token probe: an MLP on the last prompt token's state at layer l."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from routers.backbone import BackboneStates
from routers.mlp import MLPConfig, MLPHead
from routers.probes._base import Probe, ProbeConfigMixin, check_int

__all__ = ["LastTokenProbe", "LastTokenProbeConfig"]


@dataclass(frozen=True)
class LastTokenProbeConfig(ProbeConfigMixin):
    """- ``hidden_size``: the backbone's hidden size d.
    - ``layer``: probe layer l (1-based; the state *leaving* layer l is read).
    - ``mlp``: the head (default 5 layers, 256 -> 128 -> 64 -> 32 -> 1).
    - ``input_norm``: normalise the state (LayerNorm, no affine) before the MLP, so the
      probe does not depend on the layer's activation scale. Default true.
    """

    hidden_size: int
    layer: int
    mlp: MLPConfig = field(default_factory=MLPConfig)
    input_norm: bool = True

    def __post_init__(self) -> None:
        check_int(self.hidden_size, "hidden_size")
        check_int(self.layer, "layer")


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
