"""The nonlinear (ODE) path against exact and tight references, tolerance stated per test.

- Michaelis–Menten IV bolus: exact Lambert-W solution
  C(t) = Km·W((C0/Km)·exp((C0 − (Vmax/V)·t)/Km));
- MM constant infusion at steady state: exact C = R·Km/(Vmax − R);
- MM with infusions and repeated doses: piecewise Radau (rtol 1e-12) restarted at each event;
- SS=1 equals the state after many repeated doses;
- a linear model forced through :class:`itpk.ode.NonlinearStepper` equals the exact linear path.
"""

from __future__ import annotations

import copy
import tomllib
from importlib import resources

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.special import lambertw

from itpk import load_model
from itpk.errors import ScheduleError
from itpk.events import Dose, Schedule, Target, regimen
from itpk.simulate import simulate
from itpk.spec import parse_model

RTOL = 1e-7  # the ODE path runs at rtol 1e-10; references are exact or at rtol 1e-12
MM = {"Vmax": 10.0, "Km": 2.0, "V": 50.0}


def mm_bolus_exact(c0: float, t: np.ndarray, vmax: float, km: float, v: float) -> np.ndarray:
    """Concentration after an IV bolus into a one-compartment MM model (Lambert W, principal branch)."""
    arg = (c0 / km) * np.exp((c0 - (vmax / v) * np.asarray(t, float)) / km)
    return km * lambertw(arg).real


@pytest.mark.parametrize("dose", [5.0, 100.0, 2000.0])  # C0 << Km, ~ Km, >> Km
def test_mm_bolus_matches_lambert_w(dose):
    # one_cpt_mm IV bolus, from the saturated to the linear regime: rtol 1e-7
    times = np.array([0.0, 0.1, 1.0, 2.5, 5.0, 10.0, 24.0, 48.0, 72.0])
    conc = simulate(load_model("one_cpt_mm"), regimen("iv", dose), MM, times).outputs["plasma"][0]
    want = mm_bolus_exact(dose / MM["V"], times, **{k.lower(): v for k, v in MM.items()})
    np.testing.assert_allclose(conc, want, rtol=RTOL, atol=1e-14 * dose / MM["V"])


def test_mm_bolus_lambert_w_for_several_parameter_sets():
    # S = 3 parameter sets in one call, each against its Lambert-W solution: rtol 1e-7
    p = {"Vmax": np.array([4.0, 10.0, 25.0]), "Km": np.array([0.5, 2.0, 8.0]), "V": np.array([20.0, 50.0, 80.0])}
    times = np.array([0.0, 1.0, 4.0, 12.0, 30.0])
    conc = simulate(load_model("one_cpt_mm"), regimen("iv", 300.0), p, times).outputs["plasma"]
    for s in range(3):
        want = mm_bolus_exact(300.0 / p["V"][s], times, p["Vmax"][s], p["Km"][s], p["V"][s])
        np.testing.assert_allclose(conc[s], want, rtol=RTOL)


def mm_reference(doses, times, vmax=MM["Vmax"], km=MM["Km"], v=MM["V"]):
    """Amounts of one_cpt_mm by piecewise Radau (rtol 1e-12, atol 1e-14 × scale), restarted at every
    event; boluses apply before observations at the same time. ``doses``: (time, amount, duration)."""
    boluses = [(t, a) for t, a, d in doses if d == 0]
    infusions = [(t, t + d, a / d) for t, a, d in doses if d > 0]
    edges = sorted({0.0, *times, *(b[0] for b in boluses), *(i[0] for i in infusions), *(i[1] for i in infusions)})
    scale = max(a for _, a, _ in doses)
    x, now, out = np.zeros(1), 0.0, {}
    for edge in edges:
        if edge > now:
            u = sum(r for s, e, r in infusions if s <= now < e)
            sol = solve_ivp(lambda _, a: -vmax * (a / v) / (km + a / v) + u, (now, edge), x,
                            method="Radau", rtol=1e-12, atol=1e-14 * scale)
            assert sol.success
            x, now = sol.y[:, -1], edge
        x = x + sum(a for t, a in boluses if t == edge)
        out[edge] = x.copy()
    return np.array([out[t] for t in times])


def test_mm_infusions_and_repeated_doses_match_radau():
    # boluses every 8 h (ADDL), an overlapping infusion, a second infusion: rtol 1e-7
    schedule = Schedule((
        Dose(0.0, 150.0, Target("iv"), ii=8.0, addl=4),
        Dose(3.0, 200.0, Target("iv"), duration=10.0),
        Dose(30.0, 60.0, Target("iv"), rate=30.0),
    ))
    doses = [(8.0 * k, 150.0, 0.0) for k in range(5)] + [(3.0, 200.0, 10.0), (30.0, 60.0, 2.0)]
    times = np.array([0.0, 0.5, 3.0, 5.0, 8.0, 12.9, 13.0, 20.0, 31.0, 32.0, 33.0, 40.0, 60.0])
    got = simulate(load_model("one_cpt_mm"), schedule, MM, times).amounts[0]
    np.testing.assert_allclose(got, mm_reference(doses, times), rtol=RTOL, atol=1e-12 * 200)


