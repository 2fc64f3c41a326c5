"""The in-process LatentRouter scorer: per-model predicted quality and normalised cost.

``Scores.values`` maps every pool model to its predicted quality μ̃ and ``Scores.costs`` to
its normalised cost, so the engine computes utility = μ̃ − λ·cost. With a ``backbone``
encoder the query features come from the shared backbone prefill
(:mod:`routers.serving.prefill`); the small LatentRouter model then runs in this scorer's
own micro-batch. Other encoders (``text``, ``hashing``) run inside that micro-batch. A
``text`` encoder's batch is cut like the probes' prefill: into the forwards its forward cost
predicts cheapest (:meth:`routers.latent.encoders.TextEncoder.encode_planned`), from the cost
measured when the encoder is loaded and refitted from every forward that runs
(:class:`~routers.forward_cost.LiveCost`); the same cost predicts a request's wait for
admission (:class:`~extproc.ScorerOverloaded` at once when it cannot be answered in time).

Availability matters: models attend to each other, so a model's μ̃ changes when another
model is masked out. ``score(..., available=[pool models])`` masks the unavailable ones as
the router was designed to; without it every pool model counts as available.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from extproc import RoutingRequest, Scorer, ScorerError, ScorerSpec, Scores
from routers.forward_cost import LiveCost
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
        # the text encoder's forward cost, measured here at load (None: hashing, or features
        # from the shared prefill, whose group plans by the backbone's cost)
        measured = router.encoder.forward_cost if group is None else None
        self.live_cost = None if measured is None else LiveCost(measured)
        self.batcher = MicroBatcher(
            self._forward, spec.batch, name=f"scorer {spec.name!r}",
            cost=None if self.live_cost is None else self._batch_seconds,
        )
        self._closed = False

    def _batch_seconds(self, requests: int) -> float:
        """Predicted seconds of one forward of ``requests`` prompts (for admission)."""
        return self.live_cost.batch_seconds(requests)

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

        from routers.latent.encoders import side_features

        n = len(items)
        features: list[Any] = [None] * n
        need = [i for i, (_, pooled, _) in enumerate(items) if pooled is None]
        if need:
            conversations = [list(items[i][0]) for i in need]
            if self.live_cost is None:
                encoded = self.router.encoder.encode(conversations)
            else:  # cut by the live cost, which learns from each forward
                live = self.live_cost
                encoded = self.router.encoder.encode_planned(conversations, live.current, live.observe)
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
