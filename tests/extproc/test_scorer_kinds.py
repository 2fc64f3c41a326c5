"""Scorer kinds are declared once (``extproc.scorers._kinds``): the schema, the spec builder and
the loader lookup derive from the declaration, so a new kind is one class and its loader."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace
from typing import ClassVar

import pytest

from extproc import ScorerError, ScorerSpec, load_scorer
from extproc.policy._schema import SCORER_KINDS_SCHEMA, SCORERS_FILE_SCHEMA
from extproc._schema import Key, Str
from extproc.scorers._kinds import SCORER_KINDS, ScorerKind, scorer_kind, scorer_schemas
from extproc.scorers._loaders import scorer_loader
from extproc.policy._scorer_specs import build_scorer_specs
from extproc.scorers._interface import BatchConfig, BreakerConfig, ImageLimits


def test_the_schema_takes_each_kinds_keys_from_its_declaration():
    assert list(SCORER_KINDS_SCHEMA) == list(SCORER_KINDS) == ["probe", "latent_router"]
    for kind, declared in SCORER_KINDS.items():
        obj = SCORER_KINDS_SCHEMA[kind]
        assert obj.doc == declared.doc
        for key, spec in declared.keys.items():
            assert obj.keys[key] is spec
    tagged = SCORERS_FILE_SCHEMA.keys["scorers"].schema.value  # the scorers file uses the same variants
    assert tagged.variants is SCORER_KINDS_SCHEMA


def test_an_unknown_kind_names_the_supported_ones():
    with pytest.raises(ScorerError, match=r"Unknown scorer kind 'nope'; supported kinds: probe, latent_router\."):
        scorer_kind("nope")
    with pytest.raises(ScorerError, match="supported kinds: probe, latent_router"):
        load_scorer(ScorerSpec(name="x", kind="nope"))


class _ThirdKind(ScorerKind):
    kind: ClassVar[str] = "third"
    doc: ClassVar[str] = "A kind declared only here."
    keys: ClassVar[dict[str, Key]] = {"model": Key(Str(min_length=1), "The model folder.", None)}
    entry_point: ClassVar[str] = "third_loader"
    checkpoint_key: ClassVar[str] = "model"

    def spec_fields(self, name, config, remote, folder, backends, report):
        return {"checkpoints": ((config["model"], "remote-only"),)}

    def local_folders(self, spec):
        return []

    def outputs(self, spec):
        return tuple(out for out, _ in spec.checkpoints)


def _entry(kind: str, model: str) -> dict:
    return {"kind": kind, "model": model, "remote": {"target": "127.0.0.1:1", "scorer": None, "tls": None},
            "fallback": None, "device": "cpu", "dtype": None, "deadline_ms": 100,
            "batch": asdict(BatchConfig()), "breaker": asdict(BreakerConfig()), "images": asdict(ImageLimits())}


def test_a_third_kind_is_one_class_and_its_loader(monkeypatch, tmp_path):
    monkeypatch.setitem(SCORER_KINDS, "third", _ThirdKind())
    common = {"description": Key(Str(), "Free text.", None)}
    obj = scorer_schemas(common)["third"]
    assert list(obj.keys) == ["kind", "model", "description"]

    problems = []
    specs, _ = build_scorer_specs({"t": _entry("third", "m")}, tmp_path,
                                  lambda key, message: problems.append((key, message)), backends=None)
    assert problems == []
    assert specs["t"].kind == "third" and specs["t"].checkpoints == (("m", "remote-only"),)

    loader = SimpleNamespace(describe=None, load=lambda spec: "loaded")
    seen = []

    def entry_points(group):
        seen.append(group)
        return [SimpleNamespace(name="third_loader", load=lambda: loader)]

    monkeypatch.setattr("extproc.scorers._loaders.metadata.entry_points", entry_points)
    scorer_loader.cache_clear()
    try:
        assert scorer_loader("third") is loader  # found by its declared entry-point name, not its kind
    finally:
        scorer_loader.cache_clear()
    assert seen == ["switchyard.scorers"]
