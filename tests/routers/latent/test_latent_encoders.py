"""Query encoders: the bundled MiniLM loads offline; hashing; side features; the registry."""

from __future__ import annotations

import pytest
import torch

from extproc import CheckpointError
from routers.latent.encoders import ENCODER_KINDS, EncoderSpec, build_encoder, side_features


IMAGE = "data:image/png;base64," + "A" * 400


def _conv(text, images=0):
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": IMAGE}}] * images
    return [{"role": "user", "content": parts if images else text}]


def test_minilm_text_encoder_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    encoder = build_encoder(EncoderSpec("text"))
    feats = encoder.encode([_conv("How do I sort a list in Python?"), _conv("Sorting a Python list"), _conv("Best pizza in Naples")])
    assert feats.shape == (3, 384 + 4) and encoder.dim == 388
    emb = torch.nn.functional.normalize(feats[:, :384], dim=1)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])


def test_hashing_encoder_is_deterministic_and_order_independent():
    encoder = build_encoder({"kind": "hashing", "dim": 64})
    convs = [_conv("solve the integral"), _conv("a much longer question about contracts and liability"), _conv("")]
    a = encoder.encode(convs, batch_size=2)
    b = encoder.encode(convs[::-1], batch_size=1)
    assert torch.equal(a, b.flip(0)) and a.shape == (3, 68)


def test_side_features_see_images():
    plain, with_images = side_features(_conv("hi")), side_features(_conv("hi", images=2))
    assert plain[2] == 0.0 and with_images[2] == 2.0 and with_images[3] > 0.0


def test_unknown_kind_lists_the_supported_kinds():
    assert ENCODER_KINDS == ("text", "backbone", "hashing")
    with pytest.raises(CheckpointError, match="supported kinds: text, backbone, hashing"):
        build_encoder({"kind": "word2vec"})
    with pytest.raises(ValueError, match="`kind`"):
        EncoderSpec("word2vec")


def test_backbone_encoder_needs_a_model():
    with pytest.raises(CheckpointError, match="backbone"):
        build_encoder(EncoderSpec("backbone"))


def test_backbone_encoder_pools_the_truncated_backbone(tmp_path):
    from routers.backbone import BackboneConfig, TruncatedBackbone
    from tests.routers.test_probe_support import tiny_text_model

    path = tiny_text_model(tmp_path)
    encoder = build_encoder(EncoderSpec("backbone", model=str(path), layer=2))
    convs = [_conv("hello there"), _conv("a longer prompt about contracts"), _conv("x")]
    feats = encoder.encode(convs, batch_size=2)
    assert feats.shape == (3, encoder.dim) and bool(torch.isfinite(feats).all())
    shared = TruncatedBackbone(BackboneConfig(str(path), layer=2))
    again = build_encoder(EncoderSpec("backbone", model=str(path)), backbone=shared)
    assert again.spec.layer == 2
    assert torch.allclose(again.encode(convs), feats, atol=1e-5)
