"""Conversation stickiness (``sessions:``): keys, pins, hits, breaks, TTLs, the policy's checks,
the servicer hook and the fleet-state store the server builds (extproc.traffic._sessions, _fleet)."""

from __future__ import annotations

import asyncio
import textwrap

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc import PolicyEngine, RoutingRequest
from extproc._contract import METADATA_NAMESPACE, ROUTING_HEADER, SESSION_HEADER
from extproc._errors import PolicyError
from extproc.envoy._render import Address, Upstream, render_envoy
from extproc.policy._loading import parse_policy
from extproc.server._reload import PolicyFile
from extproc.server._servicer import RequestStream
from extproc.state import MemoryStore, RedisConfig, StateConfig
from extproc.telemetry._instruments import Telemetry
from extproc.traffic._fleet import FleetState
from extproc.traffic._sessions import REFRESH_SHARE, Sessions, session_key
from tests.extproc.test_servicer import JSON_HEADERS, body_message, headers_message
from tests.extproc.test_telemetry import points

TTL = 100.0

POLICY = f"""\
version: 1
backends:
  small: {{cluster: small, model: small-model, supports_images: false}}
  large: {{cluster: large, model: large-model}}
default: small
tenants:
  allow:
    narrow: [small]
signals:
  hard: {{kind: keywords, keywords: [prove]}}
  urgent: {{kind: keywords, keywords: [escalate]}}
rules:
  - {{name: hard, when: hard, backend: large}}
  - {{name: escalate, when: urgent, backend: large, breaks_session: true}}
sessions: {{key: conversation, ttl_s: {TTL}}}
"""

#: POLICY without `sessions:` (and so without its `breaks_session` rule flag).
NO_SESSIONS = POLICY.replace(f"sessions: {{key: conversation, ttl_s: {TTL}}}", "").replace(", breaks_session: true", "")

SYSTEM = {"role": "system", "content": "You are terse."}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def policy(text: str = POLICY, **replace: str):
    for old, new in replace.items():
        text = text.replace(old, new)
    return parse_policy(text, source="policy.yaml")


def turns(*users, answer: str = "ok") -> dict:
    """A chat body: the system prompt, then each user message followed by an answer (the last not)."""
    messages = [SYSTEM]
    for user in users:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"model": "auto", "messages": messages[:-1]}


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Fixture:
    """An engine, a store and Sessions on one fake clock, with metrics read back."""

    def __init__(self, text: str = POLICY, store=None) -> None:
        self.engine = PolicyEngine(policy(text))
        self.clock = Clock()
        self.store = store if store is not None else MemoryStore(clock=self.clock)
        self.reader = InMemoryMetricReader()
        self.telemetry = Telemetry(MeterProvider(metric_readers=[self.reader]))
        self.unhealthy: set[str] = set()
        self.sessions = Sessions(lambda: self.store, self.telemetry, clock=self.clock,
                                 unhealthy=lambda: self.unhealthy)

    def decide(self, body: dict, headers: dict | None = None):
        request = RoutingRequest.from_json(body, headers)
        key = self.sessions.key(self.engine, request)
        assert key is not None
        from extproc.engine._engine import SignalMemo

        return asyncio.run(self.sessions.decide(self.engine, request, key, memo=SignalMemo(request), arrival=0.0))

    def counts(self) -> dict[str, dict]:
        out = {}
        for name, data in points(self.reader).items():
            if name.startswith("switchyard.sessions."):
                out[name.rsplit(".", 1)[1]] = {tuple(sorted(a.items())): v for a, v in data}
        return out


# -- keys ----------------------------------------------------------------------------------------

def key_of(config_text: str, body: dict, headers: dict | None = None) -> str | None:
    engine = PolicyEngine(policy(NO_SESSIONS + config_text + "\n"))
    return Sessions(MemoryStore, Telemetry()).key(engine, RoutingRequest.from_json(body, headers))


def test_every_turn_of_a_conversation_shares_the_key_of_its_start():
    first = key_of("sessions: {}", turns("hi"))
    assert first is not None and first.startswith("session:")
    assert key_of("sessions: {}", turns("hi", "and then?", "prove it")) == first
    assert key_of("sessions: {}", turns("hello")) != first  # another first message
    other_system = {"model": "auto", "messages": [{"role": "system", "content": "Be verbose."},
                                                   {"role": "user", "content": "hi"}]}
    assert key_of("sessions: {}", other_system) != first
    assert key_of("sessions: {}", turns("hi"), {"x-tenant-id": "acme"}) != first  # scoped by tenant


@pytest.mark.parametrize("body", [
    {"model": "auto", "messages": [SYSTEM]},  # no user message
    {"model": "auto", "messages": []},
    {"model": "auto", "messages": ["not a message", {"role": "assistant", "content": "hi"}]},
    {"model": "auto"},
])
def test_a_conversation_without_a_user_message_has_no_session(body):
    assert key_of("sessions: {}", body) is None


