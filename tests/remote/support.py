"""Test doubles for the remote scorer: a scriptable in-process Scorer served through the
real :class:`ScorerServer`, and a way to run that server as a separate, killable process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from extproc import RemoteConfig, RemoteTls, RoutingRequest, Scorer, ScorerDescription, ScorerError, ScorerSpec, Scores
from routers.serving.remote_server import ScorerServer, ServerTls

__all__ = ["FakeScorer", "spec", "remote_spec", "serving", "ServerProcess", "request"]

REPO = Path(__file__).resolve().parents[2]


def spec(name: str = "probe", deadline_ms: float = 80.0) -> ScorerSpec:
    """An in-process probe spec (never loaded by a real loader in these tests)."""
    return ScorerSpec(name=name, kind="probe", checkpoints=(("p", "/nonexistent"),), deadline_ms=deadline_ms)


def remote_spec(target: str, name: str = "probe", scorer: str | None = None, tls: RemoteTls | None = None) -> ScorerSpec:
    return ScorerSpec(name=name, kind="probe", remote=RemoteConfig(target=target, scorer=scorer, tls=tls))


def request(text: str = "hello") -> RoutingRequest:
    return RoutingRequest.from_json({"messages": [{"role": "user", "content": text}]}, {"x-request-id": "r-1"})


class FakeScorer(Scorer):
    """Answers ``{"p": value}`` (``"len"``: the last message's length) after ``delay`` seconds;
    ``fail`` raises ScorerError, ``nan`` returns NaN. Records what it saw."""

    def __init__(self, spec: ScorerSpec, *, value: float = 0.25, delay: float = 0.0,
                 fail: str | None = None, nan: bool = False) -> None:
        self.spec = spec
        self.value, self.delay, self.fail, self.nan = value, delay, fail, nan
        self.calls = 0
        self.budgets: list[float] = []  # deadline - now, as the scorer received it
        self.messages: list[list[dict]] = []
        self.available: list = []  # the availability mask each call carried (None: none)
        self.cancelled = asyncio.Event()
        self.closed = False

    async def score(self, request: RoutingRequest, *, deadline: float, available=None) -> Scores:
        self.calls += 1
        self.available.append(None if available is None else tuple(available))
        self.budgets.append(deadline - time.monotonic())
        self.messages.append(request.messages)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.fail:
            raise ScorerError(self.fail)
        value = math.nan if self.nan else self.value
        return Scores(values={"p": value, "len": float(len(request.messages[-1]["content"]))},
                      costs={"m": 0.5}, batch_size=3)

    async def close(self) -> None:
        self.closed = True


def describe(spec: ScorerSpec) -> ScorerDescription:
    return ScorerDescription(outputs=("p", "len"))


@contextlib.asynccontextmanager
async def serving(scorers: dict[str, FakeScorer], listen: str = "127.0.0.1:0",
                  grace: float = 1.0, tls: ServerTls | None = None) -> AsyncIterator[ScorerServer]:
    """The real scorer server on ``listen`` (over ``tls`` when given) serving ``scorers``
    (loaded through its loader hook)."""
    server = ScorerServer({name: s.spec for name, s in scorers.items()}, listen, grace=grace,
                          loader=lambda spec: scorers[spec.name], describer=describe, tls=tls)
    await server.start()
    try:
        await server.load()
        yield server
    finally:
        await server.stop()


class ServerProcess:
    """``python -m tests.remote.support --listen ...``: a FakeScorer served by the real server
    in its own process, so a test can SIGKILL it."""

    def __init__(self, listen: str = "127.0.0.1:0", value: float = 0.25) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.remote.support", "--listen", listen, "--value", str(value)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        line = self.proc.stdout.readline()  # printed once the scorers are loaded
        if not line.startswith("port "):
            self.kill()
            raise RuntimeError(f"fake scorer server did not start (said {line!r})")
        self.port = int(line.split()[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


async def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--value", type=float, default=0.25)
    args = parser.parse_args(argv)
    scorer = FakeScorer(spec(), value=args.value)
    async with serving({"probe": scorer}, args.listen) as server:
        print(f"port {server.port}", flush=True)
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(_main())
