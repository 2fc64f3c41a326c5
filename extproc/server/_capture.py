"""Capture: a sample of live requests written to a JSONL file that ``switchyard label`` reads.

The policy's ``capture:`` section (:class:`CaptureConfig`) turns it on by naming a ``path``.
Each sampled request becomes one line::

    {"id": ..., "time": "2025-01-01T12:00:00.000Z", "tenant": ... or null,
     "messages": [... the body's messages as parsed ...],
     "decision": {"backend": ..., "rule": ..., "fallback": ... or null,
                  "scores": {scorer: {output: value}}}}

How a request is picked (:func:`wanted`), on the event loop, in microseconds:

- its id is the ``x-request-id`` header Envoy sets (a random one when it is missing);
- it is sampled when a hash of the id falls below ``sample_rate``: deterministic per id, so
  the same id is always or never captured, whichever worker or replica sees it;
- a request whose tenant (``tenants.header``; every part of a comma list) is in
  ``exclude_tenants`` is never captured.

The event loop never waits on the disk (:class:`CaptureWriter`): :meth:`~CaptureWriter.offer`
appends the sample to a bounded queue (``queue`` samples) and returns; one writer thread
encodes and writes it. A full queue drops the sample and counts it. Lines are ASCII JSON
(every non-ASCII character escaped, so U+2028 or U+0085 in a prompt never splits a line for
any reader) and always whole: each ``write()`` carries complete lines only, so a crash can
leave at most a torn last line, which ``label`` skips.

The file is capped: before a write would take it past ``max_bytes`` it is renamed to
``<path>.1`` (``<path>.1`` to ``<path>.2`` and so on, ``keep`` rotated files) and a new file
is started. Several worker processes may share one path: rotation takes a lock on the file
and each writer reopens the path when another has rotated it (their appends between one's
size check and its write can take a file past the cap by at most one write each).

Nothing of a prompt ever reaches a log line or a metric: a failed write logs the path and the
OS error, the metrics count samples by reason.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

from extproc.policy._sections import CaptureConfig

__all__ = [
    "CaptureWriter",
    "REQUEST_ID_HEADER",
    "encode",
    "sampled",
    "wanted",
]

log = logging.getLogger("switchyard.capture")

#: The header whose value is a captured request's ``id`` (Envoy sets it on every request).
REQUEST_ID_HEADER = "x-request-id"
#: The most samples the writer takes from the queue for one round of writes.
BATCH = 256
#: How long the writer lets samples gather before a round of writes (unless ``BATCH`` are
#: waiting, or the writer is closing): one wake-up and one ``write()`` per round, not per
#: request, so the writer thread seldom competes with the event loop for the interpreter.
LINGER_S = 0.05


def sampled(request_id: str, rate: float) -> bool:
    """Whether the request with ``request_id`` falls in a ``rate`` sample (same id, same answer)."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def _excluded(tenant: str | None, exclude: frozenset[str]) -> bool:
    """Whether ``tenant`` (a header value; a comma list names several) names an excluded tenant."""
    if not exclude or not tenant:
        return False
    return tenant.strip() in exclude or any(part.strip() in exclude for part in tenant.split(","))


def wanted(config: CaptureConfig, request_id: str, tenant: str | None) -> bool:
    """Whether a request is captured: capture on, the id sampled, the tenant not excluded."""
    return config.enabled and not _excluded(tenant, config.exclude_tenants) and sampled(request_id, config.sample_rate)


class _Sample(NamedTuple):  # a tuple: built on the event loop, for each sampled request
    config: CaptureConfig
    request_id: str
    tenant: str | None
    messages: Any
    decision: Any  # extproc.engine._decision.Decision (not imported: the writer needs only its fields)
    at: float  # time.time() when the request was decided


def _timestamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


