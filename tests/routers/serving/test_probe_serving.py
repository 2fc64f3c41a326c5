"""The in-process probe scorer: batched scores equal scores alone, one prefill, NaN fails,
checkpoints described without torch and refused clearly when broken."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from extproc import BatchConfig, CheckpointError, ScorerError, describe_scorer, load_scorer
from routers.forward_cost import ForwardCost
from routers.probes.offline import ProbeScorer
from tests.routers.serving.support import CONVERSATIONS, far, forward_threads, probe_checkpoints, probe_spec, request
from tests.routers.test_probe_support import layers_run, tiny_text_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def folders(model_dir, tmp_path_factory):
    return probe_checkpoints(model_dir, tmp_path_factory.mktemp("probes"))


@pytest.mark.parametrize("cost", [None, ForwardCost(fixed=1.0, per_token=0.0), ForwardCost(fixed=0.0, per_token=1.0)],
                         ids=["measured", "one-forward-a-batch", "no-fixed-cost"])
def test_64_concurrent_requests_each_get_their_own_score_equal_to_scoring_alone(folders, cost):
    # whatever the cut of a batch into forwards (one padded forward of unsorted requests
    # once gave each request another's scores), each request gets its own
    async def main():
        batched = await asyncio.to_thread(load_scorer, probe_spec(folders))
        if cost is not None:
            batched.group.cost = cost
        alone = await asyncio.to_thread(load_scorer, probe_spec(folders, "alone", batch=BatchConfig(max_size=1, max_wait_ms=0)))
        try:
            together = await asyncio.gather(*(batched.score(request(m), deadline=far()) for m in CONVERSATIONS))
            one_by_one = [await alone.score(request(m), deadline=far()) for m in CONVERSATIONS]
        finally:
            await batched.close()
            await alone.close()
        return batched, alone, together, one_by_one

    batched, alone, together, one_by_one = asyncio.run(main())
    assert alone.group.backbone is batched.group.backbone  # the weights are loaded once
    assert max(s.batch_size for s in together) > 1 and all(s.batch_size == 1 for s in one_by_one)
    for got, want in zip(together, one_by_one):
        assert set(got.values) == {"last", "attn", "relope"}
        for name in want.values:
            assert got.values[name] == pytest.approx(want.values[name], abs=1e-5)
    # and what serving scores is what offline evaluation scores
    offline = ProbeScorer(batched.group.backbone, batched.member.probes).score(CONVERSATIONS)
    for name, values in offline.items():
        assert [s.values[name] for s in together] == pytest.approx(values, abs=1e-5)
    spread = [s.values["relope"] for s in together]
    assert max(spread) - min(spread) > 1e-3  # the requests really score differently


def test_the_forward_runs_off_the_event_loop_once_per_batch(folders):
    async def main():
        scorer = await asyncio.to_thread(load_scorer, probe_spec(folders, batch=BatchConfig(max_size=64, max_wait_ms=50)))
        try:
            with forward_threads(scorer.group.backbone) as calls:
                scores = await asyncio.gather(*(scorer.score(request(m), deadline=far()) for m in CONVERSATIONS[:8]))
        finally:
            await scorer.close()
        return threading.get_ident(), calls, scores, scorer

    loop_thread, calls, scores, scorer = asyncio.run(main())
    assert set(calls) == {scorer.group.batcher.worker_thread.ident} and loop_thread not in calls
    assert scorer.group.batcher.stats.batches == 1  # one prefill batch for 8 requests x 3 probes
    assert all(s.batch_size == 8 for s in scores)


def test_a_batch_runs_as_the_forwards_its_measured_cost_predicts_cheapest(folders):
    from routers.serving.prefill import PrefillGroup

    scorer = load_scorer(probe_spec(folders))
    try:
        group: PrefillGroup = scorer.group
        assert group.cost.fixed > 0 and group.cost.per_token > 0  # measured at load
        convs = [[{"role": "user", "content": " ".join(["word"] * n)}] for n in (5, 40, 5, 41, 5, 200)]
        batch = group.backbone.encode(convs)
        group.cost = ForwardCost(fixed=0.0, per_token=1.0)  # padding is all that costs
        assert group._chunks(batch) == [[0, 2, 4], [1], [3], [5]]
        group.cost = ForwardCost(fixed=1.0, per_token=0.0)  # a forward is what costs
        assert group._chunks(batch) == [[0, 2, 4, 1, 3, 5]]
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        assert lengths[0] == lengths[2] == lengths[4] < lengths[1] < lengths[3] < lengths[5]  # e.g. 23, 163, 167, 512
        group.cost = ForwardCost(fixed=10.0, per_token=1.0)  # 4 tokens of padding beat a forward
        assert group._chunks(batch) == [[0, 2, 4], [1, 3], [5]]
        # the rows come out forward by forward, shortest first: a short prompt is not kept
        # waiting for the long one's forward
        parts = list(group._forward(convs))
        assert [indices for indices, _ in parts] == [[0, 2, 4], [1, 3], [5]]
        assert all(scorer.member.key in row for _, rows in parts for row in rows)
        group.cost = ForwardCost(fixed=500.0, per_token=1.0)  # ~430 tokens of padding beat one
        assert group._chunks(batch) == [[0, 2, 4, 1, 3], [5]]
        assert group._chunks(group.backbone.encode(convs[:1])) == [[0]]
    finally:
        asyncio.run(scorer.close())


def test_a_nan_probe_is_a_scorer_error_and_fails_only_its_request(folders):
    async def main():
        scorer = await asyncio.to_thread(load_scorer, probe_spec(folders, batch=BatchConfig(max_size=8, max_wait_ms=50)))
        probe = scorer.member.probes["last"]
        original = probe.forward

        def forward(states):
            logits = original(states)
            return torch.cat([torch.full_like(logits[:1], float("nan")), logits[1:]])  # the batch's first row

        probe.forward = forward
        try:
            return await asyncio.gather(
                *(scorer.score(request(m), deadline=far()) for m in CONVERSATIONS[:4]), return_exceptions=True
            )
        finally:
            del probe.forward
            await scorer.close()

    results = asyncio.run(main())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], ScorerError)
    assert "Scorer 'probe'" in str(failed[0]) and "'last' returned a NaN" in str(failed[0])
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 3


def test_a_probe_with_nan_weights_fails_every_request(folders, tmp_path):
    broken = {name: tmp_path / name for name in folders}
    for name, folder in folders.items():
        shutil.copytree(folder, broken[name])

    async def main():
        scorer = await asyncio.to_thread(load_scorer, probe_spec(broken))
        with torch.no_grad():
            scorer.member.probes["attn"].mlp.net[-1].bias.fill_(float("nan"))
        try:
            return await asyncio.gather(
                *(scorer.score(request(m), deadline=far()) for m in CONVERSATIONS[:3]), return_exceptions=True
            )
        finally:
            await scorer.close()

    results = asyncio.run(main())
    assert all(isinstance(r, ScorerError) and "NaN" in str(r) for r in results)


def test_a_missed_deadline_is_a_scorer_error(folders):
    async def main():
        scorer = await asyncio.to_thread(load_scorer, probe_spec(folders))
        try:
            with pytest.raises(ScorerError, match="deadline"):
                await scorer.score(request(CONVERSATIONS[0]), deadline=0.0)  # long past
            return await scorer.score(request(CONVERSATIONS[0]), deadline=far())
        finally:
            await scorer.close()

    assert set(asyncio.run(main()).values) == {"last", "attn", "relope"}


def test_describe_reads_outputs_backbone_and_thresholds_without_torch(folders):
    code = (
        "import sys, json\n"
        "from extproc import ScorerSpec, describe_scorer\n"
        f"spec = ScorerSpec(name='p', kind='probe', checkpoints={tuple((k, str(v)) for k, v in folders.items())!r})\n"
        "d = describe_scorer(spec)\n"
        "print(json.dumps({'outputs': d.outputs, 'backbones': len(set(d.backbones.values())), "
        "'thresholds': {k: list(v.items()) for k, v in d.thresholds.items()}, 'torch': 'torch' in sys.modules}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out == {
        "outputs": ["last", "attn", "relope"],
        "backbones": 1,  # probes at layers 2 and 3 of one model: one identity
        "thresholds": {name: [[0.2, 0.4]] for name in ("last", "attn", "relope")},
        "torch": False,
    }


def test_describe_and_load_refuse_broken_checkpoints_naming_the_folder(folders, model_dir, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(CheckpointError, match=f"No checkpoint at {missing}"):
        describe_scorer(probe_spec({"a": missing}))
    bad_json = tmp_path / "bad"
    shutil.copytree(folders["last"], bad_json)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{bad_json}/config.json is not valid JSON"):
        describe_scorer(probe_spec({"a": bad_json}))
    with pytest.raises(CheckpointError, match="names no probe checkpoints"):
        describe_scorer(probe_spec({}))
    # a probe trained on another model cannot join its siblings
    other = probe_checkpoints(tiny_text_model(tmp_path, seed=3), tmp_path / "other", seed=1)
    mixed = {"last": folders["last"], "other": other["attn"]}
    described = describe_scorer(probe_spec(mixed))
    assert described.backbones["last"] != described.backbones["other"]
    with pytest.raises(CheckpointError, match="must share one backbone"):
        load_scorer(probe_spec(mixed))
    # weights that do not match their config
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folders["last"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="Cannot load"):
        load_scorer(probe_spec({"a": corrupt}))


def test_probes_reading_only_what_enters_their_layer_never_run_it(folders):
    # the Attention Probe and ReLope on layer 2 read its input: layer 2 and later never run
    async def main():
        scorer = await asyncio.to_thread(load_scorer, probe_spec({k: folders[k] for k in ("attn", "relope")}, "inputs"))
        try:
            with layers_run(scorer.group.backbone) as ran:
                scores = await asyncio.gather(*(scorer.score(request(m), deadline=far()) for m in CONVERSATIONS[:4]))
        finally:
            await scorer.close()
        return scores, set(ran)

    scores, ran = asyncio.run(main())
    assert ran == {1}
    offline = ProbeScorer.from_checkpoints({k: folders[k] for k in ("attn", "relope")}).score(CONVERSATIONS[:4])
    for name, values in offline.items():  # offline scoring stops alike and agrees
        assert [s.values[name] for s in scores] == pytest.approx(values, abs=1e-5)
