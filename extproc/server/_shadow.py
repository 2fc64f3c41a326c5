"""Shadow policies: every routed request decided a second time by a candidate policy.

``switchyard serve --shadow FILE`` runs a second policy beside the live one. The live answer
never waits for it::

    body answer sent to Envoy ─► Shadow.offer(request, live decision)   (the servicer, after the yield)
                                   │ in flight < max_in_flight? else dropped and counted
                                   ▼
                                 task "switchyard-shadow" (a later turn of the event loop)
                                   decide_with_scores(shadow engine, copy of the request)
                                   within timeout_s ─► switchyard.shadow.* metrics

The shadow decides its own copy of the request, with a fresh scorer deadline counted from
the task's start (the live one has passed), its own circuit breakers (a failing shadow never
opens a live scorer's breaker) and telemetry that records no scorer metrics (the live
scorer series stay the live policy's). Scores are not copied from the live decision: the
shadow asks its scorers itself (loaded once and shared, below, so its calls batch with live
ones), but its copy of the request shares the live one's ``scratch``, so a backbone prefill
the live decision ran is read from there, not run again. An exception, a timeout or a
rejection in the shadow is counted, never raised; an exception is logged at most once every
:data:`~extproc.telemetry._instruments.FAILURE_LOG_EVERY_S` seconds.

Scorers are shared (:class:`SharedScorers`): the live and the shadow policy load theirs
through one :class:`~extproc.scoring._cache.ScorerCache`, each as an *owner*; a scorer spec
both name (:meth:`ScorerSpec.load_key`) is one loaded model, and a scorer is retired only
when no owner uses it any more.

The shadow file is watched like the live one (:class:`ShadowPolicy`): a bad version, or one
whose scorers fail to load, never replaces a good one; a shadow that is bad at start leaves
the server running without a shadow until the file turns good.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider

from extproc.scoring._breaker import Breakers
from extproc.engine._decision import Decision
from extproc.engine._engine import PolicyEngine
from extproc._errors import PolicyError, RequestError, SwitchyardError
from extproc.policy._loading import DEFAULT_MAX_POLICY_BYTES
from extproc.policy._model import Policy
from extproc.server._reload import PolicyFile, watch_reloads
from extproc.request._body import RoutingRequest
from extproc.scoring._cache import ScorerCache
from extproc.scorers._interface import Scorer
from extproc.scoring._decide import decide_with_scores
from extproc.telemetry._instruments import FAILURE_LOG_EVERY_S, Telemetry

__all__ = [
    "DEFAULT_SHADOW_IN_FLIGHT",
    "DEFAULT_SHADOW_TIMEOUT_S",
    "REJECTED",
    "Shadow",
    "ShadowPolicy",
    "SharedScorers",
    "large_backends",
]

log = logging.getLogger("switchyard.shadow")

#: Shadow decisions running at once; a request offered beyond is not shadowed (counted as
#: ``switchyard_shadow_skipped_total{reason="dropped"}``).
DEFAULT_SHADOW_IN_FLIGHT = 64
#: Longest one shadow decision may take (scorer calls included) before it is abandoned.
DEFAULT_SHADOW_TIMEOUT_S = 1.0
#: The backend label of a shadow decision that would have answered with an error.
REJECTED = "rejected"


def large_backends(policy: Policy) -> frozenset[str]:
    """The policy's large backends: those with the highest ``cost`` (every backend when all
    cost the same)."""
    top = max(backend.cost for backend in policy.backends.values())
    return frozenset(name for name, backend in policy.backends.items() if backend.cost == top)


#: Records nothing: the shadow's scorer calls stay out of the live scorer metrics.
_QUIET = Telemetry(NoOpMeterProvider(), NoOpTracerProvider())


class SharedScorers:
    """One :class:`ScorerCache` shared by several policies (owners: ``"live"``, ``"shadow"``).

    :meth:`owner` gives each policy a cache-like view (``prepare``, ``commit``, ``close``) for
    :class:`~extproc.server._reload.PolicyFile`. What any owner prepared or committed stays loaded,
    so the other owner's next prepare reuses it; a scorer is retired when no owner's
    committed or prepared set holds it. Thread-safe: reloads run on worker threads.
    """

    def __init__(self, cache: ScorerCache | None = None) -> None:
        self._cache = cache or ScorerCache()
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], dict[str, Scorer]] = {}  # (owner, "committed"/"prepared") -> scorers
        self._dropped: list[Scorer] = []  # retired by a prepare, handed out by the next commit

    def owner(self, name: str) -> _Owner:
        return _Owner(self, name)

    def _sync(self) -> list[Scorer]:
        union = {f"{key}/{name}": scorer for key, scorers in self._held.items() for name, scorer in scorers.items()}
        return self._cache.commit(union)

    def _prepare(self, owner: str, policy: Policy) -> dict[str, Scorer]:
        with self._lock:
            scorers = self._cache.prepare(policy)
            self._held[(owner, "prepared")] = scorers
            self._dropped += self._sync()
            return scorers

    def _commit(self, owner: str, scorers: dict[str, Scorer]) -> list[Scorer]:
        with self._lock:
            self._held[(owner, "committed")] = dict(scorers)
            self._held.pop((owner, "prepared"), None)
            retired, self._dropped = self._sync() + self._dropped, []
            return retired

    async def close(self) -> None:
        await self._cache.close()  # a second close finds nothing left to close


class _Owner:
    """One owner's view of :class:`SharedScorers`, shaped like a :class:`ScorerCache`."""

    def __init__(self, shared: SharedScorers, name: str) -> None:
        self._shared, self._name = shared, name

    def prepare(self, policy: Policy) -> dict[str, Scorer]:
        return self._shared._prepare(self._name, policy)

    def commit(self, scorers: dict[str, Scorer]) -> list[Scorer]:
        return self._shared._commit(self._name, scorers)

    async def close(self) -> None:
        await self._shared.close()


