"""Limits the shipped Envoy configuration and the policy must agree on, declared once.

The Envoy renderer writes them into the config; the policy checker compares scorer deadlines
with them.
"""

from __future__ import annotations

__all__ = ["MESSAGE_TIMEOUT_MS"]

#: ext_proc ``message_timeout`` of the shipped configs: the longest Envoy waits for one
#: answer. A scorer deadline must stay below it so a miss gives the policy's fallback, not a 504.
MESSAGE_TIMEOUT_MS = 1000
