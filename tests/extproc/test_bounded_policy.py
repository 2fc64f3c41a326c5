"""Bounded work from the policy (issue #15): regexes on RE2, the policy file size limit and
reloads off the event loop, the deadline margin under Envoy's message_timeout, checkpoints
changed in place, and policy check messages that name the real problem."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from extproc import PolicyEngine, PolicyError, RoutingRequest, ScorerError, load_policy, parse_policy
from extproc._contract import DEADLINE_MARGIN_MS, MESSAGE_TIMEOUT_MS
from extproc._errors import CheckpointError
from extproc.policy._loading import DEFAULT_MAX_POLICY_BYTES
from extproc.server._reload import PolicyFile
from extproc.scoring._cache import ScorerCache
from extproc.scorers._interface import ScorerDescription
from extproc.cli import main
from tests.extproc.conftest import REPO, chat
from tests.extproc.test_policy_check import BASE
from tests.extproc.test_scoring import FixedScorer



def _problems(path: Path) -> list[tuple[int, int, str]]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return [(p.line, p.column, p.message) for p in info.value.problems]


#: Decides each (prompt, x-tier header) of argv[2] (JSON) under the policy file argv[1].
_DECIDE = """
import json, sys
from extproc import PolicyEngine, RoutingRequest, load_policy
engine = PolicyEngine(load_policy(sys.argv[1]))
out = []
for text, tier in json.loads(sys.argv[2]):
    body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
    decision = engine.decide(RoutingRequest.from_json(body, {"x-tier": tier}))
    out.append([decision.backend.name, {name: r.matched for name, r in decision.signals.items()}])
