"""Lazy re-export of a package's public names, shared by ``extproc`` and ``routers``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``, which re-exports
    ``exports`` (public name -> module that defines it) lazily: a name's module is imported
    when the name is first used, and the value is then kept in ``namespace`` (the package's
    ``globals()``). Use: ``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
