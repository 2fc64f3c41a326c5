"""The gRPC client of a remote scorer: a :class:`Scorer` served by ``switchyard scorer serve``.

A policy's ``scorers.<name>.remote: {target, scorer}`` makes :func:`load_scorer` return a
:class:`RemoteScorer`. Each ``score`` call is one unary ``switchyard.v1.ScorerService/Score``
RPC (``proto/switchyard/v1/scorer.proto``; generated code: ``switchyard.v1``) carrying the
request's chat messages as JSON.

How the calls behave:

- **One channel per target and TLS settings**, created on first use on the running event
  loop and shared by every :class:`RemoteScorer` of that target and ``tls`` on that loop
  (two scorer names served by one fleet share connections). The last scorer to close
  closes it.
- **TLS** (``remote.tls``): the channel verifies the server's certificate against ``ca``
  (under ``server_name`` when set) and presents ``cert``/``key`` for mutual TLS. The PEM
  files are read when the channel is created; an unreadable file there, or a failed
  handshake (wrong CA, a server that refuses the client), is a :class:`ScorerError` like
  any unreachable server, so the policy takes its fallback. Without ``tls``: plaintext.
  Every :data:`TLS_RECHECK_S` a channel in use compares its files with what it read; when
  one changed (a renewed certificate), new calls get a new channel that reads them, and the
  old one closes when its last call is done: no restart.
- **Deadline**: the time left until the request's scoring deadline is the gRPC timeout, so
  the server sees it (``context.time_remaining()``) and stops working on a request nobody
  waits for. A deadline already passed fails without a call.
- **Balancing**: ``round_robin`` over every address the target resolves to. A
  ``dns:///scorer.ns.svc.cluster.local:50061`` target of a Kubernetes headless Service
  spreads calls over its pods; the name is re-resolved when a connection fails (at most
  once a second) and when the server's ``max_connection_age`` closes a connection.
- **No retries past the deadline**: the service config has no retry policy, so a call that
  reached a server is never repeated. gRPC's transparent retry (a call that never left this
  process or was refused before the server saw it, e.g. on a connection closing at that
  instant) stays on; like every attempt it is bounded by the call's deadline.
- **Fail fast**: ``wait_for_ready=False``, so while no server is reachable a call fails at
  once with UNAVAILABLE instead of waiting out its deadline; any gRPC error becomes a
  :class:`ScorerError` and the policy takes its fallback: DEADLINE_EXCEEDED a
  :class:`ScorerDeadline` (reason ``deadline``), RESOURCE_EXHAUSTED (the server is busy,
  or refused a call too big) a :class:`ScorerOverloaded` (reason ``overload``), every other
  code (UNAVAILABLE, INVALID_ARGUMENT, NOT_FOUND, INTERNAL, ...) a plain one (``error``).
  The server's sentence is kept, cut to :data:`DETAIL_CHARS`.
- **Reconnect fast**: reconnection backoff starts at 100 ms and is capped at 1 s, so a
  restarted scorer gets calls again soon after it is back, with no sidecar restart.
- **Dead peers**: HTTP/2 keepalive pings every 10 s (answered within 5 s) find a scorer pod
  that vanished without closing its connections; the server permits pings that often.
- A response with a non-finite number is a :class:`ScorerError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import grpc
import orjson

from extproc._errors import ScorerDeadline, ScorerError, ScorerOverloaded
from extproc.request._body import RoutingRequest
from extproc.scorers._interface import RemoteTls, Scorer, Scores, ScorerSpec
from switchyard.v1 import scorer_pb2, scorer_pb2_grpc

__all__ = ["RemoteScorer", "CHANNEL_OPTIONS"]

log = logging.getLogger("switchyard.remote_scorer")

_SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}]}

#: The options every remote-scorer channel is created with (see the module docstring).
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 1000),  # also the connect timeout of one attempt
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


#: Seconds between two looks of a TLS channel at its PEM files (see the module docstring).
TLS_RECHECK_S = 10.0

#: The most of a server's error sentence a :class:`ScorerError` carries.
DETAIL_CHARS = 512

#: The gRPC codes that are not a plain :class:`ScorerError` (see the module docstring).
_ERROR_OF_CODE: dict[grpc.StatusCode, type[ScorerError]] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: ScorerDeadline,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ScorerOverloaded,
}


@dataclass
class _Channel:
    channel: grpc.aio.Channel
    stub: scorer_pb2_grpc.ScorerServiceStub
    users: int = 0
    files: bytes = b""  # digest of the TLS files it was made from (b"": plaintext)
    checked: float = 0.0  # time.monotonic() of the last look at them
    renewed: bool = False  # a file changed: new calls take a new channel


#: What one shared channel is for: the target and its TLS settings (None: plaintext).
ChannelKey = tuple[str, RemoteTls | None]

# A grpc.aio channel belongs to the event loop it was created on: one table per loop.
_channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ChannelKey, _Channel]] = weakref.WeakKeyDictionary()


def _tls_files(name: str, tls: RemoteTls) -> tuple[bytes | None, bytes | None, bytes | None]:
    """What the ``ca``, ``cert`` and ``key`` files hold now; :class:`ScorerError` naming the
    one that cannot be read."""
    files = []
    for field in ("ca", "cert", "key"):
        path = getattr(tls, field)
        try:
            files.append(None if path is None else Path(path).read_bytes())
        except OSError as exc:
            raise ScorerError(
                f"Remote scorer {name!r}: cannot read `remote.tls.{field}` file {path!r}: {exc.strerror or exc}."
            ) from exc
    return files[0], files[1], files[2]


def _digest(files: tuple[bytes | None, ...]) -> bytes:
    digest = hashlib.sha256()
    for content in files:
        digest.update(b"none" if content is None else hashlib.sha256(content).digest())
    return digest.digest()


def _new_channel(name: str, target: str, tls: RemoteTls | None) -> tuple[grpc.aio.Channel, bytes]:
    """A channel to ``target``, and the digest of the TLS files it was made from (b"": plaintext)."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS), b""
    ca, cert, key = files = _tls_files(name, tls)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = CHANNEL_OPTIONS
    if tls.server_name is not None:
        options += (("grpc.ssl_target_name_override", tls.server_name),)
    return grpc.aio.secure_channel(target, credentials, options=options), _digest(files)


