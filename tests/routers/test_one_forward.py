"""One probe forward: what ``switchyard eval`` and ``calibrate`` score is what the served
scorer scores, on the same rows, to 1e-6 — for the last-token probe, the Attention Probe and
ReLope, with prompts long enough to be cut — because offline scoring runs the serving
prefill's own forward (:func:`routers.serving.prefill.prefill_forward`), not a copy of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil

import pytest

from extproc import load_scorer
from extproc.cli import main
from routers.backbone import TruncatedBackbone
from routers.forward_cost import ForwardCost
from routers.metrics import threshold_for_share
from routers.serving.prefill import ProbeMember
from tests.routers.serving.support import far, probe_checkpoints, probe_spec, request
from tests.routers.test_probe_support import WORDS, tiny_text_model, trigger_set, write_jsonl

#: The tiny model's positions, so its checkpoints cut prompts to this many tokens.
MAX_TOKENS = 64
KINDS = ("last", "attn", "relope")


@pytest.fixture(autouse=True)
def one_forward_a_window(monkeypatch):
    """A forward is all that costs, so eval's windows (``--batch-size 4``) and served batches
    each run as one padded forward of rows of different lengths, whatever this machine's
    speed (a measured cost may cut them into one-row forwards, where padding never shows)."""
    monkeypatch.setattr(TruncatedBackbone, "forward_cost", property(lambda self: ForwardCost(fixed=1.0, per_token=0.0)))


def _long_rows(n: int, seed: int) -> list[dict]:
    """Prompts from under to far over :data:`MAX_TOKENS` tokens."""
    rng = random.Random(seed)
    return [
        {
            "id": f"long-{i}",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(20 + 35 * i))},
            ],
            "outcomes": {"small": {"correct": i % 2}, "large": {"correct": 1}},
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_forward")
    model = tiny_text_model(root, positions=MAX_TOKENS)
    folders = probe_checkpoints(model, root / "probes")
    rows = trigger_set(14, seed=7) + _long_rows(8, seed=7)
    random.Random(1).shuffle(rows)  # long and short rows interleaved, as traffic comes
    return folders, write_jsonl(root / "rows.jsonl", rows), rows


def _served(folders, rows) -> tuple[dict[str, list[float]], list[int]]:
    """Each row's served scores (concurrent requests, so forwards are batched and padded)."""

    async def run():
        scorer = await asyncio.to_thread(load_scorer, probe_spec(folders))
        try:
            return await asyncio.gather(*(scorer.score(request(r["messages"]), deadline=far()) for r in rows))
        finally:
            await scorer.close()

    scores = asyncio.run(run())
    return {name: [s.values[name] for s in scores] for name in folders}, [s.batch_size for s in scores]


def _evaluated(folder, data, out) -> list[float]:
    """The scores ``switchyard eval --scores-out`` writes, in the data's order."""
    assert main(["eval", "--checkpoint", str(folder), "--data", str(data), "--small", "small",
                 "--large", "large", "--scores-out", str(out), "--batch-size", "4"]) == 0  # fmt: skip
    return [json.loads(line)["score"] for line in out.read_text().splitlines()]


@contextlib.contextmanager
def _fed(monkeypatch):
    """Per row, what each scoring forward gave the backbone: its token ids, whether it was
    right-padded to its forward's longest row, whether that forward padded any row, and the
    layers the forward read (and how)."""
    seen: list[tuple] = []
    original = TruncatedBackbone.states

    def states(self, batch, layers=None, *, last_only=(), input_only=(), grad_safe=False):
        mask = batch["attention_mask"]
        lengths = mask.sum(dim=1).tolist()
        for ids, row, n in zip(batch["input_ids"].tolist(), mask.tolist(), lengths, strict=True):
            right_padded = row == [1] * n + [0] * (len(row) - n) and len(row) == max(lengths)
            padded = min(lengths) < max(lengths)
            seen.append((tuple(ids[:n]), right_padded, padded, tuple(layers), tuple(last_only), tuple(input_only)))
        return original(self, batch, layers, last_only=last_only, input_only=input_only, grad_safe=grad_safe)

    with monkeypatch.context() as patch:
        patch.setattr(TruncatedBackbone, "states", states)
        yield seen


def test_eval_scores_are_the_served_scores_for_every_probe_kind(workspace, tmp_path):
    folders, data, rows = workspace
    served, batch_sizes = _served(folders, rows)
    assert max(batch_sizes) > 1  # served forwards were batched, so rows were padded
    for name in KINDS:
        offline = _evaluated(folders[name], data, tmp_path / f"{name}.jsonl")
        assert offline == pytest.approx(served[name], abs=1e-6, rel=0), name
        assert max(offline) - min(offline) > 1e-3  # rows really score differently


def test_calibrate_cuts_the_served_scores(workspace, tmp_path):
    folders, data, rows = workspace
    served, _ = _served(folders, rows)
    for name in KINDS:
        folder = shutil.copytree(folders[name], tmp_path / name)
        assert main(["calibrate", "--checkpoint", str(folder), "--data", str(data), "--large-share", "0.3"]) == 0
        stored = json.loads((folder / "config.json").read_text())["thresholds"]
        (threshold,) = [t["threshold"] for t in stored if t["large_share"] == 0.3]
        assert threshold == pytest.approx(threshold_for_share(served[name], 0.3), abs=1e-6, rel=0), name


def test_eval_runs_the_serving_forward_on_the_same_inputs(workspace, tmp_path, monkeypatch):
    folders, data, rows = workspace
    with _fed(monkeypatch) as live:
        _served({"relope": folders["relope"]}, rows)
    with _fed(monkeypatch) as offline:
        _evaluated(folders["relope"], data, tmp_path / "scores.jsonl")
    # every row reaches the backbone as the same tokens (cut alike), right-padded to its
    # forward's longest row, reading the same layers the same way
    def rows_fed(seen):
        return sorted((ids, right_padded, *how) for ids, right_padded, _, *how in seen)

    assert rows_fed(offline) == rows_fed(live) and len(offline) == len(rows)
    assert all(right_padded for _, right_padded, *_ in offline)
    assert any(padded for _, _, padded, *_ in offline) and any(padded for _, _, padded, *_ in live)
    assert max(len(ids) for ids, *_ in offline) == MAX_TOKENS  # some rows were cut

    # and what the served forward computes is what eval reports: a change to the serving
    # member's compute shows in eval's scores
    original = ProbeMember.compute

    def shifted(self, out, rows_):
        return [{k: v - 0.25 for k, v in row.items()} for row in original(self, out, rows_)]

    plain = _evaluated(folders["relope"], data, tmp_path / "plain.jsonl")
    monkeypatch.setattr(ProbeMember, "compute", shifted)
    moved = _evaluated(folders["relope"], data, tmp_path / "moved.jsonl")
    assert moved == pytest.approx([p - 0.25 for p in plain], abs=1e-6)
