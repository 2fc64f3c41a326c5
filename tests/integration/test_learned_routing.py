"""Learned scores decide live requests through a real Envoy.

A last-token probe and a LatentRouter are trained inside the test (a tiny random-init Qwen2
backbone, the packaged MiniLM tokenizer, synthetic labelled rows), referenced by a policy,
and served in process by ``switchyard serve`` behind Envoy. Requests then route by the
probe's score and by utility, and a scorer that cannot meet its deadline gives the fallback.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from extproc import RoutingRequest, load_policy, load_scorer
from extproc.cli import main
from routers.synthetic import synthetic_rows, write_synthetic
from tests.integration.gateway import Gateway, chat
from tests.routers.test_probe_support import tiny_text_model, trigger_set, write_jsonl

pytestmark = pytest.mark.envoy

POOL = {"tiny": "small", "math-7b": "math", "code-7b": "code", "large": "large"}

POLICY = """
version: 1
backends:
  small: {{cluster: small, model: tiny}}
  math: {{cluster: math, model: math-7b}}
  code: {{cluster: code, model: code-7b}}
  large: {{cluster: large, model: large}}
default: small
fallback: large
scorers:
  probe:
    kind: probe
    checkpoints: {{last: {probe}}}
    deadline_ms: {deadline}
  utility:
    kind: latent_router
    checkpoint: {latent}
    backends: {{tiny: small, math-7b: math, code-7b: code, large: large}}
    deadline_ms: 900
signals:
  greeting: {{kind: keywords, keywords: [hello]}}
  best: {{kind: header, header: x-test-lambda, values: ["zero"]}}
  cheapest: {{kind: header, header: x-test-lambda, values: ["high"]}}
  small_ok: {{kind: score, scorer: probe, output: last, above: {threshold}}}
rules:
  - {{name: greeting, when: greeting, backend: small}}
  - {{name: best, when: best, route: {{utility: utility, lambda: 0}}}}
  - {{name: cheapest, when: cheapest, route: {{utility: utility, lambda: 100}}}}
  - {{name: probe, when: {{not: small_ok}}, backend: large}}
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("learned")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_text_model(root)
        train = write_jsonl(root / "train.jsonl", trigger_set(96, 1))
        val = write_jsonl(root / "val.jsonl", trigger_set(48, 2))
        assert main([
            "train", "probe", "--method", "attention", "--backbone", str(model), "--data", str(train),
            "--val", str(val), "--small", "small", "--out", str(root / "probe"), "--epochs", "4", "--lr", "3e-3",
            "--mlp-depth", "3", "--mlp-width", "32", "--no-progress",
        ]) == 0  # fmt: skip
        rows = write_synthetic(root / "rows.jsonl", synthetic_rows(160, seed=0))
        assert main([
            "train", "latent-router", "--data", str(rows), "--out", str(root / "latent"), "--encoder", "hashing",
            "--hash-dim", "64", "--hidden-size", "32", "--epochs", "3", "--quiet",
        ]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return root


def _scores_in_process(policy_path: Path, texts: list[str]) -> dict[str, float]:
    """The probe's scores for ``texts``, from the same scorer the server loads."""
    spec = load_policy(policy_path).scorers["probe"]
    scorer = load_scorer(spec)

    async def run():
        try:
            out = {}
            for text in texts:
                scores = await scorer.score(RoutingRequest(body=chat(text)), deadline=time.monotonic() + 30)
                out[text] = scores.values["last"]
            return out
        finally:
            await scorer.close()

    return asyncio.run(run())


def _write_policy(root: Path, name: str, *, threshold: float, deadline: float = 900) -> Path:
    path = root / name
    path.write_text(POLICY.format(probe=root / "probe", latent=root / "latent", threshold=threshold, deadline=deadline))
    return path


@pytest.fixture(scope="module")
def gateway(checkpoints, tmp_path_factory):
    """The gateway, the probe's scores, and a prompt it scores low (with the trigger word the
    small model fails on) and one it scores high; the policy's threshold lies between them."""
    probe_policy = _write_policy(checkpoints, "probe.yaml", threshold=0.5)
    rows = trigger_set(16, seed=7)  # even rows carry the trigger
    texts = [row["messages"][0]["content"] for row in rows]
    scores = _scores_in_process(probe_policy, texts)
    hard = min(texts[0::2], key=scores.__getitem__)
    easy = max(texts[1::2], key=scores.__getitem__)
    assert scores[easy] - scores[hard] > 0.01, f"the trained probe does not separate the trigger: {scores}"
    policy = _write_policy(checkpoints, "policy.yaml", threshold=(scores[easy] + scores[hard]) / 2)
    gw = Gateway(policy, tmp_path_factory.mktemp("gw")).start()
    yield gw, scores, hard, easy
    gw.stop()


def test_the_probe_routes_low_scores_to_large_and_high_scores_to_small(gateway):
    gw, scores, HARD, EASY = gateway
    hard = gw.post(chat(HARD))
    easy = gw.post(chat(EASY))
    assert hard.status == 200 and easy.status == 200, (hard, easy)
    assert (hard.header("x-switchyard-backend"), hard.header("x-switchyard-rule")) == ("large", "probe")
    assert (easy.header("x-switchyard-backend"), easy.header("x-switchyard-rule")) == ("small", "default")
    assert hard.json()["model"] == "large"  # the demo backend echoes the model it was asked for


def test_a_cheap_rule_answers_without_scoring(gateway):
    gw, _, HARD, _ = gateway
    response = gw.post(chat("hello there " + HARD))
    assert (response.status, response.header("x-switchyard-rule")) == (200, "greeting")


def test_the_access_log_carries_the_scores_that_decided(gateway):
    gw, scores, HARD, _ = gateway
    assert gw.post(chat(HARD)).status == 200
    wanted = f"probe.last={scores[HARD]:.4f}"
    deadline = time.monotonic() + 5
    while not any(wanted in json.dumps(entry) for entry in gw.access_log_entries()):
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.1)


