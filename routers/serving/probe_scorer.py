"""The in-process probe scorer: named probes read from one shared backbone prefill.

``Scores.values`` maps each output name (the ``checkpoints`` key in the policy) to
P(small model answers correctly). The backbone prefill is batched and shared with the other
scorers on the same backbone (:mod:`routers.serving.prefill`).
"""

from __future__ import annotations

from extproc import RoutingRequest, Scorer, ScorerError, ScorerSpec, Scores
from routers.serving.batcher import scorer_error
from routers.serving.prefill import BATCH_SIZE, PrefillGroup, ProbeMember, release_group

__all__ = ["ProbeSetScorer"]


class ProbeSetScorer(Scorer):
    """One ``kind: probe`` scorer: its probes are one member of a :class:`PrefillGroup`."""

    def __init__(self, spec: ScorerSpec, group: PrefillGroup, member: ProbeMember) -> None:
        self.spec = spec
        self.group = group
        self.member = member
        self._closed = False

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.member.probes)

    async def score(self, request: RoutingRequest, *, deadline: float, available=None) -> Scores:
        if self._closed:
            raise ScorerError(f"Scorer {self.spec.name!r} is closed.")
        try:
            row = await self.group.prefill(request, deadline, self.member)
        except ScorerError as exc:  # an overload stays an overload: the policy tells them apart
            raise scorer_error(exc, self.spec.name) from exc
        values = row[self.member.key]
        if isinstance(values, ScorerError):
            raise scorer_error(values, self.spec.name)
        return Scores(values=dict(values), batch_size=int(row[BATCH_SIZE]))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await release_group(self.group, self.member)
