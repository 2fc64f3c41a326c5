"""Loading a scorer to serve: in process through its kind's registered loader, or the gRPC
client of a remote scorer server (which needs no loader, and is what brings grpc in).
"""

from __future__ import annotations

from extproc._errors import CheckpointError, ScorerError
from extproc.scorers._interface import Scorer, ScorerSpec
from extproc.scorers._loaders import scorer_loader

__all__ = ["load_scorer"]


def load_scorer(spec: ScorerSpec) -> Scorer:
    """Load ``spec`` (blocking: run it off the event loop). Remote specs connect lazily."""
    if spec.remote is not None:
        from extproc.scoring._remote import RemoteScorer

        return RemoteScorer(spec)
    try:
        return scorer_loader(spec.kind).load(spec)
    except (CheckpointError, ScorerError):
        raise
    except Exception as exc:  # noqa: BLE001 - a loader's library error, wrapped with the scorer's name
        raise ScorerError(f"Scorer {spec.name!r} failed to load: {type(exc).__name__}: {exc}") from exc
