"""Running the ext_proc gRPC server (grpc.aio), with health checks and graceful stop.

``serve`` runs one process, or ``workers`` processes sharing one port through
``SO_REUSEPORT`` so a multi-core pod is used: the kernel spreads Envoy's connections over
them. Each process re-reads the policy file every ``reload_interval`` seconds and on SIGHUP
(see :class:`PolicyFile`).

Shutdown, on SIGTERM / SIGINT::

    signal ─► health NOT_SERVING (readiness fails, endpoints go)
           ─► drain: new streams still accepted and routed for ``drain`` seconds, because
              the Envoy in front learns of the shutdown no sooner and keeps sending
              (a second SIGTERM / SIGINT ends the drain at once)
           ─► server.stop(grace): new streams refused, open ones get ``grace`` seconds
           ─► captured requests still queued are written (at most ``grace`` seconds more)
           ─► scorers closed, exit 0

Telemetry (:mod:`extproc.telemetry._setup`) is set up in each serving process, after
forking. ``metrics_listen`` serves Prometheus metrics: from the process itself, or with
several workers from the parent, which gathers every worker's series at each scrape and
labels them ``worker="<i>"`` (:mod:`extproc.telemetry._metrics_http`).

With ``shadow`` (``serve --shadow FILE``), each process also runs the shadow policy
(:mod:`extproc.server._shadow`): loaded after the live policy's scorers, through the same scorer
cache, watched and reloaded like it, and its decisions still in flight get ``grace`` seconds
at shutdown. A shadow file that is bad at start never stops the server from starting.

Each process builds the fleet-state store of the policy's ``state:`` section once
(:class:`~extproc.traffic._fleet.FleetState`: in process, or Redis/Valkey), rebuilds it when a
reload changes the section (a store that cannot be built rejects the reload), and closes it at
shutdown; session pins (``sessions:``, :mod:`extproc.traffic._sessions`) live there.

With ``envoy_admin`` (``serve --envoy-admin URL``), each process polls Envoy's cluster list in a
task of its own (:mod:`extproc.traffic._health`) and the rules skip the backends Envoy reports
down; the poll never runs on a request's path and its failures never fail a request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from extproc.scoring._breaker import BREAKERS
from extproc.server._capture import CaptureWriter
from extproc._errors import SwitchyardError
from extproc.policy._loading import DEFAULT_MAX_POLICY_BYTES
from extproc.server._reload import PolicyFile
from extproc.server._servicer import ExternalProcessor
from extproc.server._shadow import Shadow, ShadowPolicy, SharedScorers
from extproc.telemetry._instruments import Telemetry
from extproc.telemetry._setup import TelemetryConfig, setup_telemetry
from extproc.traffic._fleet import FleetState
from extproc.traffic._budgets import FleetLimits
from extproc.traffic._sessions import Sessions
from extproc.traffic._health import BackendHealth, HealthPoller, parse_admin_url
from extproc.traffic._usage import UsageCorrections

__all__ = ["serve", "serve_async", "parse_listen"]

log = logging.getLogger("switchyard.server")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
#: Longest the server waits, after its grace period, for the calls it cancelled to end.
CALLS_END_S = 1.0
#: Largest ext_proc message switchyard accepts from Envoy (the body phase carries the body).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def parse_listen(listen: str, option: str = "--listen") -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ``("127.0.0.1", 8080)``; ``[::1]:8080`` for IPv6.
    ``option`` names the setting in the error."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SwitchyardError(f"{option} must be HOST:PORT, got {listen!r}.")
    return host.strip("[]"), int(port)


async def serve_async(
    policy: PolicyFile,
    listen: str,
    *,
    grace: float,
    drain: float,
    reload_interval: float,
    reuse_port: bool = False,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
    shadow_policy: ShadowPolicy | None = None,
    envoy_admin: str | None = None,
) -> None:
    """Serve ``policy`` until one of ``stop_signals``, reloading it as it changes; then drain
    for ``drain`` seconds and stop with ``grace`` seconds for open streams (module docstring).
    ``shadow_policy``: decide every routed request again with it, off the live path.
    ``envoy_admin``: Envoy's admin URL, polled for the backends it reports down."""
    host, port = parse_listen(listen)
    # Scorers load here, after any fork: their worker threads and devices belong to this process.
    scorers = SharedScorers()
    await asyncio.to_thread(policy.load_scorers, scorers.owner("live"))
    if shadow_policy is not None:
        await asyncio.to_thread(shadow_policy.load_scorers, scorers.owner("shadow"))
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # The body message carries the whole buffered body (up to Envoy's buffer limit, which
        # the renderer sets from routing.max_body_bytes); gRPC's 4 MiB default would refuse it.
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ])
    telemetry = Telemetry()
    telemetry.observe_policy(lambda: policy.digest)
    telemetry.observe_breakers(lambda: BREAKERS.states(policy.current().scorers))
    capture = CaptureWriter(telemetry)  # the policy's `capture:` section says what it writes, reload by reload
    shadow = Shadow(shadow_policy.current, telemetry) if shadow_policy is not None else None
    fleet = FleetState(policy.current().policy.state)  # this process's store; a reload may swap it
    policy.accept = fleet.accept
    backend_health = BackendHealth() if envoy_admin else None
    sessions = Sessions(lambda: fleet.store, telemetry, unhealthy=(
        (lambda: backend_health.unhealthy(policy.current().policy)) if backend_health is not None else None))
    limits = FleetLimits(lambda: fleet.store, telemetry)  # budgets: and share:, in the same store
    ext_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessor(policy.current, telemetry, capture, shadow, sessions, limits, backend_health,
                          UsageCorrections(lambda: fleet.store, telemetry)), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise SwitchyardError(f"Cannot listen on {listen}: {exc}.") from exc
    await server.start()
    for service in ("", EXT_PROC_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"listen": f"{host}:{bound}", "policy": str(policy.path), "digest": policy.digest,
                               "pid": os.getpid()})
    print(f"switchyard: serving on {host}:{bound}", file=sys.stderr, flush=True)

    stop, stop_now, reload_now = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def on_stop_signal() -> None:
        if stop.is_set():
            stop_now.set()  # the second signal: no more draining
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in stop_signals:
        loop.add_signal_handler(sig, on_stop_signal)
    reload_shadow = asyncio.Event()

    def on_reload_signal() -> None:
        reload_now.set()
        reload_shadow.set()

    loop.add_signal_handler(signal.SIGHUP, on_reload_signal)
    watcher = asyncio.create_task(policy.watch(reload_interval, reload_now), name="switchyard-policy-watch")
    watchers = [watcher]
    if backend_health is not None:
        telemetry.observe_backend_health(lambda: _backend_states(backend_health, policy.current().policy))
        poller = HealthPoller(envoy_admin, backend_health, telemetry)
        watchers.append(asyncio.create_task(poller.run(), name="switchyard-envoy-health"))
    if shadow_policy is not None:
        log.info("shadowing", extra={"shadow": str(shadow_policy.path), "digest": shadow_policy.digest})
        watchers.append(asyncio.create_task(shadow_policy.watch(reload_interval, reload_shadow),
                                            name="switchyard-shadow-watch"))
    await stop.wait()
    await health.enter_graceful_shutdown()  # every service NOT_SERVING, from now on
    if drain > 0:
        log.info("draining", extra={"drain_s": drain, "grace_s": grace, "pid": os.getpid()})
        started = loop.time()
        try:
            await asyncio.wait_for(stop_now.wait(), timeout=drain)
        except asyncio.TimeoutError:
            pass
        log.info("drain ended", extra={"drained_s": round(loop.time() - started, 3), "cut_short": stop_now.is_set(),
                                       "pid": os.getpid()})
    for task in watchers:
        task.cancel()
    log.info("stopping", extra={"grace_s": grace})
    await server.stop(grace)
    if shadow is not None:
        await shadow.drain(grace)
    await asyncio.to_thread(capture.close, grace)
    await fleet.aclose()
    await policy.close()  # every scorer, the shadow's too: they share one cache
    await _let_cancelled_calls_end()


