"""The pod, run for real: the rendered Deployment's containers as local processes.

The chart is rendered with loopback backends (demo backends) and free ports; the ConfigMap
and Secret data are written where the containers mount them (kubelet layout, see
tests/charts/pod.py); the init container renders Envoy's config; Envoy and switchyard start
with their own command and args. Requests then route as the policy says, the provider key
reaches its backend and no other, and an edited policy ConfigMap and a rotated Secret take
effect without a restart. A second pod is stopped the way the kubelet stops one (Envoy's
preStop hook, SIGTERMs) while requests keep coming, and none of them fails. From the pod's
address (tests/charts/pod.py's POD_IP) only Envoy's listener and the metrics ports answer;
ext_proc and Envoy's admin endpoint are on the pod's loopback, and the probes still pass.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Child, free_port, grpc_serving, http_ok
from tests.charts.conftest import find, render
from tests.charts.pod import POD_IP, LocalPod, atomic_write, reachable
from tests.integration.gateway import REPO, chat

pytestmark = pytest.mark.envoy

POLICY = (REPO / "policies" / "default.yaml").read_text()
CLIENT_KEY = "Bearer client-key"


def _post(port: int, body: dict, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                     {"content-type": "application/json", "authorization": CLIENT_KEY, **(headers or {})})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def _wait(what: str, ready: Callable[[], bool], children: list[Child], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [c for c in children if not c.running]
        assert not dead and time.monotonic() < deadline, f"{what} not ready\n" + "\n".join(
            f"--- {c.name}\n{c.tail()}" for c in children)
        time.sleep(0.05)


@contextlib.contextmanager
def running_pod(root: Path, envoy: dict[str, Any], switchyard: dict[str, Any], **values: Any) -> Iterator[LocalPod]:
    """The chart's pod, rendered with ``values`` (and ``envoy``/``switchyard`` values) on free
    ports and loopback backends, its containers started; every process stopped at the end."""
    backend_ports = {"small": free_port(), "large": free_port()}
    values = {
        "backends": {
            "small": {"host": "127.0.0.1", "port": backend_ports["small"]},
            "large": {"host": "127.0.0.1", "port": backend_ports["large"],
                      "credential": {"secretName": "provider", "key": "api-key", "header": "authorization",
                                     "prefix": "Bearer "}},
        },
        "envoy": {"port": free_port(), "probePort": free_port(), "adminPort": free_port(), **envoy},
        "switchyard": {"port": free_port(), "metrics": {"enabled": True, "port": free_port()}, **switchyard},
        **values,
    }
    manifests = render(values)
    local = LocalPod(find(manifests, "Deployment"), manifests, root, secrets={"provider": {"api-key": "sk-provider-1"}})
    backends = [Child(f"backend-{name}", [sys.executable, "-m", "demo.backend", "--name", name, "--port", str(port)],
                      root / f"backend-{name}.log").start() for name, port in backend_ports.items()]
    children = list(backends)
    try:
        init = local.run("envoy-config")
        assert init.returncode == 0, init.stderr
        children += [local.start("switchyard"), local.start("envoy")]
        for name, port in backend_ports.items():
            _wait(f"backend {name}", lambda p=port: http_ok(p, "/health"), children)
        # the containers' own readiness probes, run as the kubelet runs them
        _wait("switchyard", lambda: local.probe("switchyard"), children)
        _wait("envoy", lambda: local.probe("envoy"), children)
        local.children = {c.name: c for c in children}
        local.listen = local.port("envoy", "http")
        yield local
    finally:
        for child in reversed(children):
            child.stop()


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    # No drains: this pod is stopped at the end of the module, all at once
    # (test_stopping_the_pod_loses_no_request runs a pod with drains of its own).
    with running_pod(tmp_path_factory.mktemp("pod"), envoy={"drainSeconds": 0},
                     switchyard={"reloadInterval": 0.2, "drainSeconds": 0}) as local:
        yield local


def test_requests_route_as_the_policy_says(pod):
    status, headers, _ = _post(pod.listen, chat("Prove that the integral of x is x^2/2."))
    assert status == 200
    assert (headers["x-switchyard-backend"], headers["x-demo-backend"]) == ("large", "large")
    assert headers["x-demo-received-model"] == "large-model"
    status, headers, _ = _post(pod.listen, chat("Hi there!"))
    assert (status, headers["x-demo-backend"]) == (200, "small")


def test_the_provider_key_reaches_its_backend_and_no_other(pod):
    _, large, _ = _post(pod.listen, chat("Prove the theorem."), {"api-key": "client", "x-api-key": "client"})
    assert json.loads(large["x-demo-received-credentials"]) == {"authorization": "Bearer sk-provider-1"}
    _, small, _ = _post(pod.listen, chat("Hi there!"))
    received = json.loads(small["x-demo-received-credentials"])
    assert received == {"authorization": CLIENT_KEY}  # the client's own header, never the provider's key
    assert "sk-provider" not in small["x-demo-received-credentials"]


def test_the_probe_port_serves_readiness_and_envoy_metrics_only(pod):
    probes = pod.port("envoy", "envoy-probes")
    assert http_ok(probes, "/ready") and http_ok(probes, "/stats/prometheus")
    assert not http_ok(probes, "/config_dump")  # the rest of the admin endpoint stays on loopback


def _address(args: list[str], flag: str) -> tuple[str, int]:
    host, port = args[args.index(flag) + 1].rsplit(":", 1)
    return host, int(port)


def test_from_the_pod_address_only_envoy_and_the_metrics_ports_answer(pod):
    """What a client, a scraper or another pod can reach: Envoy's listener, its probe port and
    switchyard's metrics. ext_proc and Envoy's admin endpoint answer on loopback only, and the
    probes (switchyard's runs inside its container) still pass."""
    declared = {p["name"]: p["containerPort"] for c in pod.spec["containers"] for p in c.get("ports", [])}
    assert set(declared) == {"http", "envoy-probes", "metrics"}
    for name, port in declared.items():
        assert reachable(POD_IP, port), name
    extproc = _address(pod.argv("switchyard"), "--listen")
    admin = _address(pod.argv("envoy-config"), "--admin")
    assert extproc[0] == admin[0] == "127.0.0.1"
    for name, (_, port) in {"ext_proc": extproc, "admin": admin}.items():
        assert reachable("127.0.0.1", port) and not reachable(POD_IP, port), name
    assert grpc_serving(extproc[1])  # Envoy, beside it, reaches it over loopback
    for container in ("switchyard", "envoy"):
        for kind in ("readinessProbe", "livenessProbe"):
            assert pod.probe(container, kind), (container, kind)


def test_switchyard_metrics_are_served(pod):
    conn = http.client.HTTPConnection("127.0.0.1", pod.port("switchyard", "metrics"), timeout=5)
    conn.request("GET", "/metrics")
    reply = conn.getresponse()
    text = reply.read().decode()
    assert reply.status == 200 and "switchyard_" in text


def test_editing_the_policy_configmap_changes_routing_without_a_restart(pod):
    pids = {name: child.process.pid for name, child in pod.children.items()}
    atomic_write(pod.volumes["policy"], {"policy.yaml": POLICY.replace("default: small", "default: large")})
    deadline = time.monotonic() + 15
    while True:
        status, headers, _ = _post(pod.listen, chat("Hi there!"))
        assert status == 200
        if headers["x-demo-backend"] == "large" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert headers["x-demo-backend"] == "large" and headers["x-switchyard-rule"] == "default"
    assert {name: child.process.pid for name, child in pod.children.items()} == pids
    assert all(child.running for child in pod.children.values())


def test_a_rotated_secret_is_used_without_a_restart(pod):
    pid = pod.children["envoy"].process.pid
    atomic_write(pod.volumes["credential-large"], {"api-key": "sk-provider-2"})
    deadline = time.monotonic() + 15
    while True:
        _, headers, _ = _post(pod.listen, chat("Prove the theorem."))
        received = json.loads(headers["x-demo-received-credentials"])
        if received == {"authorization": "Bearer sk-provider-2"} or time.monotonic() > deadline:
            break
        assert received == {"authorization": "Bearer sk-provider-1"}
        time.sleep(0.1)
    assert received == {"authorization": "Bearer sk-provider-2"}
    assert pod.children["envoy"].process.pid == pid


# -- stopping the pod ------------------------------------------------------------------------------
ENVOY_DRAIN_S, DRAIN_S, GRACE_S, TERMINATION_S = 1, 4, 1, 10  # short, in the order the chart demands


def test_stopping_the_pod_loses_no_request(tmp_path):
    """The kubelet stops a pod by running each container's preStop hook, then sending it
    SIGTERM: Envoy drains during its hook, switchyard (no hook) gets SIGTERM at once and
    drains longer. Requests sent all the while are routed; the pod is gone within the
    termination grace period, every process exiting 0."""
    with running_pod(tmp_path, envoy={"drainSeconds": ENVOY_DRAIN_S},
                     switchyard={"drainSeconds": DRAIN_S, "graceSeconds": GRACE_S},
                     terminationGracePeriodSeconds=TERMINATION_S) as pod:
        envoy, switchyard = pod.children["envoy"], pod.children["switchyard"]
        stopping = time.monotonic()
        assert pod.pre_stop("switchyard") is None
        hook = pod.pre_stop("envoy")
        switchyard.process.send_signal(signal.SIGTERM)
        replies = []
        while hook.poll() is None:  # clients that still reach this pod while the endpoints catch up
            assert time.monotonic() - stopping < TERMINATION_S, "the preStop hook did not return"
            replies.append(_post(pod.listen, chat("Prove the theorem.")))
        output = hook.stdout.read()
        assert hook.returncode == 0 and output == "", output
        assert switchyard.running, "switchyard's drain outlasts Envoy's"
        assert not pod.probe("switchyard"), "NOT_SERVING: the pod is not ready any more"
        assert envoy.running, "Envoy runs until its SIGTERM"
        assert replies
        for status, headers, _ in replies:
            assert (status, headers.get("x-demo-backend"), headers.get("x-switchyard-backend")) == (200, "large", "large")
        # Envoy drains: its answers ask clients to reconnect (to another pod, once the endpoints know)
        assert any(headers.get("connection") == "close" for _, headers, _ in replies)

        envoy.process.send_signal(signal.SIGTERM)  # the hook has returned
        assert envoy.process.wait(10) == 0
        assert switchyard.process.wait(DRAIN_S + GRACE_S + 10) == 0
        assert time.monotonic() - stopping < TERMINATION_S  # before the kubelet's SIGKILL
        events = [json.loads(line) for line in switchyard.log.read_text().splitlines() if line.startswith("{")]
        drain = [e for e in events if e["event"] in ("draining", "drain ended")]
        assert [(e["event"], e.get("drain_s"), e.get("cut_short")) for e in drain] == [
            ("draining", DRAIN_S, None), ("drain ended", None, False)]
