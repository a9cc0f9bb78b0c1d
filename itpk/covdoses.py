"""Time-varying covariates in fits of models on the ODE path: changes as jumps of extra states.

(Linear models without initial amounts follow changes exactly instead, segment by
segment: :mod:`itpk.segments`.)

A fit's predictions take the subject's parameters as constants between
events. A covariate that changes within a subject (NOCB,
:class:`itpk.events.CovariateChange`) is carried instead as an extra state
with derivative 0 (:meth:`itpk.odeop.OdeSystem.from_spec`'s
``state_covariates``), so a change is a bolus into that state: the ODE
solver already restarts at every bolus. The change holds only after its time,
so it is a *late* bolus, applied after the observations at that time.

A reset (EVID 3 or 4) puts every state back to its initial amount, the
covariate states included; a bolus at the reset time restores the value in
force there.

Only covariates that reach the right-hand side or the outputs (directly or
through derived quantities) become states. Route fractions and ``initial``
amounts that use a changing covariate follow it through cut doses
(:mod:`itpk.dosecuts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from itpk.spec import ModelSpec
from itpk.subjects import Subject, reset_times
from itpk.system import inputs_of


@dataclass(frozen=True)
class CovariateDoses:
    """Covariate changes of every subject as boluses into covariate states (padded to Dc per subject).

    Attributes
    ----------
    names : tuple of str
        The covariates that change in some subject, model-file order; state k is ``names[k]``.
    first : ndarray (N, C)
        Each subject's first value (covariate units): the states' initial amounts.
    time : ndarray (N, Dc)
        Bolus times (model time unit).
    amount : ndarray (N, Dc, C)
        Jump of each covariate state.
    valid : ndarray (N, Dc) bool
        Real columns (the rest is padding).
    late : ndarray (N, Dc) bool
        True for a change (after the observations at its time), False for a restore after a reset.
    """

    names: tuple[str, ...]
    first: np.ndarray
    time: np.ndarray
    amount: np.ndarray
    valid: np.ndarray
    late: np.ndarray


def covariate_doses(spec: ModelSpec, subject_list: list[Subject]) -> CovariateDoses | None:
    """The subjects' covariate changes as boluses; None when no covariate that the
    right-hand side or the outputs use changes."""
    exprs = [f.rate for f in spec.flows] + list(spec.odes.values()) + [o.expr for o in spec.outputs.values()]
    names = changing_inputs(spec, subject_list, exprs)
    if not names:
        return None
    per = [_boluses(s, names) for s in subject_list]
    N, C, Dc = len(per), len(names), max(len(p) for p in per)
    time, valid, late = np.zeros((N, Dc)), np.zeros((N, Dc), dtype=bool), np.zeros((N, Dc), dtype=bool)
    amount = np.zeros((N, Dc, C))
    for i, boluses in enumerate(per):
        for j, (t, jump, is_late) in enumerate(boluses):
            time[i, j], amount[i, j], valid[i, j], late[i, j] = t, jump, True, is_late
    first = np.array([[s.covariates[n] for n in names] for s in subject_list], dtype=float)
    return CovariateDoses(names, first, time, amount, valid, late)


def changing_inputs(spec: ModelSpec, subject_list: list[Subject], exprs: list[Any]) -> tuple[str, ...]:
    """Covariates that change within some subject and that ``exprs`` use (directly or through
    derived quantities), in model-file order."""
    changing = {n for s in subject_list for c in s.schedule.changes for n, _ in c.values}
    used = set(inputs_of(spec, set().union(*(e.names for e in exprs))))
    return tuple(n for n in spec.covariates if n in changing and n in used)


def _boluses(subject: Subject, names: tuple[str, ...]) -> list[tuple[float, np.ndarray, bool]]:
    """(time, jump (C,), late) for each change of the subject, and a restore at each reset after one."""
    values = np.array([subject.covariates[n] for n in names], dtype=float)
    history = [(-np.inf, values.copy())]  # (from after this time, values in force)
    out = []
    for change in subject.schedule.changes:
        new = history[-1][1].copy()
        for name, value in change.values:
            if name in names:
                new[names.index(name)] = value
        out.append((change.time, new - history[-1][1], True))
        history.append((change.time, new))
    for r in reset_times(subject.schedule):
        in_force = [v for t, v in history if t < r][-1]
        if np.any(in_force != values):
            out.append((r, in_force - values, False))
    return [b for b in out if np.any(b[1] != 0)]
