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
    """The user interrupted (Ctrl-C) a command before it finished; nothing was written. Exit code 130."""

    exit_code = 130


def problems_error(problems: Sequence[str], error: type[ItpkError] = ItpkError) -> ItpkError:
    """One error for every problem found: the problem itself when there is one, else one per line.

    A problem of several lines (a dataset's) keeps them, indented under its own item.
    """
    if len(problems) == 1:
        return error(problems[0])
    lines = "\n".join("  - " + p.replace("\n", "\n    ") for p in problems)
    return error(f"{len(problems)} problems:\n{lines}")


def raise_problems(problems: Sequence[str], error: type[ItpkError] = ItpkError) -> None:
    """Raise :func:`problems_error` when there is any problem."""
    if problems:
        raise problems_error(problems, error)