@pytest.mark.parametrize(("lam", "expected"), [("zero", None), ("high", "small")])
def test_a_utility_rule_follows_lambda(gateway, checkpoints, lam, expected):
    gw = gateway[0]
    text = "solve the integral of the equation for the prime derivative"
    if expected is None:  # λ = 0: the backend of the pool model with the best predicted quality
        from routers import load_latent_router

        router = load_latent_router(checkpoints / "latent")  # every pool model's backend is eligible here
        quality = router.predict([[{"role": "user", "content": text}]]).mu_tilde[0].tolist()
        expected = POOL[router.pool.names[max(range(len(quality)), key=quality.__getitem__)]]
    response = gw.post(chat(text), headers={"x-test-lambda": lam})
    assert response.status == 200, response
    rule = "best" if lam == "zero" else "cheapest"
    assert (response.header("x-switchyard-backend"), response.header("x-switchyard-rule")) == (expected, rule)


def test_a_scorer_that_misses_its_deadline_gives_the_fallback(gateway, checkpoints, tmp_path):
    EASY = gateway[3]
    # 1 ms is far less than a forward pass takes: every probe score misses its deadline
    policy = _write_policy(checkpoints, "tight.yaml", threshold=0.5, deadline=1)
    gw = Gateway(policy, tmp_path).start()
    try:
        started = time.monotonic()
        response = gw.post(chat(EASY))
        elapsed = time.monotonic() - started
        assert response.status == 200, response
        assert (response.header("x-switchyard-backend"), response.header("x-switchyard-rule")) == ("large", "fallback")
        assert elapsed < 1.0  # answered at the deadline, not after the forward pass
        explained = _explain(policy, chat(EASY))
        assert (explained["backend"], explained["rule"], explained["fallback"]) == ("large", "fallback", "probe: deadline")
    finally:
        gw.stop()


def _explain(policy: Path, body: dict) -> dict:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "extproc", "policy", "explain", str(policy), "--request", "-"],
        input=json.dumps(body).encode(), capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_explain_agrees_with_the_server(gateway, checkpoints):
    gw, scores, HARD, EASY = gateway
    policy = checkpoints / "policy.yaml"
    for text in (HARD, EASY):
        explained = _explain(policy, chat(text))
        served = gw.post(chat(text))
        assert (explained["backend"], explained["rule"]) == (
            served.header("x-switchyard-backend"), served.header("x-switchyard-rule"))
        assert explained["scores"]["probe"]["values"]["last"] == pytest.approx(scores[text], abs=1e-5)


def test_a_remote_scorer_killed_gives_the_fallback_and_scores_again_once_restarted(gateway, checkpoints, tmp_path):
    import signal
    import subprocess
    import sys

    from harness import free_port, grpc_serving

    _, scores, HARD, EASY = gateway
    port = free_port()
    config = tmp_path / "scorers.yaml"
    config.write_text(f"version: 1\nscorers:\n  probe:\n    kind: probe\n    checkpoints: {{last: {checkpoints / 'probe'}}}\n")

    def start_scorer():
        process = subprocess.Popen(
            [sys.executable, "-m", "extproc", "scorer", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "scorer.log", "ab"),
        )
        deadline = time.monotonic() + 60
        while not grpc_serving(port):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "scorer.log").read_text()
            time.sleep(0.1)
        return process

    policy = tmp_path / "remote.yaml"
    local = (checkpoints / "policy.yaml").read_text()
    policy.write_text(local.replace(
        f"    checkpoints: {{last: {checkpoints / 'probe'}}}\n",
        f"    checkpoints: {{last: remote}}\n    remote: {{target: \"127.0.0.1:{port}\"}}\n",
    ))
    scorer = start_scorer()
    gw = Gateway(policy, tmp_path / "gw").start()
    try:
        served = gw.post(chat(HARD)), gw.post(chat(EASY))
        assert [(r.status, r.header("x-switchyard-backend"), r.header("x-switchyard-rule")) for r in served] == [
            (200, "large", "probe"), (200, "small", "default")]

        scorer.send_signal(signal.SIGKILL)
        scorer.wait()
        down = gw.post(chat(EASY))
        assert (down.status, down.header("x-switchyard-backend"), down.header("x-switchyard-rule")) == (
            200, "large", "fallback")

        scorer = start_scorer()  # the same port: switchyard reconnects by itself
        deadline = time.monotonic() + 15
        while True:
            again = gw.post(chat(EASY))
            if again.header("x-switchyard-rule") != "fallback" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (again.status, again.header("x-switchyard-backend"), again.header("x-switchyard-rule")) == (
            200, "small", "default")
    finally:
        gw.stop()
        scorer.kill()
        scorer.wait()


