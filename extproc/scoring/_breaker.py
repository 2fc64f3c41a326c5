"""A circuit breaker per loaded scorer: a scorer that keeps failing is not waited for.

A scorer that is hung or down makes every request that needs it wait up to its whole
deadline before taking the fallback. The breaker counts consecutive failed calls (deadline
missed, error) during which the scorer answered no other request: a call that failed while
other calls succeeded says the scorer is busy, not broken, and load is for the scorer's own
admission to shed (reason ``overload``, never counted), not for the breaker, which would turn
a partial overload into every request taking the fallback. At
``scorers.<name>.breaker.failures`` counted failures it opens,
and for ``cool_off_ms`` every request takes the fallback at once (reason ``breaker_open``),
without calling the scorer. Then one request (the trial) calls it again: a success closes
the breaker, a failure opens it for another cool-off. Requests arriving while the trial runs
still take the fallback at once::

    closed ──N failures in a row──► open ──cool-off over──► half-open
      ▲                              ▲                          │ one trial call
      └───────── trial succeeds ─────┼──────── trial fails ─────┘

A breaker belongs to a loaded :class:`Scorer` object, which the server owns across
reloads: a reload that keeps the scorer keeps its breaker (and applies the new
``failures`` / ``cool_off_ms`` from the next call on); a scorer loaded anew (another
checkpoint, another target) starts closed. The clock is injectable, so tests need no sleeps.
"""

from __future__ import annotations

import enum
import time
import weakref
from collections.abc import Callable, Mapping

from extproc.scorers._interface import BreakerConfig, Scorer

__all__ = ["Admission", "Breaker", "Breakers", "BreakerState", "BREAKERS", "COUNTED_REASONS"]

#: ``ScorerFailure.reason`` values a breaker counts: the scorer did not answer (in time).
#: A NaN or a missing output is an answer: the scorer is reachable, so it does not count;
#: nor does ``overload``: the scorer refused at once because it is busy, so it is alive.
COUNTED_REASONS = frozenset({"deadline", "error"})


class BreakerState(enum.IntEnum):
    """A breaker's state; the value is what the ``switchyard.scorer.breaker.state`` gauge reports."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2

    @property
    def label(self) -> str:
        """The state as ``policy explain`` prints it: ``closed``, ``open``, ``half_open``."""
        return self.name.lower()


class Admission(enum.Enum):
    """What :meth:`Breaker.admit` allows a request: no call, a call, or the trial call."""

    REFUSED = "refused"
    CALL = "call"
    TRIAL = "trial"


class Breaker:
    """One scorer's breaker. Used from one event loop; every method is quick and never awaits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures = 0  # consecutive counted failures while closed
        self._open_until: float | None = None  # None: closed
        self._trial = False  # a half-open trial call is running
        self._last_success: float | None = None  # when a call last succeeded

    @property
    def state(self) -> BreakerState:
        if self._open_until is None:
            return BreakerState.CLOSED
        return BreakerState.OPEN if self._clock() < self._open_until else BreakerState.HALF_OPEN

    @property
    def failures(self) -> int:
        """Consecutive counted failures so far (while closed)."""
        return self._failures

    def now(self) -> float:
        """The breaker's clock: pass its value at a call's start to :meth:`record`."""
        return self._clock()

    def admit(self, config: BreakerConfig) -> Admission:
        """Whether a request may call the scorer now. Every admitted call must end in
        :meth:`record` or :meth:`abandon`."""
        if config.failures == 0:  # the breaker is off: never refuse, and forget any open state
            self._failures, self._open_until, self._trial = 0, None, False
            return Admission.CALL
        state = self.state
        if state is BreakerState.CLOSED:
            return Admission.CALL
        if state is BreakerState.OPEN or self._trial:
            return Admission.REFUSED
        self._trial = True
        return Admission.TRIAL

    def record(self, admission: Admission, config: BreakerConfig, failed: bool, since: float | None = None) -> None:
        """The outcome of a call :meth:`admit` allowed (``failed``: a counted failure).
        ``since``: :meth:`now` when the call started; a failure during which another call
        succeeded is not counted (the scorer is busy, not broken)."""
        if not failed:
            self._last_success = self._clock()
        elif since is not None and self._last_success is not None and self._last_success >= since:
            return
        if admission is Admission.TRIAL:
            self._trial = False
            if failed:
                self._open(config)
            else:
                self._failures, self._open_until = 0, None
            return
        if self._open_until is not None:
            return  # a call admitted before the breaker opened: only the trial decides now
        if not failed:
            self._failures = 0
            return
        self._failures += 1
        if config.failures and self._failures >= config.failures:
            self._open(config)

    def abandon(self, admission: Admission) -> None:
        """An admitted call ended without an outcome (its request was cancelled)."""
        if admission is Admission.TRIAL:
            self._trial = False  # the next request tries instead

    def _open(self, config: BreakerConfig) -> None:
        self._failures = 0
        self._open_until = self._clock() + config.cool_off_ms / 1000.0


class Breakers:
    """The breaker of each loaded scorer, created on first use; forgotten with the scorer."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_scorer: weakref.WeakKeyDictionary[Scorer, Breaker] = weakref.WeakKeyDictionary()

    def of(self, scorer: Scorer) -> Breaker:
        breaker = self._by_scorer.get(scorer)
        if breaker is None:
            breaker = self._by_scorer[scorer] = Breaker(self._clock)
        return breaker

    def states(self, scorers: Mapping[str, Scorer]) -> dict[str, BreakerState]:
        """Each named scorer's breaker state (closed for one never called)."""
        return {name: self.of(scorer).state for name, scorer in scorers.items()}


#: The breakers of the scorers this process has loaded (the server's and ``policy explain``'s).
BREAKERS = Breakers()