def _backend_states(health: BackendHealth, policy) -> dict[str, bool]:
    """Each backend of ``policy``: whether the decision counts it healthy now."""
    down = health.unhealthy(policy)
    return {name: name not in down for name in policy.backends}


async def _let_cancelled_calls_end(timeout: float = CALLS_END_S) -> None:
    """Wait (at most ``timeout`` s) for the tasks still running once the server has stopped.

    ``server.stop(grace)`` returns as the grace period ends, having cancelled the calls
    still open; their tasks finish on the loop's next turns. Leaving them to ``asyncio.run``,
    which cancels whatever is left as it returns, made grpc log each one at error level with
    a ``CancelledError`` traceback.
    """
    current = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    if left:
        await asyncio.wait(left, timeout=timeout)


def _bind_metrics(address: tuple[str, int] | None, registry):
    """The scrape endpoint on ``address`` serving ``registry`` (bound, not started), or ``None``."""
    if address is None:
        return None
    from extproc.telemetry._metrics_http import MetricsServer

    endpoint = MetricsServer.bind(*address, registry)
    log.info("serving metrics", extra={"listen": endpoint.listen, "path": "/metrics", "pid": os.getpid()})
    print(f"switchyard: metrics on {endpoint.listen}/metrics", file=sys.stderr, flush=True)
    return endpoint


