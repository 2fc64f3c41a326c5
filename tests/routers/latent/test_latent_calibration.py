"""LatentRouter: λ calibrated for a large share (``switchyard calibrate``), used by a utility
rule's ``large_share``; eval's per-row scores; stable, seeded training that logs each epoch."""

from __future__ import annotations

import json

import pytest
import torch

from extproc import PolicyError, parse_policy
from extproc.cli import main
from routers.checkpoints import read_config
from routers.latent.evaluation import lambda_for_share
from routers.latent.router import choose
from routers.latent.training import EarlyStopping
from routers.synthetic import synthetic_rows, write_synthetic


def test_lambda_for_share_sends_that_share_to_large():
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(200, 3, generator=g)
    cost = torch.tensor([0.05, 0.3, 1.0])
    for share in (0.1, 0.2, 0.3):
        lam, achieved = lambda_for_share(mu, cost, 2, share)
        assert lam >= 0 and achieved == pytest.approx(share, abs=0.01)
        assert float((choose(mu, cost, lam) == 2).float().mean()) == achieved
    lam, achieved = lambda_for_share(mu, cost, 2, 0.9)  # more than λ = 0 gives (~1/3): λ stays 0
    assert lam == 0.0 and achieved == float((mu.argmax(1) == 2).float().mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lambda")
    train = write_synthetic(root / "train.jsonl", synthetic_rows(160, seed=0))
    assert main([
        "train", "latent-router", "--data", str(train), "--out", str(root / "ck"), "--encoder", "hashing",
        "--hash-dim", "64", "--hidden-size", "32", "--epochs", "3", "--no-progress",
    ]) == 0  # fmt: skip
    return root, train


def test_calibrate_stores_lambda_per_share(trained, capsys):
    root, _ = trained
    ck, val = root / "ck", root / "ck" / "validation.jsonl"
    assert len(val.read_text().splitlines()) == 24  # 15% of 160, held out and written by training
    for share in ("0.2", "0.4", "0.2"):  # the same share again replaces it
        assert main(["calibrate", "--checkpoint", str(ck), "--data", str(val), "--large-share", share]) == 0
    calibrations = read_config(ck).lambdas
    assert [(c.large_share, c.large) for c in calibrations] == [(0.4, "large"), (0.2, "large")]
    assert calibrations[1].lam > calibrations[0].lam  # a smaller share needs a larger cost weight
    assert "Stored lambda" in capsys.readouterr().out
    assert main(["calibrate", "--checkpoint", str(ck), "--data", str(val), "--large-share", "0.3",
                 "--large", "nope"]) == 1
    assert "--large 'nope' is not a pool model" in capsys.readouterr().err


def _policy(checkpoint, route: str) -> str:
    return (
        "version: 1\nbackends:\n  tiny: {cluster: t, model: t}\n  large: {cluster: l, model: l}\n"
        "default: tiny\nscorers:\n  u:\n    kind: latent_router\n"
        f"    checkpoint: {checkpoint}\n    backends: {{tiny: tiny, math-7b: tiny, code-7b: tiny, large: large}}\n"
        f"rules:\n  - {{name: r, route: {route}}}\n"
    )


def test_a_utility_rule_takes_the_calibrated_lambda(trained, tmp_path):
    root, _ = trained
    ck = root / "ck"
    assert main(["calibrate", "--checkpoint", str(ck), "--data", str(ck / "validation.jsonl"),
                 "--large-share", "0.25"]) == 0
    expected = next(c.lam for c in read_config(ck).lambdas if c.large_share == 0.25)
    policy = parse_policy(_policy(ck, "{utility: u, large_share: 0.25}"))
    assert policy.rules[0].route.lam == expected
    with pytest.raises(PolicyError) as info:
        parse_policy(_policy(ck, "{utility: u, large_share: 0.15}"), source="p.yaml")
    (problem,) = info.value.problems
    assert (problem.line, problem.column) == (12, 35)  # `large_share` in the rule's route
    assert "no λ calibrated for large share 0.15" in problem.message
    assert f"run `switchyard calibrate --checkpoint {ck} --data <labelled.jsonl> --large-share 0.15`" in problem.message
    for route in ("{utility: u, lambda: 0.1, large_share: 0.25}", "{utility: u}"):
        with pytest.raises(PolicyError, match="needs exactly one of `lambda` and `large_share`"):
            parse_policy(_policy(ck, route))


def test_eval_writes_each_rows_scores(trained, tmp_path):
    root, train = trained
    scores = tmp_path / "scores.jsonl"
    assert main(["eval", "--checkpoint", str(root / "ck"), "--data", str(train), "--scores-out", str(scores)]) == 0
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 160 and rows[0]["id"] == "syn-0-0"
    assert set(rows[0]["quality"]) == set(rows[0]["cost"]) == {"tiny", "math-7b", "code-7b", "large"}
    assert rows[0]["cost"]["large"] == 1.0


def _epoch_lines(err: str) -> list[str]:
    events = [json.loads(line).get("event", "") for line in err.splitlines() if line.startswith("{")]
    return [event for event in events if event.startswith("epoch ")]


def test_no_progress_training_logs_one_line_per_epoch(tmp_path, capsys):
    """Probe training already did (``epoch N: train loss ...``); LatentRouter too."""
    train = write_synthetic(tmp_path / "t.jsonl", synthetic_rows(60, seed=2))
    assert main(["train", "latent-router", "--data", str(train), "--out", str(tmp_path / "ck"), "--encoder",
                 "hashing", "--hash-dim", "32", "--hidden-size", "16", "--epochs", "3", "--patience", "0",
                 "--no-progress"]) == 0
    lines = _epoch_lines(capsys.readouterr().err)
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train loss" in line and "val utility" in line for line in lines)


def test_probe_training_logs_one_line_per_epoch(tmp_path, capsys):
    from tests.routers.test_probe_support import tiny_text_model, trigger_set, write_jsonl

    model = tiny_text_model(tmp_path)
    train = write_jsonl(tmp_path / "t.jsonl", trigger_set(30, 1))
    assert main(["train", "probe", "--method", "last_token", "--backbone", str(model), "--data", str(train),
                 "--small", "small", "--out", str(tmp_path / "p"), "--epochs", "2", "--patience", "0",
                 "--no-progress"]) == 0
    lines = _epoch_lines(capsys.readouterr().err)
    assert len(lines) == 2 and all("train loss" in line and "val AUC" in line for line in lines)


def test_early_stopping_ignores_one_lucky_epoch():
    # a spike at epoch 1, then steady progress: the old rule (best raw value, patience) kept epoch 1
    values = [0.50, 0.60, 0.52, 0.54, 0.56, 0.58, 0.60, 0.62, 0.64, 0.645, 0.646, 0.6465, 0.6466, 0.6466, 0.6466, 0.6466]
    stopping = EarlyStopping(patience=3, min_delta=1e-3, smoothing=3)
    stopped = None
    for epoch, value in enumerate(values):
        _, stop = stopping.update(epoch, value)
        if stop:
            stopped = epoch
            break
    assert stopping.best_epoch >= 8 and stopped is not None and stopped > 8
    # gains under min_delta are noise: they do not reset the patience
    flat = EarlyStopping(patience=3, min_delta=1e-2, smoothing=1)
    outcomes = [flat.update(e, v) for e, v in enumerate([0.5, 0.501, 0.502, 0.503])]
    assert flat.best_epoch == 0 and outcomes[-1] == (False, True)
    assert EarlyStopping(patience=0).update(0, 1.0) == (True, False)


def test_training_is_seeded_by_default(tmp_path):
    train = write_synthetic(tmp_path / "t.jsonl", synthetic_rows(60, seed=2))
    weights = []
    for name in ("a", "b"):
        assert main(["train", "latent-router", "--data", str(train), "--out", str(tmp_path / name), "--encoder",
                     "hashing", "--hash-dim", "32", "--hidden-size", "16", "--epochs", "2", "--no-progress"]) == 0
        weights.append((tmp_path / name / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
    assert read_config(tmp_path / "a").training["config"]["seed"] == 0
