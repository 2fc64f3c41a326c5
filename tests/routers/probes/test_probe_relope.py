"""ReLope: the KL term pulls the posterior to N(0, I), inference is deterministic, and only
LoRA, the heads and the MLP train (the backbone's weights never change)."""

from __future__ import annotations

import pytest
import torch

from routers.backbone import BackboneConfig, TruncatedBackbone
from routers.probes import ReLope, ReLopeConfig
from routers.probes.mlp import MLPConfig
from routers.probes.relope import kl_to_standard_normal
from routers.probes.training import TrainConfig, train_probe
from tests.routers.test_probe_support import labelled, tiny_text_model, trigger_set


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return TruncatedBackbone(BackboneConfig(str(tiny_text_model(tmp_path_factory.mktemp("rl"))), layer=2))


@pytest.fixture(scope="module")
def train_set():
    return labelled(trigger_set(64, seed=1))


def _relope(backbone, **overrides) -> ReLope:
    torch.manual_seed(0)
    config = ReLopeConfig(32, 2, lora_rank=4, bottleneck=8, mlp=MLPConfig(depth=2, width=8, dropout=0.0), **overrides)
    return ReLope(config, backbone.layer_module(2))


def _mean_kl(probe, backbone, requests) -> float:
    with torch.inference_mode():
        mu, logvar = probe.posterior(backbone.run([r.messages for r in requests], [2]).at(2))
    return kl_to_standard_normal(mu, logvar).mean().item()


def test_large_beta_pulls_posterior_to_standard_normal(backbone, train_set):
    config = TrainConfig(epochs=6, lr=1e-2, progress=False)
    weak, strong = _relope(backbone, beta=0.0), _relope(backbone, beta=10.0)
    before = _mean_kl(strong, backbone, train_set)
    train_probe(weak, backbone, train_set, "small", config=config)
    train_probe(strong, backbone, train_set, "small", config=config)
    after_strong, after_weak = _mean_kl(strong, backbone, train_set), _mean_kl(weak, backbone, train_set)
    assert after_strong < before
    assert after_strong < 0.2 * after_weak


def test_inference_is_deterministic_and_uses_mu(backbone, train_set):
    probe = _relope(backbone).eval()
    states = backbone.run([r.messages for r in train_set[:8]], [2]).at(2)
    with torch.inference_mode():
        first, second = probe(states), probe(states)
        mu, _ = probe.posterior(states)
        assert torch.equal(first, second)
        torch.testing.assert_close(first, probe.mlp(mu))
        probe.train()
        assert not torch.equal(probe(states), probe(states))  # z = mu + sigma * eps while training


def test_only_lora_heads_and_mlp_train(backbone, train_set):
    probe = _relope(backbone)
    backbone_before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    lora_before = {k: v.clone() for k, v in probe.named_parameters() if "lora_B" in k}
    trainable = {k for k, p in probe.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k or not k.startswith("layer_copy.") for k in trainable)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    train_probe(probe, backbone, train_set, "small", config=TrainConfig(epochs=2, lr=1e-2, progress=False))
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    lora_after = dict(probe.named_parameters())
    assert any(not torch.equal(lora_after[k], v) for k, v in lora_before.items())
    saved = probe.saved_state()
    assert any("lora_" in k for k in saved) and not any(k.startswith("layer_copy.") and "lora_" not in k for k in saved)


def test_default_targets_cover_attention_and_mlp(backbone):
    probe = _relope(backbone)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in probe.named_parameters() if ".lora_A" in n}
    assert {"layer_copy.self_attn.q_proj", "layer_copy.self_attn.o_proj", "layer_copy.mlp.down_proj"} <= adapted
    with pytest.raises(ValueError, match="match no linear module"):
        _relope(backbone, target_modules=("nope_proj",))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("lora_rank", 0, "`lora_rank` must be an integer >= 1, got 0"), ("beta", -1.0, "`beta` must be >= 0"), ("bottleneck", 1.5, "`bottleneck`")],
)
def test_config_validation_names_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ReLopeConfig(32, 2, **{field: value})


def test_documented_defaults():
    config = ReLopeConfig(hidden_size=32, layer=2)
    assert (config.lora_rank, config.lora_alpha, config.bottleneck, config.beta) == (16, 32.0, 128, 1e-3)
    assert config.target_modules is None and config.mlp.depth == 5
    assert TrainConfig().lr is None  # -> 1e-4 for relope (probe_training.DEFAULT_LR)
