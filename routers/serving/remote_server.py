"""``switchyard scorer serve``: in-process scorers behind the ``switchyard.v1.ScorerService`` API.

A fleet of CPU sidecars can share GPU scorer pods: each sidecar's policy names a scorer with
``remote: {target: ...}`` (:class:`extproc.scoring._remote.RemoteScorer`), and this server
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

Per call, cheapest check first (:class:`ServerLimits`, the ``scorer serve`` flags; no call
is tokenized or queued before it passed them all)::

    gRPC reads the length prefix: over --max-message-bytes ─► RESOURCE_EXHAUSTED (by gRPC, never parsed)
    loading / stopping ─► UNAVAILABLE      unknown scorer ─► NOT_FOUND (its name cut short)
    caller over --max-in-flight-per-caller, or server over --max-in-flight ─► RESOURCE_EXHAUSTED
    bad JSON, over --max-messages / --max-parts, an empty or unknown `available` ─► INVALID_ARGUMENT
    score with deadline = min(the call's gRPC deadline, or the scorer's deadline_ms; --max-deadline-ms)
        ─► the scorer's queue refuses it (ScorerOverloaded) ─► RESOURCE_EXHAUSTED
        ─► missed ─► DEADLINE_EXCEEDED    scorer failure / non-finite number ─► INTERNAL

A caller is the host of its connection (``context.peer()``, :func:`peer_host`): one caller
cannot hold more than its share of the server, so a flooding client gets "busy" at once
while the others are still scored. When a call ends (answered, past its deadline, or
cancelled by a caller that has gone), the work its scorer left queued for it (the shared
prefill kept in the request's ``scratch``) is cancelled, so it is dropped before its
forward. Answers never echo the request; prompts are never logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from extproc import (
    DEFAULT_GRACE_S,
    RoutingRequest,
    Scorer,
    ScorerDescription,
    ScorerFailure,
    ScorerSpec,
    Scores,
    SwitchyardError,
    describe_scorer,
    load_scorer,
    pem_problem,
    score_within,
    scorer_message,
)
from switchyard.v1 import scorer_pb2, scorer_pb2_grpc

__all__ = ["SERVICE_NAME", "SERVER_OPTIONS", "ScorerServer", "ScorerServicer", "ServerLimits", "ServerTls",
           "peer_host", "serve_scorers"]

log = logging.getLogger("switchyard.scorer_server")

#: The gRPC service name, also the health service's per-service key.
SERVICE_NAME = scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"].full_name

#: Server channel options (the largest request comes from :attr:`ServerLimits.max_message_bytes`).
#: ``max_connection_age`` makes clients reconnect, and so re-resolve a DNS target, every few
#: minutes: new pods behind a headless Service get traffic. Keepalive pings from clients
#: (every 10 s, see ``extproc.scoring._remote``) are permitted.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 30 * 1000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)


@dataclass(frozen=True)
class ServerLimits:
    """What one call may ask of the server, each checked before any work for it starts.

    Every field is the ``scorer serve`` flag of its name (``max_messages`` ->
    ``--max-messages``, :meth:`flag`); the defaults here are the flags' defaults. Errors
    name the flag and the bad value."""

    #: Largest request, in bytes. gRPC refuses a bigger one (RESOURCE_EXHAUSTED) from its
    #: length prefix, before reading it. 4 MiB: four times the sidecar's default body limit
    #: (``routing.max_body_bytes``, 1 MiB), whose chat messages are most of a call; raise
    #: both together.
    max_message_bytes: int = 4 * 1024 * 1024
    #: Most chat messages in one call (INVALID_ARGUMENT beyond).
    max_messages: int = 256
    #: Most content parts in one call, over all its messages: each entry of a list
    #: ``content`` (text, ``image_url``), a string ``content`` counting one (INVALID_ARGUMENT beyond).
    max_parts: int = 1024
    #: Longest deadline honoured, in milliseconds: a call asking more, or carrying none, gets
    #: this. 1000: the sidecar's Envoy ``message_timeout``; no sidecar waits longer.
    max_deadline_ms: float = 1000.0
    #: Most calls in flight on the whole server (RESOURCE_EXHAUSTED "busy" beyond). 256: the
    #: micro-batcher's queue at the default ``batch.max_size`` of 32 (8 x 32), so a full
    #: server answers "busy" before any scorer's queue overflows.
    max_in_flight: int = 256
    #: Most calls in flight from one caller (:func:`peer_host`; RESOURCE_EXHAUSTED "busy"
    #: beyond): a quarter of ``max_in_flight``, so one caller never takes the whole server.
    max_in_flight_per_caller: int = 64

    @staticmethod
    def flag(field: str) -> str:
        """The ``scorer serve`` flag that sets ``field``."""
        return "--" + field.replace("_", "-")

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SwitchyardError(f"{self.flag(field.name)} must be a positive whole number, got {value!r}.")
        if isinstance(self.max_deadline_ms, bool) or not isinstance(self.max_deadline_ms, (int, float)) \
                or not (math.isfinite(self.max_deadline_ms) and self.max_deadline_ms > 0):
            raise SwitchyardError(f"{self.flag('max_deadline_ms')} must be a number of milliseconds > 0, "
                                  f"got {self.max_deadline_ms!r}.")
        if self.max_in_flight_per_caller > self.max_in_flight:
            raise SwitchyardError(
                f"{self.flag('max_in_flight_per_caller')} ({self.max_in_flight_per_caller}) must not exceed "
                f"{self.flag('max_in_flight')} ({self.max_in_flight}).")

    def server_options(self) -> tuple[tuple[str, int], ...]:
        """The gRPC server options: :data:`SERVER_OPTIONS` and the largest request."""
        return (("grpc.max_receive_message_length", self.max_message_bytes), *SERVER_OPTIONS)


@dataclass(frozen=True)
class ServerTls:
    """The server's TLS: PEM files of its certificate (chain) and key, and optionally the CA
    whose clients it accepts (set: clients must present a certificate it signed: mutual TLS).
    Errors name the ``scorer serve`` flag of the file (:attr:`FLAGS`)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    #: field -> the ``scorer serve`` flag that sets it, for messages (``routers.serving.cli`` declares them).
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
            problem = pem_problem(data, "private key" if field == "key" else "certificate")
            if problem is not None:
                raise SwitchyardError(f"{self.FLAGS[field]} file {str(path)!r} {problem}.")
            return data

        key, cert = read("key"), read("cert")
        client_ca = read("client_ca") if self.client_ca is not None else None
        configuration = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
        return configuration, (key, cert, client_ca or b"")


