"""Exact linear solutions against independent references, tolerance stated per test.

References are written from first principles, never with ``expm``:

- closed forms for mammillary models (Bertrand & Mentré 2008): the disposition
  rates λ_i are the eigenvalues of the micro-constant system, computed with the
  quadratic / trigonometric cubic formula; the unit impulse response of the
  central amount is Σ A_i e^{-λ_i t} with
  A_i = Π_j (k_j1 − λ_i) / Π_{m≠i} (λ_m − λ_i), and of peripheral j
  k_1j Σ Π_{l≠j} (k_l1 − λ_i) / Π_{m≠i} (λ_m − λ_i) e^{-λ_i t};
  infusions and first-order absorption are the convolutions of those
  exponentials, repeated doses and steady states their superposition;
- Torsten's published one-compartment table;
- ``scipy.integrate.solve_ivp`` (DOP853, rtol 1e-12, atol 1e-14) on random
  in-memory linear models, restarted at every event.
"""

from __future__ import annotations

import copy
import math
import tomllib
from importlib import resources

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from itpk import load_model
from itpk.events import Dose, Schedule, Target, regimen
from itpk.linear import auc_infinity
from itpk.simulate import simulate
from itpk.spec import parse_model
from itpk.system import rate_matrix, resolve

RTOL = 1e-8  # closed-form references
ATOL_REL = 1e-12  # absolute tolerance, as a fraction of the dose scale

