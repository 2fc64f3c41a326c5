"""Labelling a prompt file: ask every model, grade the answers, append the labelled rows.

One row at a time per slot, at most ``2 x`` the largest ``max_concurrency`` rows in flight
(the input is streamed, so memory stays flat however long the file). A row is written
once all its calls (models, then judge) have ended, as the labelled set ``switchyard
train`` reads::

    {"id": "q1", "messages": [...], "reference": "42",
     "outcomes": {"small": {"correct": 1, "cost": 0.00012, "answer_chars": 118},
                  "large": {"score": 0.78, "cost": 0.0021, "answer_chars": 402, "verdict": "... [[8]]"},
                  "flaky": {"error": "timeout", "cost": 0.0, "attempts": 1}}}

``correct`` (reference graders, pairwise judge) is 0/1, ``score`` (absolute judge) is in
[0, 1]; ``cost`` is the model's own call (``usage`` x the config's prices), never the
judge's. A failed call has ``error`` (:data:`~routers.labelling.client.FAILURE_KINDS`, or
``judge_<kind>`` when the answer came but its grading failed) and neither ``correct`` nor
``score``: it is not a wrong answer.

``max_cost``: before a row starts, its cost is estimated (prompt tokens as characters / 4,
completions as the mean so far, at first ``expected_output_tokens``) and reserved; a row
that would take the spent-plus-reserved money past ``max_cost`` is not started, and no
row after it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from routers.labelling.client import CallFailed, ChatClient, Completion, check_reachable
from routers.labelling.config import Endpoint, LabelConfig
from routers.labelling.errors import LabelError
from routers.labelling.graders import GRADERS, parse_preference, parse_rating, question_text, render_prompt
from routers.labelling.inputs import Prompt, check_prompts, read_prompts
from routers.labelling.progress import Progress
from routers.labelling.writer import LabelledWriter, done_ids

__all__ = ["CHARS_PER_TOKEN", "DEFAULT_EXPECTED_OUTPUT_TOKENS", "LabelOptions", "LabelSummary", "Estimate",
           "label_file", "estimate_file"]

log = logging.getLogger("switchyard.label")

#: Characters per token when a cost is estimated before a call (``--dry-run``, ``--max-cost``).
CHARS_PER_TOKEN = 4.0
#: ``--expected-output-tokens``: the completion length assumed before any answer has come.
DEFAULT_EXPECTED_OUTPUT_TOKENS = 256
#: Relative slack when a sum of costs is compared with ``max_cost`` (float rounding, not money).
_COST_EPSILON = 1e-9


@dataclass(frozen=True)
class LabelOptions:
    max_cost: float | None = None
    expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS
    progress: bool = True


@dataclass
class LabelSummary:
    """What a run did; printed as JSON at the end of ``switchyard label``."""

    rows: int = 0
    already_labelled: int = 0
    labelled: int = 0
    not_started: int = 0
    spent_usd: float = 0.0
    stopped_by_budget: bool = False
    dropped_torn_line: bool = False
    failures: dict[str, dict[str, int]] = field(default_factory=dict)
    judge_failures: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Estimate:
    """``--dry-run``'s answer: the rows still to label and their estimated cost in USD."""

    rows: int
    already_labelled: int
    usd_by_model: dict[str, float]
    judge_usd: float

    @property
    def total_usd(self) -> float:
        return sum(self.usd_by_model.values()) + self.judge_usd

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_usd": self.total_usd}


def _chars(messages: list[dict[str, Any]]) -> int:
    from extproc import conversation_text

    return len(conversation_text(messages))


