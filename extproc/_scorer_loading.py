"""Finding the loader of a scorer kind, and loading a :class:`ScorerSpec` into a :class:`Scorer`.

In-process loaders are registered in the ``switchyard.scorers`` entry-point group under the
name each kind declares (``_scorer_kinds``; ``routers`` registers ``probe`` and
``latent_router``), so ``extproc`` stays torch-free and never names ``routers``. A spec with ``remote`` set is served by
:class:`~extproc._remote_scorer.RemoteScorer` and needs no loader.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

from extproc._defaults import ML_INSTALL_HINT
from extproc._errors import CheckpointError, ScorerError
from extproc._scorer_kinds import scorer_kind
from extproc._scorers import ScorerDescription, ScorerLoader, ScorerSpec, Scorer

__all__ = ["ENTRY_POINT_GROUP", "scorer_loader", "describe_scorer", "load_scorer"]

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


def load_scorer(spec: ScorerSpec) -> Scorer:
    """Load ``spec`` (blocking: run it off the event loop). Remote specs connect lazily."""
    if spec.remote is not None:
        from extproc._remote_scorer import RemoteScorer

        return RemoteScorer(spec)
    try:
        return scorer_loader(spec.kind).load(spec)
    except (CheckpointError, ScorerError):
        raise
    except Exception as exc:  # noqa: BLE001 - a loader's library error, wrapped with the scorer's name
        raise ScorerError(f"Scorer {spec.name!r} failed to load: {type(exc).__name__}: {exc}") from exc
