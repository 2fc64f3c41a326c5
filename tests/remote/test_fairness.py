"""The scorer server's bounded work: one caller cannot take the server from the others, an
oversized or absurd call is refused before any work, a deadline is capped, and a caller that
has gone leaves nothing queued; the client tells a deadline miss and a busy server apart."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from extproc import ScorerDescription, ScorerOverloaded, parse_policy
from extproc._errors import ScorerDeadline
from extproc.scoring._remote import RemoteScorer
from extproc.scoring._decide import score_request
from routers.serving.remote_server import ScorerServer, ServerLimits, peer_host
from switchyard.v1 import scorer_pb2, scorer_pb2_grpc
from tests.remote.support import FakeScorer, ServerProcess, describe, remote_spec, request, spec

MESSAGES = b'[{"role": "user", "content": "hello"}]'


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class GatedScorer(FakeScorer):
    """A FakeScorer whose calls for the prompt ``"flood"`` wait until :attr:`gate` is set."""

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def score(self, request, *, deadline, available=None):
        if request.messages[-1]["content"] == "flood":
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        return await super().score(request, deadline=deadline, available=available)


async def _server(scorers, limits=None, caller=None, listen="127.0.0.1:0", describer=describe):
    kwargs = {"caller": caller} if caller is not None else {}
    server = ScorerServer({name: s.spec for name, s in scorers.items()}, listen, grace=0.5,
                          loader=lambda s: scorers[s.name], describer=describer, limits=limits, **kwargs)
    await server.start()
    await server.load()
    return server


async def _code(stub, call: scorer_pb2.ScoreRequest, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
    """The status code and sentence the server answers ``call`` with (OK, "" on success)."""
    try:
        await stub.Score(call, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _until(condition, seconds: float = 20.0) -> None:
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, "the condition never held"
        await asyncio.sleep(0.01)


def by_connection(context) -> str:
    """Each channel is a caller of its own (all tests connect from one host)."""
    return context.peer()


def test_a_flooding_caller_gets_busy_at_once_while_another_caller_is_still_scored():
    limits = ServerLimits(max_in_flight=6, max_in_flight_per_caller=4, max_deadline_ms=60_000)

    async def main():
        fake = GatedScorer(spec())
        server = await _server({"probe": fake}, limits, by_connection)
        target = f"127.0.0.1:{server.port}"
        normal = RemoteScorer(remote_spec(target))
        try:
            async with grpc.aio.insecure_channel(target) as flooder:
                stub = scorer_pb2_grpc.ScorerServiceStub(flooder)
                flood = scorer_pb2.ScoreRequest(scorer="probe", messages=b'[{"role": "user", "content": "flood"}]')
                calls = [asyncio.create_task(_code(stub, flood, timeout=60)) for _ in range(20)]
                await _until(lambda: sum(c.done() for c in calls) == 16 and fake.waiting == 4)
                refused = [c.result() for c in calls if c.done()]
                held = [c for c in calls if not c.done()]
                # the flooder's share is taken; another caller is still scored, at once
                scores = await normal.score(request("hi"), deadline=time.monotonic() + 10)
                fake.gate.set()
                answered = [await c for c in held]
        finally:
            await normal.close()
            await server.stop()
        assert scores.values["p"] == 0.25
        assert {code for code, _ in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("busy" in detail and "--max-in-flight-per-caller 4" in detail for _, detail in refused)
        assert answered == [(grpc.StatusCode.OK, "")] * 4
        assert fake.calls == 5  # the refused calls never reached the scorer
        assert server.servicer.admission.total == 0 and not server.servicer.admission.by_caller

    run(main())


def test_a_full_server_is_busy_for_everyone_and_a_full_scorer_queue_too():
    limits = ServerLimits(max_in_flight=2, max_in_flight_per_caller=2, max_deadline_ms=60_000)

    async def main():
        fake = GatedScorer(spec())
        full = FakeScorer(spec("full"), fail="never raised")

        async def overloaded(request, *, deadline, available=None):
            raise ScorerOverloaded("scorer 'full' is overloaded: 256 requests already wait.")

        full.score = overloaded
        server = await _server({"probe": fake, "full": full}, limits, by_connection)
        target = f"127.0.0.1:{server.port}"
        try:
            async with grpc.aio.insecure_channel(target) as one:
                stub = scorer_pb2_grpc.ScorerServiceStub(one)
                flood = scorer_pb2.ScoreRequest(scorer="probe", messages=b'[{"role": "user", "content": "flood"}]')
                held = [asyncio.create_task(_code(stub, flood, timeout=60)) for _ in range(2)]
                await _until(lambda: fake.waiting == 2)
                other = RemoteScorer(remote_spec(target))
                with pytest.raises(ScorerOverloaded, match="RESOURCE_EXHAUSTED: The scorer service is busy: 2 calls"):
                    await other.score(request(), deadline=time.monotonic() + 10)
                await other.close()
                fake.gate.set()
                assert [await c for c in held] == [(grpc.StatusCode.OK, "")] * 2
            # the scorer's own queue refusing a request is "busy" too, not INTERNAL
            remote = RemoteScorer(remote_spec(target, name="full"))
            with pytest.raises(ScorerOverloaded, match="RESOURCE_EXHAUSTED: Scorer 'full' is overloaded: 256"):
                await remote.score(request(), deadline=time.monotonic() + 10)
            await remote.close()
        finally:
            await server.stop()

    run(main())


def _dual_stack() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _dual_stack(), reason="needs IPv6 loopback to connect from a second host address")
def test_by_default_a_caller_is_the_host_it_connects_from():
    limits = ServerLimits(max_in_flight=8, max_in_flight_per_caller=2, max_deadline_ms=60_000)

    async def main():
        fake = GatedScorer(spec())
        server = await _server({"probe": fake}, limits, listen="[::]:0")
        flood = scorer_pb2.ScoreRequest(scorer="probe", messages=b'[{"role": "user", "content": "flood"}]')
        try:
            # two connections from 127.0.0.1 are one caller; ::1 is another
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as a, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as b:
                held = [asyncio.create_task(_code(scorer_pb2_grpc.ScorerServiceStub(ch), flood, 60)) for ch in (a, b)]
                await _until(lambda: fake.waiting == 2)
                third, _ = await _code(scorer_pb2_grpc.ScorerServiceStub(a), flood)
                v6 = RemoteScorer(remote_spec(f"ipv6:[::1]:{server.port}"))
                scores = await v6.score(request(), deadline=time.monotonic() + 10)
                await v6.close()
                fake.gate.set()
                await asyncio.gather(*held)
        finally:
            await server.stop()
        assert third is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert scores.values["p"] == 0.25

    run(main())


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:10.0.0.7:51234", "10.0.0.7"),
    ("ipv6:[fd00::7]:51234", "fd00::7"),
    ("ipv6:%5Bfd00::7%5D:51234", "fd00::7"),
    ("unix:/run/scorer.sock", "unix:/run/scorer.sock"),
])
def test_peer_host_is_the_connection_host_without_its_port(peer, host):
    assert peer_host(SimpleNamespace(peer=lambda: peer)) == host


def test_oversized_and_absurd_calls_are_refused_before_any_work():
    async def main():
        fake = FakeScorer(spec())
        server = await _server({"probe": fake})
        results = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scorer_pb2_grpc.ScorerServiceStub(channel)
                big = b'[{"role": "user", "content": "' + b"x" * (6 * 1024 * 1024) + b'"}]'
                results["6 MB"] = await _code(stub, scorer_pb2.ScoreRequest(scorer="probe", messages=big))
                many = b"[" + b",".join([b'{"role": "user", "content": "hi"}'] * 10_000) + b"]"
                results["10,000 messages"] = await _code(stub, scorer_pb2.ScoreRequest(scorer="probe", messages=many))
                parts = b'[{"role": "user", "content": [' + b",".join([b'{"type": "text", "text": "a"}'] * 2000) + b"]}]"
                results["2,000 parts"] = await _code(stub, scorer_pb2.ScoreRequest(scorer="probe", messages=parts))
                name = "n" * 1_000_000
                results["1 MB name"] = await _code(stub, scorer_pb2.ScoreRequest(scorer=name, messages=MESSAGES))
                # the server still answers a normal call afterwards
                results["normal"] = await _code(stub, scorer_pb2.ScoreRequest(scorer="probe", messages=MESSAGES))
        finally:
            await server.stop()
        assert results["6 MB"][0] is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert results["10,000 messages"] == (grpc.StatusCode.INVALID_ARGUMENT,
                                              "`messages` has 10000 messages; this server takes at most 256 "
                                              "per call (--max-messages).")
        assert results["2,000 parts"][0] is grpc.StatusCode.INVALID_ARGUMENT
        assert "2000 content parts" in results["2,000 parts"][1] and "--max-parts" in results["2,000 parts"][1]
        code, detail = results["1 MB name"]
        assert code is grpc.StatusCode.NOT_FOUND and "(1000000 characters)" in detail and len(detail) < 300
        assert results["normal"] == (grpc.StatusCode.OK, "")
        assert fake.calls == 1  # only the normal call reached the scorer

    run(main())


def test_an_empty_or_unknown_availability_mask_is_invalid_argument():
    def pooled(s):
        return ScorerDescription(outputs=("m-small", "m-large"), pool=("m-small", "m-large"))

    async def main():
        fake = FakeScorer(spec("utility"))
        server = await _server({"utility": fake}, describer=pooled)
        results = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scorer_pb2_grpc.ScorerServiceStub(channel)
                for available in ([], ["m-small", "m-huge"], ["m-large"]):
                    call = scorer_pb2.ScoreRequest(scorer="utility", messages=MESSAGES, available=available,
                                                   has_available=True)
                    results.append(await _code(stub, call))
        finally:
            await server.stop()
        (empty, empty_detail), (unknown, unknown_detail), ok = results
        assert empty is grpc.StatusCode.INVALID_ARGUMENT and "`available` is empty" in empty_detail
        assert unknown is grpc.StatusCode.INVALID_ARGUMENT and "'m-huge'" in unknown_detail
        assert ok == (grpc.StatusCode.OK, "")
        assert fake.available == [("m-large",)]

    run(main())


def test_a_deadline_above_the_cap_is_cut_to_the_cap():
    async def main(limits, timeout):
        slow = FakeScorer(spec(deadline_ms=60_000), delay=3.0)
        server = await _server({"probe": slow}, limits)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scorer_pb2_grpc.ScorerServiceStub(channel)
                code, detail = await _code(stub, scorer_pb2.ScoreRequest(scorer="probe", messages=MESSAGES), timeout)
        finally:
            await server.stop()
        return slow.budgets, code, detail

    # a caller asking for 60 s gets the default cap (1000 ms), not the 3 s the scorer would take
    budgets, code, detail = run(main(None, 60))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "did not answer within" in detail
    assert 0 < budgets[0] <= 1.0
    # a call without a deadline gets the scorer's own deadline_ms (60 s here), capped too
    budgets, code, _ = run(main(ServerLimits(max_deadline_ms=200), None))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED and 0 < budgets[0] <= 0.2


CLIENT_POLICY = """
version: 1
backends:
  small: {cluster: small, model: s}
  large: {cluster: large, model: l}
