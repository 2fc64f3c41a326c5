"""The Envoy bootstraps: both validate, and rendering rebuilds ports, routes and clusters."""

from __future__ import annotations

import subprocess

import pytest

from demo.envoy_config import STANDALONE, render_envoy_config, write_envoy_config
from demo.stack import envoy_binary
from tests.integration.harness import REPO


def _validate(path) -> subprocess.CompletedProcess:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["standalone.yaml", "sidecar.yaml"])
def test_shipped_config_validates(name):
    done = _validate(REPO / "envoy" / name)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rendered_config_validates(tmp_path):
    path = write_envoy_config(tmp_path / "envoy.yaml", listen_port=20000, admin_port=20001, extproc_port=20002,
                              backends={"tiny": 20003, "mid": 20004, "vision": 20005}, default_backend="mid",
                              max_body_bytes=4096)
    done = _validate(path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_render_rebuilds_routes_and_clusters():
    config = render_envoy_config(STANDALONE, listen_port=1, admin_port=2, extproc_port=3,
                                 backends={"tiny": 4, "vision": 5}, default_backend="tiny", max_body_bytes=99)
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 1}
    assert config["admin"]["address"]["socket_address"]["port_value"] == 2
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    assert vhost["request_body_buffer_limit"] == 99
    routes = [(r["match"].get("headers"), r["route"]["cluster"]) for r in vhost["routes"]]
    assert routes == [
        ([{"name": "x-switchyard-backend", "string_match": {"exact": "tiny"}}], "tiny"),
        ([{"name": "x-switchyard-backend", "string_match": {"exact": "vision"}}], "vision"),
        (None, "tiny"),
    ]
    assert all(r["route"]["timeout"] == "600s" for r in vhost["routes"])  # kept from the template
    ports = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"]
             for c in config["static_resources"]["clusters"]}
    assert ports == {"switchyard": 3, "tiny": 4, "vision": 5}
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"]
    strip = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"][0]["remove_on_match"]
    assert strip["key_matcher"]["prefix"] == "x-switchyard-"


@pytest.mark.parametrize(("backends", "default"), [({"a": 1}, "b"), ({"switchyard": 1}, "switchyard")])
def test_render_rejects_bad_backends(backends, default):
    with pytest.raises(ValueError):
        render_envoy_config(STANDALONE, listen_port=1, admin_port=2, extproc_port=3, backends=backends, default_backend=default)
