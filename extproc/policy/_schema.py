"""The policy file's keys, declared once.

This declaration is the single source of the validator (``_policy_loader``), the JSON
Schema (``policies/policy.schema.json``, written by ``switchyard policy schema``) and the
key reference in ``docs/policy-reference.md`` (``switchyard policy schema --markdown``). A test checks
that both files match what this module renders.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from extproc.policy._sections import CaptureConfig
from extproc._contract import DEADLINE_MARGIN_MS, MESSAGE_TIMEOUT_MS
from extproc.policy._sections import (
    DEFAULT_LIMIT,
    Backend,
    BudgetsConfig,
    ModelsConfig,
    Price,
    RoutingConfig,
    SESSION_KEYS,
    SessionsConfig,
    ShareConfig,
    TenantsConfig,
)
from extproc.scorers._kinds import scorer_schemas
from extproc.state import STATE_KEY
from extproc.scorers._interface import BatchConfig, BreakerConfig, ImageLimits, ScorerSpec
from extproc.signals._kinds import signal_schemas
from extproc._schema import (
    DESCRIPTION_KEY,
    REQUIRED,
    Bool,
    Int,
    Key,
    ListOf,
    MapOf,
    Num,
    Obj,
    Schema,
    Str,
    Tagged,
    Validation,
    _describe,
    dotted,
)

__all__ = [
    "POLICY_SCHEMA",
    "CONDITION_SCHEMA",
    "json_schema",
    "markdown_reference",
    "SIGNAL_KINDS",
    "SCORER_KINDS_SCHEMA",
    "SCORERS_FILE_SCHEMA",
]

class ConditionSchema(Schema):
    """A rule condition: a signal name, or ``{all: [...]}``, ``{any: [...]}``, ``{not: ...}``."""

    doc = "A signal name, or a mapping with exactly one of `all`, `any` (lists of conditions) or `not` (a condition); nests to any depth."

    def validate(self, node: yaml.Node, path, v: Validation) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            return node.value
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            v.problem(
                node,
                f"`{dotted(path)}` must be a signal name or a mapping with exactly one of "
                f"`all`, `any`, `not`; got {_describe(node)}.",
            )
            return None
        key_node, value_node = node.value[0]
        op = key_node.value
        child_path = path + (op,)
        v.marks[child_path] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        if op in ("all", "any"):
            if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                v.problem(value_node, f"`{dotted(child_path)}` must be a non-empty list of conditions.")
                return None
            items = []
            for index, child in enumerate(value_node.value):
                item_path = child_path + (index,)
                v.marks[item_path] = (child.start_mark.line + 1, child.start_mark.column + 1)
                items.append(self.validate(child, item_path, v))
            return {op: items}
        if op == "not":
            return {"not": self.validate(value_node, child_path, v)}
        v.problem(key_node, f"Unknown operator `{op}` in `{dotted(path)}`; use `all`, `any` or `not`.")
        return None

    def json_schema(self) -> dict[str, Any]:
        ref = {"$ref": "#/$defs/condition"}
        return {
            "description": self.doc,
            "oneOf": [
                {"type": "string", "description": "The name of a signal."},
                {"type": "object", "properties": {"all": {"type": "array", "minItems": 1, "items": ref}},
                 "required": ["all"], "additionalProperties": False},
                {"type": "object", "properties": {"any": {"type": "array", "minItems": 1, "items": ref}},
                 "required": ["any"], "additionalProperties": False},
                {"type": "object", "properties": {"not": ref}, "required": ["not"], "additionalProperties": False},
            ],
        }

    def type_name(self) -> str:
        return "condition"


CONDITION_SCHEMA = ConditionSchema()


_description = DESCRIPTION_KEY

#: Each signal kind's keys, declared once on its class in ``_signals``.
SIGNAL_KINDS: dict[str, Obj] = signal_schemas()

_BATCH = BatchConfig()
_BREAKER = BreakerConfig()
_IMAGES = ImageLimits()
_SPEC = ScorerSpec(name="", kind="probe")
_CAPTURE = CaptureConfig()
_BACKEND = Backend(name="", cluster="", model="")
_MODELS = ModelsConfig()
_TENANTS = TenantsConfig()
_SESSIONS = SessionsConfig()
_ROUTING = RoutingConfig()
_PRICE = Price()
_BUDGETS = BudgetsConfig()
_SHARE = ShareConfig(signal="", target=0.0, large=(), min_threshold=0.0, max_threshold=0.0)

_scorer_common = {
    "device": Key(
        Str(min_length=1),
        "Where the in-process model runs: `cpu`, `cuda` or `cuda:N`. A runtime setting, not saved in checkpoints.",
        _SPEC.device,
    ),
    "dtype": Key(
        Str(enum=("float32", "bfloat16", "float16")),
        "Weights and activations dtype. Default: float32 on CPU, bfloat16 on CUDA.",
        _SPEC.dtype,
    ),
    "batch": Key.section(
        Obj(
            title="batch",
            keys={
                "max_size": Key(Int(minimum=1, maximum=1024), "Most requests in one forward.", _BATCH.max_size),
                "max_wait_ms": Key(
                    Num(minimum=0, maximum=1000),
                    "Deprecated; accepted and checked, but no request is held any more: an idle worker takes a request at once, "
                    "and the requests that arrive while a forward runs form the next batch (holding cost 4-6 ms of p50 and gained no capacity).",
                    _BATCH.max_wait_ms,
                ),
            },
        ),
        "The micro-batcher: concurrent requests share one padded forward, run off the event loop.",
    ),
    "deadline_ms": Key(
        Num(minimum=1, maximum=60000),
        "The scores must arrive within this many ms of the request's arrival at switchyard, else the "
        f"request takes `fallback`. At most Envoy's ext_proc `message_timeout` ({MESSAGE_TIMEOUT_MS} ms) less a "
        f"{DEADLINE_MARGIN_MS} ms margin for answering after a miss; `policy check` refuses more.",
        _SPEC.deadline_ms,
    ),
    "breaker": Key.section(
        Obj(
            title="breaker",
            keys={
                "failures": Key(
                    Int(minimum=0, maximum=1000),
                    "Consecutive failed calls (deadline missed, error) during which the scorer answered no other call, that open the breaker. "
                    "0: no breaker (every request waits for the scorer).",
                    _BREAKER.failures,
                ),
                "cool_off_ms": Key(
                    Num(minimum=1, maximum=3600000),
                    "How long an open breaker sends requests to the fallback at once (ms); then one request "
                    "tries the scorer: success closes the breaker, failure opens it again.",
                    _BREAKER.cool_off_ms,
                ),
            },
        ),
        "The scorer's circuit breaker: once it keeps failing, requests take the fallback at once "
        "(reason `breaker_open`) instead of each waiting its deadline.",
    ),
    "fallback": Key(
        Str(min_length=1),
        "The backend a request takes when this scorer fails (deadline, overload, open breaker, error, NaN), "
        "e.g. a mid-size backend so that overload need not send everything to the largest. "
        "Default: the policy's top-level `fallback`.",
        None,
    ),
    "images": Key.section(
        Obj(
            title="images",
            keys={
                "max_bytes": Key(Int(minimum=1), "Largest encoded image accepted (bytes).", _IMAGES.max_bytes),
                "max_pixels": Key(
                    Int(minimum=1), "Largest width × height decoded; larger images (decompression bombs) are refused.",
                    _IMAGES.max_pixels,
                ),
                "allow_hosts": Key(
                    ListOf(Str(min_length=1)),
                    "Hosts http(s) image URLs may be fetched from: `host` allows the URL scheme's default port "
                    "only (80 for http, 443 for https), `host:port` that port (IPv6 in brackets: `[::1]:8080`). "
                    "Empty: URLs are never fetched.",
                    list(_IMAGES.allow_hosts),
                ),
                "fetch_timeout_ms": Key(Num(minimum=1), "Timeout of one image fetch (ms).", _IMAGES.fetch_timeout_ms),
                "max_images": Key(
                    Int(minimum=1), "Most images one request may carry; a request with more is refused before any "
                    "is decoded.", _IMAGES.max_images,
                ),
                "max_total_bytes": Key(
                    Int(minimum=1), "Most encoded bytes of all of one request's images together; `data:` images are "
                    "counted before any is decoded, fetched ones as they arrive.", _IMAGES.max_total_bytes,
                ),
                "max_total_pixels": Key(
                    Int(minimum=1), "Most width × height of all of one request's images together, checked from each "
                    "image's header before its pixels are decoded.", _IMAGES.max_total_pixels,
                ),
            },
        ),
        "Limits on `image_url` parts the scorer reads, per image and per request; the request's deadline is "
        "checked between images. A refused or broken image, or a deadline passed while reading them, makes the "
        "request take `fallback`.",
    ),
    "remote": Key(
        Obj(
            title="remote",
            keys={
                "target": Key(
                    Str(min_length=1),
                    "gRPC target of `switchyard scorer serve`, e.g. `dns:///scorer.ml.svc.cluster.local:50061` "
                    "(balanced over every address the name returns).",
                ),
                "scorer": Key(Str(min_length=1), "The scorer's name in the remote config. Default: this scorer's name.", None),
                "tls": Key(
                    Obj(
                        title="tls",
                        keys={
                            "ca": Key(
                                Str(min_length=1),
                                "PEM file (relative to the policy file) of the CA that signed the scorer service's "
                                "certificate (`scorer serve --tls-cert`).",
                            ),
                            "cert": Key(
                                Str(min_length=1),
                                "PEM file of this client's certificate, for mutual TLS (a server started with "
                                "`--tls-client-ca` refuses clients without one). Set together with `key`.",
                                None,
                            ),
                            "key": Key(
                                Str(min_length=1),
                                "PEM file of the private key of `cert`. Set together with `cert`.",
                                None,
                            ),
                            "server_name": Key(
                                Str(min_length=1),
                                "The name the server's certificate must carry. Default: the target's host name "
                                "(set it when the target is an IP address or another name).",
                                None,
                            ),
                        },
                    ),
                    "Call the scorer service over TLS (mutual TLS with `cert` and `key`). The files are read "
                    "when the channel is created; a TLS failure makes the request take `fallback`. Not set: plaintext.",
                    None,
                ),
            },
        ),
        "Score over gRPC instead of in process; the checkpoints then live on the scorer service.",
        None,
    ),
    "description": _description,
}

#: Each scorer kind's keys, declared once on its class in ``extproc.scorers._kinds``, then the shared ones.
SCORER_KINDS_SCHEMA: dict[str, Obj] = scorer_schemas(_scorer_common)

ROUTE_SCHEMA = Obj(
    title="route",
    keys={
        "utility": Key(Str(min_length=1), "A `latent_router` scorer."),
        "lambda": Key(
            Num(minimum=0),
            "Cost weight λ: the rule picks the backend with the best predicted quality − λ·cost "
            "(0: best quality; large: cheapest). Set exactly one of `lambda` and `large_share`.",
            None,
        ),
        "large_share": Key(
            Num(minimum=0, maximum=1),
            "Use the λ the LatentRouter checkpoint was calibrated at (`switchyard calibrate`) for this share of "
            "requests on its large (most expensive, or `--large`) pool model. Local checkpoints only.",
            None,
        ),
        "among": Key(
            ListOf(Str(min_length=1), min_items=1),
            "The backends to choose from; ineligible ones (tenant, images, context) are masked out. "
            "Default: every backend the scorer's pool maps to.",
            None,
        ),
    },
)

BACKEND_SCHEMA = Obj(
    title="backend",
    keys={
        "cluster": Key(Str(min_length=1), "The Envoy cluster serving this backend (shown in `explain` and metadata)."),
        "model": Key(Str(min_length=1), "The model name this backend serves; `body.model` is rewritten to it."),
        "cost": Key(Num(minimum=0), "Relative cost per request (any unit; used by reports and later by utility routing).", _BACKEND.cost),
        "supports_images": Key(Bool(), "Set `false` for text-only backends: requests with images are then never routed there.", _BACKEND.supports_images),
        "max_context_tokens": Key(
            Int(minimum=1),
            "Largest prompt (in counted tokens) the backend accepts; longer prompts never go there. Default: no limit.",
            _BACKEND.max_context_tokens,
        ),
        "price": Key(
            Obj(
                title="price",
                keys={
                    "input_per_mtok": Key(
                        Num(minimum=0), "Money per million prompt tokens (any currency unit; the one `budgets.limits` uses).",
                        _PRICE.input_per_mtok,
                    ),
                    "output_per_mtok": Key(
                        Num(minimum=0), "Money per million output tokens, in the same unit.", _PRICE.output_per_mtok,
                    ),
                },
            ),
            "What the backend charges, for `budgets:`. Not set: requests routed here cost nothing.",
            None,
        ),
        "fallbacks": Key(
            ListOf(Str(min_length=1)),
            "Failover: the backends Envoy retries a failed attempt on (connect failure, reset, 5xx, 429, no "
            "response headers within `envoy render --per-try-timeout`), in order, each with its own model name, "
            "credential and TLS; never after response bytes reached the client. Backends the request or tenant "
            "may not use are left out per request.",
            list(_BACKEND.fallbacks),
        ),
        "description": _description,
    },
)

BUDGETS_SCHEMA = Obj(
    title="budgets",
    keys={
        "key": Key.section(
            Obj(
                title="key",
                keys={
                    "header": Key(
                        Str(min_length=1),
                        "The request header whose value (surrounding spaces ignored) names the budget a request "
                        "spends; set it from a trusted layer, like `tenants.header`. Requests without it share the "
                        "budget of the empty name. Default: `tenants.header`.",
                        _BUDGETS.header,
                    ),
                },
            ),
            "Which budget a request spends.",
        ),
        "window_s": Key(
            Num(minimum=1, maximum=366 * 86400),
            "Length of a budget window in seconds. Windows are aligned to the epoch (86400: UTC days); "
            "the spend starts again from 0 at each window's start.",
            _BUDGETS.window_s,
        ),
        "limits": Key(
            MapOf(Num(minimum=0)),
            f"Budget name → money per window (the unit of `backends.<name>.price`). `{DEFAULT_LIMIT}` is the "
            f"limit of every name not listed; without `{DEFAULT_LIMIT}`, unlisted names have no budget.",
            dict(_BUDGETS.limits),
        ),
        "output_tokens": Key(
            Int(minimum=0, maximum=10_000_000),
            "The output tokens charged for a request that sets neither `max_completion_tokens` nor `max_tokens` "
            "(a request that sets one is charged for that many).",
            _BUDGETS.output_tokens,
        ),
        "when_spent": Key(
            Obj(
                title="when_spent",
                keys={
                    "backend": Key(
                        Str(min_length=1),
                        "Route the request to this (cheaper) backend instead, rule `budget`; its cost is not "
                        "charged. A request this backend cannot serve (tenant, images, context) is answered 429.",
                        None,
                    ),
                    "reject": Key(Bool(), "`true`: answer 429 with the JSON error `budget_exhausted`.", None),
                },
            ),
            "What happens to a request whose cost would take its budget over the limit: set exactly one of "
            "`backend` and `reject: true`.",
            REQUIRED,
        ),
    },
)

SHARE_SCHEMA = Obj(
    title="share",
    keys={
        "signal": Key(
            Str(min_length=1),
            "The `score` signal whose threshold moves (one of `above`, `below`, `large_share`). Its match must "
            "send requests to the `large` backends: with `above` / `large_share` the threshold rises when the "
            "share is over target, with `below` it falls.",
        ),
        "target": Key(Num(minimum=0, maximum=1), "The share of routed requests to hold on the `large` backends."),
        "large": Key(
            ListOf(Str(min_length=1), min_items=1),
            "The backends that count as large.",
        ),
        "min_threshold": Key(Num(), "The lowest threshold the controller may set."),
        "max_threshold": Key(Num(), "The highest threshold the controller may set (greater than `min_threshold`)."),
        "window_s": Key(
            Num(minimum=1, maximum=86400),
            "The sliding window (seconds) over which the share is observed, fleet-wide.",
            _SHARE.window_s,
        ),
        "gain": Key(
            Num(minimum=0, maximum=100),
            "How far one update moves the threshold per unit of share error (threshold units): "
            "threshold += gain × (observed − target), clamped to the bounds.",
            _SHARE.gain,
        ),
        "update_s": Key(
            Num(minimum=0.1, maximum=3600),
            "Seconds between two threshold updates, fleet-wide (one replica updates; every replica reads "
            "the threshold at this period).",
            _SHARE.update_s,
        ),
        "min_requests": Key(
            Int(minimum=1),
            "Requests the window must hold before the threshold moves.",
            _SHARE.min_requests,
        ),
    },
)

SESSIONS_SCHEMA = Obj(
    title="sessions",
    keys={
        "key": Key(
            Str(enum=SESSION_KEYS),
            "Where a request's session comes from: `conversation` (a hash of the tenant, the system prompt and "
            "the first user message, so every turn of one chat shares it), `header` (the `sessions.header` "
            "request header) or `user` (the OpenAI `user` body field). A request without one is decided alone.",
            _SESSIONS.key,
        ),
        "header": Key(
            Str(min_length=1),
            "The request header holding the session id, with `key: header`. Set it from a trusted layer or "
            "the client; the id is hashed with the tenant, so two tenants never share a session.",
            _SESSIONS.header,
        ),
        "ttl_s": Key(
            Num(minimum=1, maximum=30 * 86400),
            "Seconds a pin lives after its session's last request; then the next turn is decided afresh.",
            _SESSIONS.ttl_s,
        ),
    },
)

RULE_SCHEMA = Obj(
    title="rule",
    keys={
        "name": Key(Str(min_length=1), "Unique rule name; sent back in `x-switchyard-rule`."),
        "when": Key(
            CONDITION_SCHEMA,
            "The condition (see below). Left out, or `always`: the rule always holds (a catch-all; rules after "
            "it are reached only when its backends cannot serve the request).",
            None,
        ),
        "backend": Key(Str(min_length=1), "The backend this rule routes to. Set exactly one of `backend` and `route`.", None),
        "route": Key(ROUTE_SCHEMA, "Pick the backend by LatentRouter utility instead of a fixed `backend`.", None),
        "breaks_session": Key(
            Bool(),
            "With `sessions:`: when this rule holds for a request of a pinned session, the rule decides instead "
            "of the pin, and the session is pinned to its backend. Only for rules with a fixed `backend` whose "
            "condition uses no `score` signal (the pin is checked without running scorers).",
            False,
        ),
        "fallbacks": Key(
            ListOf(Str(min_length=1)),
            "Failover for requests this rule decides: replaces the chosen backend's `backends.<name>.fallbacks`.",
            None,
        ),
        "description": _description,
    },
)

POLICY_SCHEMA = Obj(
    title="policy",
    doc="A switchyard routing policy (version 1).",
    keys={
        "version": Key(Int(minimum=1, maximum=1), "Policy format version. Only `1` exists."),
        "backends": Key(MapOf(BACKEND_SCHEMA, min_items=1), "The model backends, by name. The name is the routing header's value."),
        "default": Key(Str(min_length=1), "The backend used when no rule matches."),
        "fallback": Key(
            Str(min_length=1),
            "The backend used when a scorer a rule needs fails, returns NaN, misses its deadline, is overloaded or "
            "its breaker is open (unless the scorer names its own `fallback`). Default: `default`.",
            None,
        ),
        "scorers": Key(
            MapOf(Tagged("kind", SCORER_KINDS_SCHEMA)),
            "Learned scorers, by name, loaded once by the server (a reload keeps unchanged ones).",
            {},
        ),
        "signals": Key(MapOf(Tagged("kind", SIGNAL_KINDS)), "Named signals, evaluated lazily: only when a rule reaches them.", {}),
        "rules": Key(ListOf(RULE_SCHEMA), "Ordered rules; the first whose condition holds (and whose backend is eligible) wins.", []),
        "models": Key.section(
            Obj(
                title="models",
                keys={
                    "routed": Key(ListOf(Str(min_length=1)), "Requested model names that the policy decides.",
                                  sorted(_MODELS.routed)),
                    "direct": Key(
                        Bool(),
                        "A request naming a backend's `model` (or the backend's name) goes straight to that backend, no rules.",
                        _MODELS.direct,
                    ),
                    "unknown": Key(
                        Str(enum=("route", "reject")),
                        "Any other model name: `route` decides it by the rules, `reject` answers 404 `model_not_found`.",
                        _MODELS.unknown,
                    ),
                },
            ),
            "Which requested `model` names are routed.",
        ),
        "tenants": Key.section(
            Obj(
                title="tenants",
                keys={
                    "header": Key(
                        Str(min_length=1),
                        "Request header naming the tenant. It must be set by a trusted layer (your auth proxy), not by clients. "
                        "Surrounding spaces are ignored; a repeated header or a comma list gets only the backends every "
                        "listed tenant (and an unlisted one) may reach, or 403 `ambiguous_tenant` when they share none.",
                        _TENANTS.header,
                    ),
                    "allow": Key(
                        MapOf(ListOf(Str(min_length=1), min_items=1)),
                        "Tenant → the backends it may reach, in preference order (its first is its default).",
                        dict(_TENANTS.allow),
                    ),
                    "otherwise": Key(
                        ListOf(Str(min_length=1), min_items=1),
                        "Backends for requests whose tenant is missing or not listed. Default: every backend.",
                        _TENANTS.otherwise,
                    ),
                },
            ),
            "Per-tenant backend restrictions. Rules routing to a backend the tenant may not reach are skipped.",
        ),
        "routing": Key.section(
            Obj(
                title="routing",
                keys={
                    "paths": Key(
                        ListOf(Str(min_length=1), min_items=1),
                        "Request paths (query string ignored) whose JSON bodies are routed; anything else passes through to the default route.",
                        sorted(_ROUTING.paths),
                    ),
                    "max_body_bytes": Key(
                        Int(minimum=1024),
                        "Largest body switchyard parses; larger ones get 413. Keep it at or below Envoy's buffer limit.",
                        _ROUTING.max_body_bytes,
                    ),
                    "rewrite_model": Key(Bool(), "Rewrite `body.model` to the chosen backend's model.", _ROUTING.rewrite_model),
                },
            ),
            "Which requests are routed and how.",
        ),
        "capture": Key.section(
            Obj(
                title="capture",
                keys={
                    "path": Key(
                        Str(min_length=1),
                        "The JSONL file sampled requests are appended to, one line each: `id` (the `x-request-id` "
                        "header), `time`, `tenant`, `messages` (the body's, as parsed) and `decision` (`backend`, "
                        "`rule`, `fallback`, `scores`); `switchyard label` reads it. Relative to the policy file; "
                        "its folder must exist and be writable. Not set: capture is off.",
                        _CAPTURE.path,
                    ),
                    "sample_rate": Key(
                        Num(minimum=0, maximum=1),
                        "Share of decided requests captured, 0..1. Sampling hashes the request id, so an id is "
                        "always or never captured, whichever worker or replica decides it.",
                        _CAPTURE.sample_rate,
                    ),
                    "exclude_tenants": Key(
                        ListOf(Str(min_length=1)),
                        "Tenants (values of `tenants.header`) whose requests are never captured; a header naming "
                        "several tenants is excluded when any of them is listed.",
                        sorted(_CAPTURE.exclude_tenants),
                    ),
                    "max_bytes": Key(
                        Int(minimum=4096),
                        "Largest size of the file (bytes). Before a write would pass it, the file is renamed to "
                        "`<path>.1` and a new one started; a single request's line over it is dropped.",
                        _CAPTURE.max_bytes,
                    ),
                    "keep": Key(
                        Int(minimum=0, maximum=100),
                        "Rotated files kept: `<path>.1` (newest) to `<path>.<keep>`; 0 deletes the full file. "
                        "The disk used stays under (keep + 1) × `max_bytes`.",
                        _CAPTURE.keep,
                    ),
                    "queue": Key(
                        Int(minimum=1, maximum=1000000),
                        "Samples waiting for the writer thread; when it falls behind, more are dropped and "
                        "counted (`switchyard_capture_dropped_total{reason=\"queue_full\"}`), never waited for.",
                        _CAPTURE.queue,
                    ),
                },
            ),
            "Writes a sample of live requests, with their decisions, to a JSONL file for `switchyard label` "
            "(off unless `path` is set). The prompts never reach logs or metrics; requests never wait for the disk.",
        ),
        "budgets": Key(
            BUDGETS_SCHEMA,
            "Money budgets per tenant (or per the value of another header) per window, held fleet-wide in the "
            "`state:` store. Not set: no budgets.",
            None,
        ),
        "sessions": Key(
            SESSIONS_SCHEMA,
            "Conversation stickiness: the later turns of a session go to the backend its first routed turn got, "
            "without running scorers (`x-switchyard-rule: session`). Pins live in the `state:` store. "
            "Not set: every request is decided alone.",
            None,
        ),
        "state": STATE_KEY,
        "share": Key(
            SHARE_SCHEMA,
            "Hold the share of requests on the large backends near a target, fleet-wide, by moving a score "
            "signal's threshold. Not set: thresholds stay as written.",
            None,
        ),
    },
)


#: The file `switchyard scorer serve --config` reads: the policy's `scorers` section alone.
SCORERS_FILE_SCHEMA = Obj(
    title="scorers file",
    keys={
        "version": Key(Int(minimum=1, maximum=1), "Format version. Only `1` exists.", 1),
        "scorers": Key(MapOf(Tagged("kind", SCORER_KINDS_SCHEMA), min_items=1), POLICY_SCHEMA.keys["scorers"].doc),
    },
)


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a policy file."""
    out = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://switchyard.dev/policy.schema.json",
        "title": "switchyard policy",
    }
    out.update(POLICY_SCHEMA.json_schema())
    out["$defs"] = {"condition": CONDITION_SCHEMA.json_schema()}
    return out


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"