P1 = {"CL": 4.2, "V": 33.0}
P2 = {"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}
P3 = {"CL": 2.9, "V1": 9.5, "Q2": 14.0, "V2": 31.0, "Q3": 1.3, "V3": 140.0}
KA, F = 0.83, 0.62
TIMES = np.array([0.0, 0.05, 0.5, 1.0, 1.7, 2.0, 3.5, 6.0, 11.9, 12.0, 24.0, 30.5, 48.0, 96.0])


# -- closed forms -------------------------------------------------------------------


def micro(model: str, p: dict) -> tuple[float, list[tuple[float, float]]]:
    """k10 and the (k1j, kj1) pairs of each peripheral compartment, 1/h."""
    if model == "one":
        return p["CL"] / p["V"], []
    if model == "two":
        return p["CL"] / p["V1"], [(p["Q"] / p["V1"], p["Q"] / p["V2"])]
    return p["CL"] / p["V1"], [(p["Q2"] / p["V1"], p["Q2"] / p["V2"]), (p["Q3"] / p["V1"], p["Q3"] / p["V3"])]


def disposition_rates(k10: float, periph: list[tuple[float, float]]) -> np.ndarray:
    """λ_i > 0, closed-form roots of the characteristic polynomial (Bertrand & Mentré 2008)."""
    if not periph:
        return np.array([k10])
    if len(periph) == 1:
        (k12, k21), = periph
        a1, a0 = k10 + k12 + k21, k10 * k21
        disc = math.sqrt(a1 * a1 - 4.0 * a0)
        return np.array([(a1 + disc) / 2.0, (a1 - disc) / 2.0])
    (k12, k21), (k13, k31) = periph
    a0 = k10 * k21 * k31
    a1 = k10 * k31 + k21 * k31 + k21 * k13 + k10 * k21 + k31 * k12
    a2 = k10 + k12 + k13 + k21 + k31
    p = a1 - a2 * a2 / 3.0
    q = 2.0 * a2**3 / 27.0 - a1 * a2 / 3.0 + a0
    r1 = math.sqrt(-(p**3) / 27.0)
    phi = math.acos(-q / (2.0 * r1)) / 3.0
    r2 = 2.0 * math.exp(math.log(r1) / 3.0)
    return np.array([-(math.cos(phi + k * 2.0 * math.pi / 3.0) * r2 - a2 / 3.0) for k in range(3)])


def disposition(model: str, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """(λ (m,), coefficients (1 + peripherals, m)): amounts per unit amount put in central."""
    k10, periph = micro(model, p)
    lam = disposition_rates(k10, periph)
    coef = np.zeros((1 + len(periph), lam.size))
    for i, li in enumerate(lam):
        denom = math.prod(lm - li for m, lm in enumerate(lam) if m != i)
        coef[0, i] = math.prod(kj1 - li for _, kj1 in periph) / denom
        for j, (k1j, _) in enumerate(periph):
            coef[1 + j, i] = k1j * math.prod(kl1 - li for l, (_, kl1) in enumerate(periph) if l != j) / denom
    return lam, coef


def bolus_amounts(lam, coef, dose, t):
    """Amounts (T, n) after a bolus into central at time 0 (zero before; post-dose at 0)."""
    t = np.asarray(t, float)[:, None]
    e = np.where(t >= 0, np.exp(-lam * np.maximum(t, 0.0)), 0.0)
    return dose * e @ coef.T


def infusion_amounts(lam, coef, rate, duration, t):
    """Amounts (T, n) of a zero-order infusion started at 0: R/λ (1 − e^{-λ min(t,D)}) e^{-λ max(t−D,0)}."""
    t = np.maximum(np.asarray(t, float)[:, None], 0.0)
    g = -np.expm1(-lam * np.minimum(t, duration)) * np.exp(-lam * np.maximum(t - duration, 0.0)) / lam
    return rate * g @ coef.T


def oral_amounts(lam, coef, ka, dose, t):
    """Amounts (T, 1 + n) [depot, disposition...] after ``dose`` (already × F) into the depot at 0."""
    t = np.asarray(t, float)[:, None]
    tt = np.maximum(t, 0.0)
    on = t >= 0
    body = np.where(on, (np.exp(-lam * tt) - np.exp(-ka * tt)) / (ka - lam), 0.0)
    depot = np.where(on, dose * np.exp(-ka * tt), 0.0)
    return np.hstack([depot, dose * ka * body @ coef.T])


def with_depot(x):
    """Prefix a zero depot column to disposition amounts."""
    return np.hstack([np.zeros((x.shape[0], 1)), x])


def check(got, want, scale, rtol=RTOL):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=ATOL_REL * scale)


def sim(model, schedule, params, times=TIMES):
    return simulate(load_model(model), schedule, params, times).amounts[0]


# -- sanity of the reference itself -----------------------------------------------------


@pytest.mark.parametrize(("model", "p"), [("one", P1), ("two", P2), ("three", P3)])
def test_closed_form_rates_are_the_micro_constant_eigenvalues(model, p):
    # The closed-form roots solve the characteristic polynomial: rtol 1e-12 against its roots.
    k10, periph = micro(model, p)
    lam = np.sort(disposition_rates(k10, periph))
    # det(λI + K) = 0 with K the micro-constant matrix, written out by hand
    n = 1 + len(periph)
    K = np.zeros((n, n))
    K[0, 0] = -k10 - sum(k1j for k1j, _ in periph)
    for j, (k1j, kj1) in enumerate(periph, start=1):
        K[j, 0], K[0, j], K[j, j] = k1j, kj1, -kj1
    poly = np.poly(K)  # coefficients of det(zI - K)
    np.testing.assert_allclose(np.sort(-np.roots(poly).real), lam, rtol=1e-12)
    # the central impulse response starts at 1 and peripherals at 0
    _, coef = disposition(model, p)
    np.testing.assert_allclose(coef.sum(axis=1), [1.0] + [0.0] * len(periph), atol=1e-12)


# -- single doses -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "model", "p"), [("one_cpt_iv", "one", P1), ("two_cpt_iv", "two", P2), ("three_cpt_iv", "three", P3)])
def test_iv_bolus_matches_closed_form(name, model, p):
    # every compartment amount, rtol 1e-8, atol 1e-12 × dose
    lam, coef = disposition(model, p)
    dose = 250.0
    got = sim(name, regimen("iv", dose), p)
    check(got, bolus_amounts(lam, coef, dose, TIMES), dose)
    # and the concentration output
    v = p.get("V", p.get("V1"))
    conc = simulate(load_model(name), regimen("iv", dose), p, TIMES).outputs["plasma"][0]
    check(conc, bolus_amounts(lam, coef, dose, TIMES)[:, 0] / v, dose / v)


@pytest.mark.parametrize(("name", "model", "p"), [("one_cpt_iv", "one", P1), ("two_cpt_iv", "two", P2), ("three_cpt_iv", "three", P3)])
def test_iv_infusion_during_and_after_matches_closed_form(name, model, p):
    # zero-order infusion of 300 over 2.5 h, sampled during (0.05..2) and after (3.5..96): rtol 1e-8
    lam, coef = disposition(model, p)
    dose, duration = 300.0, 2.5
    times = np.sort(np.r_[TIMES, duration])
    got = sim(name, regimen("iv", dose, infusion=duration), p, times)
    check(got, infusion_amounts(lam, coef, dose / duration, duration, times), dose)


@pytest.mark.parametrize(("name", "model", "p"), [("one_cpt_oral", "one", {**P1, "ka": KA, "F": F}),
                                                   ("two_cpt_oral", "two", {**P2, "ka": KA, "F": F})])
@pytest.mark.parametrize("bioavailability", [1.0, F])
def test_first_order_absorption_matches_closed_form(name, model, p, bioavailability):
    # oral dose with F (1 and 0.62), depot and disposition amounts: rtol 1e-8
    p = {**p, "F": bioavailability}
    disp = {k: v for k, v in p.items() if k not in ("ka", "F")}
    lam, coef = disposition(model, disp)
    dose = 400.0
    got = sim(name, regimen("po", dose), p)
    check(got, oral_amounts(lam, coef, KA, bioavailability * dose, TIMES), dose)


def test_torsten_one_compartment_table():
    # Torsten's one-compartment test: CL 10, V 80, ka 1.2, 1000 into the depot: rtol 1e-6
    p = {"CL": 10.0, "V": 80.0, "ka": 1.2}
    for target in (Target("depot", compartment=True), Target("po")):
        got = simulate(load_model("one_cpt_oral"), Schedule((Dose(0.0, 1000.0, target),)), p, [0.25]).amounts[0, 0]
        np.testing.assert_allclose(got, [740.8182, 254.97490], rtol=1e-6)


# -- repeated doses (superposition of the closed form) ------------------------------


@pytest.mark.parametrize(("name", "model", "p"), [("two_cpt_iv", "two", P2), ("three_cpt_iv", "three", P3)])
def test_repeated_bolus_is_superposition(name, model, p):
    # 5 doses every 12 h (II/ADDL): sum of shifted closed forms, rtol 1e-8
    lam, coef = disposition(model, p)
    dose, ii = 100.0, 12.0
    got = sim(name, regimen("iv", dose, every=ii, doses=5), p)
    want = sum(bolus_amounts(lam, coef, dose, TIMES - k * ii) for k in range(5))
    check(got, want, dose)


def test_repeated_oral_with_bioavailability_is_superposition():
    # two_cpt_oral, 4 doses every 8 h, F 0.62: rtol 1e-8
    p = {**P2, "ka": KA, "F": F}
    lam, coef = disposition("two", P2)
    dose, ii = 80.0, 8.0
    got = sim("two_cpt_oral", regimen("po", dose, every=ii, doses=4), p)
    want = sum(oral_amounts(lam, coef, KA, F * dose, TIMES - k * ii) for k in range(4))
    check(got, want, dose)


def test_addl_with_infusions_is_superposition():
    # ADDL infusions (1.5 h every 6 h, 6 doses) into three_cpt_iv: rtol 1e-8
    lam, coef = disposition("three", P3)
    dose, ii, duration = 60.0, 6.0, 1.5
    schedule = Schedule((Dose(1.0, dose, Target("iv"), duration=duration, ii=ii, addl=5),))
    times = np.sort(np.r_[TIMES, 1.0 + 5 * ii + duration, 2.5])
    got = sim("three_cpt_iv", schedule, P3, times)
    want = sum(infusion_amounts(lam, coef, dose / duration, duration, times - 1.0 - k * ii) for k in range(6))
    check(got, want, dose)


# -- steady state -----------------------------------------------------------------------


def ss_bolus_amounts(lam, coef, dose, ii, t):
    """Closed-form SS=1 bolus (accumulation factor 1/(1 − e^{-λ·II})), valid for every t >= 0
    after the steady-state dose when no further dose follows (Σ_k e^{-λ(t + k·II)})."""
    t = np.asarray(t, float)[:, None]
    return dose * (np.exp(-lam * t) / -np.expm1(-lam * ii)) @ coef.T


def ss_oral_amounts(lam, coef, ka, dose, ii, t):
    t = np.asarray(t, float)[:, None]
    acc = lambda r: np.exp(-r * t) / -np.expm1(-r * ii)  # noqa: E731
    depot = dose * acc(ka)
    body = (acc(lam) - acc(ka)) / (ka - lam)
    return np.hstack([depot, dose * ka * body @ coef.T])


def ss_infusion_short_amounts(lam, coef, rate, duration, ii, t):
    """Closed-form SS=1 infusion with duration <= II: the current infusion plus the geometric tail
    of the earlier ones, each (1 − e^{-λD}) e^{-λ(t + k·II − D)}, k >= 1."""
    t = np.asarray(t, float)[:, None]
    current = -np.expm1(-lam * np.minimum(t, duration)) * np.exp(-lam * np.maximum(t - duration, 0.0))
    tail = -np.expm1(-lam * duration) * np.exp(-lam * (t + ii - duration)) / -np.expm1(-lam * ii)
    return rate * ((current + tail) / lam) @ coef.T


def repeated_infusions_to_convergence(lam, coef, rate, duration, ii, t):
    """Σ_k of single closed-form infusions started at −k·II, k = 0..N, with N large enough that
    the neglected tail is below 1e-18 of the sum (the slowest mode has decayed by e^{-42})."""
    n = int(math.ceil((42.0 / lam.min() + duration) / ii)) + 1
    return sum(infusion_amounts(lam, coef, rate, duration, np.asarray(t) + k * ii) for k in range(n))


@pytest.mark.parametrize(("name", "model", "p"), [("one_cpt_iv", "one", P1), ("two_cpt_iv", "two", P2), ("three_cpt_iv", "three", P3)])
def test_ss1_bolus_matches_accumulation_factor(name, model, p):
    # SS=1 bolus every 12 h at t0 = 20 after an earlier dose (SS=1 replaces the state): rtol 1e-8
    lam, coef = disposition(model, p)
    dose, ii, t0 = 150.0, 12.0, 20.0
    schedule = Schedule((Dose(0.0, 500.0, Target("iv")), Dose(t0, dose, Target("iv"), ii=ii, ss=1)))
    times = t0 + np.array([0.0, 0.3, 3.0, 11.99, 12.0, 30.0, 70.0])
    got = sim(name, schedule, p, times)
    check(got, ss_bolus_amounts(lam, coef, dose, ii, times - t0), dose)


def test_ss1_bolus_with_addl_continues_the_regimen():
    # SS=1 with ADDL=3: steady state stays periodic for the next 4 intervals: rtol 1e-8
    lam, coef = disposition("two", P2)
    dose, ii = 150.0, 12.0
    schedule = Schedule((Dose(0.0, dose, Target("iv"), ii=ii, addl=3, ss=1),))
    times = np.array([0.0, 5.0, 12.0, 17.0, 24.0, 41.0, 47.9])
    got = sim("two_cpt_iv", schedule, P2, times)
    check(got, ss_bolus_amounts(lam, coef, dose, ii, times % ii), dose)


def test_ss1_oral_matches_accumulation_factor():
    # SS=1 oral dose with F = 0.62 (two_cpt_oral), depot included: rtol 1e-8
    p = {**P2, "ka": KA, "F": F}
    lam, coef = disposition("two", P2)
    dose, ii = 120.0, 8.0
    got = sim("two_cpt_oral", Schedule((Dose(0.0, dose, Target("po"), ii=ii, ss=1),)), p)
    check(got, ss_oral_amounts(lam, coef, KA, F * dose, ii, TIMES), dose)


@pytest.mark.parametrize(("name", "model", "p"), [("one_cpt_iv", "one", P1), ("two_cpt_iv", "two", P2), ("three_cpt_iv", "three", P3)])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_ss1_infusion_shorter_than_ii_matches_closed_form(name, model, p, fraction):
    # SS=1 infusion with duration = fraction × II (<= II): rtol 1e-8, during and after the infusion
    lam, coef = disposition(model, p)
    dose, ii, t0 = 200.0, 12.0, 5.0
    duration = fraction * ii
    schedule = Schedule((Dose(t0, dose, Target("iv"), duration=duration, ii=ii, ss=1),))
    times = t0 + np.array([0.0, 0.5, duration, 6.0, 11.0, 12.0, 20.0, 50.0])
    got = sim(name, schedule, p, times)
    want = ss_infusion_short_amounts(lam, coef, dose / duration, duration, ii, times - t0)
    check(got, want, dose)
    # the closed form agrees with repeated dosing run to convergence (checks the reference)
    check(want, repeated_infusions_to_convergence(lam, coef, dose / duration, duration, ii, times - t0), dose, rtol=1e-12)


@pytest.mark.parametrize(("name", "model", "p"), [("one_cpt_iv", "one", P1), ("two_cpt_iv", "two", P2), ("three_cpt_iv", "three", P3)])
@pytest.mark.parametrize("overlap", [2.5, 2.0, 1.3])
def test_ss1_overlapping_infusions_match_repeated_dosing(name, model, p, overlap):
    # SS=1 infusion with duration = overlap × II (> II: 2–3 infusions run at once), against
    # the closed-form repeated regimen summed to convergence: rtol 1e-8
    lam, coef = disposition(model, p)
    dose, ii, t0 = 200.0, 4.0, 3.0
    duration = overlap * ii
    rate = dose / duration
    schedule = Schedule((Dose(t0, dose, Target("iv"), rate=rate, ii=ii, ss=1),))
    times = t0 + np.array([0.0, 0.5, 1.0, 2.0, 3.9, 4.0, 5.2, 8.0, duration, 11.0, 25.0, 60.0])
    got = sim(name, schedule, p, times)
    check(got, repeated_infusions_to_convergence(lam, coef, rate, duration, ii, times - t0), dose)


def test_ss1_overlapping_infusions_with_addl_stay_periodic():
    # SS=1 infusion (D = 2.5·II) with ADDL=3: the next 4 intervals repeat the steady-state
    # profile (phantom and new infusions overlap), then the regimen washes out: rtol 1e-8
    lam, coef = disposition("two", P2)
    dose, ii, duration = 90.0, 6.0, 15.0
    schedule = Schedule((Dose(0.0, dose, Target("iv"), duration=duration, ii=ii, addl=3, ss=1),))
    times = np.array([0.0, 1.0, 5.0, 6.0, 9.0, 12.5, 17.9, 18.0, 23.0, 30.0, 33.0, 40.0, 60.0])
    got = sim("two_cpt_iv", schedule, P2, times)
    periodic = repeated_infusions_to_convergence(lam, coef, dose / duration, duration, ii, times % ii)
    inside = times < 4 * ii
    check(got[inside], periodic[inside], dose)
    # after the last dose (t = 18): every infusion started at 18 − k·II, k >= 0
    after = ~inside
    check(got[after], repeated_infusions_to_convergence(lam, coef, dose / duration, duration, ii, times[after] - 18.0), dose)


@pytest.mark.parametrize(("name", "model", "p"), [("one_cpt_iv", "one", P1), ("two_cpt_iv", "two", P2), ("three_cpt_iv", "three", P3)])
def test_ss1_constant_infusion_gives_rate_over_clearance(name, model, p):
    # SS=1, II=0, rate>0: C = R/CL in central, peripherals at equilibrium (A_j = A_1 k1j/kj1),
    # unchanged afterwards, even after an earlier bolus (replaced): rtol 1e-8
    rate, t0 = 7.5, 2.0
    schedule = Schedule((Dose(0.0, 300.0, Target("iv")), Dose(t0, 0.0, Target("iv"), rate=rate, ss=1)))
    times = np.array([t0, t0 + 1.0, t0 + 100.0])
    prof = simulate(load_model(name), schedule, p, times)
    _, periph = micro(model, p)
    conc = rate / p["CL"]
    check(prof.outputs["plasma"][0], np.full(3, conc), conc)
    central = prof.amounts[0, :, 0]
    for j, (k1j, kj1) in enumerate(periph, start=1):
        check(prof.amounts[0, :, j], central * k1j / kj1, conc)


def test_ss2_adds_steady_state_to_existing_state():
    # SS=2 bolus at t0: state = (earlier dose decayed) + closed-form steady state: rtol 1e-8
    lam, coef = disposition("two", P2)
    dose, ii, t0 = 150.0, 12.0, 10.0
    schedule = Schedule((Dose(0.0, 500.0, Target("iv")), Dose(t0, dose, Target("iv"), ii=ii, ss=2)))
    times = np.array([0.0, 5.0, t0, t0 + 3.0, t0 + 30.0])
    got = sim("two_cpt_iv", schedule, P2, times)
    want = bolus_amounts(lam, coef, 500.0, times) + np.where(
        (times >= t0)[:, None], ss_bolus_amounts(lam, coef, dose, ii, np.maximum(times - t0, 0.0)), 0.0
    )
    check(got, want, 500.0)


def test_ss2_infusion_adds_steady_state_and_keeps_running_infusions():
    # SS=2 infusion (D = 1.5 II) on top of an earlier, still running infusion: rtol 1e-8
    lam, coef = disposition("two", P2)
    ii, t0, dose = 6.0, 4.0, 90.0
    duration = 1.5 * ii
    schedule = Schedule((
        Dose(0.0, 100.0, Target("iv"), duration=10.0),
        Dose(t0, dose, Target("iv"), duration=duration, ii=ii, ss=2),
    ))
    times = np.array([1.0, t0, t0 + 1.0, t0 + 3.0, 10.0, t0 + duration, 30.0])
    got = sim("two_cpt_iv", schedule, P2, times)
    first = infusion_amounts(lam, coef, 10.0, 10.0, times)
    ss = np.where((times >= t0)[:, None], repeated_infusions_to_convergence(lam, coef, dose / duration, duration, ii, times - t0), 0.0)
    check(got, first + ss, dose)


# -- expm solution vs a tight ODE solver on random linear systems -----------------------


def random_linear_model(rng: np.random.Generator):
    """An in-memory linear model: 2–5 compartments, random flows (rate constants 1e-2..1e1 /h),
    elimination from at least one compartment, a single-compartment route and a split route."""
    n = int(rng.integers(2, 6))
    names = [f"c{i}" for i in range(n)]
    params, flows, K = {}, {}, np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j and rng.random() < 0.5:
                k = float(10 ** rng.uniform(-2, 1))
                params[f"k{i}{j}"] = {"value": k, "unit": "1/h"}
                flows[f"c{i} -> c{j}"] = f"k{i}{j}"
                K[i, i] -= k
                K[j, i] += k
    eliminating = [i for i in range(n) if rng.random() < 0.5] or [int(rng.integers(n))]
    for i in eliminating:
        k = float(10 ** rng.uniform(-2, 1))
        params[f"ke{i}"] = {"value": k, "unit": "1/h"}
        flows[f"c{i} -> out"] = f"ke{i}"
        K[i, i] -= k
    split = rng.choice(n, size=2, replace=False)
    fractions = (0.3, 0.55)
    raw = {
        "name": "random_linear",
        "time_unit": "h",
        "compartments": {c: {"amount_unit": "mg"} for c in names},
        "parameters": params or {"unused": {"value": 1.0, "unit": "1"}},
        "flows": flows,
        "routes": {
            "r0": {"into": {"c0": 1}},
            "split": {"into": {names[split[0]]: fractions[0], names[split[1]]: fractions[1]}},
        },
        "outputs": {"total": {"expr": " + ".join(names), "unit": "mg"}},
    }
    route_fractions = {"r0": np.eye(n)[0], "split": fractions[0] * np.eye(n)[split[0]] + fractions[1] * np.eye(n)[split[1]]}
    return parse_model(raw), K, route_fractions


def ode_reference(K, doses, times):
    """Piecewise DOP853 (rtol 1e-12, atol 1e-14 × scale) restarted at every event; boluses before
    observations at equal times. ``doses``: (time, amount, fraction vector, duration)."""
    boluses = [(t, a * f) for t, a, f, d in doses if d == 0]
    infusions = [(t, t + d, a / d * f) for t, a, f, d in doses if d > 0]
    edges = sorted({0.0, *times, *(b[0] for b in boluses), *(i[0] for i in infusions), *(i[1] for i in infusions)})
    scale = max(a for _, a, _, _ in doses)
    x, now, out = np.zeros(K.shape[0]), 0.0, {}
    for edge in edges:
        if edge > now:
            u = sum((r for s, e, r in infusions if s <= now < e), np.zeros_like(x))
            sol = solve_ivp(lambda _, y: K @ y + u, (now, edge), x, method="DOP853", rtol=1e-12, atol=1e-14 * scale)
            assert sol.success
            x, now = sol.y[:, -1], edge
        for t, b in boluses:
            if t == edge:
                x = x + b
        out[edge] = x.copy()
    return np.array([out[t] for t in times])


@pytest.mark.parametrize("seed", range(8))
def test_expm_matches_solve_ivp_on_random_linear_systems(seed):
    # random 2–5 compartment systems, boluses and infusions via routes and compartments: rtol 1e-10,
    # atol 1e-12 × dose scale (the reference is DOP853 at rtol 1e-12)
    rng = np.random.default_rng(seed)
    spec, K, route_fractions = random_linear_model(rng)
    n = K.shape[0]
    doses, records = [], []
    for _ in range(int(rng.integers(3, 7))):
        t = float(np.round(rng.uniform(0, 20), 2))
        amount = float(10 ** rng.uniform(0, 3))
        kind = rng.integers(3)
        if kind == 0:
            target, frac = Target("r0"), route_fractions["r0"]
        elif kind == 1:
            target, frac = Target("split"), route_fractions["split"]
        else:
            c = int(rng.integers(n))
            target, frac = Target(f"c{c}", compartment=True), np.eye(n)[c]
        duration = float(np.round(rng.uniform(0.2, 8), 2)) if rng.random() < 0.5 else 0.0
        records.append(Dose(t, amount, target, duration=duration))
        doses.append((t, amount, frac, duration))
    times = np.unique(np.r_[np.round(rng.uniform(0, 30, 12), 2), [d[0] for d in doses], 30.0])
    got = simulate(spec, Schedule(tuple(records)), None, times).amounts[0]
    want = ode_reference(K, doses, times)
    scale = max(d[1] for d in doses)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * scale)


