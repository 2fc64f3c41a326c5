"""CLI flags come from the config dataclasses: their defaults and help cannot drift."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import pytest

from routers.config_options import add_config_options, config_values, field_help, option


@dataclass(frozen=True)
class _Base:
    """Settings.

    - ``ratio``: a share of something. Default 0.5.
    - ``name``: which one,
      continued on a second line (see :class:`routers.truncation.Truncation`).
    """

    ratio: float = 0.5
    name: str = "a"


@dataclass(frozen=True)
class _Toy(_Base):
    """Derived; documents nothing itself."""

    steps: int = option(3, "How many steps (100% of them).")
    flag: bool = option(True, "Do the thing.")
    lambdas: tuple[float, ...] = option((0.0, 1.5), "Weights.")
    limit: int | None = option(None, "A cap (not set: none).")
    required: int = 0


def _parse(argv, **kwargs):
    parser = argparse.ArgumentParser()
    add_config_options(parser, _Toy, **kwargs)
    return parser, parser.parse_args(argv)


def test_defaults_types_and_help_come_from_the_dataclass():
    parser, args = _parse([])
    assert _Toy(**config_values(_Toy, args)) == _Toy()
    _, args = _parse(["--steps", "7", "--no-flag", "--lambdas", "0.1, 2", "--limit", "4", "--ratio", "0.25"])
    assert config_values(_Toy, args) == {
        "ratio": 0.25, "name": "a", "steps": 7, "flag": False, "lambdas": (0.1, 2.0), "limit": 4, "required": 0,
    }  # fmt: skip
    text = " ".join(parser.format_help().split())
    assert "How many steps (100% of them). (default: 3)" in text
    assert "A share of something. (default: 0.5)" in text  # the docstring's "Default" sentence is replaced
    assert "Which one, continued on a second line (see routers.truncation.Truncation). (default: a)" in text
    assert "Weights. (default: 0,1.5)" in text and "Do the thing. (default: True)" in text
    assert "A cap (not set: none)." in text and "--limit LIMIT A cap (not set: none). (default" not in text
    assert field_help(_Toy)["ratio"] == "A share of something."


def test_prefix_flags_overrides_and_choices():
    parser, args = _parse(
        ["--x-name", "b"],
        prefix="x",
        only=["name", "steps"],
        flags={"steps": ["--x-steps", "--steps"]},
        defaults={"steps": None},
        default_text={"steps": "per kind"},
        choices={"name": ("a", "b")},
    )
    assert config_values(_Toy, args, prefix="x", only=["name", "steps"], skip_none=True) == {"name": "b"}
    assert parser.parse_args(["--steps", "2"]).x_steps == 2
    assert "(default: per kind)" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--x-name", "c"])
    with pytest.raises(ValueError, match="no field"):
        _parse([], only=["nope"])


def _train_parser():
    from routers.latent import cli as latent_cli
    from routers.probes import cli as probe_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    probe_cli.add_train_probe_parser(sub)
    latent_cli.add_train_latent_router_parser(sub)
    return parser


def test_train_commands_take_every_default_from_the_configs():
    from routers.backbone import BackboneConfig
    from routers.latent.encoders import EncoderSpec
    from routers.latent.router import LatentRouterConfig
    from routers.latent.training import LatentTrainConfig
    from routers.probes.training import TrainConfig

    parser = _train_parser()
    probe = parser.parse_args(["probe", "--method", "relope", "--backbone", "b", "--data", "d", "--small", "s", "--out", "o"])
    assert TrainConfig(**config_values(TrainConfig, probe)) == TrainConfig()
    backbone = config_values(BackboneConfig, probe, only=("max_tokens", "head_tokens"))
    assert backbone == {"max_tokens": BackboneConfig.max_tokens, "head_tokens": BackboneConfig.head_tokens}
    latent = parser.parse_args(["latent-router", "--data", "d", "--out", "o"])
    assert LatentTrainConfig(**config_values(LatentTrainConfig, latent)) == LatentTrainConfig()
    assert EncoderSpec(**config_values(EncoderSpec, latent)) == EncoderSpec()
    model = config_values(LatentRouterConfig, latent, exclude=("input_dim", "num_models", "profile_dim"))
    assert LatentRouterConfig(input_dim=8, num_models=2, profile_dim=3, **model) == LatentRouterConfig(8, 2, 3)
    assert {f.name for f in fields(LatentTrainConfig)} <= set(vars(latent))


def test_probe_head_defaults_follow_the_probe_kind(tmp_path):
    from routers.probes import ReLopeConfig
    from routers.probes.cli import _build_probe
    from tests.routers.test_probe_support import tiny_text_model

    backbone_dir = tiny_text_model(tmp_path)
    from routers.backbone import BackboneConfig, TruncatedBackbone

    backbone = TruncatedBackbone(BackboneConfig(str(backbone_dir), layer=2))
    parser = _train_parser()
    base = ["probe", "--backbone", "b", "--data", "d", "--small", "s", "--out", "o"]
    relope = _build_probe(parser.parse_args([*base, "--method", "relope", "--lora-rank", "4"]), backbone, 2)
    assert relope.config.mlp == ReLopeConfig(32, 2).mlp and relope.config.lora_rank == 4
    last = _build_probe(parser.parse_args([*base, "--method", "last_token", "--mlp-width", "8", "--dropout", "0"]), backbone, 2)
    assert last.config.mlp.width == 8 and last.config.mlp.dropout == 0.0 and last.config.mlp.depth == 5