def _renewed(shared: _Channel, name: str, tls: RemoteTls | None) -> bool:
    """Whether ``shared``'s TLS files changed since it read them (looked at every
    :data:`TLS_RECHECK_S`; a file that cannot be read counts as changed)."""
    if tls is None or shared.renewed:
        return shared.renewed
    now = time.monotonic()
    if now - shared.checked >= TLS_RECHECK_S:
        shared.checked = now
        try:
            shared.renewed = _digest(_tls_files(name, tls)) != shared.files
        except ScorerError:
            shared.renewed = True
    return shared.renewed


def _acquire(name: str, key: ChannelKey) -> tuple[asyncio.AbstractEventLoop, _Channel]:
    loop = asyncio.get_running_loop()
    table = _channels.setdefault(loop, {})
    shared = table.get(key)
    if shared is None or _renewed(shared, name, key[1]):
        channel, files = _new_channel(name, *key)
        shared = table[key] = _Channel(channel, scorer_pb2_grpc.ScorerServiceStub(channel), files=files,
                                       checked=time.monotonic())
    shared.users += 1
    return loop, shared


async def _release(loop: asyncio.AbstractEventLoop, key: ChannelKey, shared: _Channel) -> None:
    shared.users -= 1
    if shared.users > 0:
        return
    table = _channels.get(loop, {})
    if table.get(key) is shared:
        del table[key]
    if loop is asyncio.get_running_loop():
        await shared.channel.close()


class RemoteScorer(Scorer):
    """Scores requests by calling ``switchyard scorer serve`` at ``spec.remote.target``.

    Cheap to build (no connection until the first ``score``); safe to share between
    concurrent requests of one event loop.
    """

    def __init__(self, spec: ScorerSpec) -> None:
        if spec.remote is None:
            raise ScorerError(f"Scorer {spec.name!r} has no `remote` section; it cannot be served remotely.")
        self.spec = spec
        self.target = spec.remote.target
        self._key: ChannelKey = (spec.remote.target, spec.remote.tls)
        #: The scorer's name on the server (``remote.scorer``, default this scorer's name).
        self.remote_name = spec.remote.scorer or spec.name
        self._held: tuple[asyncio.AbstractEventLoop, _Channel] | None = None
        self._closed = False

    def __repr__(self) -> str:
        tls = "" if self._key[1] is None else ", tls=True"
        return f"RemoteScorer({self.spec.name!r}, target={self.target!r}, scorer={self.remote_name!r}{tls})"

    async def _stub(self) -> scorer_pb2_grpc.ScorerServiceStub:
        if self._closed:
            raise ScorerError(f"Cannot score with remote scorer {self.spec.name!r}, as it has been closed.")
        loop = asyncio.get_running_loop()
        if self._held is not None and (
            self._held[0] is not loop  # used from a new event loop
            or _renewed(self._held[1], self.spec.name, self._key[1])  # its TLS files changed
        ):
            await _release(self._held[0], self._key, self._held[1])
            self._held = None
        if self._held is None:
            self._held = _acquire(self.spec.name, self._key)
        return self._held[1].stub

    async def score(
        self, request: RoutingRequest, *, deadline: float, available: Collection[str] | None = None
    ) -> Scores:
        """One Score RPC with the time left until ``deadline`` as its gRPC deadline
        (``available``: LatentRouter's pool models this request may go to)."""
        stub = await self._stub()
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise ScorerDeadline(f"Remote scorer {self.spec.name!r}: the deadline passed before the call was made.")
        call = scorer_pb2.ScoreRequest(
            scorer=self.remote_name,
            messages=orjson.dumps(request.messages),
            request_id=request.headers.get("x-request-id", ""),
            available=list(available or ()),
            has_available=available is not None,
        )
        try:
            response = await stub.Score(call, timeout=timeout, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, timeout) from exc
        scores = Scores(values=dict(response.values), costs=dict(response.costs), batch_size=response.batch_size)
        bad = scores.non_finite()
        if bad is not None:
            raise ScorerError(f"Remote scorer {self.spec.name!r} at {self.target} returned a non-finite {bad}.")
        return scores

    def _error(self, exc: grpc.aio.AioRpcError, timeout: float) -> ScorerError:
        """The :class:`ScorerError` (kind by :data:`_ERROR_OF_CODE`) for a failed call."""
        code = exc.code()
        details = exc.details() or ""
        if len(details) > DETAIL_CHARS:
            details = details[:DETAIL_CHARS - 3] + "..."
        log.debug("remote scorer call failed", extra={"scorer": self.spec.name, "target": self.target,
                                                      "code": code.name, "details": details})
        kind = _ERROR_OF_CODE.get(code, ScorerError)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return kind(f"Remote scorer {self.spec.name!r} at {self.target} did not answer within "
                        f"{timeout * 1000:.0f} ms (DEADLINE_EXCEEDED: {details})")
        return kind(f"Remote scorer {self.spec.name!r} at {self.target} failed: {code.name}: {details}")

    async def close(self) -> None:
        """Stop using the shared channel; the last scorer of a target closes it."""
        self._closed = True
        if self._held is not None:
            held, self._held = self._held, None
            await _release(held[0], self._key, held[1])
