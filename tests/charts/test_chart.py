"""The Helm chart, rendered by the Helm library for the defaults and its value sets: lint,
Kubernetes schemas, the Envoy config each pod would render (validated by Envoy), security,
probes, what the network can reach, the optional parts, and values typos failing."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
import yaml

from harness import envoy_binary
from extproc.policy._loading import load_policy
from tests.charts.conftest import CHART, NAMESPACE, RELEASE, find, kinds, notes, render
from tests.charts.pod import LocalPod

REPO = CHART.parents[1]
KUBE_VERSION = "1.33"
FULLNAME = f"{RELEASE}-switchyard"

EXISTING_POLICY = """\
version: 1
backends:
  chat: {cluster: pool-chat, model: chat-8b}
  code: {cluster: pool-code, model: coder-32b}
default: chat
signals:
  code: {kind: keywords, keywords: [python, rust]}
rules:
  - {name: code, when: code, backend: code}
"""
SCORERS = """\
scorers:
  hard:
    kind: probe
    checkpoint: /checkpoints/hard-probe
"""

#: The shipped default policy, writing a capture file into the chart's capture volume.
CAPTURE_POLICY = (REPO / "policies" / "default.yaml").read_text() + """
capture:
  path: /var/lib/switchyard/capture/requests.jsonl
  sample_rate: 0.05
