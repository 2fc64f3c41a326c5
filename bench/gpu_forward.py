"""Where a GPU forward's time goes: the raw truncated model, the backbone's run (tokenize,
pad, hooks), and the probe scorer, at a few batch sizes and prompt lengths (bf16, CUDA).

    python bench/gpu_forward.py        # on the GPU machine; JSON to $OUT/gpu_forward.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import QWEN2_7B, VOCAB_WORDS, word_tokenizer  # noqa: E402


def timed(fn, sync, repeat=5):
    fn()
    sync()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return round(sorted(times)[len(times) // 2], 2)


def random_probe_stack(tiny: bool):
    """A random-init Qwen2-7B-shaped backbone (16 layers kept; tiny with ``tiny``), bf16 on
    CUDA, and three probes on its last kept layer: ``(model, backbone, probes, tokenizer)``."""
    import torch
    from transformers import Qwen2Config, Qwen2Model

    from routers.backbone import BackboneConfig, TruncatedBackbone
    from routers.probes import AttentionProbeConfig, LastTokenProbeConfig, ReLopeConfig, build_probe
    from routers.probes.mlp import MLPConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = dict(QWEN2_7B) if not tiny else dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                 intermediate_size=128, vocab_size=4096, max_position_embeddings=2048)
    layer = 16 if not tiny else 2
    tok = word_tokenizer()
    config = Qwen2Config(num_hidden_layers=layer, pad_token_id=tok.pad_token_id, **shape)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen2Model(config).eval()
    torch.set_default_dtype(torch.float32)
    backbone = TruncatedBackbone(BackboneConfig("random", layer=layer, device=device,
                                                dtype="bfloat16" if dtype == torch.bfloat16 else "float32"),
                                 model=model, processor=tok)
    hidden = shape["hidden_size"]
    mlp = MLPConfig(depth=3, width=256)
    probes = {
        "last": build_probe("last_token", LastTokenProbeConfig(hidden, layer, mlp=mlp)),
        "attn": build_probe("attention", AttentionProbeConfig(hidden, layer, mlp=mlp)),
        "relope": build_probe("relope", ReLopeConfig(hidden, layer, lora_rank=16, bottleneck=128, mlp=mlp),
                              backbone.layer_module(layer)),
    }
    for probe in probes.values():
        probe.to(backbone.device)
    return model, backbone, probes, tok


def main() -> int:
    import random

    import torch

    from routers.probes.offline import ProbeScorer

    tiny = "--tiny" in sys.argv
    model, backbone, probes, tok = random_probe_stack(tiny)
    device, layer = backbone.device.type, max(p.layer for p in probes.values())
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rng = random.Random(0)
    rows = []
    for length in (32, 128, 256):
        for batch in (1, 8, 32):
            chats = [[{"role": "user", "content": " ".join(f"w{rng.randrange(VOCAB_WORDS)}" for _ in range(length))}]
                     for _ in range(batch)]
            ids = torch.randint(10, 2000, (batch, length + 4), device=device)
            with torch.inference_mode():
                raw = timed(lambda: model(input_ids=ids), sync)
                run = timed(lambda: backbone.run(chats, [layer], last_only=[layer]), sync)
            scorer = ProbeScorer(backbone, probes, batch_size=64)
            probe_ms = timed(lambda: scorer.score(chats), sync)
            tokens = batch * (length + 4)
            row = {"length": length, "batch": batch, "raw_ms": raw, "backbone_run_ms": run, "probe_scorer_ms": probe_ms,
                   "raw_tflops": round(2 * 3.7e9 * tokens / (raw / 1000) / 1e12, 1) if not tiny else None}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(os.environ.get("OUT", ROOT / "bench" / "results")) / ("gpu_forward_tiny.json" if tiny else "gpu_forward.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "gpu_forward", "device": device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
