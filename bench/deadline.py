"""Which scorer deadline a busy sidecar can keep: the share of requests scored at each
``deadline_ms``, with realistic prompts and concurrent clients, through a real Envoy.

The default ``deadline_ms`` (150) comes from this bench (docs/benchmarks.md). ``--clients`` callers (default 8) each
send their next request as soon as the last is answered, for ``--duration`` seconds per
deadline, to ``switchyard serve`` behind Envoy with a policy whose one rule needs an
Attention Probe (the packaged MiniLM at layer 4 by default; one torch thread, as in
``bench/decision.py``). Prompts are real GSM8K questions from ``../shared/data`` when that
folder exists (about 60-120 tokens, the length of MMLU-style questions), else generated
prompts of the same length.

Per deadline, side by side in one run: the share of requests scored, the share that took
the fallback at once (the scorer's admission refused them: reason ``overload``) or at the
deadline (reason ``deadline``), from switchyard's own metrics, and the client's p50/p99.
Writes ``bench/results/deadline.json``.

    python bench/deadline.py
    python bench/deadline.py --deadlines 80,150 --duration 5 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decision import POLICY, EnvoyStack, _probe_checkpoint, percentile, prompts  # noqa: E402

__all__ = ["realistic_prompts", "run_deadline"]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k-routing.jsonl"


def realistic_prompts(n: int) -> tuple[list[list[dict[str, Any]]], str]:
    """``n`` one-turn chats of realistic length, and where they came from."""
    if SHARED_DATA.exists():
        rows = [json.loads(line) for line in SHARED_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [row["messages"] for row in rows[:n]], f"{SHARED_DATA.name} (first {min(n, len(rows))} questions)"
    return prompts(n, seed=3, words=(45, 90)), "generated prompts of 45-90 words"


def _failures(metrics_port: int) -> Counter:
    """switchyard_scorer_failures_total by reason, so far."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("switchyard_scorer_failures_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] += float(value)
    return out


async def run_deadline(stack: EnvoyStack, chats: Sequence[list[dict[str, Any]]], clients: int,
                       duration: float) -> dict[str, Any]:
    """``clients`` closed-loop callers for ``duration`` s through ``stack``."""
    before = _failures(stack.metrics)
    latencies: list[float] = []
    outcomes: Counter = Counter()
    stop = time.monotonic() + duration

    async def client(c: int) -> None:
        i = c
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                await stack.post(chats[i % len(chats)])
                outcomes["scored"] += 1
            except RuntimeError as exc:
                outcomes["fallback" if "fallback" in str(exc) else "failed"] += 1
            latencies.append((time.monotonic() - started) * 1000.0)
            i += clients

    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(clients)))
    took = time.monotonic() - started
    after = _failures(stack.metrics)
    total = sum(outcomes.values())
    reasons = {k: int(after[k] - before.get(k, 0)) for k in after if after[k] - before.get(k, 0)}
    return {
        "requests": total, "seconds": round(took, 2),
        "scored_share": round(outcomes["scored"] / total, 3) if total else None,
        "fallback_share": round(outcomes["fallback"] / total, 3) if total else None,
        "failed": outcomes["failed"],
        "fallback_reasons": reasons,
        "scored_per_s": round(outcomes["scored"] / took, 1),
        "p50_ms": round(percentile(latencies, 50), 1), "p99_ms": round(percentile(latencies, 99), 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadlines", default="80,150,250,400", help="scorer deadline_ms values (comma-separated)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop callers")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per deadline")
    parser.add_argument("--backbone", default=None, help="backbone folder (default: the packaged MiniLM)")
    parser.add_argument("--layer", type=int, default=4, help="probe layer")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of switchyard serve")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "deadline.json"))
    args = parser.parse_args(argv)

    import torch

    from routers.latent.encoders import minilm_path

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    backbone = args.backbone or str(minilm_path())
    chats, source = realistic_prompts(512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _probe_checkpoint(backbone, args.layer, Path(tmp) / "probe")
        for deadline in (float(d) for d in args.deadlines.split(",")):
            policy = Path(tmp) / f"deadline-{deadline:g}.yaml"
            policy.write_text(POLICY.format(checkpoint=json.dumps(str(ckpt)), device="cpu", max_size=32,
                                            max_wait_ms=0, deadline_ms=deadline))
            with EnvoyStack(f"d{deadline:g}", policy, Path(tmp)) as stack:
                asyncio.run(run_deadline(stack, chats, 2, 2.0))  # warm up: the forward cost refits from real forwards
                row = {"deadline_ms": deadline, **asyncio.run(run_deadline(stack, chats, args.clients, args.duration))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "bench": "deadline", "through": "envoy", "clients": args.clients, "duration_s": args.duration,
        "prompts": source, "backbone": "packaged MiniLM" if args.backbone is None else args.backbone,
        "layer": args.layer, "torch_threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
