"""The fleet-state store's OpenTelemetry instruments (the pattern of ``extproc``'s ``Telemetry``).

Metric names as Prometheus shows them::

    switchyard.state.fallbacks   switchyard_state_fallbacks_total{operation, reason}
    switchyard.state.up          switchyard_state_up  (1 the remote store answers, 0 it failed)
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

__all__ = ["StateTelemetry"]


class StateTelemetry:
    """The instruments a :class:`~extproc.state.FallbackStore` records into.

    Pass :meth:`fallback` as the store's ``on_fallback``, and call :meth:`observe_up` once per
    process with the store's ``remote_up``. Without an OpenTelemetry SDK both are no-ops.
    """

    def __init__(self, meter_provider=None) -> None:
        self._meter = meter = metrics.get_meter("switchyard", meter_provider=meter_provider)
        self.fallbacks = meter.create_counter(
            "switchyard.state.fallbacks", unit="{call}",
            description="Fleet-state store calls answered in process instead of by the remote store "
                        "(`state.redis`), by operation (get, set, set_if_absent, incr_window, incr_bucket, "
                        "read_window, read_sliding) and reason (timeout, error, down: not tried, it failed less than a "
                        "retry interval ago).")

    def fallback(self, operation: str, reason: str) -> None:
        """One call answered in process."""
        self.fallbacks.add(1, {"operation": operation, "reason": reason})

    def observe_up(self, up: Callable[[], bool]) -> None:
        """Report ``switchyard.state.up = up()`` (1 or 0) at every collection. Call once per process."""

        def observe(_options: CallbackOptions) -> list[Observation]:
            return [Observation(int(up()), {})]

        self._meter.create_observable_gauge(
            "switchyard.state.up", callbacks=[observe], unit="1",
            description="1 while the remote fleet-state store (`state.redis`) answers, 0 from a failed call "
                        "until one succeeds again; absent without `state.redis`.")
