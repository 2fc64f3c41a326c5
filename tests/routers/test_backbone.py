"""The truncated backbone returns the full model's layer states, loads fewer weights, and
reads chat messages (text, data: images) safely."""

from __future__ import annotations

import pytest
import torch

from extproc import CheckpointError, ImageLimits, ScorerError
from routers.backbone import BackboneConfig, TruncatedBackbone
from tests.routers.test_probe_support import (
    data_url,
    layers_run,
    minilm_dir,
    tiny_text_model,
    tiny_vl_model,
)

CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a much longer prompt with many more words"}]},
    ],
]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("bb"))


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return tiny_vl_model(tmp_path_factory.mktemp("bbvl"))


def _assert_matches_full(backbone, full, batch, layers):
    out = backbone.states(batch, layers)
    with torch.no_grad():
        hidden = full(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    for layer in layers:
        torch.testing.assert_close(out.layer(layer)[mask], hidden[layer][mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.at(layer).prev[mask], hidden[layer - 1][mask], rtol=1e-5, atol=1e-5)
    return out


def test_text_model_matches_full_forward(text_dir):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(text_dir).eval()
    backbone = TruncatedBackbone(BackboneConfig(str(text_dir), layer=3))
    assert len(backbone._layer_list) == 3  # layer 4 was never built
    assert sum(p.numel() for p in backbone.model.parameters()) < sum(p.numel() for p in full.model.parameters())
    batch = backbone.encode(CONVERSATIONS)
    assert batch["attention_mask"][0, -1] == 0  # right padding
    out = _assert_matches_full(backbone, full, batch, [1, 2, 3])
    # a request's states do not depend on its batch (right padding, causal attention)
    alone = backbone.run(CONVERSATIONS[:1], [3]).at(3).last()
    torch.testing.assert_close(alone, out.at(3).last()[:1], rtol=1e-5, atol=1e-5)
    # re-running layer l on the captured inputs reproduces its output
    states = out.at(3)
    torch.testing.assert_close(states.replay(backbone.layer_module(3))[mask := batch["attention_mask"].bool()], states.hidden[mask])


def test_multimodal_model_matches_full_forward(vl_dir):
    from transformers import Qwen2VLForConditionalGeneration

    full = Qwen2VLForConditionalGeneration.from_pretrained(vl_dir).eval()
    backbone = TruncatedBackbone(BackboneConfig(str(vl_dir), layer=2))  # the processor as loaded from the folder
    assert hasattr(backbone.model, "visual") and len(backbone._layer_list) == 2
    image = [{"type": "image_url", "image_url": {"url": data_url((200, 30, 30))}}, {"type": "text", "text": "what?"}]
    batch = backbone.encode([[{"role": "user", "content": image}], CONVERSATIONS[0]])
    assert "pixel_values" in batch
    _assert_matches_full(backbone, full, batch, [1, 2])


def test_encoder_model_matches_full_forward():
    from transformers import AutoModel

    path = minilm_dir()
    full = AutoModel.from_pretrained(path).eval()
    backbone = TruncatedBackbone(BackboneConfig(str(path), layer=4))
    assert backbone.is_encoder and len(backbone._layer_list) == 4
    _assert_matches_full(backbone, full, backbone.encode(CONVERSATIONS), [3, 4])


def test_wrap_truncates_in_place(text_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(text_dir)
    backbone = TruncatedBackbone(
        BackboneConfig(str(text_dir), layer=2), model=model, processor=AutoTokenizer.from_pretrained(text_dir)
    )
    assert len(model.layers) == 2 and backbone.total_layers == 4


def test_describe_fingerprints_weights(text_dir, tmp_path):
    first = TruncatedBackbone(BackboneConfig(str(text_dir), layer=2)).describe()
    again = TruncatedBackbone(BackboneConfig(str(text_dir), layer=2)).describe()
    other = TruncatedBackbone(BackboneConfig(str(tiny_text_model(tmp_path, seed=1)), layer=2)).describe()
    assert first == again
    assert first["num_layers"] == 4 and first["layer"] == 2 and first["hidden_size"] == 32
    assert other["fingerprint"] != first["fingerprint"]


def test_bad_inputs_get_clear_errors(text_dir, vl_dir):
    with pytest.raises(ValueError, match=r"Probe layer must be an integer in 1..4"):
        TruncatedBackbone(BackboneConfig(str(text_dir), layer=5))
    with pytest.raises(ValueError, match="`layer` must be an integer >= 1"):
        BackboneConfig(str(text_dir), layer=0)
    with pytest.raises(CheckpointError, match="Cannot load a model config"):
        TruncatedBackbone(BackboneConfig(str(text_dir / "nope"), layer=1))
    text = TruncatedBackbone(BackboneConfig(str(text_dir), layer=1))
    image = [{"type": "image_url", "image_url": {"url": data_url((0, 0, 0))}}]
    with pytest.raises(ScorerError, match="takes no images"):
        text.encode([[{"role": "user", "content": image}]])
    vl = TruncatedBackbone(BackboneConfig(str(vl_dir), layer=1, images=ImageLimits(max_pixels=1000)))
    remote = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    with pytest.raises(ScorerError, match="never fetched"):
        vl.encode([[{"role": "user", "content": remote}]])
    with pytest.raises(ScorerError, match="over images.max_pixels=1000"):
        vl.encode([[{"role": "user", "content": image}]])
    broken = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]
    with pytest.raises(ScorerError, match="not valid base64"):
        vl.encode([[{"role": "user", "content": broken}]])


def test_default_dtype_is_fp32_on_cpu(text_dir):
    backbone = TruncatedBackbone(BackboneConfig(str(text_dir), layer=1, device="cpu"))
    assert backbone.dtype == torch.float32 and backbone.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_dtype_is_bf16_on_cuda_and_close_to_fp32(text_dir):
    gpu = TruncatedBackbone(BackboneConfig(str(text_dir), layer=2, device="cuda"))
    cpu = TruncatedBackbone(BackboneConfig(str(text_dir), layer=2, device="cpu"))
    assert gpu.dtype == torch.bfloat16
    a = gpu.run(CONVERSATIONS).at(2).last().float().cpu()
    b = cpu.run(CONVERSATIONS).at(2).last()
    torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_last_only_cuts_the_deepest_feed_forward_to_the_last_token(text_dir):
    backbone = TruncatedBackbone(BackboneConfig(str(text_dir), layer=3))
    batch = backbone.encode(CONVERSATIONS)
    full = backbone.states(batch, [2, 3])
    seen = []
    handle = backbone.layer_module(3).mlp.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        cut = backbone.states(batch, [2, 3], last_only=[2, 3])
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 1, 32])]  # the deepest layer's MLP saw one token per row
    assert cut.at(3).last_only and not cut.at(2).last_only  # layer 2 feeds layer 3: kept whole
    torch.testing.assert_close(cut.at(3).last(), full.at(3).last())
    torch.testing.assert_close(cut.layer(2), full.layer(2))
    with pytest.raises(ValueError, match="last token only"):
        cut.layer(3)