# -- mass balance ----------------------------------------------------------------------


def accumulator_model():
    """two_cpt_oral with elimination routed into an 'eliminated' compartment."""
    raw = tomllib.loads((resources.files("itpk.models") / "two_cpt_oral.toml").read_text(encoding="utf-8"))
    raw = copy.deepcopy(raw)
    raw["compartments"]["eliminated"] = {"amount_unit": "mg", "description": "cumulative amount eliminated"}
    raw["flows"].pop("central -> out")
    raw["flows"]["central -> eliminated"] = "CL / V1"
    return parse_model(raw)


def test_mass_balance_amount_in_system_plus_eliminated_equals_dose_given():
    # Σ amounts (including the eliminated accumulator) == F·oral + IV boluses + infused so far:
    # rtol 1e-10, atol 1e-12 × dose
    spec = accumulator_model()
    p = {**P2, "ka": KA, "F": F}
    schedule = Schedule((
        Dose(0.0, 100.0, Target("po"), ii=12.0, addl=3),
        Dose(3.0, 50.0, Target("iv")),
        Dose(5.0, 80.0, Target("iv"), duration=4.0),
        Dose(6.0, 30.0, Target("central", compartment=True), rate=10.0),
    ))
    times = np.linspace(0.0, 72.0, 145)
    total = simulate(spec, schedule, p, times).amounts[0].sum(axis=1)
    oral = F * 100.0 * np.sum([times >= t for t in (0.0, 12.0, 24.0, 36.0)], axis=0)
    infused = 20.0 * np.clip(times - 5.0, 0, 4.0) + 10.0 * np.clip(times - 6.0, 0, 3.0)
    given = oral + 50.0 * (times >= 3.0) + infused
    np.testing.assert_allclose(total, given, rtol=1e-10, atol=1e-12 * 400)
    # and the eliminated amount matches ∫ CL·C dt of the closed form for an IV bolus
    lam, coef = disposition("two", P2)
    got = simulate(spec, regimen("iv", 100.0), p, [0.0, 5.0, 1e4]).amounts[0, :, 3]
    k10 = P2["CL"] / P2["V1"]
    want = 100.0 * k10 * (coef[0] / lam * -np.expm1(-np.outer([0.0, 5.0, 1e4], lam))).sum(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * 100)
    np.testing.assert_allclose(got[-1], 100.0, rtol=1e-10)


