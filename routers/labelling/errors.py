"""The error ``switchyard label`` raises for bad input it can name (``file:line``)."""

from __future__ import annotations

from extproc import SwitchyardError

__all__ = ["LabelError"]


class LabelError(SwitchyardError):
    """A prompt file, output file, key or endpoint ``switchyard label`` cannot use; the
    message names the file (and line) or the config key. Config problems located as
    ``file:line:column`` are :class:`extproc.PolicyError`."""
