"""Plain simulation of nonlinear models through the fit's compiled ODE kernel (no gradients).

``simulate`` of a nonlinear model once stepped scipy's LSODA from event to event with a Python
right-hand side: ~1.3 s per subject for the T-VEC regimen of ``it_oncolytic_virus``. The kernel
of :mod:`itpk.odeop` (numba, the same whitelisted expression tape, DP5 or the stiff
Rosenbrock-W method) solves the same schedule for every parameter set in one call, 46–103×
faster (``benchmarks/bench_nonlinear_simulate.py``), covariate changes included (as in fits).
Steady-state doses stay with the steppers of :mod:`itpk.simulate`, and so does a parameter set
whose kernel solve fails (e.g. the step budget spent on a year of doses): ``simulate`` retries
it with LSODA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from itpk.covdoses import covariate_doses
from itpk.dosecuts import cut_doses
from itpk.errors import ScheduleError
from itpk.events import Schedule
from itpk.linop import Design
from itpk.odeop import (
    _NATIVE_FORWARD,
    DP5,
    ROSENBROCK,
    EventTable,
    OdeSystem,
    _forward,
    _tape_arrays,
    choose_method,
    design_horizon,
)
from itpk.subjects import Subject, expand_doses, last_reset
from itpk.system import Values, initial_state, input_fractions, with_covariates

# Tighter than the kernel's own defaults (1e-8, 1e-7): simulate is the reference the fits, the
# report and the exposure metrics are checked against (agreement with LSODA at 1e-10 and with
# the closed-form references of the tests: 1e-7).
RTOL_DP5, RTOL_STIFF = 1e-10, 1e-9
# atol relative to the largest dose or initial amount (the smaller of the two, see kernel_solve),
# as LSODA's 1e-14·max(1, |x|) was: a fixed 1e-10 amount units left a 1e-3 mg dose 120x wrong at
# 96 h (sparse output times), and made the accuracy depend on the amount unit.
ATOL_SCALE = 1e-14
# Steps per parameter set over the whole schedule: a year of T-VEC visits needs up to ~1e6 at
# rtol 1e-9 for some virus parameter sets (200 000 failed 7 of 200); a set that still runs out
# is solved again with LSODA by simulate.
MAX_STEPS = 2_000_000


def supports(schedule: Schedule) -> bool:
    """Whether the kernel can run this schedule: no steady-state doses (covariate changes are fine)."""
    return not any(d.ss for d in schedule.doses)


def kernel_amounts(values: Values, schedule: Schedule, times: np.ndarray) -> np.ndarray:
    """Amounts (S, T, n) at sorted, distinct ``times`` (after the events at each time).

    Raises
    ------
    ScheduleError
        When the solver fails for a parameter set (step count exceeded, step size underflow,
        values that are not finite).
    """
    amounts, failed, method = kernel_solve(values, schedule, times)
    if failed.size:
        raise ScheduleError(f"the ODE solver failed for parameter set(s) {failed[:10].tolist()} ({method})")
    return amounts


def kernel_solve(values: Values, schedule: Schedule, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Amounts (S, T, n) at sorted, distinct ``times`` (T,), or at each set's own times (S, T), the
    parameter sets whose solve failed (their rows NaN), and the method with its rtol.

    Own times need not be sorted or distinct: each set's solve stops at its own times only.

    Covariate changes (NOCB) go through the fit's machinery: a covariate the right-hand side or
    the outputs use is an extra state that jumps after the observations at its change time
    (:mod:`itpk.covdoses`); route fractions and initial amounts that use one follow it through
    cut doses and restore boluses (:mod:`itpk.dosecuts`).
    """
    spec, S = values.spec, values.size
    n, T = len(spec.state_names), times.shape[-1]
    if times.ndim not in (1, 2) or (times.ndim == 2 and times.shape[0] != S):
        raise ValueError(f"kernel_solve: times must be (T,) or ({S}, T), found {times.shape}")
    empty = pd.DataFrame()
    subjects = [Subject(s, schedule, {c: float(np.broadcast_to(values[c], (S,))[s]) for c in spec.covariates}, "", empty)
                for s in range(S)]
    plan = _doses(values, subjects)
    changes = covariate_doses(spec, subjects) if schedule.changes else None
    system = OdeSystem.from_spec(spec, state_covariates=changes.names if changes else ()).with_state_outputs()
    x0 = np.ascontiguousarray(initial_state(values))
    # the smaller of the two magnitudes: states that start empty are filled by the doses, so an
    # initial amount far larger than any dose (virus: 1e10 tumour cells, doses of 1e6-1e8 PFU) must
    # not set the absolute tolerance of the infected cells and free virus (it did: 1.5e-6 of
    # their peak after a few weeks of exponential growth, 1e-8 now)
    scale = min((m for m in (plan.largest, float(np.abs(x0).max(initial=0.0))) if m > 0), default=0.0)
    F, time, duration, valid, late = plan.F, plan.time, plan.duration, plan.valid, np.zeros(plan.valid.shape, dtype=bool)
    if changes is not None:  # covariate states: their first values, then a late bolus at each change
        C = len(changes.names)
        x0 = np.concatenate([x0, changes.first], axis=1)
        F = np.concatenate([np.concatenate([F, np.zeros((*F.shape[:2], C))], axis=2),
                            np.concatenate([np.zeros((*changes.amount.shape[:2], n)), changes.amount], axis=2)], axis=1)
        time, valid = np.concatenate([time, changes.time], axis=1), np.concatenate([valid, changes.valid], axis=1)
        duration = np.concatenate([duration, np.zeros(changes.time.shape)], axis=1)
        late = np.concatenate([late, changes.late & changes.valid], axis=1)
    design = Design(
        dose_time=time, dose_duration=duration, dose_valid=valid,
        obs_subject=np.repeat(np.arange(S), T * n),
        obs_time=np.broadcast_to(np.repeat(times, n, axis=-1), (S, T * n)).reshape(-1),
        obs_output=np.tile(np.arange(n), S * T),
        obs_after=np.broadcast_to(np.repeat(last_reset(subjects[0], times), n, axis=-1), (S, T * n)).reshape(-1),
        dose_ss_period=np.zeros(time.shape),
    )
    p = np.stack([np.broadcast_to(np.asarray(values[name], dtype=float), (S,)) for name in system.input_names], axis=1)
    stiff = choose_method(system, design_horizon(design)) == "rosenbrock"
    settings = np.array([RTOL_STIFF if stiff else RTOL_DP5, ATOL_SCALE * scale if scale > 0 else ATOL_SCALE,
                         float(MAX_STEPS), 0.0, 0.0, float(ROSENBROCK if stiff else DP5)])
    events = EventTable.from_design(design, late if late.any() else None)
    prog = system.program
    _NATIVE_FORWARD.register()
    y, _, counts = _forward(p, np.ascontiguousarray(x0), np.ascontiguousarray(F), design.obs_subject, design.obs_output,
                            np.zeros((S, F.shape[1], 0)), events.start, events.time, events.kind, events.index,
                            prog.code, prog.arg, prog.consts, prog.starts, system.groups, system.rc,
                            *_tape_arrays(system, None), settings)
    amounts = y.reshape(S, T, n)
    failed = np.flatnonzero((counts[:, 0] < 0) | ~np.all(np.isfinite(amounts), axis=(1, 2)))
    amounts[failed] = np.nan
    # amounts cannot be negative; -1e-25 after a state has decayed over many decades is round-off
    # that would poison log-scale outputs
    return np.maximum(amounts, 0.0), failed, f"{'Rosenbrock' if stiff else 'Dormand-Prince'}, rtol {settings[0]:g}"


