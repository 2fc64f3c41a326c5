"""The Envoy bootstrap for a policy: the one source of every Envoy config switchyard ships.

``switchyard envoy render`` writes it; the demo, the integration tests, the benches and the
Helm chart (its init container runs the command) all use it, and envoy/standalone.yaml and
envoy/sidecar.yaml are what it renders for policies/default.yaml. What it builds::

    listener ──▶ early removal of client x-switchyard-* headers (before route selection)
             ──▶ ext_proc (switchyard; request headers SEND, body BUFFERED; fail closed,
                 or with ``fail_open`` unreachable switchyard ─▶ the default backend's route)
             ──▶ with ``budgets:`` only: the usage filter (a second ext_proc, observe-only: Envoy
                 sends switchyard each response and the request's charge, never waiting)
             ──▶ router: one route per policy backend on the exact routing-header value
                 ─▶ that backend's cluster; a routing header naming no backend ─▶ 503;
                 no routing header (a request switchyard did not route) ─▶ the default's cluster
    clusters: switchyard (ext_proc, HTTP/2), one per distinct ``backends.<name>.cluster``
              (optional TLS with SNI and a SAN match, and an injected credential)

Envoy's own error replies (413, 408, 503, 504, ext_proc failures, ...) get the JSON shape of
switchyard's, ``{"error": {"message", "type", "code"}}`` with ``application/json``.

Body limits: switchyard refuses bodies over ``routing.max_body_bytes``; Envoy buffers up to
:func:`envoy_body_limit`, which is that plus room for the ``model`` rewrite, so a body the
policy accepts is never refused by Envoy after it was routed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc._defaults import DEFAULT_EXTPROC_ADDRESS
from extproc._contract import MESSAGE_TIMEOUT_MS
from extproc._errors import EnvoyConfigError
from extproc._contract import (
    USAGE_FILTER,
    FAILOVER_MODELS_KEY,
    FAILOVER_NAMESPACE,
    HEADER_PREFIX,
    METADATA_NAMESPACE,
    MODEL_SLOT,
    ROUTING_HEADER,
    RULE_HEADER,
    SERVED_BY_HEADER,
    SESSION_HEADER,
)
from extproc.policy._model import Policy

__all__ = [
    "MESSAGE_TIMEOUT_MS",
    "REWRITE_SLACK_BYTES",
    "EXTPROC_CLUSTER",
    "Address",
    "Credential",
    "Upstream",
    "EnvoyOptions",
    "OutlierDetection",
    "RenderedEnvoy",
    "envoy_body_limit",
    "rewrite_growth",
    "resolve_upstreams",
    "render_envoy",
    "check_envoy_config",
    "envoy_fail_open",
    "longest_chain",
    "DEFAULT_PER_TRY_TIMEOUT_S",
]


#: Bytes Envoy buffers beyond ``max_body_bytes`` + the longest ``model`` rewrite (slack for
#: whatever else a rewrite may add, e.g. escaping).
REWRITE_SLACK_BYTES = 1024

#: The ext_proc cluster's name; no backend cluster may use it (nor ``envoy_admin``).
EXTPROC_CLUSTER = "switchyard"
_ADMIN_CLUSTER = "envoy_admin"
_RESERVED_CLUSTERS = (EXTPROC_CLUSTER, _ADMIN_CLUSTER)

_ROUTE_TIMEOUTS = {"timeout": "600s", "idle_timeout": "300s"}
_CLIENT_CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_DEFAULT_CA = "/etc/ssl/certs/ca-certificates.crt"

_HCM = "envoy.filters.network.http_connection_manager"
_EXT_PROC = "envoy.filters.http.ext_proc"
_TYPES = {
    "hcm": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "ext_proc": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
    "router": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    "early": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
    "cel": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
    "stdout": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
    "http_options": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "header_mutation": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
    "injector": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
    "generic": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
    "codec": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
    "tls": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    "secret": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    "connections": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
    "priority_group": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.priority_group.v3."
                      "PriorityGroupClusterSpecifier",
    "lua": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
}

#: Failover: how long one attempt may wait for its backend's response *headers* before Envoy
#: tries the next backend. A streaming completion sends its headers at once, a non-streaming one
#: only when it is done, so this must exceed the longest non-streaming completion; a stream
#: already flowing is never cut by it.
DEFAULT_PER_TRY_TIMEOUT_S = 60.0
#: Failover: the pause before each retry (Envoy adds jitter, doubling up to the max).
_RETRY_BACK_OFF = {"base_interval": "0.01s", "max_interval": "0.1s"}
#: Failover: retries may be this share of a cluster's active requests (at least
#: ``min_retry_concurrency`` at once); Envoy's default allows only 3 concurrent retries per cluster.
_RETRY_BUDGET = {"budget_percent": {"value": 50.0}, "min_retry_concurrency": 10}
_PRIORITY_GROUP = "envoy.router.cluster_specifier_plugin.priority_group"
_LUA = "envoy.filters.http.lua"

#: Each backend cluster's upstream Lua filter, run once per attempt: the ``model`` slot switchyard
#: sent (the JSON text of MODEL_SLOT) becomes this cluster's model, from the ``switchyard``
#: metadata's ``attempt_models`` (cluster -> JSON text). A body without the slot (a request sent
#: without failover) passes unchanged; a slot without a model for this cluster is a 500, never
#: another backend's model.
_MODEL_SLOT_LUA = """\
local CLUSTER = %(cluster)s
local SLOT = %(slot)s
function envoy_on_request(h)
  local body = h:body()
  if body == nil then return end
  local s = body:getBytes(0, body:length())
  local a, b = string.find(s, SLOT, 1, true)
  if a == nil then return end
  local decided = h:streamInfo():dynamicMetadata():get(%(namespace)s)
  local models = decided and decided[%(key)s]
  local model = models and models[CLUSTER]
  if model == nil then
    h:respond({[":status"] = "500"}, "switchyard: no model for this failover attempt")
    return
  end
  local out, i = {}, 1
  while a ~= nil do
    out[#out + 1] = string.sub(s, i, a - 1)
    out[#out + 1] = model
    i = b + 1
    a, b = string.find(s, SLOT, i, true)
  end
  out[#out + 1] = string.sub(s, i)
  local new = table.concat(out)
  body:setBytes(new)
  h:headers():replace("content-length", tostring(#new))
end
"""


# -- inputs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    """A TCP ``host:port``, or a Unix socket ``path`` (``unix:/path`` on the command line)."""

    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str, *, what: str = "address") -> Address:
        """``HOST:PORT``, ``[V6]:PORT`` or ``unix:/PATH``; errors name ``what`` and ``text``."""
        text = text.strip()
        if text.startswith("unix:"):
            path = text[len("unix:"):]
            if not path.startswith("/"):
                raise EnvoyConfigError(f"{what}: a Unix socket needs an absolute path, got {text!r}.")
            return cls(path=path)
        host, sep, port = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise EnvoyConfigError(f"{what}: expected HOST:PORT (port 1-65535) or unix:/PATH, got {text!r}.")
        return cls(host=host, port=int(port))

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def envoy(self) -> dict[str, Any]:
        if self.path:
            return {"pipe": {"path": self.path}}
        return {"socket_address": {"address": self.host, "port_value": self.port}}

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Credential:
    """A header Envoy adds to every request to one cluster, its value read from ``file``.

    The value is ``prefix`` + the file's content (e.g. ``authorization`` with prefix
    ``"Bearer "``, or ``api-key`` with none). Envoy re-reads the file when its directory
    changes (a Kubernetes Secret update), so keys rotate without a restart.
    """

    header: str
    file: str
    prefix: str = ""

    def __post_init__(self) -> None:
        if not _HEADER_NAME.match(self.header):
            raise EnvoyConfigError(f"credential header {self.header!r} is not a valid HTTP header name.")
        if self.header.lower().startswith(HEADER_PREFIX):
            raise EnvoyConfigError(f"credential header {self.header!r}: {HEADER_PREFIX}* headers are switchyard's own.")
        if not self.file.startswith("/"):
            raise EnvoyConfigError(f"credential file {self.file!r} must be an absolute path (Envoy reads it at run time).")


@dataclass(frozen=True)
class Upstream:
    """Where one Envoy cluster sends requests, and how.

    ``tls``: HTTPS to the upstream, the certificate checked against ``ca_file`` and the
    name ``sni`` (default: the address's host), which is also sent as SNI and as the
    ``Host`` header. ``credential``: see :class:`Credential`.
    """

    address: Address
    tls: bool = False
    sni: str | None = None
    ca_file: str = _DEFAULT_CA
    credential: Credential | None = None

    def __post_init__(self) -> None:
        if self.address.path:
            if self.tls:
                raise EnvoyConfigError(f"{self.address}: TLS to a Unix socket is not supported.")
        if self.sni is not None and not self.tls:
            raise EnvoyConfigError(f"{self.address}: an SNI name ({self.sni!r}) needs TLS.")

    @property
    def server_name(self) -> str:
        return self.sni or self.address.host


@dataclass(frozen=True)
class OutlierDetection:
    """Envoy's passive health check on every backend cluster (its ``outlier_detection``).

    A host is ejected after ``consecutive_5xx`` 5xx answers in a row, or
    ``consecutive_gateway_failure`` 502/503/504 in a row, or ``consecutive_local_origin_failure``
    connect failures, resets and timeouts in a row (counted apart from the backend's own
    answers: ``split_external_local_origin_errors``). It stays out ``base_ejection_s`` seconds
    times the number of times it was ejected (at most ``max_ejection_s``); returns are checked
    every ``interval_s``. Every host of a cluster may be ejected (``max_ejection_percent`` 100):
    ``serve --envoy-admin`` reads the ejections and switchyard routes around them.
    """

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    interval_s: float = 2.0
    base_ejection_s: float = 10.0
    max_ejection_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure"):
            if getattr(self, name) < 1:
                raise EnvoyConfigError(f"Outlier detection `{name}` must be at least 1, got {getattr(self, name)}.")
        for name in ("interval_s", "base_ejection_s", "max_ejection_s"):
            if not 0.001 <= getattr(self, name) < float("inf"):
                raise EnvoyConfigError(f"Outlier detection `{name}` must be at least 0.001 s, got {getattr(self, name)}.")


@dataclass(frozen=True)
class EnvoyOptions:
    """Where Envoy listens and finds switchyard; everything not policy- or backend-specific.

    ``ready``: an extra listener answering ``GET /ready`` (Envoy's readiness, from the
    admin endpoint, which stays on ``admin``) and ``GET /stats/prometheus`` (Envoy's
    metrics), for a kubelet probe and a scraper; ``None``: no such listener.
    ``credentials_dir``: where the file-based SDS configs of credentials are written (and
    read by Envoy); needed only when an upstream has a credential. ``body_limit``
    overrides :func:`envoy_body_limit` (tests use it to run with a mismatched limit).
    ``fail_open``: ext_proc's ``failure_mode_allow``. Off (the default), a request
    switchyard cannot answer (down, erroring, over ``message_timeout``) gets 500/504
    ``router_unavailable``; on, Envoy sends it on unrouted: client ``x-switchyard-*``
    headers are still removed first, so it takes the last route, the policy's default
    backend, with ``model`` as the client sent it. ``outlier``: the outlier detection of
    every backend cluster (``None``: none, Envoy never ejects a backend).
    """

    listen: Address = field(default_factory=lambda: Address("127.0.0.1", 10000))
    admin: Address = field(default_factory=lambda: Address("127.0.0.1", 9901))
    extproc: Address = field(default_factory=lambda: Address.parse(DEFAULT_EXTPROC_ADDRESS))
    ready: Address | None = None
    access_log: bool = True
    credentials_dir: str | None = None
    body_limit: int | None = None
    node_id: str = "switchyard"
    node_cluster: str = "switchyard"
    fail_open: bool = False
    #: Failover (policies with ``fallbacks``): seconds an attempt may wait for response headers.
    per_try_timeout_s: float = DEFAULT_PER_TRY_TIMEOUT_S
    outlier: OutlierDetection | None = field(default_factory=OutlierDetection)


@dataclass(frozen=True)
class RenderedEnvoy:
    """The bootstrap, and the SDS files it names (absolute path -> document)."""

    bootstrap: dict[str, Any]
    sds_files: dict[str, dict[str, Any]]

    def yaml(self, header: str = "") -> str:
        comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
        return comment + yaml.safe_dump(self.bootstrap, sort_keys=False, width=120)

    def write(self, path: str | Path, header: str = "") -> Path:
        """Write the bootstrap to ``path`` and every SDS file where the bootstrap names it."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for sds_path, document in self.sds_files.items():
                Path(sds_path).parent.mkdir(parents=True, exist_ok=True)
                Path(sds_path).write_text(yaml.safe_dump(document, sort_keys=False))
            path.write_text(self.yaml(header))
        except OSError as exc:
            raise EnvoyConfigError(f"Cannot write the Envoy config to {path}: {exc.strerror or exc}.") from exc
        return path


# -- limits ------------------------------------------------------------------------------
def rewrite_growth(policy: Policy) -> int:
    """The most bytes the ``model`` rewrite can add to a body: a whole ``"model":"…",``
    member (a body without ``model``) with the longest backend model, escaped or not."""
    models = [b.model for b in policy.backends.values()] + ([MODEL_SLOT] if longest_chain(policy) > 1 else [])
    longest = max(max(len(json.dumps(m)), len(json.dumps(m, ensure_ascii=False).encode())) for m in models)
    return len('"model":,') + longest


def longest_chain(policy: Policy) -> int:
    """The most backends one request of ``policy`` may try (1: the policy has no failover)."""
    chains = [1 + len(b.fallbacks) for b in policy.backends.values()]
    chains += [1 + len(r.fallbacks) for r in policy.rules if r.fallbacks is not None]
    return max(chains)


def envoy_body_limit(policy: Policy) -> int:
    """Envoy's request body buffer limit for ``policy``: max_body_bytes + rewrite room + slack."""
    return policy.routing.max_body_bytes + rewrite_growth(policy) + REWRITE_SLACK_BYTES


# -- upstreams ---------------------------------------------------------------------------
def resolve_upstreams(policy: Policy, by_name: Mapping[str, Upstream]) -> dict[str, Upstream]:
    """Key ``by_name`` (each a backend name or a cluster name) by cluster; check all are there.

    A name that is both a cluster and a different backend is ambiguous (an error), as are
    two entries for one cluster and a name the policy does not know.
    """
    clusters = {b.cluster: None for b in policy.backends.values()}
    reserved = sorted(c for c in clusters if c in _RESERVED_CLUSTERS)
    if reserved:
        raise EnvoyConfigError(
            f"{policy.source}: cluster name {reserved[0]!r} is reserved for Envoy's own use; rename it in the policy."
        )
    out: dict[str, Upstream] = {}
    for name, upstream in by_name.items():
        backend = policy.backends.get(name)
        if name in clusters and backend is not None and backend.cluster != name:
            raise EnvoyConfigError(
                f"{name!r} is both a cluster and backend {name!r} (whose cluster is {backend.cluster!r}); "
                f"give the cluster name."
            )
        cluster = name if name in clusters else backend.cluster if backend is not None else None
        if cluster is None:
            raise EnvoyConfigError(
                f"{name!r} is neither a backend nor a cluster of {policy.source} "
                f"(backends: {', '.join(policy.backends)}; clusters: {', '.join(clusters)})."
            )
        if cluster in out:
            raise EnvoyConfigError(f"Cluster {cluster!r} is given twice (last as {name!r}).")
        out[cluster] = upstream
    missing = [c for c in clusters if c not in out]
    if missing:
        raise EnvoyConfigError(
            f"No address for cluster(s) {', '.join(missing)} of {policy.source}: "
            f"give each one (--backend NAME=HOST:PORT, NAME a backend or cluster)."
        )
    return {c: out[c] for c in clusters}


# -- rendering ---------------------------------------------------------------------------
def _error_body(message: str, error_type: str, code: str) -> dict[str, Any]:
    return {"json_format": {"error": {"message": message, "type": error_type, "code": code}}}


def _mapper(expression: str, body_format: dict[str, Any]) -> dict[str, Any]:
    return {
        "filter": {"extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {"@type": _TYPES["cel"], "expression": expression},
        }},
        "body_format_override": body_format,
    }


def _local_replies() -> dict[str, Any]:
    """Envoy's own replies in switchyard's JSON error shape; switchyard's pass unchanged."""
    client, server = "invalid_request_error", "service_unavailable"  # like switchyard's errors
    keep = {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"}, "content_type": "application/json"}
    ext_proc = 'response.code_details.startsWith("ext_proc_error")'
    return {"mappers": [
        # switchyard's ImmediateResponses (details switchyard_*) and the 503 of a routing
        # header without a route are JSON already.
        _mapper('response.code_details.startsWith("switchyard_") || response.code_details == "direct_response"', keep),
        _mapper(f"{ext_proc} && response.code == 504", _error_body(
            "The routing service did not answer in time; the request was not routed.", server, "router_unavailable")),
        _mapper(ext_proc, _error_body(
            "The routing service failed while processing this request.", server, "router_unavailable")),
        _mapper("response.code == 413", _error_body(
            "The request body is over this gateway's size limit.", client, "request_too_large")),
        _mapper("response.code == 408", _error_body(
            "The request did not arrive in time.", client, "request_timeout")),
        _mapper("response.code == 431", _error_body(
            "The request headers are too large.", client, "request_headers_too_large")),
        _mapper("response.code == 502", _error_body(
            "The backend's answer was not valid HTTP.", server, "backend_error")),
        _mapper("response.code == 503", _error_body(
            "No backend could take the request (unreachable, or no healthy host).", server, "backend_unavailable")),
        _mapper("response.code == 504", _error_body(
            "The backend did not answer in time.", server, "backend_timeout")),
        _mapper("response.code >= 500", _error_body("%LOCAL_REPLY_BODY%", server, "gateway_error")),
        _mapper("response.code >= 400", _error_body("%LOCAL_REPLY_BODY%", client, "invalid_request")),
    ]}


def _access_log(failover: bool = False) -> list[dict[str, Any]]:
    """``failover``: also the request id and the attempts made (the attempt log's lines share the id)."""
    fields = {
        "time": "%START_TIME%", "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%",
        "status": "%RESPONSE_CODE%", "details": "%RESPONSE_CODE_DETAILS%", "flags": "%RESPONSE_FLAGS%",
        "duration_ms": "%DURATION%", "bytes_in": "%BYTES_RECEIVED%", "bytes_out": "%BYTES_SENT%",
        "cluster": "%UPSTREAM_CLUSTER%", "upstream": "%UPSTREAM_HOST%",
        "switchyard": f"%DYNAMIC_METADATA({METADATA_NAMESPACE})%",
    }
    if failover:
        fields |= {"request_id": "%REQ(x-request-id)%", "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"}
    return [{"name": "envoy.access_loggers.stdout",
             "typed_config": {"@type": _TYPES["stdout"], "log_format": {"json_format": fields}}}]


def _attempt_log() -> list[dict[str, Any]]:
    """Failover: one line per upstream attempt (the router's ``upstream_log``), joined to the
    request's access-log line by ``request_id``."""
    fields = {
        "time": "%START_TIME%", "attempt_of": "%REQ(x-request-id)%", "cluster": "%UPSTREAM_CLUSTER%",
        "upstream": "%UPSTREAM_HOST%", "status": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%",
        "failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%", "duration_ms": "%DURATION%",
    }
    return [{"name": "envoy.access_loggers.stdout",
             "typed_config": {"@type": _TYPES["stdout"], "log_format": {"json_format": fields}}}]


def _header_route(backend: str, action: dict[str, Any]) -> dict[str, Any]:
    match = {"prefix": "/", "headers": [{"name": ROUTING_HEADER, "string_match": {"exact": backend}}]}
    return {"match": match, "route": action}


def _failover_action(cluster: str, policy: Policy, options: EnvoyOptions) -> dict[str, Any]:
    """A backend's route with failover: the clusters come from switchyard's ``priority_group``
    metadata (this cluster alone without it), each retry moving to the next group."""
    if not options.per_try_timeout_s > 0:
        raise EnvoyConfigError(f"--per-try-timeout must be a positive number of seconds, got {options.per_try_timeout_s:g}.")
    specifier = {"@type": _TYPES["priority_group"],
                 "priority_groups": [{"name": cluster, "clusters": [{"cluster_name": cluster, "weight": 1}]}],
                 "override_metadata_namespace": FAILOVER_NAMESPACE}
    return {
        "inline_cluster_specifier_plugin": {"extension": {"name": _PRIORITY_GROUP, "typed_config": specifier}},
        "retry_policy": {
            "retry_on": "connect-failure,reset,5xx,retriable-status-codes",
            "retriable_status_codes": [429],
            "num_retries": longest_chain(policy) - 1,  # switchyard lowers it per request (x-envoy-max-retries)
            "per_try_timeout": f"{options.per_try_timeout_s:g}s",
            "refresh_cluster_on_retry": True,
            "retry_back_off": dict(_RETRY_BACK_OFF),
        },
    }


def _routes(policy: Policy, upstreams: Mapping[str, Upstream], options: EnvoyOptions) -> list[dict[str, Any]]:
    def action(cluster: str) -> dict[str, Any]:
        upstream = upstreams[cluster]
        host = {"host_rewrite_literal": upstream.server_name} if upstream.tls else {}
        return {"cluster": cluster, **host, **_ROUTE_TIMEOUTS}

    def backend_action(cluster: str) -> dict[str, Any]:
        if longest_chain(policy) == 1:
            return action(cluster)
        # Host per attempt: each TLS cluster's endpoint carries its name (a route's
        # host_rewrite_literal would send the first backend's name to every attempt).
        return {**_failover_action(cluster, policy, options), "auto_host_rewrite": True, **_ROUTE_TIMEOUTS}

    routes = [_header_route(name, backend_action(backend.cluster)) for name, backend in policy.backends.items()]
    unknown = {"error": {
        "message": "The routing service chose a backend this Envoy has no route for; re-render the Envoy config "
                   "for the running policy.",
        "type": "service_unavailable", "code": "backend_not_configured"}}
    routes.append({  # a routing header no route matches: never fall through to the default
        "match": {"prefix": "/", "headers": [{"name": ROUTING_HEADER, "present_match": True}]},
        "direct_response": {"status": 503, "body": {"inline_string": json.dumps(unknown)}},
    })
    routes.append({"match": {"prefix": "/"}, "route": action(policy.backends[policy.default].cluster)})
    return routes


def _ext_proc_filter(fail_open: bool, failover: bool = False) -> dict[str, Any]:
    """``failover``: switchyard also sets ``x-envoy-max-retries`` (which needs ``allow_envoy``) and
    the ``switchyard.failover`` metadata."""
    config = {
        "@type": _TYPES["ext_proc"],
        "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
        "failure_mode_allow": fail_open,
        "message_timeout": f"{MESSAGE_TIMEOUT_MS / 1000:g}s",
        "processing_mode": {
            "request_header_mode": "SEND", "request_body_mode": "BUFFERED",
            "response_header_mode": "SKIP", "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
        },
        "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
    }
    if failover:
        config["mutation_rules"] = {"allow_envoy": True}  # else x-envoy-max-retries is dropped silently
        config["metadata_options"]["receiving_namespaces"]["untyped"].append(FAILOVER_NAMESPACE)
    return {"name": _EXT_PROC, "typed_config": config}


def _usage_filter() -> dict[str, Any]:
    """The observe-only ext_proc filter of a policy with ``budgets:``: Envoy sends switchyard
    the response headers and body chunks with the request's ``switchyard`` metadata (the budget
    charge) and does not wait for answers (``observability_mode``), so the response is untouched
    in bytes and timing; a switchyard that cannot be reached never fails it (``failure_mode_allow``).
    Its own ``name`` keeps it apart from the routing filter in :func:`check_envoy_config`."""
    return {"name": USAGE_FILTER, "typed_config": {
        "@type": _TYPES["ext_proc"],
        "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
        "failure_mode_allow": True,
        "observability_mode": True,
        "processing_mode": {
            "request_header_mode": "SKIP", "request_body_mode": "NONE",
            "response_header_mode": "SEND", "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
        },
        "metadata_options": {"forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]}},
    }}


def _strip_matcher() -> dict[str, Any]:
    """What the early header mutation removes: every client-sent switchyard header."""
    return {"key_matcher": {"prefix": HEADER_PREFIX, "ignore_case": True}}


def _ingress(policy: Policy, upstreams: Mapping[str, Upstream], options: EnvoyOptions) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": _TYPES["hcm"],
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "request_headers_timeout": "10s",
        "request_timeout": "60s",
        "stream_idle_timeout": "300s",
        "early_header_mutation_extensions": [{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {"@type": _TYPES["early"], "mutations": [{"remove_on_match": _strip_matcher()}]},
        }],
        "local_reply_config": _local_replies(),
    }
    if options.access_log:
        hcm["access_log"] = _access_log(longest_chain(policy) > 1)
    decision = f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{{}})%"
    failover = longest_chain(policy) > 1
    router: dict[str, Any] = {"@type": _TYPES["router"]}
    if failover and options.access_log:
        router["upstream_log"] = _attempt_log()
    hcm["http_filters"] = [_ext_proc_filter(options.fail_open, failover),
                           *([_usage_filter()] if policy.budgets is not None else []),
                           {"name": "envoy.filters.http.router", "typed_config": router}]
    served_by = [{"header": {"key": SERVED_BY_HEADER, "value": "%UPSTREAM_CLUSTER%"},
                  "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}] if failover else []
    hcm["route_config"] = {"name": "switchyard", "virtual_hosts": [{
        "name": "llm",
        "domains": ["*"],
        **({"include_attempt_count_in_response": True} if failover else {}),
        "response_headers_to_add": served_by + [
            {"header": {"key": ROUTING_HEADER, "value": decision.format("backend")},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            {"header": {"key": RULE_HEADER, "value": decision.format("rule")},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        ] + ([{"header": {"key": SESSION_HEADER, "value": decision.format("session")},
               "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}] if policy.sessions is not None else []),
        "request_body_buffer_limit": options.body_limit or envoy_body_limit(policy),
        "routes": _routes(policy, upstreams, options),
    }]}
    return {"name": "ingress", "address": options.listen.envoy(),
            "filter_chains": [{"filters": [{"name": _HCM, "typed_config": hcm}]}]}


def _ready_listener(address: Address) -> dict[str, Any]:
    hcm = {
        "@type": _TYPES["hcm"],
        "stat_prefix": "probes",
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _TYPES["router"]}}],
        "route_config": {"name": "probes", "virtual_hosts": [{"name": "probes", "domains": ["*"], "routes": [
            {"match": {"path": "/ready"}, "route": {"cluster": _ADMIN_CLUSTER}},
            {"match": {"path": "/stats/prometheus"}, "route": {"cluster": _ADMIN_CLUSTER}},
        ]}]},
    }
    return {"name": "probes", "address": address.envoy(),
            "filter_chains": [{"filters": [{"name": _HCM, "typed_config": hcm}]}]}


def _static_cluster(name: str, address: Address, **extra: Any) -> dict[str, Any]:
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s", **extra,
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address.envoy()}}]}]},
    }


def _sds_path(options: EnvoyOptions, cluster: str) -> str:
    if not options.credentials_dir:
        raise EnvoyConfigError(
            f"Cluster {cluster!r} has a credential: the SDS files need a directory (write the config to a file with --out)."
        )
    return str(Path(options.credentials_dir) / f"credential-{cluster}.yaml")


def _outlier_detection(outlier: OutlierDetection) -> dict[str, Any]:
    """A backend cluster's ``outlier_detection`` (:class:`OutlierDetection`). Success-rate
    ejection stays off: it needs several hosts per cluster, and a cluster here usually has one."""
    return {
        "consecutive_5xx": outlier.consecutive_5xx,
        "consecutive_gateway_failure": outlier.consecutive_gateway_failure,
        "enforcing_consecutive_gateway_failure": 100,
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": outlier.consecutive_local_origin_failure,
        "enforcing_consecutive_local_origin_failure": 100,
        "enforcing_success_rate": 0,
        "interval": f"{outlier.interval_s:.3f}s",
        "base_ejection_time": f"{outlier.base_ejection_s:.3f}s",
        "max_ejection_time": f"{outlier.max_ejection_s:.3f}s",
        "max_ejection_percent": 100,
    }


def _credential_filter(name: str, credential: Credential, options: EnvoyOptions,
                       sds: dict[str, dict]) -> dict[str, Any]:
    secret = f"credential-{name}"
    path = _sds_path(options, name)
    sds[path] = {"resources": [{"@type": _TYPES["secret"], "name": secret,
                                "generic_secret": {"secret": {"filename": credential.file}}}]}
    generic = {"@type": _TYPES["generic"], "header": credential.header.lower(), "credential": {
        "name": secret,
        "sds_config": {"path_config_source": {
            "path": path, "watched_directory": {"path": str(Path(credential.file).parent)}}},
    }}
    if credential.prefix:
        generic["header_value_prefix"] = credential.prefix
    return {"name": "envoy.filters.http.credential_injector", "typed_config": {
        "@type": _TYPES["injector"], "overwrite": True,
        "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": generic}}}