def encode(sample: _Sample) -> bytes:
    """One capture line, ``\\n`` included (ASCII JSON: every non-ASCII character escaped)."""
    decision = sample.decision
    record = {
        "id": sample.request_id,
        "time": _timestamp(sample.at),
        "tenant": sample.tenant,
        "messages": sample.messages,
        "decision": {
            "backend": decision.backend.name,
            "rule": decision.rule,
            "fallback": decision.fallback,
            "scores": {scorer: dict(scores.values) for scorer, scores in decision.scores.items()},
        },
    }
    return (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


class _CaptureFile:
    """One capture path, opened for appending; rotates before a write would pass ``max_bytes``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def _open(self) -> int:
        """The open file at ``path``; reopened when another writer rotated it away."""
        if self._fd is not None and not self._is_current(self._fd):
            self.close()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return self._fd

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def append(self, data: bytes, max_bytes: int, keep: int) -> None:
        """Write whole lines ``data`` (at most ``max_bytes`` long), rotating first when needed."""
        fd = self._open()
        size = os.fstat(fd).st_size
        if size and size + len(data) > max_bytes:
            self._rotate(fd, keep)
            fd = self._open()
        view = memoryview(data)
        while view:  # one write() on a local file; a short write (disk full) goes on with the rest
            view = view[os.write(fd, view):]

    def _rotate(self, fd: int, keep: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process sharing the path waits here ...
        try:
            if self._is_current(fd):  # ... and finds the file already rotated
                for index in range(keep - 1, 0, -1):
                    older = f"{self.path}.{index}"
                    if os.path.exists(older):
                        os.replace(older, f"{self.path}.{index + 1}")
                if keep:
                    os.replace(self.path, f"{self.path}.1")
                else:
                    os.unlink(self.path)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class CaptureWriter:
    """The bounded queue of samples and the one thread that writes them.

    :meth:`offer` is called on the event loop and never blocks on the disk: it holds a lock
    only to append to the queue (the writer holds it only to take a batch). The thread
    starts with the first sample. Each sample carries the policy's :class:`CaptureConfig`, so
    a reload that changes the path, the rate or the cap applies from the next request.
    ``telemetry`` (an :class:`~extproc.telemetry._instruments.Telemetry`) counts written and dropped samples.
    """

    def __init__(self, telemetry=None) -> None:
        self._telemetry = telemetry
        self._items: collections.deque[_Sample] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._file: _CaptureFile | None = None
        self._failing: str | None = None  # the path whose last write failed (logged once)

    def offer(self, config: CaptureConfig, headers: Mapping[str, str], messages: Any, decision: Any) -> bool:
        """Queue a decided request when ``config`` wants it; ``False`` when it was not taken
        (not sampled, excluded, or the queue full: counted as dropped)."""
        if not config.enabled:
            return False
        request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        if not wanted(config, request_id, decision.tenant):
            return False
        sample = _Sample(config, request_id, decision.tenant, messages, decision, time.time())
        with self._cond:
            refused = "shutdown" if self._closing else "queue_full" if len(self._items) >= config.queue else None
            if refused is None:
                self._items.append(sample)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="switchyard-capture", daemon=True)
                    self._thread.start()
                if len(self._items) == 1 or len(self._items) >= BATCH:  # the writer waits for the first, or lingers
                    self._cond.notify()
        if refused is not None:
            self._dropped(refused)
            return False
        return True

    def close(self, timeout: float) -> None:
        """Write what is queued, waiting at most ``timeout`` seconds; what is left then is
        counted as dropped (reason ``shutdown``). Blocking: run it off the event loop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            left = len(self._items)
            self._items.clear()
        if left:
            self._dropped("shutdown", left)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._closing and len(self._items) < BATCH:
                    self._cond.wait(LINGER_S)  # let more gather; a close or a full batch wakes it
                if not self._items:
                    break
                batch = [self._items.popleft() for _ in range(min(BATCH, len(self._items)))]
            try:
                self._write(batch)
            except Exception:  # a bug must not end capture, nor leak a sample into the log
                log.exception("capture writer failed; samples dropped")
                self._dropped("error", len(batch))
        if self._file is not None:
            self._file.close()

    def _write(self, batch: list[_Sample]) -> None:
        """Write ``batch`` (one thread only), as few ``write()`` calls as the cap allows."""
        pending: list[bytes] = []
        size = 0
        config: CaptureConfig | None = None
        for sample in batch:
            line = encode(sample)
            if config is not None and (sample.config.path != config.path or size + len(line) > config.max_bytes):
                self._flush(config, pending)
                pending, size = [], 0
            config = sample.config
            if len(line) > config.max_bytes:
                self._dropped("too_large")
                continue
            pending.append(line)
            size += len(line)
        if config is not None and pending:
            self._flush(config, pending)

    def _flush(self, config: CaptureConfig, lines: list[bytes]) -> None:
        if not lines:
            return
        assert config.path is not None
        if self._file is None or self._file.path != config.path:
            if self._file is not None:
                self._file.close()
            self._file = _CaptureFile(config.path)
        try:
            self._file.append(b"".join(lines), config.max_bytes, config.keep)
        except OSError as exc:
            self._file.close()
            self._dropped("error", len(lines))
            if self._failing != config.path:  # once per failing path, not per sample
                self._failing = config.path
                log.error("cannot write the capture file; samples are dropped until it works",
                          extra={"path": config.path, "error": f"{type(exc).__name__}: {exc.strerror or exc}"})
            return
        if self._failing == config.path:
            self._failing = None
            log.info("capture file writable again", extra={"path": config.path})
        if self._telemetry is not None:
            self._telemetry.capture_written.add(len(lines))

    def _dropped(self, reason: str, count: int = 1) -> None:
        if self._telemetry is not None:
            self._telemetry.capture_dropped.add(count, {"reason": reason})
