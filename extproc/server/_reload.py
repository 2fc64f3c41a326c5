"""``PolicyFile``: the policy a server runs, swapped when its file changes.

Kubernetes updates a mounted ConfigMap in place (an atomic symlink swap), so the server
re-reads the file every ``interval`` seconds and on SIGHUP. A new policy takes effect only
when it validates completely; otherwise the running one stays, and the problems are logged
(``file:line:column``) once each time the file turns bad: once per bad version in a row,
and again after the file was good in between. Streams pin the engine they started with
(:class:`~extproc.server._servicer.ExternalProcessor`), so a swap never changes a request mid-flight.

A version is the file's text and the checkpoints it names: a checkpoint recalibrated or
retrained in place (same folder, new ``config.json`` or weights) reloads the policy like an
edit does, so the running thresholds are always those ``policy explain`` reads. A file over
``max_bytes`` is refused before it is parsed, and parsing runs on a worker thread
(:meth:`PolicyFile.watch`), so a reload never holds up the event loop's requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from extproc.engine._engine import PolicyEngine
from extproc._errors import PolicyError
from extproc.policy._loading import DEFAULT_MAX_POLICY_BYTES, parse_policy, read_policy_text
from extproc.policy._model import Policy
from extproc.scoring._cache import ScorerCache, retire
from extproc.policy._scorer_specs import checkpoint_fingerprint
from extproc.telemetry._instruments import Telemetry

__all__ = ["PolicyFile", "watch_reloads"]

log = logging.getLogger("switchyard.policy")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


#: A policy version: its text's digest, and each local checkpoint folder it names with the
#: fingerprint the folder had when the version was read.
Version = tuple[str, dict[str, str]]


def _changed(checkpoints: dict[str, str]) -> bool:
    """Whether any of the checkpoint folders differs now from its recorded fingerprint."""
    return any(checkpoint_fingerprint([folder]) != fingerprint for folder, fingerprint in checkpoints.items())


def _engine(path: Path, text: str, cache: ScorerCache | None = None,
            checkpoints: dict[str, str] | None = None) -> PolicyEngine:
    """The engine for policy ``text`` read from ``path``, with its scorers loaded through
    ``cache`` (not loaded when None); raises :class:`PolicyError`. ``checkpoints`` gets the
    checkpoint folders the policy names (see :func:`parse_policy`)."""
    policy = parse_policy(text, source=str(path), base_dir=path.parent, checkpoints=checkpoints)
    return PolicyEngine(policy, cache.prepare(policy) if cache is not None else None)


class PolicyFile:
    """The engine for the policy at ``path``, and reloading it.

    Build it with :meth:`load`, which raises :class:`PolicyError` for a bad file: a server
    never starts on a bad policy, and never replaces a good one with one.
    """

    def __init__(self, path: Path, text: str, engine: PolicyEngine, telemetry: Telemetry | None = None,
                 max_bytes: int = DEFAULT_MAX_POLICY_BYTES, checkpoints: dict[str, str] | None = None) -> None:
        self.path = path
        self.engine = engine
        self.max_bytes = max_bytes  # a larger file is refused before it is parsed
        self.scorers: ScorerCache | None = None  # set by load_scorers(): from then on reloads load scorers
        self._retired: list = []  # scorers a swap stopped using, closed later on the event loop
        self.digest = _digest(text)
        self._checkpoints = checkpoints or {}  # of the running version
        self._rejected: Version | None = None  # the last bad version, logged once
        self._telemetry = telemetry or Telemetry()
        #: Called with each new policy before it runs (e.g. to build the store its ``state:``
        #: names); a :class:`PolicyError` from it rejects the reload. Called from a worker thread.
        self.accept: Callable[[Policy], None] | None = None

    @classmethod
    def load(cls, path: str | Path, telemetry: Telemetry | None = None,
             max_bytes: int = DEFAULT_MAX_POLICY_BYTES) -> PolicyFile:
        path = Path(path)
        text = read_policy_text(path, max_bytes)
        checkpoints: dict[str, str] = {}
        return cls(path, text, _engine(path, text, checkpoints=checkpoints), telemetry, max_bytes, checkpoints)

    def load_scorers(self, cache: ScorerCache | None = None) -> None:
        """Load the running policy's scorers (blocking: model weights are read here), and from
        now on load them on every reload. A scorer that fails to load raises
        :class:`PolicyError`, so a server never starts without the scorers its policy uses.
        ``cache``: where they load (default: a cache of this file's own; a shadow policy
        shares the server's, see :class:`~extproc.server._shadow.SharedScorers`)."""
        cache = cache if cache is not None else ScorerCache()
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
        """Re-read the file now: ``"unchanged"``, ``"reloaded"`` or ``"rejected"``. Blocking
        (the file is parsed, scorers may load): :meth:`watch` runs it on a worker thread."""
        try:
            text = read_policy_text(self.path, self.max_bytes)
        except PolicyError as error:
            return self._reject(("unreadable", {}), error)
        digest = _digest(text)
        if digest == self.digest and not _changed(self._checkpoints):
            if self._rejected is not None:  # back to the running version: a bad one is news again
                self._rejected = None
                log.info("policy file is back to the running version", extra={"policy": str(self.path), "digest": digest})
            return "unchanged"
        if self._rejected is not None and digest == self._rejected[0] and not _changed(self._rejected[1]):
            return "rejected"
        checkpoints: dict[str, str] = {}
        try:
            engine = _engine(self.path, text, self.scorers, checkpoints)
            if self.accept is not None:
                self.accept(engine.policy)
        except PolicyError as error:
            return self._reject((digest, checkpoints), error)
        if self.scorers is not None:
            self._retired += self.scorers.commit(dict(engine.scorers))
        changed = "file" if digest != self.digest else "checkpoints"
        self.engine, self.digest, self._checkpoints, self._rejected = engine, digest, checkpoints, None
        self._telemetry.policy_reloads.add(1, {"result": "reloaded"})
        log.info("policy reloaded", extra={"policy": str(self.path), "digest": digest, "changed": changed,
                                            "rules": len(engine.policy.rules)})
        return "reloaded"

    def _reject(self, version: Version, error: PolicyError) -> str:
        if version != self._rejected:  # log each bad version once, not every interval
            self._rejected = version
            self._telemetry.policy_reloads.add(1, {"result": "rejected"})
            log.error("policy rejected; the running policy stays", extra={
                "policy": str(self.path), "digest": version[0], "running_digest": self.digest,
                "problems": [str(problem) for problem in error.problems]})
        return "rejected"

    async def watch(self, interval: float, wake: asyncio.Event) -> None:
        """Reload every ``interval`` seconds (never when 0) and whenever ``wake`` is set."""
        await watch_reloads(self.reload, self.take_retired, interval, wake, "policy")

    def take_retired(self) -> list:
        """The scorers the last reloads stopped using, handed over once to be closed."""
        retired, self._retired = self._retired, []
        return retired


async def watch_reloads(reload, take_retired, interval: float, wake: asyncio.Event, what: str) -> None:
    """Call ``reload`` every ``interval`` seconds (never when 0) and whenever ``wake`` is set,
    on a worker thread (parsing and loading must not stall the event loop), then close what
    ``take_retired`` hands over. A reload that raises is logged; the running ``what`` stays."""
    while True:
        try:
            await asyncio.wait_for(wake.wait(), timeout=interval if interval > 0 else None)
        except asyncio.TimeoutError:
            pass
        wake.clear()
        try:
            await asyncio.to_thread(reload)
        except Exception:  # a bug in reloading must not end reloading, nor the server
            log.exception(f"{what} reload failed; the running {what} stays")
        retire(take_retired())
