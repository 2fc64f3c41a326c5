"""Fixtures of the traffic tests: the real Valkey/Redis server of tests/state, shared as is."""

from __future__ import annotations

from tests.state.conftest import redis_server  # noqa: F401 - a fixture, used by name
