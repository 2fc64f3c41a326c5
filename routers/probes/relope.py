"""ReLope: a LoRA-adapted copy of layer l, a Gaussian bottleneck, then an MLP.

The copy shares the backbone's (frozen) weights; peft adds the LoRA adapter to it. The
adapted last-token state goes to two linear heads, mu and log sigma^2; z = mu + sigma * eps
while training, z = mu otherwise; the MLP reads z. Loss = BCE + beta * KL(N(mu, sigma^2) ||
N(0, I)). Only LoRA, the heads and the MLP train, and only they are saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from routers.backbone import BackboneStates, shared_copy
from routers.probes._base import Probe, ProbeConfigMixin, check_int
from routers.probes.mlp import MLPConfig, MLPHead

__all__ = ["ReLope", "ReLopeConfig"]

_ADAPTER = "relope"


@dataclass(frozen=True)
class ReLopeConfig(ProbeConfigMixin):
    """ReLope hyperparameters. Defaults are starting points to tune on a dev set (the
    paper's exact values are not known; it reports mid-to-late layers beat early ones, AUC
    flattens past a moderate LoRA rank, and a moderate beta is best).

    - ``hidden_size``: the backbone's hidden size d.
    - ``layer``: the adapted layer l. Suggested: about half the model's depth.
    - ``lora_rank``: LoRA rank r. Default 16.
    - ``lora_alpha``: LoRA alpha (scale alpha / r). Default 32.
    - ``lora_dropout``: dropout on the LoRA input. Default 0.0.
    - ``target_modules``: names of the layer's linear modules to adapt (suffix match);
      ``None`` (default) = every linear module of the layer, i.e. its attention and MLP
      projections.
    - ``bottleneck``: size of z. Default 128.
    - ``beta``: weight of the KL term. Default 1e-3.
    - ``mlp``: head on z. Default 5 layers halving from 64: 128 -> 64 -> 32 -> 16 -> 8 -> 1.
    - ``input_norm``: LayerNorm (no affine) on the adapted state before the heads. Default true.
    """

    hidden_size: int
    layer: int
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    bottleneck: int = 128
    beta: float = 1e-3
    mlp: MLPConfig = field(default_factory=lambda: MLPConfig(width=64))
    input_norm: bool = True

    def __post_init__(self) -> None:
        check_int(self.hidden_size, "hidden_size")
        check_int(self.layer, "layer")
        check_int(self.lora_rank, "lora_rank")
        check_int(self.bottleneck, "bottleneck")
        if not self.lora_alpha > 0:
            raise ValueError(f"`lora_alpha` must be > 0, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.beta >= 0:
            raise ValueError(f"`beta` must be >= 0, got {self.beta!r}.")
        if self.target_modules is not None and (
            not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ValueError(f"`target_modules` must be None or non-empty names, got {self.target_modules!r}.")


def _linear_names(layer: nn.Module) -> list[str]:
    return [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]


class ReLope(Probe):
    kind = "relope"
    needs = "layer"

    def __init__(self, config: ReLopeConfig, layer: nn.Module) -> None:
        """``layer`` is the backbone's decoder layer l; it is shared, never modified."""
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__(config)
        targets = list(config.target_modules or _linear_names(layer))
        known = _linear_names(layer)
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in known)]
        if unmatched:
            raise ValueError(
                f"`target_modules` {unmatched} match no linear module of layer {config.layer}; it has {known}."
            )
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            bias="none",
        )
        self.layer_copy = inject_adapter_in_model(lora, shared_copy(layer), adapter_name=_ADAPTER)
        for name, param in self.layer_copy.named_parameters():
            is_lora = "lora_" in name
            param.requires_grad_(is_lora)
            if is_lora:
                param.data = param.data.float()  # adapters train in fp32 over a bf16 base
        d = config.hidden_size
        self.norm = nn.LayerNorm(d, elementwise_affine=False) if config.input_norm else nn.Identity()
        self.mu = nn.Linear(d, config.bottleneck)
        self.logvar = nn.Linear(d, config.bottleneck)
        self.mlp = MLPHead(config.bottleneck, config.mlp)
        device = next(layer.parameters()).device
        for module in (self.norm, self.mu, self.logvar, self.mlp):
            module.to(device)

    def posterior(self, states: BackboneStates) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and log sigma^2 [B, bottleneck] from the adapted last-token state."""
        adapted = states.replay(self.layer_copy)
        x = self.norm(states.last(adapted).float())
        return self.mu(x), self.logvar(x).clamp(-10.0, 10.0)

    def _logits(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        return self.mlp(z)

    def forward(self, states: BackboneStates) -> torch.Tensor:
        return self._logits(*self.posterior(states))

    def loss(self, states: BackboneStates, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.posterior(states)
        logits = self._logits(mu, logvar)
        bce = F.binary_cross_entropy_with_logits(logits, labels.float())
        return bce + self.config.beta * kl_to_standard_normal(mu, logvar).mean(), logits

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Heads, MLP and LoRA weights; never the shared backbone layer."""
        return {
            k: v.detach()
            for k, v in self.state_dict().items()
            if not k.startswith("layer_copy.") or "lora_" in k
        }


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per row."""
    return 0.5 * torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar, dim=-1)
