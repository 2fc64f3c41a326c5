"""Logs, metrics and traces: the instruments switchyard records into, and its spans.

Logs are one JSON object a line (``logging`` with :class:`JsonFormatter`); prompts and
bodies are never logged at info level. Metrics and traces go through the OpenTelemetry
API: they cost next to nothing until an SDK is configured, which ``switchyard serve`` does
for ``--metrics-listen`` and the standard ``OTEL_*`` variables
(:mod:`extproc.telemetry._setup`).

Metric names as Prometheus shows them (dots become underscores, the unit is appended,
counters end in ``_total``)::

    switchyard.decisions          switchyard_decisions_total{backend, rule, fallback}
    switchyard.rejections         switchyard_rejections_total{status, code}
    switchyard.decision.duration  switchyard_decision_duration_seconds_bucket{le}
    switchyard.policy.reloads     switchyard_policy_reloads_total{result}
    switchyard.policy.info        switchyard_policy_info{digest}  (1 for the running policy)
    switchyard.scorer.duration    switchyard_scorer_duration_seconds_bucket{scorer, result, le}
    switchyard.scorer.batch.size  switchyard_scorer_batch_size_bucket{scorer, le}
    switchyard.scorer.failures    switchyard_scorer_failures_total{scorer, reason}
    switchyard.scorer.breaker.state  switchyard_scorer_breaker_state{scorer}  (0 closed, 1 open, 2 half-open)
    switchyard.capture.written    switchyard_capture_written_total
    switchyard.capture.dropped    switchyard_capture_dropped_total{reason}
    switchyard.shadow.decisions   switchyard_shadow_decisions_total{live, shadow}
    switchyard.shadow.cost        switchyard_shadow_cost_total{policy}  (policy: live, shadow)
    switchyard.shadow.large       switchyard_shadow_large_total{policy}
    switchyard.shadow.skipped     switchyard_shadow_skipped_total{reason}
    switchyard.sessions.pins      switchyard_sessions_pins_total{result}  (result: new, moved)
    switchyard.sessions.hits      switchyard_sessions_hits_total
    switchyard.sessions.breaks    switchyard_sessions_breaks_total{reason}
    switchyard.budget.spent       switchyard_budget_spent_total{budget}  (money; budget: a `limits` name or `other`)
    switchyard.budget.exhausted   switchyard_budget_exhausted_total{action}  (action: backend, reject)
    switchyard.budget.corrections  switchyard_budget_corrections_total{result}  (result: corrected, refunded,
                                  no_usage, too_large, incomplete, bad_charge)
    switchyard.share.observed     switchyard_share_observed{signal}  (the fleet's large share over the window)
    switchyard.share.threshold    switchyard_share_threshold{signal}  (the threshold the controller set)
    switchyard.failover.chains    switchyard_failover_chains_total{backend, attempts}
    switchyard.failover.refused   switchyard_failover_refused_total{reason}  (reason: slot_in_body)
    switchyard.backend.healthy    switchyard_backend_healthy{backend}  (1: the decision may use it; serve --envoy-admin)
    switchyard.health.poll_failures  switchyard_health_poll_failures_total{reason}

A failed scorer call is also a warning log line, at most one per scorer every
:data:`FAILURE_LOG_EVERY_S` seconds, counting the failures it stands for (:class:`FailureLog`),
so a fallback storm shows in the logs without flooding them.

The ``switchyard.decide`` span joins the caller's trace from the W3C ``traceparent``
request header (:func:`start_decide_span`); each scorer call is a child span of it
(:func:`scorer_span`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping

from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation

from extproc.scorers._interface import ScorerFailure, Scores

__all__ = [
    "FAILURE_LOG_EVERY_S",
    "FailureLog",
    "JsonFormatter",
    "configure_logging",
    "Telemetry",
    "start_decide_span",
    "scorer_span",
]

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

#: Bucket bounds (seconds) of the decision latency: cheap rules take microseconds.
DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Bucket bounds (seconds) of a scorer call: a forward takes milliseconds, deadlines ~100 ms.
SCORER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
#: Bucket bounds of a micro-batch's size (requests sharing one forward).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Seconds between two "scorer failed" warnings of one scorer; the failures in between are counted.
FAILURE_LOG_EVERY_S = 10.0

log = logging.getLogger("switchyard.scoring")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, event, and ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    """Send switchyard's logs to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class FailureLog:
    """The warning a failed scorer call logs, at most once per scorer every ``every_s`` seconds.

    The first failure after a quiet interval is logged at once, with ``suppressed``: how many
    failures of that scorer were not logged since its previous line, and their reasons
    (``suppressed_reasons``). A storm of a thousand fallbacks a second is one line per scorer
    per interval that says so. ``clock`` is injectable for tests.
    """

    def __init__(self, every_s: float = FAILURE_LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}  # scorer -> when its last line was logged
        self._suppressed: dict[str, dict[str, int]] = {}  # scorer -> reason -> failures not logged

    def failed(self, scorer: str, failure: ScorerFailure) -> None:
        now = self._clock()
        last = self._last.get(scorer)
        if last is not None and now - last < self.every_s:
            reasons = self._suppressed.setdefault(scorer, {})
            reasons[failure.reason] = reasons.get(failure.reason, 0) + 1
            return
        self._last[scorer] = now
        reasons = self._suppressed.pop(scorer, {})
        log.warning("scorer failed; the fallback applies", extra={
            "scorer": scorer, "reason": failure.reason, "detail": failure.detail,
            "suppressed": sum(reasons.values()), "suppressed_reasons": reasons})


