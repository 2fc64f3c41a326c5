"""The in-process LatentRouter scorer: per-model predicted quality and normalised cost.

``Scores.values`` maps every pool model to its predicted quality μ̃ and ``Scores.costs`` to
its normalised cost, so the engine computes utility = μ̃ − λ·cost. With a ``backbone``
encoder the query features come from the shared backbone prefill
(:mod:`routers.serving.prefill`); the small LatentRouter model then runs in this scorer's
own micro-batch. Other encoders (``text``, ``hashing``) run inside that micro-batch.

Availability matters: models attend to each other, so a model's μ̃ changes when another
model is masked out. ``score(..., available=[pool models])`` masks the unavailable ones as
the router was designed to; without it every pool model counts as available.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from extproc import RoutingRequest, Scorer, ScorerError, ScorerSpec, Scores
from routers.serving.batcher import MicroBatcher, scorer_error
from routers.serving.prefill import BATCH_SIZE, PooledMember, PrefillGroup, release_group

__all__ = ["LatentScorer"]


class LatentScorer(Scorer):
    """One ``kind: latent_router`` scorer around a loaded :class:`routers.LatentRouter`."""

    def __init__(
        self,
        spec: ScorerSpec,
        router: Any,
        group: PrefillGroup | None = None,
        member: PooledMember | None = None,
    ) -> None:
        self.spec = spec
        self.router = router
        self.group = group
        self.member = member
        self.pool = tuple(router.pool.names)
        self.costs = dict(zip(self.pool, (float(c) for c in router.pool.cost_normalised)))
        self._profiles = router.profiles_tensor()
        self.batcher = MicroBatcher(self._forward, spec.batch, name=f"scorer {spec.name!r}")
        self._closed = False

    def _mask(self, available: Collection[str] | None) -> tuple[bool, ...]:
        if available is None:
            return (True,) * len(self.pool)
        unknown = sorted(set(available) - set(self.pool))
        if unknown:
            raise ScorerError(f"Scorer {self.spec.name!r} has no pool model {', '.join(map(repr, unknown))}.")
        mask = tuple(name in available for name in self.pool)
        if not any(mask):
            raise ScorerError(f"Scorer {self.spec.name!r}: no pool model is available for this request.")
        return mask

    async def score(
        self, request: RoutingRequest, *, deadline: float, available: Collection[str] | None = None
    ) -> Scores:
        """Predicted quality of every available pool model. ``available`` (pool model names,
        default all) are the models this request may go to: the others are masked out of the
        router's attention and get no value."""
        if self._closed:
            raise ScorerError(f"Scorer {self.spec.name!r} is closed.")
        mask = self._mask(available)
        pooled = None
        prefill_batch = 0
        try:
            if self.group is not None:
                row = await self.group.prefill(request, deadline, self.member)
                pooled = row[self.member.key]
                if isinstance(pooled, ScorerError):
                    raise pooled
                prefill_batch = int(row[BATCH_SIZE])
            values, batch = await self.batcher.run((request.messages, pooled, mask), deadline)
        except ScorerError as exc:  # an overload stays an overload: the policy tells them apart
            raise scorer_error(exc, self.spec.name) from exc
        return Scores(values=values, costs=self.costs, batch_size=prefill_batch or batch)

    def _forward(self, items: list[tuple[Sequence[Mapping[str, Any]], Any, tuple[bool, ...]]]) -> list[Any]:
        import torch

        from routers.query_encoders import side_features

        n = len(items)
        features: list[Any] = [None] * n
        need = [i for i, (_, pooled, _) in enumerate(items) if pooled is None]
        if need:
            encoded = self.router.encoder.encode([list(items[i][0]) for i in need])
            for j, i in enumerate(need):
                features[i] = encoded[j]
        for i, (messages, pooled, _) in enumerate(items):
            if pooled is not None:  # the backbone encoder's features: pooled states + side features
                features[i] = torch.cat([pooled.float(), torch.tensor(side_features(messages), dtype=torch.float32)])
        device = self.router.device
        x = torch.stack(features).to(device)
        available = torch.tensor([mask for _, _, mask in items], dtype=torch.bool, device=device)
        with torch.inference_mode():
            out = self.router.model(x, self._profiles, available)
        mu = out.mu_tilde.float().cpu().tolist()
        results: list[Any] = []
        for row, (_, _, mask) in zip(mu, items):
            if all(math.isfinite(v) for v, keep in zip(row, mask) if keep):
                results.append(({name: v for name, v, keep in zip(self.pool, row, mask) if keep}, n))
            else:
                results.append(ScorerError("LatentRouter predicted a NaN or infinite quality for this request."))
        return results

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.batcher.close()
        if self.group is not None:
            await release_group(self.group, self.member)