@pytest.mark.parametrize(("name", "model", "p"), [("one_cpt_iv", "one", P1), ("two_cpt_iv", "two", P2), ("three_cpt_iv", "three", P3)])
def test_auc_infinity_matches_closed_form(name, model, p):
    # AUC(0..inf) of every amount after a bolus: Σ A_i/λ_i; CL·AUC_C == dose: rtol 1e-10
    lam, coef = disposition(model, p)
    values = resolve(load_model(name), p)
    x0 = np.zeros((1, coef.shape[0]))
    x0[0, 0] = 100.0
    auc = auc_infinity(rate_matrix(values), x0)[0]
    np.testing.assert_allclose(auc, 100.0 * (coef / lam).sum(axis=1), rtol=1e-10)
    v = p.get("V", p.get("V1"))
    np.testing.assert_allclose(p["CL"] * auc[0] / v, 100.0, rtol=1e-10)


def test_auc_infinity_of_a_compartment_cut_off_from_the_doses_is_zero():
    # found by an audit: Q = 0 made K singular and `compare` died with numpy's "Singular matrix".
    # Exact: the peripheral compartment gets nothing, the central one the one-compartment AUC D/k10; rtol 1e-12
    p = {**P2, "Q": 0.0}
    values = resolve(load_model("two_cpt_iv"), p)
    auc = auc_infinity(rate_matrix(values), np.array([[100.0, 0.0]]))[0]
    np.testing.assert_allclose(auc, [100.0 * p["V1"] / p["CL"], 0.0], rtol=1e-12, atol=0)