class _Costs:
    """Spent and reserved money, and the mean completion length per endpoint."""

    def __init__(self, max_cost: float | None, expected_output_tokens: int) -> None:
        self.max_cost = max_cost
        self.spent = 0.0
        self.reserved = 0.0
        self._expected = float(expected_output_tokens)
        self._out_tokens: dict[Endpoint, list[float]] = defaultdict(lambda: [0.0, 0.0])  # -> [sum, count]

    def mean_out(self, endpoint: Endpoint) -> float:
        total, count = self._out_tokens[endpoint]
        return total / count if count else self._expected

    def record(self, endpoint: Endpoint, prompt_tokens: float, completion_tokens: float) -> float:
        cost = endpoint.cost(prompt_tokens, completion_tokens)
        self.spent += cost
        stats = self._out_tokens[endpoint]
        stats[0] += completion_tokens
        stats[1] += 1
        return cost

    def reserve(self, estimate: float) -> bool:
        if self.max_cost is not None and self.spent + self.reserved + estimate > self.max_cost * (1 + _COST_EPSILON):
            return False
        self.reserved += estimate
        return True

    def release(self, estimate: float) -> None:
        self.reserved = max(0.0, self.reserved - estimate)


class _Reservation:
    """One row's reserved money, by model and for the judge; each part is released as its
    calls end, when their actual cost has been added to the money spent."""

    def __init__(self, costs: _Costs, models: dict[str, float], judge: float) -> None:
        self._costs = costs
        self._models = dict(models)
        self._judge = judge

    @property
    def total(self) -> float:
        return sum(self._models.values()) + self._judge

    def release(self, model: str) -> None:
        self._costs.release(self._models.pop(model, 0.0))

    def release_judge(self, share: float = 1.0) -> None:
        amount = self._judge * share
        self._judge -= amount
        self._costs.release(amount)

    def release_all(self) -> None:
        for model in list(self._models):
            self.release(model)
        self.release_judge()


def _row_estimate(config: LabelConfig, costs: _Costs, prompt_chars: int) -> tuple[dict[str, float], float]:
    """``(USD per model, judge USD)`` expected for one row of ``prompt_chars`` characters."""
    prompt_tokens = prompt_chars / CHARS_PER_TOKEN
    per_model = {name: e.cost(prompt_tokens, costs.mean_out(e)) for name, e in config.models.items()}
    judge = config.grading.judge
    if config.grading.mode != "judge" or judge is None:
        return per_model, 0.0
    pairwise = judge.mode == "pairwise"
    calls = max(0, len(config.models) - 1) * (2 if judge.both_orders else 1) if pairwise else len(config.models)
    answers = sum(costs.mean_out(e) for e in config.models.values()) / max(1, len(config.models))
    judge_in = len(judge.prompt) / CHARS_PER_TOKEN + prompt_tokens + answers * (2 if pairwise else 1)
    return per_model, calls * judge.endpoint.cost(judge_in, costs.mean_out(judge.endpoint))


def estimate_file(config: LabelConfig, input_path: Path, output_path: Path, expected_output_tokens: int) -> Estimate:
    """The cost of labelling the rows of ``input_path`` not yet in ``output_path``; no call made."""
    need_reference = config.grading.mode == "reference"
    check_prompts(input_path, need_reference=need_reference)
    done = done_ids(output_path)
    costs = _Costs(None, expected_output_tokens)
    by_model = dict.fromkeys(config.models, 0.0)
    judge_usd = 0.0
    rows = already = 0
    for prompt in read_prompts(input_path, need_reference=need_reference):
        if prompt.id in done:
            already += 1
            continue
        rows += 1
        per_model, judge = _row_estimate(config, costs, _chars(prompt.messages))
        for name, usd in per_model.items():
            by_model[name] += usd
        judge_usd += judge
    return Estimate(rows=rows, already_labelled=already, usd_by_model=by_model, judge_usd=judge_usd)


@dataclass(frozen=True)
class _Answer:
    text: str
    cost: float
    attempts: int


