"""``simulate``: one signature for linear (exact) and nonlinear (ODE) models."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from itpk import odesim
from itpk.errors import ScheduleError
from itpk.events import (
    BOLUS,
    COVARIATE,
    INFUSION_OFF,
    INFUSION_ON,
    RESET,
    STEADY_STATE,
    Schedule,
    Target,
    expand,
)
from itpk.linear import Inputs, LinearStepper
from itpk.ode import NonlinearStepper
from itpk.spec import ModelSpec
from itpk.system import Values, evaluate_outputs, resolve, with_covariates
from itpk.threads import single_blas_thread

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Profiles:
    """Simulated amounts and outputs of S parameter sets at T times.

    Attributes
    ----------
    times : ndarray (T,)
        Model time unit (``spec.time_unit``).
    amounts : ndarray (S, T, n)
        Compartment amounts, in each compartment's amount unit.
    outputs : dict of name -> ndarray (S, T)
        Output values in the output's unit (``spec.outputs[name].unit``).
    """

    spec: ModelSpec
    times: np.ndarray
    amounts: np.ndarray
    outputs: Mapping[str, np.ndarray]

    def to_frame(self, ids: Sequence[Any] | None = None) -> pd.DataFrame:
        """Long table ``ID,TIME,OUTPUT,VALUE,UNIT`` (IDs 1..S unless given)."""
        import pandas as pd

        S, T = self.amounts.shape[:2]
        ids = np.arange(1, S + 1) if ids is None else np.asarray(ids)
        frames = [
            pd.DataFrame({
                "ID": np.repeat(ids, T),
                "TIME": np.tile(self.times, S),
                "OUTPUT": name,
                "VALUE": values.reshape(-1),
                "UNIT": self.spec.outputs[name].unit,
            })
            for name, values in self.outputs.items()
        ]
        return pd.concat(frames, ignore_index=True).sort_values(["ID", "TIME"], kind="stable", ignore_index=True)


@single_blas_thread
def simulate(
    spec: ModelSpec,
    schedule: Schedule,
    params: Mapping[str, Any] | Values | None = None,
    times: Sequence[float] | np.ndarray = (),
    *,
    outputs: Sequence[str] | None = None,
) -> Profiles:
    """Simulate a dosing schedule for one or many parameter sets.

    Linear models (flows only) are solved exactly with matrix exponentials;
    nonlinear models by the fits' compiled ODE kernel (:mod:`itpk.odesim`: Dormand–Prince at
    rtol 1e-10, or Rosenbrock-W at 1e-9 for stiff ones), restarted at every event, or, with
    steady-state doses, by scipy's LSODA (rtol 1e-10) event to event.
    The schedule's covariate changes (NOCB) switch the parameters at their
    times, amounts carried over; outputs at a change time use the old values.

    Parameters
    ----------
    spec
        The model (:func:`itpk.load_model`).
    schedule
        Doses and resets (:func:`itpk.events.regimen` for regular regimens).
    params
        Parameter/covariate values by name (scalars or arrays of length S), or
        already resolved :class:`Values`. Defaults come from the model file.
    times
        Output times, model time unit; values at a dose time are just after the dose.
    outputs
        Output names to compute (all by default).

    Returns
    -------
    Profiles

    Examples
    --------
    >>> from itpk import load_model
    >>> from itpk.events import regimen
    >>> spec = load_model("one_cpt_iv")
    >>> p = simulate(spec, regimen("iv", 100.0), {"CL": 5.0, "V": 50.0}, [0.0, 10.0])
    >>> [round(float(c), 6) for c in p.outputs["plasma"][0]]
    [2.0, 0.735759]
    """
    values = params if isinstance(params, Values) else resolve(spec, params)
    t = np.asarray(times, dtype=float).reshape(-1)
    if t.size == 0:
        raise ScheduleError("no output times were given")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ScheduleError(f"output times must be finite and >= 0, found {t[~(np.isfinite(t) & (t >= 0))][:3].tolist()}")
    segments = segment_values(values, schedule)
    if not spec.is_linear and odesim.supports(schedule):
        unique, inverse = np.unique(t, return_inverse=True)
        amounts, failed, _ = odesim.kernel_solve(values, schedule, unique)
        if failed.size:  # LSODA, the slow path, for the sets the kernel could not solve
            part = values.take(failed)
            amounts[failed] = _run(make_stepper(segment_values(part, schedule), schedule, labels=failed), schedule, unique)
        amounts = amounts[:, inverse]
    else:
        amounts = _run(make_stepper(segments, schedule), schedule, t)
    names = list(outputs) if outputs is not None else list(spec.outputs)
    return Profiles(spec, t, amounts, _outputs(segments, schedule, t, amounts, names))


def simulate_each(values: Values, schedule: Schedule, times: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Outputs (S, T) of each parameter set at its own times ``times`` (S, T), model time unit.

    For nonlinear models the ODE kernel integrates each set through its own times only; through
    :func:`simulate` every set would stop at every other set's times too (a peak search that zooms
    into each set's peaks asks for different times per set). Values at a dose time are just after
    the dose, as in :func:`simulate`.
    """
    t = np.asarray(times, dtype=float)
    if t.ndim != 2 or t.shape[0] != values.size or not np.all(np.isfinite(t) & (t >= 0)):
        raise ScheduleError(f"simulate_each: times must be finite, >= 0 and ({values.size}, T), found shape {t.shape}")
    segments = segment_values(values, schedule)
    if not values.spec.is_linear and odesim.supports(schedule):
        amounts, failed, _ = odesim.kernel_solve(values, schedule, t)
    else:
        amounts, failed = np.empty((*t.shape, len(values.spec.state_names))), np.arange(values.size)
    for s in failed:  # LSODA (or the exact solution) for the sets the kernel could not take
        unique, inverse = np.unique(t[s], return_inverse=True)
        part = values.take([s])
        amounts[s] = _run(make_stepper(segment_values(part, schedule), schedule, labels=np.array([s])), schedule,
                          unique)[0][inverse]
    return _outputs(segments, schedule, t, amounts, list(outputs))