@pytest.mark.parametrize(("name", "p", "stuck"), [("one_cpt_iv", {**P1, "CL": 0.0}, "central"),
                                                  ("two_cpt_iv", {**P2, "CL": 0.0}, "central, peripheral"),
                                                  # the depot passes its amount on: not where it stays
                                                  ("two_cpt_oral", {**P2, "CL": 0.0, "ka": 1.0}, "central, peripheral")])
def test_auc_infinity_without_elimination_names_where_the_amount_stays(name, p, stuck):
    from itpk.errors import ScheduleError

    values = resolve(load_model(name), p)
    x0 = np.zeros((1, len(values.spec.state_names)))
    x0[0, 0] = 100.0  # the first compartment: central, or the oral model's depot
    with pytest.raises(ScheduleError, match=rf"infinite: the amount reaching {stuck} is never eliminated"):
        auc_infinity(rate_matrix(values), x0, values.spec.state_names)


def test_auc_infinity_of_slow_elimination_is_large_not_refused():
    # review: a condition-number test called CL = 1e-10 with Q = 100 "never eliminated"; it is D/CL·V1 (exact)
    p = {**P2, "CL": 1e-10, "Q": 100.0}
    values = resolve(load_model("two_cpt_iv"), p)
    auc = auc_infinity(rate_matrix(values), np.array([[100.0, 0.0]]))[0]
    assert auc[0] == pytest.approx(100.0 * p["V1"] / p["CL"], rel=1e-4)


