"""Property tests of the event engine and the exact linear solver on random dosing histories.

Random histories mix boluses and infusions (by rate or by duration), routes and direct
compartment doses, II/ADDL, SS=1/2 and resets (EVID 3 and 4), on linear built-in models with
random parameters. Properties, tolerance stated in each test:

- amounts are never negative;
- superposition: simulate(A + B) == simulate(A) + simulate(B) (no resets, no SS);
- dose scaling: multiplying every amount (and rate) by c multiplies every amount by c.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from itpk import load_model
from itpk.events import Dose, Schedule, Target
from itpk.simulate import simulate

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODELS = {
    "one_cpt_iv": ({"CL": 4.2, "V": 33.0}, ("iv",), ("central",)),
    "one_cpt_oral": ({"ka": 1.1, "CL": 4.2, "V": 33.0, "F": 0.7}, ("po", "sc", "iv"), ("depot", "central")),
    "two_cpt_oral": (
        {"ka": 0.83, "CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0, "F": 0.62},
        ("po", "iv"),
        ("depot", "central", "peripheral"),
    ),
    "three_cpt_iv": (
        {"CL": 2.9, "V1": 9.5, "Q2": 14.0, "V2": 31.0, "Q3": 1.3, "V3": 140.0},
        ("iv",),
        ("central", "peripheral", "peripheral2"),
    ),
}
GRID = np.linspace(0.0, 120.0, 31)
# Times from a coarse grid (so doses, infusion ends and observations often coincide) or anywhere.
TIME = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 24.0]), st.floats(0.0, 48.0))


@cache
def spec(name):
    return load_model(name)


@st.composite
def model_and_params(draw):
    """A linear model and its parameters, each scaled by 10^U(-1, 1)."""
    name = draw(st.sampled_from(sorted(MODELS)))
    base, routes, compartments = MODELS[name]
    params = {}
    for k, v in base.items():
        if k == "F":
            params[k] = draw(st.floats(0.05, 1.0))
        else:
            params[k] = v * 10 ** draw(st.floats(-1.0, 1.0))
    targets = [Target(r) for r in routes] + [Target(c, compartment=True) for c in compartments]
    return name, params, targets


@st.composite
def dose(draw, targets, *, special: bool):
    """One dose record. ``special`` allows SS=1/2 and EVID 4 (reset=True)."""
    time = draw(TIME)
    amount = draw(st.floats(0.1, 1000.0))
    target = draw(st.sampled_from(targets))
    kind = draw(st.sampled_from(["bolus", "rate", "duration"]))
    duration = draw(st.floats(0.1, 30.0))
    addl = draw(st.integers(0, 4))
    ii = draw(st.sampled_from([1.5, 4.0, 6.0, 8.0, 12.0, 24.0])) if addl else 0.0
    ss = draw(st.sampled_from([0, 0, 1, 2])) if special else 0
    if ss and ii == 0:
        ii = draw(st.sampled_from([4.0, 12.0, 24.0]))
    reset = draw(st.booleans()) if special else False
    if special and ss and kind == "rate" and draw(st.integers(0, 4)) == 0:
        # SS constant infusion (II = 0, amount ignored)
        return Dose(time, 0.0, target, rate=amount / duration, ss=ss, reset=reset)
    if kind == "bolus":
        return Dose(time, amount, target, ii=ii, addl=addl, ss=ss, reset=reset)
    if kind == "rate":
        return Dose(time, amount, target, rate=amount / duration, ii=ii, addl=addl, ss=ss, reset=reset)
    return Dose(time, amount, target, duration=duration, ii=ii, addl=addl, ss=ss, reset=reset)


@st.composite
def history(draw, *, special: bool):
    """(model name, params, schedule): 1–5 doses; with ``special``, SS/EVID 4 doses and 0–2 resets."""
    name, params, targets = draw(model_and_params())
    doses = tuple(draw(st.lists(dose(targets, special=special), min_size=1, max_size=5)))
    resets = tuple(draw(st.lists(TIME, max_size=2))) if special else ()
    return name, params, Schedule(doses, resets)


def times_for(schedule):
    """A fixed grid plus every dose time and reset time (values at an event are post-event)."""
    return np.unique(np.r_[GRID, list(schedule.dose_times()), list(schedule.resets)])


def dose_scale(schedule):
    return max(d.amount if d.amount > 0 else d.infusion_rate for d in schedule.doses)


def scaled(schedule, c):
    """Every amount and rate multiplied by c (durations unchanged)."""
    return dataclasses.replace(
        schedule, doses=tuple(dataclasses.replace(d, amount=d.amount * c, rate=d.rate * c) for d in schedule.doses)
    )


@SETTINGS
@given(history(special=True))
def test_amounts_are_never_negative(case):
    # linear models, any history (SS, resets, EVID 4, overlapping infusions): amounts >= -1e-12·scale
    name, params, schedule = case
    amounts = simulate(spec(name), schedule, params, times_for(schedule)).amounts
    assert np.all(np.isfinite(amounts))
    scale = max(dose_scale(schedule), float(np.abs(amounts).max()))
    assert amounts.min() >= -1e-12 * scale, (schedule, amounts.min())


@SETTINGS
@given(history(special=False), st.data())
def test_superposition_of_two_histories(case, data):
    # linear models, no resets and no SS: simulate(A + B) == simulate(A) + simulate(B),
    # rtol 1e-9, atol 1e-12 × dose scale
    name, params, a = case
    targets = [Target(r) for r in MODELS[name][1]] + [Target(c, compartment=True) for c in MODELS[name][2]]
    b = Schedule(tuple(data.draw(st.lists(dose(targets, special=False), min_size=1, max_size=4))))
    both = Schedule(a.doses + b.doses)
    times = times_for(both)
    got = simulate(spec(name), both, params, times).amounts
    want = simulate(spec(name), a, params, times).amounts + simulate(spec(name), b, params, times).amounts
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * dose_scale(both))


@SETTINGS
@given(history(special=True), st.floats(1e-3, 1e3))
def test_dose_scaling_is_linear(case, c):
    # linear models, any history (resets and SS included: the state is linear in the doses):
    # amounts(c·doses) == c·amounts(doses), rtol 1e-9, atol 1e-12 × c × dose scale
    name, params, schedule = case
    times = times_for(schedule)
    base = simulate(spec(name), schedule, params, times).amounts
    got = simulate(spec(name), scaled(schedule, c), params, times).amounts
    np.testing.assert_allclose(got, c * base, rtol=1e-9, atol=1e-12 * c * max(dose_scale(schedule), np.abs(base).max()))
