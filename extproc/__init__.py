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
    "RoutingRequest": "extproc.request._body",
    "parse_json_body": "extproc.request._body",
    "conversation_text": "extproc.request._messages",
    "image_urls": "extproc.request._messages",
    "last_user_text": "extproc.request._messages",
    "message_text": "extproc.request._messages",
    # policies and decisions
    "Backend": "extproc.policy._sections",
    "Policy": "extproc.policy._model",
    "Rule": "extproc.policy._model",
    "load_policy": "extproc.policy._loading",
    "parse_policy": "extproc.policy._loading",
    "PolicyEngine": "extproc.engine._engine",
    "Decision": "extproc.engine._decision",
    # learned scorers (interface; implemented in routers)
    "BatchConfig": "extproc.scorers._interface",
    "ImageLimits": "extproc.scorers._interface",
    "RemoteConfig": "extproc.scorers._interface",
    "RemoteTls": "extproc.scorers._interface",
    "Scorer": "extproc.scorers._interface",
    "ScorerDescription": "extproc.scorers._interface",
    "ScorerLoader": "extproc.scorers._interface",
    "ScorerSpec": "extproc.scorers._interface",
    "Scores": "extproc.scorers._interface",
    "ScorerFailure": "extproc.scorers._interface",
    "pem_problem": "extproc.scorers._interface",
    "score_within": "extproc.scoring._decide",
    "read_scorer_specs": "extproc.policy._loading",
    "describe_scorer": "extproc.scorers._loaders",
    "load_scorer": "extproc.scoring._loading",
    # the Envoy-facing server
    "ExternalProcessor": "extproc.server._servicer",
    # the YAML schema machinery (file:line:column problems), for other config files
    "Obj": "extproc._schema",
    "Key": "extproc._schema",
    "MapOf": "extproc._schema",
    "Str": "extproc._schema",
    "Bool": "extproc._schema",
    "Int": "extproc._schema",
    "Num": "extproc._schema",
    "Validation": "extproc._schema",
    "compose_yaml": "extproc._schema",
}

__all__ = sorted([*_EXPORTS, "lazy_exports"])

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
