"""`switchyard envoy render`: the shipped configs are its output, what it builds, `policy check
--envoy`, and a real Envoy running its config (cluster names, body limit, JSON local replies)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from extproc import cli
from extproc._contract import MESSAGE_TIMEOUT_MS
from extproc.envoy._render import (
    REWRITE_SLACK_BYTES, Address, Credential, EnvoyOptions, Upstream, check_envoy_config, envoy_body_limit, envoy_fail_open, render_envoy, rewrite_growth,
)
from extproc._errors import EnvoyConfigError
from extproc._contract import ROUTING_HEADER, USAGE_FILTER
from extproc.policy._loading import load_policy, parse_policy
from harness import Child, envoy_binary, free_port, grpc_serving, http_ok, render_envoy_config
from tests.integration.gateway import REPO, Gateway

DEFAULT_POLICY = REPO / "policies" / "default.yaml"

# The command lines whose output the shipped files are (their headers say so too).
SHIPPED = {
    "standalone.yaml": ["--backend", "small=127.0.0.1:18001", "--backend", "large=127.0.0.1:18002"],
    "sidecar.yaml": ["--listen", "0.0.0.0:8080", "--ready", "0.0.0.0:8081",
                     "--backend", "small=small-model.llm.svc.cluster.local:8000",
                     "--backend", "large=large-model.llm.svc.cluster.local:8000"],
}

# Backend names that differ from their clusters, and two backends sharing one cluster.
SHARED_TEXT = """
version: 1
backends:
  fast: {cluster: pool-a, model: fast-model}
  fast-lora: {cluster: pool-a, model: fast-model-lora}
  big: {cluster: pool-b, model: a-much-longer-model-name}