"""

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "capture": {"capture": {"enabled": True, "sizeLimit": "2Gi"}, "policy": {"content": CAPTURE_POLICY}},
    "tls-and-credentials": {
        "backends": {
            "small": {"host": "vllm-small.llm.svc.cluster.local", "port": 8000},
            "large": {"host": "api.openai.com", "port": 443, "tls": {"enabled": True},
                      "credential": {"secretName": "openai", "key": "api-key", "header": "authorization",
                                     "prefix": "Bearer "}},
        },
    },
    "tls-sni-and-two-credentials": {
        "backends": {
            "small": {"host": "10.0.0.7", "port": 443, "tls": {"enabled": True, "sni": "small.internal.example"},
                      "credential": {"secretName": "small-key", "key": "token", "header": "api-key"}},
            "large": {"host": "api.anthropic.example", "port": 443, "tls": {"enabled": True},
                      "credential": {"secretName": "large-key", "key": "api-key", "header": "x-api-key"}},
        },
    },
    "existing-policy-configmap": {
        "policy": {"existingConfigMap": "team-policy", "key": "routing.yaml"},
        "backends": {"pool-chat": {"host": "chat.llm.svc", "port": 8000}, "code": {"host": "code.llm.svc", "port": 8000}},
    },
    "remote-scorer": {
        "scorer": {"enabled": True, "config": SCORERS, "replicas": 2, "tls": {"secretName": "scorer-tls"},
                   "checkpoints": {"existingClaim": "probe-checkpoints"},
                   "nodeSelector": {"nvidia.com/gpu.present": "true"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    },
    "no-networkpolicy-no-metrics": {
        "networkPolicy": {"enabled": False},
        "switchyard": {"metrics": {"enabled": False}},
    },
    "fail-open": {"envoy": {"failOpen": True}},
    "shadow-policy": {"policy": {"shadow": {"enabled": True, "content": EXISTING_POLICY}}},
    "hpa-servicemonitor-networkpolicy": {
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {"enabled": True, "ingressFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]},
        "dashboard": {"enabled": True},
        "scorer": {"enabled": True, "config": SCORERS, "checkpoints": {"image": "registry.example/probes:1"}},
    },
}
# The data of Secrets and external ConfigMaps the value sets name (made outside the chart).
SECRETS = {"openai": {"api-key": "sk-openai"}, "small-key": {"token": "t-small"}, "large-key": {"api-key": "k-large"},
           "scorer-tls": {"tls.crt": "-", "tls.key": "-", "ca.crt": "-"}}
CONFIG_MAPS = {"team-policy": {"routing.yaml": EXISTING_POLICY}}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VALUE_SETS[request.param])


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = manifest["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


# -- every value set -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_is_clean(name):
    import helm_python

    report = helm_python.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_manifest_matches_the_kubernetes_schemas(rendered):
    import kubernetes_validate

    _, manifests = rendered
    for manifest in manifests:
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked against the Service in test_service_monitor_scrapes_both_metrics_ports
        kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


def test_every_pod_renders_an_envoy_config_that_envoy_accepts(rendered, tmp_path):
    """Run the init container's own command (switchyard envoy render) and validate its output."""
    name, manifests = rendered
    pod = LocalPod(find(manifests, "Deployment", FULLNAME), manifests, tmp_path, SECRETS, CONFIG_MAPS)
    done = pod.run("envoy-config")
    assert done.returncode == 0, done.stderr
    config = pod.volumes["envoy-config"] / "envoy.yaml"
    checked = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    policy_file = next(pod.volumes["policy"].glob("*.yaml"))
    agree = subprocess.run([pod.argv("envoy-config")[0], "policy", "check", str(policy_file), "--envoy", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert agree.returncode == 0, agree.stdout + agree.stderr


def test_pods_are_locked_down(rendered):
    _, manifests = rendered
    for manifest in (m for m in manifests if m["kind"] == "Deployment"):
        spec = manifest["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for container in _containers(manifest):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"]["drop"] == ["ALL"], container["name"]
            assert container.get("resources"), container["name"]


# -- the gateway pod ------------------------------------------------------------------------------
def test_defaults():
    manifests = render()
    assert kinds(manifests) == [
        ("ConfigMap", f"{FULLNAME}-policy"), ("Deployment", FULLNAME), ("NetworkPolicy", FULLNAME),
        ("PodDisruptionBudget", FULLNAME), ("Service", FULLNAME), ("Service", f"{FULLNAME}-metrics"),
        ("ServiceAccount", FULLNAME),
    ]
    policy = find(manifests, "ConfigMap")["data"]["policy.yaml"]
    assert policy == (REPO / "policies" / "default.yaml").read_text()  # the chart ships the default policy
    assert (CHART / "files" / "default-policy.yaml").read_text() == (REPO / "policies" / "default.yaml").read_text()
    deployment = find(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert find(manifests, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_probes_and_ports():
    deployment = find(render(), "Deployment")
    envoy, switchyard = deployment["spec"]["template"]["spec"]["containers"]
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "envoy-probes"}
    for kind in ("readinessProbe", "livenessProbe"):  # ext_proc is on loopback: asked from inside (tests/charts/test_pod.py runs it)
        command = switchyard[kind]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and 'grpc.insecure_channel("127.0.0.1:50051")' in command[2]
    assert "--disable-hot-restart" in envoy["args"]  # no shared memory: read-only root works


def _listen_addresses(deployment: dict[str, Any]) -> dict[str, str]:
    """Every address a gateway pod's processes listen on, by flag."""
    spec = deployment["spec"]["template"]["spec"]
    render_args, serve = spec["initContainers"][0]["args"], spec["containers"][1]["args"]
    flags = {f"envoy {flag}": render_args[render_args.index(flag) + 1] for flag in ("--listen", "--ready", "--admin")}
    flags["serve --listen"] = serve[serve.index("--listen") + 1]
    if "--metrics-listen" in serve:
        flags["serve --metrics-listen"] = serve[serve.index("--metrics-listen") + 1]
    return flags


def test_ext_proc_listens_on_loopback_where_envoy_looks_for_it(tmp_path):
    """serve --listen and the ext_proc cluster of the Envoy config the init container writes
    are one address, on the pod's loopback; a changed switchyard.port moves both."""
    for port in (50051, 6000):
        manifests = render({"switchyard": {"port": port}})
        pod = LocalPod(find(manifests, "Deployment"), manifests, tmp_path / str(port))
        serve = pod.container("switchyard")["args"]
        assert serve[serve.index("--listen") + 1] == f"127.0.0.1:{port}"
        done = pod.run("envoy-config")
        assert done.returncode == 0, done.stderr
        config = yaml.safe_load((pod.volumes["envoy-config"] / "envoy.yaml").read_text())
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
        cluster_name = ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == cluster_name)
        [endpoint] = [e["endpoint"]["address"]["socket_address"]
                      for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
        assert endpoint == {"address": "127.0.0.1", "port_value": port}


@pytest.mark.parametrize("service_type", ["ClusterIP", "LoadBalancer"])
def test_only_envoys_listener_and_the_metrics_ports_leave_the_pod(service_type):
    """What the pod listens on beyond loopback is exactly its declared ports (Envoy's listener,
    its probe port, switchyard's metrics); the clients' Service carries Envoy's listener only
    (a LoadBalancer never publishes the metrics), the headless metrics Service the rest."""
    manifests = render({"service": {"type": service_type}})
    deployment = find(manifests, "Deployment")
    declared = {p["name"]: p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])}
    assert declared == {"http": 8080, "envoy-probes": 8081, "metrics": 9464}
    addresses = _listen_addresses(deployment)
    wide = {flag: int(a.rsplit(":", 1)[1]) for flag, a in addresses.items() if not a.startswith("127.0.0.1:")}
    assert wide == {"envoy --listen": 8080, "envoy --ready": 8081, "serve --metrics-listen": 9464}
    assert (addresses["serve --listen"], addresses["envoy --admin"]) == ("127.0.0.1:50051", "127.0.0.1:9901")
    clients = find(manifests, "Service", FULLNAME)
    assert clients["spec"]["type"] == service_type
    assert clients["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    metrics = find(manifests, "Service", f"{FULLNAME}-metrics")
    assert metrics["spec"]["clusterIP"] == "None" and "type" not in metrics["spec"]
    assert {p["name"]: p["targetPort"] for p in metrics["spec"]["ports"]} == {
        "metrics": "metrics", "envoy-stats": "envoy-probes"}
    assert metrics["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


PROMETHEUS = [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


@pytest.mark.parametrize(
    ("values", "clients", "scrapers"),
    [
        ({}, None, PROMETHEUS),
        ({"networkPolicy": {"ingressFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
                            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]}},
         [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
         [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]),
        ({"networkPolicy": {"metricsFrom": []}}, None, None),
    ],
    ids=["defaults", "selectors", "metrics-open"],
)
def test_network_policy_lets_in_exactly_envoys_clients_and_the_scrape(values, clients, scrapers):
    """On by default: Envoy's listener from networkPolicy.ingressFrom (default any), the metrics
    ports from networkPolicy.metricsFrom (default: Prometheus pods), nothing else; every port it
    names is one the pod declares, and the pod declares no other."""
    manifests = render(values)
    policy = find(manifests, "NetworkPolicy", FULLNAME)["spec"]
    deployment = find(manifests, "Deployment")
    assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    envoy_rule = {"ports": [{"port": "http", "protocol": "TCP"}]}
    metrics_rule = {"ports": [{"port": "metrics", "protocol": "TCP"}, {"port": "envoy-probes", "protocol": "TCP"}]}
    assert policy["ingress"] == [envoy_rule | ({"from": clients} if clients else {}),
                                 metrics_rule | ({"from": scrapers} if scrapers else {})]
    declared = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == declared


def test_shutdown_order():
    """Envoy's preStop hook drains it (POST to the admin address the init container renders),
    then waits envoy.drainSeconds; switchyard has no hook, so its drain starts with the pod's
    shutdown and is longer; the kubelet's grace period covers switchyard's drain + grace."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    envoy_drain, drain, grace = (values["envoy"]["drainSeconds"], values["switchyard"]["drainSeconds"],
                                 values["switchyard"]["graceSeconds"])
    spec = find(render(), "Deployment")["spec"]["template"]["spec"]
    envoy, switchyard = spec["containers"]
    render_args = spec["initContainers"][0]["args"]
    assert render_args[render_args.index("--admin") + 1] == "127.0.0.1:9901"
    shell, flag, script = envoy["lifecycle"]["preStop"]["exec"]["command"]
    assert (shell, flag) == ("/bin/bash", "-c")  # the Envoy image has bash, no curl or wget
    assert "'POST /drain_listeners?graceful&skip_exit HTTP/1.1\\r\\n" in script
    assert "3<>/dev/tcp/127.0.0.1/9901" in script
    assert script.rstrip().splitlines()[-1] == f"sleep {envoy_drain}"
    checked = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    args = envoy["args"]
    assert args[args.index("--drain-strategy") + 1] == "immediate"
    assert int(args[args.index("--drain-time-s") + 1]) == spec["terminationGracePeriodSeconds"]  # never ends first
    assert "lifecycle" not in switchyard  # SIGTERM at once: NOT_SERVING as the pod's shutdown starts
    serve = switchyard["args"]
    assert float(serve[serve.index("--drain-seconds") + 1]) == drain
    assert float(serve[serve.index("--grace") + 1]) == grace
    assert envoy_drain < drain and drain + grace < spec["terminationGracePeriodSeconds"]


@pytest.mark.parametrize(
    "values",
    [
        {"envoy": {"drainSeconds": 0}, "switchyard": {"drainSeconds": 0}},
        {"envoy": {"drainSeconds": 50}, "switchyard": {"drainSeconds": 55.5, "graceSeconds": 10},
         "terminationGracePeriodSeconds": 70},
    ],
    ids=["no-drain", "long-drain"],
)
def test_shutdown_values_render_a_valid_pod(values):
    import kubernetes_validate

    deployment = find(render(values), "Deployment")
    kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    spec = deployment["spec"]["template"]["spec"]
    envoy, switchyard = spec["containers"]
    assert spec["terminationGracePeriodSeconds"] == values.get("terminationGracePeriodSeconds", 35)
    serve = switchyard["args"]
    assert serve[serve.index("--drain-seconds") + 1] == f"{values['switchyard']['drainSeconds']:g}"
    if values["envoy"]["drainSeconds"] == 0:
        assert "lifecycle" not in envoy  # Envoy exits on SIGTERM, as switchyard refuses at once
    else:
        assert envoy["lifecycle"]["preStop"]["exec"]["command"][2].rstrip().endswith("sleep 50")


def test_policy_is_a_directory_mount_that_switchyard_reloads():
    deployment = find(render({"switchyard": {"reloadInterval": 2}}), "Deployment")
    switchyard = deployment["spec"]["template"]["spec"]["containers"][1]
    mount = next(m for m in switchyard["volumeMounts"] if m["name"] == "policy")
    assert "subPath" not in mount  # a subPath mount would never see an edited ConfigMap
    args = switchyard["args"]
    assert args[args.index("--policy") + 1] == mount["mountPath"] + "/policy.yaml"
    assert args[args.index("--reload-interval") + 1] == "2"
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    assert not any(k.startswith("checksum/") for k in annotations)  # a policy edit never restarts pods


def test_existing_policy_configmap_is_used_not_made():
    manifests = render(VALUE_SETS["existing-policy-configmap"])
    assert [m for m in manifests if m["kind"] == "ConfigMap"] == []
    spec = find(manifests, "Deployment")["spec"]["template"]["spec"]
    assert next(v for v in spec["volumes"] if v["name"] == "policy")["configMap"]["name"] == "team-policy"
    assert "/etc/switchyard/policy/routing.yaml" in spec["containers"][1]["args"]


def test_credentials_come_from_secrets_to_envoy_only():
    manifests = render(VALUE_SETS["tls-and-credentials"])
    spec = find(manifests, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "credential-large")
    assert volume["secret"] == {"secretName": "openai", "items": [{"key": "api-key", "path": "api-key"}]}
    envoy, switchyard = spec["containers"]
    assert any(m["name"] == "credential-large" for m in envoy["volumeMounts"])
    assert not any(m["name"].startswith("credential-") for m in switchyard["volumeMounts"] + spec["initContainers"][0]["volumeMounts"])
    args = spec["initContainers"][0]["args"]
    assert ["--tls", "large"] == args[args.index("--tls"):args.index("--tls") + 2]
    assert args[args.index("--credential") + 1] == "large=authorization:/etc/switchyard/credentials/large/api-key"
    assert args[args.index("--credential-prefix") + 1] == "large=Bearer "
    assert "sk-openai" not in json.dumps(manifests)


def test_remote_scorer():
    values = VALUE_SETS["remote-scorer"]
    manifests = render(values)
    scorer = find(manifests, "Deployment", f"{FULLNAME}-scorer")
    service = find(manifests, "Service", f"{FULLNAME}-scorer")
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS lists every pod, sidecars balance over them
    assert service["spec"]["selector"] == scorer["spec"]["selector"]["matchLabels"]
    spec = scorer["spec"]["template"]["spec"]
    container = spec["containers"][0]
    tls = "/etc/switchyard/scorer-tls"
    assert container["command"] + container["args"] == [
        "switchyard", "scorer", "serve", "--config", "/etc/switchyard/scorers.yaml", "--listen", "0.0.0.0:50061",
        "--tls-cert", f"{tls}/tls.crt", "--tls-key", f"{tls}/tls.key", "--tls-client-ca", f"{tls}/ca.crt"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "scorer-tls", "mountPath": tls, "readOnly": True} in container["volumeMounts"]
    assert "exec" in container["readinessProbe"]  # the kubelet's gRPC probe cannot do TLS
    assert spec["nodeSelector"] == values["scorer"]["nodeSelector"]
    assert spec["tolerations"] == values["scorer"]["tolerations"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "probe-checkpoints", "readOnly": True}
    assert volumes["scorer-tls"]["secret"] == {"secretName": "scorer-tls"}
    sidecar = find(manifests, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    switchyard = next(c for c in sidecar["containers"] if c["name"] == "switchyard")
    assert {"name": "scorer-tls", "mountPath": tls, "readOnly": True} in switchyard["volumeMounts"]
    assert {"name": "scorer-tls", "secret": {"secretName": "scorer-tls"}} in sidecar["volumes"]
    config = find(manifests, "ConfigMap", f"{FULLNAME}-scorer-config")
    assert config["data"]["scorers.yaml"] == SCORERS
    assert scorer["spec"]["replicas"] == 2


def test_the_tls_scorer_probe_asks_health_over_mutual_tls(tmp_path):
    """Run the scorer pod's probe command against a real mutual-TLS scorer server, with the
    Secret's files laid out as the pod mounts them."""
    import asyncio
    import shutil
    import sys

    from routers.serving.remote_server import ServerTls
    from tests.remote.certs import SERVER_NAME, make_certs
    from tests.remote.support import FakeScorer, serving, spec

    certs = make_certs(tmp_path)
    mounted = tmp_path / "scorer-tls"
    mounted.mkdir()
    for source, name in ((certs.ca, "ca.crt"), (certs.server_cert, "tls.crt"), (certs.server_key, "tls.key")):
        shutil.copy(source, mounted / name)
    scorer = find(render(VALUE_SETS["remote-scorer"]), "Deployment", f"{FULLNAME}-scorer")
    probe = scorer["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["python", "-c"]
    service_name = f"{FULLNAME}-scorer.{NAMESPACE}.svc.cluster.local"
    assert f'"{service_name}"' in probe[2]

    async def run_probe() -> int:
        server_tls = ServerTls(certs.server_cert, certs.server_key, client_ca=certs.ca)
        async with serving({"probe": FakeScorer(spec())}, tls=server_tls) as server:
            code = probe[2].replace("/etc/switchyard/scorer-tls", str(mounted)).replace(
                "127.0.0.1:50061", f"127.0.0.1:{server.port}").replace(service_name, SERVER_NAME)
            process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
            return await asyncio.wait_for(process.wait(), 30)

    assert asyncio.run(run_probe()) == 0


def test_a_plaintext_scorer_takes_only_the_gateway_pods():
    """The scorer's defaults serve plaintext gRPC: the NetworkPolicy (on by default) lets only
    this release's gateway pods reach its port, and the install notes say how to turn on TLS."""
    values = {"scorer": {"enabled": True, "config": SCORERS, "checkpoints": {"existingClaim": "probes"}}}
    manifests = render(values)
    scorer = find(manifests, "Deployment", f"{FULLNAME}-scorer")
    assert "--tls-cert" not in scorer["spec"]["template"]["spec"]["containers"][0]["args"]
    policy = find(manifests, "NetworkPolicy", f"{FULLNAME}-scorer")["spec"]
    assert policy["podSelector"]["matchLabels"] == scorer["spec"]["selector"]["matchLabels"]
    gateway = find(manifests, "Deployment", FULLNAME)["spec"]["selector"]["matchLabels"]
    assert policy["ingress"] == [{"ports": [{"port": "grpc", "protocol": "TCP"}],
                                  "from": [{"podSelector": {"matchLabels": gateway}}]}]
    text = notes(values)
    assert "plaintext gRPC, to this release's gateway pods only" in text and "scorer.tls.secretName" in text
    tls = notes(values | {"scorer": values["scorer"] | {"tls": {"secretName": "scorer-tls"}}})
    assert "plaintext" not in tls and "/etc/switchyard/scorer-tls/ca.crt" in tls


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_fail_open_value_reaches_the_rendered_envoy_config_and_the_notes(fail_open, tmp_path):
    values = VALUE_SETS["fail-open"] if fail_open else {}
    manifests = render(values)
    pod = LocalPod(find(manifests, "Deployment", FULLNAME), manifests, tmp_path, SECRETS, CONFIG_MAPS)
    assert ("--fail-open" in pod.argv("envoy-config")) is fail_open
    assert pod.run("envoy-config").returncode == 0
    config = yaml.safe_load((pod.volumes["envoy-config"] / "envoy.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][0]["typed_config"]["failure_mode_allow"] is fail_open
    strip = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"][0]["remove_on_match"]
    assert strip["key_matcher"] == {"prefix": "x-switchyard-", "ignore_case": True}
    text = notes(values)
    if fail_open:
        assert "Fail-open (envoy.failOpen: true)" in text and "Fail closed" not in text
    else:
        assert "Fail closed (envoy.failOpen: false)" in text and "Fail-open" not in text


def test_install_notes_say_what_the_network_reaches():
    assert "ext_proc listens on the pod's loopback only (127.0.0.1:50051)" in notes()
    assert f"Scrape through Service {FULLNAME}-metrics" in notes()
    assert "networkPolicy.enabled is false: every pod can reach the metrics ports" in notes(
        VALUE_SETS["no-networkpolicy-no-metrics"])


def test_scorer_checkpoints_from_an_image():
    manifests = render(VALUE_SETS["hpa-servicemonitor-networkpolicy"])
    plaintext = find(manifests, "Deployment", f"{FULLNAME}-scorer")["spec"]["template"]["spec"]["containers"][0]
    assert plaintext["readinessProbe"]["grpc"] == {"port": 50061} and "--tls-cert" not in plaintext["args"]
    spec = find(manifests, "Deployment", f"{FULLNAME}-scorer")["spec"]["template"]["spec"]
    init = spec["initContainers"][0]
    assert init["image"] == "registry.example/probes:1"
    assert init["command"] == ["cp", "-a", "/checkpoints/.", "/mnt/checkpoints/"]
    assert next(v for v in spec["volumes"] if v["name"] == "checkpoints") == {"name": "checkpoints", "emptyDir": {}}


def test_hpa_service_monitor_network_policy_and_dashboard():
    manifests = render(VALUE_SETS["hpa-servicemonitor-networkpolicy"])
    deployment = find(manifests, "Deployment", FULLNAME)
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = find(manifests, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert hpa["spec"]["scaleTargetRef"]["name"] == FULLNAME
    policies = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "NetworkPolicy"}
    gateway = policies[FULLNAME]["spec"]["ingress"]
    assert gateway[0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert gateway[0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    opened = {p["port"] for rule in gateway for p in rule["ports"]}
    assert "grpc" not in opened and 50051 not in opened  # ext_proc stays pod-local
    scorer = policies[f"{FULLNAME}-scorer"]["spec"]["ingress"][0]
    assert scorer["from"][0]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    dashboard = find(manifests, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["switchyard.json"]) == json.loads((CHART / "dashboards" / "switchyard.json").read_text())


def test_service_monitor_scrapes_both_metrics_ports():
    manifests = render(VALUE_SETS["hpa-servicemonitor-networkpolicy"])
    monitor, service = find(manifests, "ServiceMonitor"), find(manifests, "Service", f"{FULLNAME}-metrics")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selected = [m["metadata"]["name"] for m in manifests if m["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= m["metadata"]["labels"].items()]
    assert selected == [service["metadata"]["name"]]  # the metrics Service, not the clients' one
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]} == {
        ("metrics", "/metrics"), ("envoy-stats", "/stats/prometheus")}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def _capture_mounts(manifests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    spec = find(manifests, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: [m for m in c.get("volumeMounts", []) if m["name"] == "capture"] for c in _containers(
        find(manifests, "Deployment"))} | {"volumes": [v for v in spec["volumes"] if v["name"] == "capture"]}


def test_capture_volume_is_writable_by_switchyard_alone_where_the_policy_writes():
    manifests = render(VALUE_SETS["capture"])
    mounts = _capture_mounts(manifests)
    assert mounts == {
        "envoy-config": [], "envoy": [],
        "switchyard": [{"name": "capture", "mountPath": "/var/lib/switchyard/capture"}],  # not readOnly
        "volumes": [{"name": "capture", "emptyDir": {"sizeLimit": "2Gi"}}],
    }
    policy = find(manifests, "ConfigMap", f"{FULLNAME}-policy")["data"]["policy.yaml"]
    assert "path: /var/lib/switchyard/capture/requests.jsonl" in policy
    assert _capture_mounts(render())["volumes"] == []  # off by default


def test_capture_volume_from_an_existing_claim():
    import kubernetes_validate

    manifests = render({"capture": {"enabled": True, "existingClaim": "captured-requests"}})
    assert _capture_mounts(manifests)["volumes"] == [
        {"name": "capture", "persistentVolumeClaim": {"claimName": "captured-requests"}}]
    kubernetes_validate.validate(find(manifests, "Deployment"), KUBE_VERSION, strict=True)


def _switchyard_env(manifests) -> list[dict[str, Any]]:
    containers = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "switchyard")["env"]


STATE_POLICY = EXISTING_POLICY + """
state:
  redis: {url: "redis://redis.cache.svc:6379/0", password_env: REDIS_PASSWORD}
"""


def test_fleet_state_password_comes_from_a_secret_into_switchyard_only():
    import kubernetes_validate

    manifests = render({"state": {"passwordSecret": {"name": "redis-auth", "key": "pw"}},
                        "policy": {"content": STATE_POLICY}})
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "pw"}}} \
        in _switchyard_env(manifests)
    containers = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    envoy = next(c for c in containers if c["name"] == "envoy")
    assert "REDIS_PASSWORD" not in json.dumps(envoy)
    policy = find(manifests, "ConfigMap", f"{FULLNAME}-policy")["data"]["policy.yaml"]
    assert "password_env: REDIS_PASSWORD" in policy
    kubernetes_validate.validate(find(manifests, "Deployment"), KUBE_VERSION, strict=True)
    assert all(e["name"] != "REDIS_PASSWORD" for e in _switchyard_env(render()))  # off by default


# -- values that must fail ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCont": 3}, "replicaCont"),
        ({"envoy": {"prot": 8080}}, "prot"),
        ({"backends": {"large": {"host": "h", "port": 443, "tls": {"enable": True}}}}, "enable"),
        ({"backends": {"large": {"host": "h", "port": "443"}}}, "port"),
        ({"backends": {"large": {"host": "h"}}}, "port"),
        ({"backends": {"large": {"host": "h", "port": 1, "credential": {"secretName": "s"}}}}, "key"),
        ({"switchyard": {"logLevel": "verbose"}}, "logLevel"),
        ({"scorer": {"enabled": True, "gpu": 1}}, "gpu"),
        ({"switchyard": {"drainSeconds": -1}}, "drainSeconds"),
        ({"envoy": {"drainSeconds": 1.5}}, "drainSeconds"),
        ({"terminationGracePeriodSeconds": 0}, "terminationGracePeriodSeconds"),
        ({"networkPolicy": {"metricsFrom": [{"podSelecter": {}}]}}, "podSelecter"),
        ({"capture": {"enabled": True, "mountPath": "relative/dir"}}, "mountPath"),
        ({"state": {"passwordEnv": "REDIS-PASSWORD"}}, "passwordEnv"),
        ({"state": {"passwordSecret": {"name": "redis", "key": ""}}}, "key"),
    ],
    ids=["top-level", "envoy", "tls", "port-type", "port-missing", "credential-key", "enum", "scorer",
         "drain-negative", "envoy-drain-integer", "termination-zero", "network-peer", "capture-mount-path",
         "state-password-env", "state-secret-key"],
)
def test_values_typo_fails(values, where):
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"envoy": {"drainSeconds": 30}},  # switchyard's 25 would end before Envoy stops taking requests
         "switchyard.drainSeconds (25) must be more than envoy.drainSeconds (30)"),
        ({"envoy": {"drainSeconds": 25}}, "switchyard.drainSeconds (25) must be more than envoy.drainSeconds (25)"),
        ({"switchyard": {"graceSeconds": 10}},  # 25 + 10 is not below 35: the kubelet could SIGKILL it
         "terminationGracePeriodSeconds (35) must be more than switchyard.drainSeconds + switchyard.graceSeconds (25 + 10)"),
    ],
    ids=["drain-shorter-than-envoy", "drain-equal-to-envoy", "termination-too-short"],
)
def test_shutdown_that_would_fail_requests_fails(values, message):
    import helm_python

    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(values)


