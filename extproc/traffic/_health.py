"""Backend health from Envoy's own view: which backends are down, for the decision.

Envoy ejects a failing host of a backend cluster (the ``outlier_detection`` that
``switchyard envoy render`` gives every backend cluster) and, where configured, fails it on
active health checks. ``serve --envoy-admin URL`` makes each server process poll Envoy's admin
endpoint (``GET /clusters?format=json`` on the sidecar's loopback) every
:data:`POLL_INTERVAL_S` seconds, off the request path, in a task of its own
(:class:`HealthPoller`); what it read is a :class:`BackendHealth`::

    Envoy admin ──GET /clusters?format=json (≤ POLL_TIMEOUT_S, ≤ MAX_ADMIN_BYTES)──▶ parse_unhealthy_clusters()
        ──▶ BackendHealth.update(clusters)  ──per request──▶ BackendHealth.unhealthy(policy)
        ──▶ SignalMemo(unhealthy=...) ──▶ the engine skips them ("backend unhealthy")

A backend is unhealthy when Envoy lists its cluster and no host of it is healthy (ejected,
failing active health checks, or EDS-unhealthy, draining or timed out); a cluster Envoy does
not list counts as healthy. A poll that fails (admin unreachable, slow, not JSON, not
Envoy's shape, over :data:`MAX_ADMIN_BYTES`) is counted
(``switchyard.health.poll_failures{reason}``) and keeps the last view; a view older than
:data:`STALE_AFTER_S` is dropped, so after a while with no answer every backend counts as
healthy again: health information may only ever take backends out of a decision while it is
fresh, and never fails a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from extproc._errors import SwitchyardError
from extproc.policy._model import Policy
from extproc.telemetry._instruments import Telemetry

__all__ = [
    "ADMIN_CLUSTERS_PATH",
    "MAX_ADMIN_BYTES",
    "POLL_INTERVAL_S",
    "POLL_TIMEOUT_S",
    "STALE_AFTER_S",
    "AdminAnswerError",
    "BackendHealth",
    "HealthPoller",
    "parse_admin_url",
    "parse_unhealthy_clusters",
]

log = logging.getLogger("switchyard.health")

#: The admin endpoint's cluster list, as JSON.
ADMIN_CLUSTERS_PATH = "/clusters?format=json"
#: Seconds between two polls of Envoy's admin endpoint.
POLL_INTERVAL_S = 1.0
#: Longest one poll may take (connect, send, read the whole answer).
POLL_TIMEOUT_S = 0.5
#: Largest admin answer read; a larger one is a failed poll (a few KiB per cluster is usual).
MAX_ADMIN_BYTES = 8 * 1024 * 1024
#: Age after which the last view is dropped and every backend counts as healthy again.
STALE_AFTER_S = 10.0

#: ``eds_health_status`` values that take a host out of load balancing (DEGRADED still serves).
_EDS_DOWN = frozenset({"UNHEALTHY", "DRAINING", "TIMEOUT"})
#: ``health_status`` flags that take a host out of load balancing.
_FLAGS_DOWN = ("failed_outlier_check", "failed_active_health_check", "excluded_via_immediate_hc_fail")


class AdminAnswerError(SwitchyardError):
    """Envoy's admin endpoint answered something that is not its cluster list."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # the poll_failures label


def parse_admin_url(url: str, option: str = "--envoy-admin") -> tuple[str, int]:
    """``http://127.0.0.1:9901`` -> ``("127.0.0.1", 9901)``; ``option`` names the setting in the error."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise SwitchyardError(f"{option} must be http://HOST:PORT (Envoy's admin address), got {url!r}.")
    return parts.hostname, port


def _host_healthy(host: Any) -> bool:
    status = host.get("health_status", {}) if isinstance(host, dict) else None  # absent: no failure flag
    if not isinstance(status, dict):
        raise AdminAnswerError("a host_statuses entry is not a host with a health_status object", "bad_answer")
    if any(status.get(flag) is True for flag in _FLAGS_DOWN):
        return False
    return status.get("eds_health_status") not in _EDS_DOWN


def parse_unhealthy_clusters(raw: bytes) -> frozenset[str]:
    """The clusters with no healthy host in Envoy's ``GET /clusters?format=json`` answer
    ``raw``. Raises :class:`AdminAnswerError` when ``raw`` is not that answer."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdminAnswerError(f"the answer is not JSON ({exc})", "bad_json") from exc
    clusters = data.get("cluster_statuses") if isinstance(data, dict) else None
    if not isinstance(clusters, list):
        raise AdminAnswerError("the answer has no cluster_statuses list", "bad_answer")
    down = set()
    for cluster in clusters:
        name = cluster.get("name") if isinstance(cluster, dict) else None
        hosts = cluster.get("host_statuses", []) if isinstance(cluster, dict) else None
        if not isinstance(name, str) or not isinstance(hosts, list):
            raise AdminAnswerError("a cluster_statuses entry has no name or host_statuses", "bad_answer")
        if not any(_host_healthy(host) for host in hosts):
            down.add(name)
    return frozenset(down)


