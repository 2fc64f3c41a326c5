"""Limits the shipped Envoy configuration and the policy must agree on, declared once.

The Envoy renderer writes them into the config; the policy checker compares scorer deadlines
with them.
"""

from __future__ import annotations

__all__ = ["MESSAGE_TIMEOUT_MS"]

#: ext_proc ``message_timeout``: how long Envoy waits for switchyard's answer to each message
#: (the headers, then the buffered body) before failing the request closed with a 504.
#: switchyard's cheap-signal answer takes well under 1 ms, but a policy with learned scorers
#: answers the body only after its scorers (each bounded by its ``deadline_ms``, 80 by
#: default, up to a few hundred ms); 1 s leaves room for those plus a Python process's rare
#: stalls (first request, GC). Scorer deadlines must stay below it, so that a missed deadline
#: gives the policy's fallback, not a 504.
MESSAGE_TIMEOUT_MS = 1000