default: fast
"""
SHARED = parse_policy(SHARED_TEXT, source="shared.yaml")


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)


def _render_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["envoy", "render", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _vhost(config: dict) -> dict:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]


def _cluster(config: dict, name: str) -> dict:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == name)


# -- the shipped files ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_is_the_renderers_output(name, capsys):
    code, out, err = _render_cli(capsys, "--policy", str(DEFAULT_POLICY), *SHIPPED[name])
    assert code == 0, err
    assert yaml.safe_load((REPO / "envoy" / name).read_text()) == yaml.safe_load(out)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_validates(name):
    done = _validate(REPO / "envoy" / name)
    assert done.returncode == 0, done.stdout + done.stderr


# -- what the renderer builds ----------------------------------------------------------------
def test_one_cluster_per_policy_cluster_and_one_route_per_backend():
    config = render_envoy(SHARED, {"pool-a": Upstream(Address("10.0.0.1", 8000)),
                                   "big": Upstream(Address("big.models.svc", 8000))}).bootstrap
    clusters = [c["name"] for c in config["static_resources"]["clusters"]]
    assert clusters == ["switchyard", "pool-a", "pool-b"]
    assert _cluster(config, "pool-a")["type"] == "STATIC"
    assert _cluster(config, "pool-b")["type"] == "STRICT_DNS"
    routes = _vhost(config)["routes"]
    assert [(r["match"].get("headers"), r.get("route", {}).get("cluster")) for r in routes[:3]] == [
        ([{"name": ROUTING_HEADER, "string_match": {"exact": "fast"}}], "pool-a"),
        ([{"name": ROUTING_HEADER, "string_match": {"exact": "fast-lora"}}], "pool-a"),
        ([{"name": ROUTING_HEADER, "string_match": {"exact": "big"}}], "pool-b"),
    ]
    # a routing header naming no backend gets a 503, never the default route
    assert routes[3]["match"]["headers"] == [{"name": ROUTING_HEADER, "present_match": True}]
    assert routes[3]["direct_response"]["status"] == 503
    assert json.loads(routes[3]["direct_response"]["body"]["inline_string"])["error"]["code"] == "backend_not_configured"
    assert routes[4] == {"match": {"prefix": "/"}, "route": {"cluster": "pool-a", "timeout": "600s", "idle_timeout": "300s"}}


def test_body_limit_leaves_room_for_the_longest_rewrite():
    growth = len('"model":,') + len('"a-much-longer-model-name"')
    assert rewrite_growth(SHARED) == growth
    assert envoy_body_limit(SHARED) == SHARED.routing.max_body_bytes + growth + REWRITE_SLACK_BYTES
    unicode = parse_policy("version: 1\nbackends:\n  a: {cluster: a, model: 模型}\ndefault: a\n")
    assert rewrite_growth(unicode) == len('"model":,') + len(json.dumps("模型"))  # \\u escapes are the longer form


def test_ext_proc_settings_and_message_timeout():
    config = render_envoy(SHARED, {"pool-a": Upstream(Address("127.0.0.1", 1)), "pool-b": Upstream(Address("127.0.0.1", 2))},
                          EnvoyOptions(extproc=Address(path="/run/switchyard/ext_proc.sock"))).bootstrap
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["message_timeout"] == "1s" and MESSAGE_TIMEOUT_MS == 1000
    assert ext_proc["failure_mode_allow"] is False
    assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert _cluster(config, "switchyard")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "pipe": {"path": "/run/switchyard/ext_proc.sock"}}
    strip = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"][0]["remove_on_match"]
    assert strip["key_matcher"] == {"prefix": "x-switchyard-", "ignore_case": True}


def _ext_proc(config: dict) -> dict:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"][0]["typed_config"]


def test_fail_open_sets_failure_mode_allow_and_nothing_else():
    upstreams = {"pool-a": Upstream(Address("127.0.0.1", 1)), "pool-b": Upstream(Address("127.0.0.1", 2))}
    closed = render_envoy(SHARED, upstreams).bootstrap
    opened = render_envoy(SHARED, upstreams, EnvoyOptions(fail_open=True)).bootstrap
    assert _ext_proc(closed)["failure_mode_allow"] is False and _ext_proc(opened)["failure_mode_allow"] is True
    assert not envoy_fail_open(closed) and envoy_fail_open(opened)
    _ext_proc(opened)["failure_mode_allow"] = False
    assert opened == closed  # header stripping, routes, the default route: all unchanged


def test_budgets_add_an_observe_only_usage_filter_after_the_routing_one_and_nothing_else(tmp_path):
    upstreams = {"pool-a": Upstream(Address("127.0.0.1", 1)), "pool-b": Upstream(Address("127.0.0.1", 2))}
    priced = SHARED_TEXT.replace("model: fast-model}", "model: fast-model, price: {input_per_mtok: 1, output_per_mtok: 2}}")
    assert priced != SHARED_TEXT
    plain = render_envoy(parse_policy(priced), upstreams).bootstrap
    budgeted = render_envoy(parse_policy(priced + "budgets: {limits: {default: 5}, when_spent: {reject: true}}\n"),
                            upstreams).bootstrap
    filters = _hcm(budgeted)["http_filters"]
    assert [f["name"] for f in filters] == ["envoy.filters.http.ext_proc", USAGE_FILTER, "envoy.filters.http.router"]
    usage = filters[1]["typed_config"]
    assert usage["observability_mode"] is True and usage["failure_mode_allow"] is True
    assert usage["processing_mode"] == {
        "request_header_mode": "SKIP", "request_body_mode": "NONE", "response_header_mode": "SEND",
        "response_body_mode": "STREAMED", "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}
    assert usage["metadata_options"] == {"forwarding_namespaces": {"untyped": ["switchyard"]}}
    assert not envoy_fail_open(budgeted)  # the observer's failure_mode_allow is not fail-open
    del filters[1]
    assert budgeted == plain  # the routing filter, routes, clusters: unchanged
    out = tmp_path / "envoy.yaml"
    out.write_text(yaml.safe_dump(render_envoy(parse_policy(
        priced + "budgets: {limits: {default: 5}, when_spent: {reject: true}}\n"), upstreams).bootstrap))
    done = _validate(out)
    assert done.returncode == 0, done.stdout + done.stderr


def _hcm(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_fail_closed(name):
    assert not envoy_fail_open(yaml.safe_load((REPO / "envoy" / name).read_text()))


def test_render_cli_fail_open(tmp_path, capsys):
    out = tmp_path / "envoy.yaml"
    code, _, err = _render_cli(capsys, "--policy", str(DEFAULT_POLICY), *SHIPPED["sidecar.yaml"], "--fail-open",
                               "--out", str(out))
    assert code == 0, err
    assert "# Fail-open (--fail-open)" in out.read_text()
    config = yaml.safe_load(out.read_text())
    assert _ext_proc(config)["failure_mode_allow"] is True
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    strip = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"][0]["remove_on_match"]
    assert strip["key_matcher"] == {"prefix": "x-switchyard-", "ignore_case": True}
    done = _validate(out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert cli.main(["policy", "check", str(DEFAULT_POLICY), "--envoy", str(out)]) == 0
    assert "fail-open: a request switchyard cannot answer goes to the default backend 'small'" in capsys.readouterr().out


def test_tls_and_credentials(tmp_path, capsys):
    key_dir = tmp_path / "credentials" / "large"
    key_dir.mkdir(parents=True)
    (key_dir / "api-key").write_text("sk-provider")
    out = tmp_path / "envoy" / "envoy.yaml"
    code, _, err = _render_cli(
        capsys, "--policy", str(DEFAULT_POLICY), "--backend", "small=10.1.2.3:8000", "--backend", "large=api.example.com:443",
        "--tls", "large", "--credential", f"large=Authorization:{key_dir / 'api-key'}", "--credential-prefix", "large=Bearer ",
        "--out", str(out))
    assert code == 0, err
    done = _validate(out)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(out.read_text())
    assert config["node"] == {"id": "switchyard", "cluster": "switchyard"}  # file-based SDS needs it
    large, small = _cluster(config, "large"), _cluster(config, "small")
    tls = large["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.example.com"
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "api.example.com"}}]
    filters = large["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.header_mutation", "envoy.filters.http.credential_injector", "envoy.filters.http.upstream_codec"]
    removed = [m["remove"] for m in filters[0]["typed_config"]["mutations"]["request_mutations"]]
    assert removed == ["authorization", "api-key", "x-api-key"]
    generic = filters[1]["typed_config"]["credential"]["typed_config"]
    assert (generic["header"], generic["header_value_prefix"]) == ("authorization", "Bearer ")
    sds = generic["credential"]["sds_config"]["path_config_source"]
    assert sds["watched_directory"] == {"path": str(key_dir)}  # a Secret update re-reads the key
    secret = yaml.safe_load(Path(sds["path"]).read_text())["resources"][0]
    assert secret["generic_secret"]["secret"] == {"filename": str(key_dir / "api-key")}
    assert "sk-provider" not in out.read_text() + Path(sds["path"]).read_text()  # the key stays in its file
    assert "transport_socket" not in small and "typed_extension_protocol_options" not in small
    large_route = next(r for r in _vhost(config)["routes"] if r.get("route", {}).get("cluster") == "large")
    assert large_route["route"]["host_rewrite_literal"] == "api.example.com"


@pytest.mark.parametrize(
    ("upstreams", "message"),
    [
        ({"fast": Upstream(Address("h", 1))}, "No address for cluster(s) pool-b"),
        ({"pool-a": Upstream(Address("h", 1)), "pool-b": Upstream(Address("h", 2)), "nope": Upstream(Address("h", 3))},
         "'nope' is neither a backend nor a cluster"),
        ({"fast": Upstream(Address("h", 1)), "fast-lora": Upstream(Address("h", 2)), "big": Upstream(Address("h", 3))},
         "Cluster 'pool-a' is given twice"),
        ({"pool-a": Upstream(Address("h", 1)), "big": Upstream(Address("h", 2), credential=Credential("api-key", "/k/key"))},
         "SDS files need a directory"),
    ],
    ids=["missing", "unknown", "twice", "credential-without-dir"],
)
def test_render_refuses_incomplete_or_ambiguous_upstreams(upstreams, message):
    with pytest.raises(EnvoyConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render_envoy(SHARED, upstreams)


def test_render_refuses_reserved_and_ambiguous_names():
    reserved = parse_policy("version: 1\nbackends:\n  a: {cluster: switchyard, model: m}\ndefault: a\n")
    with pytest.raises(EnvoyConfigError, match="reserved"):
        render_envoy(reserved, {"a": Upstream(Address("h", 1))})
    crossed = parse_policy("version: 1\nbackends:\n  a: {cluster: b, model: m}\n  b: {cluster: a, model: n}\ndefault: a\n")
    with pytest.raises(EnvoyConfigError, match="is both a cluster and backend 'a'"):
        render_envoy(crossed, {"a": Upstream(Address("h", 1)), "b": Upstream(Address("h", 2))})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "small=localhost", "--backend", "large=h:1"], "--backend small: expected HOST:PORT"),
        (["--backend", "small=h:70000", "--backend", "large=h:1"], "--backend small: expected HOST:PORT"),
        (["--backend", "small=h:1", "--backend", "large=h:2", "--tls", "tiny"], "--tls tiny: no --backend tiny"),
        (["--backend", "small=h:1", "--backend", "large=h:2", "--credential", "large=api-key"], "NAME=HEADER:FILE"),
        (["--backend", "small=h:1", "--backend", "large=h:2", "--credential", "large=bad header:/k"], "not a valid HTTP header"),
        (["--backend", "small=h:1", "--backend", "large=h:2", "--credential", "large=api-key:relative/k", "--out", "/tmp/x.yaml"],
         "must be an absolute path"),
        (["--backend", "small=h:1", "--backend", "large=h:2", "--extproc", "unix:relative.sock"], "absolute path"),
    ],
    ids=["no-port", "port-range", "tls-unknown", "credential-syntax", "credential-header", "credential-relative", "unix-relative"],
)
def test_render_cli_errors_name_the_option(capsys, args, message):
    code, out, err = _render_cli(capsys, "--policy", str(DEFAULT_POLICY), *args)
    assert code == 1 and out == ""
    assert message in err


# -- policy check --envoy ----------------------------------------------------------------------
def test_policy_check_envoy_accepts_the_shipped_configs(capsys):
    for name in SHIPPED:
        assert cli.main(["policy", "check", str(DEFAULT_POLICY), "--envoy", str(REPO / "envoy" / name)]) == 0
        out = capsys.readouterr().out
        assert "ok" in out
        assert "fail closed: a request switchyard cannot answer gets 500/504 router_unavailable" in out


def test_policy_check_envoy_needs_the_early_header_stripping():
    """Without it a client picks the backend (on pass-through requests, and on every request
    when the config fails open)."""
    config = yaml.safe_load((REPO / "envoy" / "standalone.yaml").read_text())
    policy = load_policy(DEFAULT_POLICY)
    assert check_envoy_config(policy, config) == []
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"][0]["remove_on_match"]["key_matcher"][
        "ignore_case"] = False
    problems = check_envoy_config(policy, config)
    assert len(problems) == 1 and "does not remove client x-switchyard-* headers before routing" in problems[0]
    del hcm["early_header_mutation_extensions"]
    assert len(check_envoy_config(policy, config)) == 1


def test_policy_check_envoy_finds_every_disagreement(tmp_path, capsys):
    config = yaml.safe_load((REPO / "envoy" / "standalone.yaml").read_text())
    vhost = _vhost(config)
    vhost["request_body_buffer_limit"] = load_policy(DEFAULT_POLICY).routing.max_body_bytes  # no room for the rewrite
    vhost["routes"] = [r for r in vhost["routes"] if r.get("route", {}).get("cluster") != "large" or "headers" not in r["match"]]
    vhost["routes"][0]["route"]["cluster"] = "elsewhere"
    config["static_resources"]["clusters"] = [c for c in config["static_resources"]["clusters"] if c["name"] != "large"]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["policy", "check", str(DEFAULT_POLICY), "--envoy", str(path)]) == 1
    out = capsys.readouterr().out
    assert "backend 'large' uses cluster 'large', which this Envoy config lacks" in out
    assert "no route for `x-switchyard-backend: large`" in out
    assert "sends backend 'small' to cluster 'elsewhere'" in out
    assert "request_body_buffer_limit 1048576 for backend 'small' is below 1048598" in out
    assert "ok" not in out


def test_policy_check_envoy_needs_an_ext_proc_listener(tmp_path):
    config = yaml.safe_load((REPO / "envoy" / "standalone.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = hcm["http_filters"][1:]
    assert any("no listener runs the ext_proc filter" in p for p in check_envoy_config(load_policy(DEFAULT_POLICY), config))


# -- a real Envoy running the rendered config ---------------------------------------------------
EDGE_POLICY = """\
version: 1
backends:
  small: {cluster: c-small, model: small-model}
  large: {cluster: c-large, model: large-model-with-a-longer-name}
  down: {cluster: c-down, model: down-model}
