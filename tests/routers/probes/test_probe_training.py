"""Each probe learns a planted signal on CPU: a trigger word (text), dark images
(multimodal), and maths-vs-chit-chat on the real pretrained MiniLM encoder."""

from __future__ import annotations

import pytest
import torch

from routers.backbone import BackboneConfig, TruncatedBackbone
from routers.data import DataError
from routers.metrics import roc_auc
from routers.probes import AttentionProbeConfig, LastTokenProbeConfig, ReLopeConfig, build_probe
from routers.probes.mlp import MLPConfig
from routers.probes.offline import ProbeScorer
from routers.probes.training import TrainConfig, labels_for, train_probe
from tests.routers.test_probe_support import (
    image_set,
    labelled,
    minilm_dir,
    tiny_text_model,
    tiny_vl_model,
    topic_set,
    trigger_set,
    vl_processor,
)

FAST = TrainConfig(epochs=8, batch_size=16, lr=3e-3, patience=0, progress=False)


@pytest.fixture(scope="module")
def text_backbone(tmp_path_factory):
    return TruncatedBackbone(BackboneConfig(str(tiny_text_model(tmp_path_factory.mktemp("pt"))), layer=2))


def _held_out_auc(probe, backbone, test) -> float:
    scores = ProbeScorer(backbone, {"p": probe}).score([r.messages for r in test])["p"]
    return roc_auc(labels_for(test, "small"), scores)


def _config(kind: str, hidden: int, layer: int):
    small_mlp = MLPConfig(depth=3, width=64, dropout=0.0)
    if kind == "last_token":
        return LastTokenProbeConfig(hidden, layer, mlp=small_mlp)
    if kind == "attention":
        return AttentionProbeConfig(hidden, layer, mlp=small_mlp)
    return ReLopeConfig(hidden, layer, lora_rank=4, bottleneck=16, mlp=MLPConfig(depth=3, width=16, dropout=0.0))


@pytest.mark.parametrize("kind", ["last_token", "attention", "relope"])
def test_probe_learns_trigger_word(kind, text_backbone):
    train, test = labelled(trigger_set(160, seed=1)), labelled(trigger_set(64, seed=2))
    torch.manual_seed(0)
    probe = build_probe(kind, _config(kind, 32, 2), text_backbone.layer_module(2))
    result = train_probe(probe, text_backbone, train, "small", config=FAST)
    assert result.cached and len(result.history) == FAST.epochs
    assert _held_out_auc(probe, text_backbone, test) > 0.75


def test_attention_probe_learns_image_property(tmp_path):
    backbone = TruncatedBackbone(BackboneConfig(str(tiny_vl_model(tmp_path)), layer=2), processor=vl_processor())
    train, val, test = labelled(image_set(64, 1)), labelled(image_set(32, 2)), labelled(image_set(32, 3))
    torch.manual_seed(0)
    probe = build_probe("attention", _config("attention", 32, 2))
    result = train_probe(probe, backbone, train, "small", val, TrainConfig(epochs=6, lr=3e-3, patience=2, progress=False))
    assert result.best_val_auc is not None and result.best_val_auc > 0.8
    assert _held_out_auc(probe, backbone, test) > 0.8


def test_pre_routing_classifier_on_pretrained_minilm():
    backbone = TruncatedBackbone(BackboneConfig(str(minilm_dir()), layer=6))
    train, test = labelled(topic_set(96, 1)), labelled(topic_set(48, 2))
    torch.manual_seed(0)
    probe = build_probe("last_token", _config("last_token", backbone.hidden_size, 6))
    train_probe(probe, backbone, train, "small", config=TrainConfig(epochs=5, lr=3e-3, progress=False))
    assert _held_out_auc(probe, backbone, test) > 0.9


def test_early_stopping_keeps_best_epoch(text_backbone):
    train, val = labelled(trigger_set(64, 1)), labelled(trigger_set(32, 2))
    probe = build_probe("last_token", _config("last_token", 32, 2))
    result = train_probe(probe, text_backbone, train, "small", val, TrainConfig(epochs=30, lr=3e-2, patience=2, progress=False))
    assert len(result.history) < 30
    best = max(h["val_auc"] for h in result.history)
    assert result.best_val_auc == pytest.approx(best)
    assert _held_out_auc(probe, text_backbone, val) == pytest.approx(best)


def test_streams_when_cache_budget_is_too_small(text_backbone):
    train = labelled(trigger_set(32, 1))
    probe = build_probe("attention", _config("attention", 32, 2))
    result = train_probe(probe, text_backbone, train, "small", config=TrainConfig(epochs=1, cache_budget_gb=0, progress=False))
    assert not result.cached


def test_labels_need_correct():
    rows = trigger_set(2, 1)
    rows[1]["outcomes"]["small"] = {"score": 0.5}
    with pytest.raises(DataError, match=r"`outcomes.small.correct` is needed"):
        labels_for(labelled(rows), "small")
