"""``switchyard scorer serve``: in-process scorers behind the ``switchyard.v1.ScorerService`` API.

A fleet of CPU sidecars can share GPU scorer pods: each sidecar's policy names a scorer with
``remote: {target: ...}`` (:class:`extproc._remote_scorer.RemoteScorer`), and this server
scores its requests with the scorers of one config file (the ``scorers:`` section of a
policy, read with :func:`extproc.read_scorer_specs`).

Lifecycle::

    bind --listen ─► health NOT_SERVING ─► load every scorer (off the event loop, in order)
        ─► health SERVING ─► ... SIGTERM / SIGINT ─► health NOT_SERVING
        ─► server.stop(grace): in-flight calls finish, new ones are refused ─► scorers closed

TLS (``scorer serve --tls-cert --tls-key [--tls-client-ca]``, :class:`ServerTls`): the
scorer service and the health service answer on one port with one set of credentials; with
a client CA, only clients presenting a certificate it signed get past the handshake. Without
``tls`` the port is plaintext.

Per call: the scorer named in the request scores its ``messages`` with the caller's gRPC
deadline (``context.time_remaining()``) as its deadline (the scorer's ``deadline_ms`` when
the call has none). Errors answer with a status code and a sentence (see ``scorer.proto``):
an unknown scorer NOT_FOUND, a scorer failure INTERNAL, a missed deadline DEADLINE_EXCEEDED,
a call while loading or stopping UNAVAILABLE. Prompts are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from extproc import (
    RoutingRequest,
    Scorer,
    ScorerDescription,
    ScorerError,
    ScorerSpec,
    Scores,
    SwitchyardError,
    describe_scorer,
    load_scorer,
)
from switchyard.v1 import scorer_pb2, scorer_pb2_grpc

__all__ = ["SERVICE_NAME", "SERVER_OPTIONS", "ScorerServer", "ScorerServicer", "ServerTls", "serve_scorers"]

log = logging.getLogger("switchyard.scorer_server")

#: The gRPC service name, also the health service's per-service key.
SERVICE_NAME = scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"].full_name

#: Largest request accepted (chat messages with data: URL images can be big).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: Server channel options. ``max_connection_age`` makes clients reconnect, and so re-resolve
#: a DNS target, every few minutes: new pods behind a headless Service get traffic.
#: Keepalive pings from clients (every 10 s, see ``extproc._remote_scorer``) are permitted.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 30 * 1000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)


@dataclass(frozen=True)
class ServerTls:
    """The server's TLS: PEM files of its certificate (chain) and key, and optionally the CA
    whose clients it accepts (set: clients must present a certificate it signed: mutual TLS).
    Errors name the ``scorer serve`` flag of the file (:attr:`FLAGS`)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    #: field -> the ``scorer serve`` flag that sets it, for messages (``routers.scorer_cli`` declares them).
    FLAGS: ClassVar[dict[str, str]] = {"cert": "--tls-cert", "key": "--tls-key", "client_ca": "--tls-client-ca"}

    @classmethod
    def from_flags(cls, cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTls | None:
        """The TLS the flags ask for (None: plaintext); :class:`SwitchyardError` for a partial set."""
        flags = cls.FLAGS
        if cert is None and key is None:
            if client_ca is not None:
                raise SwitchyardError(f"{flags['client_ca']} needs {flags['cert']} and {flags['key']}: "
                                      f"mutual TLS runs over TLS.")
            return None
        if cert is None or key is None:
            given, missing = ("cert", "key") if cert is not None else ("key", "cert")
            raise SwitchyardError(f"{flags[given]} is set but {flags[missing]} is not; TLS needs both.")
        return cls(cert, key, client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials from the files, read now (:class:`SwitchyardError` when one cannot
        be read), and read again for each new connection: once a file changed (a renewed
        certificate, a rotated Secret), new connections get it, with no restart. A changed
        file that cannot be used yet (half written) keeps the last good ones, with a warning."""
        initial, files = self._configuration()
        last = {"files": files}

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                configuration, files = self._configuration()
            except SwitchyardError as exc:
                log.warning("scorer TLS files cannot be used; keeping the last good ones", extra={"error": str(exc)})
                return None
            if files == last["files"]:
                return None
            last["files"] = files
            log.info("scorer TLS files changed; new connections use them")
            return configuration

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=self.client_ca is not None)

    def _configuration(self) -> tuple[grpc.ServerCertificateConfiguration, tuple[bytes, ...]]:
        """The certificate configuration from the files as they are now, and their contents."""
        def read(field: str) -> bytes:
            path = getattr(self, field)
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise SwitchyardError(
                    f"{self.FLAGS[field]} file {str(path)!r} cannot be read: {exc.strerror or exc}."
                ) from exc
            if b"-----BEGIN " not in data:
                raise SwitchyardError(f"{self.FLAGS[field]} file {str(path)!r} is not a PEM file (no `-----BEGIN` line).")
            return data

        key, cert = read("key"), read("cert")
        client_ca = read("client_ca") if self.client_ca is not None else None
        configuration = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
        return configuration, (key, cert, client_ca or b"")


Loader = Callable[[ScorerSpec], Scorer]
Describer = Callable[[ScorerSpec], ScorerDescription]


def _messages(raw: bytes) -> list[dict[str, Any]]:
    """The request's chat messages, or ValueError saying what is wrong with them."""
    try:
        messages = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"`messages` is not valid JSON: {exc}.") from exc
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"`messages` must be a non-empty JSON list, got {type(messages).__name__}.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"`messages[{index}]` must be an object with a string `role`.")
    return messages


def _bad_number(scores: Scores) -> str | None:
    for field, numbers in (("values", scores.values), ("costs", scores.costs)):
        for name, value in numbers.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{field}[{name!r}] = {value!r}"
    return None


class ScorerServicer(scorer_pb2_grpc.ScorerServiceServicer):
    """Answers Score and Describe from the scorers loaded so far (none until ``ready``)."""

    def __init__(self, specs: Mapping[str, ScorerSpec]) -> None:
        self.specs = dict(specs)
        self.scorers: dict[str, Scorer] = {}
        self.descriptions: dict[str, ScorerDescription] = {}
        self.ready = False
        self.stopping = False

    async def Score(self, request: scorer_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> scorer_pb2.ScoreResponse:
        if self.stopping or not self.ready:
            state = "shutting down" if self.stopping else "still loading its scorers"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"The scorer service is {state}.")
        scorer = self.scorers.get(request.scorer)
        if scorer is None:
            served = ", ".join(self.scorers) or "none"
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"No scorer named {request.scorer!r} is served here; served: {served}.")
        try:
            messages = _messages(request.messages)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        budget = remaining if remaining is not None else scorer.spec.deadline_ms / 1000
        started = time.monotonic()
        available = tuple(request.available) if request.has_available else None
        scores, code, detail = await self._run(scorer, messages, started + budget, available)
        elapsed_ms = (time.monotonic() - started) * 1000
        log.debug("scored", extra={"scorer": request.scorer, "request_id": request.request_id,
                                   "ms": round(elapsed_ms, 3), "status": code.name})
        if scores is None:
            await context.abort(code, detail)
        return scorer_pb2.ScoreResponse(values=scores.values, costs=scores.costs, batch_size=scores.batch_size)

    async def _run(self, scorer: Scorer, messages: list[dict[str, Any]], deadline: float,
                   available: tuple[str, ...] | None = None) -> tuple[Scores | None, grpc.StatusCode, str]:
        """The scores, or None with the status code and sentence to answer with."""
        name = scorer.spec.name
        budget = deadline - time.monotonic()
        try:
            request = RoutingRequest.from_json({"messages": messages})
            scores = await asyncio.wait_for(scorer.score(request, deadline=deadline, available=available), budget)
        except (asyncio.TimeoutError, TimeoutError):
            return None, grpc.StatusCode.DEADLINE_EXCEEDED, f"Scorer {name!r} did not answer within {budget * 1000:.0f} ms."
        except ScorerError as exc:
            late = time.monotonic() >= deadline
            return None, grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.INTERNAL, f"Scorer {name!r}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a scorer bug answers INTERNAL, the server keeps serving
            log.exception("scorer raised", extra={"scorer": name})
            return None, grpc.StatusCode.INTERNAL, f"Scorer {name!r} failed: {type(exc).__name__}: {exc}"
        bad = _bad_number(scores)
        if bad is not None:
            return None, grpc.StatusCode.INTERNAL, f"Scorer {name!r} produced a non-finite score: {bad}."
        return scores, grpc.StatusCode.OK, ""

    async def Describe(self, request: scorer_pb2.DescribeRequest,
                       context: grpc.aio.ServicerContext) -> scorer_pb2.DescribeResponse:
        infos = []
        for name, description in self.descriptions.items():
            spec = self.specs[name]
            infos.append(scorer_pb2.ScorerInfo(
                name=name, kind=spec.kind, outputs=description.outputs, pool=description.pool,
                default_deadline_ms=spec.deadline_ms,
            ))
        return scorer_pb2.DescribeResponse(scorers=infos)