def segment_values(values: Values, schedule: Schedule) -> list[Values]:
    """The values in force before the schedule's first covariate change, then after each."""
    out = [values]
    for change in schedule.changes:
        out.append(with_covariates(out[-1], dict(change.values)))
    return out


def make_stepper(segments: Sequence[Values], schedule: Schedule,
                 labels: Sequence[int] | None = None) -> LinearStepper | NonlinearStepper | SegmentedStepper:
    """The model's stepper, or one per covariate segment behind :class:`SegmentedStepper`
    (``labels``: the sets' numbers in a nonlinear solver's messages)."""
    targets = schedule.targets()
    if segments[0].spec.is_linear:
        steppers: list[Any] = [LinearStepper(v, targets) for v in segments]
    else:
        steppers = [NonlinearStepper(v, targets, labels=labels) for v in segments]
    return steppers[0] if len(steppers) == 1 else SegmentedStepper(steppers)


class SegmentedStepper:
    """One stepper per covariate segment; a switch carries the amounts to the next one.

    A reset afterwards returns to the initial amounts of the segment in force
    (``initial`` expressions evaluated with its covariates).
    """

    def __init__(self, steppers: Sequence[LinearStepper | NonlinearStepper]) -> None:
        self.steppers = list(steppers)
        self.current = self.steppers[0]

    @property
    def x(self) -> np.ndarray:
        return self.current.x

    @property
    def fractions(self) -> Mapping[Target, np.ndarray]:
        return self.current.fractions

    def switch(self, segment: int) -> None:
        x = self.current.x
        self.current = self.steppers[segment]
        self.current.x = x.copy()

    def advance(self, dt: float, inputs: Inputs) -> None:
        self.current.advance(dt, inputs)

    def bolus(self, target: Target, amount: float) -> None:
        self.current.bolus(target, amount)

    def reset(self) -> None:
        self.current.reset()

    def state(self) -> np.ndarray:
        return self.current.state()

    def steady_state(self, dose: Any) -> None:
        self.current.steady_state(dose)