default: small
models: {routed: [auto], direct: true, unknown: route}
signals:
  escalate: {kind: keywords, keywords: [escalate]}
  offline: {kind: keywords, keywords: [offline]}
rules:
  - {name: to-large, when: escalate, backend: large}
  - {name: to-down, when: offline, backend: down}
"""
# routing.max_body_bytes (the default). Envoy never buffers less than its connection buffer
# (1 MiB by default), so the rewrite's 413 (issue 10, item 3) shows only at 1 MiB and above.
LIMIT = 1 << 20


class _Client(Gateway):
    """The harness's HTTP helpers, on an :class:`Edge`'s Envoy."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    @property
    def port(self) -> int:
        return self.edge.listen

    def logs(self, lines: int = 60) -> str:
        return self.edge.logs()


class Edge:
    """Backends `small` and `large` (nothing listens for `down`), switchyard, and Envoy on the
    renderer's config, with the client and route timeouts cut to 1 s so 408 and 504 show fast."""

    def __init__(self, workdir: Path) -> None:
        self.policy = workdir / "policy.yaml"
        self.policy.write_text(EDGE_POLICY)
        self.listen, admin, extproc = free_port(), free_port(), free_port()
        ports = {"small": free_port(), "large": free_port(), "down": free_port()}
        config = render_envoy_config(self.policy, listen_port=self.listen, admin_port=admin, extproc_port=extproc,
                                     backends=ports)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["request_timeout"] = "1s"
        for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
            if "route" in route:
                route["route"]["timeout"] = "1s"
        (workdir / "envoy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.children = [
            Child(f"backend-{name}", [sys.executable, "-m", "demo.backend", "--name", name, "--port", str(ports[name])],
                  workdir / f"backend-{name}.log") for name in ("small", "large")
        ]
        self.switchyard = Child("switchyard", [sys.executable, "-m", "extproc", "serve", "--policy", str(self.policy),
                                               "--listen", f"127.0.0.1:{extproc}", "--reload-interval", "0.2",
                                               "--drain-seconds", "0"],
                                workdir / "switchyard.log")
        self.envoy = Child("envoy", [envoy_binary(), "-c", str(workdir / "envoy.yaml"), "--log-level", "warn",
                                     "--disable-hot-restart", "--concurrency", "1"], workdir / "envoy.log")
        self.children += [self.switchyard, self.envoy]
        self.ready = [lambda: http_ok(ports["small"], "/health"), lambda: http_ok(ports["large"], "/health"),
                      lambda: grpc_serving(extproc), lambda: http_ok(admin, "/ready")]
        self.gateway = _Client(self)

    def start(self) -> Edge:
        for child in self.children:
            child.start()
        deadline = time.monotonic() + 30
        for child, ready in zip(self.children, self.ready):
            while not ready():
                assert child.running and time.monotonic() < deadline, f"{child.name} did not start\n{self.logs()}"
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {c.name}\n{c.tail()}" for c in self.children)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    running = Edge(tmp_path_factory.mktemp("edge")).start()
    try:
        yield running
    finally:
        running.stop()