def test_scorer_without_config_fails():
    import helm_python

    with pytest.raises(helm_python.HelmError, match="scorer.config"):
        render({"scorer": {"enabled": True}})


# -- the image the chart uses ------------------------------------------------------------------------
def test_dockerfile_installs_what_the_tests_install():
    """The Dockerfile cannot be built here; its pip steps must be the Makefile's and name real extras."""
    dockerfile = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r"torch==[\d.]+", makefile).group(0)
    assert torch_pin in dockerfile
    assert re.search(r"pip install \.(\s|$)", dockerfile), "the sidecar installs the package: pip install ."
    for extra in re.findall(r"\.\[([a-z,]+)\]", dockerfile):
        for name in extra.split(","):
            assert re.search(rf"^{name} = \[", pyproject, re.M), f"extra {name!r} is not in pyproject.toml"
    targets = re.findall(r"^FROM .* AS (\w+)", dockerfile, re.M)
    assert {"sidecar", "scorer"} <= set(targets)
    assert re.search(r"^USER 10001", dockerfile, re.M)  # matches the chart's runAsUser
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
    assert load_policy(CHART / "files" / "default-policy.yaml").default == "small"


def test_switchyard_reads_backend_health_from_the_envoy_beside_it():
    deployment = find(render({"envoy": {"adminPort": 9911}}), "Deployment")
    switchyard = deployment["spec"]["template"]["spec"]["containers"][1]
    args = switchyard["args"]
    assert args[args.index("--envoy-admin") + 1] == "http://127.0.0.1:9911"  # the pod's loopback admin endpoint
