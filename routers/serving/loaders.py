"""The ``switchyard.scorers`` entry points: ``probe`` and ``latent_router`` loaders.

``describe(spec)`` reads the checkpoints' ``config.json`` only (importing this module and
describing never imports torch), for ``policy check``. ``load(spec)`` loads the models
(blocking; the server calls it off the event loop):

- ``probe``: every checkpoint of the spec must have been trained on one backbone; it is
  loaded once (up to the deepest probe layer, with the spec's device and dtype and the
  checkpoints' saved truncation) and each probe's weights fingerprint is checked against it.
- ``latent_router``: with a ``backbone`` encoder, the backbone is shared with the probe
  scorers already loaded on it in this process (same path, device, dtype and truncation),
  and so is each request's prefill; other encoders are loaded with the router.

See :mod:`routers.serving.prefill` for what is shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from extproc import CheckpointError, ScorerDescription, ScorerSpec
from routers.checkpoints import CONFIG_FILE, CheckpointConfig, read_config

__all__ = ["ProbeLoader", "LatentRouterLoader", "PROBE_LOADER", "LATENT_ROUTER_LOADER"]


def _backbone_identity(config: CheckpointConfig) -> str:
    """What must agree between scorers sharing a backbone: its path, its whole-model weights
    fingerprint (the per-layer ``fingerprint`` differs between layers of one model) and how
    prompts are cut."""
    backbone = config.backbone
    weights = backbone.model_fingerprint or f"{backbone.model_type}, {backbone.num_layers} layers"
    cut = f", {config.max_tokens} tokens" if config.max_tokens is not None else ""
    return f"{backbone.path} ({weights}{cut})"


def _truncation_fields(config: CheckpointConfig) -> tuple[tuple[str, int], ...]:
    """The checkpoint's truncation as :class:`routers.backbone.BackboneConfig` fields."""
    if config.truncation is None:
        return ()
    return (("head_tokens", config.truncation.head), ("max_tokens", config.truncation.max_tokens))


def _load_backbone(key: Any, layer: int) -> Any:
    from routers.backbone import BackboneConfig, TruncatedBackbone

    return TruncatedBackbone(
        BackboneConfig(path=key.path, layer=layer, device=key.device, dtype=key.dtype, **dict(key.truncation))
    )


def _kind(config: CheckpointConfig, want: str, spec: ScorerSpec) -> CheckpointConfig:
    if config.scorer_kind != want:
        raise CheckpointError(
            f"{config.folder / CONFIG_FILE}: a {config.kind} checkpoint cannot serve scorer "
            f"{spec.name!r} (kind: {want}); use kind: {config.scorer_kind}."
        )
    return config


class ProbeLoader:
    """``kind: probe``: named probe checkpoints on one shared backbone prefill."""

    def _configs(self, spec: ScorerSpec) -> dict[str, CheckpointConfig]:
        if not spec.checkpoints:
            raise CheckpointError(f"Scorer {spec.name!r} names no probe checkpoints.")
        return {output: _kind(read_config(folder), "probe", spec) for output, folder in spec.checkpoints}

    def describe(self, spec: ScorerSpec) -> ScorerDescription:
        configs = self._configs(spec)
        return ScorerDescription(
            outputs=tuple(configs),
            backbones={output: _backbone_identity(c) for output, c in configs.items()},
            thresholds={output: {t.large_share: t.threshold for t in c.thresholds} for output, c in configs.items()},
        )

    def load(self, spec: ScorerSpec) -> Any:
        from routers.checkpoints import load_probe
        from routers.serving.prefill import BackboneKey, ProbeMember, acquire_group
        from routers.serving.probe_scorer import ProbeSetScorer

        configs = self._configs(spec)
        identities = {_backbone_identity(c) for c in configs.values()}
        if len(identities) != 1:
            raise CheckpointError(
                f"Scorer {spec.name!r}: probes scored together must share one backbone and token limit; "
                f"got {'; '.join(sorted(identities))}."
            )
        first = next(iter(configs.values()))
        key = BackboneKey.of(first.backbone.path, spec.device, spec.dtype, _truncation_fields(first))
        layer = max(c.layer for c in configs.values())

        def member(backbone: Any) -> ProbeMember:
            return ProbeMember({output: load_probe(c.folder, backbone)[0] for output, c in configs.items()})

        group, joined = acquire_group(key, layer, spec.batch, spec.images, _group_name(key), _load_backbone, member)
        return ProbeSetScorer(spec, group, joined)


class LatentRouterLoader:
    """``kind: latent_router``: one LatentRouter checkpoint; scores every pool model."""

    def _config(self, spec: ScorerSpec) -> CheckpointConfig:
        if not spec.checkpoint:
            raise CheckpointError(f"Scorer {spec.name!r} names no LatentRouter checkpoint.")
        return _kind(read_config(spec.checkpoint), "latent_router", spec)

    def describe(self, spec: ScorerSpec) -> ScorerDescription:
        config = self._config(spec)
        names = tuple(m.name for m in config.pool)
        backbones = {}
        if config.encoder.get("kind") == "backbone" and config.backbone is not None:
            backbones = dict.fromkeys(names, _backbone_identity(config))
        lambdas = {c.large_share: (c.lam, c.large) for c in config.lambdas}
        return ScorerDescription(outputs=names, backbones=backbones, pool=names, lambdas=lambdas)

    def load(self, spec: ScorerSpec) -> Any:
        from routers.checkpoints import load_latent_router
        from routers.serving.latent_scorer import LatentScorer
        from routers.serving.prefill import BackboneKey, PooledMember, acquire_group

        config = self._config(spec)
        if config.encoder.get("kind") != "backbone":
            return LatentScorer(spec, load_latent_router(config.folder, device=spec.device))
        layer, model = config.encoder.get("layer"), config.encoder.get("model")
        if not isinstance(layer, int) or not isinstance(model, str):
            raise CheckpointError(f"{config.folder / CONFIG_FILE}: the `backbone` encoder needs `model` and `layer`.")
        key = BackboneKey.of(model, spec.device, spec.dtype, _truncation_fields(config))
        loaded: dict[str, Any] = {}

        def member(backbone: Any) -> PooledMember:
            # checks the weights fingerprint and the truncation against the shared backbone
            loaded["router"] = load_latent_router(config.folder, device=spec.device, backbone=backbone)
            return PooledMember(layer)

        group, joined = acquire_group(key, layer, spec.batch, spec.images, _group_name(key), _load_backbone, member)
        return LatentScorer(spec, loaded["router"], group, joined)


def _group_name(key: Any) -> str:
    return f"backbone {Path(key.path).name!r} prefill"


PROBE_LOADER = ProbeLoader()
LATENT_ROUTER_LOADER = LatentRouterLoader()