default: small
fallback: large
scorers:
  probe: {kind: probe, checkpoints: {relope: unused}, remote: {target: "TARGET"}, deadline_ms: 900}
signals:
  ok: {kind: score, scorer: probe, above: 0.5}
rules:
  - {name: probe, when: ok, backend: small}
"""


def test_a_remote_deadline_miss_is_recorded_as_deadline_and_busy_as_overload():
    """The server's cap ends the call (DEADLINE_EXCEEDED) well before the sidecar's own 900 ms:
    still a deadline miss, not an error; a busy server is an overload."""
    from extproc import PolicyEngine

    async def main():
        slow = GatedScorer(spec())
        server = await _server({"probe": slow}, ServerLimits(max_deadline_ms=100, max_in_flight=1,
                                                             max_in_flight_per_caller=1))
        policy = parse_policy(CLIENT_POLICY.replace("TARGET", f"127.0.0.1:{server.port}"))
        remote = RemoteScorer(policy.scorers["probe"])
        engine = PolicyEngine(policy, {"probe": remote})
        try:
            missed, _ = await score_request(engine, "probe", request("flood"), time.monotonic())
            with pytest.raises(ScorerDeadline):
                await remote.score(request("flood"), deadline=time.monotonic() + 5)
            held = asyncio.create_task(remote.score(request("flood"), deadline=time.monotonic() + 5))
            await _until(lambda: slow.waiting == 1)
            busy, _ = await score_request(engine, "probe", request(), time.monotonic())
            slow.gate.set()
            await held
        finally:
            await remote.close()
            await server.stop()
        return missed, busy

    missed, busy = run(main())
    assert missed.reason == "deadline" and "DEADLINE_EXCEEDED" in missed.detail
    assert busy.reason == "overload" and "busy" in busy.detail


@pytest.fixture(scope="module")
def probe_folders(tmp_path_factory):
    from tests.routers.serving.support import probe_checkpoints
    from tests.routers.test_probe_support import tiny_text_model

    model = tiny_text_model(tmp_path_factory.mktemp("fairness"))
    return probe_checkpoints(model, tmp_path_factory.mktemp("probes"))


def test_a_call_whose_caller_has_gone_is_dropped_before_its_forward(probe_folders):
    """A real probe scorer: while one request's forward runs, a second waits in the batcher;
    its caller cancels, and the second never reaches a forward (long before its deadline)."""
    import torch

    from tests.routers.serving.support import probe_spec

    torch.set_num_threads(1)
    limits = ServerLimits(max_deadline_ms=30_000)

    async def main():
        server = ScorerServer({"probe": probe_spec(probe_folders)}, "127.0.0.1:0", grace=0.5, limits=limits)
        await server.start()
        await server.load()
        backbone = server.servicer.scorers["probe"].group.backbone
        gate, encoded = threading.Event(), []
        original = backbone.encode

        def encode(items):
            encoded.append([m[-1]["content"] for m in items])
            gate.wait(30)
            return original(items)

        backbone.encode = encode
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scorer_pb2_grpc.ScorerServiceStub(channel)

                def call(text):
                    messages = f'[{{"role": "user", "content": "{text}"}}]'.encode()
                    return stub.Score(scorer_pb2.ScoreRequest(scorer="probe", messages=messages), timeout=30)

                first = call("first")
                await _until(lambda: encoded)  # its forward runs (held at the gate)
                gone = call("gone")
                await _until(lambda: server.servicer.admission.total == 2)
                await asyncio.sleep(0.2)  # it reaches the batcher's queue
                gone.cancel()
                await _until(lambda: server.servicer.admission.total == 1)
                gate.set()
                assert (await first).values
                after = await call("after")
        finally:
            del backbone.encode
            gate.set()
            await server.stop()
        return encoded, after

    encoded, after = run(main())
    assert after.values
    assert encoded == [["first"], ["after"]]  # "gone" never reached a forward


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_a_60_mb_call_is_refused_without_the_server_growing():
    """gRPC refuses it from its length prefix (once it grew a server to 13.5 GB)."""
    server = ServerProcess()
    try:
        before = _rss_mib(server.proc.pid)

        async def main():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scorer_pb2_grpc.ScorerServiceStub(channel)
                big = b'[{"role": "user", "content": "' + b"x" * (60 * 1024 * 1024) + b'"}]'
                return [(await _code(stub, scorer_pb2.ScoreRequest(scorer="probe", messages=big)))[0]
                        for _ in range(3)]

        codes = run(main())
        grown = _rss_mib(server.proc.pid) - before
    finally:
        server.kill()
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert grown < 60  # not even one copy of the call was kept


def test_scorer_serve_flags_set_the_limits_and_a_bad_one_exits_1_naming_it(tmp_path, capsys, monkeypatch):
    from extproc.cli import main
    from routers.serving import remote_server

    config = tmp_path / "scorers.yaml"
    config.write_text("scorers:\n  probe: {kind: probe, checkpoints: {relope: ckpt}}\n")
    seen = {}
    monkeypatch.setattr(remote_server, "serve_scorers", lambda config, listen, **kw: seen.update(kw) or 0)
    serve = ["scorer", "serve", "--config", str(config), "--listen", "127.0.0.1:0"]
    assert main(serve + ["--max-in-flight", "32", "--max-in-flight-per-caller", "8", "--max-deadline-ms", "250"]) == 0
    assert seen["limits"] == ServerLimits(max_in_flight=32, max_in_flight_per_caller=8, max_deadline_ms=250.0)
    assert main(serve) == 0 and seen["limits"] == ServerLimits()

    assert main(serve + ["--max-in-flight-per-caller", "300"]) == 1
    assert "--max-in-flight-per-caller (300) must not exceed --max-in-flight (256)" in capsys.readouterr().err
    assert main(serve + ["--max-messages", "0"]) == 1
    assert "--max-messages must be a positive whole number, got 0" in capsys.readouterr().err
    assert main(serve + ["--max-deadline-ms", "nan"]) == 1
    assert "--max-deadline-ms must be a number of milliseconds > 0, got nan" in capsys.readouterr().err
