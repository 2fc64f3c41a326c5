"""Turning decisions and errors into ext_proc ``ProcessingResponse`` messages.

What Envoy needs from each phase (see docs/envoy.md, "The Envoy contract"):

- body phase, routed: set ``x-switchyard-backend``, ``clear_route_cache``, the rewritten
  body with its ``content-length`` when ``body.model`` changes, and the decision as dynamic
  metadata in namespace ``switchyard``;
- response headers never reach switchyard: the stream ends after the body answer, and
  Envoy adds ``x-switchyard-backend`` / ``x-switchyard-rule`` from the dynamic metadata;
- errors: an ``ImmediateResponse`` with an OpenAI-style JSON error body.

The answers that do not depend on the request body are built once and reused: the
"continue" answers, and one serialized template per (backend, rule, requested model) for
routed bodies. The server treats every answer as read-only once it is handed back.
"""

from __future__ import annotations

import json
from functools import lru_cache

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.type.v3 import http_status_pb2

from extproc._contract import FAILOVER_MODELS_KEY, FAILOVER_NAMESPACE, METADATA_NAMESPACE, ROUTING_HEADER
from extproc.engine._decision import Decision
from extproc.policy._sections import Backend
from extproc._errors import RequestError

__all__ = [
    "CONTINUE",
    "continue_headers",
    "routed_body_response",
    "failover_body_response",
    "error_response",
]

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
#: Envoy's per-request retry cap; the ext_proc filter needs ``mutation_rules.allow_envoy`` to set it.
MAX_RETRIES_HEADER = "x-envoy-max-retries"

#: "Go on unchanged" for each phase, by ``ProcessingRequest`` oneof name. Read-only.
CONTINUE: dict[str, ext.ProcessingResponse] = {
    "request_headers": ext.ProcessingResponse(request_headers=ext.HeadersResponse()),
    "request_body": ext.ProcessingResponse(request_body=ext.BodyResponse()),
    "request_trailers": ext.ProcessingResponse(request_trailers=ext.TrailersResponse()),
    "response_headers": ext.ProcessingResponse(response_headers=ext.HeadersResponse()),
    "response_body": ext.ProcessingResponse(response_body=ext.BodyResponse()),
    "response_trailers": ext.ProcessingResponse(response_trailers=ext.TrailersResponse()),
}


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def continue_headers(remove: list[str]) -> ext.ProcessingResponse:
    """The request-headers answer: go on, removing the ``remove`` headers (if any)."""
    if not remove:
        return CONTINUE["request_headers"]
    response = ext.ProcessingResponse()
    response.request_headers.response.header_mutation.remove_headers.extend(remove)
    return response


@lru_cache(maxsize=1024)  # bounded: requested model names come from clients
def _routed_template(backend: str, metadata: tuple[tuple[str, str], ...]) -> ext.ProcessingResponse:
    response = ext.ProcessingResponse()
    common = response.request_body.response
    common.clear_route_cache = True
    common.header_mutation.set_headers.append(_set(ROUTING_HEADER, backend))
    fields = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    for key, value in metadata:
        fields[key].string_value = value
    return response


def routed_body_response(decision: Decision, rewritten_body: bytes | None = None) -> ext.ProcessingResponse:
    """The request-body answer that routes to the decision's backend.

    Sets the routing header and ``clear_route_cache``, replaces the body with
    ``rewritten_body`` (and its ``content-length``) when given, and carries the decision as
    dynamic metadata in namespace ``switchyard``.
    """
    metadata = tuple(decision.metadata().items())
    if decision.scores or decision.fallback or decision.charge:  # per-request values: never cached
        template = _routed_template.__wrapped__(decision.backend.name, metadata)
    else:
        template = _routed_template(decision.backend.name, metadata)
    if rewritten_body is None:
        return template
    response = ext.ProcessingResponse()
    response.CopyFrom(template)
    common = response.request_body.response
    common.body_mutation.body = rewritten_body
    common.header_mutation.set_headers.append(_set("content-length", str(len(rewritten_body))))
    return response


def failover_body_response(decision: Decision, chain: tuple[Backend, ...],
                           body: bytes | None) -> ext.ProcessingResponse:
    """The request-body answer of a policy with ``fallbacks``: :func:`routed_body_response` with
    ``body`` (with more than one backend in ``chain``, its ``model`` is the slot), plus
    ``x-envoy-max-retries`` (the attempts after the first) and, with more than one backend, the
    chain's clusters as ``priority_group`` metadata (namespace ``switchyard.failover``) and, in
    namespace ``switchyard``, ``chain`` (for the access log) and ``attempt_models`` (cluster -> its
    model as JSON text, for the upstream Lua filters)."""
    response = ext.ProcessingResponse()
    response.CopyFrom(routed_body_response(decision, body))
    common = response.request_body.response
    common.header_mutation.set_headers.append(_set(MAX_RETRIES_HEADER, str(len(chain) - 1)))
    if len(chain) == 1:
        return response
    fields = response.dynamic_metadata.fields
    decided = fields[METADATA_NAMESPACE].struct_value.fields
    decided["chain"].string_value = ",".join(backend.name for backend in chain)
    models = decided[FAILOVER_MODELS_KEY].struct_value.fields
    groups = fields[FAILOVER_NAMESPACE].struct_value.fields["priority_groups"].list_value
    for backend in chain:
        models[backend.cluster].string_value = json.dumps(backend.model)
        group = groups.values.add().struct_value.fields
        group["name"].string_value = backend.cluster
        cluster = group["clusters"].list_value.values.add().struct_value.fields
        cluster["cluster_name"].string_value = backend.cluster
        cluster["weight"].number_value = 1
    return response


def error_response(error: RequestError) -> ext.ProcessingResponse:
    """An immediate OpenAI-style JSON error, e.g. ``{"error": {"message", "type", "code"}}``."""
    error_type = "invalid_request_error" if error.status < 500 else "service_unavailable"
    body = json.dumps({"error": {"message": str(error), "type": error_type, "code": error.code}}).encode()
    immediate = ext.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=error.status),
        body=body,
        details=f"switchyard_{error.code}",
    )
    immediate.headers.set_headers.append(_set("content-type", "application/json"))
    if error.retry_after_s is not None:
        immediate.headers.set_headers.append(_set("retry-after", str(error.retry_after_s)))
    return ext.ProcessingResponse(immediate_response=immediate)