def _compact(content: str, size: int | None = None) -> bytes:
    """A compact chat body (what the rewrite re-serializes to), padded to ``size`` bytes."""
    body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    data = json.dumps(body, separators=(",", ":")).encode()
    if size is not None:
        body["messages"][0]["content"] = content + "x" * (size - len(data))
        data = json.dumps(body, separators=(",", ":")).encode()
        assert len(data) == size
    return data


def _json_error(reply) -> dict:
    assert reply.header("content-type") == "application/json", reply
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"], reply
    return error


def test_routes_go_to_the_policys_clusters(edge):
    reply = edge.gateway.post(_compact("please escalate this"))
    assert reply.status == 200, reply
    assert reply.header("x-demo-backend") == "large" and reply.header("x-switchyard-backend") == "large"
    assert reply.header("x-demo-received-model") == "large-model-with-a-longer-name"
    plain = edge.gateway.post(_compact("hello"))
    assert plain.header("x-demo-backend") == "small", plain
    assert edge.gateway.get("/v1/models").header("x-demo-backend") == "small"  # not routed: the default's cluster


def test_body_at_the_limit_that_the_rewrite_grows_is_routed(edge):
    data = _compact("escalate ", size=LIMIT)
    reply = edge.gateway.post(data)
    assert reply.status == 200, reply  # LIMIT + 26 bytes after the rewrite: still within Envoy's buffer
    assert reply.header("x-demo-received-model") == "large-model-with-a-longer-name"
    chunked = edge.gateway.request("POST", "/v1/chat/completions", (data[i:i + 65536] for i in range(0, len(data), 65536)),
                                   {"content-type": "application/json"}, chunked=True)
    assert chunked.status == 200, chunked