def _upstream_filters(name: str, upstream: Upstream, options: EnvoyOptions, sds: dict[str, dict],
                      failover: bool) -> list[dict[str, Any]]:
    """The filters each attempt to cluster ``name`` runs. With ``failover`` every cluster has them,
    credential or not: the upstream headers are shared by a request's attempts, so each cluster
    must remove what an earlier attempt's cluster added, and set its own ``model``."""
    mutations: list[dict[str, Any]] = [{"remove": h} for h in _CLIENT_CREDENTIAL_HEADERS]
    if failover:
        mutations.append({"remove_on_match": _strip_matcher()})  # the routing header stays at the edge
    # Client-sent keys never reach a provider (nor replace the injected one).
    filters = [{"name": "envoy.filters.http.header_mutation", "typed_config": {
        "@type": _TYPES["header_mutation"], "mutations": {"request_mutations": mutations}}}]
    if upstream.credential is not None:
        filters.append(_credential_filter(name, upstream.credential, options, sds))
    if failover:
        lua = _MODEL_SLOT_LUA % {"cluster": _lua_string(name), "slot": _lua_string(json.dumps(MODEL_SLOT)),
                                 "namespace": _lua_string(METADATA_NAMESPACE), "key": _lua_string(FAILOVER_MODELS_KEY)}
        filters.append({"name": _LUA, "typed_config": {"@type": _TYPES["lua"],
                                                       "default_source_code": {"inline_string": lua}}})
    filters.append({"name": "envoy.filters.http.upstream_codec", "typed_config": {"@type": _TYPES["codec"]}})
    return filters


