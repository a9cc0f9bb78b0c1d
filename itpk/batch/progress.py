"""What a running batch tells the outside: a progress line on a terminal, a JSON-lines log for pipelines."""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path
from typing import IO, Any

from itpk import jsontext


class Progress:
    """One self-overwriting line on stderr: done / failed / remaining, with an ETA.

    The ETA is the remaining count times the mean time between completions so
    far (which already accounts for the number of workers).
    """

    def __init__(self, total: int, *, enabled: bool, stream: IO[str] | None = None) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.done = self.failed = self.skipped = 0
        self.start = time.monotonic()
        self.finished_here = 0  # completions in this run (skipped jobs cost nothing and would skew the ETA)

    def count(self, status: str, *, ran: bool = True) -> None:
        """Count one finished job and redraw the line."""
        if status == "failed":
            self.failed += 1
        elif status == "skipped":
            self.skipped += 1
        else:
            self.done += 1
        self.finished_here += ran
        self.draw()

    def line(self) -> str:
        """The text of the progress line."""
        remaining = self.total - self.done - self.failed - self.skipped
        eta = ""
        if self.finished_here and remaining:
            seconds = (time.monotonic() - self.start) / self.finished_here * remaining
            eta = f", ETA {dt.timedelta(seconds=round(seconds))}"
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return f"batch: {self.done}/{self.total} done{skipped}, {self.failed} failed, {remaining} remaining{eta}"

    def draw(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class EventLog:
    """A JSON-lines log: one object per event (``time``, ``event`` and its fields), flushed per line."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8") if self.path else None  # noqa: SIM115 - closed in close()

    def write(self, event: str, **fields: Any) -> None:
        """Append one event."""
        if self._fh is None:
            return
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        self._fh.write(jsontext.dumps({"time": stamp, "event": event, **fields}, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