def _layers_run(backbone, fn):
    """``fn()``, and which layers ran during it."""
    with layers_run(backbone) as ran:
        return fn(), ran


@pytest.mark.parametrize("path", ["text", "minilm"])
def test_the_forward_stops_once_every_state_it_reads_is_in_hand(text_dir, path):
    backbone = TruncatedBackbone(BackboneConfig(str(text_dir if path == "text" else minilm_dir()), layer=3))
    batch = backbone.encode(CONVERSATIONS)
    full, ran = _layers_run(backbone, lambda: backbone.states(batch, [2, 3]))
    assert ran == [1, 2, 3]
    # layer 2's output read: layer 3 never runs
    out, ran = _layers_run(backbone, lambda: backbone.states(batch, [2]))
    assert ran == [1, 2]
    torch.testing.assert_close(out.layer(2), full.layer(2))
    # only what enters layer 3 read (the Attention Probe, ReLope): layer 3 never runs
    out, ran = _layers_run(backbone, lambda: backbone.states(batch, [3], input_only=[3]))
    assert ran == [1, 2] and out.at(3).hidden is None
    torch.testing.assert_close(out.at(3).prev, full.at(3).prev)
    torch.testing.assert_close(out.at(3).replay(backbone.layer_module(3)), full.layer(3))  # ReLope's replay
    # a shallower input-only layer still runs: the deeper one reads its output
    _, ran = _layers_run(backbone, lambda: backbone.states(batch, [2, 3], input_only=[2]))
    assert ran == [1, 2, 3]


def test_padding_a_batch_to_a_multiple_changes_no_score(text_dir):
    # A GPU pads batches to a few widths (pad_to_multiple); every probe must read the same
    # states from the real tokens, however much padding follows them.
    from routers.probes import AttentionProbeConfig, LastTokenProbeConfig, ReLopeConfig, build_probe
    from routers.probes.mlp import MLPConfig
    from routers.probes.offline import ProbeScorer

    plain = TruncatedBackbone(BackboneConfig(str(text_dir), layer=3, device="cpu"))
    padded = TruncatedBackbone(BackboneConfig(str(text_dir), layer=3, device="cpu", pad_to_multiple=64),
                               model=plain.model, processor=plain.processor)
    assert (plain.pad_multiple, padded.pad_multiple) == (1, 64)
    batch = plain.encode(CONVERSATIONS)
    assert batch["input_ids"].shape[1] % 64 and padded._bucketed(batch)["input_ids"].shape[1] == 64
    torch.manual_seed(0)
    mlp = MLPConfig(depth=2, width=16)
    probes = {
        "last": build_probe("last_token", LastTokenProbeConfig(32, 3, mlp=mlp)),
        "attn": build_probe("attention", AttentionProbeConfig(32, 2, mlp=mlp)),
        "relope": build_probe("relope", ReLopeConfig(32, 3, lora_rank=4, bottleneck=8, mlp=mlp), plain.layer_module(3)),
    }
    for probe in probes.values():
        for _, param in probe.named_parameters():
            torch.nn.init.normal_(param, std=0.1)
    before = ProbeScorer(plain, probes, batch_size=8).score(CONVERSATIONS)
    after = ProbeScorer(padded, probes, batch_size=8).score(CONVERSATIONS)
    for name in probes:
        assert after[name] == pytest.approx(before[name], abs=1e-5)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        BackboneConfig(str(text_dir), layer=1, pad_to_multiple=0)
