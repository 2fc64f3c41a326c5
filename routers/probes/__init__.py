"""The three hidden-state probes, one module each, and the registry of probe kinds.

Every probe maps :class:`routers.backbone.BackboneStates` to one logit per request of
P(small model answers correctly). Low scores route to the large model.
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
