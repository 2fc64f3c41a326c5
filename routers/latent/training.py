"""Training a LatentRouter on a labelled routing set.

The query encoder is frozen: features are computed once, then the router trains on them.
Losses (weights in :class:`LatentTrainConfig`):

- Gaussian NLL of the observed quality under N(μ, σ²);
- pairwise ranking: logistic loss on μ̃_i − μ̃_j for every pair of available models on the
  same query where model i did better, weighted by the quality gap;
- listwise: cross-entropy between softmax(quality/τ) and softmax(μ̃/τ) over available models;
- correction: mean (correction / b)², keeping the capsule correction small.

Each batch hides a random subset of models (``pool_dropout``) so the router learns to score
any sub-pool. Early stopping watches the validation utility: realised quality − λ·cost of
the chosen model, averaged over ``val_lambdas``, smoothed over the last ``smoothing``
epochs (:class:`EarlyStopping`), so one lucky epoch neither wins nor ends training: an
epoch counts as better only when the smoothed utility beats the best by ``min_delta``,
training stops after ``patience`` epochs without one, and the best epoch's weights are
restored. Training is seeded (``seed``, default 0). Without a validation set,
``val_fraction`` of the training set is held out (:func:`routers.data.holdout_split`, the
same split the probes use). Requests whose outcome for a pool model failed are skipped.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from routers.config_options import option
from routers.data import DataError, LabelledRequest, holdout_split, val_fraction_option, without_failed
from routers.latent.router import LatentRouter, LatentRouterConfig, LatentRouterModel, ModelPool, choose

__all__ = [
    "LatentTrainConfig",
    "EarlyStopping",
    "outcome_matrix",
    "build_pool",
    "train_latent_router",
    "realised_utility",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentTrainConfig:
    """How a LatentRouter is trained (saved in ``config.json`` under ``training.config``).
    Each field's help is in its metadata; ``switchyard train latent-router`` has one flag
    per field, with the default given here."""

    epochs: int = option(60, "Passes over the training set.")
    batch_size: int = option(64, "Queries per step.")
    lr: float = option(1e-3, "AdamW learning rate.")
    weight_decay: float = option(1e-2, "AdamW weight decay.")
    patience: int = option(10, "Epochs without a better (smoothed) validation utility before stopping.")
    min_delta: float = option(1e-3, "Least rise of the smoothed validation utility that counts as better.")
    smoothing: int = option(3, "Epochs the validation utility is averaged over for early stopping (1: none).")
    seed: int = option(0, "Seeds the split, initialisation, batch order and pool dropout.")
    val_fraction: float = val_fraction_option()
    nll_weight: float = option(1.0, "Weight of the Gaussian NLL of the observed quality.")
    rank_weight: float = option(0.5, "Weight of the pairwise ranking loss.")
    listwise_weight: float = option(0.5, "Weight of the listwise cross-entropy.")
    correction_weight: float = option(0.01, "Weight of the (correction / bound)^2 penalty.")
    temperature: float = option(0.1, "Temperature of the ranking and listwise losses.")
    pool_dropout: float = option(0.2, "Probability that a training query hides each model (one always stays).")
    num_categories: int = option(4, "Query clusters for the per-category accuracy profiles.")
    val_lambdas: tuple[float, ...] = option(
        (0.0, 0.05, 0.1, 0.2, 0.5, 1.0), "Cost weights the validation utility is averaged over."
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_categories", "smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` should be a positive integer, got {value!r}.")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"`patience` should be an integer >= 0, got {self.patience!r}.")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` should be a number > 0, got {value!r}.")
        for name in ("weight_decay", "nll_weight", "rank_weight", "listwise_weight", "correction_weight", "min_delta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` should be a number >= 0, got {value!r}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"`val_fraction` should be in [0, 1), got {self.val_fraction!r}.")
        if not 0.0 <= self.pool_dropout < 1.0:
            raise ValueError(f"`pool_dropout` should be in [0, 1), got {self.pool_dropout!r}.")
        object.__setattr__(self, "val_lambdas", tuple(float(x) for x in self.val_lambdas))
        if not self.val_lambdas or any(not math.isfinite(x) or x < 0 for x in self.val_lambdas):
            raise ValueError(f"`val_lambdas` should be non-empty numbers >= 0, got {self.val_lambdas!r}.")


def outcome_matrix(requests: Sequence[LabelledRequest], names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quality, cost)``, each ``(N, M)``; DataError naming the request if one is missing."""
    quality = torch.zeros(len(requests), len(names))
    cost = torch.zeros(len(requests), len(names))
    for i, request in enumerate(requests):
        for j, name in enumerate(names):
            outcome = request.outcome(name)
            if outcome.cost is None:
                raise DataError(f"Request {request.id!r}: backend {name!r} has no `cost`; LatentRouter needs it.")
            quality[i, j] = float(outcome.quality)
            cost[i, j] = outcome.cost
    return quality, cost


