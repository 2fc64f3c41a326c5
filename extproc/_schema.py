"""A small declarative schema for YAML documents, validated on the node tree.

The policy's keys are declared once with these classes (see ``extproc.policy._schema``); from that
one declaration come the validator (every problem located as ``file:line:column``), the
JSON Schema in ``policies/policy.schema.json`` and the key tables of ``docs/policy-reference.md``, so the three
cannot drift apart.

Validation works on PyYAML's composed node tree rather than on loaded Python objects,
because only nodes carry their position. ``validate`` returns plain Python values (dicts,
lists, scalars) plus a :class:`Located` index from each value path to its position.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from extproc._errors import PolicyError, PolicyProblem

__all__ = [
    "Schema",
    "Str",
    "Int",
    "Num",
    "Bool",
    "Scalar",
    "ListOf",
    "Obj",
    "Key",
    "MapOf",
    "Tagged",
    "Validation",
    "Path",
    "nearest_mark",
    "REQUIRED",
    "kind_key",
    "DESCRIPTION_KEY",
    "compose_yaml",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: Marks a key without a default: leaving it out is an error.
REQUIRED: Any = _Required()

Path = tuple[str | int, ...]


@dataclass
class Validation:
    """What a validation pass collects: problems, and where each value path sits."""

    source: str
    problems: list[PolicyProblem] = field(default_factory=list)
    marks: dict[Path, tuple[int, int]] = field(default_factory=dict)
    #: Paths whose value has a problem, itself or inside. A list item or a named entry
    #: (a backend, a rule) with a problem validates to ``None``, so later checks can skip
    #: it and still check the entries that validated.
    broken: set[Path] = field(default_factory=set)

    def entry(self, schema: Schema, node: yaml.Node, path: Path, *, whole: bool = False) -> Any:
        """``schema.validate(node, path)``, recording ``path`` as broken when it had problems;
        then ``None`` when ``whole`` (the value is one entry: used whole or not at all)."""
        before = len(self.problems)
        value = schema.validate(node, path, self)
        if len(self.problems) > before:
            self.broken.add(path)
            return None if whole else value
        return value

    def problem(self, node: yaml.Node | None, message: str, path: Path = ()) -> None:
        line, column = self.position(node, path)
        self.problems.append(PolicyProblem(self.source, line, column, message))

    def position(self, node: yaml.Node | None, path: Path = ()) -> tuple[int, int]:
        if node is not None:
            return node.start_mark.line + 1, node.start_mark.column + 1
        return nearest_mark(self.marks, path)


def nearest_mark(marks: Mapping[Path, tuple[int, int]], path: Path) -> tuple[int, int]:
    """Where ``path`` sits (line, column), or the nearest enclosing path that ``marks`` has;
    ``(1, 1)`` when none."""
    while path:
        if path in marks:
            return marks[path]
        path = path[:-1]
    return marks.get((), (1, 1))


def dotted(path: Path) -> str:
    """``("rules", 2, "when")`` -> ``rules[2].when``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "<document>"


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(node.value)


