"""The adoption loop of issue 14, as a user runs it, end to end through the real CLI and processes.

1. A policy with only cheap rules and ``capture:`` at sample rate 1 is served through Envoy;
   a synthetic mix of requests (the small model fails exactly on those holding a trigger
   word, :func:`~tests.routers.test_probe_support.trigger_set`) fills the capture file.
2. ``switchyard label`` asks two stub backends each captured prompt: ``small`` (wrong when the
   trigger is in it) and ``large`` (always right); a rule-following judge stub grades them
   pairwise against ``large``, RouteLLM's labelling. One labelled row per captured request.
3. ``switchyard train probe`` (a tiny random-init backbone) on the labelled file, holding out
   30% as ``validation.jsonl``; ``switchyard calibrate`` on those rows for the share of them the
   small model failed; a policy whose probe rule uses that ``large_share``; ``switchyard policy
   check`` on it.
4. That policy served through Envoy: of the rows training held out, those with the trigger go
   to ``large`` by the probe rule, the others to ``small``; on prompts never captured, the
   probe ranks every trigger prompt below every other one. ``switchyard policy explain
   --requests`` on the same bodies decides each one as the server did, with the probe's score.

``label`` writes rows as they finish, so the split training holds out differs from run to run;
the settings below (30% held out, no early stop, lr 3e-2) separated the trigger on every split
tried. A threshold calibrated on 36 rows of a random-init model need not transfer to new prompts
(their scores shift), so routes are asserted exactly on the held-out rows and by rank on new ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from extproc.cli import main
from tests.integration import test_capture as capture_test
from tests.integration.gateway import Gateway, chat
from tests.integration.test_metrics import wait_for
from tests.routers.label_stubs import StubBackend
from tests.routers.test_probe_support import tiny_text_model, trigger_set

pytestmark = pytest.mark.envoy

TRIGGER = "zebra"
CAPTURED = 120
#: The capture test's policy, capturing every request.
CAPTURE_POLICY = capture_test.POLICY.replace("  sample_rate: 0.5\n  exclude_tenants: [opted-out]\n", "  sample_rate: 1\n")
PROBE_POLICY = """\
version: 1
backends:
  small: {{cluster: small, model: small-model}}
  large: {{cluster: large, model: large-model}}
default: small
fallback: large
scorers:
  probe:
    kind: probe
    checkpoints: {{attention: {checkpoint}}}
    deadline_ms: 900
signals:
  small_ok: {{kind: score, scorer: probe, output: attention, large_share: {share}}}
rules:
  - {{name: probe, when: {{not: small_ok}}, backend: large}}
  - {{name: rest, backend: small}}