def _kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25) -> torch.Tensor:
    """Cluster labels of the rows of ``x`` (deterministic for a seed)."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, x.shape[0])
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(x, centroids).argmin(dim=1)
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centroids[c] = members.mean(dim=0)
    return labels


def build_pool(
    names: Sequence[str],
    features: torch.Tensor,
    quality: torch.Tensor,
    cost: torch.Tensor,
    num_categories: int = 4,
    sizes: Mapping[str, float] | None = None,
    seed: int = 0,
) -> ModelPool:
    """Profiles from the training split: accuracy overall and per query cluster, normalised
    cost, a latency proxy (log-cost normalised; the data has no latencies) and size if known.

    Query "categories" are k-means clusters of the standardised query features.
    """
    sizes = dict(sizes or {})
    unknown = set(sizes) - set(names)
    if unknown:
        raise DataError(f"Model sizes given for backends not in the pool: {', '.join(sorted(unknown))}.")
    mean_cost = cost.mean(dim=0)
    scale = float(mean_cost.max())
    if not scale > 0:
        scale = 1.0
    log_cost = torch.log(mean_cost.clamp_min(1e-12))
    span = float(log_cost.max() - log_cost.min())
    latency = (log_cost - log_cost.min()) / span if span > 0 else torch.zeros_like(log_cost)
    z = (features - features.mean(0)) / features.std(0).clamp_min(1e-6) if features.shape[0] > 1 else features
    labels = _kmeans(z, num_categories, seed)
    accuracy = quality.mean(dim=0)
    per_cat = []
    for c in range(num_categories):
        members = quality[labels == c]
        n = members.shape[0]
        # shrink small clusters toward the overall accuracy
        per_cat.append((members.sum(0) + 5.0 * accuracy) / (n + 5.0))
    max_size = max(sizes.values(), default=0.0)
    profiles = []
    for j, name in enumerate(names):
        size = sizes.get(name)
        size_norm = math.log1p(size) / math.log1p(max_size) if size is not None and max_size > 0 else 0.0
        profiles.append(
            [float(accuracy[j])]
            + [float(p[j]) for p in per_cat]
            + [float(mean_cost[j]) / scale, float(latency[j]), size_norm, float(size is not None)]
        )
    fields = (
        ["accuracy"]
        + [f"accuracy_cluster_{c}" for c in range(num_categories)]
        + ["cost_normalised", "latency_proxy", "size_normalised", "size_known"]
    )
    return ModelPool(
        names=list(names),
        mean_cost=[float(c) for c in mean_cost],
        cost_scale=scale,
        profiles=profiles,
        profile_fields=fields,
    )


def realised_utility(
    mu_tilde: torch.Tensor, quality: torch.Tensor, cost_norm_rows: torch.Tensor, cost_norm_pool: torch.Tensor,
    lambdas: Sequence[float], available: torch.Tensor | None = None,
) -> float:
    """Mean over λ of mean (quality − λ·cost) of the model chosen for each query."""
    total = 0.0
    rows = torch.arange(quality.shape[0])
    for lam in lambdas:
        idx = choose(mu_tilde, cost_norm_pool, lam, available)
        total += float((quality[rows, idx] - lam * cost_norm_rows[rows, idx]).mean())
    return total / len(lambdas)


def _losses(out: Any, y: torch.Tensor, avail: torch.Tensor, cfg: LatentTrainConfig, bound: float) -> dict[str, torch.Tensor]:
    a = avail.float()
    n_avail = a.sum().clamp_min(1.0)
    var = out.sigma**2
    nll = 0.5 * (torch.log(var) + (y - out.mu) ** 2 / var)
    losses = {"nll": (nll * a).sum() / n_avail}
    d_pred = out.mu_tilde.unsqueeze(2) - out.mu_tilde.unsqueeze(1)  # (B,M,M): i - j
    d_true = y.unsqueeze(2) - y.unsqueeze(1)
    pair = (d_true > 1e-6) & avail.unsqueeze(2) & avail.unsqueeze(1)
    rank = F.softplus(-d_pred / cfg.temperature) * d_true.clamp_min(0.0)
    losses["rank"] = (rank * pair).sum() / pair.sum().clamp_min(1)
    neg = -1e4
    target = torch.softmax((y / cfg.temperature).masked_fill(~avail, neg), dim=1)
    logp = torch.log_softmax((out.mu_tilde / cfg.temperature).masked_fill(~avail, neg), dim=1)
    losses["listwise"] = -(target * logp * a).sum(1).mean()
    scaled = out.correction / bound if bound > 0 else out.correction
    losses["correction"] = (scaled**2 * a).sum() / n_avail
    losses["total"] = (
        cfg.nll_weight * losses["nll"]
        + cfg.rank_weight * losses["rank"]
        + cfg.listwise_weight * losses["listwise"]
        + cfg.correction_weight * losses["correction"]
    )
    return losses


def _random_availability(b: int, m: int, p: float, g: torch.Generator) -> torch.Tensor:
    avail = torch.rand(b, m, generator=g) >= p
    empty = ~avail.any(dim=1)
    if bool(empty.any()):
        keep = torch.randint(0, m, (int(empty.sum()),), generator=g)
        avail[empty.nonzero().squeeze(1), keep] = True
    return avail


class EarlyStopping:
    """Which epoch to keep and when to stop, on a noisy validation metric (higher is better).

    The metric is averaged over the last ``smoothing`` epochs; an epoch is *better* when that
    average beats the best so far by more than ``min_delta``; :meth:`update` says to stop
    after ``patience`` epochs in a row without a better one (never with ``patience`` 0).
    """

    def __init__(self, patience: int, min_delta: float = 0.0, smoothing: int = 1) -> None:
        self.patience, self.min_delta, self.smoothing = patience, min_delta, smoothing
        self.values: list[float] = []
        self.best = -math.inf
        self.best_epoch: int | None = None
        self.stale = 0

    def smoothed(self) -> float:
        window = self.values[-self.smoothing :]
        return sum(window) / len(window)

    def update(self, epoch: int, value: float) -> tuple[bool, bool]:
        """Record ``epoch``'s metric; ``(better, stop)``."""
        self.values.append(value)
        score = self.smoothed()
        if score > self.best + self.min_delta or self.best_epoch is None:
            self.best, self.best_epoch, self.stale = score, epoch, 0
            return True, False
        self.stale += 1
        return False, bool(self.patience) and self.stale >= self.patience