class ShadowPolicy:
    """The shadow policy file: its engine (``None`` while no good version has loaded), reloaded
    as it changes. Never raises for a bad file: the problems are logged and counted."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_POLICY_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.file: PolicyFile | None = None
        self._scorers: _Owner | None = None
        self._load_file()

    def _load_file(self) -> None:
        try:
            # Its reloads are logged, not counted: switchyard_policy_reloads_total is the live policy's.
            self.file = PolicyFile.load(self.path, _QUIET, max_bytes=self.max_bytes)
        except (PolicyError, SwitchyardError) as error:
            self._failed(error)

    def _failed(self, error: Exception) -> None:
        problems = [str(p) for p in error.problems] if isinstance(error, PolicyError) else [str(error)]
        log.error("shadow policy not loaded; requests are not shadowed until it is good",
                  extra={"policy": str(self.path), "problems": problems})

    def load_scorers(self, scorers: _Owner) -> None:
        """Load the shadow's scorers through ``scorers`` (blocking); a failure leaves no shadow."""
        self._scorers = scorers
        if self.file is None:
            return
        try:
            self.file.load_scorers(scorers)
        except PolicyError as error:
            self.file = None
            self._failed(error)

    def current(self) -> PolicyEngine | None:
        return self.file.engine if self.file is not None else None

    @property
    def digest(self) -> str:
        return self.file.digest if self.file is not None else ""

    def reload(self) -> str:
        """Re-read the file (blocking): ``"unchanged"``, ``"reloaded"`` or ``"rejected"``."""
        if self.file is not None:
            return self.file.reload()
        self._load_file()
        if self.file is None:
            return "rejected"
        if self._scorers is not None:
            self.load_scorers(self._scorers)
        if self.file is None:
            return "rejected"
        log.info("shadow policy loaded", extra={"policy": str(self.path), "digest": self.file.digest})
        return "reloaded"

    async def watch(self, interval: float, wake: asyncio.Event) -> None:
        """Reload every ``interval`` seconds (never when 0) and whenever ``wake`` is set."""
        await watch_reloads(self.reload, lambda: self.file.take_retired() if self.file is not None else [],
                            interval, wake, "shadow policy")

    async def close(self) -> None:
        if self.file is not None:
            await self.file.close()


