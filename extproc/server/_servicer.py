"""The ext_proc gRPC servicer: one bidirectional stream per HTTP request.

Envoy sends request headers, then the buffered request body; the servicer answers each
with exactly one message, and ends the stream (gRPC OK) after the last answer the request
needs: the body answer, an immediate response, or the headers answer of a request without
a body. Envoy then treats processing as complete, so a routed request never depends on
this process again (a restart or ``kill -9`` cannot cut a completion mid-stream), and no
response phase reaches switchyard: the shipped configs take the decision headers from the
dynamic metadata. Parsing
and the policy run inline on the event loop: they are pure and take microseconds. Each
stream pins the policy engine it started with, so a policy reload
(:class:`~extproc.server._reload.PolicyFile`) never changes a request mid-flight. After the
decision, a request the policy's ``capture:`` section samples is handed to the
:class:`~extproc.server._capture.CaptureWriter` (a queue append; the disk is another thread's job).
With a shadow policy (``serve --shadow``), once the body answer has been handed to gRPC the
request is offered to the :class:`~extproc.server._shadow.Shadow`, which decides it again in a task
of its own: the live answer never waits for the shadow, nor fails with it. With ``budgets:``, a
second, observe-only filter (the usage filter) opens its own stream per response, starting with
the response headers; :class:`~extproc.traffic._usage.UsageCorrections` reads it and corrects
the request's charge, answering nothing (Envoy does not wait for it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from extproc.server._capture import CaptureWriter
from extproc.engine._decision import Decision
from extproc.engine._engine import PolicyEngine, SignalMemo
from extproc._errors import RequestError
from extproc.server._mutations import (
    CONTINUE,
    continue_headers,
    error_response,
    failover_body_response,
    routed_body_response,
)
from extproc._contract import HEADER_PREFIX, MODEL_SLOT
from extproc.request._body import RoutingRequest, body_too_large, is_json_content_type, parse_json_body, rewrite_model
from extproc.scorers._interface import ScoresNeeded
from extproc.scoring._decide import decide_with_scores
from extproc.server._shadow import Shadow
from extproc.traffic._budgets import FleetLimits
from extproc.traffic._failover import failover_for, record_failover
from extproc.traffic._health import BackendHealth
from extproc.traffic._sessions import Sessions
from extproc.traffic._usage import UsageCorrections
from extproc.telemetry._instruments import Telemetry, start_decide_span

__all__ = ["ExternalProcessor", "RequestStream"]

log = logging.getLogger("switchyard.extproc")


def _header_map(message: ext.HttpHeaders) -> dict[str, str]:
    """Header names (Envoy sends them in lower case) to values; a repeated header's values
    are joined with commas, as HTTP allows."""
    headers = message.headers.headers
    out = {h.key: h.raw_value.decode("utf-8", "replace") or h.value for h in headers}
    if len(out) < len(headers):  # a repeated header: the comprehension kept only its last value
        out = {}
        for header in headers:
            key, value = header.key, header.raw_value.decode("utf-8", "replace") or header.value
            out[key] = f"{out[key]},{value}" if key in out else value
    return out


class RequestStream:
    """The state of one HTTP request's ext_proc stream, and its answers."""

    def __init__(self, engine: PolicyEngine, telemetry: Telemetry, capture: CaptureWriter | None = None,
                 sessions: Sessions | None = None, limits: FleetLimits | None = None,
                 health: BackendHealth | None = None) -> None:
        self.engine = engine
        self.telemetry = telemetry
        self.capture = capture
        self.sessions = sessions
        self.limits = limits
        self.health = health
        self.request: RoutingRequest | None = None
        self.routed = False
        self.arrival = time.monotonic()  # scorer deadlines count from here
        self.done = False  # the answer just given is the last one this request needs
        self.decided: Decision | None = None  # the routing decision, once made
        self.memo: SignalMemo | None = None  # the request's signals and health view, once its body is parsed

    def handle(self, message: ext.ProcessingRequest) -> ext.ProcessingResponse | Awaitable[ext.ProcessingResponse]:
        phase = message.WhichOneof("request")
        if phase == "request_headers":
            self.done = message.request_headers.end_of_stream  # no body follows: nothing more to answer
            return self.on_request_headers(message.request_headers)
        if phase == "request_body":
            self.done = True  # BUFFERED: the whole body in one message, the last phase switchyard needs
            return self.on_request_body(message.request_body)
        return CONTINUE[phase]  # trailers, response body: nothing to change

    def on_request_headers(self, message: ext.HttpHeaders) -> ext.ProcessingResponse:
        headers = _header_map(message)
        method = headers.get(":method", "")
        path = headers.get(":path", "").split("?", 1)[0]
        self.request = RoutingRequest(method=method, path=path, headers=headers)
        routing = self.engine.policy.routing
        self.routed = method == "POST" and path in routing.paths and is_json_content_type(headers.get("content-type"))
        # Envoy strips client-sent x-switchyard-* headers first; removing them here too
        # keeps a misconfigured filter chain from letting a client pick the backend.
        spoofed = []
        if HEADER_PREFIX in "\n".join(headers):  # one substring search instead of one per header
            spoofed = [name for name in headers if name.startswith(HEADER_PREFIX)]
        if self.routed:
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > routing.max_body_bytes:
                return self._reject(body_too_large(int(length), routing.max_body_bytes))
            if message.end_of_stream:  # no body at all: a chat completion needs one
                return self._reject(RequestError("The request has no body; expected a JSON object.", code="missing_body"))
        return continue_headers(spoofed)

    def on_request_body(self, message: ext.HttpBody) -> ext.ProcessingResponse | Awaitable[ext.ProcessingResponse]:
        if not self.routed or self.request is None:
            return CONTINUE["request_body"]
        return self._route(message.body)

    def _route(self, raw: bytes) -> ext.ProcessingResponse | Awaitable[ext.ProcessingResponse]:
        """The body answer; an awaitable of it when a rule needs learned scores (cheap rules
        decide without ever leaving this call)."""
        assert self.request is not None
        started = time.perf_counter()
        span = start_decide_span(self.telemetry, self.request.headers)  # joins the caller's traceparent
        try:
            self.request.body = parse_json_body(raw, max_bytes=self.engine.policy.routing.max_body_bytes)
            memo = self.memo = SignalMemo(
                self.request, self.limits.thresholds(self.engine.policy) if self.limits else None,
                unhealthy=self.health.unhealthy(self.engine.policy) if self.health is not None else ())
            if self.sessions is not None and (session := self.sessions.key(self.engine, self.request)) is not None:
                return self._route_session(raw, session, memo, started, span)  # awaits the fleet-state store
            decision = self.engine.decide(self.request, memo=memo)
        except RequestError as error:
            return self._rejected(error, span)
        except ScoresNeeded as need:
            return self._route_scored(raw, need, memo, started, span)
        if self.limits is not None and self.limits.applies(self.engine.policy):  # budgets, share: the store
            return self._route_limited(raw, decision, memo, started, span)
        return self._routed(raw, decision, started, span)

    async def _route_scored(self, raw: bytes, need: ScoresNeeded, memo: SignalMemo, started: float,
                            span) -> ext.ProcessingResponse:
        assert self.request is not None
        try:
            decision = await decide_with_scores(
                self.engine, self.request, arrival=self.arrival, first_need=need, memo=memo, telemetry=self.telemetry,
                span=span,
            )
            if self.limits is not None:
                decision = await self.limits.settle(self.engine, self.request, decision, memo)
        except RequestError as error:
            return self._rejected(error, span)
        return self._routed(raw, decision, started, span)

    async def _route_session(self, raw: bytes, session: str, memo: SignalMemo, started: float,
                             span) -> ext.ProcessingResponse:
        assert self.request is not None and self.sessions is not None
        try:
            decision = await self.sessions.decide(self.engine, self.request, session, memo=memo,
                                                  arrival=self.arrival, span=span)
            if self.limits is not None:
                decision = await self.limits.settle(self.engine, self.request, decision, memo)
        except RequestError as error:
            return self._rejected(error, span)
        return self._routed(raw, decision, started, span)

    async def _route_limited(self, raw: bytes, decision: Decision, memo: SignalMemo, started: float,
                             span) -> ext.ProcessingResponse:
        """A cheap rule's decision, after its budget and the share controller (:class:`FleetLimits`)."""
        assert self.request is not None and self.limits is not None
        try:
            decision = await self.limits.settle(self.engine, self.request, decision, memo)
        except RequestError as error:
            return self._rejected(error, span)
        return self._routed(raw, decision, started, span)

    def _rejected(self, error: RequestError, span) -> ext.ProcessingResponse:
        if span is not None:
            span.set_attribute("switchyard.error", error.code)
            span.end()
        return self._reject(error)

    def _routed(self, raw: bytes, decision: Decision, started: float, span) -> ext.ProcessingResponse:
        assert self.request is not None
        if span is not None:
            span.set_attributes({"switchyard.backend": decision.backend.name, "switchyard.rule": decision.rule})
            span.end()
        self.telemetry.decision_time.record(time.perf_counter() - started)
        self.telemetry.decisions.add(
            1, {"backend": decision.backend.name, "rule": decision.rule, "fallback": decision.fallback or ""}
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug("decision", extra={"backend": decision.backend.name, "rule": decision.rule,
                                         "signals": {k: r.matched for k, r in decision.signals.items()}})
        failover = failover_for(self.engine, self.request, decision, raw, self.memo)
        if failover is not None and failover.retries:  # each attempt's Lua filter puts its model in the slot
            rewritten = rewrite_model(raw, self.request.body, MODEL_SLOT)
        else:
            rewritten = rewrite_model(raw, self.request.body, decision.model) if decision.rewrite_model else None
        if failover is None:
            response = routed_body_response(decision, rewritten)
        else:
            response = failover_body_response(decision, failover.chain, rewritten)
            record_failover(self.telemetry, decision, failover)
        self.decided = decision
        capture = self.engine.policy.capture
        if self.capture is not None and capture.enabled:
            self.capture.offer(capture, self.request.headers, self.request.body["messages"], decision)
        return response

    def _reject(self, error: RequestError) -> ext.ProcessingResponse:
        self.telemetry.rejections.add(1, {"status": error.status, "code": error.code})
        log.info("request rejected", extra={"status": error.status, "code": error.code})
        return error_response(error)


class ExternalProcessor(ext_grpc.ExternalProcessorServicer):
    """``envoy.service.ext_proc.v3.ExternalProcessor`` backed by a policy engine.

    ``engine`` is called once per stream, so a reloaded policy applies to new requests (its
    ``capture:`` section too). ``capture`` writes the requests that section samples; ``None``:
    nothing is captured. ``shadow`` decides every routed request again after its answer has
    gone (``None``: no shadow policy). ``sessions``: the pins of the policies' ``sessions:``
    sections (``None``: every request is decided alone). ``limits``: the budgets and large-share
    controller of the policies' ``budgets:`` / ``share:`` sections (``None``: neither applies).
    ``health``: the backends Envoy reports down (``serve --envoy-admin``), which the rules skip
    (``None``: every backend counts as healthy). ``usage``: corrects budget charges from the
    responses the rendered usage filter sends (a stream that starts with the response headers;
    ``None``: such a stream is answered "continue", phase by phase).
    """

    def __init__(self, engine: Callable[[], PolicyEngine], telemetry: Telemetry | None = None,
                 capture: CaptureWriter | None = None, shadow: Shadow | None = None,
                 sessions: Sessions | None = None, limits: FleetLimits | None = None,
                 health: BackendHealth | None = None, usage: UsageCorrections | None = None) -> None:
        self._engine = engine
        self._telemetry = telemetry or Telemetry()
        self._capture = capture
        self._shadow = shadow
        self._sessions = sessions
        self._limits = limits
        self._health = health
        self._usage = usage

    async def Process(
        self, request_iterator: AsyncIterator[ext.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ext.ProcessingResponse]:
        stream = RequestStream(self._engine(), self._telemetry, self._capture, self._sessions, self._limits,
                               self._health)
        async for message in request_iterator:
            if stream.request is None and self._usage is not None and message.HasField("response_headers"):
                await self._observe_usage(message, request_iterator)  # the usage filter's stream
                return
            try:
                response = stream.handle(message)
                if not isinstance(response, ext.ProcessingResponse):  # the body needs learned scores
                    response = await response
            except Exception:  # a bug must fail this request closed, not kill the server
                log.exception("internal error while processing a request")
                response = error_response(RequestError("Internal routing error.", status=500, code="internal_error"))
            final = stream.done or response.HasField("immediate_response")
            try:
                yield response
            finally:
                # Once the answer has gone. Not after the yield alone: Envoy may end the stream
                # as soon as it has the answer, and gRPC then closes this generator at the yield.
                if final and self._shadow is not None and stream.decided is not None:
                    self._offer_shadow(stream)
            if final:
                # End the stream (gRPC OK): Envoy marks processing complete, so the routed
                # request no longer depends on this process (a restart cannot cut it).
                return

    async def _observe_usage(self, first: ext.ProcessingRequest,
                             rest: AsyncIterator[ext.ProcessingRequest]) -> None:
        try:
            await self._usage.observe(first, rest)
        except Exception:  # noqa: BLE001 - Envoy does not wait for this stream; nothing to answer
            log.exception("reading a response's usage failed")

    def _offer_shadow(self, stream: RequestStream) -> None:
        try:
            self._shadow.offer(stream.request, stream.decided, stream.engine.policy)
        except Exception:  # noqa: BLE001 - the shadow never fails a request that was answered
            log.exception("offering a request to the shadow policy failed")