Loader = Callable[[ScorerSpec], Scorer]
Describer = Callable[[ScorerSpec], ScorerDescription]
#: Who a call comes from, for the per-caller limit (default :func:`peer_host`).
CallerOf = Callable[[grpc.aio.ServicerContext], str]

#: How much of a caller-supplied name an answer shows (a name can be megabytes long).
_SHOWN_CHARS = 64
#: The longest sentence an error answer carries.
_DETAIL_CHARS = 1024
#: The status a failed call answers with, by the :class:`~extproc.ScorerFailure` reason.
_CODE_OF_REASON = {
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "overload": grpc.StatusCode.RESOURCE_EXHAUSTED,  # refused at once by the scorer's own queue: busy
    "error": grpc.StatusCode.INTERNAL,
    "non_finite": grpc.StatusCode.INTERNAL,
}


def peer_host(context: grpc.aio.ServicerContext) -> str:
    """The caller of a call: the host of its connection (``ipv4:10.0.0.7:51234`` ->
    ``10.0.0.7``, ``ipv6:[fd00::7]:51234`` -> ``fd00::7``; any other peer as it is). Each
    sidecar pod has its own address, and it cannot be chosen by what a call carries."""
    peer = urllib.parse.unquote(context.peer() or "")
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return address.rpartition(":")[0].strip("[]")
    return peer


def _shown(name: str) -> str:
    """``name`` quoted for an answer, cut to :data:`_SHOWN_CHARS` characters."""
    if len(name) <= _SHOWN_CHARS:
        return repr(name)
    return f"{name[:_SHOWN_CHARS]!r}... ({len(name)} characters)"