class Shadow:
    """Decides routed requests again with ``engine()`` (``None``: no shadow now), off the live path.

    :meth:`offer` is called by the servicer once the live answer has gone to Envoy; it starts
    a task and returns. ``decide`` is the deciding coroutine (tests pass a gated or failing one);
    ``clock`` paces the error log.
    """

    def __init__(self, engine: Callable[[], PolicyEngine | None], telemetry: Telemetry | None = None, *,
                 max_in_flight: int = DEFAULT_SHADOW_IN_FLIGHT, timeout_s: float = DEFAULT_SHADOW_TIMEOUT_S,
                 decide=decide_with_scores, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._telemetry = telemetry or Telemetry()
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self._decide = decide
        self._breakers = Breakers()
        self._tasks: set[asyncio.Task] = set()
        self._clock = clock  # paces the error log
        self._last_error: float | None = None
        self._errors_unlogged = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def offer(self, request: RoutingRequest, live: Decision, live_policy: Policy) -> bool:
        """Shadow ``request``, decided as ``live`` by ``live_policy``. ``False`` when not
        shadowed: no shadow policy, or too many in flight (counted)."""
        engine = self._engine()
        if engine is None:
            return False
        if len(self._tasks) >= self.max_in_flight:
            self._telemetry.shadow_skipped.add(1, {"reason": "dropped"})
            return False
        # The shadow's own copy of the request, but the same ``scratch``: a backbone prefill
        # the live decision ran is read from there, not run again (the live stream is done).
        mine = RoutingRequest(method=request.method, path=request.path, headers=dict(request.headers),
                              body=copy.copy(request.body), scratch=request.scratch)
        task = asyncio.get_running_loop().create_task(self._run(engine, mine, live, live_policy),
                                                      name="switchyard-shadow")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, engine: PolicyEngine, request: RoutingRequest, live: Decision, live_policy: Policy) -> None:
        live_large = live.backend.name in large_backends(live_policy)
        try:
            decision = await self._within(self._decide(engine, request, telemetry=_QUIET, breakers=self._breakers))
        except asyncio.TimeoutError:
            self._telemetry.shadow_skipped.add(1, {"reason": "timeout"})
            return
        except asyncio.CancelledError:
            raise
        except RequestError:
            self.record(live.backend.name, live.backend.cost, live_large, REJECTED, 0.0, False)
            return
        except Exception:  # noqa: BLE001 - a shadow bug is counted and logged, never raised into serving
            self._telemetry.shadow_skipped.add(1, {"reason": "error"})
            self._log_error()
            return
        large = large_backends(engine.policy)
        self.record(live.backend.name, live.backend.cost, live_large,
                    decision.backend.name, decision.backend.cost, decision.backend.name in large)

    def _log_error(self) -> None:
        """Log the exception being handled, unless one was logged in the last interval."""
        now = self._clock()
        if self._last_error is not None and now - self._last_error < FAILURE_LOG_EVERY_S:
            self._errors_unlogged += 1
            return
        log.exception("shadow decision failed; the live answer was not affected",
                      extra={"suppressed": self._errors_unlogged})
        self._last_error, self._errors_unlogged = now, 0

    async def _within(self, decide):
        """``await decide`` within :attr:`timeout_s`; ``asyncio.TimeoutError`` past it."""
        if not hasattr(asyncio, "timeout"):  # Python 3.10
            return await asyncio.wait_for(decide, self.timeout_s)
        async with asyncio.timeout(self.timeout_s):  # unlike wait_for, no second task per request
            return await decide

    def record(self, live: str, live_cost: float, live_large: bool, shadow: str, shadow_cost: float,
               shadow_large: bool) -> None:
        """One compared request: the pair, each side's cost and whether it went large."""
        telemetry = self._telemetry
        telemetry.shadow_decisions.add(1, {"live": live, "shadow": shadow})
        telemetry.shadow_cost.add(live_cost, {"policy": "live"})
        telemetry.shadow_cost.add(shadow_cost, {"policy": "shadow"})
        telemetry.shadow_large.add(int(live_large), {"policy": "live"})
        telemetry.shadow_large.add(int(shadow_large), {"policy": "shadow"})

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the shadow decisions in flight, then cancel the rest."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
