"""switchyard's learned scorers: truncated backbone, hidden-state probes, LatentRouter.

``import routers`` is cheap: nothing here imports torch. Public names are re-exported
lazily from :data:`_EXPORTS` (name -> private module), so torch, transformers and peft load
only when a name that needs them is first used. To export a new name, add one entry.
"""

from __future__ import annotations

from extproc import lazy_exports

#: Public name -> module that defines it. Append here to export more.
_EXPORTS: dict[str, str] = {
    # labelled data
    "DataError": "routers.data",
    "Outcome": "routers.data",
    "LabelledRequest": "routers.data",
    "load_labelled": "routers.data",
    "dataset_hash": "routers.data",
    # metrics
    "roc_auc": "routers.metrics",
    "routing_curve": "routers.metrics",
    "curve_shares": "routers.metrics",
    "apgr": "routers.metrics",
    "cpt": "routers.metrics",
    "threshold_for_share": "routers.metrics",
    # backbone and probes
    "BackboneConfig": "routers.backbone",
    "BackboneOutput": "routers.backbone",
    "BackboneStates": "routers.backbone",
    "TruncatedBackbone": "routers.backbone",
    "MLPConfig": "routers.probes.mlp",
    "Probe": "routers.probes",
    "LastTokenProbe": "routers.probes",
    "LastTokenProbeConfig": "routers.probes",
    "AttentionProbe": "routers.probes",
    "AttentionProbeConfig": "routers.probes",
    "ReLope": "routers.probes",
    "ReLopeConfig": "routers.probes",
    "build_probe": "routers.probes",
    # checkpoints (probes and LatentRouter; read_config needs no torch)
    "CheckpointConfig": "routers.checkpoints",
    "BackboneIdentity": "routers.checkpoints",
    "Threshold": "routers.checkpoints",
    "PoolModel": "routers.checkpoints",
    "read_config": "routers.checkpoints",
    "ProbeCheckpoint": "routers.checkpoints",
    "read_checkpoint": "routers.checkpoints",
    "save_probe": "routers.checkpoints",
    "load_probe": "routers.checkpoints",
    "Truncation": "routers.truncation",
    "ProbeScorer": "routers.probes.offline",
    "TrainConfig": "routers.probes.training",
    "TrainResult": "routers.probes.training",
    "train_probe": "routers.probes.training",
    # LatentRouter
    "LatentRouter": "routers.latent.router",
    "LatentRouterConfig": "routers.latent.router",
    "LatentRouterModel": "routers.latent.router",
    "ModelPool": "routers.latent.router",
    "EncoderSpec": "routers.latent.encoders",
    "build_encoder": "routers.latent.encoders",
    "LatentTrainConfig": "routers.latent.training",
    "train_latent_router": "routers.latent.training",
    "save_latent_router": "routers.checkpoints",
    "load_latent_router": "routers.checkpoints",
    "evaluate_router": "routers.latent.evaluation",
    # serving in process
    "MicroBatcher": "routers.serving.batcher",
    "ProbeSetScorer": "routers.serving.probe_scorer",
    "LatentScorer": "routers.serving.latent_scorer",
    "load_image": "routers.serving.images",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