def _lua_string(text: str) -> str:
    """``text`` as a Lua string literal (JSON's escapes are Lua's for these: quotes, backslash, \\u is not)."""
    return "'" + "".join(c if c.isalnum() or c in "-_.:{}\"[]/ " else f"\\{ord(c):03d}" for c in text) + "'"


def _backend_cluster(name: str, upstream: Upstream, options: EnvoyOptions, sds: dict[str, dict],
                     policy: Policy | None = None) -> dict[str, Any]:
    address = upstream.address
    failover = policy is not None and longest_chain(policy) > 1
    cluster: dict[str, Any] = {"name": name}
    if address.path or address.is_ip:
        cluster.update(type="STATIC", connect_timeout="1s")
    else:
        cluster.update(type="STRICT_DNS", dns_lookup_family="V4_PREFERRED", connect_timeout="2s")
    if upstream.credential is not None or failover:
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _TYPES["http_options"],
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": _upstream_filters(name, upstream, options, sds, failover),
        }}
    if failover:
        cluster["circuit_breakers"] = {"thresholds": [{"priority": "DEFAULT", "retry_budget": dict(_RETRY_BUDGET)}]}
        # the upstream Lua filter buffers the whole body under this limit (default 1 MiB)
        cluster["per_connection_buffer_limit_bytes"] = options.body_limit or envoy_body_limit(policy)
    endpoint: dict[str, Any] = {"address": address.envoy()}
    if failover and upstream.tls:
        endpoint["hostname"] = upstream.server_name  # the Host of attempts here (the route's auto_host_rewrite)
    cluster["load_assignment"] = {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]}
    if options.outlier is not None:
        cluster["outlier_detection"] = _outlier_detection(options.outlier)
    if upstream.tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": _TYPES["tls"],
            "sni": upstream.server_name,
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": upstream.ca_file},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": upstream.server_name}}],
            }},
        }}
    return cluster


