"""A soak: mixed requests at a steady rate through Envoy + switchyard, with policy reloads
and one ``kill -9`` + restart of switchyard in the middle. Every answer is checked.

    python bench/soak.py [--requests 10000] [--rate 100] [--reload-every 10] [--outage 1] [--out PATH]

Everything runs on loopback (demo backends, switchyard, Envoy: harness/stack.py) on a copy of
policies/default.yaml. Requests are drawn (seeded) from a fixed mix: cheap rule hits
(code, maths, reasoning, long context, images, tools, the default), direct model names,
SSE streams, bad inputs (not JSON, not an object, no messages, bad model, invalid UTF-8,
empty) and pass-through requests (GET, a non-JSON POST, another path), and sent open-loop
at ``--rate`` per second from a pool of keep-alive connections.

While they run, every ``--reload-every`` seconds the policy file changes: alternately a
good version that changes routing (the default backend flips between ``small`` and
``large``, applied with SIGHUP and seen in switchyard's log) and a bad one (garbage, empty,
removed, in turn) that must be rejected, after which the running version's text is put
back. Half-way, switchyard is killed with SIGKILL, left down for ``--outage`` seconds and
started again.

Each answer is checked against what ``switchyard policy explain`` says for the same input
(the engine is called in-process, as explain does: ``parse_json_body`` then
``PolicyEngine(load_policy(version)).decide``) under the policy version(s) that could have
been running while the request was in flight. An answer is:

- ``ok``: exactly the expected one (status, the backend that answered, the decision headers,
  the model the backend received, a whole SSE stream; or the expected error code);
- failed, by cause: ``router_unavailable`` (Envoy's fail-closed 5xx: switchyard unusable,
  nothing routed; expected only while switchyard is down), connection errors, truncated
  bodies, or a ``wrong_answer`` (anything else that reached no wrong backend);
- ``misrouted``: a backend answered that the policy does not name (or one answered a request
  the policy rejects). The target is 0.

Writes JSON (default bench/results/soak.json) and prints a summary: sent, answered, ok,
failed by cause, misrouted, switchyard's RSS (start, before the kill, after the restart,
end) and p50/p99 latency.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import Stack, envoy_binary  # noqa: E402
from extproc import PolicyEngine, RequestError, RoutingRequest, load_policy, parse_json_body  # noqa: E402

POLICY = ROOT / "policies" / "default.yaml"
PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
LONG = " ".join(f"paragraph {i} of the quarterly report, with figures and remarks." for i in range(700))
JSON_CT = {"content-type": "application/json"}
BAD_VERSIONS = ("garbage", "empty", "removed")


# -- the request mix ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    name: str
    kind: str  # rule | direct | stream | bad | passthrough
    weight: int
    body: bytes = b""
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_CT))


def _chat(text, **extra) -> bytes:
    return json.dumps({"model": "auto", "messages": [{"role": "user", "content": text}], **extra}).encode()


TEMPLATES = [
    Template("default", "rule", 14, _chat("hi, how are you today?")),
    Template("code", "rule", 10, _chat("Can you refactor this python function so it streams rows instead of a list?")),
    Template("maths", "rule", 6, _chat("Prove that the square root of 2 is irrational.")),
    Template("reasoning", "rule", 5, _chat("Think step by step: which is larger, 9.11 or 9.9?")),
    Template("long-context", "rule", 2, _chat(f"Summarise this: {LONG}")),
    Template("image", "rule", 3, _chat([{"type": "text", "text": "What is in this picture?"},
                                       {"type": "image_url", "image_url": {"url": PIXEL}}])),
    Template("tools", "rule", 3, _chat("What's the weather in Oslo?",
                                      tools=[{"type": "function", "function": {"name": "weather", "parameters": {}}}])),
    Template("unknown-model", "rule", 3, json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "debug this rust segfault please"}]}).encode()),
    Template("spoofed-header", "rule", 3, _chat("hello again"), headers={**JSON_CT, "x-switchyard-backend": "large"}),
    Template("direct-large-model", "direct", 5, json.dumps({"model": "large-model", "messages": [{"role": "user", "content": "hi"}]}).encode()),
    Template("direct-small-model", "direct", 3, json.dumps({"model": "small-model", "messages": [{"role": "user", "content": "prove it"}]}).encode()),
    Template("direct-backend-name", "direct", 2, json.dumps({"model": "large", "messages": [{"role": "user", "content": "hi"}]}).encode()),
    Template("stream-default", "stream", 8, _chat("tell me a joke", stream=True)),
    Template("stream-code", "stream", 5, _chat("Write a python function to merge two sorted lists", stream=True)),
    Template("bad-not-json", "bad", 3, b"{not json"),
    Template("bad-not-object", "bad", 2, b"[1, 2]"),
    Template("bad-no-messages", "bad", 2, b'{"model": "auto"}'),
    Template("bad-empty-messages", "bad", 2, b'{"model": "auto", "messages": []}'),
    Template("bad-model-type", "bad", 2, b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}'),
    Template("bad-utf8", "bad", 2, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    Template("bad-nan", "bad", 1, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
    Template("bad-empty-body", "bad", 2, b""),
    Template("get-models", "passthrough", 4, method="GET", path="/v1/models", headers={}),
    Template("text-plain-post", "passthrough", 2, b"hello", headers={"content-type": "text/plain"}),
    Template("other-path", "passthrough", 1, json.dumps({"input": "x"}).encode(), path="/v1/embeddings"),
]


@dataclass(frozen=True)
class Expected:
    """One answer the request may get: a backend's (``backend`` set) or a switchyard error."""

    status: int | None = None
    code: str | None = None
    backend: str | None = None
    rule: str | None = None
    model: str | None = None
    passthrough: bool = False


