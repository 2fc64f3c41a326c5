"""The Envoy config of the local stack: ``switchyard envoy render`` with loopback ports.

A thin caller of the product renderer (:mod:`extproc.envoy._render`), so the demo, the
integration tests and the benches run exactly the configuration users render: every
backend of the policy on 127.0.0.1 at its own port, Envoy and switchyard on the ports given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from extproc.envoy._render import Address, EnvoyOptions, Upstream, render_envoy
from extproc.policy._model import Policy
from extproc.policy._loading import load_policy

__all__ = ["LOOPBACK", "render_envoy_config", "write_envoy_config"]

LOOPBACK = "127.0.0.1"


def _rendered(policy: Path | Policy, *, listen_port: int, admin_port: int, extproc_port: int,
              backends: dict[str, int], max_body_bytes: int | None = None, access_log: bool = True,
              fail_open: bool = False, envoy_options: dict[str, Any] | None = None):
    policy = policy if isinstance(policy, Policy) else load_policy(policy)
    options = EnvoyOptions(
        listen=Address(LOOPBACK, listen_port), admin=Address(LOOPBACK, admin_port),
        extproc=Address(LOOPBACK, extproc_port), access_log=access_log, body_limit=max_body_bytes,
        fail_open=fail_open, **(envoy_options or {}),
    )
    return render_envoy(policy, {name: Upstream(Address(LOOPBACK, port)) for name, port in backends.items()}, options)


def render_envoy_config(policy: Path | Policy, **kwargs: Any) -> dict[str, Any]:
    """The bootstrap (a dict) for ``policy`` with ``backends`` (backend name -> loopback port).

    ``max_body_bytes`` overrides Envoy's body buffer limit (default: the renderer's, from the
    policy's ``routing.max_body_bytes``); ``fail_open`` renders ``envoy render --fail-open``;
    ``envoy_options``: more :class:`EnvoyOptions` fields (e.g. ``outlier``).
    """
    return _rendered(policy, **kwargs).bootstrap


def write_envoy_config(path: Path, policy: Path | Policy, **kwargs: Any) -> Path:
    """Render (see :func:`render_envoy_config`) and write the YAML to ``path``; returns ``path``."""
    return _rendered(policy, **kwargs).write(path, "Rendered for the local stack by harness/envoy_config.py.")
