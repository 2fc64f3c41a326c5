"""``make run``: start demo backends, switchyard and Envoy, send sample requests, keep running.

    python -m demo.run [--policy policies/default.yaml] [--once]

Ports are envoy/standalone.yaml's: Envoy on 127.0.0.1:10000 (admin 9901), switchyard on
50051, one demo backend per policy backend from 18001 up. Children log to ``.demo/``.
Ctrl-C (or SIGTERM) stops every child and exits 0; ``--once`` exits after the samples.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from demo.stack import ROOT, Ports, Stack, StackError, policy_backends, port_in_use

__all__ = ["SAMPLES", "main"]

PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
REPORT = " ".join(f"Line {i}: revenue grew in region {i % 7} while costs stayed flat." for i in range(500))
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

# What the demo sends, one row per rule of policies/default.yaml: (label, user content, extra body fields).
SAMPLES: list[tuple[str, str | list, dict]] = [
    ("chit-chat", "Hi! How's your day going?", {}),
    ("code", "Why does this python function raise a KeyError? def f(d): return d['x']", {}),
    ("long prompt", f"Summarise this report in three bullet points:\n{REPORT}", {}),
    ("maths", "Prove that there are infinitely many primes.", {}),
    ("reasoning, streamed", "Think step by step: which is heavier, a kilo of feathers or a kilo of iron?", {"stream": True}),
    ("image", [{"type": "text", "text": "What colour is this pixel?"}, {"type": "image_url", "image_url": {"url": PIXEL}}], {}),
    ("tools", "What's the weather like in Lisbon right now?", {"tools": [WEATHER_TOOL]}),
]

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


def send_samples(base_url: str) -> bool:
    """Send every sample through the gateway with the OpenAI SDK; print one row each. True if all answered."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="demo", max_retries=0, timeout=30)
    print(f"\n{'sample':<20} {'prompt':<44} {'chosen':<8} {'rule':<16} {'answered by'}")
    print("-" * 104)
    ok = True
    for label, content, extra in SAMPLES:
        text = content if isinstance(content, str) else " ".join(p.get("text", "[image]") for p in content)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": content}], **extra
            )
            parsed = raw.parse()
            if extra.get("stream"):
                for _chunk in parsed:  # read the SSE stream to its end
                    pass
            headers = raw.headers
            row = (headers.get("x-switchyard-backend", "-"), headers.get("x-switchyard-rule", "-"), headers.get("x-demo-backend", "-"))
        except openai.APIError as exc:
            ok = False
            row = ("error", getattr(exc, "status_code", "") or type(exc).__name__, str(exc)[:40])
        print(f"{label:<20} {_short(text, 44):<44} {row[0]:<8} {row[1]:<16} {row[2]}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, default=ROOT / "policies" / "default.yaml", help="Policy YAML file.")
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
        stack = Stack(args.policy, workdir, _ports(args.policy), envoy_args=())
        print(f"starting demo backends {', '.join(stack.backends)}, switchyard ({args.policy}) and Envoy; logs in {workdir}/")
        stack.start()
        print(f"gateway ready: {stack.url}/v1 (OpenAI-compatible; model='auto'), Envoy admin http://127.0.0.1:{ADMIN}")
        ok = send_samples(stack.url)
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
    except StackError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abandon the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