class Schema:
    """Base class: a schema validates a node and renders itself as JSON Schema."""

    doc: str = ""

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:  # pragma: no cover
        raise NotImplementedError

    def json_schema(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def type_name(self) -> str:  # pragma: no cover
        raise NotImplementedError


_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"

def _scalar_value(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


@dataclass
class Str(Schema):
    doc: str = ""
    enum: tuple[str, ...] | None = None
    min_length: int = 0

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (_STR_TAG,):
            v.problem(node, f"`{dotted(path)}` must be a string, got {_describe(node)}.")
            return None
        value = node.value
        if self.enum is not None and value not in self.enum:
            allowed = ", ".join(self.enum)
            v.problem(node, f"`{dotted(path)}` must be one of {allowed}; got {value!r}.")
            return None
        if len(value) < self.min_length:
            v.problem(node, f"`{dotted(path)}` must not be empty.")
            return None
        return value

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string"}
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.min_length:
            out["minLength"] = self.min_length
        return out

    def type_name(self) -> str:
        return " \\| ".join(f"`{e}`" for e in self.enum) if self.enum else "string"


@dataclass
class Int(Schema):
    doc: str = ""
    minimum: int | None = None
    maximum: int | None = None

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _INT_TAG:
            v.problem(node, f"`{dotted(path)}` must be an integer, got {_describe(node)}.")
            return None
        value = _scalar_value(node)
        return _check_range(value, self.minimum, self.maximum, node, path, v)

    def json_schema(self) -> dict[str, Any]:
        return _range_schema({"type": "integer"}, self.minimum, self.maximum)

    def type_name(self) -> str:
        return "integer"


@dataclass
class Num(Schema):
    doc: str = ""
    minimum: float | None = None
    maximum: float | None = None

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (_INT_TAG, _FLOAT_TAG):
            v.problem(node, f"`{dotted(path)}` must be a number, got {_describe(node)}.")
            return None
        value = float(_scalar_value(node))
        if not math.isfinite(value):
            v.problem(node, f"`{dotted(path)}` must be a finite number, got {node.value!r}.")
            return None
        return _check_range(value, self.minimum, self.maximum, node, path, v)

    def json_schema(self) -> dict[str, Any]:
        return _range_schema({"type": "number"}, self.minimum, self.maximum)

    def type_name(self) -> str:
        return "number"


def _check_range(value, minimum, maximum, node, path, v) -> Any:
    if minimum is not None and value < minimum:
        v.problem(node, f"`{dotted(path)}` must be >= {minimum}, got {value}.")
        return None
    if maximum is not None and value > maximum:
        v.problem(node, f"`{dotted(path)}` must be <= {maximum}, got {value}.")
        return None
    return value


def _range_schema(out: dict[str, Any], minimum, maximum) -> dict[str, Any]:
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


@dataclass
class Bool(Schema):
    doc: str = ""

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _BOOL_TAG:
            v.problem(node, f"`{dotted(path)}` must be true or false, got {_describe(node)}.")
            return None
        return _scalar_value(node)

    def json_schema(self) -> dict[str, Any]:
        return {"type": "boolean"}

    def type_name(self) -> str:
        return "boolean"


@dataclass
class Scalar(Schema):
    """Any string, number or boolean (e.g. a value a request field is compared to)."""

    doc: str = ""

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL_TAG:
            v.problem(node, f"`{dotted(path)}` must be a string, number or boolean, got {_describe(node)}.")
            return None
        return _scalar_value(node)

    def json_schema(self) -> dict[str, Any]:
        return {"type": ["string", "number", "boolean"]}

    def type_name(self) -> str:
        return "string \\| number \\| boolean"


@dataclass
class ListOf(Schema):
    item: Schema
    doc: str = ""
    min_items: int = 0

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:
        if not isinstance(node, yaml.SequenceNode):
            v.problem(node, f"`{dotted(path)}` must be a list, got {_describe(node)}.")
            return None
        if len(node.value) < self.min_items:
            v.problem(node, f"`{dotted(path)}` needs at least {self.min_items} item(s), got {len(node.value)}.")
            return None
        out = []
        for index, child in enumerate(node.value):
            child_path = path + (index,)
            v.marks[child_path] = (child.start_mark.line + 1, child.start_mark.column + 1)
            out.append(v.entry(self.item, child, child_path, whole=True))
        return out

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "array", "items": self.item.json_schema()}
        if self.min_items:
            out["minItems"] = self.min_items
        return out

    def type_name(self) -> str:
        return f"list of {self.item.type_name()}"


@dataclass
class Key:
    """One key of an :class:`Obj`: its schema, its default, and its documentation."""

    schema: Schema
    doc: str
    default: Any = REQUIRED

    @classmethod
    def section(cls, schema: Obj, doc: str) -> Key:
        """An optional nested section: left out, it holds its own keys' defaults."""
        return cls(schema, doc, schema.defaults())


def _mapping_pairs(node: yaml.MappingNode, path: Path, v: Validation) -> list[tuple[str, yaml.Node, yaml.Node]]:
    pairs = []
    seen: set[str] = set()
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in (_STR_TAG, _INT_TAG):
            v.problem(key_node, f"Keys of `{dotted(path)}` must be strings, got {_describe(key_node)}.")
            continue
        key = str(key_node.value)
        if key in seen:
            v.problem(key_node, f"Duplicate key `{key}` in `{dotted(path)}`.")
            continue
        seen.add(key)
        pairs.append((key, key_node, value_node))
    return pairs


@dataclass
class Obj(Schema):
    keys: dict[str, Key]
    doc: str = ""
    title: str = ""

    def defaults(self) -> dict[str, Any]:
        """Every key's default; a section with a required key has none."""
        required = [key for key, spec in self.keys.items() if spec.default is REQUIRED]
        if required:
            raise ValueError(f"Section {self.title!r} has required keys ({', '.join(required)}): no defaults.")
        return {key: spec.default for key, spec in self.keys.items()}

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:
        if not isinstance(node, yaml.MappingNode):
            v.problem(node, f"`{dotted(path)}` must be a mapping, got {_describe(node)}.")
            return None
        out: dict[str, Any] = {}
        for key, key_node, value_node in _mapping_pairs(node, path, v):
            if key not in self.keys:
                known = ", ".join(self.keys)
                v.problem(key_node, f"Unknown key `{key}` in `{dotted(path)}`; known keys: {known}.")
                continue
            child_path = path + (key,)
            v.marks[child_path] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = v.entry(self.keys[key].schema, value_node, child_path)
        for key, spec in self.keys.items():
            if key in out:
                continue
            if spec.default is REQUIRED:
                v.problem(node, f"`{dotted(path + (key,))}` is required.")
                v.broken.add(path + (key,))
            else:
                out[key] = spec.default
        return out

    def json_schema(self) -> dict[str, Any]:
        props = {}
        for key, spec in self.keys.items():
            prop = spec.schema.json_schema()
            prop["description"] = spec.doc
            if spec.default is not REQUIRED and spec.default is not None:
                prop["default"] = spec.default
            props[key] = prop
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        required = [k for k, s in self.keys.items() if s.default is REQUIRED]
        if required:
            out["required"] = required
        if self.doc:
            out["description"] = self.doc
        return out

    def type_name(self) -> str:
        return "mapping"


@dataclass
class MapOf(Schema):
    """A mapping from user-chosen names (matching ``name_pattern``) to values."""

    value: Schema
    doc: str = ""
    name_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
    min_items: int = 0

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:
        if not isinstance(node, yaml.MappingNode):
            v.problem(node, f"`{dotted(path)}` must be a mapping of names, got {_describe(node)}.")
            return None
        out: dict[str, Any] = {}
        for key, key_node, value_node in _mapping_pairs(node, path, v):
            if not re.match(self.name_pattern, key):
                v.problem(key_node, f"Name {key!r} in `{dotted(path)}` must match {self.name_pattern}.")
                continue
            child_path = path + (key,)
            v.marks[child_path] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = v.entry(self.value, value_node, child_path, whole=True)
        if len(node.value) < self.min_items:
            v.problem(node, f"`{dotted(path)}` needs at least {self.min_items} entry(ies).")
        return out

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "object",
            "propertyNames": {"pattern": self.name_pattern},
            "additionalProperties": self.value.json_schema(),
        }
        if self.min_items:
            out["minProperties"] = self.min_items
        return out

    def type_name(self) -> str:
        return f"mapping of name → {self.value.type_name()}"


