"""Exception hierarchy: every user-facing failure is an :class:`ItpkError`.

The CLI catches ``ItpkError`` at its edge, prints the message and exits 1, so
the message must stand on its own: name the thing, what was found, what is
allowed.
"""

from __future__ import annotations

from collections.abc import Sequence


class ItpkError(Exception):
    """Base class of all errors itpk raises on purpose (bad input, not bugs)."""


class ModelSpecError(ItpkError):
    """A model file (or a parameter/covariate override) is invalid."""


class DatasetError(ItpkError):
    """A dataset is invalid; the message lists every problem found."""


class ScheduleError(ItpkError):
    """A dosing history cannot be simulated (e.g. steady state that does not exist)."""


class FitError(ItpkError):
    """A fit could not be set up or run."""


class PipelineError(ItpkError):
    """A batch pipeline file (``itpk batch``) is invalid; the message lists every problem found."""


class Interrupted(ItpkError):
    """A signal stopped a command before it finished; nothing was written.

    Exit code 130 after Ctrl-C (SIGINT), 143 after SIGTERM (128 + the signal's number).
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def problems_error(problems: Sequence[str], error: type[ItpkError] = ItpkError, *, where: str | None = None) -> ItpkError:
    """One error for every problem found: the problem itself when there is one, else one per line.

    A problem of several lines (a dataset's) keeps them, indented under its own item. With
    ``where`` (a file the problems are in) the message starts with it and always lists them.
    """
    if len(problems) == 1 and where is None:
        return error(problems[0])
    lines = "\n".join("  - " + p.replace("\n", "\n    ") for p in problems)
    count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    return error(f"{where}: {count}:\n{lines}" if where is not None else f"{count}:\n{lines}")


def raise_problems(problems: Sequence[str], error: type[ItpkError] = ItpkError) -> None:
    """Raise :func:`problems_error` when there is any problem."""
    if problems:
        raise problems_error(problems, error)