# -- event edge cases, each against its exact answer -------------------------------


def test_observation_at_dose_time_reports_post_dose_value():
    # value at a dose time includes that dose (bolus, and after an earlier dose): rtol 1e-8
    lam, coef = disposition("two", P2)
    schedule = regimen("iv", 100.0, every=12.0, doses=2)
    times = np.array([0.0, 12.0])
    got = sim("two_cpt_iv", schedule, P2, times)
    want = bolus_amounts(lam, coef, 100.0, times) + bolus_amounts(lam, coef, 100.0, times - 12.0)
    check(got, want, 100.0)
    np.testing.assert_allclose(got[0], [100.0, 0.0], rtol=1e-15)
    # a dose at a later time than every observation does not leak into earlier ones
    got2 = sim("two_cpt_iv", Schedule((Dose(5.0, 100.0, Target("iv")),)), P2, [0.0, 4.999, 5.0])
    check(got2[:2], np.zeros((2, 2)), 100.0)
    np.testing.assert_allclose(got2[2], [100.0, 0.0], rtol=1e-15)


def test_reset_during_infusion_stops_it_and_zeroes_amounts():
    # EVID 3 at t=4 during an infusion 0..10: amounts zero at 4 and forever after (no leftover
    # infusion); a later bolus starts from zero: rtol 1e-8
    lam, coef = disposition("two", P2)
    schedule = Schedule((Dose(0.0, 100.0, Target("iv"), duration=10.0), Dose(20.0, 50.0, Target("iv"))), resets=(4.0,))
    times = np.array([2.0, 4.0, 6.0, 10.0, 15.0, 20.0, 26.0])
    got = sim("two_cpt_iv", schedule, P2, times)
    want = np.vstack([
        infusion_amounts(lam, coef, 10.0, 10.0, times[:1]),
        np.zeros((4, 2)),
        bolus_amounts(lam, coef, 50.0, times[5:] - 20.0),
    ])
    check(got, want, 100.0)
    # a reset and a bolus at the same time: the reset applies first, the bolus stays (rtol 1e-15)
    same = sim("two_cpt_iv", Schedule((Dose(0.0, 100.0, Target("iv")), Dose(4.0, 30.0, Target("iv"))), resets=(4.0,)), P2, [4.0])
    np.testing.assert_allclose(same[0], [30.0, 0.0], rtol=1e-15)


