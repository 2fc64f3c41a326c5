"""switchyard's Envoy-facing service: ext_proc server, request parsing, signals, policies.

Imports and runs without torch; the learned scorers live in ``routers``.
"""

from extproc._decision import Decision
from extproc._engine import PolicyEngine
from extproc._errors import (
    CheckpointError,
    PolicyError,
    PolicyProblem,
    RequestError,
    ScorerError,
    SwitchyardError,
)
from extproc._messages import conversation_text, image_urls, last_user_text, message_text
from extproc._policy import Backend, Policy, Rule, load_policy, parse_policy
from extproc._request import RoutingRequest, parse_json_body
from extproc._servicer import ExternalProcessor

__all__ = [
    "Backend",
    "CheckpointError",
    "Decision",
    "ExternalProcessor",
    "Policy",
    "PolicyEngine",
    "PolicyError",
    "PolicyProblem",
    "RequestError",
    "Rule",
    "RoutingRequest",
    "ScorerError",
    "SwitchyardError",
    "conversation_text",
    "image_urls",
    "last_user_text",
    "load_policy",
    "message_text",
    "parse_json_body",
    "parse_policy",
]