def expected_answer(template: Template, policy_path: Path, envoy_default: str) -> Expected:
    """What ``switchyard policy explain`` says for ``template`` under the policy at ``policy_path``."""
    if template.kind == "passthrough":  # switchyard leaves it alone: Envoy's last route
        return Expected(backend=envoy_default, passthrough=True)
    policy = load_policy(policy_path)
    try:
        body = parse_json_body(template.body, max_bytes=policy.routing.max_body_bytes)
        headers = {k.lower(): v for k, v in template.headers.items() if not k.lower().startswith("x-switchyard-")}
        decision = PolicyEngine(policy).decide(RoutingRequest(headers=headers, body=body))
    except RequestError as error:
        return Expected(status=error.status, code=error.code)
    return Expected(status=200, backend=decision.backend.name, rule=decision.rule, model=decision.model)


# -- one answer ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    index: int
    template: Template
    sent: float
    done: float = 0.0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None  # connection error / truncated body


def matches(outcome: Outcome, expected: Expected) -> bool:
    h = outcome.headers
    if expected.passthrough:
        return h.get("x-demo-backend") == expected.backend and "x-switchyard-backend" not in h
    if expected.backend is None:  # switchyard's own error answer
        if outcome.status != expected.status or "x-demo-backend" in h:
            return False
        try:
            return json.loads(outcome.body)["error"]["code"] == expected.code
        except (ValueError, KeyError, TypeError):
            return False
    whole = outcome.body.endswith(b"data: [DONE]\n\n") if outcome.template.kind == "stream" else True
    return (outcome.status == 200 and whole and h.get("x-demo-backend") == expected.backend
            and h.get("x-switchyard-backend") == expected.backend and h.get("x-switchyard-rule") == expected.rule
            and h.get("x-demo-received-model") == expected.model)


def fail_closed(outcome: Outcome) -> bool:
    """Envoy's own 5xx because switchyard could not be used: nothing was routed."""
    if outcome.status is None or not 500 <= outcome.status < 600 or "x-demo-backend" in outcome.headers:
        return False
    try:
        return json.loads(outcome.body)["error"]["code"] == "router_unavailable"
    except (ValueError, KeyError, TypeError):
        return False


