"""Long prompts: cut to the backbone's own limit by default, the cut saved in the checkpoint
and applied the same way in training, evaluation and serving (probes and LatentRouter)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from extproc import CheckpointError
from extproc.cli import main
from routers.backbone import BackboneConfig, TruncatedBackbone
from routers.checkpoints import load_backbone, read_config
from routers.probes.offline import ProbeScorer
from routers.truncation import CHARS_PER_TOKEN, MIN_KEPT_CHARS, Truncation, position_limit
from tests.routers.test_probe_support import WORDS, minilm_dir, tiny_text_model, write_jsonl

POSITIONS = 64


def test_truncation_keeps_the_head_and_the_tail():
    cut = Truncation(max_tokens=10, head=4)
    assert cut.apply(list(range(8))) == list(range(8))
    assert cut.apply(list(range(30))) == [0, 1, 2, 3, 24, 25, 26, 27, 28, 29]
    assert Truncation(max_tokens=3, head=4).head == 2  # at least one tail token
    assert Truncation(5, 0).apply("abcdefgh") == list("defgh")
    assert cut.capped(None) is cut and cut.capped(100) is cut
    assert cut.capped(6) == Truncation(6, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        Truncation(0)


def test_a_text_is_cut_by_characters_keeping_its_head_and_tail():
    cut = Truncation(max_tokens=1000, head=4)
    head, tail = cut.char_budget
    assert (head, tail) == (MIN_KEPT_CHARS, 996 * CHARS_PER_TOKEN) and cut.max_chars == head + tail
    assert Truncation(8, 0).char_budget == (0, MIN_KEPT_CHARS)  # no head: nothing kept from the start
    short = "x" * cut.max_chars
    assert cut.cut_text(short) is short
    text = "H" * head + "m" * 10**6 + "T" * tail
    assert cut.cut_text(text) == "H" * head + "T" * tail


def test_message_texts_cut_before_a_template_joins_them_give_the_joined_cut():
    """Cutting the pieces, joining them, and cutting the joined text gives what cutting the
    joined text alone gives: the template's own characters are never lost from the ends."""
    rng = random.Random(0)
    cut = Truncation(max_tokens=100, head=4)
    for _ in range(300):
        pieces = [chr(65 + i % 26) * rng.choice([0, 5, 300, 1500, 4000]) for i in range(rng.randint(1, 8))]
        marks = [f"<|m{i}|>" * rng.randint(0, 3) for i in range(len(pieces) + 1)]

        def join(texts):
            return "".join(m + t for m, t in zip(marks, texts)) + marks[-1]

        assert cut.cut_text(join(cut.cut_texts(pieces))) == cut.cut_text(join(pieces))
        assert sum(map(len, cut.cut_texts(pieces))) <= cut.max_chars


def test_position_limit_is_the_least_known_limit():
    config = SimpleNamespace(max_position_embeddings=514)  # RoBERTa counts 2 reserved positions
    assert position_limit(config, SimpleNamespace(model_max_length=512)) == 512
    assert position_limit(config, SimpleNamespace(model_max_length=int(1e30))) == 514  # HF's "unset"
    text = SimpleNamespace(max_position_embeddings=128)
    multimodal = SimpleNamespace(get_text_config=lambda: text)
    assert position_limit(multimodal) == 128
    assert position_limit(SimpleNamespace()) is None