def test_policy_check_locates_every_scorer_problem(checkpoints, tmp_path, capsys):
    import torch

    other_model = tiny_text_model(tmp_path, seed=1)  # another backbone: its probe cannot share a prefill
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([
            "train", "probe", "--method", "last_token", "--backbone", str(other_model),
            "--data", str(checkpoints / "train.jsonl"), "--small", "small", "--out", str(tmp_path / "other"),
            "--epochs", "1", "--no-progress",
        ]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    text = _write_policy(checkpoints, "base.yaml", threshold=0.5).read_text()
    broken = (
        text.replace(f"checkpoints: {{last: {checkpoints / 'probe'}}}",
                     f"checkpoints: {{last: {checkpoints / 'probe'}, other: {tmp_path / 'other'}, "
                     f"gone: {tmp_path / 'missing'}}}")
        .replace("deadline_ms: 900\nsignals", "deadline_ms: 5000\nsignals")
        .replace("backends: {tiny: small, math-7b: math, code-7b: code, large: large}",
                 "backends: {tiny: small, math-7b: math, code-7b: code}")
        .replace("output: last, above:", "output: nope, above:")
        .replace("signals:\n", "signals:\n  calibrated: {kind: score, scorer: probe, output: last, large_share: 0.2}\n")
    )
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    assert main(["policy", "check", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    lines = broken.splitlines()

    def find(fragment: str, on: str) -> None:
        hits = [line for line in out if fragment in line]
        assert hits, (fragment, out)
        number = int(hits[0].split(":")[1])
        assert on in lines[number - 1], (fragment, number, lines[number - 1])

    find("does not exist", "gone")                                  # a missing checkpoint folder
    find("must share the backbone", "other")                        # probes on different backbones
    find("Pool model 'large' of scorer `utility` has no backend", "backends")
    find("has no output 'nope'", "small_ok")                        # an output the checkpoint lacks
    find("carries no calibration for large share 0.2", "calibrated")
    find("must be below the shipped Envoy ext_proc message_timeout", "deadline_ms: 5000")


def test_a_reload_keeps_loaded_scorers_and_a_broken_checkpoint_keeps_the_running_policy(checkpoints, tmp_path):
    from extproc.server._reload import PolicyFile

    path = tmp_path / "live.yaml"
    path.write_text(_write_policy(checkpoints, "live-src.yaml", threshold=0.5).read_text())
    policy = PolicyFile.load(path)
    policy.load_scorers()
    try:
        running = policy.current()
        probe = running.scorers["probe"]

        path.write_text(path.read_text().replace(str(checkpoints / "probe"), str(tmp_path / "missing")))
        assert policy.reload() == "rejected"
        assert policy.current() is running  # the running policy and its scorers stay

        path.write_text(_write_policy(checkpoints, "live-src.yaml", threshold=0.7).read_text())
        assert policy.reload() == "reloaded"
        assert policy.current() is not running
        assert policy.current().scorers["probe"] is probe  # same checkpoint: the loaded model is reused
    finally:
        asyncio.run(policy.close())


def test_a_client_sending_1_mib_prompts_does_not_take_the_scorer_from_others(gateway):
    """One client posts ~1 MiB prompts back to back; honest clients beside it are still scored
    (the prompt is cut by characters before it is tokenized, so no forward waits on it)."""
    import threading

    gw, _, _, EASY = gateway
    attack = chat("lorem ipsum dolor sit amet " * 38_000)  # ~1 MB of JSON, under routing.max_body_bytes
    stop = threading.Event()
    attacked: list[int] = []

    def attacker():
        while not stop.is_set():
            attacked.append(gw.post(attack).status)

    threads = [threading.Thread(target=attacker) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        honest = [gw.post(chat(EASY)) for _ in range(12)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert attacked and set(attacked) == {200}, attacked
    rules = [(r.status, r.header("x-switchyard-rule")) for r in honest]
    assert rules == [(200, "default")] * len(honest), rules