class ScorerServer:
    """One ``ScorerService`` + health service on ``listen``; :meth:`start`, :meth:`load`, :meth:`stop`.

    ``loader`` / ``describer`` default to :func:`extproc.load_scorer` /
    :func:`extproc.describe_scorer` (the in-process runtimes); tests inject their own.
    ``tls`` None: a plaintext port.
    """

    def __init__(self, specs: Mapping[str, ScorerSpec], listen: str, *, grace: float = 5.0,
                 loader: Loader = load_scorer, describer: Describer = describe_scorer,
                 tls: ServerTls | None = None) -> None:
        for name, spec in specs.items():
            if spec.remote is not None:
                raise SwitchyardError(
                    f"Scorer {name!r} is remote ({spec.remote.target}); a scorer service serves only in-process scorers."
                )
        self.listen = listen
        self.grace = grace
        self.tls = tls
        self.port = 0
        self.servicer = ScorerServicer(specs)
        self.health = HealthServicer()
        self._loader = loader
        self._describer = describer
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind ``listen`` and answer (health NOT_SERVING, Score UNAVAILABLE until :meth:`load`)."""
        credentials = self.tls.credentials() if self.tls is not None else None  # a bad file: nothing listens
        server = grpc.aio.server(options=SERVER_OPTIONS)
        scorer_pb2_grpc.add_ScorerServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(self.listen)
            else:
                self.port = server.add_secure_port(self.listen, credentials)
        except RuntimeError as exc:
            raise SwitchyardError(f"Cannot listen on {self.listen!r} (expected HOST:PORT): {exc}.") from exc
        await server.start()
        self._server = server
        return self.port

    async def load(self) -> None:
        """Load every scorer, one after another, off the event loop; then health SERVING.

        A scorer that fails to load raises (:class:`~extproc.CheckpointError` or
        :class:`~extproc.ScorerError`); the ones loaded before it are closed by :meth:`stop`."""
        servicer = self.servicer
        for name, spec in servicer.specs.items():
            started = time.monotonic()
            servicer.descriptions[name] = await asyncio.to_thread(self._describer, spec)
            servicer.scorers[name] = await asyncio.to_thread(self._loader, spec)
            log.info("scorer loaded", extra={"scorer": name, "kind": spec.kind,
                                             "seconds": round(time.monotonic() - started, 3)})
        servicer.ready = True
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight calls finish within ``grace``,
        then close every loaded scorer."""
        self.servicer.stopping = True
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.grace)
        scorers, self.servicer.scorers = self.servicer.scorers, {}
        for name, scorer in scorers.items():
            try:
                await scorer.close()
            except Exception:  # noqa: BLE001 - one scorer failing to close must not keep the others open
                log.exception("scorer close failed", extra={"scorer": name})


