"""LatentRouter: predict each candidate model's quality before any model answers.

    query features ─► num_query_tokens tokens ─► K capsules (learned seeds attend)
    per model: learned embedding + projected profile ─► capability token
    R rounds:  models read capsules ─► models attend to models (pairwise bias, masked)
               ─► capsules read models (masked)
    head:      μ ∈ (0,1), σ > 0 per model;  μ̃ = clamp(μ + b·tanh(capsule correction), 0, 1)
    decision:  argmax over available models of μ̃ − λ·cost_normalised

Every per-model computation is shared across models and unavailable models are masked as
attention keys, so a model can leave the pool without retraining. The models attend to each
other, so the scores of those that remain shift a little when one is masked: score with the
mask of the pool actually available. :class:`LatentRouterModel` is a plain ``nn.Module``
built from a :class:`LatentRouterConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LatentRouterConfig", "LatentRouterModel", "LatentRouterOutput", "ModelPool", "LatentRouter", "choose"]


@dataclass(frozen=True)
class LatentRouterConfig:
    """What a LatentRouter *is* (saved in ``config.json``, so frozen); defaults are in docs/learned-scorers.md.

    - ``input_dim``: width of the query feature vector the encoder produces.
    - ``num_models``: size of the training pool (one learned embedding per model).
    - ``profile_dim``: width of a model's profile vector (accuracy, per-category accuracy, cost...).
    - ``hidden_size``: width of every token (query, capsule, model). Default 64.
    - ``num_query_tokens``: query feature vector is projected to this many tokens. Default 4.
    - ``num_capsules``: K routing capsules. Default 4.
    - ``num_heads``: attention heads (must divide ``hidden_size``). Default 4.
    - ``rounds``: R rounds of latent communication. Default 2.
    - ``dropout``: dropout in attention outputs and feed-forwards. Default 0.1.
    - ``correction_bound``: b in μ̃ = clamp(μ + b·tanh(c), 0, 1). Default 0.05.
    - ``min_sigma``: floor added to the predicted spread σ. Default 0.01.
    """

    input_dim: int
    num_models: int
    profile_dim: int
    hidden_size: int = 64
    num_query_tokens: int = 4
    num_capsules: int = 4
    num_heads: int = 4
    rounds: int = 2
    dropout: float = 0.1
    correction_bound: float = 0.05
    min_sigma: float = 0.01

    def __post_init__(self) -> None:
        for name in ("input_dim", "num_models", "profile_dim", "hidden_size",
                     "num_query_tokens", "num_capsules", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` should be a positive integer, got {value!r}.")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"`rounds` should be an integer >= 0, got {self.rounds!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) should be divisible by `num_heads`, "
                f"got {self.num_heads}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` should be in [0, 1), got {self.dropout!r}.")
        if not 0.0 <= self.correction_bound <= 1.0:
            raise ValueError(f"`correction_bound` should be in [0, 1], got {self.correction_bound!r}.")
        if not self.min_sigma > 0.0:
            raise ValueError(f"`min_sigma` should be > 0, got {self.min_sigma!r}.")


@dataclass
class LatentRouterOutput:
    """Per-model predictions, each ``(batch, models)``."""

    mu: torch.Tensor
    sigma: torch.Tensor
    correction: torch.Tensor
    mu_tilde: torch.Tensor


class _Attention(nn.Module):
    """Multi-head attention with an additive float mask/bias ``(B, 1|H, Q, K)``."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, nq, h = x.shape
        nk = ctx.shape[1]
        d = h // self.heads
        q = self.q(x).view(b, nq, self.heads, d).transpose(1, 2)
        k, v = self.kv(ctx).view(b, nk, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, nq, h))


