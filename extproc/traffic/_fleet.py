"""The fleet-state store a server process runs with, rebuilt when a reload changes ``state:``.

:class:`FleetState` holds the :class:`~extproc.state.Store` the running policy's ``state:``
section names (built with :func:`~extproc.state.build_store`, its in-process answers counted
by :class:`~extproc.state.StateTelemetry`). A policy reload calls :meth:`FleetState.accept`
before the new policy runs: an unchanged section keeps the store; a changed one builds the new
store, swaps it in, and closes the old one a while later on the event loop, once the requests
that were using it are done. A store that cannot be built (``password_env`` naming an unset
variable) is a :class:`PolicyError`, so the reload is rejected and the running policy stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from extproc._errors import PolicyError, PolicyProblem
from extproc.policy._model import Policy
from extproc.scoring._cache import RETIRE_AFTER_S
from extproc.state import StateConfig, StateConfigError, StateTelemetry, Store, build_store

__all__ = ["FleetState"]

log = logging.getLogger("switchyard.state")


class FleetState:
    """The store of ``config``, for one process and its event loop (build it on that loop).

    ``store`` is the current store; read it for each request (a reload may swap it). Raises
    :class:`~extproc.state.StateConfigError` when ``config``'s store cannot be built.
    ``environ``: where ``password_env`` is looked up (default ``os.environ``).
    """

    def __init__(self, config: StateConfig, telemetry: StateTelemetry | None = None, *,
                 environ: Mapping[str, str] | None = None, retire_after_s: float = RETIRE_AFTER_S) -> None:
        self.telemetry = telemetry or StateTelemetry()
        self.config = config
        self._environ = environ
        self._retire_after_s = retire_after_s
        self._loop = asyncio.get_running_loop()
        self._retired: set[Store] = set()  # swapped out, not closed yet
        self.store = self._build(config)
        self.telemetry.observe_up(lambda: getattr(self.store, "remote_up", True))

    def _build(self, config: StateConfig) -> Store:
        return build_store(config, on_fallback=self.telemetry.fallback, environ=self._environ)

    def accept(self, policy: Policy) -> None:
        """Use ``policy``'s ``state:`` from now on (``PolicyFile``'s reload hook; any thread).
        Raises :class:`PolicyError` when its store cannot be built: the policy must not run."""
        if policy.state == self.config:
            return
        try:
            store = self._build(policy.state)
        except StateConfigError as exc:
            line, column = policy.position(("state", "redis", "password_env"))
            raise PolicyError([PolicyProblem(policy.source, line, column, str(exc))]) from exc
        old, self.store, self.config = self.store, store, policy.state
        log.info("fleet-state store changed", extra={"store": repr(store)})
        self._loop.call_soon_threadsafe(self._retire, old)

    def _retire(self, store: Store) -> None:
        self._retired.add(store)
        self._loop.call_later(self._retire_after_s, lambda: self._loop.create_task(self._close(store)))

    async def _close(self, store: Store) -> None:
        if store in self._retired:
            self._retired.discard(store)
            await store.aclose()

    async def aclose(self) -> None:
        """Close the current store and any swapped-out one not closed yet (server shutdown)."""
        for store in [*self._retired, self.store]:
            self._retired.discard(store)
            await store.aclose()