def _messages(raw: bytes, limits: ServerLimits) -> list[dict[str, Any]]:
    """The request's chat messages, or ValueError saying what is wrong with them (never
    quoting them): not JSON, not a list of messages, more messages or parts than ``limits``."""
    try:
        messages = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"`messages` is not valid JSON: {exc}.") from exc
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"`messages` must be a non-empty JSON list, got {type(messages).__name__}.")
    if len(messages) > limits.max_messages:
        raise ValueError(f"`messages` has {len(messages)} messages; this server takes at most "
                         f"{limits.max_messages} per call ({limits.flag('max_messages')}).")
    parts = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"`messages[{index}]` must be an object with a string `role`.")
        content = message.get("content")
        parts += len(content) if isinstance(content, list) else 1
    if parts > limits.max_parts:
        raise ValueError(f"`messages` has {parts} content parts; this server takes at most "
                         f"{limits.max_parts} per call ({limits.flag('max_parts')}).")
    return messages


def _available(request: scorer_pb2.ScoreRequest, description: ScorerDescription | None) -> tuple[str, ...] | None:
    """The request's availability mask (None: every pool model), or ValueError when it is
    empty or names a model the scorer's pool does not have."""
    if not request.has_available:
        return None
    available = tuple(request.available)
    if not available:
        raise ValueError("`available` is empty: no pool model may be scored "
                         "(leave `has_available` false to score them all).")
    pool = description.pool if description is not None else ()
    if pool:
        unknown = [name for name in available if name not in pool]
        if unknown:
            raise ValueError(f"`available` names {len(unknown)} model(s) not in this scorer's pool, "
                             f"first {_shown(unknown[0])}; the pool: {', '.join(pool)}.")
    return available


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, detail: str) -> None:
    """End the call (raises) with ``code`` and ``detail``, cut to :data:`_DETAIL_CHARS` (gRPC
    carries it in a trailer, whose size the client limits: a longer one would arrive as another error)."""
    if len(detail) > _DETAIL_CHARS:
        detail = detail[:_DETAIL_CHARS - 3] + "..."
    await context.abort(code, detail)


def _abandon(request: RoutingRequest) -> None:
    """Cancel the work the scorers left pending for ``request`` (e.g. the shared prefill,
    kept in its ``scratch``): the call is over, so nobody waits for it, and a cancelled
    entry is dropped from the batcher's queue before its forward."""
    for value in request.scratch.values():
        if isinstance(value, asyncio.Future) and not value.done():
            value.cancel()


