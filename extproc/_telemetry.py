"""Logs, metrics and traces.

Logs are one JSON object a line (``logging`` with :class:`JsonFormatter`); prompts and
bodies are never logged at info level. Metrics and traces go through the OpenTelemetry
API: they cost next to nothing until an SDK / exporter is configured (for example with
the standard ``OTEL_*`` environment variables and ``opentelemetry-instrument``).
"""

from __future__ import annotations

import json
import logging
import sys
import time

from opentelemetry import metrics, trace

__all__ = ["JsonFormatter", "configure_logging", "Telemetry"]

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


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


class Telemetry:
    """The OpenTelemetry instruments the servicer records into."""

    def __init__(self, meter_provider=None, tracer_provider=None) -> None:
        """Uses the global OpenTelemetry providers unless others are given (tests)."""
        meter = metrics.get_meter("switchyard", meter_provider=meter_provider)
        self.tracer = trace.get_tracer("switchyard", tracer_provider=tracer_provider)
        # Without an SDK the API hands out no-op spans; skipping them saves ~10 µs a request.
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracing = not isinstance(provider, (trace.NoOpTracerProvider, trace.ProxyTracerProvider))
        self.decisions = meter.create_counter(
            "switchyard.decisions", unit="{request}", description="Routing decisions, by backend and rule."
        )
        self.rejections = meter.create_counter(
            "switchyard.rejections", unit="{request}", description="Requests answered with an error, by status and code."
        )
        self.policy_reloads = meter.create_counter(
            "switchyard.policy.reloads", unit="{reload}", description="Policy file changes, by result (reloaded, rejected)."
        )
        self.decision_time = meter.create_histogram(
            "switchyard.decision.duration", unit="s", description="Time to parse a request and evaluate the policy."
        )