def test_evid4_resets_then_doses():
    # Dose(reset=True) at t=8 (EVID 4): the infusion started at 0 is stopped and the earlier state
    # cleared; only the new dose remains: rtol 1e-8
    lam, coef = disposition("three", P3)
    schedule = Schedule((
        Dose(0.0, 100.0, Target("iv"), duration=12.0),
        Dose(8.0, 40.0, Target("iv"), reset=True),
    ))
    times = np.array([4.0, 8.0, 9.0, 16.0])
    got = sim("three_cpt_iv", schedule, P3, times)
    want = np.vstack([
        infusion_amounts(lam, coef, 100.0 / 12.0, 12.0, times[:1]),
        bolus_amounts(lam, coef, 40.0, times[1:] - 8.0),
    ])
    check(got, want, 100.0)


def test_evid4_infusion_with_reset():
    # EVID 4 infusion: reset, then the infusion runs its full duration: rtol 1e-8
    lam, coef = disposition("one", P1)
    schedule = Schedule((Dose(0.0, 300.0, Target("iv")), Dose(6.0, 60.0, Target("iv"), duration=3.0, reset=True)))
    times = np.array([5.0, 6.0, 7.0, 9.0, 12.0])
    got = sim("one_cpt_iv", schedule, P1, times)
    want = np.vstack([bolus_amounts(lam, coef, 300.0, times[:1]), infusion_amounts(lam, coef, 20.0, 3.0, times[1:] - 6.0)])
    check(got, want, 300.0)


