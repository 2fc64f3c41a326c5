"""The store's fallbacks reach OpenTelemetry: switchyard.state.fallbacks and switchyard.state.up."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.state import StateConfig, StateTelemetry, build_store


def points(reader: InMemoryMetricReader) -> dict[str, list]:
    out = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = [(dict(p.attributes), p.value) for p in metric.data.data_points]
    return out


def test_fallbacks_are_counted_by_operation_and_reason(redis_server):
    reader = InMemoryMetricReader()
    telemetry = StateTelemetry(MeterProvider(metric_readers=[reader]))
    config = StateConfig.from_mapping({"redis": {"url": redis_server.url, "timeout_ms": 200}})

    async def scenario():
        store = build_store(config, on_fallback=telemetry.fallback)
        telemetry.observe_up(lambda: store.remote_up)
        try:
            await store.set("pin", "large", 60)
            assert points(reader)["switchyard.state.up"] == [({}, 1)]
            redis_server.kill()
            assert await store.get("pin") == "large"
            assert await store.incr_window("n", 1, 60) == 1  # within the retry interval: not tried
        finally:
            await store.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    data = points(reader)
    assert sorted(data["switchyard.state.fallbacks"], key=str) == [
        ({"operation": "get", "reason": "error"}, 1),
        ({"operation": "incr_window", "reason": "down"}, 1),
    ]
    assert data["switchyard.state.up"] == [({}, 0)]