print(json.dumps(out))
"""


def _decide_in_a_child(policy: Path, requests: list[tuple[str, str]], timeout: float = 60.0) -> list:
    """Each request's [backend, {signal: matched}], decided in a child process killed after
    ``timeout`` seconds: a hang guard, not a timing assertion. A thread would not do: a
    backtracking regex holds the GIL, so the test could not notice that its time was up."""
    done = subprocess.run([sys.executable, "-c", _DECIDE, str(policy), json.dumps(requests)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, check=True)
    return json.loads(done.stdout)


# --- regexes run on RE2 ----------------------------------------------------------------------


CATASTROPHIC = "(a+)+$"  # exponential for a backtracking engine on 'aaa…a!'
PATHOLOGICAL = "a" * 30 + "!"  # 2^30 steps: minutes, with the event loop and every request stopped


def test_a_catastrophic_pattern_decides_a_pathological_prompt_at_once(write_policy):
    path = write_policy(BASE + f"signals:\n  r: {{kind: regex, patterns: ['{CATASTROPHIC}', 'zzz']}}\n"
                               f"  h: {{kind: header, header: x-tier, pattern: '{CATASTROPHIC}'}}\n"
                               "rules: [{name: r, when: r, backend: large}, {name: h, when: h, backend: large}]\n")
    decided = _decide_in_a_child(path, [(PATHOLOGICAL, PATHOLOGICAL), ("a" * 30, "b"), ("hi", "a" * 30)])
    assert decided == [["small", {"r": False, "h": False}], ["large", {"r": True}], ["large", {"r": False, "h": True}]]


@pytest.mark.parametrize("pattern,field", [
    (r"(\w)\1", "signals.r.patterns[1]"),
    (r"(?P<w>a)(?P=w)", "signals.r.patterns[1]"),
    (r"foo(?=bar)", "signals.r.patterns[1]"),
    (r"(?<!\w)foo", "signals.r.patterns[1]"),
])
def test_a_pattern_re2_cannot_take_is_a_policy_check_error_at_its_position(write_policy, capsys, pattern, field):
    path = write_policy(BASE + f"signals:\n  r:\n    kind: regex\n    patterns: ['ok', '{pattern}']\n")
    assert main(["policy", "check", str(path)]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{path}:9:22: Invalid regular expression {pattern!r} in `{field}`"), out
    assert "backreferences" in out and "lookaround" in out


def test_a_header_pattern_re2_cannot_take_is_refused_at_its_position(write_policy):
    path = write_policy(BASE + "signals:\n  h: {kind: header, header: x-a, pattern: '(a)\\1'}\n")
    (line, column, message), = _problems(path)
    assert (line, column) == (7, 34) and "`signals.h.pattern`" in message and "'(a)\\\\1'" in message


def test_a_header_value_utf8_cannot_encode_is_matched_not_an_error():
    policy = parse_policy(BASE + "signals:\n  h: {kind: header, header: x-a, pattern: 'b.*'}\n"
                                 "rules: [{name: h, when: h, backend: large}]\n")
    decision = PolicyEngine(policy).decide(RoutingRequest.from_json(chat("hi"), {"x-a": "a\ud800"}))
    assert decision.backend.name == "small"


# --- the policy file size limit, and reloads off the event loop -------------------------------


def _oversized(path: Path, size: int = 50 << 20) -> Path:
    with path.open("wb") as file:  # sparse: 50 MB on paper, nothing written
        file.truncate(size)
    return path


def test_an_oversized_policy_is_refused_before_parsing(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("an oversized policy was parsed")

    monkeypatch.setattr("extproc.policy._loading.compose_yaml", never)
    path = _oversized(tmp_path / "policy.yaml")
    (line, column, message), = _problems(path)
    assert (line, column) == (1, 1)
    assert f"{50 << 20} bytes" in message and f"limit of {DEFAULT_MAX_POLICY_BYTES} bytes" in message
    assert "--max-policy-bytes" in message


def test_max_policy_bytes_flag_of_policy_check(write_policy, capsys):
    path = write_policy(BASE)
    assert main(["policy", "check", "--max-policy-bytes", "20", str(path)]) == 1
    assert f"{path}:1:1: The policy file is {len(BASE)} bytes, over the limit of 20 bytes" in capsys.readouterr().out
    assert main(["policy", "check", "--max-policy-bytes", str(len(BASE)), str(path)]) == 0


def test_a_reload_to_an_oversized_policy_keeps_the_running_one(write_policy, monkeypatch):
    path = write_policy(BASE)
    policy = PolicyFile.load(path)
    running = policy.current()
    monkeypatch.setattr("extproc.policy._loading.compose_yaml", lambda *a: pytest.fail("an oversized policy was parsed"))
    _oversized(path)
    assert policy.reload() == "rejected"
    assert policy.current() is running


def test_a_reload_parses_off_the_event_loop(write_policy, monkeypatch):
    """While a (deliberately slow) reload parses, the event loop keeps running other work:
    the parse waits for a coroutine on the loop to say it ran."""
    import extproc.server._reload as reload_module

    path = write_policy(BASE)
    policy = PolicyFile.load(path)
    loop_ran = threading.Event()
    real_parse = reload_module.parse_policy

    def slow_parse(*args, **kwargs):
        assert loop_ran.wait(5), "the event loop did not run while the policy was parsed"
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(reload_module, "parse_policy", slow_parse)
    path.write_text(BASE.replace("default: small", "default: large"))

    async def scenario():
        wake = asyncio.Event()
        watcher = asyncio.create_task(policy.watch(0, wake))
        wake.set()
        for _ in range(3):  # the loop answers while the reload is parsing
            await asyncio.sleep(0.01)
        loop_ran.set()
        for _ in range(500):
            if policy.current().policy.default == "large":
                break
            await asyncio.sleep(0.01)
        watcher.cancel()
        return policy.current().policy.default

    assert asyncio.run(scenario()) == "large"


# --- the margin under Envoy's message_timeout --------------------------------------------------


REMOTE = BASE + """\
fallback: large
scorers:
  probe:
    kind: probe
    checkpoints: {relope: unused}
    remote: {target: "127.0.0.1:9"}
    deadline_ms: DEADLINE
signals:
  ok: {kind: score, scorer: probe, above: 0.5}
