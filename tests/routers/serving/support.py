"""Tiny checkpoints for the serving tests, saved the way training saves them (no tests here)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import torch

from extproc import BatchConfig, RoutingRequest, ScorerSpec
from routers.backbone import BackboneConfig, TruncatedBackbone
from routers.checkpoints import save_probe
from routers.probes import AttentionProbeConfig, LastTokenProbeConfig, ReLopeConfig, build_probe
from routers.probes.mlp import MLPConfig
from tests.routers.test_probe_support import labelled, trigger_set

__all__ = ["CONVERSATIONS", "POOL", "far", "latent_checkpoint", "latent_spec", "probe_checkpoints", "probe_spec", "request"]

CONVERSATIONS = [r.messages for r in labelled(trigger_set(64, seed=5))]


def far() -> float:
    return time.monotonic() + 60.0


def request(messages) -> RoutingRequest:
    return RoutingRequest.from_json({"model": "auto", "messages": messages})


def probe_checkpoints(model_dir: Path, out: Path, seed: int = 0) -> dict[str, Path]:
    """Three probes (last-token at layer 3, Attention Probe and ReLope at layer 2) with every
    trainable weight random and non-zero, saved as checkpoints under ``out``."""
    backbone = TruncatedBackbone(BackboneConfig(str(model_dir), layer=3))
    torch.manual_seed(seed)
    mlp = MLPConfig(depth=2, width=16)
    probes = {
        "last": build_probe("last_token", LastTokenProbeConfig(32, 3, mlp=mlp)),
        "attn": build_probe("attention", AttentionProbeConfig(32, 2, mlp=mlp)),
        "relope": build_probe(
            "relope", ReLopeConfig(32, 2, lora_rank=4, bottleneck=8, mlp=mlp), backbone.layer_module(2)
        ),
    }
    folders = {}
    for name, probe in probes.items():
        for _, param in probe.named_parameters():
            if param.requires_grad:
                torch.nn.init.normal_(param, std=0.3)
        folders[name] = out / name
        save_probe(folders[name], probe, backbone, thresholds=[{"large_share": 0.2, "threshold": 0.4}])
    return folders


def probe_spec(folders: dict[str, Path], name: str = "probe", **kw) -> ScorerSpec:
    kw.setdefault("batch", BatchConfig(max_size=16, max_wait_ms=20))
    return ScorerSpec(name=name, kind="probe", checkpoints=tuple((k, str(v)) for k, v in folders.items()), **kw)


POOL = ("tiny", "mid", "large")


def latent_checkpoint(out: Path, encoder_spec, backbone=None, seed: int = 0) -> Path:
    """A random-init LatentRouter over a three-model pool, saved as a checkpoint."""
    from routers.checkpoints import save_latent_router
    from routers.latent.encoders import build_encoder
    from routers.latent.router import LatentRouter, LatentRouterConfig, LatentRouterModel, ModelPool

    encoder = build_encoder(encoder_spec, backbone=backbone)
    torch.manual_seed(seed)
    model = LatentRouterModel(
        LatentRouterConfig(input_dim=encoder.dim, num_models=3, profile_dim=2, hidden_size=32, dropout=0.0)
    )
    with torch.no_grad():
        model.pair_bias.normal_(std=0.5)
        model.model_embedding.weight.normal_(std=0.5)
    pool = ModelPool(
        names=list(POOL),
        mean_cost=[0.1, 0.4, 2.0],
        cost_scale=2.0,
        profiles=[[0.3, 0.1], [0.6, 0.4], [0.9, 1.0]],
        profile_fields=["accuracy", "cost"],
    )
    return save_latent_router(LatentRouter(model.eval(), encoder, pool), out)


def latent_spec(folder: Path, name: str = "utility", **kw) -> ScorerSpec:
    kw.setdefault("batch", BatchConfig(max_size=16, max_wait_ms=20))
    backends = tuple((model, model) for model in POOL)
    return ScorerSpec(name=name, kind="latent_router", checkpoint=str(folder), backends=backends, **kw)


@contextlib.contextmanager
def forward_threads(backbone):
    """The thread of each ``backbone.states`` call (one per forward) while the block runs."""
    threads: list[int] = []
    original = backbone.states

    def states(*args, **kwargs):
        threads.append(threading.get_ident())
        return original(*args, **kwargs)

    backbone.states = states
    try:
        yield threads
    finally:
        del backbone.states
