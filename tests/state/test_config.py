"""The `state:` section: its schema, the typed config, bad input, and the store it builds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from extproc._schema import Validation, compose_yaml
from extproc.state import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_TIMEOUT_MS,
    STATE_KEY,
    FallbackStore,
    MemoryStore,
    RedisConfig,
    RedisStore,
    StateConfig,
    StateConfigError,
    build_store,
    redact_url,
)


def test_not_set_is_in_process():
    assert StateConfig.from_mapping(None) == StateConfig()
    assert StateConfig.from_mapping({}).redis is None
    assert isinstance(build_store(StateConfig()), MemoryStore)


def test_redis_defaults_and_the_store_built():
    config = StateConfig.from_mapping({"redis": {"url": "redis://127.0.0.1:6379/0"}})
    assert config.redis == RedisConfig("redis://127.0.0.1:6379/0", DEFAULT_TIMEOUT_MS, DEFAULT_KEY_PREFIX, None)
    store = build_store(config)
    assert isinstance(store, FallbackStore) and isinstance(store.remote, RedisStore)
    assert store.timeout_s == store.remote.timeout_s == DEFAULT_TIMEOUT_MS / 1000
    assert store.remote.key_prefix == "switchyard:"


BAD = [
    ({"redis": {}}, "`state.redis.url` is required"),
    ({"redis": {"url": 6379}}, "`state.redis.url` must be a string, got 6379."),
    ({"redis": {"url": "http://h:6379"}}, "`state.redis.url` must start with redis://, rediss://, unix://; got 'http://h:6379'."),
    ({"redis": {"url": "redis://:hunter2@h:99999/0"}}, "`state.redis.url` is not a URL"),
    ({"redis": {"url": "redis://:hunter2@/0"}}, "`state.redis.url` names no host (redis://host:6379/0); got 'redis://:***@/0'."),
    ({"redis": {"url": "redis://h/zero"}}, "`state.redis.url` names database 'zero'"),
    ({"redis": {"url": "unix://"}}, "`state.redis.url` names no socket path"),
    ({"redis": {"url": "redis://h", "timeout_ms": 0}}, "`state.redis.timeout_ms` must be a number from 1 to 250, got 0."),
    ({"redis": {"url": "redis://h", "timeout_ms": True}}, "`state.redis.timeout_ms` must be a number from 1 to 250, got True."),
    ({"redis": {"url": "redis://h", "key_prefix": 3}}, "`state.redis.key_prefix` must be a string, got 3."),
    ({"redis": {"url": "redis://h", "password_env": "A-B"}}, "`state.redis.password_env` must name an environment variable, got 'A-B'."),
    ({"redis": {"url": "redis://h", "pasword": "x"}}, "Unknown key `pasword` in `state.redis`; known keys: url, timeout_ms"),
    ({"redis": "redis://h"}, "`state.redis` must be a mapping, got 'redis://h'."),
    ({"reddis": {}}, "Unknown key `reddis` in `state`; known keys: redis."),
    (["redis"], "`state` must be a mapping, got a list."),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_input_names_field_value_and_source(data, message):
    with pytest.raises(StateConfigError) as info:
        StateConfig.from_mapping(data, source="policy.yaml")
    text = str(info.value)
    assert text.startswith("policy.yaml: ")
    assert message in text
    assert "hunter2" not in text


def test_every_problem_is_reported_with_its_path():
    problems = []
    config = StateConfig.from_mapping(
        {"redis": {"url": "ftp://h", "timeout_ms": 9999}},
        report=lambda path, message: problems.append((path, message)))
    assert [path for path, _ in problems] == [("state", "redis", "url"), ("state", "redis", "timeout_ms")]
    assert config == StateConfig()


def test_schema_validates_policy_yaml_with_positions_and_defaults():
    text = "state:\n  redis:\n    url: redis://h:6379/0\n    timeout_ms: 'fast'\n"
    v = Validation("policy.yaml")
    data = STATE_KEY.schema.validate(compose_yaml(text, "policy.yaml").value[0][1], ("state",), v)
    assert [str(p) for p in v.problems] == ["policy.yaml:4:17: `state.redis.timeout_ms` must be a number, got 'fast'."]
    v = Validation("policy.yaml")
    data = STATE_KEY.schema.validate(compose_yaml("state:\n  redis:\n    url: redis://h:6379/0\n", "p").value[0][1],
                                     ("state",), v)
    assert not v.problems
    assert StateConfig.from_mapping(data).redis == RedisConfig("redis://h:6379/0")
    assert STATE_KEY.default == {"redis": None}
    schema = STATE_KEY.schema.json_schema()
    assert schema["properties"]["redis"]["required"] == ["url"]


def test_password_is_redacted_in_reprs():
    url = "redis://user:hunter2@h:6379/0?password=hunter3"
    config = StateConfig.from_mapping({"redis": {"url": url}})
    shown = repr(config) + repr(build_store(config)) + redact_url(url)
    assert "hunter2" not in shown and "hunter3" not in shown
    assert "user:***@h:6379" in shown


def test_password_env_is_read_when_the_store_is_built():
    config = StateConfig.from_mapping({"redis": {"url": "redis://h", "password_env": "SWITCHYARD_REDIS_PASSWORD"}})
    with pytest.raises(StateConfigError, match="`state.redis.password_env` names 'SWITCHYARD_REDIS_PASSWORD', which is not set"):
        build_store(config, environ={})
    store = build_store(config, environ={"SWITCHYARD_REDIS_PASSWORD": "pw"})
    assert isinstance(store, FallbackStore)


def test_importing_state_does_not_import_redis():
    code = "import sys, extproc.state; assert 'redis' not in sys.modules, sorted(m for m in sys.modules if 'redis' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)