class Telemetry:
    """The OpenTelemetry instruments switchyard records into.

    Creating one is cheap and instruments are shared by name, so every component may hold
    its own; without an SDK every call on them is a no-op.

    Who records what:

    - ``decisions``, ``decision_time``, ``rejections``: the servicer, once per routed or
      rejected request.
    - ``policy_reloads``: :class:`~extproc.server._reload.PolicyFile`, once per reload attempt that
      changed something (``result``: ``reloaded`` / ``rejected``).
    - ``policy_info``: the server registers the running policy's digest once with
      :meth:`observe_policy`; it is read at each collection.
    - ``scorer_time``, ``scorer_batch_size``, ``scorer_failures`` and the rate-limited
      failure warning (:attr:`failure_log`): whoever awaits a scorer
      (:func:`~extproc.scoring._decide.decide_with_scores`), once per scorer call, through
      :meth:`record_score`.
    - ``capture_written``, ``capture_dropped``: the capture writer
      (:class:`~extproc.server._capture.CaptureWriter`), from its queue and its writer thread.
    - ``shadow_decisions``, ``shadow_cost``, ``shadow_large``, ``shadow_skipped``: the
      shadow (:class:`~extproc.server._shadow.Shadow`), once per request it compared or skipped.
    - ``session_pins``, ``session_hits``, ``session_breaks``: :mod:`extproc.traffic._sessions`,
      once per request of a session (``sessions:``).
    - ``budget_spent``, ``budget_exhausted``: :mod:`extproc.traffic._budgets`, once per charged
      or over-budget request; ``budget_corrections``: :mod:`extproc.traffic._usage`, once per
      charged response the usage filter sent; ``share_observed``, ``share_threshold``: the share controller
      (:mod:`extproc.traffic._share`), at each update it reads.
    - ``health_poll_failures``: the Envoy health poller (:mod:`extproc.traffic._health`), once per
      failed poll; ``switchyard.backend.healthy``: the server registers the backends' health
      once with :meth:`observe_backend_health`; it is read at each collection.
    - ``switchyard.scorer.breaker.state``: the server registers the running scorers'
      breakers once with :meth:`observe_breakers`; they are read at each collection.
    """

    def __init__(self, meter_provider=None, tracer_provider=None, clock: Callable[[], float] = time.monotonic) -> None:
        """Uses the global OpenTelemetry providers unless others are given (tests); ``clock``
        paces the failure warnings."""
        self.failure_log = FailureLog(clock=clock)
        self._meter = meter = metrics.get_meter("switchyard", meter_provider=meter_provider)
        self.tracer = trace.get_tracer("switchyard", tracer_provider=tracer_provider)
        # Without an SDK the API hands out no-op spans; skipping them saves ~10 µs a request.
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracing = not isinstance(provider, (trace.NoOpTracerProvider, trace.ProxyTracerProvider))
        self.decisions = meter.create_counter(
            "switchyard.decisions", unit="{request}",
            description="Routing decisions, by backend, rule and fallback (the reason a fallback was taken, or empty).")
        self.rejections = meter.create_counter(
            "switchyard.rejections", unit="{request}", description="Requests answered with an error, by status and code."
        )
        self.policy_reloads = meter.create_counter(
            "switchyard.policy.reloads", unit="{reload}", description="Policy file changes, by result (reloaded, rejected)."
        )
        self.decision_time = meter.create_histogram(
            "switchyard.decision.duration", unit="s", description="Time to parse a request and evaluate the policy.",
            explicit_bucket_boundaries_advisory=DECISION_BUCKETS,
        )
        self.scorer_time = meter.create_histogram(
            "switchyard.scorer.duration", unit="s",
            description="Time from asking a learned scorer to its answer or failure, by scorer and result "
                        "(ok, or the failure's reason: deadline, error, non_finite, ...).",
            explicit_bucket_boundaries_advisory=SCORER_BUCKETS,
        )
        self.scorer_batch_size = meter.create_histogram(
            "switchyard.scorer.batch.size", unit="{request}",
            description="Requests that shared one scorer forward pass, by scorer.",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        self.scorer_failures = meter.create_counter(
            "switchyard.scorer.failures", unit="{call}",
            description="Scorer calls that gave no scores, so the request took the fallback, by scorer and "
                        "reason (deadline, overload, breaker_open, error, non_finite, missing_output).",
        )

        self.capture_written = meter.create_counter(
            "switchyard.capture.written", unit="{sample}",
            description="Captured requests written to the capture file (policy `capture:`).")
        self.capture_dropped = meter.create_counter(
            "switchyard.capture.dropped", unit="{sample}",
            description="Sampled requests not written to the capture file, by reason (queue_full: the writer "
                        "fell behind; error: the file could not be written; too_large: one line over "
                        "`capture.max_bytes`; shutdown: still queued when the server stopped).")

        self.shadow_decisions = meter.create_counter(
            "switchyard.shadow.decisions", unit="{request}",
            description="Requests decided again by the shadow policy (serve --shadow), by the live backend and "
                        "the shadow's (`rejected`: the shadow would have answered with an error).")
        self.shadow_cost = meter.create_counter(
            "switchyard.shadow.cost", unit="1",
            description="Sum of the chosen backends' `cost` over the shadowed requests, by policy (live, shadow).")
        self.shadow_large = meter.create_counter(
            "switchyard.shadow.large", unit="{request}",
            description="Shadowed requests that went to the policy's large backend (its highest `cost`), by policy "
                        "(live, shadow); over switchyard_shadow_decisions_total it is each one's large share.")
        self.shadow_skipped = meter.create_counter(
            "switchyard.shadow.skipped", unit="{request}",
            description="Routed requests the shadow did not compare, by reason (dropped: too many shadow decisions "
                        "in flight; timeout; error: the shadow policy raised).")
        self.session_pins = meter.create_counter(
            "switchyard.sessions.pins", unit="{session}",
            description="Sessions pinned to a backend (`sessions:`), by result (new: a session's first routed "
                        "request; moved: pinned again after its pin broke).")
        self.session_hits = meter.create_counter(
            "switchyard.sessions.hits", unit="{request}",
            description="Requests routed by their session's pin, without running scorers (rule `session`).")
        self.session_breaks = meter.create_counter(
            "switchyard.sessions.breaks", unit="{request}",
            description="Requests whose session's pinned backend could not take them, by reason "
                        "(backend_removed, tenant_not_allowed, images_not_supported, context_length_exceeded, "
                        "unhealthy, rule: a `breaks_session` rule held); each is decided and pinned again.")

        self.budget_spent = meter.create_counter(
            "switchyard.budget.spent", unit="1",
            description="Money charged to budgets (`budgets:`, in the unit of the backends' `price`), by budget: "
                        "the name when `budgets.limits` lists it, else `other` (names are not labels).")
        self.budget_exhausted = meter.create_counter(
            "switchyard.budget.exhausted", unit="{request}",
            description="Requests whose cost would take their budget over its limit, by action (backend: sent "
                        "to `budgets.when_spent.backend`; reject: answered 429 `budget_exhausted`).")
        self.budget_corrections = meter.create_counter(
            "switchyard.budget.corrections", unit="{response}",
            description="Charged responses whose `usage` corrected their budget charge, by result (corrected; "
                        "refunded: a non-2xx answer, the whole charge given back; no_usage, too_large, incomplete, "
                        "bad_charge: the estimate stays).")
        self.share_observed = meter.create_gauge(
            "switchyard.share.observed", unit="1",
            description="The fleet's share of routed requests on the `share.large` backends over `share.window_s`, "
                        "as the controller last read it, by signal.")
        self.share_threshold = meter.create_gauge(
            "switchyard.share.threshold", unit="1",
            description="The threshold the share controller set for its score signal, by signal.")
        self.failover_chains = meter.create_counter(
            "switchyard.failover.chains", unit="{request}",
            description="Routed requests of a policy with `fallbacks`, by backend (the first choice) and attempts "
                        "(the chain length Envoy may try; 1: none of its fallbacks may serve the request).")
        self.failover_refused = meter.create_counter(
            "switchyard.failover.refused", unit="{request}",
            description="Requests sent without failover although fallbacks applied, by reason (slot_in_body: the "
                        "client body holds switchyard's model slot text).")

        self.health_poll_failures = meter.create_counter(
            "switchyard.health.poll_failures", unit="{poll}",
            description="Polls of Envoy's admin endpoint (serve --envoy-admin) that read no cluster list, by reason "
                        "(unreachable, timeout, http_status, too_large, bad_json, bad_answer); the last view is "
                        "kept, and dropped once stale (every backend then counts as healthy).")

    def record_score(self, scorer: str, outcome: Scores | ScorerFailure, latency_ms: float) -> None:
        """One scorer call: its latency by ``result`` (``ok``, or the failure's ``reason``),
        a failure by reason, and the batch size when the scorer knows it."""
        result = outcome.reason if isinstance(outcome, ScorerFailure) else "ok"
        self.scorer_time.record(latency_ms / 1000.0, {"scorer": scorer, "result": result})
        if isinstance(outcome, ScorerFailure):
            self.scorer_failures.add(1, {"scorer": scorer, "reason": result})
            self.failure_log.failed(scorer, outcome)
        elif outcome.batch_size > 0:
            self.scorer_batch_size.record(outcome.batch_size, {"scorer": scorer})

    def observe_policy(self, digest: Callable[[], str]) -> None:
        """Report ``switchyard.policy.info{digest=digest()} = 1`` at every collection.

        Call once per process (the server does): each call adds an observer.
        """

        def observe(_options: CallbackOptions) -> list[Observation]:
            return [Observation(1, {"digest": digest()})]

        self._meter.create_observable_gauge(
            "switchyard.policy.info", callbacks=[observe], unit="1",
            description="1 for the policy this process runs, labelled with its content digest.")


    def observe_breakers(self, states: Callable[[], Mapping[str, int]]) -> None:
        """Report ``switchyard.scorer.breaker.state{scorer} = states()[scorer]`` (0 closed, 1
        open, 2 half-open) at every collection. Call once per process (the server does)."""

        def observe(_options: CallbackOptions) -> list[Observation]:
            return [Observation(int(state), {"scorer": name}) for name, state in states().items()]

        self._meter.create_observable_gauge(
            "switchyard.scorer.breaker.state", callbacks=[observe], unit="1",
            description="Each running scorer's circuit breaker: 0 closed, 1 open (requests take the fallback "
                        "at once), 2 half-open (one request tries the scorer).")


    def observe_backend_health(self, healthy: Callable[[], Mapping[str, bool]]) -> None:
        """Report ``switchyard.backend.healthy{backend} = healthy()[backend]`` (1 or 0) at every
        collection. Call once per process (the server does, with ``--envoy-admin``)."""

        def observe(_options: CallbackOptions) -> list[Observation]:
            return [Observation(int(up), {"backend": name}) for name, up in healthy().items()]

        self._meter.create_observable_gauge(
            "switchyard.backend.healthy", callbacks=[observe], unit="1",
            description="Each backend of the running policy: 1 when the decision may use it, 0 when Envoy reports "
                        "its cluster without a healthy host (ejected, failing health checks).")


def start_decide_span(telemetry: Telemetry, headers: Mapping[str, str]) -> trace.Span | None:
    """Start the ``switchyard.decide`` span as a child of the caller's trace, or ``None``
    when tracing is off.

    The parent comes from the request headers Envoy passes on (``traceparent`` and
    ``tracestate``, W3C Trace Context; ``OTEL_PROPAGATORS`` can name others). Without them
    the span starts a new trace. The caller ends the span.
    """
    if not telemetry.tracing:
        return None
    return telemetry.tracer.start_span("switchyard.decide", context=propagate.extract(headers))


@contextlib.contextmanager
def scorer_span(telemetry: Telemetry, parent: trace.Span | None, scorer: str) -> Iterator[trace.Span | None]:
    """A ``switchyard.scorer`` child span of ``parent`` around one scorer call.

    Yields ``None`` (and records nothing) when ``parent`` is ``None``, i.e. tracing is off.
    An exception leaving the block is recorded on the span, marks it as an error, and is
    re-raised. Safe in coroutines: the parent is passed explicitly, not taken from the
    current context.
    """
    if parent is None or not telemetry.tracing:
        yield None
        return
    span = telemetry.tracer.start_span(
        "switchyard.scorer", context=trace.set_span_in_context(parent), attributes={"switchyard.scorer": scorer})
    try:
        yield span
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        span.end()
