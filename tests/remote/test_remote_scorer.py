"""RemoteScorer <-> the real scorer server over loopback gRPC, with scriptable scorers.

Round trip, errors and status codes, deadline propagation, round-robin balancing, shared
channels, and the health service's states."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import ScorerError, load_scorer
from extproc.scoring._remote import RemoteScorer, _channels
from routers.serving.remote_server import SERVICE_NAME, ScorerServer
from switchyard.v1 import scorer_pb2, scorer_pb2_grpc
from tests.remote.dns_server import TYPE_A, dns_server
from tests.remote.support import FakeScorer, describe, remote_spec, request, serving, spec


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_round_trip_carries_messages_values_costs_and_batch_size():
    async def main():
        fake = FakeScorer(spec("probe"), value=0.625)
        async with serving({"probe": fake}) as server:
            remote = load_scorer(remote_spec(f"127.0.0.1:{server.port}"))
            assert isinstance(remote, RemoteScorer)
            try:
                scores = await remote.score(request("four"), deadline=soon())
            finally:
                await remote.close()
        assert dict(scores.values) == {"p": 0.625, "len": 4.0}
        assert dict(scores.costs) == {"m": 0.5} and scores.batch_size == 3
        assert fake.messages == [[{"role": "user", "content": "four"}]]
        assert fake.available == [None]  # no mask asked: the server passes none

    run(main())


def test_the_availability_mask_reaches_the_remote_scorer():
    async def main():
        fake = FakeScorer(spec("utility"))
        async with serving({"utility": fake}) as server:
            remote = load_scorer(remote_spec(f"127.0.0.1:{server.port}", name="utility"))
            try:
                await remote.score(request(), deadline=soon(), available=("m-small", "m-large"))
                with pytest.raises(ScorerError, match="INVALID_ARGUMENT: `available` is empty"):
                    await remote.score(request(), deadline=soon(), available=())
            finally:
                await remote.close()
        assert fake.available == [("m-small", "m-large")]  # an empty mask never reaches the scorer

    run(main())


def test_remote_name_defaults_to_the_local_name_and_can_differ():
    async def main():
        async with serving({"a": FakeScorer(spec("a"), value=0.1), "b": FakeScorer(spec("b"), value=0.9)}) as server:
            target = f"dns:///localhost:{server.port}"
            same = RemoteScorer(remote_spec(target, name="a"))
            renamed = RemoteScorer(remote_spec(target, name="local", scorer="b"))
            try:
                assert (await same.score(request(), deadline=soon())).values["p"] == 0.1
                assert (await renamed.score(request(), deadline=soon())).values["p"] == 0.9
            finally:
                await same.close()
                await renamed.close()

    run(main())


def test_unknown_scorer_is_not_found_and_a_failing_scorer_internal():
    async def main():
        scorers = {"ok": FakeScorer(spec("ok")), "broken": FakeScorer(spec("broken"), fail="probe exploded"),
                   "nan": FakeScorer(spec("nan"), nan=True)}
        async with serving(scorers) as server:
            target = f"127.0.0.1:{server.port}"
            errors = {}
            for name in ("missing", "broken", "nan"):
                remote = RemoteScorer(remote_spec(target, name=name))
                with pytest.raises(ScorerError) as info:
                    await remote.score(request(), deadline=soon())
                errors[name] = str(info.value)
                await remote.close()
        assert "NOT_FOUND" in errors["missing"] and "No scorer named 'missing'" in errors["missing"]
        assert "served: ok, broken, nan" in errors["missing"]
        assert "INTERNAL" in errors["broken"] and "probe exploded" in errors["broken"]
        assert "INTERNAL" in errors["nan"] and "non-finite" in errors["nan"]

    run(main())


def test_bad_messages_are_invalid_argument():
    async def main():
        async with serving({"probe": FakeScorer(spec())}) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scorer_pb2_grpc.ScorerServiceStub(channel)
                for raw, expected in ((b"{", "not valid JSON"), (b"[]", "non-empty JSON list"),
                                      (b'[{"content": "x"}]', "messages[0]")):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Score(scorer_pb2.ScoreRequest(scorer="probe", messages=raw), timeout=5)
                    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                    assert expected in info.value.details()

    run(main())


def test_a_non_finite_number_in_a_response_is_a_scorer_error():
    class NaNService(scorer_pb2_grpc.ScorerServiceServicer):
        async def Score(self, request, context):
            return scorer_pb2.ScoreResponse(values={"p": 0.5}, costs={"m": math.inf})

    async def main():
        server = grpc.aio.server()
        scorer_pb2_grpc.add_ScorerServiceServicer_to_server(NaNService(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        remote = RemoteScorer(remote_spec(f"127.0.0.1:{port}"))
        try:
            with pytest.raises(ScorerError, match=r"non-finite costs\['m'\] = inf"):
                await remote.score(request(), deadline=soon())
        finally:
            await remote.close()
            await server.stop(0)

    run(main())


def test_the_remaining_deadline_reaches_the_server_and_a_slow_scorer_is_cancelled():
    async def main():
        # their own deadline_ms (10 ms) applies only to calls that carry no deadline
        slow = FakeScorer(spec(deadline_ms=10), delay=30.0)
        fast = FakeScorer(spec("fast", deadline_ms=10))
        async with serving({"probe": slow, "fast": fast}) as server:
            remote = RemoteScorer(remote_spec(f"127.0.0.1:{server.port}"))
            quick = RemoteScorer(remote_spec(f"127.0.0.1:{server.port}", name="fast"))
            try:
                await quick.score(request(), deadline=soon(2.0))
                assert 0.01 < fast.budgets[0] <= 2.01  # the caller's deadline, not the scorer's own
                started = time.monotonic()
                with pytest.raises(ScorerError, match="DEADLINE_EXCEEDED"):
                    await remote.score(request(), deadline=started + 0.3)
                waited = time.monotonic() - started
                # the server learns the call is over and stops the scorer's work
                await asyncio.wait_for(slow.cancelled.wait(), 5)
            finally:
                await remote.close()
                await quick.close()
        assert 0.01 < slow.budgets[0] <= 0.31
        assert waited < 5  # the client gave up at its deadline, not after the scorer's 30 s

    run(main())


def test_a_call_without_a_deadline_gets_the_scorers_own_deadline():
    async def main():
        fake = FakeScorer(spec(deadline_ms=250))
        async with serving({"probe": fake}) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = scorer_pb2.ScoreRequest(scorer="probe", messages=b'[{"role": "user", "content": "x"}]')
                await scorer_pb2_grpc.ScorerServiceStub(channel).Score(call)
        assert 0 < fake.budgets[0] <= 0.25

    run(main())


def test_a_deadline_already_passed_makes_no_call():
    async def main():
        fake = FakeScorer(spec())
        async with serving({"probe": fake}) as server:
            remote = RemoteScorer(remote_spec(f"127.0.0.1:{server.port}"))
            try:
                with pytest.raises(ScorerError, match="deadline passed before the call"):
                    await remote.score(request(), deadline=time.monotonic() - 0.001)
            finally:
                await remote.close()
        assert fake.calls == 0

    run(main())


async def _values_until_both_called(target: str, one: FakeScorer, two: FakeScorer) -> set[float]:
    """Score through ``target`` until both scorers got 3 calls (at most 200); the values seen."""
    remote = RemoteScorer(remote_spec(target))
    seen: set[float] = set()
    try:
        for _ in range(200):  # both connections become ready within a few calls
            seen.add((await remote.score(request(), deadline=soon())).values["p"])
            if len(seen) == 2 and one.calls >= 3 and two.calls >= 3:
                break
    finally:
        await remote.close()
    return seen


def test_round_robin_over_every_address_of_the_target():
    async def main():
        one, two = FakeScorer(spec(), value=0.1), FakeScorer(spec(), value=0.2)
        async with serving({"probe": one}) as a, serving({"probe": two}) as b:
            seen = await _values_until_both_called(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", one, two)
        assert seen == {0.1, 0.2}
        assert one.calls >= 3 and two.calls >= 3

    run(main())


def _binds(host: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


@pytest.mark.skipif(os.environ.get("GRPC_DNS_RESOLVER", "ares").lower() != "ares",
                    reason="only gRPC's c-ares resolver (the default) asks the DNS server named in the target")
@pytest.mark.skipif(not _binds("127.0.0.2"), reason="127.0.0.2 is not a loopback address here (Linux has all of 127/8)")
def test_round_robin_over_every_address_a_dns_name_returns():
    """A Kubernetes headless Service: one name, one A record per pod, the same port on each.
    A DNS server on loopback answers ``scorer.test`` with two addresses; both get calls."""

    async def main():
        one, two = FakeScorer(spec(), value=0.1), FakeScorer(spec(), value=0.2)
        async with serving({"probe": one}) as a, serving({"probe": two}, f"127.0.0.2:{a.port}"), \
                dns_server({"scorer.test": ["127.0.0.1", "127.0.0.2"]}) as dns:
            seen = await _values_until_both_called(f"dns://127.0.0.1:{dns.port}/scorer.test:{a.port}", one, two)
        assert ("scorer.test", TYPE_A) in dns.queries  # resolved by this server, not by some other path
        assert seen == {0.1, 0.2}
        assert one.calls >= 3 and two.calls >= 3

    run(main())


def test_scorers_of_one_target_share_one_channel_until_the_last_closes():
    async def main():
        async with serving({"a": FakeScorer(spec("a")), "b": FakeScorer(spec("b"))}) as server:
            target = f"127.0.0.1:{server.port}"
            a, b = RemoteScorer(remote_spec(target, "a")), RemoteScorer(remote_spec(target, "b"))
            await a.score(request(), deadline=soon())
            await b.score(request(), deadline=soon())
            table = _channels[asyncio.get_running_loop()]
            assert table[(target, None)].users == 2
            await a.close()
            assert table[(target, None)].users == 1
            assert (await b.score(request(), deadline=soon())).values["p"] == 0.25
            await b.close()
            assert (target, None) not in table
            with pytest.raises(ScorerError, match="has been closed"):
                await a.score(request(), deadline=soon())

    run(main())


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return reply.status


def test_health_is_serving_only_once_every_scorer_loaded_and_not_serving_on_stop():
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    release = threading.Event()
    scorers = {"a": FakeScorer(spec("a")), "b": FakeScorer(spec("b"), delay=0.5)}

    def loader(s):
        if s.name == "b":
            release.wait(30)  # the second scorer is still loading until the test says so
        return scorers[s.name]

    async def main():
        server = ScorerServer({n: s.spec for n, s in scorers.items()}, "127.0.0.1:0", grace=5.0,
                              loader=loader, describer=describe)
        port = await server.start()
        loading = asyncio.create_task(server.load())
        remote = RemoteScorer(remote_spec(f"127.0.0.1:{port}", "a"))
        slow = RemoteScorer(remote_spec(f"127.0.0.1:{port}", "b"))
        try:
            assert await _health(port, "") == NOT_SERVING
            assert await _health(port, SERVICE_NAME) == NOT_SERVING
            with pytest.raises(ScorerError, match="UNAVAILABLE.*still loading"):
                await remote.score(request(), deadline=soon())
            release.set()
            await loading
            assert await _health(port, "") == SERVING and await _health(port, SERVICE_NAME) == SERVING
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                described = await scorer_pb2_grpc.ScorerServiceStub(channel).Describe(scorer_pb2.DescribeRequest())
            assert [(s.name, s.kind, list(s.outputs)) for s in described.scorers] == [
                ("a", "probe", ["p", "len"]), ("b", "probe", ["p", "len"])]
            assert described.scorers[0].default_deadline_ms == 80.0

            # a watcher sees NOT_SERVING when shutdown starts; an in-flight call still finishes
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await watch.read()).status == SERVING
                in_flight = asyncio.create_task(slow.score(request(), deadline=soon(10)))
                while not scorers["b"].calls:
                    await asyncio.sleep(0.01)
                stopping = asyncio.create_task(server.stop())
                assert (await watch.read()).status == NOT_SERVING
                assert (await in_flight).values["p"] == 0.25
                watch.cancel()  # an open Watch stream would hold the server for the whole grace period
                await stopping
        finally:
            release.set()
            await remote.close()
            await slow.close()
            await server.stop()
        assert scorers["a"].closed and scorers["b"].closed

    run(main())


def test_a_scorer_failing_to_load_fails_start_up():
    from extproc import CheckpointError

    def loader(s):
        raise CheckpointError(f"No checkpoint at /nonexistent for scorer {s.name!r}.")

    async def main():
        server = ScorerServer({"probe": spec()}, "127.0.0.1:0", loader=loader, describer=describe)
        await server.start()
        try:
            with pytest.raises(CheckpointError, match="No checkpoint"):
                await server.load()
            assert await _health(server.port, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await server.stop()

    run(main())


def test_remote_specs_are_refused_by_the_server():
    from extproc import SwitchyardError

    with pytest.raises(SwitchyardError, match="is remote"):
        ScorerServer({"probe": remote_spec("127.0.0.1:1")}, "127.0.0.1:0")


def test_keepalive_pings_are_permitted_so_an_idle_connection_is_kept(monkeypatch):
    """Clients ping idle connections; a server that did not permit it would close the
    connection (GOAWAY too_many_pings) after a few pings. Both intervals are shortened
    here, the option names are the real ones."""
    from extproc.scoring import _remote as _remote_scorer
    from routers.serving import remote_server

    def shortened(options, name, value):
        return tuple((key, value if key == name else old) for key, old in options)

    monkeypatch.setattr(remote_server, "SERVER_OPTIONS", shortened(
        remote_server.SERVER_OPTIONS, "grpc.http2.min_ping_interval_without_data_ms", 200))
    monkeypatch.setattr(_remote_scorer, "CHANNEL_OPTIONS", shortened(
        _remote_scorer.CHANNEL_OPTIONS, "grpc.keepalive_time_ms", 1000))  # gRPC's floor

    async def main():
        fake = FakeScorer(spec())
        server = ScorerServer({"probe": fake.spec}, "127.0.0.1:0", loader=lambda s: fake, describer=describe)
        peers = []
        score = server.servicer.Score

        async def recording(request, context):
            peers.append(context.peer())
            return await score(request, context)

        server.servicer.Score = recording  # registered at start: records each call's connection
        await server.start()
        await server.load()
        remote = RemoteScorer(remote_spec(f"127.0.0.1:{server.port}"))
        try:
            await remote.score(request(), deadline=soon())
            await asyncio.sleep(5)  # pings on an idle connection; a server refusing them closes it by the 4th
            await remote.score(request(), deadline=soon())
        finally:
            await remote.close()
            await server.stop()
        assert len(peers) == 2 and peers[0] == peers[1]  # the same connection (client port) throughout

    run(main())


def test_an_address_that_cannot_be_bound_is_a_clear_error():
    from extproc import SwitchyardError

    async def main():
        async with serving({"probe": FakeScorer(spec())}) as taken:
            for listen in (f"127.0.0.1:{taken.port}", "256.1.1.1:1"):  # in use; not an address
                server = ScorerServer({"probe": spec()}, listen, describer=describe)
                with pytest.raises(SwitchyardError, match=f"Cannot listen on '{listen}'"):
                    await server.start()
                await server.stop()

    run(main())
