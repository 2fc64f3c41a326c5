"""One checkpoint module: a torch-free config reader, atomic writes, checked weights."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from extproc import CheckpointError
from routers import checkpoints
from routers.backbone import BackboneConfig, TruncatedBackbone
from routers.checkpoints import (
    BackboneIdentity,
    Threshold,
    load_backbone,
    load_latent_router,
    load_probe,
    read_config,
    save_latent_router,
    save_probe,
    store_threshold,
)
from routers.latent.encoders import EncoderSpec, build_encoder
from routers.latent.router import LatentRouter, LatentRouterConfig, LatentRouterModel, ModelPool
from routers.probes import PROBE_KINDS, LastTokenProbeConfig, build_probe
from routers.probes.mlp import MLPConfig
from tests.routers.test_probe_support import tiny_text_model


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return TruncatedBackbone(BackboneConfig(str(tiny_text_model(tmp_path_factory.mktemp("ckpts"))), layer=3))


def _probe(layer: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_probe("last_token", LastTokenProbeConfig(32, layer, mlp=MLPConfig(depth=2, width=8)))


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_probe_kinds_match_the_probe_registry():
    assert checkpoints.PROBE_KINDS == tuple(PROBE_KINDS)


def test_read_config_needs_no_torch_and_gives_what_serving_needs(backbone, tmp_path):
    save_probe(tmp_path / "deep", _probe(3), backbone, training={"small": "s"})
    save_probe(tmp_path / "mid", _probe(2), backbone)
    store_threshold(tmp_path / "deep", {"large_share": 0.2, "threshold": 0.41, "achieved_share": 0.2, "n": 10})
    code = (
        "import json, sys\n"
        "from routers.checkpoints import read_config\n"
        f"c = read_config({str(tmp_path / 'deep')!r})\n"
        "assert not any(m in sys.modules for m in ('torch', 'transformers', 'safetensors', 'grpc')), sys.modules\n"
        "print(json.dumps([c.kind, c.scorer_kind, c.outputs, c.max_tokens, c.backbone.path, c.backbone.key,"
        " c.threshold(0.2), c.large_shares, c.training['small']]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kind, scorer, outputs, max_tokens, path, key, threshold, shares, small = json.loads(out.stdout)
    assert (kind, scorer, outputs, max_tokens) == ("last_token", "probe", ["score"], 512)
    assert path == backbone.source and threshold == 0.41 and shares == [0.2] and small == "s"
    deep, mid = read_config(tmp_path / "deep"), read_config(tmp_path / "mid")
    assert isinstance(deep.backbone, BackboneIdentity) and deep.thresholds[0] == Threshold(0.2, 0.41, 0.2, n=10)
    # one model at two layers: the per-layer fingerprints differ, the model fingerprint does not
    assert deep.backbone.fingerprint != mid.backbone.fingerprint and deep.backbone.key == mid.backbone.key == key
    other = TruncatedBackbone(BackboneConfig(str(tiny_text_model(tmp_path, seed=9)), layer=3))
    save_probe(tmp_path / "other", _probe(3), other)
    assert read_config(tmp_path / "other").backbone.key != key
    with pytest.raises(dataclasses.FrozenInstanceError):
        deep.kind = "relope"


def test_save_replaces_a_checkpoint_whole_and_leaves_nothing_behind(backbone, tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    save_probe(folder, _probe(3, seed=1), backbone)
    (folder / "stale.bin").write_bytes(b"x")
    first = (folder / "model.safetensors").read_bytes()
    save_probe(folder, _probe(3, seed=2), backbone)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() != first and _leftovers(tmp_path) == []
    # where the atomic exchange is not available: two renames, same result
    monkeypatch.setattr(checkpoints, "_exchange", lambda a, b: False)
    save_probe(folder, _probe(3, seed=3), backbone)
    assert _leftovers(tmp_path) == [] and load_probe(folder, backbone)[1].kind == "last_token"


def test_a_failed_write_keeps_the_old_checkpoint(backbone, tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    save_probe(folder, _probe(3, seed=1), backbone)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "_fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        save_probe(folder, _probe(3, seed=2), backbone)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_a_folder_that_is_not_a_checkpoint_is_not_replaced(backbone, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        save_probe(tmp_path / "mine", _probe(3), backbone)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    save_probe(tmp_path / "empty", _probe(3), backbone)  # an empty folder is fine


def test_a_checkpoint_from_before_truncation_was_saved_still_loads(backbone, tmp_path):
    save_probe(tmp_path / "ck", _probe(3), backbone)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    del config["truncation"], config["weights_sha256"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    old = read_config(tmp_path / "ck")
    assert old.truncation is None and old.max_tokens is None
    assert load_backbone([old]).truncation == backbone.truncation  # the default, capped by the model
    assert load_probe(tmp_path / "ck", backbone)[1].kind == "last_token"


def test_weights_that_do_not_belong_to_the_config_are_refused(backbone, tmp_path):
    save_probe(tmp_path / "a", _probe(3, seed=1), backbone)
    save_probe(tmp_path / "b", _probe(3, seed=2), backbone)
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_probe(tmp_path / "a", backbone)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "svm"}, r"`kind` must be one of last_token, attention, relope, latent_router, got 'svm'"),
        ({"format_version": 7}, r"unsupported `format_version` 7"),
        ({"backbone": {"path": "x"}}, r"`backbone` lacks model_type, hidden_size"),
        ({"thresholds": [{"large_share": 1.5, "threshold": 0.1}]}, r"`thresholds\[0\].large_share` must be in \[0, 1\]"),
        ({"truncation": {"max_tokens": 0}}, r"bad `truncation` section: `max_tokens`"),
        ({"probe": None}, r"`probe` must be an object"),
    ],
)
def test_bad_configs_name_the_file_and_field(backbone, tmp_path, change, message):
    save_probe(tmp_path / "ck", _probe(3), backbone)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as error:
        read_config(tmp_path / "ck")
    assert str(tmp_path / "ck" / "config.json") in str(error.value)


def test_latent_router_config_reads_pool_costs_and_older_layouts(tmp_path):
    folder = tmp_path / "lr"
    folder.mkdir()
    legacy = {  # written before `training` and `truncation` existed
        "kind": "latent_router", "format_version": 1,
        "encoder": {"kind": "text", "model": None, "dim": 1024, "max_length": 256, "layer": None},
        "model": {"input_dim": 8, "num_models": 2, "profile_dim": 1},
        "pool": {"names": ["small", "large"], "mean_cost": [0.5, 2.0], "cost_scale": 2.0,
                 "profiles": [[0.5], [0.9]], "profile_fields": ["accuracy"]},
        "training_set_hash": "abc", "best_epoch": 3,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(legacy))
    config = read_config(folder)
    assert config.scorer_kind == "latent_router" and config.outputs == ("small", "large")
    assert config.costs == {"small": 0.25, "large": 1.0} and config.max_tokens is None and config.backbone is None
    assert config.training == {"training_set_hash": "abc", "best_epoch": 3}
    (folder / "config.json").write_text(json.dumps({**legacy, "pool": {**legacy["pool"], "names": ["a", "a"]}}))
    with pytest.raises(CheckpointError, match="`pool.names` has duplicates"):
        read_config(folder)


def test_a_latent_router_config_json_with_lists_loads_and_saves_back_the_same_bytes(tmp_path):
    encoder = build_encoder(EncoderSpec("hashing", dim=16))
    torch.manual_seed(0)
    model = LatentRouterModel(LatentRouterConfig(encoder.dim, num_models=2, profile_dim=1, hidden_size=8, num_heads=2))
    pool = ModelPool(names=["small", "large"], mean_cost=[0.5, 2.0], cost_scale=2.0, profiles=[[0.5], [0.9]],
                     profile_fields=["accuracy"])
    save_latent_router(LatentRouter(model, encoder, pool), tmp_path / "ck")
    written = (tmp_path / "ck" / "config.json").read_bytes()
    config = json.loads(written)
    # the layout checkpoints have always had: JSON lists, these keys in this order
    assert list(config["pool"].items()) == [
        ("names", ["small", "large"]), ("mean_cost", [0.5, 2.0]), ("cost_scale", 2.0),
        ("profiles", [[0.5], [0.9]]), ("profile_fields", ["accuracy"]),
    ]  # fmt: skip
    assert list(config["model"]) == [f.name for f in dataclasses.fields(LatentRouterConfig)]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))  # as any writer of lists would
    loaded = load_latent_router(tmp_path / "ck")
    assert loaded.pool == pool and loaded.pool.names == ("small", "large") and loaded.pool.profiles == ((0.5,), (0.9,))
    assert loaded.model.config == model.config
    save_latent_router(loaded, tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_bytes() == written  # same sections, same weights_sha256
