"""``switchyard policy explain --requests FILE``: many requests decided in one process.

Each input line is an OpenAI body, or ``{"body": BODY, "headers": {...}, "id": ...}``. The
policy's scorers load once and every request is decided the way the server decides it (the
same engine and scoring loop), one after another, so each gets its full scorer deadline.
Output: one JSON object a line, in input order: ``line`` (1-based), ``id`` when the input
gave one, and the decision as ``policy explain`` prints it (with its scores), or ``error``
(``status``, ``code``, ``message``) for a request that would get an error answer. A line
that is not a JSON object is an error answer too, never the end of the run.

``switchyard policy diff A B --requests FILE`` (:func:`diff_many`) decides the same lines
with two policies, their scorers loaded once through one cache (a scorer both name is one
model), each request by A and then by B as ``serve --shadow B`` would. It prints a line for
each request they route differently, then a summary line (module :mod:`extproc.server._shadow`
counts the same pairs, large share and cost live).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from extproc._errors import RequestError, SwitchyardError
from extproc.policy._model import Policy
from extproc.request._body import RoutingRequest, parse_json_body

__all__ = ["diff_many", "explain_many"]

#: The keys that make a line a wrapper ``{body, headers, id}`` rather than a body.
_WRAPPER_KEYS = frozenset({"body", "headers", "id"})


def _lines(path: Path) -> list[bytes]:
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise SwitchyardError(f"Cannot read the requests file {path}: {exc.strerror or exc}.") from exc
    return data.split(b"\n")


def _request(line: bytes, headers: dict[str, str], max_bytes: int) -> tuple[Any, RoutingRequest]:
    """``(id or None, the request)``; :class:`RequestError` for a line a client could not send."""
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raw = None
    if isinstance(raw, dict) and "body" in raw and set(raw) <= _WRAPPER_KEYS:
        extra = raw.get("headers") or {}
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise RequestError("`headers` must be an object of header name -> string value.")
        body = json.dumps(raw["body"]).encode()
        merged = {**headers, **{str(k).lower(): v for k, v in extra.items()}}
        return raw.get("id"), RoutingRequest(headers=merged, body=parse_json_body(body, max_bytes=max_bytes))
    return None, RoutingRequest(headers=dict(headers), body=parse_json_body(line, max_bytes=max_bytes))


async def _run(policy: Policy, lines: list[bytes], headers: dict[str, str], out) -> int:
    from extproc.scoring._cache import loaded_engine
    from extproc.scoring._decide import decide_with_scores

    errors = 0
    async with loaded_engine(policy) as engine:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row: dict[str, Any] = {"line": number}
            try:
                rid, request = _request(line.rstrip(b"\r"), headers, policy.routing.max_body_bytes)
                if rid is not None:
                    row["id"] = rid
                row.update((await decide_with_scores(engine, request)).explain())
            except RequestError as error:
                errors += 1
                row["error"] = {"status": error.status, "code": error.code, "message": str(error)}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return errors


def _label(outcome) -> str:
    """The backend a decision chose, or :data:`~extproc.server._shadow.REJECTED` for an error answer."""
    from extproc.server._shadow import REJECTED

    return REJECTED if isinstance(outcome, RequestError) else outcome.backend.name


def _side(outcome) -> dict[str, Any]:
    if isinstance(outcome, RequestError):
        return {"error": {"status": outcome.status, "code": outcome.code, "message": str(outcome)}}
    return {"backend": outcome.backend.name, "rule": outcome.rule}


class _Tally:
    """One policy's share of a diff: requests on its large backends, and the cost it chose."""

    def __init__(self, policy: Policy) -> None:
        from extproc.server._shadow import large_backends

        self.source, self.large_names = policy.source, large_backends(policy)
        self.large = 0
        self.cost = 0.0

    def add(self, outcome) -> None:
        if not isinstance(outcome, RequestError):
            self.large += outcome.backend.name in self.large_names
            self.cost += outcome.backend.cost

    def summary(self, requests: int) -> dict[str, Any]:
        return {"policy": self.source, "large_backends": sorted(self.large_names),
                "large_share": round(self.large / requests, 6) if requests else 0.0, "cost": round(self.cost, 6)}


async def _decide(engine, line: bytes, headers: dict[str, str], scratch: dict):
    """``(id, the decision or the RequestError of its error answer)`` of one line by ``engine``."""
    from extproc.scoring._decide import decide_with_scores

    rid = None
    try:
        rid, request = _request(line, headers, engine.policy.routing.max_body_bytes)
        request.scratch = scratch  # B reads what A's scorers kept for this request, as the shadow does
        return rid, await decide_with_scores(engine, request)
    except RequestError as error:
        return rid, error


async def _diff(a: Policy, b: Policy, lines: list[bytes], headers: dict[str, str], out) -> dict:
    from extproc.engine._engine import PolicyEngine
    from extproc.server._shadow import SharedScorers

    shared = SharedScorers()
    engines = []
    try:
        for owner, policy in (("a", a), ("b", b)):
            view = shared.owner(owner)
            scorers = await asyncio.to_thread(view.prepare, policy)
            view.commit(scorers)
            engines.append(PolicyEngine(policy, scorers))
        tallies = [_Tally(a), _Tally(b)]
        pairs: dict[tuple[str, str], int] = {}
        requests = 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            line, scratch = line.rstrip(b"\r"), {}
            (rid, first), (_, second) = [await _decide(engine, line, headers, scratch) for engine in engines]
            requests += 1
            pair = (_label(first), _label(second))
            pairs[pair] = pairs.get(pair, 0) + 1
            for tally, outcome in zip(tallies, (first, second)):
                tally.add(outcome)
            if _side(first) != _side(second):
                row: dict[str, Any] = {"line": number}
                if rid is not None:
                    row["id"] = rid
                row.update(a=_side(first), b=_side(second))
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        await shared.close()
    agree = sum(count for (x, y), count in pairs.items() if x == y)
    return {
        "requests": requests,
        "agreement": round(agree / requests, 6) if requests else 1.0,
        "pairs": [{"a": x, "b": y, "requests": count} for (x, y), count in sorted(pairs.items())],
        "a": tallies[0].summary(requests),
        "b": tallies[1].summary(requests),
    }


def diff_many(a: Policy, b: Policy, path: Path, headers: dict[str, str], out=None) -> int:
    """Decide every request of ``path`` with ``a`` and with ``b``; print one JSON line per
    request they route differently (a different backend or rule, or an error answer on one
    side), then ``{"summary": ...}``: requests, agreement (the share of requests on the same
    backend), the (A, B) backend pairs, each policy's large share and cost. Exit code 0."""
    out = out or sys.stdout
    summary = asyncio.run(_diff(a, b, _lines(path), headers, out))
    out.write(json.dumps({"summary": summary}, ensure_ascii=False) + "\n")
    return 0


def explain_many(policy: Policy, path: Path, headers: dict[str, str]) -> int:
    """Decide every request of ``path``, printing one JSON decision a line; exit code 0, or 2
    when some request got an error answer (as ``--request`` exits 2)."""
    errors = asyncio.run(_run(policy, _lines(path), headers, sys.stdout))
    return 2 if errors else 0
