"""From a Dataset to per-subject dosing schedules, covariates and observations.

One place turns NONMEM rows into the event engine's objects, so simulation,
fitting and reports see the same doses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from itpk.dataset import Dataset
from itpk.errors import DatasetError
from itpk.events import CovariateChange, Dose, Schedule, Target
from itpk.spec import ModelSpec


@dataclass(frozen=True)
class Subject:
    """One subject's schedule, covariates and observation rows (positions in ``Dataset.data``).

    ``covariates`` are the values on the subject's first row; later values of
    time-varying covariates are the schedule's ``changes``.
    """

    id: Any
    schedule: Schedule
    covariates: dict[str, float]
    arm: str
    observations: pd.DataFrame


def subjects(dataset: Dataset, spec: ModelSpec) -> list[Subject]:
    """Every subject of the dataset, in file order, with covariates defaulted from the model."""
    frame = dataset.data
    out = []
    for sid, rows in frame.groupby("ID", sort=False):
        obs = rows[(rows["EVID"] == 0) & (rows["MDV"] == 0)]
        out.append(Subject(sid, _schedule(rows, spec), _covariates(rows, spec), _arm(rows), obs))
    return out


def _schedule(rows: pd.DataFrame, spec: ModelSpec) -> Schedule:
    doses = []
    resets = []
    for r in rows[rows["EVID"].isin([1, 3, 4])].itertuples(index=False):
        if r.EVID == 3:
            resets.append(float(r.TIME))
            continue
        target = _target(r.ROUTE, r.CMT, spec)
        doses.append(
            Dose(
                float(r.TIME), float(r.AMT), target, rate=float(r.RATE or 0.0), duration=float(r.DUR or 0.0),
                ii=float(r.II or 0.0), addl=int(r.ADDL or 0), ss=int(r.SS or 0), reset=bool(r.EVID == 4),
            )
        )
    return Schedule(tuple(doses), tuple(resets), _changes(rows, spec))


def _target(route: Any, cmt: Any, spec: ModelSpec) -> Target:
    """A dose row's target: its route (CMT, when it names another of the route's sites, moves the
    route there: SPEC §2, ``ROUTE=it`` with ``CMT`` = which lesion), else the compartment CMT."""
    if not (isinstance(route, str) and route):
        return Target(str(cmt), compartment=True)
    site = cmt if isinstance(cmt, str) and cmt and cmt != spec.routes[route].site else None
    return Target(route, site=site)


def _changes(rows: pd.DataFrame, spec: ModelSpec) -> tuple[CovariateChange, ...]:
    """NOCB: a row's time-varying covariates hold from the previous row's time (exclusive) to its own.

    So a value that differs from the previous row's takes over at the previous
    row's time. Rows at one time agree (the dataset checks it), so the change
    times are distinct.
    """
    names = [n for n, c in spec.covariates.items() if c.time_varying and n in rows.columns]
    if not names or len(rows) < 2:
        return ()
    times = rows["TIME"].to_numpy(dtype=float)
    values = rows[names].to_numpy(dtype=float)
    out = []
    for k in np.flatnonzero(np.any(values[1:] != values[:-1], axis=1)) + 1:
        new = tuple((n, float(values[k, j])) for j, n in enumerate(names) if values[k, j] != values[k - 1, j])
        out.append(CovariateChange(float(times[k - 1]), tuple(sorted(new))))
    return tuple(out)


def _covariates(rows: pd.DataFrame, spec: ModelSpec) -> dict[str, float]:
    values = {}
    for name, cov in spec.covariates.items():
        if name in rows.columns and rows[name].notna().any():
            values[name] = float(rows[name].dropna().iloc[0])
        else:
            values[name] = cov.value
    return values


def _arm(rows: pd.DataFrame) -> str:
    arms = rows["ARM"].dropna() if "ARM" in rows.columns else pd.Series(dtype=object)
    return str(arms.iloc[0]) if len(arms) else ""


@dataclass(frozen=True)
class ExpandedDoses:
    """Every dose of every subject after ADDL expansion (padded to D per subject).

    ``rate`` is the infusion rate (0 for a bolus); ``duration`` is truncated at
    the next reset (a reset stops a running infusion), except for steady-state
    doses, whose duration also describes their past repetitions. ``ss_period``
    is 0 for ordinary doses, II for a steady-state dose (SS = 1 or 2; its ADDL
    repeats are ordinary doses) and inf for a constant infusion at steady state.
    """

    time: np.ndarray  # (N, D)
    amount: np.ndarray  # (N, D)
    rate: np.ndarray  # (N, D)
    duration: np.ndarray  # (N, D)
    target: list[list[Target]]  # N lists of D (padding: None)
    valid: np.ndarray  # (N, D) bool
    ss_period: np.ndarray  # (N, D)

    @property
    def has_steady_state(self) -> bool:
        return bool(np.any(self.ss_period[self.valid] > 0))


def expand_doses(subject_list: list[Subject]) -> ExpandedDoses:
    """ADDL-expanded doses of all subjects (a steady-state dose stays one dose: its past
    repetitions, overlapping or not, are the prediction's business, :class:`itpk.linop.Design`).

    Raises
    ------
    DatasetError
        A steady-state infusion overlapping more than :data:`itpk.linop.MAX_OVERLAP` of its
        predecessors (duration/II; a data error such as a RATE far too small): every such dose
        is listed.
    """
    from itpk.linop import MAX_OVERLAP

    per, problems = [], []
    for s in subject_list:
        resets = reset_times(s.schedule)
        doses = []
        for d in s.schedule.doses:
            if d.ss and d.is_infusion and d.ii > 0 and not d.infusion_duration <= MAX_OVERLAP * d.ii:
                problems.append(f"subject {s.id}, time {d.time:g}: steady-state infusion lasting {d.infusion_duration:g}, "
                                f"{d.infusion_duration / d.ii:.4g} times its interval II={d.ii:g}: more than {MAX_OVERLAP} "
                                "overlapping predecessors (check RATE, AMT and II)")
            for k, t in enumerate(d.times()):
                steady = bool(d.ss) and k == 0
                duration = d.infusion_duration if d.is_infusion else 0.0
                later = [r for r in resets if t < r < t + duration]
                if later and not steady:
                    duration = later[0] - t
                period = (d.ii if d.ii > 0 else math.inf) if steady else 0.0
                doses.append((t, d.amount, d.infusion_rate, duration, d.target, period))
        per.append(sorted(doses, key=lambda x: x[0]))
    if problems:
        raise DatasetError("steady-state doses itpk fit cannot use:\n" + "\n".join(f"- {p}" for p in problems))
    N, D = len(per), max((len(p) for p in per), default=0) or 1
    time, amount, rate, duration, ss_period = (np.zeros((N, D)) for _ in range(5))
    valid = np.zeros((N, D), dtype=bool)
    target: list[list[Target]] = []
    for i, doses in enumerate(per):
        row = []
        for j, (t, a, r, dur, tgt, period) in enumerate(doses):
            time[i, j], amount[i, j], rate[i, j], duration[i, j], ss_period[i, j] = t, a, r, dur, period
            valid[i, j] = True
            row.append(tgt)
        target.append(row + [None] * (D - len(row)))  # type: ignore[list-item]
    return ExpandedDoses(time, amount, rate, duration, target, valid, ss_period)


def reset_times(schedule: Schedule) -> list[float]:
    """Reset times: EVID 3, EVID 4 doses and SS = 1 doses (which replace the state)."""
    return sorted({*schedule.resets, *(d.time for d in schedule.doses if d.reset or d.ss == 1)})


def last_reset(subject: Subject, times: np.ndarray) -> np.ndarray:
    """For each time, the last reset (EVID 3, 4 or an SS = 1 dose) at or before it; -inf when none."""
    resets = np.array(reset_times(subject.schedule))
    if resets.size == 0:
        return np.full(times.shape, -math.inf)
    idx = np.searchsorted(resets, times, side="right") - 1
    return np.where(idx >= 0, resets[np.maximum(idx, 0)], -math.inf)
