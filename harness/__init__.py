"""The process harness: the local stack (demo backends, switchyard, Envoy) as child processes.

``python -m demo.run``, tests/integration, tests/charts and the benches start their processes
through it: :class:`Stack` for the whole stack on loopback ports, :class:`Child` and the
readiness probes for anything else, :func:`write_envoy_config` for the Envoy bootstrap that
``switchyard envoy render`` writes, with loopback ports.
"""

from harness.envoy_config import LOOPBACK, render_envoy_config, write_envoy_config
from harness.processes import (
    ROOT,
    Child,
    StackError,
    envoy_binary,
    free_port,
    grpc_serving,
    http_ok,
    port_in_use,
)
from harness.stack import Ports, Stack, policy_backends

__all__ = [
    "LOOPBACK", "ROOT", "Child", "Ports", "Stack", "StackError", "envoy_binary", "free_port", "grpc_serving",
    "http_ok", "policy_backends", "port_in_use", "render_envoy_config", "write_envoy_config",
]
