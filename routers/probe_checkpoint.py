"""Probe checkpoints: a folder with ``config.json`` and ``model.safetensors``.

``config.json``::

    {"format_version": 1, "kind": "relope",
     "backbone": {"path", "layer", "model_type", "hidden_size", "num_layers", "fingerprint"},
     "probe": {...the probe config...},
     "training": {...hyperparameters, small backend, train_data_hash, val AUC...},
     "thresholds": [{"large_share": 0.2, "threshold": 0.41, "data": ..., "data_hash": ...}]}

A probe scores P(small model correct); requests scoring *below* a threshold go to the large
model. Loading checks that the backbone given is the one the probe was trained on (same
architecture and the same weights fingerprint at the probe layer); its path may differ.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc._errors import CheckpointError
from routers.checkpoint_config import CONFIG_FILE, read_checkpoint_config

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "ProbeCheckpoint",
    "read_checkpoint",
    "save_probe",
    "load_probe",
    "load_backbone",
    "store_threshold",
]

WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
_MATCHED = ("model_type", "hidden_size", "num_layers", "layer", "fingerprint")


@dataclass
class ProbeCheckpoint:
    """The parsed ``config.json`` of a probe checkpoint (no weights)."""

    folder: Path
    kind: str
    backbone: dict[str, Any]
    probe: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    thresholds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def layer(self) -> int:
        return int(self.backbone["layer"])

    def threshold(self, large_share: float | None = None) -> float:
        """The calibrated threshold for ``large_share`` (default: the only/last one stored)."""
        if not self.thresholds:
            raise CheckpointError(f"{self.folder} has no calibrated threshold; run `switchyard calibrate`.")
        if large_share is None:
            return float(self.thresholds[-1]["threshold"])
        for entry in self.thresholds:
            if abs(float(entry["large_share"]) - large_share) < 1e-9:
                return float(entry["threshold"])
        shares = ", ".join(str(e["large_share"]) for e in self.thresholds)
        raise CheckpointError(f"{self.folder} has no threshold for large share {large_share}; it has {shares}.")

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "backbone": self.backbone,
            "probe": self.probe,
            "training": self.training,
            "thresholds": self.thresholds,
        }


def read_checkpoint(folder: str | Path) -> ProbeCheckpoint:
    """Parse ``folder/config.json``; :class:`CheckpointError` naming the problem."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    data = read_checkpoint_config(folder)
    from routers.probes import PROBE_KINDS

    kind = data.get("kind")
    if kind not in PROBE_KINDS:
        raise CheckpointError(f"{path}: `kind` must be one of {', '.join(PROBE_KINDS)}, got {kind!r}.")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported `format_version` {data.get('format_version')!r}.")
    for key in ("backbone", "probe"):
        if not isinstance(data.get(key), dict):
            raise CheckpointError(f"{path}: `{key}` must be an object.")
    missing = [k for k in ("path", *_MATCHED) if k not in data["backbone"]]
    if missing:
        raise CheckpointError(f"{path}: `backbone` lacks {', '.join(missing)}.")
    return ProbeCheckpoint(
        folder=folder,
        kind=kind,
        backbone=data["backbone"],
        probe=data["probe"],
        training=data.get("training") or {},
        thresholds=list(data.get("thresholds") or []),
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def save_probe(
    folder: str | Path,
    probe: Any,
    backbone: Any,
    *,
    training: dict[str, Any] | None = None,
    thresholds: list[dict[str, Any]] | None = None,
) -> ProbeCheckpoint:
    """Write ``probe`` (trained on ``backbone``) to ``folder`` (created if needed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = ProbeCheckpoint(
        folder=folder,
        kind=probe.kind,
        backbone=backbone.describe(probe.layer),
        probe=probe.config.to_dict(),
        training=dict(training or {}),
        thresholds=list(thresholds or []),
    )
    state = {k: v.detach().float().contiguous().cpu() for k, v in probe.saved_state().items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model.", suffix=".safetensors")
    os.close(fd)
    save_file(state, tmp, metadata={"kind": probe.kind})
    os.replace(tmp, folder / WEIGHTS_FILE)
    _write_json(folder / CONFIG_FILE, checkpoint.to_json())
    return checkpoint


def check_backbone(checkpoint: ProbeCheckpoint, backbone: Any) -> None:
    """Raise :class:`CheckpointError` unless ``backbone`` is the one the probe was trained on."""
    if checkpoint.layer > len(backbone._layer_list):
        raise CheckpointError(
            f"Checkpoint {checkpoint.folder} reads layer {checkpoint.layer}, but backbone "
            f"{backbone.source} keeps only {len(backbone._layer_list)} layers."
        )
    given = backbone.describe(checkpoint.layer)
    wanted = checkpoint.backbone
    differ = [k for k in _MATCHED if str(given[k]) != str(wanted[k])]
    if differ:
        detail = "; ".join(f"{k}: trained on {wanted[k]!r}, given {given[k]!r}" for k in differ)
        raise CheckpointError(
            f"Checkpoint {checkpoint.folder} was trained on backbone {wanted['path']}, which does not "
            f"match backbone {given['path']} ({detail})."
        )


def load_probe(folder: str | Path, backbone: Any) -> tuple[Any, ProbeCheckpoint]:
    """Load the probe in ``folder`` onto ``backbone`` (checked to match), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from routers.probes import build_probe, probe_config_class

    checkpoint = read_checkpoint(folder)
    check_backbone(checkpoint, backbone)
    try:
        config = probe_config_class(checkpoint.kind).from_dict(checkpoint.probe)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint.folder / CONFIG_FILE}: bad `probe` section: {exc}") from exc
    probe = build_probe(checkpoint.kind, config, backbone.layer_module(config.layer))
    try:
        state = load_file(str(checkpoint.folder / WEIGHTS_FILE))
        probe.load_saved_state(state)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{checkpoint.folder / WEIGHTS_FILE} does not exist.") from exc
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"Cannot load {checkpoint.folder / WEIGHTS_FILE}: {exc}") from exc
    probe.to(backbone.device)
    return probe.eval(), checkpoint


def load_backbone(checkpoints: list[ProbeCheckpoint], **runtime: Any) -> Any:
    """The backbone the checkpoints were trained on, kept up to their deepest layer.

    ``runtime`` holds :class:`BackboneConfig` runtime fields (device, dtype, max_tokens, ...).
    """
    from routers.backbone import BackboneConfig, TruncatedBackbone

    paths = {c.backbone["path"] for c in checkpoints}
    if len(paths) != 1:
        raise CheckpointError(f"Probes scored together must share one backbone; got {sorted(paths)}.")
    layer = max(c.layer for c in checkpoints)
    runtime = {k: v for k, v in runtime.items() if v is not None}
    return TruncatedBackbone(BackboneConfig(path=paths.pop(), layer=layer, **runtime))


def store_threshold(folder: str | Path, entry: dict[str, Any]) -> ProbeCheckpoint:
    """Add (or replace, for the same ``large_share``) a calibrated threshold in config.json."""
    checkpoint = read_checkpoint(folder)
    share = float(entry["large_share"])
    checkpoint.thresholds = [t for t in checkpoint.thresholds if abs(float(t["large_share"]) - share) > 1e-9]
    checkpoint.thresholds.append(entry)
    _write_json(checkpoint.folder / CONFIG_FILE, checkpoint.to_json())
    return checkpoint