def serve(
    policy_path: Path,
    listen: str,
    *,
    grace: float,
    drain: float,
    reload_interval: float,
    workers: int = 1,
    metrics_listen: str | None = None,
    max_policy_bytes: int = DEFAULT_MAX_POLICY_BYTES,
    shadow: Path | None = None,
    envoy_admin: str | None = None,
) -> int:
    """Run the server in this process, or in ``workers`` forked processes on one port.

    ``drain``: seconds new streams are still served after SIGTERM/SIGINT, health NOT_SERVING
    (0: refused at once); ``grace``: seconds open streams then get (the CLI holds both defaults).
    ``reload_interval``: seconds between checks of the policy file (0: only on SIGHUP).
    ``metrics_listen``: ``HOST:PORT`` of the Prometheus scrape endpoint (``None``: none,
    unless ``OTEL_METRICS_EXPORTER=prometheus``); OTLP export follows the ``OTEL_*`` variables.
    ``max_policy_bytes``: a larger policy file is refused unparsed, at start and on reload.
    ``shadow``: a candidate policy file every routed request is decided with again, off the
    live path (a bad one is logged, and requests are not shadowed until it is good).
    ``envoy_admin``: ``http://HOST:PORT`` of Envoy's admin endpoint; each process polls its
    cluster list every second and the rules skip the backends Envoy reports down
    (:mod:`extproc.traffic._health`). ``None``: every backend counts as healthy.
    """
    config = TelemetryConfig.from_env(metrics_listen)  # a bad OTEL_* value never starts a server
    metrics_address = parse_listen(config.metrics_listen, "--metrics-listen") if config.metrics_listen else None
    if envoy_admin is not None:
        parse_admin_url(envoy_admin)  # a bad URL never starts a server
    policy = PolicyFile.load(policy_path, max_bytes=max_policy_bytes)  # before forking: a bad policy never starts a server
    shadow_policy = ShadowPolicy(shadow, max_policy_bytes) if shadow is not None else None
    # What is loaded by now (modules, the policy) lives as long as the process: the garbage
    # collector stops scanning it, and forked workers keep sharing its memory pages.
    gc.freeze()
    if workers <= 1:
        setup = setup_telemetry(config)
        endpoint = _bind_metrics(metrics_address, setup.registry)
        try:
            if endpoint is not None:
                endpoint.start()
            asyncio.run(serve_async(policy, listen, grace=grace, drain=drain, reload_interval=reload_interval,
                                    shadow_policy=shadow_policy, envoy_admin=envoy_admin))
        finally:
            if endpoint is not None:
                endpoint.close()
            setup.shutdown()
        return 0
    host, port = parse_listen(listen)
    if port == 0:
        raise SwitchyardError("--workers > 1 needs a fixed port; --listen with port 0 cannot be shared.")
    # With workers the parent owns the scrape endpoint and asks each worker over a socket
    # pair; it is bound before forking so a taken port fails at once.
    channels: list[tuple[socket.socket, socket.socket]] = []
    endpoint = collector = None
    if metrics_address is not None:
        from prometheus_client import CollectorRegistry

        from extproc.telemetry._metrics_http import WorkerCollector

        channels = [socket.socketpair() for _ in range(workers)]
        collector = WorkerCollector([parent_end for parent_end, _ in channels])
        registry = CollectorRegistry()
        registry.register(collector)
        endpoint = _bind_metrics(metrics_address, registry)
    children: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # child: grpc has not been initialised in the parent, so forking is safe
            # A terminal's Ctrl-C reaches every process of the group, and the parent forwards
            # it too: workers ignore SIGINT and take the parent's SIGTERM, so one Ctrl-C counts
            # once (a second signal would end the drain).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                if endpoint is not None:
                    endpoint.close()  # the parent's listening socket
                for number, (parent_end, child_end) in enumerate(channels):
                    parent_end.close()
                    if number != index:
                        child_end.close()
                setup = setup_telemetry(config)
                if channels:
                    from extproc.telemetry._metrics_http import answer_scrapes

                    answer_scrapes(channels[index][1], setup.registry)
                asyncio.run(serve_async(policy, listen, grace=grace, drain=drain, reuse_port=True,
                                        reload_interval=reload_interval, stop_signals=(signal.SIGTERM,),
                                        shadow_policy=shadow_policy, envoy_admin=envoy_admin))
                setup.shutdown()
                os._exit(0)
            except BaseException:  # noqa: BLE001 - report and exit the child, never return into the parent's code
                log.exception("worker failed")
                os._exit(1)
        children.append(pid)
    for _, child_end in channels:
        child_end.close()
    if endpoint is not None:
        endpoint.start()

    def forward(signum, _frame):
        sent = signal.SIGTERM if signum == signal.SIGINT else signum  # workers ignore SIGINT
        for child in children:
            try:
                os.kill(child, sent)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    status = 0
    try:
        for child in children:
            _, code = os.waitpid(child, 0)
            if os.waitstatus_to_exitcode(code) != 0:
                status = 1
                forward(signal.SIGTERM, None)  # one worker died: stop the rest so the pod restarts
    finally:
        if endpoint is not None:
            endpoint.close()
            collector.close()
    return status
