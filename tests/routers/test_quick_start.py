"""The learned-scorer quick start of docs/policy.md ("Learned scores in a policy"), as a
user runs it, through the real CLI: train a probe and a LatentRouter, calibrate both on the
validation rows training held out (with the very commands `policy check` prints as hints),
check the policy, and explain many requests in one process."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from extproc.cli import main
from tests.routers.probes.test_training_targets import gain_set
from tests.routers.test_probe_support import tiny_text_model, write_jsonl

POLICY = """\
version: 1
backends:
  small: {cluster: small, model: small-model, cost: 1}
  large: {cluster: large, model: large-model, cost: 20}
default: small
fallback: large
scorers:
  probe:
    kind: probe
    checkpoints: {attention: ckpt/probe}
    deadline_ms: 900
  utility:
    kind: latent_router
    checkpoint: ckpt/latent
    backends: {small: small, large: large}
    deadline_ms: 900
signals:
  short: {kind: token_count, below: 3, scope: last_user}
  small_ok: {kind: score, scorer: probe, output: attention, large_share: 0.2}
  uses_tools: {kind: request_field, field: tools, present: true}
rules:
  - {name: short, when: short, backend: small}
  - {name: tools, when: uses_tools, route: {utility: utility, large_share: 0.2, among: [small, large]}}
  - {name: hard, when: {not: small_ok}, backend: large}
  - {name: rest, backend: small}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    model = tiny_text_model(root)
    train = write_jsonl(root / "train.jsonl", gain_set(90, 3))
    assert main([
        "train", "probe", "--method", "attention", "--backbone", str(model), "--data", str(train),
        "--small", "small", "--out", str(root / "ckpt" / "probe"), "--epochs", "2", "--no-progress",
    ]) == 0  # fmt: skip
    assert main([
        "train", "latent-router", "--data", str(train), "--encoder", "hashing", "--hash-dim", "64",
        "--out", str(root / "ckpt" / "latent"), "--epochs", "3", "--no-progress",
    ]) == 0  # fmt: skip
    (root / "policy.yaml").write_text(POLICY)
    return root


def test_the_quick_start_works_as_written(trained, capsys):
    root = trained
    for name in ("probe", "latent"):
        assert (root / "ckpt" / name / "validation.jsonl").stat().st_size > 0
    capsys.readouterr()

    # before calibrating, `policy check` says what to run, for each checkpoint
    assert main(["policy", "check", str(root / "policy.yaml")]) == 1
    out = capsys.readouterr().out
    hints = re.findall(r"run `(switchyard [^`]+)`", out)
    assert len(hints) == 2 and "policy.yaml:19:61:" in out and "policy.yaml:23:63:" in out, out
    for hint in hints:
        words = shlex.split(hint)
        folder = words[words.index("--checkpoint") + 1]
        words[words.index("<labelled.jsonl>")] = f"{folder}/validation.jsonl"
        assert main(words[1:]) == 0  # calibrated on the rows training held out
    config = json.loads((root / "ckpt" / "latent" / "config.json").read_text())
    assert config["lambdas"][0]["large_share"] == 0.2 and config["lambdas"][0]["large"] == "large"
    capsys.readouterr()

    assert main(["policy", "check", str(root / "policy.yaml")]) == 0
    assert capsys.readouterr().out.strip().endswith("policy.yaml: ok")

    requests = root / "requests.jsonl"
    bodies = [
        {"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
        {"model": "auto", "messages": [{"role": "user", "content": "the zebra of a lion is in the bin"}]},
        {"model": "auto", "messages": [{"role": "user", "content": "what is the answer to it"}],
         "tools": [{"type": "function", "function": {"name": "f"}}]},
    ]
    requests.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    assert main(["policy", "explain", str(root / "policy.yaml"), "--requests", str(requests)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["rule"] for row in rows][0] == "short" and rows[0]["scores"] == {}
    assert rows[1]["rule"] in ("hard", "rest") and "attention" in rows[1]["scores"]["probe"]["values"]
    assert rows[2]["rule"] == "tools" and set(rows[2]["utilities"]) == {"small", "large"}
