"""Finding the loader of a scorer kind, and describing a :class:`ScorerSpec`'s checkpoints
through it (outputs, backbones, thresholds) without torch.

In-process loaders are registered in the ``switchyard.scorers`` entry-point group under the
name each kind declares (``extproc.scorers._kinds``; ``routers`` registers ``probe`` and
``latent_router``), so ``extproc`` stays torch-free and never names ``routers``. Loading a
spec to serve is :func:`extproc.scoring._loading.load_scorer`.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

from extproc._defaults import ML_INSTALL_HINT
from extproc._errors import ScorerError
from extproc.scorers._kinds import scorer_kind
from extproc.scorers._interface import ScorerDescription, ScorerLoader, ScorerSpec

__all__ = ["ENTRY_POINT_GROUP", "scorer_loader", "describe_scorer"]

#: The entry-point group in-process scorer loaders register under, by kind.
ENTRY_POINT_GROUP = "switchyard.scorers"


@lru_cache(maxsize=None)
def scorer_loader(kind: str) -> ScorerLoader:
    """The loader registered under ``kind``'s declared entry point; :class:`ScorerError` naming
    the supported kinds, or saying how to get the loader."""
    entry_point = scorer_kind(kind).entry_point
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == entry_point]
    if not found:
        raise ScorerError(f"No in-process loader for scorer kind {kind!r} is installed; {ML_INSTALL_HINT}.")
    try:
        return found[0].load()
    except ImportError as exc:
        raise ScorerError(f"Cannot load the {kind!r} scorer runtime ({exc}); {ML_INSTALL_HINT}.") from exc


def describe_scorer(spec: ScorerSpec) -> ScorerDescription:
    """What the spec's checkpoints say (outputs, backbones, thresholds, pool); no torch."""
    return scorer_loader(spec.kind).describe(spec)
