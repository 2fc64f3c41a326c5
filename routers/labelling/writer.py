"""The labelled output file: one JSON line per fully labelled row, appended and fsynced.

Rows are written whole (one ``write`` of their lines, each ending in ``\\n``), flushed and
fsynced before they count as done (rows that finish together share one fsync: a group
commit), so a ``kill -9`` loses only the rows still being labelled. Opening an
existing file reads the ids it holds (those rows are skipped); a last line that is not
complete JSON ending in ``\\n`` (a write cut by the kill) is cut off the file, and its row
labelled again. A bad line before the last is not something a kill leaves: it is an error
naming ``file:line``, and the file is left as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from routers.labelling.errors import LabelError

__all__ = ["LabelledWriter", "done_ids"]


class LabelledWriter:
    """Appends rows to ``path``; :meth:`open` resumes a file a previous run left."""

    def __init__(self, path: Path, handle, done: set[str], dropped_torn_line: bool) -> None:
        self.path = path
        self._handle = handle
        #: Ids already in the file when it was opened.
        self.done = done
        #: Whether opening cut off a torn last line.
        self.dropped_torn_line = dropped_torn_line

    @classmethod
    def open(cls, path: str | Path) -> LabelledWriter:
        path = Path(path)
        done, keep, total = _scan(path)
        try:
            handle = open(path, "ab")
            if keep < total:
                handle.truncate(keep)
                os.fsync(handle.fileno())
        except OSError as exc:
            raise LabelError(f"Cannot write the labelled output {path}: {exc.strerror or exc}.") from exc
        return cls(path, handle, done, keep < total)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` as one line, flushed and fsynced."""
        self.write_many([row])

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows``, one line each, then flush and fsync once (a group commit: rows
        that finished together cost one fsync)."""
        self._handle.write(b"".join(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n" for row in rows))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def done_ids(path: str | Path) -> set[str]:
    """The ids of the rows already in the output file ``path`` (none when it does not exist)."""
    return _scan(Path(path))[0]


def _scan(path: Path) -> tuple[set[str], int, int]:
    """``(ids, bytes to keep, file size)`` of an existing output file."""
    done: set[str] = set()
    keep = 0
    bad_line: int | None = None
    try:
        with open(path, "rb") as handle:
            for lineno, line in enumerate(handle, start=1):
                if bad_line is not None:
                    raise LabelError(f"{path}:{bad_line}: not a labelled row (invalid JSON or no `id`); "
                                     "fix or remove that line, then run again.")
                rid = _row_id(line)
                if rid is None:
                    bad_line = lineno
                    continue
                done.add(rid)
                keep += len(line)
            total = handle.tell()
    except FileNotFoundError:
        return done, 0, 0
    except OSError as exc:
        raise LabelError(f"Cannot read the labelled output {path}: {exc.strerror or exc}.") from exc
    return done, keep, total


def _row_id(line: bytes) -> str | None:
    if not line.endswith(b"\n"):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    rid = row.get("id") if isinstance(row, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
