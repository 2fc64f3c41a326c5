"""``switchyard label`` throughput and memory against local stub backends.

Each run is the real CLI (a subprocess, torch hidden as in a torch-free install) labelling
prompts with one stub model that answers after 20 ms (a lean asyncio server in its own
process; the tests' threaded ``tests/routers/label_stubs.py`` stub is run once at 32 for
comparison), with ``max_concurrency`` 1, 8 and 32. The ceiling is
``concurrency / 20 ms`` rows/s; the result reports each run's rows/s and its share of the
ceiling. Memory: the peak RSS of the labelling process over 2,000 and over 20,000 rows at
concurrency 32 (the input is streamed, so the two should be close).

    python bench/label.py              # writes bench/results/label.json
    python bench/label.py --quick      # fewer rows (a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.routers.label_stubs import StubBackend, right, sum_prompt  # noqa: E402

ANSWER_S = 0.020
CONCURRENCIES = (1, 8, 32)
#: Rows per throughput run: about four seconds at the ceiling.
ROWS = {1: 200, 8: 1600, 32: 6400}
MEMORY_ROWS = (2_000, 20_000)
_CLI = "import sys; sys.modules['torch'] = None\nfrom extproc.cli import main\nsys.exit(main(sys.argv[1:]))\n"


async def _serve_fast_stub(port_out, delay_s: float) -> None:
    """A lean asyncio OpenAI-compatible stub (one event loop, no thread per connection), so that
    at concurrency 32 the stub is not what limits the labeller. Answers like ``right``."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: requests on one connection until the client closes it
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = json.loads(await reader.readexactly(length))
                await asyncio.sleep(delay_s)
                text = body["messages"][-1]["content"]
                answer = right(body["messages"])
                payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
                                      "usage": {"prompt_tokens": len(text), "completion_tokens": len(answer)}}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    port_out.put(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _fast_stub_process(port_out, delay_s: float) -> None:
    asyncio.run(_serve_fast_stub(port_out, delay_s))


def _prompts(path: Path, rows: int) -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for i in range(rows):
            row = sum_prompt(i % 1000, i // 1000)
            row["id"] = f"r{i}"
            out.write(json.dumps(row) + "\n")
    return path


def _config(path: Path, url: str, concurrency: int) -> Path:
    path.write_text(json.dumps({  # JSON is YAML
        "models": {"stub": {"base_url": url, "model": "stub", "max_concurrency": concurrency,
                            "price_in_per_million": 0.1, "price_out_per_million": 0.4}},
        "grading": {"mode": "reference", "reference_grader": "number"},
    }))
    return path


def _label(work: Path, url: str, concurrency: int, rows: int, stub: str = "asyncio") -> dict[str, Any]:
    """One ``switchyard label`` run; its summary, rows/s and peak RSS."""
    tag = f"{stub}-c{concurrency}-{rows}"
    out = work / f"{tag}.out.jsonl"
    stdout = work / f"{tag}.stdout"
    with open(stdout, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", _CLI, "label", "--config", str(_config(work / f"{tag}.yaml", url, concurrency)),
             "--input", str(_prompts(work / f"{tag}.jsonl", rows)), "--output", str(out), "--no-progress"],
            cwd=REPO, stdout=sink, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"switchyard label exited {process.returncode} ({tag})")
    summary = json.loads(stdout.read_text())
    assert summary["labelled"] == rows, summary
    rate = rows / summary["elapsed_s"]
    ceiling = concurrency / ANSWER_S
    return {"stub": stub, "concurrency": concurrency, "rows": rows, "elapsed_s": summary["elapsed_s"],
            "rows_per_s": round(rate, 1), "ceiling_rows_per_s": ceiling, "share_of_ceiling": round(rate / ceiling, 3),
            "label_cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "output_mib": round(out.stat().st_size / 2**20, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A tenth of the rows.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "label.json")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_fast_stub_process, args=(ports, ANSWER_S), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"
    with StubBackend(right, delay_s=ANSWER_S) as threaded, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # the tests' threaded stub once, side by side: at 32 it, not the labeller, is the limit
        threaded_32 = _label(work, threaded.url, 32, ROWS[32] // scale, stub="threaded")
        print(json.dumps(threaded_32), flush=True)
        throughput = []
        for concurrency in CONCURRENCIES:
            throughput.append(_label(work, url, concurrency, ROWS[concurrency] // scale))
            print(json.dumps(throughput[-1]), flush=True)
        memory = []
        for rows in MEMORY_ROWS:
            memory.append(_label(work, url, 32, rows // scale))
            print(json.dumps(memory[-1]), flush=True)
    server.terminate()
    result = {
        "bench": "label",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "answer_ms": ANSWER_S * 1000,
        "throughput": throughput,
        "throughput_threaded_stub_32": threaded_32,
        "memory": memory,
        "rss_growth_ratio": round(memory[-1]["peak_rss_mib"] / memory[0]["peak_rss_mib"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
