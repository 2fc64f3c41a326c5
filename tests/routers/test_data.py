"""Labelled JSONL loading: the happy path and errors that name file:line and field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from routers.data import (
    DEFAULT_VAL_FRACTION,
    DataError,
    Outcome,
    dataset_hash,
    holdout_split,
    load_labelled,
    split_lines,
)


def _write(tmp_path, lines):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


GOOD = {
    "id": "q1",
    "messages": [{"role": "user", "content": "hi"}],
    "outcomes": {"small": {"correct": 1, "cost": 0.1}, "large": {"score": 0.5}},
}


def test_loads_outcomes_and_quality(tmp_path):
    path = _write(tmp_path, [GOOD, "", {**GOOD, "id": 2, "outcomes": {"small": {"correct": False}}}])
    reqs = load_labelled(path)
    assert [r.id for r in reqs] == ["q1", "2"]
    assert reqs[0].outcomes["small"] == Outcome(correct=1, score=None, cost=0.1)
    assert reqs[0].outcome("small").quality == 1.0
    assert reqs[0].outcome("large").quality == 0.5
    assert reqs[1].outcome("small").correct == 0
    with pytest.raises(DataError, match="no outcome for backend 'large'"):
        reqs[1].outcome("large")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"set.jsonl:2: not valid JSON"),
        ({**GOOD, "id": None}, r"set.jsonl:2: `id`"),
        ({**GOOD, "messages": []}, r"set.jsonl:2: `messages`"),
        ({**GOOD, "messages": [{"content": "x"}]}, r"`messages\[0\]`"),
        ({**GOOD, "outcomes": {}}, r"set.jsonl:2: `outcomes`"),
        ({**GOOD, "outcomes": {"s": {"correct": 2}}}, r"`outcomes.s`: `correct`"),
        ({**GOOD, "outcomes": {"s": {"cost": 1}}}, r"`outcomes.s`: needs `correct`"),
        ({**GOOD, "outcomes": {"s": {"correct": 1, "cost": -1}}}, r"`cost` must be >= 0"),
        ({**GOOD, "outcomes": {"s": {"score": "high"}}}, r"`score` must be a finite number"),
        (GOOD, r"set.jsonl:2: duplicate `id` 'q1' \(first at line 1\)"),
    ],
)
def test_errors_name_line_and_field(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        load_labelled(_write(tmp_path, [GOOD, line]))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_labelled(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no requests"):
        load_labelled(tmp_path / "empty.jsonl")


def test_dataset_hash_is_sha256_of_bytes(tmp_path):
    import hashlib

    path = _write(tmp_path, [GOOD])
    assert dataset_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_unicode_line_separators_inside_strings_are_data(tmp_path):
    # U+2028, U+2029 and U+0085 are valid raw inside JSON strings; str.splitlines() splits on them
    text = "first\u2028second\u2029third\u0085fourth\x1cfifth"
    path = tmp_path / "scraped.jsonl"
    rows = [{**GOOD, "messages": [{"role": "user", "content": text}]}, {**GOOD, "id": "q2"}]
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\r\n" for r in rows))
    assert "\u2028".encode() in path.read_bytes()  # raw, not escaped
    requests = load_labelled(path)
    assert [r.id for r in requests] == ["q1", "q2"]
    assert requests[0].messages[0]["content"] == text
    assert split_lines("a\r\nb\u2028c\n\nd") == ["a", "b\u2028c", "", "d"]


def ids(n: int) -> list[str]:
    return [f"q{i}" for i in range(n)]


def test_holdout_split_is_seeded_disjoint_and_one_default():
    train, val = holdout_split(ids(100), DEFAULT_VAL_FRACTION, seed=3)
    assert len(val) == 15 and sorted(train + val) == list(range(100)) and not set(train) & set(val)
    assert train == sorted(train)
    assert holdout_split(ids(100), DEFAULT_VAL_FRACTION, seed=3) == (train, val)
    assert holdout_split(ids(100), DEFAULT_VAL_FRACTION, seed=4)[1] != val
    assert holdout_split(ids(9), 0.5) == (list(range(9)), [])  # too small to validate on
    assert holdout_split(ids(50), 0.0) == (list(range(50)), [])
    assert len(holdout_split(ids(10), 0.01)[1]) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        holdout_split(ids(50), 1.0)


def test_the_held_out_requests_follow_their_ids_not_their_order_in_the_file():
    """`switchyard label` writes rows as they finish: the same rows in another order must
    give the same held-out requests (the loop test found 52 of 120 rows out of order)."""
    names = ids(120)
    shuffled = names[::-1][60:] + names[::-1][:60]
    held = {names[i] for i in holdout_split(names, DEFAULT_VAL_FRACTION)[1]}
    assert {shuffled[i] for i in holdout_split(shuffled, DEFAULT_VAL_FRACTION)[1]} == held


def test_probes_and_latent_router_hold_out_the_same_default():
    from routers.latent.training import LatentTrainConfig
    from routers.probes.training import TrainConfig

    assert TrainConfig().val_fraction == LatentTrainConfig().val_fraction == DEFAULT_VAL_FRACTION


def test_import_is_light():
    code = "import sys, routers, routers.data, routers.metrics; print(any(m in sys.modules for m in ('torch', 'transformers', 'peft')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_extproc_import_does_not_load_grpc_or_envoy_protos():
    code = (
        "import sys, extproc, routers.data, routers.checkpoints, routers.truncation\n"
        "from extproc import CheckpointError, ScorerError, message_text\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'envoy', 'google', 'xds', 'yaml', 'torch')"
        " or m in ('extproc.server._servicer', 'extproc.engine._engine', 'extproc.policy._loading')]\n"
        "print(heavy)\n"
        "extproc.ExternalProcessor\n"  # a lazy name still resolves, and then loads grpc
        "print('grpc' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_every_probe_export_resolves():
    import routers

    probe_modules = ("routers.data", "routers.metrics", "routers.backbone", "routers.probes")
    for name, module in routers._EXPORTS.items():
        if module.startswith(probe_modules):
            assert getattr(routers, name) is not None, name
