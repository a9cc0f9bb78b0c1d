"""Exact fit predictions of linear models whose covariates change within subjects (NOCB).

Between two changes a subject's parameters are constant, so its amounts follow
the exact linear solution; at a change they carry over. Segment j of a subject
is the time after its j-th change up to and including its next one (a change
at τ holds for t > τ, so a dose or an observation at τ still sees the old
values). Segment j of every subject is one call of the linear Op
(:func:`itpk.linop.linear_predict`, eigen method):

- the amounts at the segment's start enter as one vector bolus at the change time;
- the doses given in it, and the infusions still running into it (restarted at
  the change time for what remains of them), enter through the route fractions
  in force, so fractions that use a changing covariate follow it;
- the amounts at its end are n extra outputs (identity rows of C), which start
  the next segment.

A reset inside a segment drops the starting bolus like any earlier dose (the
design's ``obs_after``). Subjects are batched per segment index, so a fit
chains as many Op calls as the most changes of any subject, plus one; the
gradient flows back through the carried amounts. A steady-state dose stands for
its repetitions with the parameters in force when it is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from itpk.errors import FitError
from itpk.subjects import ExpandedDoses, Subject, reset_times

__all__ = ["Segment", "SegmentPlan", "boundaries", "plan_segments", "segmented_predict"]


@dataclass(frozen=True, eq=False)
class Segment:
    """One link of the chain: the same segment index for every subject.

    Attributes
    ----------
    design : itpk.linop.Design
        Dose column 0 is the carried-in amounts (a vector bolus; valid from the second
        segment on); then the segment's doses. Observation rows: the segment's
        observations, then n rows per subject that carries its amounts on (output
        ``O + k`` is compartment k).
    G : ndarray (N, D_j - 1, R)
        Amount (bolus) or rate (infusion) of each dose column after the first, per dose target.
    obs : ndarray (M_j,) int64
        Index, in the fit's observations, of the segment's observation rows.
    carry : ndarray (N, n) int64
        Row of this segment's predictions that holds compartment k's amount at the
        segment's end, or -1 where the subject has no next segment.
    values : ndarray (N, C)
        Covariates in force (the plan's ``names``), covariate units.
    """

    design: Any
    G: np.ndarray
    obs: np.ndarray
    carry: np.ndarray
    values: np.ndarray


@dataclass(frozen=True, eq=False)
class SegmentPlan:
    """The static chain of a fit: which covariates change, and the segments in time order."""

    names: tuple[str, ...]
    segments: tuple[Segment, ...]
    n_obs: int


def boundaries(subject: Subject, names: tuple[str, ...]) -> tuple[list[float], list[np.ndarray]]:
    """Change times of the named covariates and the values in force from each (first: the subject's own)."""
    values = np.array([subject.covariates[n] for n in names], dtype=float)
    times, history = [], [values]
    for change in subject.schedule.changes:
        new = history[-1].copy()
        for name, value in change.values:
            if name in names:
                new[names.index(name)] = value
        if np.any(new != history[-1]):
            times.append(change.time)
            history.append(new)
    return times, history


def plan_segments(subject_list: Sequence[Subject], doses: ExpandedDoses, design: Any, G: np.ndarray,
                  names: tuple[str, ...], n_states: int, n_outputs: int) -> SegmentPlan:
    """The segments of a fit whose covariates ``names`` change within subjects.

    Parameters
    ----------
    subject_list, doses
        The fit's subjects and their expanded doses.
    design : itpk.linop.Design
        The fit's design without segments (its observations are the ones predicted).
    G : ndarray (N, D, R)
        Amount or rate of each expanded dose per dose target (as the unsegmented fit).
    names
        Covariates whose changes split the subjects' time.
    n_states, n_outputs
        Compartments n and observed outputs O.

    A steady-state dose (SS = 1, 2) stands for its repetitions with the parameters in force
    when it is given (NONMEM computes it so too); its effect then carries into later
    segments through the amounts. A constant infusion at steady state (II = 0) that runs
    into a later segment continues there as an ordinary infusion with the fractions in force.

    Raises
    ------
    FitError
        A periodic steady-state infusion with an earlier repetition still running at a change
        (longer than its interval), naming the subject and times.
    """
    from itpk.linop import Design

    N = len(subject_list)
    bounds, histories = zip(*(boundaries(s, names) for s in subject_list), strict=True)
    resets = [np.array(reset_times(s.schedule)) for s in subject_list]
    J = 1 + max(len(b) for b in bounds)
    obs_subject, obs_time, obs_output, obs_after = design.obs_subject, design.obs_time, design.obs_output, design.obs_after
    segments = []
    for j in range(J):
        cols: list[list[tuple[float, float, int, float]]] = []  # per subject: (time, duration, dose index, SS period)
        rows: list[np.ndarray] = []
        carry = np.full((N, n_states), -1, dtype=np.int64)
        values = np.empty((N, len(names)))
        for i in range(N):
            b = [-math.inf, *bounds[i], math.inf]
            lo, hi = (b[j], b[j + 1]) if j + 1 < len(b) else (math.inf, math.inf)
            values[i] = histories[i][min(j, len(histories[i]) - 1)]
            cols.append(_segment_doses(doses, i, lo, hi, resets[i], subject_list[i].id))
            rows.append(np.flatnonzero((obs_subject == i) & (obs_time > lo) & (obs_time <= hi)))
        M_real = sum(r.size for r in rows)
        carried = [i for i in range(N) if j < len(bounds[i])]  # subjects with a next segment
        if M_real == 0 and not carried:
            break  # the last segment, and nothing observed in it
        D = 1 + max((len(c) for c in cols), default=0)
        dose_time, dose_duration = np.zeros((N, D)), np.zeros((N, D))
        dose_valid, dose_period = np.zeros((N, D), dtype=bool), np.zeros((N, D))
        seg_G = np.zeros((N, D - 1, G.shape[2]))
        for i, c in enumerate(cols):
            if j > 0 and j <= len(bounds[i]):
                dose_time[i, 0], dose_valid[i, 0] = bounds[i][j - 1], True
            for k, (t, duration, d, period) in enumerate(c, 1):
                dose_time[i, k], dose_duration[i, k], dose_valid[i, k], dose_period[i, k] = t, duration, True, period
                seg_G[i, k - 1] = G[i, d]
        real = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        s_obs, t_obs, o_obs, a_obs = [obs_subject[real]], [obs_time[real]], [obs_output[real]], [obs_after[real]]
        next_row = M_real
        for i in carried:
            end = bounds[i][j]
            last = resets[i][resets[i] <= end]
            s_obs.append(np.full(n_states, i))
            t_obs.append(np.full(n_states, end))
            o_obs.append(n_outputs + np.arange(n_states))
            a_obs.append(np.full(n_states, last[-1] if last.size else -math.inf))
            carry[i] = next_row + np.arange(n_states)
            next_row += n_states
        link = Design(dose_time, dose_duration, dose_valid, np.concatenate(s_obs), np.concatenate(t_obs),
                      np.concatenate(o_obs), np.concatenate(a_obs), dose_period)
        segments.append(Segment(link, seg_G, real.astype(np.int64), carry, values))
    return SegmentPlan(names, tuple(segments), len(obs_subject))


def _segment_doses(doses: ExpandedDoses, i: int, lo: float, hi: float, resets: np.ndarray,
                   subject: Any) -> list[tuple[float, float, int, float]]:
    """(time, duration, dose index, SS period) of subject i's doses given in (lo, hi], and of its
    infusions still running at lo, restarted there for what remains of them."""
    out = []
    for d in np.flatnonzero(doses.valid[i]):
        t, duration, period = float(doses.time[i, d]), float(doses.duration[i, d]), float(doses.ss_period[i, d])
        if lo < t <= hi:
            out.append((t, duration, int(d), period))
            continue
        # steady-state durations are not cut at resets (they describe the past repetitions too)
        stopped = period > 0 and bool(np.any((resets > t) & (resets <= lo)))
        if t <= lo < t + duration and duration > 0 and not stopped:
            if math.isfinite(period) and period > 0 and lo < t - period + duration:
                raise FitError(f"subject {subject}: the steady-state infusion given at {t:g} (every {period:g}, lasting "
                               f"{duration:g}) still has an earlier repetition running at {lo:g}, when covariates change; "
                               "it would straddle the change (give the dosing history explicitly with ADDL instead)")
            # the dose's own infusion (or a constant SS infusion) goes on as an ordinary one; its
            # repetitions have all ended and reach later segments through the amounts
            out.append((lo, t + duration - lo, int(d), 0.0))
    return out


def segmented_predict(pt: Any, plan: SegmentPlan, K: Sequence[Any], fractions: Sequence[Any], C: Sequence[Any]) -> Any:
    """Predictions (M,) of the fit's observations, chaining the linear Op over the plan's segments.

    ``K[j]`` (N, n, n), ``fractions[j]`` (N, R, n) and ``C[j]`` (N, O, n) are built with the
    covariates in force in segment j.
    """
    from itpk.linop import linear_predict

    N, n = plan.segments[0].carry.shape
    state = pt.zeros((N, n))
    eye = np.broadcast_to(np.eye(n), (N, n, n))
    pieces, order = [], []
    for seg, K_j, fr_j, C_j in zip(plan.segments, K, fractions, C, strict=True):
        F = pt.concatenate([state[:, None, :], pt.matmul(pt.as_tensor_variable(seg.G), fr_j)], axis=1)
        y = linear_predict(K_j, F, pt.concatenate([C_j, pt.as_tensor_variable(eye)], axis=1), seg.design, method="eigen")
        pieces.append(y[: seg.obs.size])
        order.append(seg.obs)
        state = pt.concatenate([y, pt.zeros(1)])[seg.carry]  # -1: no next segment, amounts 0 (unused)
    inverse = np.empty(plan.n_obs, dtype=np.int64)
    inverse[np.concatenate(order)] = np.arange(plan.n_obs)
    return pt.concatenate(pieces)[inverse]