def render_envoy(policy: Policy, upstreams: Mapping[str, Upstream], options: EnvoyOptions | None = None) -> RenderedEnvoy:
    """The Envoy bootstrap for ``policy``; ``upstreams`` by backend or cluster name (every
    cluster of the policy needs one, see :func:`resolve_upstreams`)."""
    options = options or EnvoyOptions()
    by_cluster = resolve_upstreams(policy, upstreams)
    sds: dict[str, dict[str, Any]] = {}
    listeners = [_ingress(policy, by_cluster, options)]
    clusters = [_static_cluster(EXTPROC_CLUSTER, options.extproc, typed_extension_protocol_options={
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _TYPES["http_options"], "explicit_http_config": {"http2_protocol_options": {}}}})]
    if options.ready is not None:
        listeners.append(_ready_listener(options.ready))
        clusters.append(_static_cluster(_ADMIN_CLUSTER, options.admin))
    clusters += [_backend_cluster(name, upstream, options, sds, policy) for name, upstream in by_cluster.items()]
    bootstrap: dict[str, Any] = {}
    if sds:  # file-based SDS needs the node's identity
        bootstrap["node"] = {"id": options.node_id, "cluster": options.node_cluster}
    bootstrap["admin"] = {"address": options.admin.envoy()}
    bootstrap["overload_manager"] = {"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {"@type": _TYPES["connections"], "max_active_downstream_connections": 10000},
    }]}
    bootstrap["static_resources"] = {"listeners": listeners, "clusters": clusters}
    return RenderedEnvoy(bootstrap, sds)


