"""Render ``envoy/standalone.yaml`` for a given set of ports and backends.

The template's listener, admin, ext_proc and router settings are kept; its ports, its
routes (one per backend on the exact ``x-switchyard-backend`` value, then the default) and
its backend clusters (all on 127.0.0.1) are rebuilt. The demo and the integration tests
both use this, so they run the same Envoy configuration as the file users read.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["STANDALONE", "ROUTING_HEADER", "render_envoy_config", "write_envoy_config"]

STANDALONE = Path(__file__).resolve().parent.parent / "envoy" / "standalone.yaml"
ROUTING_HEADER = "x-switchyard-backend"
EXTPROC_CLUSTER = "switchyard"
LOOPBACK = "127.0.0.1"


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    for chain in config["static_resources"]["listeners"][0]["filter_chains"]:
        for network_filter in chain["filters"]:
            if network_filter["name"] == "envoy.filters.network.http_connection_manager":
                return network_filter["typed_config"]
    raise ValueError("The Envoy template has no http_connection_manager on its first listener.")


def _endpoint(cluster: dict[str, Any], port: int) -> dict[str, Any]:
    cluster["load_assignment"] = {
        "cluster_name": cluster["name"],
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": port}}}}]}],
    }
    return cluster


def render_envoy_config(
    template: Path = STANDALONE,
    *,
    listen_port: int,
    admin_port: int,
    extproc_port: int,
    backends: dict[str, int],
    default_backend: str,
    max_body_bytes: int | None = None,
) -> dict[str, Any]:
    """The template as a dict, rebuilt for these ports and ``backends`` (name → loopback port).

    Each backend's cluster is named after the backend. ``max_body_bytes`` replaces the
    virtual host's ``request_body_buffer_limit`` (the ext_proc buffered-body limit).
    """
    if default_backend not in backends:
        raise ValueError(f"default_backend {default_backend!r} is not one of the backends: {', '.join(backends)}.")
    if EXTPROC_CLUSTER in backends:
        raise ValueError(f"A backend cannot be named {EXTPROC_CLUSTER!r}: that is the ext_proc cluster's name.")
    config = yaml.safe_load(Path(template).read_text())
    config["admin"]["address"]["socket_address"].update(address=LOOPBACK, port_value=admin_port)
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address=LOOPBACK, port_value=listen_port)

    vhost = _hcm(config)["route_config"]["virtual_hosts"][0]
    routes = vhost["routes"]
    action = {k: v for k, v in routes[-1]["route"].items() if k != "cluster"}  # timeouts etc.
    vhost["routes"] = [
        {
            "match": {"prefix": "/", "headers": [{"name": ROUTING_HEADER, "string_match": {"exact": name}}]},
            "route": {"cluster": name, **action},
        }
        for name in backends
    ] + [{"match": {"prefix": "/"}, "route": {"cluster": default_backend, **action}}]
    if max_body_bytes is not None:
        vhost["request_body_buffer_limit"] = max_body_bytes

    clusters = config["static_resources"]["clusters"]
    extproc = next(c for c in clusters if c["name"] == EXTPROC_CLUSTER)
    backend_template = next(c for c in clusters if c["name"] != EXTPROC_CLUSTER)
    config["static_resources"]["clusters"] = [_endpoint(extproc, extproc_port)] + [
        _endpoint({**copy.deepcopy(backend_template), "name": name}, port) for name, port in backends.items()
    ]
    return config


def write_envoy_config(path: Path, template: Path = STANDALONE, **kwargs: Any) -> Path:
    """Render (see :func:`render_envoy_config`) and write the YAML to ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render_envoy_config(template, **kwargs), sort_keys=False))
    return path