class _Labeller:
    def __init__(self, config: LabelConfig, options: LabelOptions,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.config = config
        self.options = options
        self.costs = _Costs(options.max_cost, options.expected_output_tokens)
        self.failures: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.judge_failures: dict[str, int] = defaultdict(int)
        self.clients = {name: ChatClient(e, config.retries, sleep=sleep) for name, e in config.models.items()}
        judge = config.grading.judge if config.grading.mode == "judge" else None
        self.judge = judge
        self.judge_client = ChatClient(judge.endpoint, config.retries, sleep=sleep) if judge else None

    def close(self) -> None:
        for client in [*self.clients.values(), *([self.judge_client] if self.judge_client else [])]:
            client.close()

    async def label(self, prompt: Prompt, reservation: _Reservation) -> dict[str, Any]:
        results = await asyncio.gather(*(self._ask(name, prompt, reservation) for name in self.clients))
        answers = dict(zip(self.clients, results))
        outcomes = {name: _outcome(result) for name, result in answers.items()}
        if self.judge is None:
            grader = GRADERS[self.config.grading.reference_grader]
            for name, result in answers.items():
                if isinstance(result, _Answer):
                    outcomes[name]["correct"] = grader(result.text, prompt.reference or "")
        elif self.judge.mode == "absolute":
            await self._judge_absolute(prompt, answers, outcomes, reservation)
        else:
            await self._judge_pairwise(prompt, answers, outcomes, reservation)
        row: dict[str, Any] = {"id": prompt.id, "messages": prompt.messages}
        if prompt.reference is not None:
            row["reference"] = prompt.reference
        row["outcomes"] = {name: _ordered(outcome) for name, outcome in outcomes.items()}
        return row

    async def _ask(self, name: str, prompt: Prompt, reservation: _Reservation) -> _Answer | CallFailed:
        client = self.clients[name]
        try:
            completion = await client.complete(prompt.messages, prompt.params)
        except CallFailed as failed:
            self.failures[name][failed.kind] += 1
            return failed
        finally:
            reservation.release(name)
        return self._answer(client.endpoint, completion, _chars(prompt.messages))

    def _answer(self, endpoint: Endpoint, completion: Completion, prompt_chars: int) -> _Answer:
        prompt_tokens, completion_tokens = completion.prompt_tokens, completion.completion_tokens
        if prompt_tokens == 0 and completion_tokens == 0:  # no `usage`: estimate it, so the budget still holds
            prompt_tokens = math.ceil(prompt_chars / CHARS_PER_TOKEN)
            completion_tokens = math.ceil(len(completion.text) / CHARS_PER_TOKEN)
        cost = self.costs.record(endpoint, prompt_tokens, completion_tokens)
        return _Answer(completion.text, cost, completion.attempts)

    async def _verdicts(self, prompts: list[str], reservation: _Reservation) -> list[str | CallFailed]:
        """The judge's verdicts on ``prompts``, each call releasing its share of the reservation."""
        return await asyncio.gather(*(self._verdict(text, reservation, 1.0 / (len(prompts) - i))
                                      for i, text in enumerate(prompts)))

    async def _verdict(self, prompt_text: str, reservation: _Reservation, share: float) -> str | CallFailed:
        assert self.judge_client is not None
        messages = [{"role": "user", "content": prompt_text}]
        try:
            completion = await self.judge_client.complete(messages, {"temperature": 0})
        except CallFailed as failed:
            self.judge_failures[failed.kind] += 1
            return failed
        finally:
            reservation.release_judge(share)
        self._answer(self.judge_client.endpoint, completion, len(prompt_text))
        return completion.text

    async def _judge_absolute(self, prompt: Prompt, answers: Mapping[str, Any], outcomes: dict,
                              reservation: _Reservation) -> None:
        assert self.judge is not None
        question = question_text(prompt.messages)
        graded = [name for name, a in answers.items() if isinstance(a, _Answer)]
        verdicts = await self._verdicts([
            render_prompt(self.judge.prompt, question=question, reference=prompt.reference, answer=answers[name].text)
            for name in graded], reservation)
        for name, verdict in zip(graded, verdicts):
            score = parse_rating(verdict) if isinstance(verdict, str) else None
            _set_grade(outcomes[name], verdict, "score", score)

    async def _judge_pairwise(self, prompt: Prompt, answers: Mapping[str, Any], outcomes: dict,
                              reservation: _Reservation) -> None:
        assert self.judge is not None and self.judge.strongest is not None
        strongest = answers[self.judge.strongest]
        others = [name for name, a in answers.items() if isinstance(a, _Answer) and name != self.judge.strongest]
        if not isinstance(strongest, _Answer):
            for name in others:
                _fail(outcomes[name], "judge_no_baseline")
            return
        outcomes[self.judge.strongest].update(correct=1, verdict="baseline")
        question = question_text(prompt.messages)
        orders = [(strongest.text, answers[name].text) for name in others]
        if self.judge.both_orders:  # the same pairs again, the strongest's answer second
            orders += [(b, a) for a, b in orders]
        verdicts = await self._verdicts([
            render_prompt(self.judge.prompt, question=question, reference=prompt.reference, answer_a=a, answer_b=b)
            for a, b in orders], reservation)
        swapped = verdicts[len(others):] or [None] * len(others)
        for name, verdict, verdict_swapped in zip(others, verdicts, swapped):
            _set_grade(outcomes[name], verdict, "correct", _as_good(verdict, verdict_swapped))
            if isinstance(verdict_swapped, CallFailed):
                _fail(outcomes[name], f"judge_{verdict_swapped.kind}")
            elif verdict_swapped is not None:
                outcomes[name]["verdict_swapped"] = verdict_swapped


def _as_good(verdict: str | CallFailed, swapped: str | CallFailed | None) -> float | int | None:
    """``correct`` of an answer judged against the strongest's: 1 when as good or better, 0 when
    worse; with both orders the mean of the two (0.5 when they disagree). None: a verdict that
    could not be read (or did not come)."""
    first = parse_preference(verdict) if isinstance(verdict, str) else None
    if first is None:
        return None
    if swapped is None:
        return int(first != "A")
    second = parse_preference(swapped) if isinstance(swapped, str) else None
    if second is None:
        return None
    agree = int(first != "A") + int(second != "B")  # the strongest's answer is B in the swapped order
    return agree // 2 if agree != 1 else 0.5


def _outcome(result: _Answer | CallFailed) -> dict[str, Any]:
    if isinstance(result, CallFailed):
        return {"error": result.kind, "cost": 0.0, "attempts": result.attempts}
    out: dict[str, Any] = {"cost": result.cost, "answer_chars": len(result.text)}
    if result.attempts > 1:
        out["attempts"] = result.attempts
    return out


def _set_grade(outcome: dict[str, Any], verdict: str | CallFailed, key: str, value: float | int | None) -> None:
    if isinstance(verdict, CallFailed):
        _fail(outcome, f"judge_{verdict.kind}")
        return
    outcome["verdict"] = verdict
    if value is None:
        _fail(outcome, "judge_malformed")
    else:
        outcome[key] = value


def _fail(outcome: dict[str, Any], kind: str) -> None:
    outcome["error"] = kind


_KEY_ORDER = ("correct", "score", "error", "cost", "answer_chars", "attempts", "verdict", "verdict_swapped")


def _ordered(outcome: dict[str, Any]) -> dict[str, Any]:
    return {key: outcome[key] for key in _KEY_ORDER if key in outcome}


def _window(config: LabelConfig) -> int:
    """Rows in flight: twice the largest per-model concurrency keeps every model busy."""
    return 2 * max(e.max_concurrency for e in config.models.values())


async def label_file(config: LabelConfig, input_path: Path, output_path: Path, options: LabelOptions, *,
                     sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> LabelSummary:
    """Label the rows of ``input_path`` not yet in ``output_path``, appending to it.

    Bad input (a prompt file line, the output file, an unreachable judge) is a
    :class:`LabelError` raised before anything is written.
    """
    need_reference = config.grading.mode == "reference"
    total = check_prompts(input_path, need_reference=need_reference)
    if config.grading.mode == "judge" and config.grading.judge is not None:
        await asyncio.to_thread(check_reachable, config.grading.judge.endpoint)
    labeller = _Labeller(config, options, sleep)
    try:
        writer = LabelledWriter.open(output_path)
    except LabelError:
        labeller.close()
        raise
    summary = LabelSummary(rows=total, dropped_torn_line=writer.dropped_torn_line)
    pending = total - sum(1 for p in read_prompts(input_path) if p.id in writer.done) if writer.done else total
    progress = Progress(pending, enabled=options.progress)
    write_executor = ThreadPoolExecutor(1, thread_name_prefix="label-writer")
    started = time.monotonic()
    log.info("labelling", extra={"rows": total, "already_labelled": total - pending, "models": list(config.models),
                                 "grading": config.grading.mode})
    try:
        await _run(labeller, read_prompts(input_path, need_reference=need_reference), writer, write_executor,
                   progress, summary)
    finally:
        progress.close()
        labeller.close()
        write_executor.shutdown(wait=True)
        writer.close()
    summary.spent_usd = labeller.costs.spent
    summary.elapsed_s = round(time.monotonic() - started, 3)
    summary.failures = {name: dict(kinds) for name, kinds in labeller.failures.items()}
    summary.judge_failures = dict(labeller.judge_failures)
    log.info("labelled", extra=summary.as_dict())
    return summary


class _Committer:
    """Writes finished rows on the writer thread: the first row to arrive writes, the rows
    that arrive meanwhile are written together after it, with one fsync (a group commit);
    :meth:`commit` returns once the row is on disk."""

    def __init__(self, writer: LabelledWriter, executor: ThreadPoolExecutor) -> None:
        self._writer = writer
        self._executor = executor
        self._pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._writing = False

    async def commit(self, row: dict[str, Any]) -> None:
        done = asyncio.get_running_loop().create_future()
        self._pending.append((row, done))
        if not self._writing:
            self._writing = True
            try:
                await self._drain()
            finally:
                self._writing = False
        await done

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await loop.run_in_executor(self._executor, self._writer.write_many, [row for row, _ in batch])
            except BaseException as exc:
                for _, done in batch + self._pending:
                    if not done.done():
                        done.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                self._pending = []
                raise
            for _, done in batch:
                done.set_result(None)


async def _run(labeller: _Labeller, prompts, writer: LabelledWriter, write_executor: ThreadPoolExecutor,
               progress: Progress, summary: LabelSummary) -> None:
    window = asyncio.Semaphore(_window(labeller.config))
    committer = _Committer(writer, write_executor)

    async def one(prompt: Prompt, reservation: _Reservation) -> None:
        try:
            row = await labeller.label(prompt, reservation)
            await committer.commit(row)
            summary.labelled += 1
            progress.update(1, labeller.costs.spent)
        finally:
            reservation.release_all()
            window.release()

    try:
        async with asyncio.TaskGroup() as group:
            for prompt in prompts:
                if prompt.id in writer.done:
                    summary.already_labelled += 1
                    continue
                if summary.stopped_by_budget:
                    summary.not_started += 1
                    continue
                await window.acquire()
                per_model, judge = _row_estimate(labeller.config, labeller.costs, _chars(prompt.messages))
                reservation = _Reservation(labeller.costs, per_model, judge)
                if not labeller.costs.reserve(reservation.total):
                    window.release()
                    summary.stopped_by_budget = True
                    summary.not_started += 1
                    continue
                group.create_task(one(prompt, reservation))
    except* Exception as group_error:
        raise group_error.exceptions[0] from None