@pytest.mark.parametrize(
    "dose",
    [
        Dose(0.0, 40.0, Target("iv"), ii=12.0, ss=1),  # bolus
        Dose(0.0, 40.0, Target("iv"), duration=3.0, ii=12.0, ss=1),  # infusion shorter than II
        Dose(0.0, 40.0, Target("iv"), duration=30.0, ii=12.0, ss=1),  # 2.5 overlapping infusions
    ],
    ids=["bolus", "infusion", "overlapping-infusions"],
)
def test_mm_ss1_equals_state_after_many_repeated_doses(dose):
    # SS=1 at t0 = 5 (after an earlier dose it replaces) vs 80 doses every II, over one interval:
    # rtol 1e-7. 40 per 12 h keeps C near Km (average ~1 mg/L), where the linearised elimination
    # rate Vmax·Km/(V·(Km + C)²) >= 0.04 /h contracts by >= e^{-0.5} per interval, so 80 intervals
    # leave < e^{-40} of the initial error.
    import dataclasses

    ii, t0, n = dose.ii, 5.0, 80
    offsets = np.array([0.0, 0.5, 2.9, 3.0, 6.0, 11.9])
    ss = Schedule((Dose(0.0, 70.0, Target("iv")), dataclasses.replace(dose, time=t0, ii=ii, addl=1)))
    repeated = Schedule((dataclasses.replace(dose, ss=0, addl=n),))
    spec = load_model("one_cpt_mm")
    got = simulate(spec, ss, MM, t0 + offsets).amounts[0]
    want = simulate(spec, repeated, MM, (n - 1) * ii + offsets).amounts[0]
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("rate", [1.0, 5.0, 9.0])
def test_mm_ss1_constant_infusion_is_exact(rate):
    # SS=1, II=0, rate R < Vmax: C = R·Km/(Vmax − R), and it stays there: rtol 1e-7
    schedule = Schedule((Dose(0.0, 500.0, Target("iv")), Dose(4.0, 0.0, Target("iv"), rate=rate, ss=1)))
    conc = simulate(load_model("one_cpt_mm"), schedule, MM, [4.0, 10.0, 100.0]).outputs["plasma"][0]
    np.testing.assert_allclose(conc, rate * MM["Km"] / (MM["Vmax"] - rate), rtol=RTOL)


@pytest.mark.parametrize(
    "dose",
    [
        Dose(0.0, 0.0, Target("iv"), rate=12.0, ss=1),  # R > Vmax: no steady state
        Dose(0.0, 150.0, Target("iv"), ii=12.0, ss=1),  # 150 per 12 h > Vmax·II = 120
        Dose(0.0, 150.0, Target("iv"), duration=30.0, ii=12.0, ss=1),
    ],
    ids=["constant", "bolus", "infusion"],
)
def test_mm_ss_without_steady_state_is_refused(dose):
    # input above the maximal elimination rate accumulates without bound: ScheduleError
    with pytest.raises(ScheduleError, match="no steady state was found"):
        simulate(load_model("one_cpt_mm"), Schedule((dose,)), MM, [0.0, 1.0])


def nonlinear_copy(name: str):
    """A built-in linear model with an explicit ODE term of 0 on central: same system, nonlinear path."""
    raw = tomllib.loads((resources.files("itpk.models") / f"{name}.toml").read_text(encoding="utf-8"))
    raw = copy.deepcopy(raw)
    raw["odes"] = {"central": "0"}
    return parse_model(raw)


@pytest.mark.parametrize(
    ("name", "params", "schedule"),
    [
        (
            "two_cpt_iv",
            {"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0},
            Schedule((
                Dose(0.0, 100.0, Target("iv"), ii=12.0, addl=2),
                Dose(5.0, 80.0, Target("iv"), duration=4.0),
                Dose(40.0, 60.0, Target("iv"), duration=10.0, ii=4.0, ss=1),
            ), resets=(30.0,)),
        ),
        (
            "two_cpt_oral",
            {"ka": 0.83, "CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0, "F": 0.62},
            Schedule((
                Dose(0.0, 100.0, Target("po"), ii=8.0, ss=1, addl=3),
                Dose(10.0, 50.0, Target("iv"), rate=25.0),
                Dose(20.0, 30.0, Target("peripheral", compartment=True), reset=True),
            )),
        ),
    ],
    ids=["two_cpt_iv", "two_cpt_oral"],
)
def test_linear_model_through_nonlinear_stepper_matches_exact_path(name, params, schedule):
    # same dynamics solved by LSODA (via an [odes] term of 0) and by matrix exponentials,
    # including SS=1 (bolus and overlapping infusions), resets and ADDL: rtol 1e-7
    linear, nonlinear = load_model(name), nonlinear_copy(name)
    assert linear.is_linear and not nonlinear.is_linear
    times = np.array([0.0, 0.5, 3.0, 5.0, 9.0, 12.0, 20.0, 29.0, 30.0, 35.0, 40.0, 41.0, 46.0, 60.0])
    got = simulate(nonlinear, schedule, params, times).amounts[0]
    want = simulate(linear, schedule, params, times).amounts[0]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-12 * 100)
