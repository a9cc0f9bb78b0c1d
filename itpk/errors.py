"""Exception hierarchy: every user-facing failure is an :class:`ItpkError`.

The CLI catches ``ItpkError`` at its edge, prints the message and exits 1, so
the message must stand on its own: name the thing, what was found, what is
allowed.
"""

from __future__ import annotations


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
