"""A progress bar for long single-process work (a report, a large simulation)."""

from __future__ import annotations

import sys
from typing import Any, Self


class Progress:
    """A progress bar on stderr (rich) when ``enabled`` and stderr is a terminal; otherwise silent.

    Parameters
    ----------
    total
        Number of steps (e.g. subjects simulated plus report sections).
    enabled
        False silences it whatever stderr is (``--quiet``).
    label
        What is running, shown before the step's description.
    """

    def __init__(self, total: int, *, enabled: bool = True, label: str = "report") -> None:
        self.total = total
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()  # never in pipes or logs
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Self:
        if self.enabled:
            from rich import progress as rp
            from rich.console import Console

            self._bar = rp.Progress(rp.TextColumn(f"{self.label}: {{task.description}}"), rp.BarColumn(),
                                    rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), rp.TimeRemainingColumn(),
                                    console=Console(stderr=True), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        if self._bar is not None:
            self._bar.update(self._task, description=label)

    def advance(self, steps: int = 1) -> None:
        """``steps`` steps done."""
        if self._bar is not None:
            self._bar.advance(self._task, steps)
