"""The in-process LatentRouter scorer: scores and costs of the pool, availability masking,
and one shared backbone prefill with the probes."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch

from extproc import BatchConfig, CheckpointError, ScorerError, ScorerOverloaded, describe_scorer, load_scorer
from routers.backbone import BackboneConfig, TruncatedBackbone
from routers.checkpoints import load_latent_router
from routers.forward_cost import UNMEASURED_COST, ForwardCost, LiveCost
from routers.latent.encoders import EncoderSpec
from tests.routers.serving.support import (
    CONVERSATIONS,
    POOL,
    far,
    forward_threads,
    latent_checkpoint,
    latent_spec,
    probe_checkpoints,
    probe_spec,
    request,
)
from tests.routers.test_probe_support import tiny_text_model


@pytest.fixture(scope="module")
def hashing_ckpt(tmp_path_factory):
    return latent_checkpoint(tmp_path_factory.mktemp("lr") / "hashing", EncoderSpec("hashing", dim=64))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("lrbb"))


def test_scores_are_the_routers_predictions_with_normalised_costs(hashing_ckpt):
    router = load_latent_router(hashing_ckpt)
    want = router.predict(CONVERSATIONS[:16]).mu_tilde

    async def main():
        scorer = await asyncio.to_thread(load_scorer, latent_spec(hashing_ckpt))
        try:
            return await asyncio.gather(*(scorer.score(request(m), deadline=far()) for m in CONVERSATIONS[:16]))
        finally:
            await scorer.close()

    scores = asyncio.run(main())
    assert max(s.batch_size for s in scores) > 1
    for row, s in zip(want.tolist(), scores):
        assert list(s.values) == list(POOL)
        assert [s.values[m] for m in POOL] == pytest.approx(row, abs=1e-5)
        assert dict(s.costs) == pytest.approx({"tiny": 0.05, "mid": 0.2, "large": 1.0})


def test_unavailable_models_are_masked_because_they_change_the_others_scores(hashing_ckpt):
    router = load_latent_router(hashing_ckpt)
    messages = CONVERSATIONS[:6]
    masked = router.predict(messages, available=["tiny", "large"]).mu_tilde
    full = router.predict(messages).mu_tilde
    # LatentRouter's models attend to each other: masking one moves the others' scores, so
    # the scorer must be told which models are available rather than the engine dropping some
    assert not torch.allclose(masked[:, [0, 2]], full[:, [0, 2]], atol=1e-4)

    async def main():
        scorer = await asyncio.to_thread(load_scorer, latent_spec(hashing_ckpt))
        try:
            got = await asyncio.gather(
                *(scorer.score(request(m), deadline=far(), available=["tiny", "large"]) for m in messages)
            )
            with pytest.raises(ScorerError, match="no pool model 'gpt-5'"):
                await scorer.score(request(messages[0]), deadline=far(), available=["tiny", "gpt-5"])
            with pytest.raises(ScorerError, match="no pool model is available"):
                await scorer.score(request(messages[0]), deadline=far(), available=[])
            return got
        finally:
            await scorer.close()

    got = asyncio.run(main())
    for row, s in zip(masked.tolist(), got):
        assert set(s.values) == {"tiny", "large"}  # an unavailable model gets no value
        assert [s.values["tiny"], s.values["large"]] == pytest.approx([row[0], row[2]], abs=1e-5)


def test_describe_gives_the_pool_and_refuses_the_wrong_kind(hashing_ckpt, tmp_path):
    described = describe_scorer(latent_spec(hashing_ckpt))
    assert described.outputs == POOL and described.pool == POOL
    folders = probe_checkpoints(tiny_text_model(tmp_path), tmp_path / "probes")
    with pytest.raises(CheckpointError, match="cannot serve scorer 'utility' .*use kind: probe"):
        describe_scorer(latent_spec(folders["last"]))
    with pytest.raises(CheckpointError, match="No checkpoint at"):
        describe_scorer(latent_spec(tmp_path / "nowhere"))


def test_a_backbone_encoder_shares_the_probes_backbone_and_prefill(model_dir, tmp_path):
    folders = probe_checkpoints(model_dir, tmp_path / "probes")
    own = TruncatedBackbone(BackboneConfig(str(model_dir), layer=2))
    ckpt = latent_checkpoint(tmp_path / "latent", EncoderSpec("backbone", model=str(model_dir), layer=2), backbone=own)
    offline = load_latent_router(ckpt)  # its own backbone, as `switchyard eval` runs it
    want = offline.predict(CONVERSATIONS[:8]).mu_tilde
    assert describe_scorer(latent_spec(ckpt)).backbones["tiny"] == describe_scorer(probe_spec(folders)).backbones["last"]

    async def both(probe, latent, messages):
        req = request(messages)
        p = await probe.score(req, deadline=far())
        u = await latent.score(req, deadline=far())  # the same request: its prefill is reused
        return p, u

    async def main():
        probe = await asyncio.to_thread(load_scorer, probe_spec(folders, batch=BatchConfig(max_size=8, max_wait_ms=50)))
        latent = await asyncio.to_thread(load_scorer, latent_spec(ckpt, batch=BatchConfig(max_size=8, max_wait_ms=50)))
        try:
            with forward_threads(probe.group.backbone) as calls:
                out = await asyncio.gather(*(both(probe, latent, m) for m in CONVERSATIONS[:8]))
                # asked at the same time, the two scorers still share one prefill
                req = request(CONVERSATIONS[9])
                await asyncio.gather(probe.score(req, deadline=far()), latent.score(req, deadline=far()))
        finally:
            await probe.close()
            await latent.close()
        return probe, latent, out, calls

    probe, latent, out, calls = asyncio.run(main())
    assert latent.group is probe.group and latent.router.encoder.backbone is probe.group.backbone
    # 8 requests x 2 scorers in one prefill batch, then 1 request x 2 scorers: 9 prefilled
    assert probe.group.batcher.stats.requests == 9 and probe.group.batcher.stats.batches == 2
    assert 2 <= len(calls) <= 9  # forwards (a batch may run as a few chunks of similar length)
    for row, (p, u) in zip(want.tolist(), out):
        assert set(p.values) == {"last", "attn", "relope"}
        assert [u.values[m] for m in POOL] == pytest.approx(row, abs=1e-5)
        assert u.batch_size == 8


def test_closing_the_last_scorer_on_a_backbone_stops_its_batcher(hashing_ckpt, model_dir, tmp_path):
    folders = probe_checkpoints(model_dir, tmp_path / "probes")

    async def main():
        first = await asyncio.to_thread(load_scorer, probe_spec(folders))
        second = await asyncio.to_thread(load_scorer, probe_spec(folders, "again"))
        assert first.group is second.group
        await first.close()
        assert not second.group.batcher.closed
        await second.score(request(CONVERSATIONS[0]), deadline=far())
        await second.close()
        return second.group

    group = asyncio.run(main())
    assert group.batcher.closed and not group.batcher.worker_thread.is_alive()


#: Eight prompts of eight different token lengths.
GROWING = [[{"role": "user", "content": " ".join(["word"] * k)}] for k in range(1, 9)]


@pytest.fixture(scope="module")
def text_ckpt(model_dir, tmp_path_factory):
    return latent_checkpoint(tmp_path_factory.mktemp("lrtext") / "text", EncoderSpec("text", model=str(model_dir)))


@contextlib.contextmanager
def encoder_forwards(encoder):
    """The rows of each forward of a ``text`` encoder while the block runs."""
    rows: list[int] = []

    def count(module, args, kwargs, out):
        rows.append(int(kwargs["input_ids"].shape[0]))

    hook = encoder.model.register_forward_hook(count, with_kwargs=True)
    try:
        yield rows
    finally:
        hook.remove()


def serve_together(ckpt, conversations, cost=None):
    """Score ``conversations`` concurrently on a fresh scorer (its live cost seeded with
    ``cost`` when given); the scores, the rows of each encoder forward, and the scorer."""

    async def main():
        scorer = await asyncio.to_thread(load_scorer, latent_spec(ckpt))
        if cost is not None:
            scorer.live_cost = LiveCost(cost)
        try:
            with encoder_forwards(scorer.router.encoder) as rows:
                scores = await asyncio.gather(*(scorer.score(request(m), deadline=far()) for m in conversations))
        finally:
            await scorer.close()
        return scores, rows, scorer

    return asyncio.run(main())


def test_a_text_encoders_batches_are_cut_by_its_measured_cost(text_ckpt):
    want = load_latent_router(text_ckpt).predict(GROWING).mu_tilde.tolist()
    scores, rows, scorer = serve_together(text_ckpt, GROWING)
    # measured once at load, and what the scorer cuts and admits by, refitted from each forward
    assert scorer.live_cost.seed is scorer.router.encoder.forward_cost
    assert scorer.live_cost.seed != UNMEASURED_COST
    assert scorer.live_cost.observed == len(rows)
    assert sum(rows) == 8 and len(rows) < 8  # 8 concurrent requests share forwards
    for row, s in zip(want, scores):
        assert [s.values[m] for m in POOL] == pytest.approx(row, abs=1e-5)


@pytest.mark.parametrize(
    ("cost", "forwards"),
    [
        (ForwardCost(fixed=1.0, per_token=0.0), "one per batch"),  # a forward's price is all fixed
        (ForwardCost(fixed=0.0, per_token=1.0), "one per length"),  # all padding: never share
    ],
)
def test_the_cost_decides_how_a_text_encoders_batch_is_cut(text_ckpt, cost, forwards):
    want = load_latent_router(text_ckpt).predict(GROWING).mu_tilde.tolist()
    scores, rows, scorer = serve_together(text_ckpt, GROWING, cost)
    if forwards == "one per batch":
        assert len(rows) == scorer.batcher.stats.batches < 8
    else:
        assert rows == [1] * 8
    for row, s in zip(want, scores):  # however cut, the same scores
        assert [s.values[m] for m in POOL] == pytest.approx(row, abs=1e-5)


def test_a_text_encoders_cost_admits_requests(text_ckpt):
    async def main():
        scorer = await asyncio.to_thread(load_scorer, latent_spec(text_ckpt))
        scorer.live_cost = LiveCost(ForwardCost(fixed=0.0, per_token=0.0))
        for _ in range(8):  # forwards that took 10 s each confirm the cost
            scorer.live_cost.observe(1, 16, 10.0)
        try:
            with encoder_forwards(scorer.router.encoder) as rows:
                with pytest.raises(ScorerOverloaded, match="predicted wait"):
                    await scorer.score(request(GROWING[0]), deadline=time.monotonic() + 1.0)
        finally:
            await scorer.close()
        return rows

    assert asyncio.run(main()) == []  # refused at once, before any forward
