"""The MLP head shared by the three probes: features in, one logit out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MLPConfig", "MLPHead"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class MLPConfig:
    """Shape of a probe's MLP head.

    depth: number of linear layers, output layer included (1 = a linear probe). Default 5,
        the ReLope paper's 5-layer MLP.
    width: width of the first hidden layer; each further hidden layer halves it (never
        below ``min_width``). Default 256: 256 -> 128 -> 64 -> 32 -> 1.
    min_width: floor for the halving. Default 8.
    dropout: dropout after each hidden activation (training only). Default 0.1.
    activation: one of gelu, relu, silu, tanh. Default gelu.
    """

    depth: int = 5
    width: int = 256
    min_width: int = 8
    dropout: float = 0.1
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"`depth` must be an integer >= 1, got {self.depth!r}.")
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"`width` must be an integer >= 1, got {self.width!r}.")
        if not isinstance(self.min_width, int) or self.min_width < 1:
            raise ValueError(f"`min_width` must be an integer >= 1, got {self.min_width!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        if self.activation not in _ACTIVATIONS:
            supported = ", ".join(sorted(_ACTIVATIONS))
            raise ValueError(f"`activation` must be one of {supported}, got {self.activation!r}.")

    def hidden_widths(self) -> list[int]:
        return [max(self.width >> i, self.min_width) for i in range(self.depth - 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLPHead(nn.Module):
    """``depth`` linear layers halving in width, ending in one logit per row."""

    def __init__(self, in_features: int, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = in_features
        for hidden in config.hidden_widths():
            layers += [nn.Linear(width, hidden), _ACTIVATIONS[config.activation]()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)