@pytest.mark.parametrize("text", ["\ud800 lone surrogate", "emoji 🧪 and RTL \u202e", "\x00 nul", "x" * (2 << 20)])
def test_odd_and_huge_messages_give_a_bounded_key(text):
    key = key_of("sessions: {}", turns(text))
    assert key is not None and len(key) == len("session:") + 32
    assert key == key_of("sessions: {}", turns(text, "next"))


def test_parts_content_hashes_too():
    body = {"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, IMAGE]}]}
    assert key_of("sessions: {}", body) is not None


def test_header_key():
    config = "sessions: {key: header, header: X-Session-Id}"
    key = key_of(config, turns("hi"), {"x-session-id": "abc"})
    assert key is not None
    assert key_of(config, turns("something else"), {"x-session-id": "abc"}) == key  # the header alone decides
    assert key_of(config, turns("hi"), {"x-session-id": "abd"}) != key
    assert key_of(config, turns("hi"), {"x-session-id": "abc", "x-tenant-id": "t2"}) != key
    for missing in ({}, {"x-session-id": ""}, {"x-session-id": "   "}):
        assert key_of(config, turns("hi"), missing) is None
    assert len(key_of(config, turns("hi"), {"x-session-id": "\ufffd" * 10000})) == len(key)


@pytest.mark.parametrize("user, has_key", [("u-1", True), ("", False), (" ", False), (None, False), (17, False),
                                            ({"id": 1}, False), ("\udcff", True)])
def test_user_key(user, has_key):
    body = turns("hi") | ({"user": user} if user is not None else {})
    assert (key_of("sessions: {key: user}", body) is not None) is has_key


def test_direct_model_requests_and_policies_without_sessions_have_no_session():
    assert key_of("sessions: {}", turns("hi") | {"model": "large-model"}) is None
    assert key_of("", turns("hi")) is None
    assert key_of("sessions: {}", turns("hi") | {"model": "unknown-model"}) is not None  # routed by the rules


# -- pins, hits, breaks ---------------------------------------------------------------------------

def test_later_turns_follow_the_pin_without_the_rules():
    f = Fixture()
    first = f.decide(turns("hi"))
    assert (first.backend.name, first.rule, first.session) == ("small", "default", "new")
    later = f.decide(turns("hi", "now prove it"))  # alone, rule `hard` would send it to large
    assert PolicyEngine(policy()).decide(RoutingRequest.from_json(turns("hi", "now prove it"))).backend.name == "large"
    assert (later.backend.name, later.rule, later.session) == ("small", "session", "pinned")
    assert later.metadata()["session"] == "pinned" and "session_break" not in later.metadata()
    assert f.counts() == {"pins": {(("result", "new"),): 1}, "hits": {(): 1}}


def test_a_pinned_backend_that_cannot_take_an_image_moves_the_session():
    f = Fixture()
    f.decide(turns("hi"))
    moved = f.decide(turns("hi", [{"type": "text", "text": "look"}, IMAGE]))
    assert (moved.backend.name, moved.session, moved.session_break) == ("large", "moved", "images_not_supported")
    assert moved.metadata()["session_break"] == "images_not_supported"
    after = f.decide(turns("hi", "thanks"))  # re-pinned: the next text turn stays on large
    assert (after.backend.name, after.rule) == ("large", "session")
    counts = f.counts()
    assert counts["breaks"] == {(("reason", "images_not_supported"),): 1}
    assert counts["pins"] == {(("result", "new"),): 1, (("result", "moved"),): 1}


def test_a_tenant_no_longer_allowed_and_an_unhealthy_backend_break_the_pin():
    f = Fixture()
    assert f.decide(turns("prove")).backend.name == "large"  # pinned to large by rule `hard`
    narrowed = Fixture(POLICY.replace("narrow: [small]", "narrow: [small]\n    wide: [small]"), store=f.store)
    narrowed.clock = f.clock
    # the same conversation, now from a tenant that may only use small: its key differs (scoped by tenant),
    # so move the pin across by hand: the pin names large, the tenant may not use it
    request_key = narrowed.sessions.key(narrowed.engine, RoutingRequest.from_json(turns("prove"), {"x-tenant-id": "narrow"}))
    asyncio.run(f.store.set(request_key, f"large@{int(f.clock())}", TTL))
    moved = narrowed.decide(turns("prove", "more"), {"x-tenant-id": "narrow"})
    assert (moved.backend.name, moved.session_break) == ("small", "tenant_not_allowed")
    f.unhealthy.add("large")
    down = f.decide(turns("prove", "again"))
    assert (down.session, down.session_break) == ("moved", "unhealthy")
    assert down.backend.name == "small"  # decided as usual: no rule holds for "again"


def test_a_breaks_session_rule_decides_and_re_pins():
    f = Fixture()
    f.decide(turns("hi"))
    broke = f.decide(turns("hi", "please escalate"))
    assert (broke.backend.name, broke.rule, broke.session, broke.session_break) == ("large", "escalate", "moved", "rule")
    after = f.decide(turns("hi", "ok"))
    assert (after.backend.name, after.rule) == ("large", "session")
    # a breaks_session rule routing to the pinned backend itself keeps the pin
    kept = f.decide(turns("hi", "escalate again"))
    assert (kept.rule, kept.session) == ("session", "pinned")


def test_a_pin_lives_ttl_after_the_last_turn():
    f = Fixture()
    f.decide(turns("hi"))
    f.clock.now += TTL * (REFRESH_SHARE + 0.05)
    assert f.decide(turns("hi", "prove")).session == "pinned"  # this hit rewrote the pin
    f.clock.now += TTL * 0.9  # past the first write's TTL, inside the refreshed one
    assert f.decide(turns("hi", "prove")).session == "pinned"
    f.clock.now += TTL + 1
    fresh = f.decide(turns("hi", "prove"))
    assert (fresh.backend.name, fresh.rule, fresh.session) == ("large", "hard", "new")


def test_the_first_writer_wins_and_the_loser_follows_it():
    class Racing(MemoryStore):
        """A store where another replica pins the session between this one's get and set."""

        async def get(self, key):
            await super().set(key, "large@999", TTL)
            return None

    f = Fixture(store=Racing(clock=Clock()))
    decision = f.decide(turns("hi"))
    assert (decision.backend.name, decision.rule, decision.session) == ("large", "session", "pinned")


def test_a_pin_naming_a_removed_backend_or_garbage_is_decided_again():
    f = Fixture()
    request_key = f.sessions.key(f.engine, RoutingRequest.from_json(turns("hi")))
    asyncio.run(f.store.set(request_key, "gone@1", TTL))
    moved = f.decide(turns("hi", "x"))
    assert (moved.backend.name, moved.session_break) == ("small", "backend_removed")
    asyncio.run(f.store.set(request_key, "large", TTL))  # no time: read as old, rewritten on the hit
    assert f.decide(turns("hi", "y")).backend.name == "large"
    assert asyncio.run(f.store.get(request_key)).startswith("large@")


# -- the servicer --------------------------------------------------------------------------------

def stream_answer(engine: PolicyEngine, sessions: Sessions | None, body: bytes, headers: dict | None = None):
    stream = RequestStream(engine, Telemetry(), sessions=sessions)
    stream.handle(headers_message({**JSON_HEADERS, **(headers or {})}))
    return stream.handle(body_message(body))


def test_the_servicer_awaits_only_requests_with_a_session():
    import json

    plain = PolicyEngine(policy(NO_SESSIONS))
    header = PolicyEngine(policy(POLICY.replace("key: conversation", "key: header")))
    sessions = Sessions(MemoryStore, Telemetry())
    body = json.dumps(turns("hi")).encode()
    assert isinstance(stream_answer(plain, sessions, body), ext.ProcessingResponse)  # no sessions: sync
    assert isinstance(stream_answer(header, sessions, body), ext.ProcessingResponse)  # no header: sync
    store = MemoryStore()
    sessions = Sessions(lambda: store, Telemetry())
    answer = stream_answer(header, sessions, body, {"x-session-id": "s1"})
    assert not isinstance(answer, ext.ProcessingResponse)
    first = asyncio.run(answer)
    second = asyncio.run(stream_answer(header, sessions, json.dumps(turns("prove")).encode(), {"x-session-id": "s1"}))
    for response, backend, rule, state in ((first, "small", "default", "new"), (second, "small", "session", "pinned")):
        common = response.request_body.response
        assert [h.header.raw_value.decode() for h in common.header_mutation.set_headers
                if h.header.key == ROUTING_HEADER] == [backend]
        fields = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
        assert (fields["rule"].string_value, fields["session"].string_value) == (rule, state)


def test_envoy_adds_the_session_header_only_for_policies_with_sessions():
    def response_headers(p) -> list[str]:
        upstreams = {name: Upstream(Address("127.0.0.1", 1)) for name in ("small", "large")}
        hcm = render_envoy(p, upstreams).bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        host = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
        return [h["header"]["key"] for h in host["response_headers_to_add"]]

    assert SESSION_HEADER in response_headers(policy())
    assert SESSION_HEADER not in response_headers(policy(NO_SESSIONS))


# -- the policy ----------------------------------------------------------------------------------

def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(textwrap.dedent(text), source="p.yaml")
    return [str(p) for p in caught.value.problems]


BASE = """\
version: 1
backends:
  small: {cluster: small, model: small-model}
  large: {cluster: large, model: large-model}
default: small
scorers:
  probe: {kind: probe, checkpoints: {relope: unused}, remote: {target: "127.0.0.1:9"}}
signals:
  hard: {kind: keywords, keywords: [prove]}
  small_ok: {kind: score, scorer: probe, above: 0.5}
"""


def test_breaks_session_needs_sessions_a_backend_and_cheap_signals():
    assert problems(BASE + "rules:\n  - {name: a, when: hard, backend: large, breaks_session: true}\n") == [
        "p.yaml:12:43: Rule 'a' sets `breaks_session`, which has no effect without a `sessions:` section."]
    found = problems(BASE + """\
rules:
  - {name: a, when: {all: [hard, {not: small_ok}]}, backend: large, breaks_session: true}
sessions: {}
""")
    assert found == ["p.yaml:12:69: Rule 'a' sets `breaks_session` but its condition uses the `score` signal "
                     "'small_ok'; a pin is checked without running scorers, so a session-breaking rule may use "
                     "only cheap signals."]


@pytest.mark.parametrize("section, expected", [
    ("sessions: {key: cookie}", "p.yaml:10:17: `sessions.key` must be one of"),
    ("sessions: {ttl_s: 0}", "p.yaml:10:19: `sessions.ttl_s` must be >= 1"),
    ("sessions: {header: ''}", "p.yaml:10:20:"),
    ("sessions: {sticky: true}", "p.yaml:10:12: Unknown key `sticky` in `sessions`"),
    ("state: {redis: {url: 'http://cache:6379'}}", "p.yaml:10:17: `state.redis.url` must start with redis://"),
    ("state: {redis: {url: 'redis://:hunter2@cache:6379/x'}}", "p.yaml:10:17: `state.redis.url`"),
    ("state: {redis: {timeout_ms: 5}}", "p.yaml:10:16: `state.redis.url` is required"),
])
def test_bad_sections_are_located(section, expected):
    found = problems(BASE.replace("  small_ok: {kind: score, scorer: probe, above: 0.5}\n", "") + section + "\n")
    assert len(found) == 1 and found[0].startswith(expected), found
    assert "hunter2" not in found[0]


def test_sections_build_typed_config():
    p = parse_policy(BASE + "sessions: {key: header, header: X-Conv}\nstate: {redis: {url: 'redis://c:6379/0'}}\n")
    assert (p.sessions.key, p.sessions.header, p.sessions.ttl_s) == ("header", "x-conv", 1800.0)
    assert p.state == StateConfig(redis=RedisConfig("redis://c:6379/0"))
    bare = parse_policy(BASE)
    assert bare.sessions is None and bare.state == StateConfig()


# -- the store the server builds -----------------------------------------------------------------

REDIS_POLICY = POLICY + "state: {redis: {url: 'redis://127.0.0.1:9/0', password_env: SY_TEST_UNSET_PASSWORD}}\n"


def test_a_reload_that_changes_state_swaps_the_store_and_one_that_cannot_build_it_is_rejected(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)

    async def run():
        file = PolicyFile.load(path)
        fleet = FleetState(file.current().policy.state, environ={}, retire_after_s=0)
        file.accept = fleet.accept
        first = fleet.store
        assert isinstance(first, MemoryStore)
        path.write_text(POLICY + "# a comment: same state\n")
        assert file.reload() == "reloaded" and fleet.store is first
        path.write_text(REDIS_POLICY)
        assert file.reload() == "rejected"  # SY_TEST_UNSET_PASSWORD is not set
        assert fleet.store is first and file.current().policy.state == StateConfig()
        fleet._environ = {"SY_TEST_UNSET_PASSWORD": "pw"}
        file._rejected = None
        assert file.reload() == "reloaded"
        assert fleet.store is not first and fleet.config.redis is not None
        await asyncio.sleep(0.01)  # the old store is closed on the loop
        assert first not in fleet._retired
        await fleet.aclose()

    asyncio.run(run())


def test_a_store_that_cannot_be_built_is_a_policy_error_at_its_password_env():
    text = POLICY + "state:\n  redis:\n    url: redis://127.0.0.1:9/0\n    password_env: SY_TEST_UNSET_PASSWORD\n"
    line = text.splitlines().index("    password_env: SY_TEST_UNSET_PASSWORD") + 1

    async def run():
        fleet = FleetState(StateConfig(), environ={})
        with pytest.raises(PolicyError) as raised:
            fleet.accept(parse_policy(text, source="policy.yaml"))
        await fleet.aclose()
        return raised.value

    error = asyncio.run(run())
    assert str(error).startswith(f"policy.yaml:{line}:5: ")
    assert "'SY_TEST_UNSET_PASSWORD', which is not set" in str(error)