class _Block(nn.Module):
    """Pre-norm cross-attention + feed-forward, both residual."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(hidden)
        self.norm_ctx = nn.LayerNorm(hidden)
        self.attn = _Attention(hidden, heads, dropout)
        self.norm_ff = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * hidden, hidden)
        )

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_x(x), self.norm_ctx(ctx), bias)
        return x + self.ff(self.norm_ff(x))


class LatentRouterModel(nn.Module):
    """Query features + model profiles + availability → per-model (μ, σ, μ̃)."""

    def __init__(self, config: LatentRouterConfig) -> None:
        super().__init__()
        self.config = config
        h, heads, p = config.hidden_size, config.num_heads, config.dropout
        # Feature standardisation, fitted on the training split and saved with the weights.
        self.register_buffer("feature_mean", torch.zeros(config.input_dim))
        self.register_buffer("feature_std", torch.ones(config.input_dim))
        self.query_proj = nn.Sequential(
            nn.Dropout(p), nn.Linear(config.input_dim, config.num_query_tokens * h)
        )
        self.query_pos = nn.Parameter(torch.randn(config.num_query_tokens, h) * 0.02)
        self.capsule_seeds = nn.Parameter(torch.randn(config.num_capsules, h) * 0.02)
        self.capsule_read_query = _Block(h, heads, p)
        self.model_embedding = nn.Embedding(config.num_models, h)
        nn.init.normal_(self.model_embedding.weight, std=0.02)
        self.profile_proj = nn.Sequential(nn.Linear(config.profile_dim, h), nn.GELU(), nn.Linear(h, h))
        # Learned pairwise bias between model tokens, one per head.
        self.pair_bias = nn.Parameter(torch.zeros(heads, config.num_models, config.num_models))
        self.models_read_capsules = nn.ModuleList(_Block(h, heads, p) for _ in range(config.rounds))
        self.models_read_models = nn.ModuleList(_Block(h, heads, p) for _ in range(config.rounds))
        self.capsules_read_models = nn.ModuleList(_Block(h, heads, p) for _ in range(config.rounds))
        self.head_norm = nn.LayerNorm(h)
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, 2))
        self.correction_head = nn.Sequential(nn.Linear(2 * h, h), nn.GELU(), nn.Linear(h, 1))

    def forward(
        self,
        features: torch.Tensor,
        profiles: torch.Tensor,
        available: torch.Tensor | None = None,
        model_ids: torch.Tensor | None = None,
    ) -> LatentRouterOutput:
        """Score every model in ``profiles`` for every query.

        ``features`` (B, input_dim); ``profiles`` (M, profile_dim); ``available`` bool
        (M,) or (B, M), default all; ``model_ids`` (M,) indices into the learned model
        embeddings (default ``0..M-1``). Every row of ``available`` needs one ``True``.
        """
        cfg = self.config
        b = features.shape[0]
        m = profiles.shape[0]
        device = features.device
        if model_ids is None:
            model_ids = torch.arange(m, device=device)
        if available is None:
            available = torch.ones(b, m, dtype=torch.bool, device=device)
        elif available.dim() == 1:
            available = available.unsqueeze(0).expand(b, m)
        if not bool(available.any(dim=1).all()):
            raise ValueError("Every query needs at least one available model; a row of `available` is all False.")

        x = (features - self.feature_mean) / self.feature_std
        tokens = self.query_proj(x).view(b, cfg.num_query_tokens, cfg.hidden_size) + self.query_pos
        capsules = self.capsule_read_query(self.capsule_seeds.expand(b, -1, -1), tokens)
        models = (self.model_embedding(model_ids) + self.profile_proj(profiles)).expand(b, -1, -1)

        neg = torch.finfo(features.dtype).min
        key_mask = torch.zeros(b, 1, 1, m, dtype=features.dtype, device=device)
        key_mask = key_mask.masked_fill(~available[:, None, None, :], neg)  # (B,1,1,M)
        pair = self.pair_bias[:, model_ids][:, :, model_ids].unsqueeze(0)  # (1,H,M,M)
        model_bias = pair + key_mask
        for r in range(cfg.rounds):
            models = self.models_read_capsules[r](models, capsules)
            models = self.models_read_models[r](models, models, model_bias)
            capsules = self.capsules_read_models[r](capsules, models, key_mask)

        z = self.head_norm(models)
        raw = self.head(z)
        mu = torch.sigmoid(raw[..., 0])
        sigma = F.softplus(raw[..., 1]) + cfg.min_sigma
        pooled = capsules.mean(dim=1, keepdim=True).expand(-1, m, -1)
        c = self.correction_head(torch.cat([z, pooled], dim=-1)).squeeze(-1)
        correction = cfg.correction_bound * torch.tanh(c)
        mu_tilde = (mu + correction).clamp(0.0, 1.0)
        return LatentRouterOutput(mu=mu, sigma=sigma, correction=correction, mu_tilde=mu_tilde)


def choose(
    mu_tilde: torch.Tensor, cost_normalised: torch.Tensor, lam: float, available: torch.Tensor | None = None
) -> torch.Tensor:
    """Index of the model with the best utility μ̃ − λ·cost per row; unavailable never chosen.

    Ties go to the cheaper model, then the lower index.
    """
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"`lam` should be a finite number >= 0, got {lam!r}.")
    cost = cost_normalised.unsqueeze(0).expand_as(mu_tilde)
    utility = mu_tilde - lam * cost
    if available is not None:
        if available.dim() == 1:
            available = available.unsqueeze(0).expand_as(utility)
        if not bool(available.any(dim=1).all()):
            raise ValueError("Every query needs at least one available model; a row of `available` is all False.")
        utility = utility.masked_fill(~available, -math.inf)
    best = utility.max(dim=1, keepdim=True).values
    tied = utility >= best - 1e-6
    return torch.where(tied, -cost, torch.full_like(cost, -math.inf)).argmax(dim=1)


@dataclass(frozen=True)
class ModelPool:
    """The candidate models a router was trained on, in embedding order (saved in ``config.json``,
    so frozen). Lists given for the sequences (as ``config.json`` holds them) are kept as tuples.

    - ``names``: backend names.
    - ``mean_cost``: mean cost per request on the training split, in the data's units.
    - ``cost_scale``: the largest ``mean_cost``; costs are divided by it, so the most
      expensive training model has normalised cost 1.
    - ``profiles``: one profile vector per model (``profile_fields`` names the entries).
    """

    names: tuple[str, ...]
    mean_cost: tuple[float, ...]
    cost_scale: float
    profiles: tuple[tuple[float, ...], ...]
    profile_fields: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("names", "mean_cost", "profile_fields"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "profiles", tuple(tuple(p) for p in self.profiles))
        m = len(self.names)
        if m < 1 or len(set(self.names)) != m:
            raise ValueError(f"`names` should be non-empty and unique, got {self.names!r}.")
        if len(self.mean_cost) != m or len(self.profiles) != m:
            raise ValueError(
                f"`mean_cost` ({len(self.mean_cost)}) and `profiles` ({len(self.profiles)}) "
                f"should have one entry per model ({m})."
            )
        if not (math.isfinite(self.cost_scale) and self.cost_scale > 0):
            raise ValueError(f"`cost_scale` should be a finite number > 0, got {self.cost_scale!r}.")
        widths = {len(p) for p in self.profiles}
        if widths != {len(self.profile_fields)}:
            raise ValueError(
                f"every profile should have {len(self.profile_fields)} entries (`profile_fields`), got widths {sorted(widths)}."
            )

    @property
    def cost_normalised(self) -> tuple[float, ...]:
        return tuple(c / self.cost_scale for c in self.mean_cost)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"Backend {name!r} is not in the router's pool ({', '.join(self.names)}).") from None

    def mask(self, available: Sequence[str] | None) -> torch.Tensor:
        """Bool ``(M,)``: which pool models are in ``available`` (``None``: all).

        Unknown names raise ``KeyError``; an empty selection raises ``ValueError``.
        """
        if available is None:
            return torch.ones(len(self.names), dtype=torch.bool)
        mask = torch.zeros(len(self.names), dtype=torch.bool)
        for name in available:
            mask[self.index(name)] = True
        if not bool(mask.any()):
            raise ValueError("No model is available: the pool mask is empty.")
        return mask


class LatentRouter:
    """A trained router ready to score: query encoder + :class:`LatentRouterModel` + pool.

    ``predict`` gives per-model (μ, σ, μ̃); ``decide`` picks one backend per request for a
    cost weight λ among the ``available`` backends. Non-finite predictions raise ScorerError.
    """

    def __init__(self, model: LatentRouterModel, encoder: Any, pool: ModelPool, extra: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.encoder = encoder
        self.pool = pool
        self.extra = dict(extra or {})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def profiles_tensor(self) -> torch.Tensor:
        return torch.tensor(self.pool.profiles, dtype=torch.float32, device=self.device)

    def cost_tensor(self) -> torch.Tensor:
        return torch.tensor(self.pool.cost_normalised, dtype=torch.float32, device=self.device)

    @torch.inference_mode()
    def predict_features(self, features: torch.Tensor, available: torch.Tensor | None = None, batch_size: int = 256) -> LatentRouterOutput:
        """Predictions for precomputed encoder features ``(N, input_dim)``."""
        from extproc import ScorerError

        profiles = self.profiles_tensor()
        parts = []
        for start in range(0, features.shape[0], batch_size):
            chunk = features[start : start + batch_size].to(self.device)
            mask = None
            if available is not None:
                mask = available.to(self.device)
                if mask.dim() == 2:
                    mask = mask[start : start + batch_size]
            parts.append(self.model(chunk, profiles, mask))
        out = LatentRouterOutput(*(torch.cat([getattr(p, f) for p in parts]).cpu() for f in ("mu", "sigma", "correction", "mu_tilde")))
        for name in ("mu", "sigma", "mu_tilde"):
            if not bool(torch.isfinite(getattr(out, name)).all()):
                raise ScorerError(f"LatentRouter produced a non-finite `{name}`; the scorer's fallback applies.")
        return out

    def encode(self, conversations: Sequence[Sequence[Any]]) -> torch.Tensor:
        return self.encoder.encode(conversations)

    def predict(self, conversations: Sequence[Sequence[Any]], available: Sequence[str] | None = None) -> LatentRouterOutput:
        """Per-model predictions for chat ``conversations`` (lists of OpenAI messages)."""
        return self.predict_features(self.encode(conversations), self.pool.mask(available))

    def decide_features(self, features: torch.Tensor, lam: float, available: Sequence[str] | None = None) -> list[str]:
        mask = self.pool.mask(available)
        out = self.predict_features(features, mask)
        idx = choose(out.mu_tilde, self.cost_tensor().cpu(), lam, mask)
        return [self.pool.names[i] for i in idx.tolist()]

    def decide(self, conversations: Sequence[Sequence[Any]], lam: float, available: Sequence[str] | None = None) -> list[str]:
        """The backend with the best μ̃ − λ·cost among ``available`` (default: the whole pool)."""
        return self.decide_features(self.encode(conversations), lam, available)