class Client:
    """Keep-alive connections to Envoy, one per worker thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def send(self, index: int, template: Template) -> Outcome:
        outcome = Outcome(index, template, time.monotonic())
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(template.method, template.path, body=template.body or None, headers=template.headers)
            reply = conn.getresponse()
            outcome.status = reply.status
            outcome.headers = {k.lower(): v for k, v in reply.getheaders()}
            outcome.body = reply.read()
            if reply.will_close:
                conn.close()
                self.local.conn = None
        except http.client.IncompleteRead as exc:
            outcome.error = "truncated_body"
            outcome.body = exc.partial
            conn.close()
            self.local.conn = None
        except (OSError, http.client.HTTPException) as exc:
            outcome.error = f"connection_error:{type(exc).__name__}"
            conn.close()
            self.local.conn = None
        outcome.done = time.monotonic()
        return outcome


# -- the faults ---------------------------------------------------------------------------------
def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def log_count(stack: Stack, level: str) -> int:
    """Lines switchyard's policy logger has written at ``level`` (reloads: info, rejections: error)."""
    count = 0
    for line in stack.switchyard.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            count += entry.get("logger") == "switchyard.policy" and entry.get("level") == level and (
                level != "info" or entry.get("event") == "policy reloaded")
    return count


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Faults:
    """Policy reloads and the kill, run one at a time on their own thread; a timeline of them."""

    def __init__(self, stack: Stack, policy_file: Path, versions: list[str]) -> None:
        self.stack, self.policy_file, self.texts = stack, policy_file, versions
        self.running = 0  # index into versions
        self.windows: list[tuple[int, float, float]] = [(0, float("-inf"), float("-inf"))]  # (version, written, seen)
        self.rejected: list[dict] = []
        self.outage: tuple[float, float] | None = None
        self.rss: dict[str, int | None] = {}
        self.rss_samples: list[tuple[float, int, int | None]] = []  # (seconds, pid, kB)
        self.problems: list[str] = []

    def good_reload(self) -> None:
        version = 1 - self.running
        before = log_count(self.stack, "info")
        written = time.monotonic()
        self.policy_file.write_text(self.texts[version])
        self.stack.switchyard.process.send_signal(signal.SIGHUP)
        if not wait_until(lambda: log_count(self.stack, "info") > before, 10):
            self.problems.append(f"reload to version {version} not logged within 10 s")
        self.windows.append((version, written, time.monotonic()))
        self.running = version

    def bad_reload(self, kind: str) -> None:
        before = log_count(self.stack, "error")
        if kind == "garbage":
            self.policy_file.write_text("{{{ this is not: [a policy\n")
        elif kind == "empty":
            self.policy_file.write_text("")
        else:
            self.policy_file.unlink()
        started = time.monotonic()
        self.stack.switchyard.process.send_signal(signal.SIGHUP)
        logged = wait_until(lambda: log_count(self.stack, "error") > before, 10)
        self.rejected.append({"kind": kind, "logged": logged, "seconds": round(time.monotonic() - started, 3)})
        if not logged:
            self.problems.append(f"bad policy version ({kind}) not logged within 10 s")
        self.policy_file.write_text(self.texts[self.running])  # the running text again: nothing changes

    def kill_and_restart(self, outage: float) -> None:
        process = self.stack.switchyard.process
        self.rss["before_kill_kb"] = rss_kb(process.pid)
        killed = time.monotonic()
        process.send_signal(signal.SIGKILL)
        process.wait()
        time.sleep(outage)
        self.stack.switchyard.start()
        self.stack.wait_switchyard(time.monotonic() + 60)
        self.outage = (killed, time.monotonic())
        self.rss["after_restart_kb"] = rss_kb(self.stack.switchyard.process.pid)

    def versions_possible(self, start: float, end: float) -> set[int]:
        """Policy versions that may have decided a request in flight from ``start`` to ``end``."""
        possible = set()
        for i, (version, written, _) in enumerate(self.windows):
            until = self.windows[i + 1][2] if i + 1 < len(self.windows) else float("inf")
            if written <= end and until >= start:
                possible.add(version)
        return possible


# -- the run ------------------------------------------------------------------------------------
def percentiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50_ms": None, "p99_ms": None, "n": len(values)}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2), "n": len(values)}


