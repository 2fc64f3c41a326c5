"""LatentRouter trained on the planted synthetic pool (hashing encoder, a few seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from routers.checkpoints import load_latent_router, read_config, save_latent_router
from routers.data import DataError, parse_labelled
from routers.latent.encoders import EncoderSpec, build_encoder
from routers.latent.training import LatentTrainConfig, outcome_matrix, train_latent_router
from routers.synthetic import SYNTHETIC_CATEGORIES, synthetic_rows


MID_LAMBDA = 0.3


def _requests(rows):
    return parse_labelled([json.dumps(r) for r in rows])


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    encoder = build_encoder(EncoderSpec("hashing", dim=256))
    try:
        result = train_latent_router(
            _requests(synthetic_rows(600, seed=0)),
            encoder,
            {"hidden_size": 32},
            LatentTrainConfig(epochs=25, patience=5, seed=0),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    test_rows = synthetic_rows(400, seed=1)
    test = _requests(test_rows)
    features = encoder.encode([r.messages for r in test])
    return result.router, test, [r["category"] for r in test_rows], features


def _utility(idx, quality, cost, lam, scale):
    rows = torch.arange(quality.shape[0])
    return float((quality[rows, idx] - lam * cost[rows, idx] / scale).mean())


def test_router_beats_every_single_model_and_approaches_the_oracle(trained):
    router, test, _, features = trained
    quality, cost = outcome_matrix(test, router.pool.names)
    scale = router.pool.cost_scale
    picks = router.decide_features(features, MID_LAMBDA)
    idx = torch.tensor([router.pool.index(n) for n in picks])
    routed = _utility(idx, quality, cost, MID_LAMBDA, scale)
    singles = [_utility(torch.full((len(test),), j), quality, cost, MID_LAMBDA, scale) for j in range(4)]
    oracle = float((quality - MID_LAMBDA * cost / scale).max(dim=1).values.mean())
    assert routed > max(singles) + 0.1
    assert routed >= 0.95 * oracle


def test_large_lambda_picks_the_cheapest_adequate_model(trained):
    router, _, categories, features = trained
    picks = router.decide_features(features, 0.5)
    expected = {"chat": "tiny", "math": "math-7b", "code": "code-7b", "law": "large"}
    for category in SYNTHETIC_CATEGORIES:
        chosen = [p for p, c in zip(picks, categories) if c == category]
        share = chosen.count(expected[category]) / len(chosen)
        assert share >= 0.9, (category, share)
    assert set(router.decide_features(features, 100.0)) == {"tiny"}


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 3.0, 1e4])
def test_unavailable_models_are_never_chosen(trained, lam):
    router, _, _, features = trained
    for available in (["tiny", "large"], ["math-7b"], ["code-7b", "large", "math-7b"]):
        assert set(router.decide_features(features, lam, available)) <= set(available)


def test_save_load_gives_identical_decisions(trained, tmp_path):
    router, test, _, features = trained
    save_latent_router(router, tmp_path / "ck", training={"train_data_hash": "abc"})
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["kind"] == "latent_router" and config["encoder"]["kind"] == "hashing"
    assert config["pool"]["names"] == list(router.pool.names) and config["training"]["train_data_hash"] == "abc"
    assert config["training"]["validation"]["source"] == "held_out"  # no val given: 15% held out
    assert "truncation" not in config  # the hashing encoder reads no tokens
    saved = read_config(tmp_path / "ck")
    assert saved.outputs == tuple(router.pool.names) and saved.max_tokens is None
    assert saved.costs == pytest.approx(dict(zip(router.pool.names, router.pool.cost_normalised)))
    loaded = load_latent_router(tmp_path / "ck")
    messages = [r.messages for r in test]
    for lam in (0.0, MID_LAMBDA, 2.0):
        assert loaded.decide(messages, lam) == router.decide_features(features, lam)
    a, b = router.predict_features(features), loaded.predict(messages)
    assert torch.equal(a.mu_tilde, b.mu_tilde)


def test_training_is_seedable():
    rows = _requests(synthetic_rows(120, seed=3))
    encoder = build_encoder(EncoderSpec("hashing", dim=64))
    cfg = LatentTrainConfig(epochs=2, seed=7)
    runs = [train_latent_router(rows, encoder, {"hidden_size": 32}, cfg, progress=False) for _ in range(2)]
    assert [h["total"] for h in runs[0].history] == [h["total"] for h in runs[1].history]


def test_missing_cost_is_a_data_error():
    rows = synthetic_rows(20, seed=0)
    del rows[3]["outcomes"]["tiny"]["cost"]
    with pytest.raises(DataError, match="has no `cost`"):
        train_latent_router(_requests(rows), build_encoder(EncoderSpec("hashing", dim=64)), progress=False)


def test_train_config_validates():
    with pytest.raises(ValueError, match="`pool_dropout`"):
        LatentTrainConfig(pool_dropout=1.5)
    with pytest.raises(ValueError, match="`val_lambdas`"):
        LatentTrainConfig(val_lambdas=(math.nan,))
