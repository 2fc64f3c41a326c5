"""What failover gives and costs: one backend failing 30% of requests, through a real Envoy.

    python bench/failover.py [--requests 1000] [--concurrency 8] [--fail-percent 30] [--out PATH]

The stack is harness/failover.py's: switchyard with a two-backend policy (``a`` with
``fallbacks: [b]``), the Envoy config ``switchyard envoy render`` writes for it, and stub
backends (harness/faulty_backends.py) on loopback. Backend ``a`` answers 503 to
``--fail-percent`` of its requests, at random; ``b`` always answers. ``--requests`` requests go
through Envoy from ``--concurrency`` clients, each on its own keep-alive connection.

Reported, side by side from the same run: the share answered 200 (target: 100%), and the
end-to-end latency (p50/p99) of the requests ``a`` answered at once (``x-envoy-attempt-count``
1) and of those that failed over to ``b`` (count 2); the added latency of a failover is their
difference. Envoy's retry counters are reported too (``upstream_rq_retry_overflow`` must stay 0:
the rendered retry budget lets every failover through). A first phase with no failures gives the
baseline of the same stack. Writes JSON (default bench/results/failover.json) and prints a summary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.failover import FaultyStack  # noqa: E402

POLICY = """\
version: 1
backends:
  a: {cluster: a, model: model-a, fallbacks: [b]}
  b: {cluster: b, model: model-b}
default: a
signals: {}
rules: []
"""
BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "Hi! How's your day going?"}]}).encode()
HEADERS = {"content-type": "application/json"}


def _quantiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"count": len(values), "p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(p99, 2)}


def run(stack: FaultyStack, requests: int, concurrency: int) -> dict:
    """``requests`` POSTs from ``concurrency`` threads; latency by attempts, and the statuses."""
    results: list[tuple[int, int, str, float]] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", stack.listen, timeout=30)
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            started = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", BODY, HEADERS)
            reply = conn.getresponse()
            reply.read()
            elapsed = (time.perf_counter() - started) * 1000
            row = (reply.status, int(reply.getheader("x-envoy-attempt-count") or 0),
                   reply.getheader("x-switchyard-served-by") or "", elapsed)
            with lock:
                results.append(row)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    statuses: dict[str, int] = {}
    for status, *_ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = [r for r in results if r[0] == 200]
    return {
        "requests": len(results), "seconds": round(seconds, 2), "statuses": statuses,
        "answered_share": round(len(ok) / len(results), 4) if results else 0.0,
        "direct": _quantiles([r[3] for r in ok if r[1] == 1]),
        "failed_over": _quantiles([r[3] for r in ok if r[1] == 2 and r[2] == "b"]),
    }


def _retry_stats(stack: FaultyStack) -> dict[str, int]:
    wanted = ("upstream_rq_retry", "upstream_rq_retry_success", "upstream_rq_retry_overflow",
              "upstream_rq_retry_limit_exceeded", "retry.upstream_rq_503", "upstream_cx_destroy_local_with_active_rq")
    stats = stack.stats()
    return {f"{c}.{s}": stats.get(f"cluster.{c}.{s}", 0) for c in ("a", "b") for s in wanted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fail-percent", type=float, default=30.0, help="Share of a's requests answered 503.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "failover.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="failover-bench-") as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        stack = FaultyStack(policy, Path(tmp), per_try_timeout_s=10.0).start()
        try:
            run(stack, 50, args.concurrency)  # warm-up: connections, first-request costs
            print("baseline (no failures)", file=sys.stderr, flush=True)
            baseline = run(stack, args.requests, args.concurrency)
            before = _retry_stats(stack)
            stack.mode("a", f"p503-{args.fail_percent:g}")
            print(f"a fails {args.fail_percent:g}%", file=sys.stderr, flush=True)
            failing = run(stack, args.requests, args.concurrency)
            after = _retry_stats(stack)
        finally:
            stack.stop()
    direct, over = failing["direct"], failing["failed_over"]
    report = {
        "bench": "failover",
        "through": "envoy",
        "fail_percent": args.fail_percent,
        "baseline": baseline,
        "failing": failing,
        "added_by_failover_ms": {
            "p50": round(over["p50_ms"] - direct["p50_ms"], 2) if over["count"] and direct["count"] else None,
            "p99": round(over["p99_ms"] - direct["p99_ms"], 2) if over["count"] and direct["count"] else None,
        },
        "envoy_retry_counters": {k: after[k] - before[k] for k in after},
        "settings": {"requests": args.requests, "concurrency": args.concurrency, "envoy_concurrency": 1,
                     "retry_back_off": "base 10 ms, max 100 ms", "cpus": os.cpu_count(),
                     "platform": platform.platform(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"answered: {failing['answered_share']:.2%} ({failing['statuses']}); "
          f"direct p50/p99 {direct['p50_ms']}/{direct['p99_ms']} ms (n={direct['count']}), "
          f"failed over p50/p99 {over['p50_ms']}/{over['p99_ms']} ms (n={over['count']}); "
          f"baseline p50/p99 {baseline['direct']['p50_ms']}/{baseline['direct']['p99_ms']} ms; "
          f"retry overflow {report['envoy_retry_counters']['a.upstream_rq_retry_overflow']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
