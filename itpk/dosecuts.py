"""Route fractions and initial amounts that follow covariate changes, in fits on the ODE path.

The ODE Op takes each dose as a constant amount (or rate) times its target's
fractions, ``F = G @ fractions``, the fractions evaluated once per subject, and
resets a subject to one vector of initial amounts. When a covariate that a
route's fractions or an ``initial`` expression use changes within a subject
(NOCB), the subject's time splits at its changes (:func:`itpk.segments.boundaries`)
and, as ``simulate`` does:

- a dose goes through a copy of its target for the segment it is given in,
  whose fractions use the covariates in force there (a bolus at a change time
  still sees the old ones);
- an infusion that runs across a change is cut there, each piece split by the
  fractions in force over it;
- a reset after a change is followed by a bolus of x0(in force) − x0(first),
  so the amounts restart from the initial amounts of the values in force.

:func:`cut_doses` plans this statically; :func:`itpk.inference` evaluates the
fractions and initial amounts once per segment index.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from itpk.covdoses import changing_inputs
from itpk.segments import boundaries
from itpk.spec import ModelSpec
from itpk.subjects import ExpandedDoses, Subject, reset_times

__all__ = ["DoseCuts", "cut_doses"]


@dataclass(frozen=True, eq=False)
class DoseCuts:
    """Each subject's doses cut at its changes, and the boluses that follow its resets.

    Attributes
    ----------
    names : tuple of str
        Changing covariates that route fractions or initial amounts use (model-file order).
    values : ndarray (S, N, C)
        Covariates in force in segment k of each subject (its last values past its last segment).
    time, duration : ndarray (N, P)
        Start (model time unit) and length of each piece (0 for a bolus).
    valid : ndarray (N, P) bool
        Real pieces (the rest is padding).
    column : ndarray (N, P) int64
        The expanded dose (column of the fit's G) a piece comes from.
    segment : ndarray (N, P) int64
        Segment whose fractions split the piece.
    restore_time, restore_segment, restore_valid : ndarray (N, Q)
        Resets after a change of a covariate an ``initial`` expression uses: time, segment in
        force, and whether the column is real.
    """

    names: tuple[str, ...]
    values: np.ndarray
    time: np.ndarray
    duration: np.ndarray
    valid: np.ndarray
    column: np.ndarray
    segment: np.ndarray
    restore_time: np.ndarray
    restore_segment: np.ndarray
    restore_valid: np.ndarray


def cut_doses(spec: ModelSpec, subject_list: list[Subject], doses: ExpandedDoses) -> DoseCuts | None:
    """The cut doses of a fit, or None when nothing needs cutting: no covariate that route
    fractions use changes within a subject, and no reset follows a change of one that
    ``initial`` amounts use."""
    routes = [frac for r in spec.routes.values() for frac in r.into.values()]
    initial = [c.initial for c in spec.compartments if c.initial is not None]
    names = changing_inputs(spec, subject_list, routes + initial)
    if not names:
        return None
    initial_names = changing_inputs(spec, subject_list, initial)
    in_initial = np.array([n in initial_names for n in names])
    N = len(subject_list)
    bounds, histories = zip(*(boundaries(s, names) for s in subject_list), strict=True)
    S = 1 + max(len(b) for b in bounds)
    values = np.array([[h[min(k, len(h) - 1)] for h in histories] for k in range(S)]).reshape(S, N, len(names))
    pieces = [_pieces(doses, i, np.array(bounds[i])) for i in range(N)]
    restores = []
    for i, s in enumerate(subject_list):
        taus = np.array(bounds[i])
        rows = []
        for r in reset_times(s.schedule):
            k = int(np.sum(taus < r))
            if k > 0 and np.any(histories[i][k][in_initial] != histories[i][0][in_initial]):
                rows.append((r, k))
        restores.append(rows)
    if not changing_inputs(spec, subject_list, routes) and not any(restores):
        return None  # only initial amounts use the changes, and no reset follows one: nothing to cut
    P, Q = max(max(len(p) for p in pieces), 1), max(max(len(r) for r in restores), 1)
    time, duration = np.zeros((N, P)), np.zeros((N, P))
    valid = np.zeros((N, P), dtype=bool)
    column, segment = np.zeros((N, P), dtype=np.int64), np.zeros((N, P), dtype=np.int64)
    r_time, r_segment, r_valid = np.zeros((N, Q)), np.zeros((N, Q), dtype=np.int64), np.zeros((N, Q), dtype=bool)
    for i in range(N):
        for p, (t, length, d, k) in enumerate(pieces[i]):
            time[i, p], duration[i, p], valid[i, p], column[i, p], segment[i, p] = t, length, True, d, k
        for q, (t, k) in enumerate(restores[i]):
            r_time[i, q], r_segment[i, q], r_valid[i, q] = t, k, True
    return DoseCuts(names, values, time, duration, valid, column, segment, r_time, r_segment, r_valid)


def _pieces(doses: ExpandedDoses, i: int, taus: np.ndarray) -> list[tuple[float, float, int, int]]:
    """(start, length, dose column, segment) of subject i's doses, infusions cut at the change times."""
    out = []
    for d in np.flatnonzero(doses.valid[i]):
        t, length = float(doses.time[i, d]), float(doses.duration[i, d])
        if length == 0:
            out.append((t, 0.0, int(d), int(np.sum(taus < t))))  # a bolus at a change time: old values
            continue
        cuts = [float(c) for c in taus if t <= c < t + length]
        edges = [t, *cuts, t + length]
        for a, b in itertools.pairwise(edges):
            if b > a:  # after a change time the new values split the rate
                out.append((a, b - a, int(d), int(np.sum(taus < a)) + (a in cuts)))
    return out