class _Admission:
    """The calls in flight, on the server and per caller, within :class:`ServerLimits`."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.total = 0
        self.by_caller: collections.Counter[str] = collections.Counter()

    def refusal(self, caller: str) -> str | None:
        """Why a new call of ``caller`` cannot start now (None: it can)."""
        limits = self.limits
        if self.by_caller[caller] >= limits.max_in_flight_per_caller:
            return (f"The scorer service is busy: this caller already has {self.by_caller[caller]} calls in flight "
                    f"({limits.flag('max_in_flight_per_caller')} {limits.max_in_flight_per_caller}).")
        if self.total >= limits.max_in_flight:
            return (f"The scorer service is busy: {self.total} calls are in flight "
                    f"({limits.flag('max_in_flight')} {limits.max_in_flight}).")
        return None

    @contextlib.contextmanager
    def held(self, caller: str) -> Iterator[None]:
        self.total += 1
        self.by_caller[caller] += 1
        try:
            yield
        finally:
            self.total -= 1
            self.by_caller[caller] -= 1
            if not self.by_caller[caller]:
                del self.by_caller[caller]


class ScorerServicer(scorer_pb2_grpc.ScorerServiceServicer):
    """Answers Score and Describe from the scorers loaded so far (none until ``ready``),
    within ``limits``; ``caller`` names who a call comes from (default :func:`peer_host`)."""

    def __init__(self, specs: Mapping[str, ScorerSpec], limits: ServerLimits | None = None,
                 caller: CallerOf = peer_host) -> None:
        self.specs = dict(specs)
        self.limits = limits if limits is not None else ServerLimits()
        self.admission = _Admission(self.limits)
        self.caller = caller
        self.scorers: dict[str, Scorer] = {}
        self.descriptions: dict[str, ScorerDescription] = {}
        self.ready = False
        self.stopping = False

    async def Score(self, request: scorer_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> scorer_pb2.ScoreResponse:
        if self.stopping or not self.ready:
            state = "shutting down" if self.stopping else "still loading its scorers"
            await _abort(context, grpc.StatusCode.UNAVAILABLE, f"The scorer service is {state}.")
        scorer = self.scorers.get(request.scorer)
        if scorer is None:
            served = ", ".join(self.scorers) or "none"
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"No scorer named {_shown(request.scorer)} is served here; served: {served}.")
        caller = self.caller(context)
        refusal = self.admission.refusal(caller)
        if refusal is not None:
            log.debug("refused: busy", extra={"scorer": request.scorer, "caller": caller})
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        with self.admission.held(caller):
            return await self._score(scorer, request, context)

    async def _score(self, scorer: Scorer, request: scorer_pb2.ScoreRequest,
                     context: grpc.aio.ServicerContext) -> scorer_pb2.ScoreResponse:
        try:
            messages = _messages(request.messages, self.limits)
            available = _available(request, self.descriptions.get(scorer.spec.name))
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        asked = remaining if remaining is not None else scorer.spec.deadline_ms / 1000
        budget = min(asked, self.limits.max_deadline_ms / 1000)
        started = time.monotonic()
        scores, code, detail = await self._run(scorer, messages, started + budget, available)
        elapsed_ms = (time.monotonic() - started) * 1000
        log.debug("scored", extra={"scorer": scorer.spec.name, "request_id": request.request_id[:_SHOWN_CHARS],
                                   "ms": round(elapsed_ms, 3), "status": code.name})
        if scores is None:
            await _abort(context, code, detail)
        return scorer_pb2.ScoreResponse(values=scores.values, costs=scores.costs, batch_size=scores.batch_size)

    async def _run(self, scorer: Scorer, messages: list[dict[str, Any]], deadline: float,
                   available: tuple[str, ...] | None = None) -> tuple[Scores | None, grpc.StatusCode, str]:
        """The scores, or None with the status code and sentence to answer with."""
        request = RoutingRequest.from_json({"messages": messages})
        try:
            outcome = await score_within(scorer, request, deadline, available)
        finally:
            _abandon(request)  # answered, late or cancelled: what is still queued for it goes
        if isinstance(outcome, ScorerFailure):
            return None, _CODE_OF_REASON[outcome.reason], scorer_message(scorer.spec.name, outcome.detail)
        return outcome, grpc.StatusCode.OK, ""

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
    :func:`extproc.describe_scorer` (the in-process runtimes); tests inject their own, and
    their own ``caller`` (who a call comes from; default :func:`peer_host`).
    ``tls`` None: a plaintext port. ``limits``: what one call may ask (default :class:`ServerLimits`).
    """

    def __init__(self, specs: Mapping[str, ScorerSpec], listen: str, *, grace: float = DEFAULT_GRACE_S,
                 loader: Loader = load_scorer, describer: Describer = describe_scorer,
                 tls: ServerTls | None = None, limits: ServerLimits | None = None,
                 caller: CallerOf = peer_host) -> None:
        for name, spec in specs.items():
            if spec.remote is not None:
                raise SwitchyardError(
                    f"Scorer {name!r} is remote ({spec.remote.target}); a scorer service serves only in-process scorers."
                )
        self.listen = listen
        self.grace = grace
        self.tls = tls
        self.port = 0
        self.servicer = ScorerServicer(specs, limits, caller)
        self.health = HealthServicer()
        self._loader = loader
        self._describer = describer
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind ``listen`` and answer (health NOT_SERVING, Score UNAVAILABLE until :meth:`load`)."""
        credentials = self.tls.credentials() if self.tls is not None else None  # a bad file: nothing listens
        server = grpc.aio.server(options=self.servicer.limits.server_options())
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


def serve_scorers(config: Path, listen: str, *, grace: float = DEFAULT_GRACE_S, tls: ServerTls | None = None,
                  limits: ServerLimits | None = None) -> int:
    """Serve the scorers of ``config`` on ``listen`` (over ``tls`` when given, within
    ``limits``, default :class:`ServerLimits`) until SIGTERM / SIGINT (blocking).

    A bad config raises :class:`~extproc.PolicyError` before anything listens; a scorer
    that fails to load raises after the port was bound, and the server stops."""
    from extproc import read_scorer_specs  # the policy machinery, only for the CLI

    if grace < 0:
        raise SwitchyardError(f"--grace must be >= 0 seconds, got {grace}.")
    specs = read_scorer_specs(config)
    if not specs:
        raise SwitchyardError(f"{config} defines no scorers; nothing to serve.")
    asyncio.run(_serve_async(ScorerServer(specs, listen, grace=grace, tls=tls, limits=limits)))
    return 0