def test_body_over_the_limit_gets_a_json_413(edge):
    data = _compact("escalate ", size=LIMIT + 1)
    reply = edge.gateway.post(data)  # switchyard's own 413
    assert reply.status == 413 and _json_error(reply)["code"] == "request_too_large"
    big = _compact("escalate ", size=LIMIT + 4000)  # chunked, over Envoy's buffer: Envoy answers
    reply = edge.gateway.request("POST", "/v1/chat/completions", (big[i:i + 65536] for i in range(0, len(big), 65536)),
                                 {"content-type": "application/json"}, chunked=True)
    assert reply.status == 413
    assert _json_error(reply) == {"message": "The request body is over this gateway's size limit.",
                                  "type": "invalid_request_error", "code": "request_too_large"}


def test_switchyard_errors_pass_unchanged(edge):
    reply = edge.gateway.post(b'{"model": "auto", "messages": [')
    assert reply.status == 400
    assert _json_error(reply)["code"] == "invalid_json"


def test_unreachable_backend_gets_a_json_503(edge):
    reply = edge.gateway.post(_compact("this one goes offline"))
    assert reply.status == 503, reply
    assert reply.header("x-switchyard-backend") == "down"
    assert _json_error(reply)["code"] == "backend_unavailable"


def test_slow_backend_gets_a_json_504(edge):
    reply = edge.gateway.post(_compact("hello"), headers={"x-demo-delay-ms": "3000"})
    assert reply.status == 504, reply
    assert _json_error(reply) == {"message": "The backend did not answer in time.", "type": "service_unavailable",
                                  "code": "backend_timeout"}