def _long_rows(n: int, seed: int, words: int = 150) -> list[dict]:
    """Prompts far over the limit; the label is decided by the last word (kept by the cut)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hard = i % 2 == 0
        text = " ".join(rng.choice(WORDS) for _ in range(words)) + (" zebra" if hard else " horse")
        rows.append({
            "id": f"{seed}-{i}",
            "messages": [{"role": "system", "content": "answer"}, {"role": "user", "content": text}],
            "outcomes": {"small": {"correct": int(not hard)}, "large": {"correct": 1}},
        })  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("trunc"), positions=POSITIONS)


def test_backbone_cuts_to_its_position_limit_keeping_first_and_last_tokens(short_model):
    backbone = TruncatedBackbone(BackboneConfig(str(short_model), layer=2))  # asks for 4096 by default
    assert backbone.truncation == Truncation(POSITIONS, 4)
    conversation = _long_rows(1, 0)[0]["messages"]
    text = backbone._render(conversation)[0]
    full = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(full) > 2 * POSITIONS
    batch = backbone.encode([conversation, [{"role": "user", "content": "hi"}]])
    assert batch["input_ids"].shape[1] == POSITIONS
    assert batch["input_ids"][0].tolist() == full[:4] + full[-(POSITIONS - 4):]
    assert batch["attention_mask"][1].sum() < POSITIONS and batch["attention_mask"][0].all()
    assert backbone.token_lengths([conversation]) == [POSITIONS]
    smaller = TruncatedBackbone(BackboneConfig(str(short_model), layer=2, max_tokens=20))
    assert smaller.encode([conversation])["input_ids"].shape[1] == 20


def test_train_eval_calibrate_serve_use_the_saved_cut(short_model, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", _long_rows(60, 1))
    test = write_jsonl(tmp_path / "test.jsonl", _long_rows(24, 2))
    out = tmp_path / "ck"
    code = main([
        "train", "probe", "--method", "last_token", "--backbone", str(short_model), "--data", str(train),
        "--small", "small", "--out", str(out), "--epochs", "2", "--mlp-depth", "2", "--mlp-width", "16",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    assert f"prompts cut to {POSITIONS} tokens" in capsys.readouterr().out
    saved = read_config(out)
    assert saved.truncation == Truncation(POSITIONS, 4) and saved.max_tokens == POSITIONS
    validation = saved.training["validation"]  # no --val: the default share held out, early stopping on it
    assert validation == {"source": "held_out", "fraction": 0.15, "n_train": 51, "n_val": 9, "file": "validation.jsonl"}
    assert all(row["val_auc"] is not None for row in saved.training["history"])
    assert main(["eval", "--checkpoint", str(out), "--data", str(test), "--small", "small", "--large", "large"]) == 0
    assert main(["calibrate", "--checkpoint", str(out), "--data", str(test), "--large-share", "0.5"]) == 0
    scorer = ProbeScorer.from_checkpoints({"p": out})
    assert scorer.backbone.truncation == saved.truncation
    with pytest.raises(CheckpointError, match="comes from the probe checkpoints"):
        load_backbone([saved], max_tokens=4096)


def test_probes_cut_differently_are_not_scored_together(short_model, tmp_path):
    rows = write_jsonl(tmp_path / "d.jsonl", _long_rows(20, 3))
    for name, limit in (("a", "32"), ("b", "48")):
        assert main([
            "train", "probe", "--method", "attention", "--backbone", str(short_model), "--data", str(rows),
            "--small", "small", "--out", str(tmp_path / name), "--epochs", "1", "--max-tokens", limit,
            "--mlp-depth", "1", "--no-progress",
        ]) == 0  # fmt: skip
    assert read_config(tmp_path / "a").max_tokens == 32
    with pytest.raises(CheckpointError, match="must cut prompts alike"):
        ProbeScorer.from_checkpoints({"a": tmp_path / "a", "b": tmp_path / "b"})


def test_minilm_backbone_reads_prompts_over_512_tokens(tmp_path, capsys):
    """The issue's case: a BERT-style encoder crashed past its 512 positions."""
    path = str(minilm_dir())
    backbone = TruncatedBackbone(BackboneConfig(path, layer=3))
    assert backbone.truncation.max_tokens == 512
    long = [{"role": "user", "content": " ".join(["word"] * 900)}]
    batch = backbone.encode([long])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 512
    assert ids[0] == backbone.tokenizer.cls_token_id and ids[-1] == backbone.tokenizer.sep_token_id
    assert torch.isfinite(backbone.states(batch, [3]).at(3).last()).all()

    rows = _long_rows(12, 4, words=600)
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "minilm-probe"
    assert main([
        "train", "probe", "--method", "last_token", "--backbone", path, "--data", str(data), "--small", "small",
        "--out", str(out), "--epochs", "1", "--batch-size", "4", "--mlp-depth", "1", "--no-progress",
    ]) == 0  # fmt: skip
    assert read_config(out).max_tokens == 512
    report = tmp_path / "report.json"
    assert main(["eval", "--checkpoint", str(out), "--data", str(data), "--small", "small", "--large", "large",
                 "--batch-size", "4", "--out", str(report)]) == 0  # fmt: skip
    assert json.loads(report.read_text())["n"] == 12


def test_latent_router_encoders_cut_alike(short_model, tmp_path):
    from routers.checkpoints import load_latent_router, save_latent_router
    from routers.data import parse_labelled
    from routers.latent.encoders import EncoderSpec, build_encoder
    from routers.latent.training import LatentTrainConfig, train_latent_router

    text = build_encoder(EncoderSpec("text", max_length=2000))
    assert text.truncation.max_tokens == 512 and text.spec.max_length == 512  # MiniLM's limit
    long = [[{"role": "user", "content": " ".join(["word"] * 900)}]]
    assert torch.isfinite(text.encode(long)).all()

    encoder = build_encoder(EncoderSpec("backbone", model=str(short_model), layer=2))
    assert encoder.truncation.max_tokens == POSITIONS and encoder.spec.max_length == POSITIONS
    rows = _long_rows(30, 5)
    for row in rows:
        row["outcomes"] = {"small": {**row["outcomes"]["small"], "cost": 1.0}, "large": {"correct": 1, "cost": 10.0}}
    requests = parse_labelled([json.dumps(r) for r in rows])
    result = train_latent_router(requests, encoder, {"hidden_size": 16}, LatentTrainConfig(epochs=1), progress=False)
    save_latent_router(result.router, tmp_path / "lr")
    saved = read_config(tmp_path / "lr")
    assert saved.truncation == Truncation(POSITIONS, 4) and saved.backbone.layer == 2
    shared = TruncatedBackbone(BackboneConfig(str(short_model), layer=2, max_tokens=32))
    with pytest.raises(CheckpointError, match="cut prompts alike|cuts them to 32"):
        load_latent_router(tmp_path / "lr", backbone=shared)
    loaded = load_latent_router(tmp_path / "lr")
    assert loaded.encoder.truncation == saved.truncation
