"""The policy file's keys, declared once.

This declaration is the single source of the validator (``_policy_loader``), the JSON
Schema (``policies/policy.schema.json``, written by ``switchyard policy schema``) and the
key reference table in the README (``switchyard policy schema --markdown``). A test checks
that both files match what this module renders.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from extproc._schema import (
    REQUIRED,
    Bool,
    Int,
    Key,
    ListOf,
    MapOf,
    Num,
    Obj,
    Scalar,
    Schema,
    Str,
    Tagged,
    Validation,
    _describe,
    dotted,
)

__all__ = ["POLICY_SCHEMA", "CONDITION_SCHEMA", "json_schema", "markdown_reference", "SIGNAL_KINDS"]

SCOPES = ("last_user", "all", "system")

_scope = Key(
    Str(enum=SCOPES),
    "Which text is searched: `last_user` the last user message, `all` every message, "
    "`system` the system/developer messages.",
    "last_user",
)


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


def _kind(name: str) -> Key:
    return Key(Str(enum=(name,)), f"Always `{name}`.")


_description = Key(Str(), "Free text for people reading the policy.", None)

SIGNAL_KINDS: dict[str, Obj] = {
    "keywords": Obj(
        title="keywords",
        doc="True when at least `min_matches` of the keywords occur in the chosen text.",
        keys={
            "kind": _kind("keywords"),
            "keywords": Key(ListOf(Str(min_length=1), min_items=1), "Words or phrases to look for."),
            "case_sensitive": Key(Bool(), "Match case exactly.", False),
            "whole_word": Key(Bool(), "Only match at word boundaries (`code` does not match `decode`).", True),
            "min_matches": Key(Int(minimum=1), "How many distinct keywords must occur.", 1),
            "scope": _scope,
            "description": _description,
        },
    ),
    "regex": Obj(
        title="regex",
        doc="True when any pattern matches the chosen text (Python `re` syntax, searched, not anchored).",
        keys={
            "kind": _kind("regex"),
            "patterns": Key(ListOf(Str(min_length=1), min_items=1), "Regular expressions; each must compile."),
            "case_sensitive": Key(Bool(), "Match case exactly.", False),
            "scope": _scope,
            "description": _description,
        },
    ),
    "token_count": Obj(
        title="token_count",
        doc="The prompt's token count compared with thresholds. Set `above`, `below` or both "
        "(both: true inside the range). Counted with `tokenizer` when set, else estimated.",
        keys={
            "kind": _kind("token_count"),
            "above": Key(Int(minimum=0), "True when the count is strictly greater than this.", None),
            "below": Key(Int(minimum=1), "True when the count is strictly less than this.", None),
            "scope": Key(Str(enum=SCOPES), "Which messages are counted (see `scope` above).", "all"),
            "tokenizer": Key(
                Str(min_length=1),
                "Path to a Hugging Face `tokenizer.json` (relative to the policy file). Loaded with "
                "the `tokenizers` library at policy load; never downloaded. Default: the fast "
                "estimate, one token per 4 characters of Latin text and one per CJK character.",
                None,
            ),
            "description": _description,
        },
    ),
    "modality": Obj(
        title="modality",
        doc="True when the request carries at least `min_count` parts of the modality.",
        keys={
            "kind": _kind("modality"),
            "modality": Key(Str(enum=("image",)), "The modality to look for.", "image"),
            "min_count": Key(Int(minimum=1), "How many parts are needed.", 1),
            "description": _description,
        },
    ),
    "header": Obj(
        title="header",
        doc="A request header compared with `values` (exact), `pattern` (regex, full match) or "
        "`present`. Set exactly one. Use only headers a trusted layer sets; `x-switchyard-*` "
        "headers from clients are removed by Envoy before switchyard sees them.",
        keys={
            "kind": _kind("header"),
            "header": Key(Str(min_length=1), "Header name (case-insensitive)."),
            "values": Key(ListOf(Str(), min_items=1), "True when the header equals one of these.", None),
            "pattern": Key(Str(min_length=1), "True when the header fully matches this regex.", None),
            "present": Key(Bool(), "True when the header is present (`true`) or absent (`false`).", None),
            "description": _description,
        },
    ),
    "request_field": Obj(
        title="request_field",
        doc="A top-level field of the JSON body (`stream`, `tools`, `max_tokens`, `model`, ...). Set "
        "exactly one of `present`, `equals`, `in`, or `above`/`below` (numbers; both: a range).",
        keys={
            "kind": _kind("request_field"),
            "field": Key(Str(min_length=1), "Top-level body field name."),
            "present": Key(Bool(), "True when the field is present and not null/empty (`true`), or absent (`false`).", None),
            "equals": Key(Scalar(), "True when the field equals this value.", None),
            "in": Key(ListOf(Scalar(), min_items=1), "True when the field equals one of these.", None),
            "above": Key(Num(), "True when the field is a number greater than this.", None),
            "below": Key(Num(), "True when the field is a number less than this.", None),
            "description": _description,
        },
    ),
    "language": Obj(
        title="language",
        doc="The detected language of the chosen text (ISO 639-1: en, es, fr, de, it, pt, nl, "
        "ru, uk, el, he, ar, fa, hi, th, zh, ja, ko). True when it is one of `languages`. "
        "Detection is a fast script + stop-word heuristic; short texts detect as `und`.",
        keys={
            "kind": _kind("language"),
            "languages": Key(ListOf(Str(min_length=2), min_items=1), "Language codes that make the signal true."),
            "scope": _scope,
            "description": _description,
        },
    ),
}

BACKEND_SCHEMA = Obj(
    title="backend",
    keys={
        "cluster": Key(Str(min_length=1), "The Envoy cluster serving this backend (shown in `explain` and metadata)."),
        "model": Key(Str(min_length=1), "The model name this backend serves; `body.model` is rewritten to it."),
        "cost": Key(Num(minimum=0), "Relative cost per request (any unit; used by reports and later by utility routing).", 1.0),
        "supports_images": Key(Bool(), "Set `false` for text-only backends: requests with images are then never routed there.", True),
        "max_context_tokens": Key(
            Int(minimum=1),
            "Largest prompt (in counted tokens) the backend accepts; longer prompts never go there. Default: no limit.",
            None,
        ),
        "description": _description,
    },
)

RULE_SCHEMA = Obj(
    title="rule",
    keys={
        "name": Key(Str(min_length=1), "Unique rule name; sent back in `x-switchyard-rule`."),
        "when": Key(CONDITION_SCHEMA, "The condition (see below)."),
        "backend": Key(Str(min_length=1), "The backend this rule routes to."),
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
        "signals": Key(MapOf(Tagged("kind", SIGNAL_KINDS)), "Named signals, evaluated lazily: only when a rule reaches them.", {}),
        "rules": Key(ListOf(RULE_SCHEMA), "Ordered rules; the first whose condition holds (and whose backend is eligible) wins.", []),
        "models": Key(
            Obj(
                title="models",
                keys={
                    "routed": Key(ListOf(Str(min_length=1)), "Requested model names that the policy decides.", ["auto"]),
                    "direct": Key(
                        Bool(),
                        "A request naming a backend's `model` (or the backend's name) goes straight to that backend, no rules.",
                        True,
                    ),
                    "unknown": Key(
                        Str(enum=("route", "reject")),
                        "Any other model name: `route` decides it by the rules, `reject` answers 404 `model_not_found`.",
                        "route",
                    ),
                },
            ),
            "Which requested `model` names are routed.",
            {"routed": ["auto"], "direct": True, "unknown": "route"},
        ),
        "tenants": Key(
            Obj(
                title="tenants",
                keys={
                    "header": Key(
                        Str(min_length=1),
                        "Request header naming the tenant. It must be set by a trusted layer (your auth proxy), not by clients.",
                        "x-tenant-id",
                    ),
                    "allow": Key(
                        MapOf(ListOf(Str(min_length=1), min_items=1)),
                        "Tenant → the backends it may reach, in preference order (its first is its default).",
                        {},
                    ),
                    "otherwise": Key(
                        ListOf(Str(min_length=1), min_items=1),
                        "Backends for requests whose tenant is missing or not listed. Default: every backend.",
                        None,
                    ),
                },
            ),
            "Per-tenant backend restrictions. Rules routing to a backend the tenant may not reach are skipped.",
            {"header": "x-tenant-id", "allow": {}, "otherwise": None},
        ),
        "routing": Key(
            Obj(
                title="routing",
                keys={
                    "paths": Key(
                        ListOf(Str(min_length=1), min_items=1),
                        "Request paths (query string ignored) whose JSON bodies are routed; anything else passes through to the default route.",
                        ["/v1/chat/completions"],
                    ),
                    "max_body_bytes": Key(
                        Int(minimum=1024),
                        "Largest body switchyard parses; larger ones get 413. Keep it at or below Envoy's buffer limit.",
                        1048576,
                    ),
                    "rewrite_model": Key(Bool(), "Rewrite `body.model` to the chosen backend's model.", True),
                },
            ),
            "Which requests are routed and how.",
            {"paths": ["/v1/chat/completions"], "max_body_bytes": 1048576, "rewrite_model": True},
        ),
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
    """The README's policy key reference, rendered from :data:`POLICY_SCHEMA`."""
    head = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    lines = ["#### Top level", "", *head]
    top = POLICY_SCHEMA.keys
    lines += _table(Obj(keys={k: v for k, v in top.items()}), "")
    lines += ["", "#### `backends.<name>`", "", *head, *_table(BACKEND_SCHEMA, "")]
    lines += ["", "#### `rules[]`", "", *head, *_table(RULE_SCHEMA, "")]
    lines += ["", f"A condition is {CONDITION_SCHEMA.doc[0].lower()}{CONDITION_SCHEMA.doc[1:]}"]
    for section in ("models", "tenants", "routing"):
        schema = top[section].schema
        assert isinstance(schema, Obj)
        lines += ["", f"#### `{section}`", "", *head, *_table(schema, f"{section}.")]
    lines += ["", "#### `signals.<name>` by `kind`"]
    for kind, obj in SIGNAL_KINDS.items():
        lines += ["", f"**`{kind}`** — {obj.doc}", "", *head]
        lines += _table(Obj(keys={k: v for k, v in obj.keys.items() if k != "kind"}), "")
    return "\n".join(lines) + "\n"