def _outputs(segments: Sequence[Values], schedule: Schedule, times: np.ndarray, amounts: np.ndarray,
             names: list[str]) -> dict[str, np.ndarray]:
    """Outputs (S, T) at each time with the values in force there (a change at τ holds for t > τ);
    ``times`` (T,) shared by the sets or (S, T) each their own."""
    if len(segments) == 1:
        return evaluate_outputs(segments[0], amounts, names)
    which = np.searchsorted([c.time for c in schedule.changes], times, side="left")
    out = {name: np.empty(amounts.shape[:2]) for name in names}
    for j in np.unique(which):
        here = which == j
        if times.ndim == 1:  # shared times: each segment's values on its own columns only
            for name, value in evaluate_outputs(segments[j], amounts[:, here], names).items():
                out[name][:, here] = value
        else:
            for name, value in evaluate_outputs(segments[j], amounts, names).items():
                np.copyto(out[name], value, where=here)
    return out


def _run(stepper: LinearStepper | NonlinearStepper | SegmentedStepper, schedule: Schedule, times: np.ndarray) -> np.ndarray:
    """Amounts (S, T, n) at ``times`` (after the events at each time)."""
    unique, inverse = np.unique(times, return_inverse=True)
    recorded = np.empty((stepper.x.shape[0], unique.size, stepper.x.shape[1]))
    wanted = dict(zip(unique.tolist(), range(unique.size), strict=True))

    def record(t: float, before: np.ndarray, after: np.ndarray, inputs: Inputs) -> None:
        if t in wanted:
            recorded[:, wanted[t]] = after

    walk(stepper, schedule, unique, record)
    return recorded[:, inverse]


def walk(
    stepper: LinearStepper | NonlinearStepper | SegmentedStepper,
    schedule: Schedule,
    times: np.ndarray,
    record: Callable[[float, np.ndarray, np.ndarray, Inputs], None],
) -> None:
    """Advance through every event and time in order, calling ``record`` at each stop.

    ``record(t, before, after, inputs)`` receives the amounts just before and
    just after the events at ``t`` (equal when nothing happens at ``t``) and
    the infusions running from ``t`` on. It is called at every event time and
    every requested time, in increasing order.
    """
    events = expand(schedule)
    # The system starts from its initial state at time 0, whatever the first requested time.
    breakpoints = np.union1d(np.asarray(times, dtype=float), [0.0, *(e.time for e in events)])
    running: dict[int, tuple[Target, float]] = {}
    now, ei = float(breakpoints[0]), 0
    for bp in breakpoints.tolist():
        stepper.advance(bp - now, tuple(running.values()))
        now = bp
        before = stepper.state()
        while ei < len(events) and events[ei].time <= now:
            _apply(stepper, events[ei], running)
            ei += 1
        record(now, before, stepper.state(), tuple(running.values()))


def _apply(stepper: LinearStepper | NonlinearStepper | SegmentedStepper, event: Any,
           running: dict[int, tuple[Target, float]]) -> None:
    if event.kind == COVARIATE:
        if not isinstance(stepper, SegmentedStepper):
            raise ScheduleError("a schedule with covariate changes needs simulate.make_stepper's stepper")
        stepper.switch(event.segment)
    elif event.kind == RESET:
        stepper.reset()
        running.clear()  # NONMEM: a reset also stops infusions in progress
    elif event.kind == STEADY_STATE:
        if event.dose.ss == 1:
            running.clear()
        stepper.steady_state(event.dose)
    elif event.kind == BOLUS:
        stepper.bolus(event.target, event.amount)
    elif event.kind == INFUSION_ON:
        running[event.infusion] = (event.target, event.rate)
    elif event.kind == INFUSION_OFF:
        running.pop(event.infusion, None)
