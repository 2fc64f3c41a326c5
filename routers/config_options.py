"""Config dataclasses as CLI options: each setting is declared once, as a dataclass field.

A training or model config field carries its default and its help (:func:`option`, the
field's ``metadata["help"]``, or else a ``- ``name``: text`` / ``name: text`` line of the
class docstring). :func:`add_config_options` makes one ``--flag`` per field with that
default and help; :func:`config_values` reads the parsed values back for the constructor.
So ``switchyard train ... --help`` and the code cannot disagree on a default.

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, field, fields
from typing import Any

__all__ = ["option", "field_help", "field_default", "add_config_options", "config_values"]

_DOC_LINE = re.compile(r"^(\s*)(?:-\s+)?(?:``)?([A-Za-z_]\w*)(?:``)?\s*:\s+(.*)$")
_ROLE = re.compile(r":\w+:`~?([^`]+)`")
_DEFAULT_SENTENCE = re.compile(r"\s*\bDefault\b.*?(?:\.(?=\s|$)|$)")


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with ``default`` and its CLI ``help`` (peft-style metadata)."""
    return field(default=default, metadata={"help": help})


def field_default(f: Field) -> Any:
    """The default of dataclass field ``f`` (calling its factory); ``MISSING`` if required."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _plain(text: str) -> str:
    """Docstring text as CLI help: reST roles and literals unwrapped, "Default ..." sentences
    dropped (the option states the default it really has), first letter capitalised."""
    text = _DEFAULT_SENTENCE.sub("", _ROLE.sub(r"\1", text).replace("``", "")).strip()
    return text[:1].upper() + text[1:] if re.match(r"[a-z]{2}|a ", text) else text


def _doc_help(doc: str, names: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    current: str | None = None
    indent = 0
    for line in inspect.cleandoc(doc).splitlines():
        match = _DOC_LINE.match(line)
        if match and match.group(2) in names:
            current, indent = match.group(2), len(match.group(1))
            found[current] = match.group(3).strip()
        elif current and line.strip() and len(line) - len(line.lstrip()) > indent:
            found[current] += " " + line.strip()
        else:
            current = None
    return {name: _plain(text) for name, text in found.items()}


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text: ``metadata["help"]``, else the field's line(s) in the
    docstring of ``cls`` or of the first base class that documents it."""
    names = {f.name for f in fields(cls)}
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        found.update(_doc_help(klass.__doc__ or "", names) if klass.__doc__ else {})
    for f in fields(cls):
        if "help" in f.metadata:
            found[f.name] = f.metadata["help"]
    return found


def _scalar(hint: Any) -> tuple[Any, bool]:
    """(scalar type, is a tuple of it) for a field's resolved type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _scalar(args[0])
    if origin is tuple:
        args = typing.get_args(hint)
        if args and all(a in (args[0], Ellipsis) for a in args):
            return args[0], True
    if hint in (bool, int, float, str):
        return hint, False
    raise TypeError(f"A CLI option cannot be made for a field of type {hint!r}.")


def _comma_list(kind: Callable[[str], Any], flag: str) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects comma-separated values, got {text!r}.") from None

    return parse


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _selected(cls: type, only: Iterable[str] | None, exclude: Iterable[str]) -> list[Field]:
    chosen = [f for f in fields(cls) if f.name not in set(exclude)]
    if only is not None:
        wanted = list(only)
        unknown = set(wanted) - {f.name for f in chosen}
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}.")
        chosen = [f for f in chosen if f.name in wanted]
    return [f for f in chosen if field_default(f) is not MISSING]


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    prefix: str = "",
    flags: Mapping[str, Sequence[str]] | None = None,
    defaults: Mapping[str, Any] | None = None,
    default_text: Mapping[str, str] | None = None,
    choices: Mapping[str, Sequence[Any]] | None = None,
) -> None:
    """Add one option per field of dataclass ``cls`` that has a default.

    ``--<prefix-><field-name>`` (dest ``<prefix_><field_name>``) unless ``flags`` names the
    option strings; the option's default is the field's unless ``defaults`` overrides it
    (e.g. ``None``: "the kind's default", described by ``default_text``); ``choices``
    limits a field's values. Booleans get ``--x/--no-x``; tuples take comma-separated values.
    """
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    flags, defaults, default_text = dict(flags or {}), dict(defaults or {}), dict(default_text or {})
    choices = dict(choices or {})
    for f in _selected(cls, only, exclude):
        name = f"{prefix}-{f.name}" if prefix else f.name
        strings = list(flags.get(f.name) or [f"--{name.replace('_', '-')}"])
        default = defaults.get(f.name, field_default(f))
        kind, many = _scalar(hints[f.name])
        shown = default_text.get(f.name)
        if shown is None and default is not None:
            shown = _shown(default)
        text = helps.get(f.name, "").replace("%", "%%")
        if kind is bool and not many:
            shown = "%(default)s"  # this also stops BooleanOptionalAction adding its own
        elif shown is not None:
            shown = shown.replace("%", "%%")
        if shown is not None and "default" not in text.lower():
            text = f"{text} (default: {shown})".strip()
        kwargs: dict[str, Any] = {"dest": name.replace("-", "_"), "default": default, "help": text}
        if kind is bool and not many:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif many:
            kwargs["type"] = _comma_list(kind, strings[0])
            kwargs["metavar"] = f"{kind.__name__.upper()}[,...]"
        else:
            kwargs["type"] = kind
        if f.name in choices:
            kwargs["choices"] = tuple(choices[f.name])
        parser.add_argument(*strings, **kwargs)


def config_values(
    cls: type,
    args: argparse.Namespace,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    prefix: str = "",
    skip_none: bool = False,
) -> dict[str, Any]:
    """Field name -> parsed value, for the fields :func:`add_config_options` added with the
    same ``only``/``exclude``/``prefix``; ``skip_none`` leaves out options not given whose
    default was overridden to ``None``."""
    values: dict[str, Any] = {}
    for f in _selected(cls, only, exclude):
        dest = (f"{prefix}_{f.name}" if prefix else f.name).replace("-", "_")
        value = getattr(args, dest)
        if not (skip_none and value is None):
            values[f.name] = value
    return values