# -- checking a config against a policy ----------------------------------------------------
def _ingress_hcms(config: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    """Every HTTP connection manager config that runs the ext_proc filter."""
    for listener in (config.get("static_resources") or {}).get("listeners") or []:
        for chain in listener.get("filter_chains") or []:
            for network_filter in chain.get("filters") or []:
                hcm = network_filter.get("typed_config") or {}
                if network_filter.get("name") == _HCM and any(
                    f.get("name") == _EXT_PROC for f in hcm.get("http_filters") or []
                ):
                    yield hcm


def _ext_proc_configs(config: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    for hcm in _ingress_hcms(config):
        for http_filter in hcm.get("http_filters") or []:
            if http_filter.get("name") == _EXT_PROC:
                yield http_filter.get("typed_config") or {}


def envoy_fail_open(config: Mapping[str, Any]) -> bool:
    """Whether an Envoy bootstrap lets requests through when switchyard cannot answer: any
    ext_proc filter with ``failure_mode_allow: true`` (its default is false: fail closed)."""
    return any(ext_proc.get("failure_mode_allow") is True for ext_proc in _ext_proc_configs(config))


def _strips_switchyard_headers(hcm: Mapping[str, Any]) -> bool:
    for extension in hcm.get("early_header_mutation_extensions") or []:
        for mutation in (extension.get("typed_config") or {}).get("mutations") or []:
            matcher = (mutation.get("remove_on_match") or {}).get("key_matcher") or {}
            if matcher.get("ignore_case") is True and str(matcher.get("prefix", "")).lower() == HEADER_PREFIX:
                return True
    return False


def _route_limit(route: Mapping[str, Any], vhost: Mapping[str, Any]) -> int | None:
    for scope in (route, vhost):
        for key in ("request_body_buffer_limit", "per_request_buffer_limit_bytes"):
            if scope.get(key) is not None:
                return int(scope[key])
    return None


def check_envoy_config(policy: Policy, config: Mapping[str, Any], source: str = "<envoy>") -> list[str]:
    """Problems between ``policy`` and an Envoy bootstrap ``config`` (empty: they agree).

    Every backend's cluster exists; the ext_proc listener removes client ``x-switchyard-*``
    headers before routing, and has a route on the exact routing-header value of every
    backend, to that backend's cluster; and Envoy buffers at least ``max_body_bytes`` + the
    rewrite's growth on those routes.
    """
    problems: list[str] = []
    clusters = {c.get("name") for c in (config.get("static_resources") or {}).get("clusters") or []}
    for name, backend in policy.backends.items():
        if backend.cluster not in clusters:
            problems.append(f"{source}: backend {name!r} uses cluster {backend.cluster!r}, which this Envoy config lacks.")
    hcms = list(_ingress_hcms(config))
    if not hcms:
        return [*problems, f"{source}: no listener runs the ext_proc filter ({_EXT_PROC})."]
    if longest_chain(policy) > 1:
        problems += _failover_problems(policy, config, source)
    needed = policy.routing.max_body_bytes + (rewrite_growth(policy) if policy.routing.rewrite_model else 0)
    for hcm in hcms:
        if not _strips_switchyard_headers(hcm):
            problems.append(
                f"{source}: listener with stat_prefix {hcm.get('stat_prefix', '?')!r} does not remove client "
                f"{HEADER_PREFIX}* headers before routing (early_header_mutation_extensions, remove_on_match "
                f"prefix {HEADER_PREFIX!r}, ignore_case); a client could pick a backend by sending {ROUTING_HEADER}."
            )
        for vhost in (hcm.get("route_config") or {}).get("virtual_hosts") or []:
            routes = vhost.get("routes") or []
            for name, backend in policy.backends.items():
                route = next((r for r in routes if _matches_backend(r, name)), None)
                where = f"{source}: virtual host {vhost.get('name', '?')!r}"
                if route is None:
                    problems.append(f"{where} has no route for `{ROUTING_HEADER}: {name}` (backend {name!r}).")
                    continue
                target = _route_cluster(route)
                if target != backend.cluster:
                    problems.append(f"{where} sends backend {name!r} to cluster {target!r}; the policy says {backend.cluster!r}.")
                limit = _route_limit(route, vhost)
                if limit is None:
                    problems.append(f"{where} sets no request_body_buffer_limit for backend {name!r}; it needs >= {needed} "
                                    f"(routing.max_body_bytes {policy.routing.max_body_bytes} + model rewrite).")
                elif limit < needed:
                    problems.append(f"{where}: request_body_buffer_limit {limit} for backend {name!r} is below {needed} "
                                    f"(routing.max_body_bytes {policy.routing.max_body_bytes} + model rewrite); "
                                    f"bodies the policy accepts would get 413 from Envoy.")
    return problems


def _route_cluster(route: Mapping[str, Any]) -> str | None:
    """The cluster a route sends to: its ``cluster``, or its priority-group specifier's first group's."""
    action = route.get("route") or {}
    if "cluster" in action:
        return action["cluster"]
    extension = (action.get("inline_cluster_specifier_plugin") or {}).get("extension") or {}
    groups = (extension.get("typed_config") or {}).get("priority_groups") or [{}]
    clusters = groups[0].get("clusters") or [{}]
    return clusters[0].get("cluster_name")


def _failover_problems(policy: Policy, config: Mapping[str, Any], source: str) -> list[str]:
    """What failover (``fallbacks``) needs of an Envoy config: ext_proc may set ``x-envoy-*`` and
    the failover metadata; each backend's route retries by priority group up to the longest chain;
    each backend cluster rewrites ``model`` per attempt and drops the last attempt's credentials."""
    problems = []
    for ext_proc in _ext_proc_configs(config):
        if not (ext_proc.get("mutation_rules") or {}).get("allow_envoy"):
            problems.append(f"{source}: the ext_proc filter needs `mutation_rules: {{allow_envoy: true}}` for failover "
                            f"(else switchyard's x-envoy-max-retries is dropped).")
        namespaces = ((ext_proc.get("metadata_options") or {}).get("receiving_namespaces") or {}).get("untyped") or []
        if FAILOVER_NAMESPACE not in namespaces:
            problems.append(f"{source}: the ext_proc filter does not receive metadata namespace {FAILOVER_NAMESPACE!r} "
                            f"(metadata_options.receiving_namespaces.untyped); failover would never happen.")
    for hcm in _ingress_hcms(config):
        for vhost in (hcm.get("route_config") or {}).get("virtual_hosts") or []:
            for name in policy.backends:
                route = next((r for r in vhost.get("routes") or [] if _matches_backend(r, name)), None)
                action = (route or {}).get("route") or {}
                extension = (action.get("inline_cluster_specifier_plugin") or {}).get("extension") or {}
                retry = action.get("retry_policy") or {}
                if route is None:
                    continue  # reported by check_envoy_config
                if (extension.get("typed_config") or {}).get("override_metadata_namespace") != FAILOVER_NAMESPACE:
                    problems.append(f"{source}: the route of backend {name!r} has no priority_group cluster specifier "
                                    f"reading {FAILOVER_NAMESPACE!r}; it cannot fail over.")
                if not retry.get("refresh_cluster_on_retry") or int(retry.get("num_retries", 1)) < longest_chain(policy) - 1:
                    problems.append(f"{source}: the route of backend {name!r} needs retry_policy with "
                                    f"refresh_cluster_on_retry and num_retries >= {longest_chain(policy) - 1} "
                                    f"(the longest fallback chain).")
    for cluster in (config.get("static_resources") or {}).get("clusters") or []:
        if cluster.get("name") not in {b.cluster for b in policy.backends.values()}:
            continue
        options = (cluster.get("typed_extension_protocol_options") or {}).get(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions") or {}
        names = [f.get("name") for f in options.get("http_filters") or []]
        if _LUA not in names or "envoy.filters.http.header_mutation" not in names:
            problems.append(f"{source}: backend cluster {cluster.get('name')!r} lacks the failover upstream filters "
                            f"(header_mutation removing credentials, the model-slot Lua); an attempt there would "
                            f"get the previous backend's credential and no model.")
    return problems


def _matches_backend(route: Mapping[str, Any], backend: str) -> bool:
    for header in (route.get("match") or {}).get("headers") or []:
        if str(header.get("name", "")).lower() == ROUTING_HEADER and (header.get("string_match") or {}).get("exact") == backend:
            return True
    return False
