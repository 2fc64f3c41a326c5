"""Saving and loading LatentRouter checkpoints.

A checkpoint is a folder (DESIGN.md): ``config.json`` with ``kind = "latent_router"``, the
query encoder (kind and model id/path), every hyperparameter, the pool (names, profiles,
costs) and the training-set hash; ``model.safetensors`` with the weights and the feature
standardisation buffers.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from extproc._errors import CheckpointError
from routers.checkpoint_config import CONFIG_FILE, read_checkpoint_config
from routers.latent_router import LatentRouter, LatentRouterConfig, LatentRouterModel, ModelPool
from routers.query_encoders import EncoderSpec, build_encoder

__all__ = ["KIND", "FORMAT_VERSION", "save_latent_router", "load_latent_router"]

KIND = "latent_router"
FORMAT_VERSION = 1


def save_latent_router(router: LatentRouter, out: str | Path, training_set_hash: str | None = None) -> Path:
    """Write ``router`` to the folder ``out`` (created if needed); returns the folder."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "encoder": asdict(router.encoder.spec),
        "model": asdict(router.model.config),
        "pool": asdict(router.pool),
        "training_set_hash": training_set_hash,
        **{k: v for k, v in router.extra.items() if k not in ("kind", "format_version", "encoder", "model", "pool")},
    }
    if router.encoder.spec.kind == "backbone" and hasattr(router.encoder, "backbone"):
        try:
            config["backbone"] = router.encoder.backbone.describe()
        except Exception:  # noqa: BLE001 - description is informative only
            pass
    state = {k: v.detach().contiguous().cpu() for k, v in router.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"kind": KIND})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def load_latent_router(
    folder: str | Path, device: str | torch.device | None = None, encoder: Any = None, backbone: Any = None
) -> LatentRouter:
    """Load a checkpoint folder; ``CheckpointError`` naming the problem if it is bad.

    ``encoder`` (an already-built query encoder) or ``backbone`` (a loaded
    TruncatedBackbone, for the ``backbone`` encoder) can be passed in to share them.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    config = read_checkpoint_config(folder)
    if config.get("kind") != KIND:
        raise CheckpointError(f"{config_path} has kind {config.get('kind')!r}, expected {KIND!r}.")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format_version {config.get('format_version')!r}; this switchyard reads {FORMAT_VERSION}."
        )
    try:
        model_cfg = LatentRouterConfig(**config["model"])
        pool = ModelPool(**config["pool"])
        spec = EncoderSpec(**config["encoder"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path} has a bad or missing section: {exc}") from exc
    if len(pool.names) != model_cfg.num_models or len(pool.profile_fields) != model_cfg.profile_dim:
        raise CheckpointError(f"{config_path}: the pool does not match `model.num_models` / `model.profile_dim`.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    model = LatentRouterModel(model_cfg)
    try:
        state = load_file(str(folder / "model.safetensors"))
        model.load_state_dict(state, strict=True)
    except (FileNotFoundError, SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"Cannot load weights from {folder / 'model.safetensors'}: {exc}") from exc
    model.to(dev).eval()
    if encoder is None:
        encoder = build_encoder(spec, device=dev, backbone=backbone)
    if encoder.dim != model_cfg.input_dim:
        raise CheckpointError(
            f"The {spec.kind} encoder gives {encoder.dim} features but the checkpoint expects {model_cfg.input_dim}."
        )
    extra = {k: v for k, v in config.items() if k not in ("kind", "format_version", "encoder", "model", "pool")}
    return LatentRouter(model, encoder, pool, extra)
