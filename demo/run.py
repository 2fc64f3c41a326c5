"""``make run``: start demo backends, switchyard and Envoy, send sample requests, keep running.

    python -m demo.run [--policy demo/policy.yaml] [--once]

When the policy reads checkpoints from ``.demo/learned/`` (``demo/policy.yaml`` does), they
are built first if missing or stale (:mod:`demo.learned`). Ports are envoy/standalone.yaml's:
Envoy on 127.0.0.1:10000 (admin 9901), switchyard on 50051, one demo backend per policy
backend from 18001 up. Children log to ``.demo/``. Ctrl-C (or SIGTERM) stops every child and
exits 0; ``--once`` exits after the samples.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from demo import learned
from harness import ROOT, Ports, Stack, StackError, policy_backends, port_in_use

__all__ = ["DEMO_POLICY", "SAMPLES", "Answer", "main", "score_shown", "send_samples"]

DEMO_POLICY = ROOT / "demo" / "policy.yaml"

PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
REPORT = " ".join(f"Line {i}: revenue grew in region {i % 7} while costs stayed flat." for i in range(500))
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

# What the demo sends, one row per rule of demo/policy.yaml (the cheap ones are also
# policies/default.yaml's): (label, user content, extra body fields). The word problems are
# written for the demo, GSM8K style; none is a row of demo/data.
SAMPLES: list[tuple[str, str | list, dict]] = [
    ("chit-chat", "Hi! How's your day going?", {}),
    ("code", "Why does this python function raise a KeyError? def f(d): return d['x']", {}),
    ("long prompt", f"Summarise this report in three bullet points:\n{REPORT}", {}),
    ("maths", "Prove that there are infinitely many primes.", {}),
    ("reasoning, streamed", "Think step by step: which is heavier, a kilo of feathers or a kilo of iron?", {"stream": True}),
    ("image", [{"type": "text", "text": "What colour is this pixel?"}, {"type": "image_url", "image_url": {"url": PIXEL}}], {}),
    ("tools", "What's the weather like in Lisbon right now?", {"tools": [WEATHER_TOOL]}),
    ("word problem 1", "A baker makes 48 muffins and packs them in boxes of 6. She sells each box for $9. "
                       "How much money does she make if she sells every box?", {}),
    ("word problem 2", "Tom reads 12 pages on Monday and twice as many on Tuesday. On Wednesday he reads 5 pages "
                       "fewer than on Tuesday. How many pages did he read in the three days?", {}),
    ("word problem 3", "A train leaves at 2:15 pm and travels 180 miles at 60 miles per hour, stops for 20 minutes, "
                       "then travels another 90 miles at 45 miles per hour. At what time does it arrive?", {}),
    ("word problem 4", "Maria has 3 times as many stickers as Leo. After Maria gives Leo 14 stickers, they have the "
                       "same number. How many stickers did Maria have at first?", {}),
]

#: Seconds to wait for a request's line in Envoy's access log (flushed every 100 ms).
ACCESS_LOG_WAIT_S = 3.0

LISTEN, ADMIN, EXTPROC, FIRST_BACKEND = 10000, 9901, 50051, 18001


class _Stop(Exception):
    """Raised by the SIGINT/SIGTERM handler to unwind to the cleanup."""


def _on_signal(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


def _ports(policy: Path) -> Ports:
    names, _ = policy_backends(policy)
    ports = Ports(LISTEN, ADMIN, EXTPROC, {name: FIRST_BACKEND + i for i, name in enumerate(names)})
    wanted = {"Envoy listener": ports.listen, "Envoy admin": ports.admin, "switchyard": ports.extproc}
    wanted.update({f"demo backend {name!r}": port for name, port in ports.backends.items()})
    taken = [f"{what} (127.0.0.1:{port})" for what, port in wanted.items() if port_in_use(port)]
    if taken:
        raise StackError(f"Port(s) already in use: {', '.join(taken)}. Stop whatever holds them (another `make run`?) and retry.")
    return ports


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass(frozen=True)
class Answer:
    """One sample's row of the table. ``score`` is what decided it when a learned scorer did
    (``probe.p=0.312``, ``utility: small 0.623``), else ``-``."""

    label: str
    prompt: str
    backend: str
    rule: str
    score: str
    answered_by: str
    ok: bool


def _access_log_entries(access_log: Path | None) -> list[dict]:
    """Envoy's access-log lines (JSON) so far; Envoy's own messages are skipped."""
    if access_log is None or not access_log.exists():
        return []
    entries = []
    for line in access_log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries


def _decision_metadata(access_log: Path | None, seen: int) -> dict:
    """The switchyard metadata of the first access-log line after the ``seen`` earlier ones."""
    deadline = time.monotonic() + ACCESS_LOG_WAIT_S
    while access_log is not None:
        entries = _access_log_entries(access_log)
        if len(entries) > seen:
            metadata = entries[seen].get("switchyard")
            return metadata if isinstance(metadata, dict) else {}
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return {}


def score_shown(metadata: dict) -> str:
    """The learned score that decided a request, from its decision metadata."""
    if metadata.get("fallback"):
        return f"fallback: {metadata['fallback']}"
    utilities = dict(item.split("=", 1) for item in metadata.get("utilities", "").split(",") if "=" in item)
    backend = metadata.get("backend", "")
    if backend in utilities:
        return f"utility: {backend} {float(utilities[backend]):.3f}"
    scores = [item.split("=", 1) for item in metadata.get("scores", "").split(",") if "=" in item]
    return " ".join(f"{name}={float(value):.3f}" for name, value in scores) or "-"


def send_samples(base_url: str, access_log: Path | None = None) -> list[Answer]:
    """Send every sample through the gateway with the OpenAI SDK; print one row each as it is
    answered and return the rows. The score column comes from Envoy's ``access_log`` (the
    decision's dynamic metadata); without one it shows ``-``."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="demo", max_retries=0, timeout=30)
    print(f"\n{'sample':<20} {'prompt':<44} {'chosen':<8} {'rule':<16} {'score':<22} {'answered by'}")
    print("-" * 127)
    answers = []
    for label, content, extra in SAMPLES:
        text = content if isinstance(content, str) else " ".join(p.get("text", "[image]") for p in content)
        seen = len(_access_log_entries(access_log))
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": content}], **extra
            )
            parsed = raw.parse()
            if extra.get("stream"):
                for _chunk in parsed:  # read the SSE stream to its end
                    pass
            headers = raw.headers
            answer = Answer(label, text, headers.get("x-switchyard-backend", "-"), headers.get("x-switchyard-rule", "-"),
                            score_shown(_decision_metadata(access_log, seen)), headers.get("x-demo-backend", "-"), True)
        except openai.APIError as exc:
            answer = Answer(label, text, "error", str(getattr(exc, "status_code", "") or type(exc).__name__), "-",
                            str(exc)[:40], False)
        answers.append(answer)
        print(f"{label:<20} {_short(text, 44):<44} {answer.backend:<8} {answer.rule:<16} {answer.score:<22} "
              f"{answer.answered_by}")
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, default=DEMO_POLICY, help="Policy YAML file.")
    parser.add_argument("--once", action="store_true", help="Exit after the sample requests.")
    args = parser.parse_args(argv)

    workdir = ROOT / ".demo"
    workdir.mkdir(exist_ok=True)
    for old in workdir.glob("*.log"):
        old.unlink()
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    stack = None
    try:
        ports = _ports(args.policy)
        if learned.uses(args.policy, workdir / "learned"):
            learned.ensure(workdir / "learned")
        stack = Stack(args.policy, workdir, ports, envoy_args=())
        print(f"starting demo backends {', '.join(stack.backends)}, switchyard ({args.policy}) and Envoy; logs in {workdir}/")
        stack.start()
        print(f"gateway ready: {stack.url}/v1 (OpenAI-compatible; model='auto'), Envoy admin http://127.0.0.1:{ADMIN}")
        ok = all(answer.ok for answer in send_samples(stack.url, stack.envoy.log))
        if args.once:
            return 0 if ok else 1
        print("\nrunning; try it:\n"
              f"  curl -s {stack.url}/v1/chat/completions -H 'content-type: application/json' \\\n"
              "    -d '{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"prove it\"}]}' -i\n"
              "Ctrl-C stops everything.")
        while all(child.running for child in stack.children):
            time.sleep(0.5)
        dead = [c.name for c in stack.children if not c.running]
        print(f"demo: {', '.join(dead)} exited unexpectedly.\n{stack.logs()}", file=sys.stderr)
        return 1
    except _Stop as stop:
        print(f"\n{stop}: stopping")
        return 0
    except (StackError, learned.LearnedError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abandon the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
