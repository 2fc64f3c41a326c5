"""The Prometheus scrape endpoint (``serve --metrics-listen``), and how ``--workers N``
shares it.

One process: :class:`MetricsServer` serves that process's registry (the OpenTelemetry
Prometheus reader plus the process/GC/platform collectors) on a daemon thread.

``--workers N``: the workers share the gRPC port, but one HTTP port cannot be shared by N
scrape endpoints. So the parent process, which serves no gRPC, owns the scrape endpoint.
Each worker answers scrape requests from the parent on its own socket pair
(:func:`answer_scrapes`, a daemon thread); :class:`WorkerCollector` asks every worker at
each scrape and returns all their series with a ``worker="<i>"`` label added, so nothing
is summed or lost and ``sum by (...)`` in PromQL gives the pod's totals. A worker that does
not answer within ``timeout`` seconds is left out of that scrape and reported by
``switchyard_worker_up{worker="<i>"} 0``.

Wire format on a pair (both directions big-endian): the parent sends a 4-byte request
number; the worker answers with the same number, a 4-byte length and the text exposition.
A late answer to an earlier request is read and dropped.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from extproc._errors import SwitchyardError

__all__ = ["MetricsServer", "WorkerCollector", "answer_scrapes"]

log = logging.getLogger("switchyard.metrics")

_REQUEST = struct.Struct("!I")
_ANSWER = struct.Struct("!II")
_MID_ANSWER_TIMEOUT = 30.0  # seconds to read the rest of an answer that has started


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged."""


class MetricsServer:
    """An HTTP server answering ``GET /metrics`` with ``registry`` in the Prometheus text
    (or OpenMetrics, when asked) format; other paths get 404.

    :meth:`bind` takes the port at once, so a taken port fails before anything forks;
    :meth:`start` serves on a daemon thread.
    """

    def __init__(self, server: ThreadingWSGIServer, listen: str) -> None:
        self._server = server
        self._thread: threading.Thread | None = None
        self.listen = listen

    @classmethod
    def bind(cls, host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
        """Listen on ``host:port`` (port 0: any free port); raises :class:`SwitchyardError`."""
        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") in ("/metrics", "/metrics/"):
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"Not found: metrics are at /metrics.\n"]

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            server = make_server(host, port, app, Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise SwitchyardError(f"Cannot serve metrics on --metrics-listen {host}:{port}: {exc.strerror or exc}.") from exc
        bound = server.server_address[1]
        return cls(server, f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}")

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (when started) and release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``sock``; raises ``EOFError`` when the peer closed it first."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the other end closed the metrics channel")
        data += chunk
    return bytes(data)


def answer_scrapes(sock: socket.socket, registry: CollectorRegistry) -> threading.Thread:
    """Worker side: answer the parent's scrape requests on ``sock`` with ``registry``'s
    text exposition, on a daemon thread, until the parent closes the socket."""

    def run() -> None:
        try:
            while True:
                (number,) = _REQUEST.unpack(_recv_exact(sock, _REQUEST.size))
                text = generate_latest(registry)
                sock.sendall(_ANSWER.pack(number, len(text)) + text)
        except EOFError:
            pass
        except Exception:  # the worker keeps routing without metrics rather than dying
            log.exception("answering metrics scrapes failed; this worker's metrics are no longer served")
        finally:
            sock.close()

    thread = threading.Thread(target=run, name="metrics-answer", daemon=True)
    thread.start()
    return thread


class _Channel:
    """The parent's end of one worker's socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()  # concurrent scrapes take turns on one pair
        self.number = 0
        self.closed = False

    def ask(self, timeout: float) -> str:
        """The worker's exposition text; raises ``OSError``/``EOFError`` when it cannot answer.

        Only the wait for an answer's first byte may time out: the channel stays in step
        (the late answer is dropped next time). A channel broken mid-answer is closed.
        """
        with self.lock:
            if self.closed:
                raise EOFError("the worker's metrics channel is closed")
            self.number = (self.number + 1) % 2**32
            self.sock.settimeout(timeout)
            self.sock.sendall(_REQUEST.pack(self.number))
            while True:
                self.sock.settimeout(timeout)
                first = self.sock.recv(1)
                try:
                    if not first:
                        raise EOFError("the worker closed its metrics channel")
                    self.sock.settimeout(_MID_ANSWER_TIMEOUT)  # the rest is on its way
                    number, size = _ANSWER.unpack(first + _recv_exact(self.sock, _ANSWER.size - 1))
                    text = _recv_exact(self.sock, size)
                except (OSError, EOFError):
                    self.closed = True
                    self.sock.close()
                    raise
                if number == self.number:  # else a late answer to a scrape that timed out
                    return text.decode("utf-8")


class WorkerCollector:
    """Parent side: a prometheus_client collector that gathers every worker's series.

    ``sockets[i]`` is the parent's end of worker ``i``'s pair (see :func:`answer_scrapes`).
    """

    def __init__(self, sockets: Sequence[socket.socket], timeout: float = 5.0) -> None:
        self._channels = [_Channel(sock) for sock in sockets]
        self.timeout = timeout  # seconds a scrape waits for each worker to start answering

    def describe(self) -> Iterable[Metric]:
        return []  # names are only known at scrape time; registering must not ask the workers

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        up = GaugeMetricFamily("switchyard_worker_up", "1 when this serve worker answered the scrape, else 0.",
                               labels=["worker"])
        for index, channel in enumerate(self._channels):
            worker = str(index)
            try:
                text = channel.ask(self.timeout)
            except (OSError, EOFError) as exc:
                log.warning("a worker did not answer the metrics scrape", extra={"worker": index, "error": str(exc)})
                up.add_metric([worker], 0)
                continue
            up.add_metric([worker], 1)
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": worker}, sample.value,
                                      sample.timestamp, sample.exemplar)
        return [*families.values(), up]

    def close(self) -> None:
        for channel in self._channels:
            with channel.lock:
                channel.closed = True
                channel.sock.close()
