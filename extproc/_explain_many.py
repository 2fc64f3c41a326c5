"""``switchyard policy explain --requests FILE``: many requests decided in one process.

Each input line is an OpenAI body, or ``{"body": BODY, "headers": {...}, "id": ...}``. The
policy's scorers load once and every request is decided the way the server decides it (the
same engine and scoring loop), one after another, so each gets its full scorer deadline.
Output: one JSON object a line, in input order: ``line`` (1-based), ``id`` when the input
gave one, and the decision as ``policy explain`` prints it (with its scores), or ``error``
(``status``, ``code``, ``message``) for a request that would get an error answer. A line
that is not a JSON object is an error answer too, never the end of the run.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from extproc._errors import RequestError, SwitchyardError
from extproc._policy import Policy
from extproc._request import RoutingRequest, parse_json_body

__all__ = ["explain_many"]

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
    from extproc.cli import loaded_engine
    from extproc._scoring import decide_with_scores

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


def explain_many(policy: Policy, path: Path, headers: dict[str, str]) -> int:
    """Decide every request of ``path``, printing one JSON decision a line; exit code 0, or 2
    when some request got an error answer (as ``--request`` exits 2)."""
    errors = asyncio.run(_run(policy, _lines(path), headers, sys.stdout))
    return 2 if errors else 0