rules: [{name: p, when: ok, backend: small}]
"""


def test_a_deadline_must_leave_the_margin_under_message_timeout(write_policy):
    limit = MESSAGE_TIMEOUT_MS - DEADLINE_MARGIN_MS
    assert 0 < DEADLINE_MARGIN_MS < MESSAGE_TIMEOUT_MS
    load_policy(write_policy(REMOTE.replace("DEADLINE", str(limit))))  # at the limit: fine
    path = write_policy(REMOTE.replace("DEADLINE", "999"))
    (line, column, message), = _problems(path)
    assert (line, column) == (12, 5)
    assert "`scorers.probe.deadline_ms` (999)" in message and f"at most {limit} ms" in message
    assert f"message_timeout ({MESSAGE_TIMEOUT_MS} ms)" in message and f"by at least {DEADLINE_MARGIN_MS} ms" in message


# --- checkpoints changed in place ----------------------------------------------------------------

PROBE = BASE + """\
fallback: large
scorers:
  probe:
    kind: probe
    checkpoints: {relope: ck}
signals:
  risky: {kind: score, scorer: probe, large_share: 0.2}
rules: [{name: p, when: risky, backend: large}]
"""


def _calibrate(folder: Path, threshold: float) -> None:
    """Write the checkpoint's config.json with ``threshold`` for large share 0.2."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"thresholds": {"0.2": threshold}}))


@pytest.fixture
def fake_probe(monkeypatch):
    """A probe loader that reads only the thresholds from config.json; the loaded scorers,
    in the order they were loaded."""
    loaded = []

    def describe(spec):
        folder = Path(dict(spec.checkpoints)["relope"])
        try:
            raw = json.loads((folder / "config.json").read_text())
        except ValueError as exc:
            raise CheckpointError(f"{folder / 'config.json'} is not valid JSON: {exc}.") from exc
        thresholds = {float(share): value for share, value in raw["thresholds"].items()}
        return ScorerDescription(outputs=("relope",), backbones={"relope": "tiny"}, thresholds={"relope": thresholds})

    def load(spec):
        loaded.append(FixedScorer(spec, {"relope": 0.5}))
        return loaded[-1]

    monkeypatch.setattr("extproc.policy._scorer_specs.describe_scorer", describe)
    monkeypatch.setattr("extproc.scoring._cache.load_scorer", load)
    return loaded


def _threshold(engine: PolicyEngine) -> float:
    return engine.policy.signals["risky"].at_least


def _route(engine: PolicyEngine) -> str:
    from extproc.scoring._decide import decide_with_scores

    return asyncio.run(decide_with_scores(engine, RoutingRequest.from_json(chat("hello")))).backend.name


def _rewrite_keeping_size_and_mtime(path: Path, text: str) -> None:
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_checkpoint_recalibrated_in_place_reloads_and_matches_explain(write_policy, tmp_path, fake_probe):
    _calibrate(tmp_path / "ck", 0.40)
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"weights-1")
    policy = PolicyFile.load(write_policy(PROBE))
    policy.load_scorers()
    assert _threshold(policy.current()) == 0.40 and _route(policy.current()) == "large"  # 0.5 >= 0.40
    assert policy.reload() == "unchanged" and len(fake_probe) == 1

    # `switchyard calibrate` rewrote config.json in place: same size, same mtime, new threshold
    config = tmp_path / "ck" / "config.json"
    _rewrite_keeping_size_and_mtime(config, config.read_text().replace("0.4", "0.6"))
    assert policy.reload() == "reloaded"
    assert _threshold(policy.current()) == 0.60 and _route(policy.current()) == "small"  # 0.5 < 0.60
    assert len(fake_probe) == 2  # the scorer was loaded again from the changed checkpoint
    # `policy explain` reads the same threshold the server now runs
    assert _threshold(PolicyEngine(load_policy(policy.path))) == 0.60
    assert policy.reload() == "unchanged"

    # new weights in place (same config): the scorer loads again
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"weights-two")
    assert policy.reload() == "reloaded" and len(fake_probe) == 3


