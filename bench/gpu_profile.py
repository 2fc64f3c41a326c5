"""Where one serving forward's time goes on a GPU: the micro-batcher's forward function
(``PrefillGroup._forward``: encode, prefill, probes) called directly, against the raw model
and ``ProbeScorer`` on the same requests, plus a cProfile of the serving forward.

    python bench/gpu_profile.py        # on the GPU machine; prints, and JSON to $OUT/gpu_profile.json
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import random
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import VOCAB_WORDS  # noqa: E402
from bench.gpu_forward import random_probe_stack  # noqa: E402


def main() -> int:
    import torch

    from extproc import BatchConfig, ImageLimits
    from routers.probes.offline import ProbeScorer
    from routers.serving.prefill import BackboneKey, PrefillGroup, ProbeMember

    tiny = "--tiny" in sys.argv
    model, backbone, probes, tok = random_probe_stack(tiny)
    device = backbone.device.type
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    group = PrefillGroup(backbone, BackboneKey.of(backbone.source, device, None), BatchConfig(1, 0.0), ImageLimits(), "p")
    member = ProbeMember(probes)
    group.join(member)
    scorer = ProbeScorer(backbone, probes, batch_size=64)
    rng = random.Random(0)
    chats = [[{"role": "user", "content": " ".join(f"w{rng.randrange(VOCAB_WORDS)}" for _ in range(128))}]
             for _ in range(12)]

    def timed(label, fn):
        fn(chats[0])
        sync()
        times = []
        for chat in chats[1:]:
            started = time.perf_counter()
            fn(chat)
            sync()
            times.append((time.perf_counter() - started) * 1000)
        median = sorted(times)[len(times) // 2]
        print(f"{label:40s} median {median:7.2f} ms  min {min(times):7.2f}", flush=True)
        return round(median, 2)

    out = {}

    def raw(chat):
        with torch.inference_mode():
            model(input_ids=torch.randint(10, 2000, (1, 132), device=device))

    out["raw_model"] = timed("raw model forward (132 tokens)", raw)
    out["encode"] = timed("backbone.encode", lambda chat: backbone.encode([chat]))
    out["probe_scorer"] = timed("ProbeScorer.score", lambda chat: scorer.score([chat]))
    def serving_forward(chat):  # PrefillGroup._forward yields its rows forward by forward
        return list(group._forward([chat]))

    out["serving_forward_main_thread"] = timed("PrefillGroup._forward (main thread)", serving_forward)

    def in_thread(chat):
        t = threading.Thread(target=serving_forward, args=(chat,))
        t.start()
        t.join()

    out["serving_forward_new_thread"] = timed("PrefillGroup._forward (a new thread)", in_thread)
    from concurrent.futures import ThreadPoolExecutor

    worker = ThreadPoolExecutor(max_workers=1)

    def timed_in_worker(chat):  # the time as the worker thread sees it, like the batcher's stats
        return worker.submit(serving_forward, chat).result()

    out["serving_forward_persistent_thread"] = timed("PrefillGroup._forward (one long-lived thread)", timed_in_worker)

    def inside(chat):
        def run():
            started = time.perf_counter()
            serving_forward(chat)
            sync()
            return (time.perf_counter() - started) * 1000
        return worker.submit(run).result()

    inner = [inside(chat) for chat in chats]
    out["serving_forward_timed_inside_thread"] = round(sorted(inner[1:])[len(inner) // 2], 2)
    print(f"{'timed inside the long-lived thread':40s} median {out['serving_forward_timed_inside_thread']:7.2f} ms", flush=True)

    import asyncio

    from routers.serving.batcher import MicroBatcher

    async def through_batcher():
        batcher = MicroBatcher(group._forward, BatchConfig(1, 0.0), name="profile")
        times = []
        try:
            for chat in chats:
                started = time.perf_counter()
                await batcher.run(chat, time.monotonic() + 10)
                times.append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(0.05)
        finally:
            await batcher.close()
        return round(sorted(times[1:])[len(times) // 2], 2), round(batcher.stats.mean_forward_ms, 2)

    out["through_batcher_ms"], out["batcher_mean_forward_ms"] = asyncio.run(through_batcher())
    print(f"{'through the MicroBatcher (50 ms apart)':40s} median {out['through_batcher_ms']:7.2f} ms, "
          f"forward {out['batcher_mean_forward_ms']} ms", flush=True)
    torch.set_num_threads(1)
    out["serving_forward_1_thread"] = timed("PrefillGroup._forward (torch 1 thread)", serving_forward)
    profile = cProfile.Profile()
    profile.enable()
    for chat in chats:
        serving_forward(chat)
    sync()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue()[:6000])
    dest = Path(os.environ.get("OUT", ROOT / "bench" / "results")) / ("gpu_profile_tiny.json" if tiny else "gpu_profile.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"bench": "gpu_profile", "device": device, "ms": out, "profile": text.getvalue()[:20000]},
                               indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
