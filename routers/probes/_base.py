"""What every probe shares: config plumbing, the loss, and the saved state."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from routers.backbone import BackboneStates
from routers.probes.mlp import MLPConfig

__all__ = ["Probe", "ProbeConfigMixin", "FrozenProbeConfig", "check_int", "output_layers", "reads_output"]


def check_int(value: Any, name: str, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")


class ProbeConfigMixin:
    """``to_dict`` / ``from_dict`` for probe config dataclasses with a nested ``mlp``."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} field(s): {', '.join(unknown)}.")
        values = dict(data)
        if isinstance(values.get("mlp"), dict):
            values["mlp"] = MLPConfig(**values["mlp"])
        for key, value in values.items():
            if isinstance(value, list):
                values[key] = tuple(value)
        return cls(**values)


@dataclass(frozen=True)
class FrozenProbeConfig(ProbeConfigMixin):
    """Fields of the probes that read a frozen backbone's states (last-token, Attention).

    - ``hidden_size``: the backbone's hidden size d.
    - ``layer``: probe layer l (1-based).
    - ``mlp``: the head (default 5 layers, 256 -> 128 -> 64 -> 32 -> 1).
    - ``input_norm``: LayerNorm (no affine) on the states before the head, so the probe
      does not depend on the layer's activation scale. Default true.
    """

    hidden_size: int
    layer: int
    mlp: MLPConfig = field(default_factory=MLPConfig)
    input_norm: bool = True

    def __post_init__(self) -> None:
        check_int(self.hidden_size, "hidden_size")
        check_int(self.layer, "layer")


def reads_output(needs: str) -> bool:
    """Whether a probe that ``needs`` these states reads its layer's output (``"last"``), or
    only what enters the layer (``"tokens"``, ``"layer"``)."""
    return needs == "last"


def output_layers(probes: Iterable[Probe]) -> frozenset[int]:
    """The layers whose output some of ``probes`` read; of the other layers they read, only
    what enters the layer is needed, so the backbone need not run it."""
    return frozenset(probe.layer for probe in probes if probe.reads_output)


class Probe(nn.Module):
    """States of one backbone layer in, one logit of P(small model correct) per row out.

    ``needs`` says which states training can cache: ``"last"`` (last-token state of layer
    l), ``"tokens"`` (all token states of layer l-1) or ``"layer"`` (layer l-1 plus the call
    that ran layer l, to re-run it).
    """

    kind: ClassVar[str]
    needs: ClassVar[str]

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def layer(self) -> int:
        return int(self.config.layer)

    @property
    def reads_output(self) -> bool:
        """Whether it reads what leaves its layer; if not, the backbone need not run that layer."""
        return reads_output(self.needs)

    def loss(self, states: BackboneStates, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and logits; plain binary cross-entropy unless a probe adds terms."""
        logits = self(states)
        return F.binary_cross_entropy_with_logits(logits, labels.float()), logits

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores (everything this probe trains)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`saved_state` returned; raises ``ValueError`` listing bad keys."""
        expected = set(self.saved_state())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"Probe weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}.")
        own = self.state_dict()
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(f"Probe weight {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}.")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)
