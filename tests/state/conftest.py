"""A real Valkey/Redis server per test (harness.redis), on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.redis import RedisServer


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A started server with append-only persistence, in its own folder; stopped after the test."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
