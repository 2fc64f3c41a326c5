"""``PolicyFile``: the policy a server runs, swapped when its file changes.

Kubernetes updates a mounted ConfigMap in place (an atomic symlink swap), so the server
re-reads the file every ``interval`` seconds and on SIGHUP. A new policy takes effect only
when it validates completely; otherwise the running one stays, and the problems are logged
(``file:line:column``) once each time the file turns bad: once per bad version in a row,
and again after the file was good in between. Streams pin the engine they started with
(:class:`~extproc._servicer.ExternalProcessor`), so a swap never changes a request mid-flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from extproc._engine import PolicyEngine
from extproc._errors import PolicyError
from extproc._policy import parse_policy, read_policy_text
from extproc._scorer_cache import ScorerCache, retire
from extproc._telemetry import Telemetry

__all__ = ["PolicyFile"]

log = logging.getLogger("switchyard.policy")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _engine(path: Path, text: str, cache: ScorerCache | None = None) -> PolicyEngine:
    """The engine for policy ``text`` read from ``path``, with its scorers loaded through
    ``cache`` (not loaded when None); raises :class:`PolicyError`."""
    policy = parse_policy(text, source=str(path), base_dir=path.parent)
    return PolicyEngine(policy, cache.prepare(policy) if cache is not None else None)


class PolicyFile:
    """The engine for the policy at ``path``, and reloading it.

    Build it with :meth:`load`, which raises :class:`PolicyError` for a bad file: a server
    never starts on a bad policy, and never replaces a good one with one.
    """

    def __init__(self, path: Path, text: str, engine: PolicyEngine, telemetry: Telemetry | None = None) -> None:
        self.path = path
        self.engine = engine
        self.scorers: ScorerCache | None = None  # set by load_scorers(): from then on reloads load scorers
        self._retired: list = []  # scorers a swap stopped using, closed later on the event loop
        self.digest = _digest(text)
        self._rejected: str | None = None  # digest of the last bad version, logged once
        self._telemetry = telemetry or Telemetry()

    @classmethod
    def load(cls, path: str | Path, telemetry: Telemetry | None = None) -> PolicyFile:
        path = Path(path)
        text = read_policy_text(path)
        return cls(path, text, _engine(path, text), telemetry)

    def load_scorers(self) -> None:
        """Load the running policy's scorers (blocking: model weights are read here), and from
        now on load them on every reload. A scorer that fails to load raises
        :class:`PolicyError`, so a server never starts without the scorers its policy uses."""
        cache = ScorerCache()
        engine = PolicyEngine(self.engine.policy, cache.prepare(self.engine.policy))
        cache.commit(dict(engine.scorers))
        self.engine, self.scorers = engine, cache

    async def close(self) -> None:
        """Close every loaded scorer (server shutdown)."""
        if self.scorers is not None:
            await self.scorers.close()

    def current(self) -> PolicyEngine:
        """The engine new streams use."""
        return self.engine

    def reload(self) -> str:
        """Re-read the file now: ``"unchanged"``, ``"reloaded"`` or ``"rejected"``."""
        try:
            text = read_policy_text(self.path)
        except PolicyError as error:
            return self._reject("unreadable", error)
        digest = _digest(text)
        if digest == self.digest:
            if self._rejected is not None:  # back to the running version: a bad one is news again
                self._rejected = None
                log.info("policy file is back to the running version", extra={"policy": str(self.path), "digest": digest})
            return "unchanged"
        if digest == self._rejected:
            return "rejected"
        try:
            engine = _engine(self.path, text, self.scorers)
        except PolicyError as error:
            return self._reject(digest, error)
        if self.scorers is not None:
            self._retired += self.scorers.commit(dict(engine.scorers))
        self.engine, self.digest, self._rejected = engine, digest, None
        self._telemetry.policy_reloads.add(1, {"result": "reloaded"})
        log.info("policy reloaded", extra={"policy": str(self.path), "digest": digest, "rules": len(engine.policy.rules)})
        return "reloaded"

    def _reject(self, digest: str, error: PolicyError) -> str:
        if digest != self._rejected:  # log each bad version once, not every interval
            self._rejected = digest
            self._telemetry.policy_reloads.add(1, {"result": "rejected"})
            log.error("policy rejected; the running policy stays", extra={
                "policy": str(self.path), "digest": digest, "running_digest": self.digest,
                "problems": [str(problem) for problem in error.problems]})
        return "rejected"

    async def watch(self, interval: float, wake: asyncio.Event) -> None:
        """Reload every ``interval`` seconds (never when 0) and whenever ``wake`` is set."""
        while True:
            try:
                await asyncio.wait_for(wake.wait(), timeout=interval if interval > 0 else None)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            try:
                await asyncio.to_thread(self.reload)  # parsing and loading must not stall the event loop
            except Exception:  # a bug in reloading must not end reloading, nor the server
                log.exception("policy reload failed; the running policy stays")
            retired, self._retired = self._retired, []
            retire(retired)
