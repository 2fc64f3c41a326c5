"""The fleet-state package's error (a branch of ``extproc``'s ``SwitchyardError`` tree)."""

from __future__ import annotations

from extproc._errors import SwitchyardError

__all__ = ["StateConfigError"]


class StateConfigError(SwitchyardError, ValueError):
    """The ``state:`` section is invalid, or the store it names cannot be built (a password
    variable that is not set, redis-py missing). A store that fails at run time raises nothing:
    :class:`~extproc.state.FallbackStore` answers in process instead."""