def _default_text(default: Any) -> str:
    if default is REQUIRED:
        return "required"
    if default is None:
        return "not set"
    return "`" + json.dumps(default) + "`"


def _table(obj: Obj, prefix: str) -> list[str]:
    rows = []
    for key, spec in obj.keys.items():
        rows.append(f"| `{prefix}{key}` | {spec.schema.type_name()} | {_default_text(spec.default)} | {spec.doc} |")
    return rows


def markdown_reference() -> str:
    """The policy key reference of ``docs/policy-reference.md``, rendered from :data:`POLICY_SCHEMA`."""
    head = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    lines = ["#### Top level", "", *head]
    top = POLICY_SCHEMA.keys
    lines += _table(Obj(keys={k: v for k, v in top.items()}), "")
    lines += ["", "#### `backends.<name>`", "", *head, *_table(BACKEND_SCHEMA, "")]
    lines += ["", "#### `rules[]`", "", *head, *_table(RULE_SCHEMA, "")]
    lines += ["", "#### `rules[].route`", "", *head, *_table(ROUTE_SCHEMA, "route.")]
    lines += ["", f"A condition is {CONDITION_SCHEMA.doc[0].lower()}{CONDITION_SCHEMA.doc[1:]}"]
    price = BACKEND_SCHEMA.keys["price"].schema
    assert isinstance(price, Obj)
    lines += ["", "#### `backends.<name>.price`", "", *head, *_table(price, "price.")]
    for section in ("models", "tenants", "routing", "capture", "budgets", "share", "sessions", "state"):
        schema = top[section].schema
        assert isinstance(schema, Obj)
        lines += ["", f"#### `{section}`", "", *head, *_table(schema, f"{section}.")]
        for inner, spec in schema.keys.items():  # a section inside the section: `budgets.when_spent`
            if isinstance(spec.schema, Obj):
                lines += _table(spec.schema, f"{section}.{inner}.")
    lines += ["", "#### `scorers.<name>` by `kind`"]
    for index, (kind, obj) in enumerate(SCORER_KINDS_SCHEMA.items()):
        lines += ["", f"**`{kind}`** — {obj.doc}", "", *head]
        lines += _table(Obj(keys={k: v for k, v in obj.keys.items() if k != "kind"}), "")
        for key in ("batch", "breaker", "images", "remote"):
            nested = obj.keys[key].schema
            if index > 0:
                continue  # the shared nested keys, listed under the first kind
            assert isinstance(nested, Obj)
            lines += _table(nested, f"{key}.")
            for inner, spec in nested.keys.items():  # a section inside the section: `remote.tls`
                if isinstance(spec.schema, Obj):
                    lines += _table(spec.schema, f"{key}.{inner}.")
    lines += ["", "#### `signals.<name>` by `kind`"]
    for kind, obj in SIGNAL_KINDS.items():
        lines += ["", f"**`{kind}`** — {obj.doc}", "", *head]
        lines += _table(Obj(keys={k: v for k, v in obj.keys.items() if k != "kind"}), "")
    return "\n".join(lines) + "\n"