def test_doses_into_two_routes_and_a_compartment_superpose():
    # two_cpt_oral: po (F 0.62) + IV infusion + bolus straight into the peripheral compartment:
    # rtol 1e-8 against the sum of closed forms
    p = {**P2, "ka": KA, "F": F}
    lam, coef = disposition("two", P2)
    schedule = Schedule((
        Dose(0.0, 200.0, Target("po")),
        Dose(2.0, 50.0, Target("iv"), duration=1.0),
        Dose(3.0, 30.0, Target("peripheral", compartment=True)),
    ))
    got = sim("two_cpt_oral", schedule, p)
    want = oral_amounts(lam, coef, KA, F * 200.0, TIMES) + with_depot(infusion_amounts(lam, coef, 50.0, 1.0, TIMES - 2.0))
    # peripheral bolus: the 2-cpt response to a unit amount in the peripheral compartment
    (alpha, beta), (k12, k21) = lam, micro("two", P2)[1][0]
    t = np.maximum(TIMES - 3.0, 0.0)
    on = TIMES >= 3.0
    central = k21 * (np.exp(-beta * t) - np.exp(-alpha * t)) / (alpha - beta)
    periph = ((alpha - k21) * np.exp(-beta * t) + (k21 - beta) * np.exp(-alpha * t)) / (alpha - beta)
    want[:, 1] += 30.0 * np.where(on, central, 0.0)
    want[:, 2] += 30.0 * np.where(on, periph, 0.0)
    check(got, want, 200.0)


def test_infusion_by_rate_equals_infusion_by_duration():
    # rate 25 for 100 vs duration 4 for 100: identical to rtol 1e-14
    by_rate = Schedule((Dose(1.0, 100.0, Target("iv"), rate=25.0, ii=12.0, addl=2),))
    by_duration = Schedule((Dose(1.0, 100.0, Target("iv"), duration=4.0, ii=12.0, addl=2),))
    a = sim("two_cpt_iv", by_rate, P2)
    b = sim("two_cpt_iv", by_duration, P2)
    np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14 * 100)


def test_ii_addl_equals_explicit_repeated_doses():
    # II/ADDL expansion vs the same doses written out, bolus and infusion: rtol 1e-13
    compact = Schedule((Dose(0.5, 100.0, Target("po"), ii=8.0, addl=3), Dose(2.0, 40.0, Target("iv"), duration=2.0, ii=8.0, addl=3)))
    explicit = Schedule(tuple(
        [Dose(0.5 + 8.0 * k, 100.0, Target("po")) for k in range(4)]
        + [Dose(2.0 + 8.0 * k, 40.0, Target("iv"), duration=2.0) for k in range(4)]
    ))
    p = {**P2, "ka": KA, "F": F}
    np.testing.assert_allclose(sim("two_cpt_oral", compact, p), sim("two_cpt_oral", explicit, p), rtol=1e-13, atol=1e-13 * 100)


def test_five_parameter_sets_in_one_call_equal_five_calls():
    # vectorisation over S = 5 parameter sets: rtol 1e-13
    spec = load_model("two_cpt_oral")
    rng = np.random.default_rng(3)
    params = {
        "ka": rng.uniform(0.3, 3.0, 5), "CL": rng.uniform(1.0, 10.0, 5), "V1": rng.uniform(5.0, 40.0, 5),
        "Q": rng.uniform(1.0, 20.0, 5), "V2": rng.uniform(10.0, 100.0, 5), "F": rng.uniform(0.3, 1.0, 5),
    }
    schedule = Schedule((
        Dose(0.0, 100.0, Target("po"), ii=12.0, addl=2),
        Dose(30.0, 50.0, Target("iv"), duration=2.0),
        Dose(40.0, 60.0, Target("iv"), ii=8.0, ss=1),
    ))
    together = simulate(spec, schedule, params, TIMES)
    for s in range(5):
        alone = simulate(spec, schedule, {k: v[s] for k, v in params.items()}, TIMES)
        np.testing.assert_allclose(together.amounts[s], alone.amounts[0], rtol=1e-13, atol=1e-13 * 100)
        np.testing.assert_allclose(together.outputs["plasma"][s], alone.outputs["plasma"][0], rtol=1e-13, atol=1e-13 * 10)