@dataclass
class TrainResult:
    """The trained router and its training history (one dict per epoch)."""

    router: LatentRouter
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_utility: float = float("nan")
    #: ids of the held-out validation requests (``train latent-router`` writes them to
    #: ``validation.jsonl``); empty when ``val`` was given or nothing was held out.
    validation_ids: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def train_latent_router(
    train: Sequence[LabelledRequest],
    encoder: Any,
    model_overrides: Mapping[str, Any] | None = None,
    config: LatentTrainConfig | None = None,
    val: Sequence[LabelledRequest] | None = None,
    names: Sequence[str] | None = None,
    sizes: Mapping[str, float] | None = None,
    progress: bool = True,
    train_features: torch.Tensor | None = None,
    val_features: torch.Tensor | None = None,
) -> TrainResult:
    """Train a router on ``train`` (validation: ``val``, else a ``val_fraction`` split).

    ``names`` fixes the pool (default: the first request's backends, in order); every request
    needs an outcome with a cost for each. ``model_overrides`` sets
    :class:`LatentRouterConfig` fields. Precomputed features may be passed to skip encoding.
    """
    from tqdm.auto import tqdm

    cfg = config or LatentTrainConfig()
    seed_everything(cfg.seed)
    if not train:
        raise DataError("The training set is empty.")
    names = list(names or train[0].outcomes)
    if train_features is None:  # precomputed features are row-aligned: the caller filtered
        train = without_failed(train, names, "train on")
        if not train:
            raise DataError("No training request is left once those whose outcome failed are skipped.")
    if val and val_features is None:
        val = without_failed(val, names, "validate on")
    if train_features is None:
        log.info("Encoding %d training queries with the %s encoder.", len(train), encoder.spec.kind)
        train_features = encoder.encode([r.messages for r in train], progress=progress)
    quality, cost = outcome_matrix(train, names)

    held_ids: list[str] = []
    if val:
        if val_features is None:
            val_features = encoder.encode([r.messages for r in val], progress=progress)
        vq, vc = outcome_matrix(val, names)
        vx = val_features
        tx, tq, tc = train_features, quality, cost
        validation: dict[str, Any] = {"source": "given", "fraction": None}
    else:
        kept, held = holdout_split([r.id for r in train], cfg.val_fraction, cfg.seed)
        held_ids = [train[i].id for i in held]
        if held:
            tr_idx, val_idx = torch.tensor(kept), torch.tensor(held)
            vx, vq, vc = train_features[val_idx], quality[val_idx], cost[val_idx]
            tx, tq, tc = train_features[tr_idx], quality[tr_idx], cost[tr_idx]
            validation = {"source": "held_out", "fraction": cfg.val_fraction}
        else:
            log.warning("No validation set: training %d epochs without early stopping.", cfg.epochs)
            vx = vq = vc = None
            tx, tq, tc = train_features, quality, cost
            validation = {"source": "none", "fraction": 0.0}
    validation.update(n_train=int(tx.shape[0]), n_val=0 if vx is None else int(vx.shape[0]))

    pool = build_pool(names, tx, tq, tc, cfg.num_categories, sizes, cfg.seed)
    overrides = dict(model_overrides or {})
    model_cfg = LatentRouterConfig(
        input_dim=int(tx.shape[1]), num_models=len(names), profile_dim=len(pool.profile_fields), **overrides
    )
    model = LatentRouterModel(model_cfg)
    model.feature_mean.copy_(tx.mean(0))
    std = tx.std(0) if tx.shape[0] > 1 else torch.ones(tx.shape[1])
    model.feature_std.copy_(std.clamp_min(1e-3 + 0.1 * float(std.mean())))
    router = LatentRouter(model, encoder, pool)
    profiles = router.profiles_tensor()
    cost_pool = router.cost_tensor()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult(router=router, validation_ids=held_ids)
    best_state, best_score = None, -math.inf
    stopping = EarlyStopping(cfg.patience if vx is not None else 0, cfg.min_delta, cfg.smoothing)
    bar = tqdm(range(cfg.epochs), desc="latent-router", disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        perm = torch.randperm(tx.shape[0], generator=g)
        totals: dict[str, float] = {}
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            avail = _random_availability(len(idx), len(names), cfg.pool_dropout, g)
            out = model(tx[idx], profiles, avail)
            losses = _losses(out, tq[idx], avail, cfg, model_cfg.correction_bound)
            opt.zero_grad()
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) * len(idx)
        row = {k: v / tx.shape[0] for k, v in totals.items()}
        row["epoch"] = epoch
        model.eval()
        score_x, score_q, score_c = (vx, vq, vc) if vx is not None else (tx, tq, tc)
        with torch.no_grad():
            mt = model(score_x, profiles).mu_tilde
        row["val_utility"] = realised_utility(mt, score_q, score_c / pool.cost_scale, cost_pool, cfg.val_lambdas)
        result.history.append(row)
        bar.set_postfix(loss=f"{row['total']:.3f}", val_utility=f"{row['val_utility']:.4f}")
        log.info("epoch %d/%d: train loss %.4f, val utility %.4f", epoch + 1, cfg.epochs, row["total"], row["val_utility"])
        better, stop = stopping.update(epoch, row["val_utility"])
        if better:
            best_score = row["val_utility"]
            best_state = copy.deepcopy(model.state_dict())
            result.best_epoch = epoch
        if stop:
            log.info("Early stop at epoch %d (best %d).", epoch, result.best_epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.best_val_utility = best_score
    router.extra = {
        "config": asdict(cfg),
        "validation": validation,
        "best_epoch": result.best_epoch,
        "best_val_utility": best_score,
    }
    return result
