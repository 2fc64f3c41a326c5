"""The large-share controller: a fleet-wide share of requests on the large backends, held by
moving one score signal's threshold.

The policy's ``share:`` section (:class:`~extproc.policy._sections.ShareConfig`) names a
one-sided ``score`` signal whose match sends requests to the ``large`` backends, a target
share and the bounds of the threshold. Every routed request is counted in the store
(``incr_window``: all requests, and those on a large backend), so every replica reads the
same sliding-window share (``read_sliding``). Every ``update_s`` seconds one replica (the one
that takes the period's turn with ``set_if_absent``) moves the threshold by

    threshold += direction × gain × (observed share − target)      clamped to [min, max]

(``direction`` +1 for ``above`` / ``large_share`` signals, whose match grows as the threshold
falls; −1 for ``below``): an integral controller whose clamp is its anti-windup. The threshold
lives in the store too, and each replica reads it at the same period, so they all decide with
one threshold; between reads a replica uses the one it read last. Requests decide with it
through :class:`~extproc.engine.SignalMemo`'s ``thresholds``: the frozen policy never changes.

Limits: the observed share lags the threshold by up to a window, so a large ``gain`` with a
short ``update_s`` over a long ``window_s`` overshoots and oscillates; keep
``gain × window_s / update_s`` near or below the threshold's range. The controller can only
hold what the bounds allow: a mix so hard that even ``max_threshold`` sends more than the
target leaves the threshold at the bound (the share metric shows it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping

from extproc.engine._decision import Decision
from extproc.policy._model import Policy
from extproc.policy._sections import ShareConfig
from extproc.signals._kinds import ScoreSignal
from extproc.state._store import Store
from extproc.telemetry._instruments import Telemetry

__all__ = ["ShareController", "THRESHOLD_TTL_S", "written_threshold"]

log = logging.getLogger("switchyard.traffic")

#: How long the controller's threshold is kept in the store after its last update (seconds):
#: a fleet idle this long starts again from the policy's written threshold.
THRESHOLD_TTL_S = 7 * 86400.0


def written_threshold(config: ShareConfig, signal: ScoreSignal) -> float:
    """The signal's threshold as the policy writes it, clamped to the controller's bounds
    (the middle of them when the signal's threshold is not known here)."""
    written = next((t for t in (signal.below, signal.at_least, signal.above) if t is not None), None)
    if written is None:
        written = (config.min_threshold + config.max_threshold) / 2
    return min(config.max_threshold, max(config.min_threshold, written))


class _State:
    """What one replica knows of one ``share:`` section: the threshold it decides with."""

    __slots__ = ("config", "direction", "threshold", "thresholds", "next_sync")

    def __init__(self, config: ShareConfig, signal: ScoreSignal) -> None:
        self.config = config
        self.direction = -1.0 if signal.below is not None else 1.0
        self.next_sync = -math.inf  # sync on the first request
        self.set(written_threshold(config, signal))

    def set(self, threshold: float) -> None:
        self.threshold = threshold
        self.thresholds = {self.config.signal: threshold}  # one read-only map for every request


class ShareController:
    """Counts routed requests and moves the ``share:`` signal's threshold (module docstring).

    One per server. ``store``: the store, or what returns the current one (a reload may swap
    it). ``clock`` (monotonic seconds) paces the updates; the store's own clock
    places its windows. ``replica`` names this process in the store's turn key (default: a
    random id).
    """

    def __init__(self, store: Store | Callable[[], Store], telemetry: Telemetry | None = None,
                 clock: Callable[[], float] = time.monotonic, replica: str | None = None) -> None:
        self._store = store if callable(store) else (lambda: store)
        self.telemetry = telemetry or Telemetry()
        self._clock = clock
        self.replica = replica or uuid.uuid4().hex
        self._state: _State | None = None

    def thresholds(self, policy: Policy) -> Mapping[str, float] | None:
        """The thresholds ``policy``'s requests decide with now (``None``: no ``share:``)."""
        state = self._current(policy)
        return state.thresholds if state is not None else None

    async def observe(self, policy: Policy, decision: Decision) -> None:
        """Count one routed request, and sync (and perhaps move) the threshold when due."""
        state = self._current(policy)
        if state is None:
            return
        config = state.config
        prefix, store = _prefix(config), self._store()
        counts = [store.incr_window(prefix + "all", 1.0, config.window_s)]
        if decision.backend.name in config.large:
            counts.append(store.incr_window(prefix + "large", 1.0, config.window_s))
        await asyncio.gather(*counts)
        now = self._clock()
        if now >= state.next_sync:
            state.next_sync = now + config.update_s
            await self.sync(state)

    async def sync(self, state: _State) -> None:
        """Read the fleet's share and threshold; when this replica has the period's turn, move it."""
        config = state.config
        prefix, store = _prefix(config), self._store()
        turn, stored, total, large = await asyncio.gather(
            store.set_if_absent(prefix + "turn", self.replica, config.update_s),
            store.get(prefix + "threshold"),
            store.read_sliding(prefix + "all", config.window_s),
            store.read_sliding(prefix + "large", config.window_s),
        )
        threshold = _parsed(stored, config, state.threshold)
        observed = large / total if total > 0 else None
        if observed is not None:
            self.telemetry.share_observed.set(observed, {"signal": config.signal})
        if turn == self.replica and observed is not None and total >= config.min_requests:
            step = state.direction * config.gain * (observed - config.target)
            threshold = min(config.max_threshold, max(config.min_threshold, threshold + step))
            await store.set(prefix + "threshold", repr(threshold), THRESHOLD_TTL_S)
        state.set(threshold)
        self.telemetry.share_threshold.set(threshold, {"signal": config.signal})

    def _current(self, policy: Policy) -> _State | None:
        """This replica's state for ``policy.share``; a changed section (a reload) starts anew
        from the written threshold until the next sync reads the fleet's."""
        config = policy.share
        if config is None:
            return None
        state = self._state
        if state is None or (state.config is not config and state.config != config):
            signal = policy.signals[config.signal]
            assert isinstance(signal, ScoreSignal)  # the policy loader checked it
            state = self._state = _State(config, signal)
        return state


def _prefix(config: ShareConfig) -> str:
    return f"share:{config.signal}:"


def _parsed(stored: str | None, config: ShareConfig, otherwise: float) -> float:
    """The threshold the store holds, within the bounds; ``otherwise`` when it holds none (or
    something that is not a finite number)."""
    try:
        value = float(stored) if stored is not None else otherwise
    except ValueError:
        log.warning("the stored share threshold is not a number; ignored", extra={"signal": config.signal})
        value = otherwise
    if not math.isfinite(value):
        value = otherwise
    return min(config.max_threshold, max(config.min_threshold, value))