@dataclass
class Tagged(Schema):
    """A mapping whose ``tag`` key (e.g. ``kind``) picks which :class:`Obj` it is."""

    tag: str
    variants: dict[str, Obj]
    doc: str = ""

    def validate(self, node: yaml.Node, path: Path, v: Validation) -> Any:
        if not isinstance(node, yaml.MappingNode):
            v.problem(node, f"`{dotted(path)}` must be a mapping, got {_describe(node)}.")
            return None
        tag_node = next(
            (val for key, val in node.value if isinstance(key, yaml.ScalarNode) and key.value == self.tag),
            None,
        )
        supported = ", ".join(self.variants)
        if tag_node is None:
            v.problem(node, f"`{dotted(path)}` needs `{self.tag}`; supported: {supported}.")
            return None
        if not isinstance(tag_node, yaml.ScalarNode) or tag_node.value not in self.variants:
            v.problem(tag_node, f"Unknown {self.tag} {_describe(tag_node)} for `{dotted(path)}`; supported: {supported}.")
            return None
        return self.variants[tag_node.value].validate(node, path, v)

    def json_schema(self) -> dict[str, Any]:
        return {"oneOf": [variant.json_schema() for variant in self.variants.values()]}

    def type_name(self) -> str:
        return f"one of the `{self.tag}`s below"


def kind_key(name: str) -> Key:
    """The ``kind`` key of a tagged variant: always ``name``."""
    return Key(Str(enum=(name,)), f"Always `{name}`.")


#: The free-text ``description`` key every named policy entry may carry.
DESCRIPTION_KEY = Key(Str(), "Free text for people reading the policy.", None)


#: libyaml's parser when PyYAML was built with it (several times faster; the same node tree
#: and marks), else the pure-Python one.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def compose_yaml(text: str, source: str) -> yaml.Node:
    """The YAML node tree of ``text`` (a policy, a scorers file, a label config), with the
    marks the validator locates problems by; :class:`PolicyError` located at a syntax error."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([PolicyProblem(source, line, column, f"Invalid YAML: {reason}.")]) from exc
    if root is None:
        raise PolicyError([PolicyProblem(source, 1, 1, "The file is empty.")])
    return root
