"""What switchyard and its Envoy agree on, declared once: the headers and metadata namespace
switchyard answers with, and the limits the shipped Envoy configuration and the policy share.

The server sets the headers, the Envoy renderer routes on them and strips client-sent copies;
the renderer writes the limits into the config and the policy checker compares scorer
deadlines with them.
"""

from __future__ import annotations

__all__ = ["ROUTING_HEADER", "RULE_HEADER", "SESSION_HEADER", "HEADER_PREFIX", "METADATA_NAMESPACE", "FAILOVER_NAMESPACE",
           "FAILOVER_MODELS_KEY", "MODEL_SLOT", "SERVED_BY_HEADER", "BUDGET_KEY", "BUDGET_WINDOW", "BUDGET_CHARGED",
           "BUDGET_PRICE", "USAGE_FILTER", "MESSAGE_TIMEOUT_MS", "DEADLINE_MARGIN_MS"]

#: The header that names the chosen backend; Envoy's routes match on it.
ROUTING_HEADER = "x-switchyard-backend"
#: The header that names the rule that decided (added to the response from the metadata).
RULE_HEADER = "x-switchyard-rule"
#: The header that says what a session's pin did (``pinned``, ``new``, ``moved``), added to the
#: response from the metadata when the policy has ``sessions:``.
SESSION_HEADER = "x-switchyard-session"
#: Every header switchyard sets starts so; Envoy removes client-sent ones before routing.
HEADER_PREFIX = "x-switchyard-"
#: The dynamic-metadata namespace of the decision.
METADATA_NAMESPACE = "switchyard"
#: Failover (``backends.<name>.fallbacks``): the namespace of the ordered attempts, read by the
#: routes' ``priority_group`` cluster specifier (``{priority_groups: [{name, clusters: [...]}]}``).
FAILOVER_NAMESPACE = "switchyard.failover"
#: Failover: the ``switchyard`` metadata key holding cluster -> that attempt's ``model`` as JSON
#: text, read by each backend cluster's upstream Lua filter.
FAILOVER_MODELS_KEY = "attempt_models"
#: Failover: the ``model`` value switchyard sends when a request has fallbacks; each cluster's
#: upstream Lua filter replaces its JSON text (``json.dumps`` of it) with that attempt's model.
MODEL_SLOT = "\x00switchyard-model"
#: The response header naming the cluster that actually answered (``%UPSTREAM_CLUSTER%``); with
#: failover it can differ from ``x-switchyard-backend``, the first choice.
SERVED_BY_HEADER = "x-switchyard-served-by"
#: Budgets (``budgets:``): the ``switchyard`` metadata keys of a request's charge, set by the body
#: answer of a charged request and forwarded by the usage filter (:data:`USAGE_FILTER`) with the
#: response, so switchyard can correct the charge from the response's ``usage``: the budget's
#: store key, the window it was charged to (``<window_s>:<index>``), the money charged, and the
#: price it was charged at (``<input_per_mtok>,<output_per_mtok>``). Numbers are Python ``repr``.
BUDGET_KEY = "budget_key"
BUDGET_WINDOW = "budget_window"
BUDGET_CHARGED = "budget_charged"
BUDGET_PRICE = "budget_price"
#: Budgets: the name of the second, observe-only ext_proc filter the renderer adds when the
#: policy has ``budgets:``; it sends switchyard the response (headers, body) with the charge.
USAGE_FILTER = "switchyard.usage"

#: ext_proc ``message_timeout``: how long Envoy waits for switchyard's answer to each message
#: (the headers, then the buffered body) before failing the request closed with a 504.
#: switchyard's cheap-signal answer takes well under 1 ms, but a policy with learned scorers
#: answers the body only after its scorers (each bounded by its ``deadline_ms``, 150 by
#: default, up to a few hundred ms); 1 s leaves room for those plus a Python process's rare
#: stalls (first request, GC). Scorer deadlines must stay below it, so that a missed deadline
#: gives the policy's fallback, not a 504.
MESSAGE_TIMEOUT_MS = 1000

#: The least time ``policy check`` keeps between a scorer's ``deadline_ms`` and
#: ``MESSAGE_TIMEOUT_MS``: ``deadline_ms + DEADLINE_MARGIN_MS <= MESSAGE_TIMEOUT_MS``. After a
#: missed deadline switchyard still decides again with the fallback, builds the mutation and
#: sends it, and Envoy receives it; that takes about 1 ms at p50 on a quiet sidecar (the
#: request-path measurement in docs/benchmarks.md), but on a busy 2-core sidecar the event loop also
#: queues behind other requests' work and the occasional GC pause: a 999 ms deadline against
#: the 1 s timeout gave 62 504s in 96 requests at 16 concurrent clients. Measured with
#: bench/deadline.py (8 clients on a 2-core sidecar, through Envoy): requests at an 80 ms
#: deadline, most of them answered at or after it, came back at p99 89 ms end to end, so
#: answering after a miss cost at most about 9 ms there; 50 ms is more than 5x that. Raise it
#: if 504s show at deadlines that pass the check.
DEADLINE_MARGIN_MS = 50