class BackendHealth:
    """The latest view of Envoy's unhealthy clusters, and the backends of a policy it takes out.

    :meth:`update` records a poll's clusters; :meth:`unhealthy` is what a request reads (an
    attribute read and a cached set: no I/O). A view older than ``stale_after_s`` seconds
    (``clock``: monotonic seconds) counts as no view: every backend healthy.
    """

    def __init__(self, *, stale_after_s: float = STALE_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._clusters: frozenset[str] = frozenset()
        self._updated: float | None = None
        self._cached: tuple[frozenset[str], Mapping[str, Any], frozenset[str]] | None = None

    def update(self, clusters: frozenset[str]) -> None:
        """Envoy's unhealthy clusters, as just read."""
        if clusters != self._clusters:
            log.info("backend clusters changed health", extra={"unhealthy": sorted(clusters),
                                                                 "was_unhealthy": sorted(self._clusters)})
        self._clusters, self._updated = clusters, self._clock()

    @property
    def fresh(self) -> bool:
        """Whether the last view is recent enough to act on."""
        return self._updated is not None and self._clock() - self._updated <= self._stale_after_s

    def unhealthy_clusters(self) -> frozenset[str]:
        """The unhealthy clusters of a fresh view; none when the view is missing or stale."""
        return self._clusters if self.fresh else frozenset()

    def unhealthy(self, policy: Policy) -> frozenset[str]:
        """The backends of ``policy`` whose cluster is unhealthy (none without a fresh view)."""
        clusters = self.unhealthy_clusters()
        if not clusters:
            return frozenset()
        cached = self._cached
        if cached is not None and cached[0] is clusters and cached[1] is policy.backends:
            return cached[2]
        backends = frozenset(name for name, backend in policy.backends.items() if backend.cluster in clusters)
        self._cached = (clusters, policy.backends, backends)
        return backends


async def _read_admin(host: str, port: int, max_bytes: int) -> bytes:
    """The body of ``GET /clusters?format=json`` from ``host:port`` (HTTP/1.1, connection closed
    by the server after the answer), at most ``max_bytes`` of it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {ADMIN_CLUSTERS_PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = bytearray()
        while chunk := await reader.read(65536):
            raw += chunk
            if len(raw) > max_bytes + 65536:  # the headers and chunk sizes are a few hundred bytes
                raise AdminAnswerError(f"the answer is over {max_bytes} bytes", "too_large")
    finally:
        writer.close()
    head, sep, body = bytes(raw).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not sep or len(lines[0].split()) < 2:
        raise AdminAnswerError("the answer is not HTTP", "bad_answer")
    if lines[0].split()[1] != b"200":
        raise AdminAnswerError(f"the answer's status is {lines[0].split()[1].decode(errors='replace')}", "http_status")
    if any(line.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for line in lines[1:]):
        body = _dechunk(body)
    if len(body) > max_bytes:
        raise AdminAnswerError(f"the answer is over {max_bytes} bytes", "too_large")
    return body


def _dechunk(body: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = body.find(b"\r\n", at)
        try:
            size = int(body[at:end].split(b";")[0], 16) if end >= 0 else -1
        except ValueError:
            size = -1
        if size < 0:
            raise AdminAnswerError("the answer's chunked body is cut or malformed", "bad_answer")
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        at = end + 2 + size + 2


class HealthPoller:
    """Polls Envoy's admin endpoint into ``view`` until cancelled (:meth:`run`, one task per
    server process). ``fetch``: returns the admin answer's body (tests replace it)."""

    def __init__(self, url: str, view: BackendHealth, telemetry: Telemetry, *,
                 interval_s: float = POLL_INTERVAL_S, timeout_s: float = POLL_TIMEOUT_S,
                 max_bytes: int = MAX_ADMIN_BYTES, fetch: Callable[[], Awaitable[bytes]] | None = None) -> None:
        host, port = parse_admin_url(url)
        self.url = url
        self.view = view
        self._telemetry = telemetry
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._fetch = fetch or (lambda: _read_admin(host, port, max_bytes))
        self._failing = False  # the last poll failed: the next failure is not logged again

    async def poll(self) -> bool:
        """One poll: update the view, or count the failure. Whether it succeeded."""
        try:
            raw = await asyncio.wait_for(self._fetch(), timeout=self._timeout_s)
            clusters = parse_unhealthy_clusters(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever happened, this poll failed and requests go on
            reason = exc.reason if isinstance(exc, AdminAnswerError) else (
                "timeout" if isinstance(exc, asyncio.TimeoutError) else "unreachable")
            self._telemetry.health_poll_failures.add(1, {"reason": reason})
            if not self._failing:
                log.warning("cannot read backend health from Envoy's admin endpoint",
                            extra={"url": self.url, "reason": reason, "error": str(exc) or type(exc).__name__})
            self._failing = True
            return False
        if self._failing:
            log.info("reading backend health from Envoy's admin endpoint again", extra={"url": self.url})
        self._failing = False
        self.view.update(clusters)
        return True

    async def run(self) -> None:
        """Poll every ``interval_s`` seconds until cancelled; never raises anything else."""
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug here must not end the polling
                log.exception("backend health poll failed")
            await asyncio.sleep(self._interval_s)