async def _serve_async(server: ScorerServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.start()
        host = server.listen.rpartition(":")[0]
        tls = "off" if server.tls is None else "mutual" if server.tls.client_ca is not None else "on"
        log.info("listening", extra={"listen": f"{host}:{port}", "scorers": list(server.servicer.specs),
                                     "tls": tls, "pid": os.getpid()})
        loading = asyncio.create_task(server.load(), name="load scorers")
        stopping = asyncio.create_task(stop.wait(), name="wait for SIGTERM")
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a scorer that failed to load stops the server
            print(f"switchyard: serving scorers {', '.join(server.servicer.specs)} on {host}:{port}",
                  file=sys.stderr, flush=True)
            await stopping
        else:  # stopped while loading: abandon the load (a load already in its thread finishes there)
            loading.cancel()
        log.info("stopping", extra={"grace_s": server.grace})
    finally:
        await server.stop()


def serve_scorers(config: Path, listen: str, *, grace: float = 5.0, tls: ServerTls | None = None) -> int:
    """Serve the scorers of ``config`` on ``listen`` (over ``tls`` when given) until SIGTERM /
    SIGINT (blocking).

    A bad config raises :class:`~extproc.PolicyError` before anything listens; a scorer
    that fails to load raises after the port was bound, and the server stops."""
    from extproc import read_scorer_specs  # the policy machinery, only for the CLI

    if grace < 0:
        raise SwitchyardError(f"--grace must be >= 0 seconds, got {grace}.")
    specs = read_scorer_specs(config)
    if not specs:
        raise SwitchyardError(f"{config} defines no scorers; nothing to serve.")
    asyncio.run(_serve_async(ScorerServer(specs, listen, grace=grace, tls=tls)))
    return 0