def test_stalled_body_gets_a_json_408(edge):
    with socket.create_connection(("127.0.0.1", edge.listen), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"model\"")
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    assert b"content-type: application/json" in head.lower()
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")))
    assert json.loads(body[:length])["error"]["code"] == "request_timeout"


def test_routing_header_without_a_route_gets_503_not_the_default(edge):
    """A policy edited to add a backend, Envoy not re-rendered: 503, never the default backend."""
    edge.policy.write_text(EDGE_POLICY.replace(
        "rules:\n", "rules:\n  - {name: to-new, when: brand_new, backend: new}\n").replace(
        "signals:\n", "signals:\n  brand_new: {kind: keywords, keywords: [brandnew]}\n").replace(
        "backends:\n", "backends:\n  new: {cluster: c-new, model: new-model}\n"))
    deadline = time.monotonic() + 15
    while True:
        reply = edge.gateway.post(_compact("brandnew please"))
        if reply.status != 200 or time.monotonic() > deadline:
            break
        assert reply.header("x-demo-backend") == "small"  # the old policy, until the reload
        time.sleep(0.2)
    assert reply.status == 503, reply
    assert reply.header("x-demo-backend") is None
    assert _json_error(reply)["code"] == "backend_not_configured"


def test_routing_service_failure_gets_a_true_json_error(edge):
    edge.switchyard.stop()
    try:
        reply = edge.gateway.post(_compact("hello"))
    finally:
        edge.switchyard.start()
    assert 500 <= reply.status < 600, reply
    error = _json_error(reply)
    assert error["code"] == "router_unavailable"
    assert error["message"] in ("The routing service failed while processing this request.",
                                "The routing service did not answer in time; the request was not routed.")
