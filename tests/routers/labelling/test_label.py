"""``switchyard label`` against real stub backends on loopback (tests/routers/label_stubs.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from extproc import PolicyError
from routers.data import load_labelled
from routers.labelling import LabelError, LabelOptions, label_file, load_label_config
from routers.labelling.client import ChatClient
from routers.labelling.config import Endpoint, Retries
from routers.labelling.graders import GRADERS, extract_choice, extract_number, parse_preference, parse_rating
from tests.routers.label_stubs import (
    StubBackend, down_url, first_position_judge, right, rule_judge, short_only, sum_prompt,
)

REPO = Path(__file__).resolve().parents[3]
LONG = " Please show your work carefully."
#: Runs the CLI as a user without the ml extra would: torch cannot be imported.
_CLI = ("import sys; sys.modules['torch'] = None\n"
        "from extproc.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _config(path: Path, models: dict[str, dict], **sections) -> Path:
    path.write_text(yaml.safe_dump({"models": models, **sections}, sort_keys=False), encoding="utf-8")
    return path


def _model(url: str, **keys) -> dict:
    return {"base_url": url, "model": "m", "price_in_per_million": 1.0, "price_out_per_million": 2.0, **keys}


def _rows(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "an id was labelled twice"
    return {row["id"]: row for row in rows}


def _run(config: Path, prompts: Path, out: Path, **options) -> tuple:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    options.setdefault("progress", False)
    summary = asyncio.run(label_file(load_label_config(config), prompts, out, LabelOptions(**options), sleep=sleep))
    return summary, sleeps


def _cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CLI, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_each_backend_gets_the_outcome_its_behaviour_earns(tmp_path):
    prompts = [sum_prompt(1, 2), sum_prompt(3, 4), sum_prompt(5, 1, LONG), sum_prompt(2, 2, LONG)]
    with StubBackend(right) as good, StubBackend(short_only) as short, \
            StubBackend(right, behaviour="rate_limited", retry_after="7") as limited, \
            StubBackend(right, behaviour="hang", hang_s=3) as slow, StubBackend(behaviour="malformed") as broken:
        config = _config(tmp_path / "label.yaml", {
            "good": _model(good.url), "short": _model(short.url), "limited": _model(limited.url),
            "slow": _model(slow.url, timeout_s=0.3), "broken": _model(broken.url), "down": _model(down_url()),
        }, grading={"mode": "reference", "reference_grader": "number"})
        summary, sleeps = _run(config, _jsonl(tmp_path / "prompts.jsonl", prompts), tmp_path / "out.jsonl")
        assert limited.calls == 2 * len(prompts) and set(limited.prompts.values()) == {2}
    rows = _rows(tmp_path / "out.jsonl")
    assert sorted(rows) == sorted(p["id"] for p in prompts) and summary.labelled == 4
    for prompt in prompts:
        outcomes = rows[prompt["id"]]["outcomes"]
        long = prompt["id"].endswith("-long")
        assert outcomes["good"]["correct"] == 1
        assert outcomes["short"]["correct"] == (0 if long else 1)
        assert outcomes["limited"]["correct"] == 1 and outcomes["limited"]["attempts"] == 2
        assert outcomes["slow"]["error"] == "timeout"
        assert outcomes["broken"]["error"] == "malformed"
        assert outcomes["down"]["error"] == "refused"
        for name in ("slow", "broken", "down"):
            assert "correct" not in outcomes[name] and "score" not in outcomes[name]
        text = prompt["messages"][0]["content"]
        answer = right(prompt["messages"])
        assert outcomes["good"]["cost"] == pytest.approx((len(text) * 1.0 + len(answer) * 2.0) / 1e6)
        assert outcomes["good"]["answer_chars"] == len(answer)
    assert sleeps == [7.0] * len(prompts)  # Retry-After honoured, once per prompt
    assert summary.failures == {"slow": {"timeout": 4}, "broken": {"malformed": 4}, "down": {"refused": 4}}
    labelled = load_labelled(tmp_path / "out.jsonl")  # what `train` reads
    assert len(labelled) == 4 and labelled[0].outcomes["down"].failed


def test_5xx_is_retried_with_doubling_backoff_then_recorded(tmp_path):
    async def call() -> tuple[Exception, list[float]]:
        sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        client = ChatClient(Endpoint("x", stub.url, "m"), Retries(max_attempts=3, backoff_s=0.5), sleep=sleep)
        try:
            with pytest.raises(Exception) as failed:
                await client.complete([{"role": "user", "content": "What is 1+1?"}])
        finally:
            client.close()
        return failed.value, sleeps

    with StubBackend(behaviour="server_error") as stub:
        failed, sleeps = asyncio.run(call())
        assert stub.calls == 3
    assert (failed.kind, failed.attempts, sleeps) == ("http_5xx", 3, [0.5, 1.0])


@pytest.mark.parametrize("keep_alive", ["yes", "close", "drop"])
def test_workers_keep_their_connections_and_replace_ones_the_server_closed(keep_alive):
    """20 calls from 2 workers open 2 connections when the server keeps them; every call is
    answered when it closes them, saying so or not (then each call opens one)."""
    async def call_many() -> list[str]:
        client = ChatClient(Endpoint("x", stub.url, "m", max_concurrency=2), Retries(max_attempts=1))
        try:
            done = await asyncio.gather(*(client.complete(sum_prompt(i, 1)["messages"]) for i in range(20)))
        finally:
            client.close()
        return [completion.text for completion in done]

    with StubBackend(keep_alive=keep_alive) as stub:
        answers = asyncio.run(call_many())
        assert answers == [right(sum_prompt(i, 1)["messages"]) for i in range(20)]
        assert stub.calls == 20
        assert stub.connections == (2 if keep_alive == "yes" else 20)


@pytest.mark.parametrize("mode", ["absolute", "pairwise"])
def test_judge_outcomes_follow_its_rule(tmp_path, mode):
    prompts = [sum_prompt(1, 2), sum_prompt(5, 1, LONG)]
    with StubBackend(right) as big, StubBackend(short_only) as small, StubBackend(rule_judge) as judge:
        config = _config(tmp_path / "label.yaml", {"big": _model(big.url), "small": _model(small.url)}, grading={
            "mode": "judge", "judge": {"base_url": judge.url, "model": "judge", "mode": mode, "strongest": "big",
                                       "price_in_per_million": 1.0}})
        summary, _ = _run(config, _jsonl(tmp_path / "prompts.jsonl", prompts), tmp_path / "out.jsonl")
        judge_calls = judge.calls
    rows = _rows(tmp_path / "out.jsonl")
    short, long = rows[prompts[0]["id"]]["outcomes"], rows[prompts[1]["id"]]["outcomes"]
    if mode == "absolute":
        assert judge_calls == 4
        assert short["big"]["score"] == short["small"]["score"] == long["big"]["score"] == pytest.approx(8 / 9)
        assert long["small"]["score"] == pytest.approx(1 / 9) and "[[2]]" in long["small"]["verdict"]
    else:
        assert judge_calls == 4  # small against big, in both orders, per row
        assert short["big"] == {"correct": 1, "cost": short["big"]["cost"], "answer_chars": short["big"]["answer_chars"],
                                "verdict": "baseline"}
        assert short["small"]["correct"] == 1 and "[[C]]" in short["small"]["verdict"]  # a tie
        assert "[[C]]" in short["small"]["verdict_swapped"]
        assert long["small"]["correct"] == 0 and "[[A]]" in long["small"]["verdict"]  # big's answer wins
        assert "[[B]]" in long["small"]["verdict_swapped"]  # big's answer, shown second, still wins
    model_cost = sum(o["cost"] for row in rows.values() for o in row["outcomes"].values())
    assert summary.spent_usd > model_cost  # the judge's calls count in the money spent, not in an outcome


@pytest.mark.parametrize(("both_orders", "judge_calls", "correct"), [(True, 4, 0.5), (False, 2, 0)])
def test_a_judge_that_prefers_a_position_is_cancelled_out_by_judging_both_orders(tmp_path, both_orders,
                                                                                 judge_calls, correct):
    """A judge that always picks the first answer shown: one order says the strongest model
    always wins; both orders disagree with each other, so each answer gets 0.5, not 0."""
    prompts = [sum_prompt(1, 2), sum_prompt(5, 1)]
    with StubBackend(right) as big, StubBackend(right) as small, StubBackend(first_position_judge) as judge:
        config = _config(tmp_path / "label.yaml", {"big": _model(big.url), "small": _model(small.url)}, grading={
            "mode": "judge", "judge": {"base_url": judge.url, "model": "judge", "mode": "pairwise",
                                       "strongest": "big", "both_orders": both_orders}})
        _run(config, _jsonl(tmp_path / "prompts.jsonl", prompts), tmp_path / "out.jsonl")
        assert judge.calls == judge_calls
    rows = _rows(tmp_path / "out.jsonl")
    assert [row["outcomes"]["small"]["correct"] for row in rows.values()] == [correct, correct]
    assert load_labelled(tmp_path / "out.jsonl")[0].outcomes["small"].correct == correct  # what `train` reads


def test_kill_9_then_rerun_labels_every_id_exactly_once(tmp_path):
    prompts = [sum_prompt(i, i % 7) for i in range(80)]
    with StubBackend(right, delay_s=0.05) as a, StubBackend(short_only, delay_s=0.05) as b:
        config = _config(tmp_path / "label.yaml", {"a": _model(a.url, max_concurrency=2),
                                                   "b": _model(b.url, max_concurrency=2)})
        args = ["label", "--config", str(config), "--input", str(_jsonl(tmp_path / "p.jsonl", prompts)),
                "--output", str(out := tmp_path / "out.jsonl"), "--no-progress"]
        first = subprocess.Popen([sys.executable, "-c", _CLI, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 5):
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        written = out.read_bytes().count(b"\n")
        assert 5 <= written < len(prompts), "the run was not killed mid-way"
        second = _cli(*args)
        assert second.returncode == 0, second.stderr
        summary = json.loads(second.stdout)
    assert summary["already_labelled"] >= 5 and summary["labelled"] + summary["already_labelled"] == len(prompts)
    assert sorted(_rows(out)) == sorted(p["id"] for p in prompts)
    assert len(load_labelled(out)) == len(prompts)


def test_a_torn_last_line_is_dropped_and_its_row_labelled_again(tmp_path):
    prompts = [sum_prompt(1, 1), sum_prompt(2, 2), sum_prompt(3, 3)]
    with StubBackend(right) as a:
        config = _config(tmp_path / "label.yaml", {"a": _model(a.url)})
        _run(config, _jsonl(tmp_path / "p.jsonl", prompts[:2]), out := tmp_path / "out.jsonl")
        whole = out.read_bytes()
        out.write_bytes(whole + b'{"id": "q3-3", "messages": [{"ro')  # a write cut by kill -9
        summary, _ = _run(config, _jsonl(tmp_path / "p.jsonl", prompts), out)
        assert a.prompts["What is 3+3?"] == 1
    assert summary.dropped_torn_line and summary.already_labelled == 2 and summary.labelled == 1
    assert out.read_bytes().startswith(whole) and sorted(_rows(out)) == sorted(p["id"] for p in prompts)


def test_odd_unicode_round_trips(tmp_path):
    odd = "\u0085next\u2028line\u2029para é 🙂"
    prompt = {"id": "odd", "messages": [{"role": "user", "content": f"What is 2+3?{odd}"}], "reference": "5"}

    def answer(messages):
        return f"{odd} the sum\u2028is\n#### 5"

    with StubBackend(answer) as a:
        config = _config(tmp_path / "label.yaml", {"a": _model(a.url)}, grading={"reference_grader": "number"})
        _run(config, _jsonl(tmp_path / "p.jsonl", [prompt]), out := tmp_path / "out.jsonl")
    row = _rows(out)["odd"]
    assert row["messages"] == prompt["messages"] and row["outcomes"]["a"]["correct"] == 1
    assert row["outcomes"]["a"]["answer_chars"] == len(answer(None))
    assert load_labelled(out)[0].messages == prompt["messages"]


def test_max_cost_stops_before_the_budget_is_passed_and_a_rerun_goes_on(tmp_path):
    prompts = [sum_prompt(i, 1) for i in range(1, 7)]  # answers of equal length
    answer_tokens = len(right(prompts[0]["messages"]))
    with StubBackend(right) as a:
        model = _model(a.url, price_in_per_million=0.0, price_out_per_million=1e6 / answer_tokens, max_concurrency=1)
        config = _config(tmp_path / "label.yaml", {"a": model})  # $1 per row
        path = _jsonl(tmp_path / "p.jsonl", prompts)
        summary, _ = _run(config, path, out := tmp_path / "out.jsonl", max_cost=3.0,
                          expected_output_tokens=answer_tokens)
        assert summary.stopped_by_budget and (summary.labelled, summary.not_started) == (3, 3)
        assert summary.spent_usd == pytest.approx(3.0) and a.calls == 3
        summary, _ = _run(config, path, out, max_cost=10.0, expected_output_tokens=answer_tokens)
    assert not summary.stopped_by_budget and (summary.already_labelled, summary.labelled) == (3, 3)
    assert len(_rows(out)) == 6


def test_dry_run_estimates_the_cost_and_calls_nothing(tmp_path):
    prompts = [sum_prompt(1, 2), sum_prompt(3, 4, LONG)]
    with StubBackend(right) as a:
        config = _config(tmp_path / "label.yaml", {"a": _model(a.url, api_key_env="LABEL_TEST_UNSET_KEY")})
        done = _cli("label", "--config", str(config), "--input", str(_jsonl(tmp_path / "p.jsonl", prompts)),
                    "--output", str(out := tmp_path / "out.jsonl"), "--dry-run", "--expected-output-tokens", "100")
        assert a.calls == 0
    assert done.returncode == 0, done.stderr
    estimate = json.loads(done.stdout)
    chars = sum(len(p["messages"][0]["content"]) for p in prompts)
    expected = (chars / 4 * 1.0 + 2 * 100 * 2.0) / 1e6
    assert estimate["rows"] == 2 and estimate["total_usd"] == pytest.approx(expected)
    assert not out.exists()


def test_a_config_typo_is_located_and_nothing_is_written(tmp_path):
    config = tmp_path / "label.yaml"
    config.write_text("models:\n  a:\n    base_url: http://127.0.0.1:1/v1\n    model: m\n    max_concurency: 4\n")
    done = _cli("label", "--config", str(config), "--input", str(_jsonl(tmp_path / "p.jsonl", [sum_prompt(1, 2)])),
                "--output", str(out := tmp_path / "out.jsonl"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{config}:5:5: Unknown key `max_concurency` in `models.a`" in done.stderr
    assert not out.exists()


def test_a_base_url_that_is_not_http_is_located(tmp_path):
    config = _config(tmp_path / "label.yaml", {"a": _model("127.0.0.1:8000/v1")})
    with pytest.raises(PolicyError, match=r"label.yaml:3:5: `models.a.base_url` must start with http"):
        load_label_config(config)


def test_a_missing_key_file_is_located(tmp_path):
    config = _config(tmp_path / "label.yaml", {"a": _model("http://127.0.0.1:1/v1", api_key_file="nope.key")})
    with pytest.raises(PolicyError) as error:
        load_label_config(config)
    (problem,) = error.value.problems
    assert (problem.line, problem.column) == (7, 5) and "nope.key" in problem.message
    assert "api_key_file" in problem.message


def test_an_unreachable_judge_is_an_error_before_anything_is_written(tmp_path):
    with StubBackend(right) as a:
        config = _config(tmp_path / "label.yaml", {"a": _model(a.url)}, grading={
            "mode": "judge", "judge": {"base_url": down_url(), "model": "j"}})
        with pytest.raises(LabelError, match="unreachable"):
            _run(config, _jsonl(tmp_path / "p.jsonl", [sum_prompt(1, 2)]), out := tmp_path / "out.jsonl")
        assert a.calls == 0
    assert not out.exists()


def test_invalid_json_on_line_n_is_an_error_and_nothing_is_written(tmp_path):
    lines = [json.dumps(sum_prompt(1, 2)), json.dumps(sum_prompt(2, 3)), '{"messages": [', json.dumps(sum_prompt(3, 4))]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    with StubBackend(right) as a:
        config = _config(tmp_path / "label.yaml", {"a": _model(a.url)})
        done = _cli("label", "--config", str(config), "--input", str(prompts), "--output", str(out := tmp_path / "o"))
        assert a.calls == 0
    assert done.returncode == 1 and f"{prompts}:3: not valid JSON" in done.stderr
    assert not out.exists()


def test_the_api_key_is_sent_but_never_printed_logged_or_written(tmp_path):
    secret = "sk-label-test-5ecret-value"
    (tmp_path / "judge.key").write_text(secret + "-judge\n")
    with StubBackend(right) as a, StubBackend(rule_judge) as judge:
        config = _config(tmp_path / "label.yaml", {"a": _model(a.url, api_key_env="LABEL_TEST_KEY"),
                                                   "down": _model(down_url(), api_key_env="LABEL_TEST_KEY")},
                         grading={"mode": "judge", "judge": {"base_url": judge.url, "model": "j",
                                                             "api_key_file": "judge.key"}})
        done = _cli("--log-level=debug", "label", "--config", str(config), "--input",
                    str(_jsonl(tmp_path / "p.jsonl", [sum_prompt(1, 2)])), "--output", str(out := tmp_path / "o"),
                    env={"LABEL_TEST_KEY": secret})
        assert done.returncode == 0, done.stderr
        assert a.authorizations == [f"Bearer {secret}"] and judge.authorizations == [f"Bearer {secret}-judge"]
    assert done.returncode == 0, done.stderr
    assert "labelled" in done.stderr  # the log is there, and holds no key
    for text in (done.stdout, done.stderr, out.read_text()):
        assert "5ecret" not in text
    assert "5ecret" not in repr(load_label_config(config, need_keys=False))


def test_policy_backends_give_the_model_names(tmp_path):
    config = _config(tmp_path / "label.yaml", {"small": {"base_url": "http://127.0.0.1:1/v1"},
                                               "large": {"base_url": "http://127.0.0.1:2/v1", "model": "mine"}},
                     policy=str(REPO / "policies" / "default.yaml"))
    loaded = load_label_config(config)
    assert (loaded.models["small"].model, loaded.models["large"].model) == ("small-model", "mine")
    _config(config, {"medium": {"base_url": "http://127.0.0.1:1/v1"}}, policy=str(REPO / "policies" / "default.yaml"))
    with pytest.raises(PolicyError, match="`models.medium.model` is required"):
        load_label_config(config)


@pytest.mark.parametrize(("grader", "answer", "reference", "expected"), [
    ("exact", " Paris\n", "Paris", 1),
    ("exact", "paris", "Paris", 0),
    ("normalised", "The Eiffel  Tower!", "eiffel tower", 1),
    ("normalised", "Eiffel", "eiffel tower", 0),
    ("number", "So 3 + 4 = 7.\n#### 1,234", "Natalia sold ... #### 1234", 1),
    ("number", "She pays $5.00 in the end.", "5", 1),
    ("number", "It is 12, not 13", "12", 0),
    ("number", "no number here", "3", 0),
    ("choice", "The answer is (B).", "B", 1),
    ("choice", "Answer: c", "(C)", 1),
    ("choice", "B. because ...", "B", 1),
    ("choice", "The answer is (A).", "D", 0),
])
def test_reference_graders(grader, answer, reference, expected):
    assert GRADERS[grader](answer, reference) == expected


def test_verdict_and_answer_parsing():
    assert extract_number("3/4 of it: #### -0.75") == extract_number("-3/4")
    assert extract_choice("nothing to pick") is None
    assert parse_rating("Rating: [[10]]") == 1.0 and parse_rating("[[1]]") == 0.0 and parse_rating("[[11]]") is None
    assert parse_preference("A is worse. [[B]]") == "B" and parse_preference("[[C]]") == "tie"
    assert parse_preference("no verdict") is None


def test_labelling_imports_without_torch():
    code = ("import sys\n"
            "sys.modules['torch'] = None\n"
            "import routers.labelling, routers.labelling.cli\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')]\n"
            "assert heavy == ['torch'], heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_rows_without_an_id_get_a_stable_hash_and_a_rerun_skips_them(tmp_path):
    from routers.labelling import default_id

    prompts = [{k: v for k, v in sum_prompt(i, 1).items() if k != "id"} for i in range(3)]
    with StubBackend(right) as a:
        config = _config(tmp_path / "label.yaml", {"a": _model(a.url)})
        path = _jsonl(tmp_path / "p.jsonl", prompts)
        _run(config, path, out := tmp_path / "out.jsonl")
        summary, _ = _run(config, path, out)
        assert a.calls == 3
    assert sorted(_rows(out)) == sorted(default_id(p["messages"]) for p in prompts)
    assert (summary.already_labelled, summary.labelled) == (3, 0)