def run(args: argparse.Namespace, workdir: Path) -> dict:
    policy_file = workdir / "policy.yaml"
    shutil.copyfile(args.policy, policy_file)
    text = args.policy.read_text()
    flipped = text.replace("\ndefault: small\n", "\ndefault: large\n")
    if flipped == text:
        raise SystemExit(f"{args.policy}: expected a line `default: small` to flip for the routing-changing reloads.")
    versions = [text, flipped]
    version_files = []
    for i, version_text in enumerate(versions):
        path = workdir / f"version-{i}.yaml"
        path.write_text(version_text)
        version_files.append(path)

    stack = Stack(policy_file, workdir / "stack")
    stack.start()
    try:
        envoy_default = stack.default_backend
        expected = {(v, t.name): expected_answer(t, version_files[v], envoy_default) for v in range(2) for t in TEMPLATES}
        rng = random.Random(args.seed)
        plan = rng.choices(TEMPLATES, weights=[t.weight for t in TEMPLATES], k=args.requests)
        client = Client(stack.ports.listen)
        faults = Faults(stack, policy_file, versions)
        for _ in range(20):  # warm-up, not counted
            client.send(-1, TEMPLATES[0])
        faults.rss["start_kb"] = rss_kb(stack.switchyard.process.pid)

        duration = args.requests / args.rate
        events = [(duration / 2, "kill", None)]
        tick, n = args.reload_every, 0
        while tick < duration - 1:
            events.append((tick, "reload", "good" if n % 2 == 0 else BAD_VERSIONS[(n // 2) % len(BAD_VERSIONS)]))
            tick, n = tick + args.reload_every, n + 1
        events.sort()
        stop = threading.Event()

        def control(t0: float) -> None:
            for at, what, kind in events:
                if stop.wait(max(0.0, t0 + at - time.monotonic())):
                    return
                try:
                    if what == "kill":
                        faults.kill_and_restart(args.outage)
                    elif kind == "good":
                        faults.good_reload()
                    else:
                        faults.bad_reload(kind)
                except Exception as exc:  # noqa: BLE001 - recorded in the report, the load goes on
                    faults.problems.append(f"{what} {kind or ''} failed: {exc!r}")

        def sample_rss(t0: float) -> None:  # switchyard's memory every 5 s: growth or a plateau
            while not stop.wait(5.0):
                process = stack.switchyard.process
                faults.rss_samples.append((round(time.monotonic() - t0, 1), process.pid, rss_kb(process.pid)))

        outcomes: list[Outcome] = []
        lag: list[float] = []
        pool = concurrent.futures.ThreadPoolExecutor(args.workers)
        t0 = time.monotonic()
        controller = threading.Thread(target=control, args=(t0,), name="soak-faults")
        controller.start()
        sampler = threading.Thread(target=sample_rss, args=(t0,), name="soak-rss", daemon=True)
        sampler.start()
        futures = []
        deadline = t0 + args.max_seconds
        for i, template in enumerate(plan):
            due = t0 + i / args.rate
            now = time.monotonic()
            if now > deadline:
                break
            if due > now:
                time.sleep(due - now)
            lag.append(max(0.0, time.monotonic() - due))
            futures.append(pool.submit(client.send, i, template))
        sent_seconds = time.monotonic() - t0
        for future in futures:
            outcomes.append(future.result())
        stop.set()
        controller.join()
        pool.shutdown()
        wall = time.monotonic() - t0
        faults.rss["end_kb"] = rss_kb(stack.switchyard.process.pid)
        return report(args, plan, outcomes, expected, faults, wall, sent_seconds, lag)
    finally:
        stack.stop()


def report(args, plan, outcomes, expected, faults: Faults, wall, sent_seconds, lag) -> dict:
    failed: dict[str, int] = {}
    misrouted, wrong, ambiguous, outage_answers = [], [], 0, {"ok": 0, "router_unavailable": 0, "other": 0}
    ok_latency: dict[str, list[float]] = {"plain": [], "stream": []}
    by_template: dict[str, list[float]] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        kind = outcome.template.kind
        tally = by_kind.setdefault(kind, {"sent": 0, "ok": 0})
        tally["sent"] += 1
        possible = faults.versions_possible(outcome.sent, outcome.done)
        ambiguous += len(possible) > 1
        candidates = [expected[(v, outcome.template.name)] for v in possible]
        in_outage = faults.outage is not None and outcome.sent <= faults.outage[1] and outcome.done >= faults.outage[0]
        if outcome.error:
            cause = outcome.error
        elif any(matches(outcome, e) for e in candidates):
            cause = "ok"
            tally["ok"] += 1
            ok_latency["stream" if kind == "stream" else "plain"].append(outcome.done - outcome.sent)
            by_template.setdefault(outcome.template.name, []).append(outcome.done - outcome.sent)
        elif fail_closed(outcome):
            cause = f"router_unavailable_{outcome.status}" + ("" if in_outage else "_while_serving")
        elif "x-demo-backend" in outcome.headers and all(
                outcome.headers["x-demo-backend"] != e.backend for e in candidates):
            cause = "misrouted"
            misrouted.append(outcome)
        else:
            cause = "wrong_answer"
            wrong.append(outcome)
        if cause != "ok":
            failed[cause] = failed.get(cause, 0) + 1
        if in_outage:
            key = "ok" if cause == "ok" else "router_unavailable" if cause.startswith("router_unavailable") else "other"
            outage_answers[key] += 1

    def sample(items: list[Outcome]) -> list[dict]:
        return [{"template": o.template.name, "status": o.status, "backend": o.headers.get("x-demo-backend"),
                 "rule": o.headers.get("x-switchyard-rule"), "body": o.body[:200].decode("utf-8", "replace")}
                for o in items[:10]]

    answered = sum(1 for o in outcomes if o.error is None)
    envoy_version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "bench": "soak",
        "config": {"requests": args.requests, "rate_per_s": args.rate, "workers": args.workers,
                   "reload_every_s": args.reload_every, "outage_s": args.outage, "seed": args.seed,
                   "policy": str(args.policy.relative_to(ROOT) if args.policy.is_relative_to(ROOT) else args.policy)},
        "sent": len(outcomes),
        "not_sent": len(plan) - len(outcomes),
        "answered": answered,
        "ok": sum(tally["ok"] for tally in by_kind.values()),
        "failed_by_cause": dict(sorted(failed.items())),
        "misrouted": len(misrouted),
        "misrouted_samples": sample(misrouted),
        "wrong_answer_samples": sample(wrong),
        "by_kind": by_kind,
        "answers_during_outage": outage_answers,
        "answers_checked_against_two_versions": ambiguous,
        "outage_s": round(faults.outage[1] - faults.outage[0], 3) if faults.outage else None,
        "policy_reloads": len(faults.windows) - 1,
        "policy_versions_rejected": faults.rejected,
        "switchyard_rss_kb": faults.rss,
        "switchyard_rss_samples": [{"s": t, "pid": pid, "kb": kb} for t, pid, kb in faults.rss_samples],
        "latency_ok": {kind: percentiles(values) for kind, values in ok_latency.items()},
        "latency_ok_by_template": {name: percentiles(values) for name, values in sorted(by_template.items())},
        "seconds": {"wall": round(wall, 1), "sending": round(sent_seconds, 1)},
        "achieved_rate_per_s": round(len(outcomes) / sent_seconds, 1) if sent_seconds else None,
        "send_lag_ms": percentiles(lag),
        "problems": faults.problems,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "envoy": envoy_version},
    }


def print_summary(result: dict) -> None:
    print(f"sent {result['sent']}  answered {result['answered']}  ok {result['ok']}  "
          f"misrouted {result['misrouted']}  not sent {result['not_sent']}")
    print(f"failed by cause: {result['failed_by_cause'] or 'none'}")
    print(f"during the {result['outage_s']} s outage: {result['answers_during_outage']}")
    print(f"policy reloads {result['policy_reloads']}, bad versions rejected "
          f"{sum(r['logged'] for r in result['policy_versions_rejected'])}/{len(result['policy_versions_rejected'])}")
    print(f"switchyard RSS kB: {result['switchyard_rss_kb']}")
    for kind, lat in result["latency_ok"].items():
        print(f"latency ({kind}, ok answers): p50 {lat['p50_ms']} ms  p99 {lat['p99_ms']} ms  (n={lat['n']})")
    print(f"rate {result['achieved_rate_per_s']}/s over {result['seconds']['sending']} s; "
          f"send lag p99 {result['send_lag_ms']['p99_ms']} ms")
    if result["problems"]:
        print("problems:", *result["problems"], sep="\n  ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="Requests to send (default 10000).")
    parser.add_argument("--rate", type=float, default=100, help="Requests per second, open loop (default 100).")
    parser.add_argument("--workers", type=int, default=32, help="Client threads / keep-alive connections.")
    parser.add_argument("--reload-every", type=float, default=10, help="Seconds between policy file changes.")
    parser.add_argument("--outage", type=float, default=1.0, help="Seconds switchyard stays down after the kill.")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="Stop sending after this many seconds (default: twice the planned time + 60).")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--policy", type=Path, default=POLICY, help="Policy to soak (needs a `default: small` line).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rate <= 0:
        parser.error("--requests and --rate must be positive.")
    if args.max_seconds is None:
        args.max_seconds = 2 * args.requests / args.rate + 60
    args.policy = args.policy.resolve()
    with tempfile.TemporaryDirectory(prefix="switchyard-soak-") as tmp:
        result = run(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    print(f"wrote {args.out}")
    return 0 if result["misrouted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
