"""Turning OpenTelemetry on for ``switchyard serve``: the SDK, the Prometheus reader and the
OTLP exporters, from ``--metrics-listen`` and the standard ``OTEL_*`` variables.

Nothing here runs unless the server is asked for telemetry; without it the API's no-op
instruments stay in place and cost nothing. What turns what on:

================================  ==========================================================
``--metrics-listen HOST:PORT``    Prometheus scrape endpoint (``OTEL_METRICS_EXPORTER`` may
                                  also say ``prometheus``: ``OTEL_EXPORTER_PROMETHEUS_HOST``
                                  / ``_PORT``, default ``localhost:9464``)
``OTEL_TRACES_EXPORTER``          ``otlp``, ``console`` or ``none`` (comma-separated); unset:
                                  ``otlp`` when an OTLP endpoint is set, else none
``OTEL_METRICS_EXPORTER``         the same for pushed metrics, plus ``prometheus``
``OTEL_EXPORTER_OTLP_ENDPOINT``   (or ``..._TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``)
                                  where OTLP goes; the exporters read it and every other
                                  ``OTEL_EXPORTER_OTLP_*`` variable themselves
``OTEL_EXPORTER_OTLP_PROTOCOL``   ``grpc`` (default, installed) or ``http/protobuf`` (needs
                                  ``pip install opentelemetry-exporter-otlp-proto-http``)
``OTEL_SDK_DISABLED=true``        no OTLP/console export (``--metrics-listen`` still serves)
================================  ==========================================================

The SDK reads the rest as usual: ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (the
service name defaults to ``switchyard``), ``OTEL_TRACES_SAMPLER`` (default: follow the
caller's sampled flag, sample new traces), ``OTEL_METRIC_EXPORT_INTERVAL``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc._errors import SwitchyardError

__all__ = ["TelemetryConfig", "TelemetrySetup", "setup_telemetry"]

_EXPORTERS = ("otlp", "console")
_PROTOCOLS = {
    # protocol -> (module, span exporter class, metric exporter class, package)
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc", "trace_exporter.OTLPSpanExporter",
             "metric_exporter.OTLPMetricExporter", "opentelemetry-exporter-otlp-proto-grpc"),
    "http/protobuf": ("opentelemetry.exporter.otlp.proto.http", "trace_exporter.OTLPSpanExporter",
                      "metric_exporter.OTLPMetricExporter", "opentelemetry-exporter-otlp-proto-http"),
}


def _exporters(environ: Mapping[str, str], signal: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The exporter names of ``OTEL_<SIGNAL>_EXPORTER``, checked."""
    var = f"OTEL_{signal}_EXPORTER"
    value = environ.get(var, "").strip()
    if not value:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        return ("otlp",) if any(environ.get(name, "").strip() for name in endpoints) else ()
    names = tuple(dict.fromkeys(name.strip().lower() for name in value.split(",") if name.strip()))
    supported = (*_EXPORTERS, *extra, "none")
    unknown = [name for name in names if name not in supported]
    if unknown:
        raise SwitchyardError(
            f"{var}={value!r} names {', '.join(unknown)}; switchyard supports {', '.join(supported)}.")
    return () if "none" in names else names


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    for var in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(var, "").strip()
        if value:
            if value not in _PROTOCOLS:
                raise SwitchyardError(f"{var}={value!r} is not supported; use one of {', '.join(_PROTOCOLS)}.")
            return value
    return "grpc"


@dataclass(frozen=True)
class TelemetryConfig:
    """What ``serve`` turns on. Build it with :meth:`from_env`.

    - ``metrics_listen``: ``HOST:PORT`` of the Prometheus scrape endpoint; ``None``: none.
    - ``traces`` / ``metrics``: exporters that push (``otlp``, ``console``); empty: none.
    - ``traces_protocol`` / ``metrics_protocol``: the OTLP protocol of each.
    """

    metrics_listen: str | None = None
    traces: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    traces_protocol: str = "grpc"
    metrics_protocol: str = "grpc"

    @property
    def enabled(self) -> bool:
        return bool(self.metrics_listen or self.traces or self.metrics)

    @classmethod
    def from_env(cls, metrics_listen: str | None = None, environ: Mapping[str, str] | None = None) -> TelemetryConfig:
        """The configuration for ``--metrics-listen`` (``None``: not given) and ``environ``
        (default ``os.environ``). Raises :class:`SwitchyardError` naming the variable for a
        value switchyard cannot honour, including an exporter whose package is missing."""
        environ = os.environ if environ is None else environ
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(metrics_listen=metrics_listen)
        metrics = _exporters(environ, "METRICS", extra=("prometheus",))
        if "prometheus" in metrics and metrics_listen is None:
            host = environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or "localhost"
            port = environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "").strip() or "9464"
            metrics_listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        config = cls(
            metrics_listen=metrics_listen,
            traces=_exporters(environ, "TRACES"),
            metrics=tuple(name for name in metrics if name != "prometheus"),
            traces_protocol=_protocol(environ, "TRACES"),
            metrics_protocol=_protocol(environ, "METRICS"),
        )
        for signal, names, protocol in (("TRACES", config.traces, config.traces_protocol),
                                        ("METRICS", config.metrics, config.metrics_protocol)):
            module, _, _, package = _PROTOCOLS[protocol]
            if "otlp" in names and importlib.util.find_spec(module) is None:
                raise SwitchyardError(
                    f"OTEL_{signal}_EXPORTER asks for OTLP over {protocol}, which needs `pip install {package}`.")
        return config


def _otlp(protocol: str, which: int):
    module, *classes, _package = _PROTOCOLS[protocol]
    submodule, name = classes[which].rsplit(".", 1)
    return getattr(importlib.import_module(f"{module}.{submodule}"), name)()


@dataclass
class TelemetrySetup:
    """The SDK objects :func:`setup_telemetry` installed (``None`` for what is off).

    ``registry``: the Prometheus registry the scrape endpoint serves.
    """

    registry: object | None = None
    meter_provider: object | None = None
    tracer_provider: object | None = None
    _closed: bool = field(default=False, repr=False)

    def shutdown(self) -> None:
        """Flush what is buffered (spans, pushed metrics) and stop the exporters. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.shutdown()


def _resource():
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "switchyard"}))
    return resource


def setup_telemetry(config: TelemetryConfig) -> TelemetrySetup:
    """Install the global OpenTelemetry providers ``config`` asks for, in this process.

    Call once per process, after forking (exporters own threads and channels). Instruments
    created earlier on the API's proxies (a :class:`~extproc.telemetry._instruments.Telemetry` built
    before) start recording into them too.
    """
    setup = TelemetrySetup()
    if not config.enabled:
        return setup
    from opentelemetry import metrics, trace

    resource = _resource()
    readers = []
    if config.metrics_listen:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

        setup.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=registry))
    if config.metrics:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

        for name in config.metrics:
            exporter = _otlp(config.metrics_protocol, 1) if name == "otlp" else ConsoleMetricExporter()
            readers.append(PeriodicExportingMetricReader(exporter))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        setup.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(setup.meter_provider)
    if config.traces:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        setup.tracer_provider = TracerProvider(resource=resource)
        for name in config.traces:
            exporter = _otlp(config.traces_protocol, 0) if name == "otlp" else ConsoleSpanExporter()
            setup.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(setup.tracer_provider)
    return setup
