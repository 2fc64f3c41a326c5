"""The progress bar of ``switchyard label``: rows done, rows/s and the money spent.

tqdm (in the ``ml`` extra) draws it on stderr; without tqdm a line is printed every
:data:`PLAIN_EVERY_S` seconds instead. ``--no-progress`` turns both off.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["PLAIN_EVERY_S", "Progress"]

#: Seconds between the plain progress lines printed when tqdm is not installed.
PLAIN_EVERY_S = 10.0


class Progress:
    """``update(rows, spent_usd)`` after each row; ``close()`` at the end."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._total = total
        self._done = 0
        self._started = time.monotonic()
        self._last_line = self._started
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ModuleNotFoundError:
                return
            self._bar = tqdm(total=total, unit="row", file=self._stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, rows: int, spent_usd: float) -> None:
        self._done += rows
        if self._bar is not None:
            self._bar.set_postfix_str(f"${spent_usd:.4f}", refresh=False)
            self._bar.update(rows)
            return
        now = time.monotonic()
        if self._enabled and now - self._last_line >= PLAIN_EVERY_S:
            self._last_line = now
            rate = self._done / max(now - self._started, 1e-9)
            print(f"labelled {self._done}/{self._total} rows, {rate:.1f} rows/s, ${spent_usd:.4f} spent",
                  file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
