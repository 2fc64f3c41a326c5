"""The server's loaded scorers, kept across policy reloads.

A reload that keeps a scorer's config (:meth:`ScorerSpec.load_key`) reuses the loaded model;
a changed one (another checkpoint, or the same folder with new files) loads beside the
running one, and the policy swaps only when every new scorer has loaded. One that fails to
load rejects the whole new policy: the scorers loaded for it are closed and the running
policy and its scorers stay. Scorers the new policy no longer uses are retired: closed after
a grace period, since requests that started on the old policy may still be scoring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from extproc._errors import CheckpointError, PolicyError, PolicyProblem, ScorerError, scorer_message
from extproc.engine._engine import PolicyEngine
from extproc.policy._model import Policy
from extproc.scoring._loading import load_scorer
from extproc.scorers._interface import Scorer

__all__ = ["ScorerCache", "RETIRE_AFTER_S", "retire", "loaded_engine"]

log = logging.getLogger("switchyard.scorers")

#: Seconds a scorer the running policy stopped using stays open for requests still using it.
RETIRE_AFTER_S = 30.0


class ScorerCache:
    """Loaded scorers by load key; :meth:`prepare` for a policy, then :meth:`commit` it."""

    def __init__(self) -> None:
        self._active: dict[tuple, Scorer] = {}

    def prepare(self, policy: Policy) -> dict[str, Scorer]:
        """The scorers of ``policy`` by name, loading those not loaded yet (blocking: call it
        off the event loop). Raises :class:`PolicyError` located at the scorer that failed."""
        out: dict[str, Scorer] = {}
        fresh: list[Scorer] = []
        loaded = dict(self._active)  # and what this call loads: two equal specs share one model
        for name, spec in policy.scorers.items():
            scorer = loaded.get(spec.load_key())
            if scorer is None:
                try:
                    scorer = load_scorer(spec)
                except (CheckpointError, ScorerError) as exc:
                    for loaded in fresh:
                        _close_soon(loaded)
                    line, column = policy.position(("scorers", name))
                    raise PolicyError([PolicyProblem(policy.source, line, column,
                                                     scorer_message(name, exc, "failed to load"))]) from exc
                fresh.append(scorer)
                loaded[spec.load_key()] = scorer
                log.info("scorer loaded", extra={"scorer": name, "kind": spec.kind, "remote": spec.remote is not None})
            out[name] = scorer
        return out

    def commit(self, scorers: dict[str, Scorer]) -> list[Scorer]:
        """Make ``scorers`` the active set; returns the scorers no longer used (to retire)."""
        active = {scorer.spec.load_key(): scorer for scorer in scorers.values()}
        kept = {id(s) for s in active.values()}
        retired = [s for s in self._active.values() if id(s) not in kept]
        self._active = active
        return retired

    async def close(self) -> None:
        """Close every active scorer (server shutdown)."""
        scorers, self._active = list(self._active.values()), {}
        await asyncio.gather(*(s.close() for s in scorers), return_exceptions=True)


def retire(scorers: list[Scorer], after_s: float = RETIRE_AFTER_S) -> None:
    """Close ``scorers`` after ``after_s`` seconds, on the running event loop."""
    if not scorers:
        return
    loop = asyncio.get_running_loop()
    for scorer in scorers:
        loop.call_later(after_s, lambda s=scorer: loop.create_task(s.close()))


def _close_soon(scorer: Scorer) -> None:
    """Close a scorer from any thread: on a running loop if there is one, else synchronously."""
    try:
        asyncio.run(scorer.close())
    except RuntimeError:  # called inside a running loop: schedule instead
        asyncio.get_running_loop().create_task(scorer.close())
    except Exception:  # noqa: BLE001 - closing a scorer nobody uses must not fail a reload
        log.exception("closing an unused scorer failed")


@contextlib.asynccontextmanager
async def loaded_engine(policy: Policy):
    """The policy's engine with its scorers loaded as the server loads them; closed on exit."""
    cache = ScorerCache()
    engine = PolicyEngine(policy, await asyncio.to_thread(cache.prepare, policy))
    cache.commit(dict(engine.scorers))
    try:
        yield engine
    finally:
        await cache.close()