def test_a_checkpoint_fixed_in_place_after_a_rejection_reloads(write_policy, tmp_path, fake_probe, caplog):
    _calibrate(tmp_path / "ck", 0.40)
    policy = PolicyFile.load(write_policy(PROBE))
    policy.load_scorers()
    config = tmp_path / "ck" / "config.json"
    config.write_text("{broken")
    assert policy.reload() == "rejected" and _threshold(policy.current()) == 0.40
    assert policy.reload() == "rejected"  # the same bad version: not parsed or logged again
    assert sum("policy rejected" in r.message for r in caplog.records) == 1
    _calibrate(tmp_path / "ck", 0.70)
    assert policy.reload() == "reloaded" and _threshold(policy.current()) == 0.70


# --- messages that name the real problem --------------------------------------------------------


def test_deadline_zero_reports_the_deadline_not_an_undefined_scorer(write_policy):
    text = REMOTE.replace("DEADLINE", "0") + "  - {name: u, when: ok, route: {utility: utility, lambda: 1}}\n"
    text = text.replace("scorers:\n", "scorers:\n  utility:\n    kind: latent_router\n"
                                      "    backends: {m: small}\n    remote: {target: \"127.0.0.1:9\"}\n"
                                      "    deadline_ms: 0\n")
    text = text.replace("rules: [{name: p, when: ok, backend: small}]\n", "rules:\n  - {name: p, when: ok, backend: small}\n")
    found = _problems(write_policy(text))
    assert [m for _, _, m in found] == ["`scorers.utility.deadline_ms` must be >= 1, got 0.0.",
                                        "`scorers.probe.deadline_ms` must be >= 1, got 0.0."], found
    assert [(line, column) for line, column, _ in found] == [(12, 18), (17, 18)]


def test_a_broken_checkpoint_config_is_named_not_called_remote(write_policy, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{broken")  # read by the installed probe loader, no torch
    found = _problems(write_policy(PROBE))
    assert len(found) == 1, found
    line, column, message = found[0]
    assert (line, column) == (10, 5)
    assert str(tmp_path / "ck" / "config.json") in message and "not valid JSON" in message
    assert message.count("probe") == 1 and "remote" not in message


def test_a_missing_checkpoint_folder_is_named_not_called_remote(write_policy, tmp_path):
    found = _problems(write_policy(PROBE.replace("large_share: 0.2", "large_share: 0.2, output: relope")))
    assert found == [(10, 19, f"Checkpoint folder {str(tmp_path / 'ck')!r} does not exist.")]
    found = _problems(write_policy(PROBE))  # no `output`: still only the folder
    assert [m for _, _, m in found] == [f"Checkpoint folder {str(tmp_path / 'ck')!r} does not exist."]


def test_load_and_describe_errors_name_the_scorer_once(write_policy, tmp_path, monkeypatch):
    class Loader:
        def describe(self, spec):
            raise CheckpointError(f"Scorer {spec.name!r} names no probe checkpoints.")

        def load(self, spec):
            raise ValueError("boom")

    monkeypatch.setattr("extproc.scorers._loaders.scorer_loader", lambda kind: Loader())
    monkeypatch.setattr("extproc.scoring._loading.scorer_loader", lambda kind: Loader())
    (tmp_path / "ck").mkdir()
    (_, _, message), = _problems(write_policy(PROBE))
    assert message == "Scorer 'probe' names no probe checkpoints."

    policy = parse_policy(REMOTE.replace("DEADLINE", "80"))
    spec = policy.scorers["probe"]
    object.__setattr__(spec, "remote", None)  # an in-process scorer whose loader fails
    with pytest.raises(PolicyError) as info:
        ScorerCache().prepare(policy)
    (problem,) = info.value.problems
    assert problem.message == "Scorer 'probe' failed to load: ValueError: boom"
    assert isinstance(info.value.__cause__, ScorerError)
