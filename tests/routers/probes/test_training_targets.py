"""Graded and failed outcomes, the probe's training target, and the validation rows training
writes, through the real CLI (tiny random-initialised backbone)."""

from __future__ import annotations

import json
import logging
import random

import pytest

from extproc.cli import main
from routers.checkpoints import read_config
from routers.data import DataError, load_labelled, parse_labelled, without_failed
from routers.probes.training import target_labels
from tests.routers.test_probe_support import WORDS, tiny_text_model, write_jsonl

#: A failed outcome exactly as `switchyard label` writes it.
FAILED = {"error": "timeout", "cost": 0.0}


def gain_set(n: int, seed: int) -> list[dict]:
    """Three kinds of request, so the two targets differ: "zebra" (small wrong, large right:
    gain), "lion" (both wrong: no gain, yet the small model is not good enough) and plain
    ones (both right)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        kind = ("zebra", "lion", None)[i % 3]
        if kind:
            words.insert(rng.randrange(len(words) + 1), kind)
        small, large = {"zebra": (0, 1), "lion": (0, 0), None: (1, 1)}[kind]
        rows.append({
            "id": f"{seed}-{i}", "kind": kind or "plain",
            "messages": [{"role": "user", "content": " ".join(words)}],
            "outcomes": {"small": {"correct": small, "cost": 0.1}, "large": {"correct": large, "cost": 1.0}},
        })
    return rows


def _row(outcomes: dict) -> str:
    return json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}], "outcomes": outcomes})


def test_graded_correct_is_accepted_and_bad_values_name_file_and_line():
    (request,) = parse_labelled([_row({"s": {"correct": 0.7}, "l": {"correct": True}})], source="f.jsonl")
    assert request.outcome("s").correct == 0.7 and request.outcome("s").quality == 0.7
    assert request.outcome("l").correct == 1
    for bad in ("1.5", "-0.1", "NaN", "Infinity", '"yes"'):
        line = _row({"s": {"correct": 0}}).replace('"correct": 0', f'"correct": {bad}')
        with pytest.raises(DataError, match=r"^f\.jsonl:2: `outcomes\.s`: `correct` must be .*graded value in \[0, 1\]"):
            parse_labelled(["", line], source="f.jsonl")


def test_a_failed_outcome_is_accepted_and_skipped_with_a_count(caplog):
    rows = parse_labelled([
        _row({"s": FAILED, "l": {"correct": 1}}),
        _row({"s": {"correct": 1}, "l": {"correct": 0}}).replace('"a"', '"b"'),
    ])
    assert rows[0].outcome("s").failed and rows[0].outcome("s").error == "timeout" and rows[0].outcome("s").cost == 0.0
    assert rows[0].outcome("s").quality is None and not rows[1].outcome("s").failed
    with caplog.at_level(logging.WARNING, logger="routers.data"):
        kept = without_failed(rows, ("s", "l"), "train on")
    assert [r.id for r in kept] == ["b"]
    assert "Skipped 1 of 2 requests whose outcome for s, l failed" in caplog.text
    assert without_failed(rows, ("l",)) == rows  # only the outcomes needed count
    with pytest.raises(DataError, match="cannot also have `correct`"):
        parse_labelled([_row({"s": {"error": "timeout", "correct": 1}})])
    with pytest.raises(DataError, match="`error` must be a non-empty string"):
        parse_labelled([_row({"s": {"error": ""}})])


def test_the_targets_label_differently():
    requests = parse_labelled([json.dumps(r) for r in gain_set(6, 0)])
    assert target_labels(requests, "small_ok", "small").tolist() == [0, 0, 1, 0, 0, 1]
    assert target_labels(requests, "gain", "small", "large").tolist() == [1, 0, 0, 1, 0, 0]
    graded = parse_labelled([_row({"s": {"correct": 0.25}, "l": {"score": 0.75}})])
    assert target_labels(graded, "gain", "s", "l").tolist() == [0.5]  # the graded difference, clipped
    with pytest.raises(DataError, match="needs the large backend's name"):
        target_labels(requests, "gain", "small")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    model = tiny_text_model(root)
    rows = gain_set(150, 1)
    rows[5]["outcomes"]["large"] = FAILED  # a failed call: skipped for gain, not for small_ok
    train = write_jsonl(root / "train.jsonl", rows)
    test = write_jsonl(root / "test.jsonl", gain_set(60, 2))
    return root, model, train, test


def _train(model, train, out, *extra):
    return main([
        "train", "probe", "--method", "attention", "--backbone", str(model), "--data", str(train),
        "--small", "small", "--out", str(out), "--epochs", "12", "--lr", "5e-3", "--patience", "12",
        "--mlp-depth", "2", "--mlp-width", "32", "--no-progress", *extra,
    ])  # fmt: skip


def _scores_by_kind(path, rows) -> dict[str, float]:
    kind = {r["id"]: r["kind"] for r in rows}
    by: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by.setdefault(kind[row["id"]], []).append(row["score"])
    return {k: sum(v) / len(v) for k, v in by.items()}


def test_both_targets_train_evaluate_and_calibrate(workspace, capsys):
    root, model, train, test = workspace
    test_rows = [json.loads(line) for line in test.read_text().splitlines()]
    means = {}
    for target in ("small_ok", "gain"):
        out = root / target
        extra = ["--target", target, "--large", "large"] if target == "gain" else []
        assert _train(model, train, out, *extra) == 0
        config = read_config(out)
        assert config.target == target and config.raw["target"] == target
        assert config.large == ("large" if target == "gain" else None)
        printed = capsys.readouterr()
        assert f"target {target}" in printed.out
        skipped = "Skipped 1 of 150 requests whose outcome for small, large failed"
        assert (skipped in printed.err) == (target == "gain")  # small_ok reads no large outcome
        scores = root / f"{target}.scores.jsonl"
        report_path = root / f"{target}.json"
        assert main([
            "eval", "--checkpoint", str(out), "--data", str(test), "--small", "small", "--large", "large",
            "--out", str(report_path), "--scores-out", str(scores),
        ]) == 0  # fmt: skip
        report = json.loads(report_path.read_text())
        assert report["target"] == target and report["roc_auc"] > 0.75 and report["apgr"] > 0.6
        assert len(scores.read_text().splitlines()) == 60
        means[target] = _scores_by_kind(scores, test_rows)
        assert main(["calibrate", "--checkpoint", str(out), "--data", str(test), "--large-share", "0.3"]) == 0
        (threshold,) = read_config(out).thresholds
        assert threshold.large_when == ("above" if target == "gain" else "below")
        assert threshold.achieved_share == pytest.approx(0.3, abs=0.02)
        assert ("at or above it" if target == "gain" else "below it") in capsys.readouterr().out
    # small_ok: the small model fails on "zebra" and "lion" alike; gain: only "zebra" pays for the large one
    assert means["small_ok"]["zebra"] < means["small_ok"]["plain"] and means["small_ok"]["lion"] < means["small_ok"]["plain"]
    assert means["gain"]["zebra"] > means["gain"]["lion"] and means["gain"]["zebra"] > means["gain"]["plain"]


def test_gain_needs_large(workspace, capsys):
    root, model, train, _ = workspace
    assert _train(model, train, root / "bad", "--target", "gain") == 1
    assert "needs the large backend's name (--large)" in capsys.readouterr().err
    assert not (root / "bad").exists()


def test_training_writes_its_held_out_rows(workspace, capsys):
    root, model, train, _ = workspace
    out = root / "small_ok"  # written by the test above when it ran; else train it here
    if not out.exists():
        assert _train(model, train, out) == 0
    config = read_config(out)
    validation = config.training["validation"]
    held = load_labelled(out / "validation.jsonl")
    assert validation["source"] == "held_out" and validation["file"] == "validation.jsonl"
    assert len(held) == validation["n_val"] == round(0.15 * 150)
    train_lines = set(train.read_text().splitlines())
    assert all(line in train_lines for line in (out / "validation.jsonl").read_text().splitlines())
    with_val = root / "given_val"
    assert _train(model, train, with_val, "--val", str(train), "--epochs", "1") == 0
    assert not (with_val / "validation.jsonl").exists()  # nothing was held out


@pytest.mark.parametrize(("target", "share"), [("small_ok", 2 / 3), ("gain", 1 / 3)])
def test_the_calibrate_hint_names_the_share_the_held_out_labels_send_to_large(target, share):
    """`train probe` used to suggest `--large-share 0.2` whatever the labels said; it now
    suggests the share of the held-out rows whose labels say "large" (the failed share)."""
    import argparse

    from routers.probes.cli import _labelled_large_share

    requests = parse_labelled([json.dumps(row) for row in gain_set(30, seed=4)])
    args = argparse.Namespace(target=target, small="small", large="large")
    assert _labelled_large_share(requests, [r.id for r in requests], args) == pytest.approx(share)
