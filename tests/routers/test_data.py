"""Labelled JSONL loading: the happy path and errors that name file:line and field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from routers.data import DataError, Outcome, dataset_hash, load_labelled


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


def test_import_is_light():
    code = "import sys, routers, routers.data, routers.metrics; print(any(m in sys.modules for m in ('torch', 'transformers', 'peft')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_probe_export_resolves():
    import routers

    probe_modules = ("routers.data", "routers.metrics", "routers.backbone", "routers.mlp", "routers.probe")
    for name, module in routers._EXPORTS.items():
        if module.startswith(probe_modules):
            assert getattr(routers, name) is not None, name
