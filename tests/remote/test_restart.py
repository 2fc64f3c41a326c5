"""A scorer server in its own process: killed, the client fails fast; restarted on the same
port, the same RemoteScorer scores again without being rebuilt."""

from __future__ import annotations

import asyncio
import time

import pytest

from extproc import ScorerError
from extproc.scoring._remote import RemoteScorer
from tests.remote.support import ServerProcess, remote_spec, request


def test_a_killed_server_fails_fast_and_a_restarted_one_scores_again():
    first = ServerProcess(value=0.1)
    port = first.port

    async def main():
        remote = RemoteScorer(remote_spec(f"127.0.0.1:{port}"))
        second = None
        try:
            assert (await remote.score(request(), deadline=time.monotonic() + 10)).values["p"] == 0.1
            first.kill()
            for _ in range(3):  # every call fails, each one well within its deadline
                started = time.monotonic()
                with pytest.raises(ScorerError, match="UNAVAILABLE|DEADLINE_EXCEEDED"):
                    await remote.score(request(), deadline=started + 2.0)
                assert time.monotonic() - started < 2.5

            second = await asyncio.to_thread(ServerProcess, f"127.0.0.1:{port}", 0.2)
            value = None
            for _ in range(100):  # reconnection backoff is capped at 1 s
                try:
                    value = (await remote.score(request(), deadline=time.monotonic() + 2.0)).values["p"]
                    break
                except ScorerError:
                    await asyncio.sleep(0.1)
            assert value == 0.2
        finally:
            await remote.close()
            if second is not None:
                second.kill()

    try:
        asyncio.run(main())
    finally:
        first.kill()
