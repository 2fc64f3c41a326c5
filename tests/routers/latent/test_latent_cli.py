"""``switchyard train latent-router`` and ``switchyard eval`` on a LatentRouter checkpoint."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from routers.data import DataError
from routers.latent import cli as latent_cli
from routers.synthetic import synthetic_rows, write_synthetic


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    latent_cli.add_train_latent_router_parser(parser.add_subparsers())
    return parser


def _eval_args(checkpoint, data, **kw) -> argparse.Namespace:
    base = dict(checkpoint=checkpoint, data=data, small=None, large=None, plot=None, out=None,
                pool_shift="none", lambdas=None, device="cpu", batch_size=16, seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


TRAIN_FLAGS = ["--encoder", "hashing", "--hash-dim", "64", "--hidden-size", "32", "--epochs", "3", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent-cli")
    train = write_synthetic(root / "train.jsonl", synthetic_rows(160, seed=0))
    test = write_synthetic(root / "test.jsonl", synthetic_rows(80, seed=1))
    args = _train_parser().parse_args(["latent-router", "--data", str(train), "--out", str(root / "ck"), *TRAIN_FLAGS])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert args.handler(args) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "ck", test, train


def test_train_writes_a_checkpoint(checkpoint):
    ck, _, _ = checkpoint
    config = json.loads((ck / "config.json").read_text())
    assert config["kind"] == "latent_router"
    assert config["model"]["hidden_size"] == 32 and config["training"]["config"]["epochs"] == 3
    assert len(config["training"]["train_data_hash"]) == 64
    assert (ck / "model.safetensors").exists()


def test_eval_writes_json_and_plot_with_pool_shifts(checkpoint, tmp_path, capsys):
    ck, test, _ = checkpoint
    out, plot = tmp_path / "eval.json", tmp_path / "frontier.png"
    assert latent_cli.run_latent_router_eval(_eval_args(ck, test, out=out, plot=plot, pool_shift="all", lambdas="0,0.3,5")) == 0
    report = json.loads(out.read_text())["reports"]
    assert set(report) == {"none", "strongest", "cheapest", "random30"}
    assert "large" not in report["strongest"]["pool"] and "tiny" not in report["cheapest"]["pool"]
    assert [r["lambda"] for r in report["none"]["lambdas"]] == [0.0, 0.3, 5.0]
    assert 0.0 <= report["none"]["auc"] <= 1.0
    assert report["none"]["oracle"]["quality"] >= report["none"]["best_single"]["quality"]
    assert plot.stat().st_size > 1000
    assert "AUC" in capsys.readouterr().out


def test_two_model_pool_reports_apgr_and_cpt(tmp_path):
    rows = synthetic_rows(120, seed=2)
    for r in rows:
        r["outcomes"] = {k: r["outcomes"][k] for k in ("tiny", "large")}
    data = write_synthetic(tmp_path / "two.jsonl", rows)
    args = _train_parser().parse_args(["latent-router", "--data", str(data), "--out", str(tmp_path / "ck"), *TRAIN_FLAGS])
    assert args.handler(args) == 0
    out = tmp_path / "eval.json"
    latent_cli.run_latent_router_eval(_eval_args(tmp_path / "ck", data, out=out))
    two = json.loads(out.read_text())["reports"]["none"]["two_model"]
    assert two["small"] == "tiny" and two["large"] == "large"
    assert set(two) >= {"apgr", "cpt50", "cpt80"}


def test_bad_lambdas_is_a_data_error(checkpoint):
    ck, test, _ = checkpoint
    with pytest.raises(DataError, match="--lambdas"):
        latent_cli.run_latent_router_eval(_eval_args(ck, test, lambdas="0,abc"))


def test_top_level_cli_dispatches_to_latent_router(checkpoint, tmp_path):
    from extproc.cli import main

    ck, test, train = checkpoint
    assert main(["train", "latent-router", "--data", str(train), "--out", str(tmp_path / "ck"), *TRAIN_FLAGS]) == 0
    assert main(["eval", "--checkpoint", str(ck), "--data", str(test), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["reports"]["none"]["pool"]


def test_backbone_encoder_checkpoint_round_trip(tmp_path):
    from tests.routers.test_probe_support import tiny_text_model

    model_dir = tiny_text_model(tmp_path / "bb")
    data = write_synthetic(tmp_path / "d.jsonl", synthetic_rows(60, seed=4))
    args = _train_parser().parse_args([
        "latent-router", "--data", str(data), "--out", str(tmp_path / "ck"), "--encoder", "backbone",
        "--encoder-model", str(model_dir), "--layer", "2", "--hidden-size", "32", "--epochs", "2", "--quiet",
    ])
    assert args.handler(args) == 0
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["encoder"]["kind"] == "backbone" and config["encoder"]["layer"] == 2
    assert config["backbone"]["layer"] == 2
    out = tmp_path / "e.json"
    assert latent_cli.run_latent_router_eval(_eval_args(tmp_path / "ck", data, out=out)) == 0