@dataclass(frozen=True)
class _DosePlan:
    """Every parameter set's doses as state inputs: F (S, D, n) bolus amounts or infusion rates."""

    F: np.ndarray
    time: np.ndarray
    duration: np.ndarray
    valid: np.ndarray
    largest: float  # the largest dose amount, for the absolute tolerance


def _doses(values: Values, subjects: list[Subject]) -> _DosePlan:
    """The doses of ``subjects`` (one per parameter set, one schedule) split by their targets' fractions.

    Without covariate changes that route fractions or initial amounts use, each target's
    fractions are evaluated once; with them, doses are cut at the changes and each piece is split
    with the values in force (a bolus at a change time sees the old ones), and a reset after a
    change is followed by x0(in force) − x0(first values) (:func:`itpk.dosecuts.cut_doses`).
    """
    spec, S = values.spec, values.size
    doses = expand_doses(subjects)  # the same schedule for every set: identical rows
    targets = doses.target[0]
    amount_or_rate = np.where(doses.rate > 0, doses.rate, doses.amount)
    largest = float(np.abs(doses.amount[doses.valid]).max(initial=0.0))
    cuts = cut_doses(spec, subjects, doses) if subjects[0].schedule.changes else None
    if cuts is None:
        fractions = {t: input_fractions(values, t) for t in dict.fromkeys(t for t in targets if t is not None)}  # (S, n)
        F = np.zeros((S, len(targets), len(spec.state_names)))
        for d, target in enumerate(targets):
            if target is not None:
                F[:, d, :] = amount_or_rate[:, d, None] * fractions[target]
        return _DosePlan(F, doses.time, doses.duration, doses.valid, largest)
    in_force = [with_covariates(values, {c: cuts.values[k, :, j] for j, c in enumerate(cuts.names)})
                for k in range(cuts.values.shape[0])]
    fractions = {}
    P, Q = cuts.time.shape[1], cuts.restore_time.shape[1]
    F = np.zeros((S, P + Q, len(spec.state_names)))
    for i, p in zip(*np.nonzero(cuts.valid), strict=True):
        d, k = int(cuts.column[i, p]), int(cuts.segment[i, p])
        if (targets[d], k) not in fractions:
            fractions[targets[d], k] = input_fractions(in_force[k], targets[d])
        F[i, p] = amount_or_rate[i, d] * fractions[targets[d], k][i]
    first = initial_state(values)
    for i, q in zip(*np.nonzero(cuts.restore_valid), strict=True):
        F[i, P + q] = initial_state(in_force[int(cuts.restore_segment[i, q])])[i] - first[i]
    return _DosePlan(F, np.concatenate([cuts.time, cuts.restore_time], axis=1),
                     np.concatenate([cuts.duration, np.zeros((S, Q))], axis=1),
                     np.concatenate([cuts.valid, cuts.restore_valid], axis=1), largest)
