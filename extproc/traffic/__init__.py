"""Fleet-level traffic decisions around the engine's decision: conversation stickiness
(``_sessions``), money budgets and the large-share controller (``_budgets``, ``_share``),
backend health (``_health``), and the fleet-state store they share (``_fleet``).

Layer: below ``server`` (which builds them once per process and hooks them into the
servicer) and above ``scoring`` / ``engine`` (whose decisions they wrap). Each feature keeps
a policy that does not use it on the engine's synchronous path.
"""
