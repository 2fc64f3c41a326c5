"""``make run`` shows learned routing: the demo's sample phase through a real Envoy.

The demo's checkpoints are built by ``demo.learned`` (the same ``switchyard train`` and
``switchyard calibrate`` commands the demo runs) from a small slice of the repository's
``demo/data/gsm8k-routing.jsonl``, beside a verbatim copy of ``demo/policy.yaml``, so the
policy's relative checkpoint paths are the ones ``make run`` uses. The samples then go
through the stack and the printed table must show rows decided by a learned score.
"""

from __future__ import annotations

import re
import shutil

import pytest

from demo import learned
from demo.run import DEMO_POLICY, SAMPLES, score_shown, send_samples
from harness import Stack
from tests.integration.gateway import DEFAULT_POLICY, REPO

#: Few rows and epochs: the test checks the path, not the quality.
SMALL_RECIPE = learned.Recipe(train_rows=120, calibrate_rows=60, probe_epochs=2, probe_mlp_width=16,
                              latent_epochs=2, latent_hash_dim=64, latent_hidden_size=16)
SCORED_RULES = {"probe": re.compile(r"^probe\.p=\d\.\d{3}$"), "utility": re.compile(r"^utility: (small|large) -?\d\.\d{3}$")}


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory):
    """A copy of the demo's layout: demo/policy.yaml and .demo/learned/ built from a slice."""
    root = tmp_path_factory.mktemp("demo")
    (root / "demo").mkdir()
    policy = root / "demo" / "policy.yaml"
    shutil.copyfile(DEMO_POLICY, policy)
    rows = learned.DATA.read_text().splitlines()[: SMALL_RECIPE.train_rows + SMALL_RECIPE.calibrate_rows]
    data = root / "slice.jsonl"
    data.write_text("\n".join(rows) + "\n")
    said: list[str] = []
    learned.ensure(root / ".demo" / "learned", data=data, recipe=SMALL_RECIPE, say=said.append)
    return root, policy, data, said


def test_the_demo_data_is_in_the_repository_with_its_source_and_licence():
    assert learned.DATA.is_relative_to(REPO / "demo" / "data")
    readme = (learned.DATA.parent / "README.md").read_text()
    for needed in ("lm-sys/RouteLLM", "routellm/evals/gsm8k/gsm8k_responses.csv", "Apache License, Version 2.0"):
        assert needed in readme
    assert "mmlu" not in learned.DATA.read_text().lower()  # MMLU is for evaluation only, never training


def test_the_sample_table_shows_rows_decided_by_a_learned_score(demo_tree, tmp_path, capsys):
    _, policy, _, _ = demo_tree
    with Stack(policy, tmp_path) as stack:
        answers = send_samples(stack.url, stack.envoy.log)
    table = capsys.readouterr().out
    assert [a.label for a in answers] == [label for label, _, _ in SAMPLES]
    assert all(a.ok and a.backend == a.answered_by for a in answers), table
    cheap = {a.label: a.rule for a in answers if not a.label.startswith("word problem")}
    assert cheap == {"chit-chat": "default", "code": "code", "long prompt": "long-context", "maths": "maths-reasoning",
                     "reasoning, streamed": "maths-reasoning", "image": "images", "tools": "agentic-tools"}, table
    assert all(a.score == "-" for a in answers if a.label in cheap), table  # cheap rules never run a scorer
    scored = [a for a in answers if a.rule in SCORED_RULES]
    assert scored, f"no sample was decided by a learned score:\n{table}"
    for answer in scored:
        assert SCORED_RULES[answer.rule].match(answer.score), (answer, table)
        row = next(line for line in table.splitlines() if line.startswith(answer.label))
        assert f" {answer.rule} " in row and answer.score in row, row
    assert {a.rule for a in answers if a.label.startswith("word problem")} <= set(SCORED_RULES), table


def test_a_second_build_reuses_the_checkpoints_and_a_changed_recipe_or_data_would_not(demo_tree):
    root, _, data, said = demo_tree
    assert any(line.startswith("learned scorers: building") for line in said)
    assert (root / ".demo" / "learned" / "probe" / "config.json").exists()
    again: list[str] = []
    learned.ensure(root / ".demo" / "learned", data=data, recipe=SMALL_RECIPE, say=again.append)
    assert again == [f"learned scorers: reusing {root / '.demo' / 'learned'}/ (built from {data.name})"]
    key = learned._key(data, SMALL_RECIPE)
    assert learned._key(data, learned.Recipe()) != key
    other = root / "other.jsonl"
    other.write_text(data.read_text() + "\n")
    assert learned._key(other, SMALL_RECIPE)["data_sha256"] != key["data_sha256"]


def test_only_a_policy_reading_the_demo_checkpoints_makes_the_demo_build_them():
    out = REPO / ".demo" / "learned"
    assert learned.uses(DEMO_POLICY, out)
    assert not learned.uses(DEFAULT_POLICY, out)


@pytest.mark.parametrize(("metadata", "shown"), [
    ({"backend": "small", "rule": "default"}, "-"),
    ({"backend": "large", "rule": "probe", "scores": "probe.p=0.3123"}, "probe.p=0.312"),
    ({"backend": "small", "rule": "utility", "scores": "utility.a=0.9,utility.b=0.7",
      "utilities": "small=0.6234,large=0.5012"}, "utility: small 0.623"),
    ({"backend": "large", "rule": "fallback", "fallback": "probe: deadline"}, "fallback: probe: deadline"),
])
def test_the_score_column_shows_what_decided(metadata, shown):
    assert score_shown(metadata) == shown
