"""Turning decisions and errors into ext_proc ``ProcessingResponse`` messages.

What Envoy needs from each phase (see DESIGN.md, "The request path"):

- body phase, routed: set ``x-switchyard-backend``, ``clear_route_cache``, the rewritten
  body with its ``content-length`` when ``body.model`` changes, and the decision as dynamic
  metadata in namespace ``switchyard``;
- response headers: ``x-switchyard-backend`` and ``x-switchyard-rule`` for the client;
- errors: an ``ImmediateResponse`` with an OpenAI-style JSON error body.
"""

from __future__ import annotations

import json
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc._decision import Decision
from extproc._errors import RequestError

__all__ = [
    "ROUTING_HEADER",
    "RULE_HEADER",
    "HEADER_PREFIX",
    "METADATA_NAMESPACE",
    "route_mutation",
    "headers_response",
    "body_response",
    "decision_response_headers",
    "error_response",
]

ROUTING_HEADER = "x-switchyard-backend"
RULE_HEADER = "x-switchyard-rule"
HEADER_PREFIX = "x-switchyard-"
METADATA_NAMESPACE = "switchyard"

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def route_mutation(decision: Decision, body: dict | None) -> tuple[ext.CommonResponse, struct_pb2.Struct]:
    """The common response that routes to the decision's backend, and its dynamic metadata."""
    common = ext.CommonResponse(clear_route_cache=True)
    common.header_mutation.set_headers.append(_set(ROUTING_HEADER, decision.backend.name))
    if decision.rewrite_model and body is not None:
        rewritten = dict(body)
        rewritten["model"] = decision.backend.model
        data = json.dumps(rewritten, ensure_ascii=False, separators=(",", ":")).encode()
        common.body_mutation.body = data
        common.header_mutation.set_headers.append(_set("content-length", str(len(data))))
    metadata = struct_pb2.Struct()
    fields = metadata.fields[METADATA_NAMESPACE].struct_value.fields
    for key, value in decision.metadata().items():
        fields[key].string_value = value
    return common, metadata


def headers_response(common: ext.CommonResponse | None = None, metadata: struct_pb2.Struct | None = None) -> ext.ProcessingResponse:
    response = ext.ProcessingResponse(request_headers=ext.HeadersResponse(response=common or ext.CommonResponse()))
    if metadata is not None:
        response.dynamic_metadata.CopyFrom(metadata)
    return response


def body_response(common: ext.CommonResponse | None = None, metadata: struct_pb2.Struct | None = None) -> ext.ProcessingResponse:
    response = ext.ProcessingResponse(request_body=ext.BodyResponse(response=common or ext.CommonResponse()))
    if metadata is not None:
        response.dynamic_metadata.CopyFrom(metadata)
    return response


def decision_response_headers(decision: Decision | None) -> ext.ProcessingResponse:
    """The response-headers answer: decision headers for the client (nothing if undecided)."""
    common = ext.CommonResponse()
    if decision is not None:
        common.header_mutation.set_headers.extend(
            [_set(ROUTING_HEADER, decision.backend.name), _set(RULE_HEADER, decision.rule)]
        )
    return ext.ProcessingResponse(response_headers=ext.HeadersResponse(response=common))


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
    return ext.ProcessingResponse(immediate_response=immediate)
