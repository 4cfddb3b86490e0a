"""Progress for people: a redrawn bar on a terminal, sparse plain lines everywhere else.

Logs of a container are read later, by someone scrolling, so off a TTY we print one line per
phase change and at most one every few seconds; on a TTY a single line is redrawn at most ten
times a second. The materialiser calls us every couple of thousand entries, so the cost of a
call that prints nothing is a clock read.
"""

from __future__ import annotations

import time
from typing import TextIO

from datapin_sidecar.engine.materialize import Progress

_BAR = 24


class Reporter:
    """A `ProgressFn` writing to `stream` (stderr in the CLI)."""

    def __init__(self, stream: TextIO, *, tty: bool, interval: float | None = None) -> None:
        self._stream = stream
        self._tty = tty
        self._interval = interval if interval is not None else (0.1 if tty else 5.0)
        self._last = 0.0
        self._phase = ""
        self._drawn = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        changed = p.phase != self._phase
        if not changed and now - self._last < self._interval:
            return
        self._last = now
        self._phase = p.phase
        if p.phase == "done":
            self.close()
            return
        pct = 100 * p.done // p.total if p.total else 100
        if self._tty:
            filled = _BAR * pct // 100
            bar = "#" * filled + "-" * (_BAR - filled)
            self._stream.write(f"\r{p.phase:>6} [{bar}] {pct:3d}% {p.done}/{p.total}\x1b[K")
            self._drawn = True
        else:
            self._stream.write(f"progress: {p.phase} {p.done}/{p.total} ({pct}%)\n")
        self._stream.flush()

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False
