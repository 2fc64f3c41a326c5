"""One prepared check for a lent GPU: the in-process scorer on a 7B-class backbone.

What it does, in order, each step failing soft (its error is recorded, the next step runs)
and the JSON rewritten after every step, within ``--budget-s`` (default 420 s):

1. builds a random-init Qwen2-7B-shaped backbone (hidden 3584, 28 heads, 4 KV heads, FFN
   18944) with only its first 16 layers — what "truncated at layer 16" keeps — in bf16 on
   the GPU; no network, no downloads (a word-level tokenizer is built here);
2. puts three random-init probes on layer 16 (last-token, Attention Probe, ReLope) behind
   the real serving path: :class:`routers.serving.prefill.PrefillGroup` (micro-batcher,
   worker thread, chunking) and :class:`routers.serving.probe_scorer.ProbeSetScorer`;
3. checks that batched scores match scores computed alone (bf16: reports the largest gap);
4. decision latency p50/p99 at 100 req/s, open-loop Poisson arrivals;
5. the highest rate it sustains with p99 <= 25 ms (a rate sweep), and the same sweep for
   one request per forward (``max_size 1``) for comparison;
6. runs the GPU-marked tests (``pytest -m gpu``), if pytest is installed.

    python bench/gpu_check.py                 # on the GPU machine; JSON to $OUT or bench/results/
    python bench/gpu_check.py --tiny          # a tiny config (CPU is fine): checks the script runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decision import open_loop, sustained  # noqa: E402

QWEN2_7B = dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=4096, max_position_embeddings=2048)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB_WORDS = 2000


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def word_tokenizer() -> Any:
    """A word-level fast tokenizer over ``w0 .. w1999`` plus chat-role tokens: one token per
    word, so prompt lengths are exact. Built in memory (no files, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB_WORDS)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=specials[2:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chats(n: int, words: tuple[int, int], seed: int = 0) -> list[list[dict[str, Any]]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": " ".join(f"w{rng.randrange(VOCAB_WORDS)}" for _ in range(rng.randint(*words)))}]
            for _ in range(n)]


class Check:
    """Runs steps within a time budget; records each step's result or error; saves JSON."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.result: dict[str, Any] = {"bench": "gpu_check", "steps": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        if self.left() < need_s:
            log(f"skip {name}: {self.left():.0f} s left, needs about {need_s:.0f} s")
            self.result["steps"][name] = {"skipped": f"time budget ({self.left():.0f} s left)"}
            self.save()
            return None
        log(f"start {name}")
        started = time.monotonic()
        try:
            value = fn()
            self.result["steps"][name] = {"ok": True, "seconds": round(time.monotonic() - started, 1), "result": value}
            log(f"done {name} in {time.monotonic() - started:.1f} s: {json.dumps(value)[:600]}")
        except Exception as exc:  # noqa: BLE001 - fail soft: record and go on
            self.result["steps"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                          "traceback": traceback.format_exc()[-3000:]}
            log(f"FAILED {name}: {type(exc).__name__}: {exc}")
            value = None
        self.save()
        return value

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny config and short runs (checks the script)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--layer", type=int, default=16, help="backbone layers kept (the probe layer)")
    parser.add_argument("--words", default="16,256", help="prompt length range in words (= tokens)")
    parser.add_argument("--max-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--p99-ms", type=float, default=25.0)
    parser.add_argument("--rate", type=float, default=100.0, help="the rate of step 4")
    parser.add_argument("--rates", default="10,25,50,100,200,300,400,600", help="the sweep of step 5")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per rate")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting steps after this")
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json or bench/results/)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layer, args.words, args.rates, args.rate, args.duration = 2, "8,64", "5,20", 10.0, 2.0
    name = "gpu_check_tiny.json" if args.tiny else "gpu_check.json"  # a tiny run never replaces a GPU result
    out = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) / name if os.environ.get("OUT") else ROOT / "bench/results" / name)
    check = Check(out, args.budget_s)
    words = tuple(int(w) for w in args.words.split(","))
    rates = [float(r) for r in args.rates.split(",")]
    state: dict[str, Any] = {}

    def environment() -> dict[str, Any]:
        import torch
        import transformers

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        state["device"] = device
        if device == "cpu":
            torch.set_num_threads(1)  # OpenMP threads on busy cores stall whole forwards
        info = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device,
                "python": platform.python_version(), "tiny": args.tiny}
        if device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        return info

    def build() -> dict[str, Any]:
        import torch
        from transformers import Qwen2Config, Qwen2Model

        from extproc import BatchConfig, ImageLimits
        from routers.backbone import BackboneConfig, TruncatedBackbone
        from routers.probes import AttentionProbeConfig, LastTokenProbeConfig, ReLopeConfig, build_probe
        from routers.probes.mlp import MLPConfig
        from routers.serving.prefill import BackboneKey, PrefillGroup, ProbeMember

        device = state["device"]
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
            args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
        tokenizer = word_tokenizer()
        shape = TINY if args.tiny else QWEN2_7B
        config = Qwen2Config(num_hidden_layers=args.layer, pad_token_id=tokenizer.pad_token_id, **shape)
        torch.manual_seed(0)
        started = time.monotonic()
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2Model(config).eval()
        finally:
            torch.set_default_dtype(default)
        built_s = time.monotonic() - started
        backbone = TruncatedBackbone(
            BackboneConfig("random-qwen2-7b" if not args.tiny else "random-tiny", layer=args.layer, device=device,
                           dtype="bfloat16" if dtype == torch.bfloat16 else "float32"),
            model=model, processor=tokenizer,
        )
        hidden = shape["hidden_size"]
        mlp = MLPConfig(depth=3, width=256)
        probes = {
            "last": build_probe("last_token", LastTokenProbeConfig(hidden, args.layer, mlp=mlp)),
            "attn": build_probe("attention", AttentionProbeConfig(hidden, args.layer, mlp=mlp)),
            "relope": build_probe("relope", ReLopeConfig(hidden, args.layer, lora_rank=16, bottleneck=128, mlp=mlp),
                                  backbone.layer_module(args.layer)),
        }
        for probe in probes.values():
            for _, param in probe.named_parameters():
                if param.requires_grad:
                    torch.nn.init.normal_(param, std=0.02)
            probe.to(backbone.device)
        state["backbone"], state["probes"] = backbone, probes
        state["key"] = BackboneKey.of(backbone.source, device, None)
        state["make_group"] = lambda batch: PrefillGroup(backbone, state["key"], batch, ImageLimits(), "gpu prefill")
        state["member"] = lambda: ProbeMember(probes)
        state["BatchConfig"] = BatchConfig
        params = sum(p.numel() for p in model.parameters())
        cost = backbone.forward_cost  # what the prefill groups cut batches by (measured here, once)
        return {"parameters_b": round(params / 1e9, 2), "layers_kept": args.layer, "dtype": str(dtype),
                "build_s": round(built_s, 1), "hidden": hidden,
                "forward_cost": {"fixed_ms": round(cost.fixed * 1e3, 3), "per_token_us": round(cost.per_token * 1e6, 3)}}

    def scorer(batch: Any) -> Any:
        from extproc import ScorerSpec
        from routers.serving.probe_scorer import ProbeSetScorer

        group = state["make_group"](batch)
        member = state["member"]()
        group.join(member)
        return ProbeSetScorer(ScorerSpec(name="gpu", kind="probe", batch=batch), group, member)

    async def warm(s: Any, prompts: list) -> None:
        from extproc import RoutingRequest

        for size in (1, 4, 16, args.max_size):
            await asyncio.gather(*(s.score(RoutingRequest.from_json({"messages": c}), deadline=time.monotonic() + 60)
                                   for c in prompts[:size]))

    prompts = chats(512, words, seed=1)

    def agreement() -> dict[str, Any]:
        from extproc import RoutingRequest

        BatchConfig = state["BatchConfig"]

        async def run() -> dict[str, Any]:
            batched, alone = scorer(BatchConfig(args.max_size, 20.0)), scorer(BatchConfig(1, 0.0))
            try:
                await warm(batched, prompts)
                req = lambda c: RoutingRequest.from_json({"messages": c})  # noqa: E731
                together = await asyncio.gather(*(batched.score(req(c), deadline=time.monotonic() + 60) for c in prompts[:32]))
                one = [await alone.score(req(c), deadline=time.monotonic() + 60) for c in prompts[:32]]
            finally:
                await batched.close()
                await alone.close()
            gap = max(abs(a.values[k] - b.values[k]) for a, b in zip(together, one) for k in a.values)
            return {"max_abs_gap": round(gap, 5), "batch_sizes": sorted({s.batch_size for s in together})}

        return asyncio.run(run())

    def at_rate() -> dict[str, Any]:
        from extproc import RoutingRequest

        async def run() -> dict[str, Any]:
            s = scorer(state["BatchConfig"](args.max_size, args.max_wait_ms))
            try:
                await warm(s, prompts)

                async def score(i: int, deadline: float) -> Any:
                    return await s.score(RoutingRequest.from_json({"messages": prompts[i % len(prompts)]}), deadline=deadline)

                before = (s.group.batcher.stats.batches, s.group.batcher.stats.forward_seconds)
                row = await open_loop(score, args.rate, args.duration * 1.5, 1.0, seed=7)
                stats = s.group.batcher.stats
                batches = stats.batches - before[0]
                row["mean_forward_ms"] = round(1000 * (stats.forward_seconds - before[1]) / max(1, batches), 2)
                return row
            finally:
                await s.close()

        return asyncio.run(run())

    def sweep(max_size: int, max_wait_ms: float) -> Callable[[], dict[str, Any]]:
        def run_sweep() -> dict[str, Any]:
            from extproc import RoutingRequest

            async def run() -> dict[str, Any]:
                s = scorer(state["BatchConfig"](max_size, max_wait_ms))
                rows = []
                try:
                    await warm(s, prompts)

                    async def score(i: int, deadline: float) -> Any:
                        return await s.score(RoutingRequest.from_json({"messages": prompts[i % len(prompts)]}), deadline=deadline)

                    for k, rate in enumerate(rates):
                        if check.left() < args.duration + 20:
                            break
                        before = (s.group.batcher.stats.batches, s.group.batcher.stats.forward_seconds)
                        row = await open_loop(score, rate, args.duration, 1.0, seed=k)
                        stats = s.group.batcher.stats
                        row["mean_forward_ms"] = round(
                            1000 * (stats.forward_seconds - before[1]) / max(1, stats.batches - before[0]), 2)
                        rows.append(row)
                        log(f"  max_size {max_size}: {rate:g} req/s p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms "
                            f"batch {row['mean_batch']} failed {row['failed_share']}")
                        if row["p99_ms"] > 4 * args.p99_ms or row["failed_share"] > 0.05:
                            break
                finally:
                    await s.close()
                return {"rows": rows, "sustained_rate": sustained(rows, args.p99_ms)}

            return asyncio.run(run())

        return run_sweep

    def gpu_tests() -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/routers"], cwd=ROOT,
                              capture_output=True, text=True, timeout=max(30, min(150, check.left() - 5)))
        return {"returncode": proc.returncode, "tail": proc.stdout[-1500:] + proc.stderr[-500:]}

    if check.step("environment", environment) is None:
        return 1
    check.result["setup"] = {"words": words, "max_size": args.max_size, "max_wait_ms": args.max_wait_ms,
                             "p99_bound_ms": args.p99_ms}
    if check.step("build", build) is None:
        return 1
    check.step("agreement", agreement, need_s=20)
    check.step("latency_at_rate", at_rate, need_s=args.duration * 1.5 + 20)
    batched = check.step("sweep_batched", sweep(args.max_size, args.max_wait_ms), need_s=2 * args.duration + 20)
    single = check.step("sweep_single", sweep(1, 0.0), need_s=2 * args.duration + 20)
    if batched and single:
        check.result["summary"] = {
            "sustained_rate_batched": batched["sustained_rate"], "sustained_rate_single": single["sustained_rate"],
            "ratio": round(batched["sustained_rate"] / single["sustained_rate"], 2) if single["sustained_rate"] else None,
        }
    if not args.tiny:
        check.step("gpu_marked_tests", gpu_tests, need_s=40)
    check.save()
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
