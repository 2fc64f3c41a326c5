"""LatentRouterModel and choose(): config validation, masking, pool-change invariance."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from routers.latent.router import LatentRouterConfig, LatentRouterModel, ModelPool, choose


def _model(**kw) -> LatentRouterModel:
    torch.manual_seed(0)
    cfg = LatentRouterConfig(input_dim=12, num_models=5, profile_dim=3, hidden_size=32, **kw)
    return LatentRouterModel(cfg).eval()


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", 0), ("num_heads", 3), ("rounds", -1), ("dropout", 1.0), ("correction_bound", 2.0), ("min_sigma", 0.0)],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    kwargs = dict(input_dim=12, num_models=5, profile_dim=3, hidden_size=32)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"`{field}`"):
        LatentRouterConfig(**kwargs)


def test_outputs_are_bounded_and_shaped():
    model = _model()
    with torch.no_grad():
        out = model(torch.randn(7, 12), torch.randn(5, 3))
    assert out.mu.shape == out.sigma.shape == out.mu_tilde.shape == (7, 5)
    assert bool(((out.mu_tilde >= 0) & (out.mu_tilde <= 1)).all())
    assert bool((out.sigma > 0).all())
    assert float(out.correction.abs().max()) <= model.config.correction_bound + 1e-7


def test_removing_a_model_leaves_the_others_scores_unchanged():
    model = _model()
    x, profiles = torch.randn(6, 12), torch.randn(5, 3)
    full = model(x, profiles).mu_tilde
    mask = torch.tensor([True, False, True, True, False])
    masked = model(x, profiles, mask).mu_tilde
    keep = torch.tensor([0, 2, 3])
    sub = model(x, profiles[keep], model_ids=keep).mu_tilde
    assert torch.allclose(masked[:, keep], sub, atol=1e-5)
    assert not torch.allclose(full[:, keep], sub, atol=1e-6)  # the masked models did matter


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.3, 1.0, 7.5, 1e6])
def test_choose_never_picks_an_unavailable_model(lam):
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        mu = torch.rand(50, 5, generator=g)
        cost = torch.rand(5, generator=g)
        avail = torch.rand(50, 5, generator=g) > 0.5
        avail[torch.arange(50), torch.randint(0, 5, (50,), generator=g)] = True
        idx = choose(mu, cost, lam, avail)
        assert bool(avail[torch.arange(50), idx].all())


def test_choose_breaks_ties_toward_the_cheaper_model():
    idx = choose(torch.tensor([[0.5, 0.5]]), torch.tensor([0.9, 0.1]), 0.0)
    assert idx.tolist() == [1]


def test_empty_pool_is_an_error():
    model = _model()
    with pytest.raises(ValueError, match="at least one available model"):
        model(torch.randn(2, 12), torch.randn(5, 3), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one available model"):
        choose(torch.rand(2, 5), torch.rand(5), 0.1, torch.zeros(5, dtype=torch.bool))


def test_pool_validates_and_masks_by_name():
    pool = ModelPool(names=["a", "b"], mean_cost=[1.0, 2.0], cost_scale=2.0, profiles=[[0.1], [0.2]], profile_fields=["acc"])
    assert pool.cost_normalised == (0.5, 1.0)
    assert pool.mask(["b"]).tolist() == [False, True]
    with pytest.raises(KeyError, match="'c' is not in the router's pool"):
        pool.mask(["c"])
    with pytest.raises(ValueError, match="`names`"):
        ModelPool(names=["a", "a"], mean_cost=[1, 1], cost_scale=1.0, profiles=[[0], [0]], profile_fields=["x"])


def test_saved_configs_are_frozen_and_hold_tuples():
    cfg = LatentRouterConfig(input_dim=12, num_models=2, profile_dim=1)
    pool = ModelPool(names=["a", "b"], mean_cost=[1.0, 2.0], cost_scale=2.0, profiles=[[0.1], [0.2]], profile_fields=["acc"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 128  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.names = ("c", "d")  # type: ignore[misc]
    assert pool.names == ("a", "b") and pool.mean_cost == (1.0, 2.0) and pool.profile_fields == ("acc",)
    assert pool.profiles == ((0.1,), (0.2,))
    assert pool == ModelPool(names=("a", "b"), mean_cost=(1.0, 2.0), cost_scale=2.0, profiles=((0.1,), (0.2,)),
                             profile_fields=("acc",))


def test_non_finite_predictions_raise_scorer_error():
    from extproc import ScorerError
    from routers.latent.router import LatentRouter

    model = _model()
    pool = ModelPool(names=list("abcde"), mean_cost=[1.0] * 5, cost_scale=1.0,
                     profiles=[[0.0] * 3] * 5, profile_fields=["x", "y", "z"])
    with torch.no_grad():
        model.head[2].bias.fill_(float("nan"))
    with pytest.raises(ScorerError, match="non-finite"):
        LatentRouter(model, None, pool).decide_features(torch.randn(2, 12), 0.1)


def test_import_routers_does_not_import_torch_and_exports_latent_names():
    import subprocess
    import sys

    code = (
        "import sys, routers\n"
        "assert 'torch' not in sys.modules\n"
        "names = ['LatentRouter', 'LatentRouterConfig', 'train_latent_router', 'load_latent_router', 'EncoderSpec']\n"
        "assert all(n in routers.__all__ for n in names)\n"
        "routers.LatentRouterConfig\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
