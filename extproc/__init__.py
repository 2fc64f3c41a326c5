"""switchyard's Envoy-facing service: ext_proc server, request parsing, signals, policies.

Imports and runs without torch; the learned scorers live in ``routers``.

``import extproc`` is cheap: public names are re-exported lazily from :data:`_EXPORTS`
(name -> private module), so grpc, the Envoy protos and the policy engine load only when a
name that needs them is first used (``routers`` imports ``extproc``'s errors and message
helpers without pulling in the server). To export a new name, add one entry.
"""

from __future__ import annotations

from extproc._lazy import lazy_exports

#: Public name -> module that defines it. Append here to export more.
_EXPORTS: dict[str, str] = {
    # errors
    "SwitchyardError": "extproc._errors",
    "PolicyError": "extproc._errors",
    "PolicyProblem": "extproc._errors",
    "RequestError": "extproc._errors",
    "ScorerError": "extproc._errors",
    "ScorerOverloaded": "extproc._errors",
    "ScorerDeadline": "extproc._errors",
    "scorer_message": "extproc._errors",
    "CheckpointError": "extproc._errors",
    "EnvoyConfigError": "extproc._errors",
    # defaults other packages state too (routers' CLI and scorer server)
    "DEFAULT_GRACE_S": "extproc._defaults",
    "LEARNED_COMMANDS": "extproc._defaults",
    "ML_INSTALL_HINT": "extproc._defaults",
    # requests and messages
    "RoutingRequest": "extproc._request",
    "parse_json_body": "extproc._request",
    "conversation_text": "extproc._messages",
    "image_urls": "extproc._messages",
    "last_user_text": "extproc._messages",
    "message_text": "extproc._messages",
    # policies and decisions
    "Backend": "extproc._policy",
    "Policy": "extproc._policy",
    "Rule": "extproc._policy",
    "load_policy": "extproc._policy",
    "parse_policy": "extproc._policy",
    "PolicyEngine": "extproc._engine",
    "Decision": "extproc._decision",
    # learned scorers (interface; implemented in routers)
    "BatchConfig": "extproc._scorers",
    "ImageLimits": "extproc._scorers",
    "RemoteConfig": "extproc._scorers",
    "RemoteTls": "extproc._scorers",
    "Scorer": "extproc._scorers",
    "ScorerDescription": "extproc._scorers",
    "ScorerLoader": "extproc._scorers",
    "ScorerSpec": "extproc._scorers",
    "Scores": "extproc._scorers",
    "ScorerFailure": "extproc._scorers",
    "pem_problem": "extproc._scorers",
    "score_within": "extproc._scoring",
    "read_scorer_specs": "extproc._policy",
    "describe_scorer": "extproc._scorer_loading",
    "load_scorer": "extproc._scorer_loading",
    # the Envoy-facing server
    "ExternalProcessor": "extproc._servicer",
    # the YAML schema machinery (file:line:column problems), for other config files
    "Obj": "extproc._schema",
    "Key": "extproc._schema",
    "MapOf": "extproc._schema",
    "Str": "extproc._schema",
    "Int": "extproc._schema",
    "Num": "extproc._schema",
    "Validation": "extproc._schema",
    "compose_yaml": "extproc._schema",
}

__all__ = sorted([*_EXPORTS, "lazy_exports"])

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
