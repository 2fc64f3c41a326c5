"""The hidden-state probes: the three probe models, the registry of probe kinds, and
their training, offline scoring and CLI.

Every probe maps :class:`routers.backbone.BackboneStates` to one logit per request of
P(small model answers correctly). Low scores route to the large model.

- :mod:`~routers.probes.last_token`, :mod:`~routers.probes.attention`,
  :mod:`~routers.probes.relope`: the probe models, on :mod:`~routers.probes._base`, with the
  MLP head of :mod:`~routers.probes.mlp`.
- :mod:`~routers.probes.training`: ``switchyard train probe``'s loop.
- :mod:`~routers.probes.offline`: :class:`ProbeScorer`, the offline scoring of ``eval`` and
  ``calibrate`` (through the serving prefill's forward).
- :mod:`~routers.probes.cli`: ``train probe``, and the probe side of ``eval`` and ``calibrate``.

This package imports torch (the registry builds probe modules). The serving scorer is
:mod:`routers.serving.probe_scorer`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from routers.probes._base import Probe
from routers.probes.attention import AttentionProbe, AttentionProbeConfig
from routers.probes.last_token import LastTokenProbe, LastTokenProbeConfig
from routers.probes.relope import ReLope, ReLopeConfig

__all__ = [
    "PROBE_KINDS",
    "AttentionProbe",
    "AttentionProbeConfig",
    "LastTokenProbe",
    "LastTokenProbeConfig",
    "Probe",
    "ReLope",
    "ReLopeConfig",
    "build_probe",
    "probe_config_class",
]

#: kind -> (probe class, config class), in the order the CLI lists them.
PROBE_KINDS: dict[str, tuple[type[Probe], type]] = {
    "last_token": (LastTokenProbe, LastTokenProbeConfig),
    "attention": (AttentionProbe, AttentionProbeConfig),
    "relope": (ReLope, ReLopeConfig),
}


def probe_config_class(kind: str) -> type:
    try:
        return PROBE_KINDS[kind][1]
    except KeyError:
        raise ValueError(f"Unknown probe kind {kind!r}; supported: {', '.join(PROBE_KINDS)}.") from None


def build_probe(kind: str, config: Any, layer_module: nn.Module | None = None) -> Probe:
    """A fresh probe of ``kind``; ReLope also needs the backbone's layer ``config.layer``."""
    probe_config_class(kind)
    cls = PROBE_KINDS[kind][0]
    if cls is ReLope:
        if layer_module is None:
            raise ValueError("A ReLope probe needs the backbone's decoder layer to adapt.")
        return ReLope(config, layer_module)
    return cls(config)
