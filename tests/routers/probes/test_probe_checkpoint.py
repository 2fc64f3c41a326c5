"""Save -> load gives identical scores; a mismatched backbone is refused; several probes
share one prefill; a non-finite score is a ScorerError."""

from __future__ import annotations

import json

import pytest
import torch

from extproc import CheckpointError, ScorerError
from routers.backbone import BackboneConfig, TruncatedBackbone
from routers.checkpoints import load_probe, read_checkpoint, save_probe, store_threshold
from routers.forward_cost import ForwardCost
from routers.probes import AttentionProbeConfig, LastTokenProbeConfig, ReLopeConfig, build_probe
from routers.probes.mlp import MLPConfig
from routers.probes.offline import ProbeScorer
from tests.routers.test_probe_support import labelled, tiny_text_model, trigger_set

#: A forward is all that costs: a batch runs as one padded forward (within its bounds).
ONE_FORWARD = ForwardCost(fixed=1.0, per_token=0.0)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("ck"))


@pytest.fixture(scope="module")
def backbone(text_dir):
    return TruncatedBackbone(BackboneConfig(str(text_dir), layer=3))


def _probes(backbone):
    torch.manual_seed(0)
    mlp = MLPConfig(depth=2, width=16)
    return {
        "last": build_probe("last_token", LastTokenProbeConfig(32, 3, mlp=mlp)),
        "attn": build_probe("attention", AttentionProbeConfig(32, 2, mlp=mlp)),
        "relope": build_probe("relope", ReLopeConfig(32, 2, lora_rank=4, bottleneck=8, mlp=mlp), backbone.layer_module(2)),
    }


CONVERSATIONS = [r.messages for r in labelled(trigger_set(20, seed=3))]


def test_save_load_gives_identical_scores(backbone, text_dir, tmp_path):
    probes = _probes(backbone)
    for probe in probes.values():  # make LoRA-B and the query non-zero so they matter
        for name, param in probe.named_parameters():
            if param.requires_grad:
                torch.nn.init.normal_(param, std=0.1)
    before = ProbeScorer(backbone, probes, batch_size=8).score(CONVERSATIONS)
    folders = {}
    for name, probe in probes.items():
        folders[name] = tmp_path / name
        save_probe(folders[name], probe, backbone, training={"small": "s"})
    config = json.loads((folders["relope"] / "config.json").read_text())
    assert config["kind"] == "relope" and config["backbone"]["layer"] == 2 and config["probe"]["lora_rank"] == 4
    # a fresh process would load the backbone from the recorded path
    after = ProbeScorer.from_checkpoints(folders, batch_size=5, cost=ONE_FORWARD).score(CONVERSATIONS)
    for name in probes:
        assert after[name] == pytest.approx(before[name], abs=1e-6)
        assert all(0.0 < p < 1.0 for p in after[name])


def test_mismatched_backbone_is_refused(backbone, tmp_path):
    probe = _probes(backbone)["relope"]
    save_probe(tmp_path / "ck", probe, backbone)
    other = TruncatedBackbone(BackboneConfig(str(tiny_text_model(tmp_path, seed=7)), layer=3))
    with pytest.raises(CheckpointError, match=r"does not match backbone .*fingerprint: trained on"):
        load_probe(tmp_path / "ck", other)
    shallow = TruncatedBackbone(BackboneConfig(backbone.source, layer=1))
    with pytest.raises(CheckpointError, match="keeps only 1 layers"):
        load_probe(tmp_path / "ck", shallow)


def test_corrupt_checkpoints_are_clear_errors(backbone, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing")
    probe = _probes(backbone)["last"]
    save_probe(tmp_path / "ck", probe, backbone)
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="Cannot load"):
        load_probe(tmp_path / "ck", backbone)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**config, "kind": "svm"}))
    with pytest.raises(CheckpointError, match="`kind` must be one of"):
        read_checkpoint(tmp_path / "ck")


def test_thresholds_are_stored_and_replaced(backbone, tmp_path):
    save_probe(tmp_path / "ck", _probes(backbone)["last"], backbone)
    with pytest.raises(CheckpointError, match="no calibrated threshold"):
        read_checkpoint(tmp_path / "ck").threshold()
    store_threshold(tmp_path / "ck", {"large_share": 0.2, "threshold": 0.3})
    store_threshold(tmp_path / "ck", {"large_share": 0.5, "threshold": 0.6})
    store_threshold(tmp_path / "ck", {"large_share": 0.2, "threshold": 0.4})
    checkpoint = read_checkpoint(tmp_path / "ck")
    assert checkpoint.threshold(0.2) == 0.4 and checkpoint.threshold(0.5) == 0.6 and len(checkpoint.thresholds) == 2


def test_probes_share_one_prefill(backbone):
    probes = _probes(backbone)
    calls = []
    handle = backbone.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        ProbeScorer(backbone, probes, batch_size=32, cost=ONE_FORWARD).score(CONVERSATIONS)
    finally:
        handle.remove()
    assert len(calls) == 1  # one truncated prefill for three probes on layers 2 and 3


def test_non_finite_score_is_scorer_error(backbone):
    probe = _probes(backbone)["last"]
    with torch.no_grad():
        probe.mlp.net[-1].bias.fill_(float("nan"))
    with pytest.raises(ScorerError, match="NaN or infinite"):
        ProbeScorer(backbone, {"p": probe}).score(CONVERSATIONS[:2])


def test_chunks_follow_the_forward_cost_within_the_request_and_token_bounds(backbone):
    probe = {"p": _probes(backbone)["last"]}
    convs = [[{"role": "user", "content": " ".join(["word"] * n)}] for n in (5, 5, 5, 40, 41, 200)]
    lengths = backbone.token_lengths(convs)
    assert ProbeScorer(backbone, probe).cost == backbone.forward_cost  # measured, once per backbone
    assert backbone.forward_cost.per_token > 0
    padding_costs = ForwardCost(fixed=0.0, per_token=1.0)
    assert ProbeScorer(backbone, probe, cost=padding_costs).chunks(convs) == [[0, 1, 2], [3], [4], [5]]
    assert ProbeScorer(backbone, probe, cost=ONE_FORWARD).chunks(convs) == [[0, 1, 2, 3, 4, 5]]
    assert ProbeScorer(backbone, probe, batch_size=4, cost=ONE_FORWARD).chunks(convs) == [[0, 1], [2, 3, 4, 5]]
    tight = ProbeScorer(backbone, probe, max_batch_tokens=2 * lengths[3], cost=ONE_FORWARD).chunks(convs)
    assert all(len(c) * max(lengths[i] for i in c) <= 2 * lengths[3] or len(c) == 1 for c in tight)
    assert sorted(i for c in tight for i in c) == list(range(6))