"""


# -- the stub models: small is wrong exactly on the trigger, large always right -------------------
def _has_trigger(body: dict) -> bool:
    return TRIGGER in body["messages"][-1]["content"]


def _small(messages: list[dict]) -> str:
    return "WRONG: I do not know." if _has_trigger({"messages": messages}) else "RIGHT: here it is."


def _large(messages: list[dict]) -> str:
    return "RIGHT: here it is."


def _section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def _pairwise_judge(messages: list[dict]) -> str:
    """Grades the shipped pairwise prompt by a rule: a wrong answer (the small model's, in
    whichever position it is shown) loses to the other; otherwise a tie."""
    prompt = messages[-1]["content"]
    a = _section(prompt, "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's")
    b = _section(prompt, "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's")
    verdict = "[[A]]" if b.startswith("WRONG") else "[[B]]" if a.startswith("WRONG") else "[[C]]"
    return "Judged by the rule. " + verdict


# -- the steps --------------------------------------------------------------------------------------
def _capture(root: Path) -> tuple[Path, list[dict]]:
    """Serve the cheap policy with capture on, send the mix, return the full capture file."""
    (root / "capture").mkdir()
    policy = root / "capture.yaml"
    policy.write_text(CAPTURE_POLICY)
    bodies = [chat(row["messages"][0]["content"]) for row in trigger_set(CAPTURED, seed=1, trigger=TRIGGER)]
    path = root / "capture" / "requests.jsonl"
    gateway = Gateway(policy, root / "capture-stack").start()
    try:
        for i, body in enumerate(bodies):
            response = gateway.post(body, {"x-request-id": f"loop-{i}"})
            assert (response.status, response.header("x-switchyard-rule")) == (200, "default"), response

        def lines() -> list[dict]:
            data = path.read_bytes() if path.exists() else b""
            return [json.loads(line) for line in data.split(b"\n")[:-1]]

        wait_for("every request in the capture file", lambda: len(lines()) >= CAPTURED, gateway)
    finally:
        gateway.stop()
    captured = lines()
    assert sorted(line["id"] for line in captured) == sorted(f"loop-{i}" for i in range(CAPTURED))
    assert all(line["decision"]["backend"] == "small" for line in captured)
    return path, captured


def _label(root: Path, capture: Path) -> Path:
    labelled = root / "labelled.jsonl"
    with StubBackend(_small) as small, StubBackend(_large) as large, StubBackend(_pairwise_judge) as judge:
        config = root / "label.yaml"
        model = {"model": "m", "price_in_per_million": 0.1, "price_out_per_million": 0.4}
        config.write_text(yaml.safe_dump({
            "models": {"small": {"base_url": small.url, **model}, "large": {"base_url": large.url, **model}},
            "grading": {"mode": "judge", "judge": {"base_url": judge.url, "model": "judge", "mode": "pairwise",
                                                    "strongest": "large"}},
        }))  # fmt: skip
        assert main(["label", "--config", str(config), "--input", str(capture), "--output", str(labelled),
                     "--no-progress"]) == 0  # fmt: skip
        assert small.calls == large.calls == CAPTURED  # one call each per captured request
        assert judge.calls == 2 * CAPTURED  # the pair judged in both orders
    return labelled


def _train_and_calibrate(root: Path, labelled: Path) -> tuple[Path, float, list[dict]]:
    """Train the probe (holding out 30% for validation), calibrate it on the held-out rows to
    send their failed share to large; the checkpoint, that share and the held-out rows."""
    import torch

    checkpoint = root / "ckpt" / "probe"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_text_model(root)
        assert main([
            "train", "probe", "--method", "attention", "--backbone", str(model), "--data", str(labelled),
            "--small", "small", "--out", str(checkpoint), "--epochs", "20", "--lr", "3e-2", "--patience", "0",
            "--val-fraction", "0.3", "--mlp-depth", "3", "--mlp-width", "32", "--no-progress",
        ]) == 0  # fmt: skip
        validation = checkpoint / "validation.jsonl"
        held_out = [json.loads(line) for line in validation.read_text().splitlines()]
        share = sum(row["outcomes"]["small"]["correct"] == 0 for row in held_out) / len(held_out)
        assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(validation),
                     "--large-share", repr(share)]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return checkpoint, share, held_out


def _explain(policy: Path, bodies: list[dict], capsys) -> list[dict]:
    import torch

    requests = policy.parent / "held-out.jsonl"
    requests.write_text("".join(json.dumps(body) + "\n" for body in bodies))
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["policy", "explain", str(policy), "--requests", str(requests)]) == 0
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_capture_label_train_calibrate_check_serve_and_explain(tmp_path, capsys):
    capture, captured = _capture(tmp_path)

    labelled = _label(tmp_path, capture)
    rows = {row["id"]: row for row in map(json.loads, labelled.read_text().splitlines())}
    assert sorted(rows) == sorted(line["id"] for line in captured)  # one row per captured request
    for line in captured:
        outcomes = rows[line["id"]]["outcomes"]
        assert outcomes["large"]["correct"] == 1
        assert outcomes["small"]["correct"] == int(not _has_trigger(line)), outcomes

    checkpoint, share, held_out = _train_and_calibrate(tmp_path, labelled)
    policy = tmp_path / "policy.yaml"
    policy.write_text(PROBE_POLICY.format(checkpoint=checkpoint, share=repr(share)))
    capsys.readouterr()
    assert main(["policy", "check", str(policy)]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.strip().endswith("policy.yaml: ok")

    # the rows training held out (and calibrated on), then prompts never captured at all
    validation = [chat(row["messages"][0]["content"]) for row in held_out]
    fresh = [chat(row["messages"][0]["content"]) for row in trigger_set(16, seed=7, trigger=TRIGGER)]
    bodies = validation + fresh
    assert {_has_trigger(body) for body in validation} == {True, False}

    gateway = Gateway(policy, tmp_path / "probe-stack").start()
    try:
        served = [gateway.post(body) for body in bodies]
    finally:
        gateway.stop()
    assert all(response.status == 200 for response in served), served
    decided = [(r.header("x-switchyard-backend"), r.header("x-switchyard-rule")) for r in served]
    explained = _explain(policy, bodies, capsys)
    assert [(row["backend"], row["rule"]) for row in explained] == decided  # offline == live
    scores = [row["scores"]["probe"]["values"]["attention"] for row in explained]

    expected = [("large", "probe") if _has_trigger(body) else ("small", "rest") for body in validation]
    assert decided[:len(validation)] == expected, list(zip(decided, expected, scores))
    # on prompts it never saw, the probe still ranks every trigger prompt below every other one
    trigger_scores = [score for body, score in zip(fresh, scores[len(validation):]) if _has_trigger(body)]
    other_scores = [score for body, score in zip(fresh, scores[len(validation):]) if not _has_trigger(body)]
    assert trigger_scores and other_scores and max(trigger_scores) < min(other_scores), (trigger_scores, other_scores)
