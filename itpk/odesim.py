"""Plain simulation of nonlinear models through the fit's compiled ODE kernel (no gradients).

``simulate`` of a nonlinear model once stepped scipy's LSODA from event to event with a Python
right-hand side: ~1.3 s per subject for the T-VEC regimen of ``it_oncolytic_virus``. The kernel
of :mod:`itpk.odeop` (numba, the same whitelisted expression tape, DP5 or the stiff
Rosenbrock-W method) solves the same schedule for every parameter set in one call, 46–103×
faster (``benchmarks/bench_nonlinear_simulate.py``). Steady-state doses and covariate changes stay
with the steppers of :mod:`itpk.simulate`, and so does a parameter set whose kernel solve fails
(e.g. the step budget spent on a year of doses): ``simulate`` retries it with LSODA.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

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
from itpk.system import Values, initial_state, input_fractions

# Tighter than the kernel's own defaults (1e-8, 1e-7): simulate is the reference the fits, the
# report and the exposure metrics are checked against (agreement with LSODA at 1e-10 and with
# the closed-form references of the tests: 1e-7).
RTOL_DP5, RTOL_STIFF = 1e-10, 1e-9
# atol relative to the largest dose or initial amount, as LSODA's 1e-14·max(1, |x|) was: a fixed
# 1e-10 amount units left a 1e-3 mg dose 120x wrong at 96 h (sparse output times), and made the
# accuracy depend on the amount unit.
ATOL_SCALE = 1e-14
# Steps per parameter set over the whole schedule: a year of T-VEC visits needs up to ~1e6 at
# rtol 1e-9 for some virus parameter sets (200 000 failed 7 of 200); a set that still runs out
# is solved again with LSODA by simulate.
MAX_STEPS = 2_000_000


def supports(schedule: Schedule) -> bool:
    """Whether the kernel can run this schedule: no steady-state doses, no covariate changes."""
    return not schedule.changes and not any(d.ss for d in schedule.doses)


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
    """Amounts (S, T, n) at sorted, distinct ``times``, the parameter sets whose solve failed
    (their rows NaN), and the method with its rtol."""
    spec, S = values.spec, values.size
    system = OdeSystem.from_spec(spec).with_state_outputs()
    n, T = system.n_states, times.size
    subject = Subject("simulate", schedule, {}, "", pd.DataFrame())
    doses = expand_doses([subject])  # every parameter set shares the schedule: expanded once
    time, duration, valid, period = (np.repeat(a, S, axis=0) for a in (doses.time, doses.duration, doses.valid, doses.ss_period))
    design = Design(
        dose_time=time, dose_duration=duration, dose_valid=valid,
        obs_subject=np.repeat(np.arange(S), T * n), obs_time=np.tile(np.repeat(times, n), S),
        obs_output=np.tile(np.arange(n), S * T),
        obs_after=np.tile(np.repeat(last_reset(subject, times), n), S),
        dose_ss_period=period,
    )
    fractions = {t: input_fractions(values, t) for t in schedule.targets()}  # (S, n) per target
    F = np.zeros((S, doses.time.shape[1], n))
    for d, target in enumerate(doses.target[0]):
        if target is not None:  # a bolus amount or an infusion rate, through the target's fractions
            scale = doses.rate[0, d] if doses.rate[0, d] > 0 else doses.amount[0, d]
            F[:, d, :] = scale * fractions[target]
    p = np.stack([np.broadcast_to(np.asarray(values[name], dtype=float), (S,)) for name in system.input_names], axis=1)
    stiff = choose_method(system, design_horizon(design)) == "rosenbrock"
    x0 = np.ascontiguousarray(initial_state(values))
    scale = max(float(np.abs(doses.amount[doses.valid]).max(initial=0.0)), float(np.abs(x0).max(initial=0.0)))
    settings = np.array([RTOL_STIFF if stiff else RTOL_DP5, ATOL_SCALE * scale if scale > 0 else ATOL_SCALE,
                         float(MAX_STEPS), 0.0, 0.0, float(ROSENBROCK if stiff else DP5)])
    events = EventTable.from_design(design)
    prog = system.program
    _NATIVE_FORWARD.register()
    y, _, counts = _forward(p, x0, F, design.obs_subject, design.obs_output,
                            np.zeros((S, F.shape[1], 0)), events.start, events.time, events.kind, events.index,
                            prog.code, prog.arg, prog.consts, prog.starts, system.groups, system.rc,
                            *_tape_arrays(system, None), settings)
    amounts = y.reshape(S, T, n)
    failed = np.flatnonzero((counts[:, 0] < 0) | ~np.all(np.isfinite(amounts), axis=(1, 2)))
    amounts[failed] = np.nan
    # amounts cannot be negative; -1e-25 after a state has decayed over many decades is round-off
    # that would poison log-scale outputs
    return np.maximum(amounts, 0.0), failed, f"{'Rosenbrock' if stiff else 'Dormand-Prince'}, rtol {settings[0]:g}"
