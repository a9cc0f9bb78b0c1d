"""simulate with time-varying covariates (NOCB): piecewise closed forms, a scipy reference, the data path."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import solve_ivp

from itpk import load_model
from itpk.dataset import read_frame
from itpk.errors import ModelSpecError, ScheduleError
from itpk.events import COVARIATE, CovariateChange, Dose, Schedule, Target, expand
from itpk.linear import LinearStepper
from itpk.simulate import simulate, walk
from itpk.subjects import subjects
from itpk.system import resolve, with_covariates

DATA = Path(__file__).parent / "data"
TVCL, TVV = 5.0, 50.0  # tv_weight's values at 70 kg


def weight_model():
    return load_model(DATA / "tv_weight.toml")


def k_and_v(wt: float) -> tuple[float, float]:
    """tv_weight's elimination rate (1/h) and volume (L) at weight wt (kg)."""
    cl, v = TVCL * (wt / 70) ** 0.75, TVV * wt / 70
    return cl / v, v


def changes(*pairs: tuple[float, float]) -> tuple[CovariateChange, ...]:
    return tuple(CovariateChange(t, (("WT", w),)) for t, w in pairs)


def test_bolus_across_two_weight_changes_matches_the_piecewise_closed_form():
    # A(t) = D e^{-k0 t} up to 2 h, then e^{-k1 (t-2)}, then e^{-k2 (t-6)}; C = A/V of the weight in
    # force. At the change times themselves the old weight holds (NOCB). rtol 1e-12.
    schedule = Schedule((Dose(0.0, 100.0, Target("iv")),), (), changes((2.0, 90.0), (6.0, 60.0)))
    t = np.array([0.0, 1.0, 2.0, 2.5, 6.0, 7.0, 12.0])
    got = simulate(weight_model(), schedule, {}, t).outputs["plasma"][0]
    (k0, v0), (k1, v1), (k2, v2) = k_and_v(70), k_and_v(90), k_and_v(60)
    a2 = 100 * np.exp(-k0 * 2)
    a6 = a2 * np.exp(-k1 * 4)
    expected = [100 / v0, 100 * np.exp(-k0) / v0, a2 / v0, a2 * np.exp(-k1 * 0.5) / v1, a6 / v1,
                a6 * np.exp(-k2) / v2, a6 * np.exp(-k2 * 6) / v2]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_infusion_running_through_a_change_keeps_its_rate():
    # 25 mg/h from 0 to 4 h, weight 70 -> 100 kg after 1.5 h: A' = R - k A piecewise; rtol 1e-12
    schedule = Schedule((Dose(0.0, 100.0, Target("iv"), rate=25.0),), (), changes((1.5, 100.0)))
    t = np.array([1.0, 1.5, 3.0, 4.0, 9.0])
    got = simulate(weight_model(), schedule, {}, t).outputs["plasma"][0]
    (k0, v0), (k1, v1) = k_and_v(70), k_and_v(100)

    def infusing(a0, k, dt):
        return 25 / k + (a0 - 25 / k) * np.exp(-k * dt)

    a15 = infusing(0.0, k0, 1.5)
    a4 = infusing(a15, k1, 2.5)
    expected = [infusing(0.0, k0, 1.0) / v0, a15 / v0, infusing(a15, k1, 1.5) / v1, a4 / v1, a4 * np.exp(-k1 * 5) / v1]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_several_parameter_sets_share_the_changes():
    # S = 2 sets (TVCL 5 and 8): each follows its own piecewise decay; rtol 1e-12
    schedule = Schedule((Dose(0.0, 100.0, Target("iv")),), (), changes((3.0, 35.0)))
    got = simulate(weight_model(), schedule, {"TVCL": [5.0, 8.0]}, [5.0]).outputs["plasma"][:, 0]
    for s, tvcl in enumerate((5.0, 8.0)):
        k0 = tvcl / TVV
        cl1, v1 = tvcl * 0.5 ** 0.75, TVV * 0.5
        assert got[s] == pytest.approx(100 * np.exp(-k0 * 3) * np.exp(-cl1 / v1 * 2) / v1, rel=1e-12)


def test_nonlinear_model_matches_scipy_piecewise():
    # tv_mm: Vmax and V scale with weight, 70 -> 95 kg after 4 h; reference: solve_ivp per segment
    # at rtol 1e-12, amounts carried over; simulate's LSODA at rtol 1e-10: agreement to 1e-7
    spec = load_model(DATA / "tv_mm.toml")
    schedule = Schedule((Dose(0.0, 200.0, Target("iv")),), (), changes((4.0, 95.0)))
    t = np.array([2.0, 4.0, 6.0, 10.0])
    got = simulate(spec, schedule, {}, t).outputs["plasma"][0]

    def rhs(wt):
        vmax, v = 10.0 * (wt / 70) ** 0.75, 50.0 * wt / 70
        return lambda _t, a: [-vmax * (a[0] / v) / (2.0 + a[0] / v)]

    first = solve_ivp(rhs(70), (0, 4), [200.0], t_eval=[2.0, 4.0], rtol=1e-12, atol=1e-14)
    second = solve_ivp(rhs(95), (4, 10), first.y[:, -1], t_eval=[6.0, 10.0], rtol=1e-12, atol=1e-14)
    expected = np.concatenate([first.y[0] / 50.0, second.y[0] / (50.0 * 95 / 70)])
    np.testing.assert_allclose(got, expected, rtol=1e-7)


def test_change_is_applied_after_everything_else_at_its_time():
    schedule = Schedule((Dose(2.0, 10.0, Target("iv")),), (2.0,), changes((2.0, 80.0)))
    kinds = [e.kind for e in expand(schedule) if e.time == 2.0]
    assert kinds[-1] == COVARIATE


def test_plain_stepper_refuses_a_covariate_change():
    schedule = Schedule((Dose(0.0, 10.0, Target("iv")),), (), changes((1.0, 80.0)))
    stepper = LinearStepper(resolve(weight_model()), schedule.targets())
    with pytest.raises(ScheduleError, match="covariate changes"):
        walk(stepper, schedule, np.array([2.0]), lambda *a: None)


def test_schedule_refuses_unordered_or_non_finite_changes():
    with pytest.raises(ScheduleError, match="increasing time order"):
        Schedule((), (), changes((3.0, 80.0), (1.0, 70.0)))
    with pytest.raises(ScheduleError, match="finite numbers"):
        CovariateChange(1.0, (("WT", float("nan")),))


def test_with_covariates_recomputes_derived_and_refuses_unknown_names():
    values = with_covariates(resolve(weight_model(), {"TVV": [50.0, 60.0]}), {"WT": 140.0})
    np.testing.assert_allclose(values["V"], [100.0, 120.0], rtol=1e-15)
    with pytest.raises(ModelSpecError, match="no covariate 'TVCL'"):
        with_covariates(values, {"TVCL": 1.0})


def weight_rows() -> pd.DataFrame:
    rows = [
        # ID TIME EVID AMT ROUTE DV WT
        (1, 0.0, 1, 100.0, "iv", None, 70.0),
        (1, 1.0, 0, None, "", 1.8, 70.0),
        (1, 2.0, 0, None, "", 1.6, 70.0),
        (1, 4.0, 2, None, "", None, 90.0),  # EVID 2: a covariate record; 90 kg holds from 2 h on
        (1, 6.0, 0, None, "", 1.0, 90.0),
        (1, 8.0, 0, None, "", 0.8, 60.0),  # 60 kg from 6 h on
        (2, 0.0, 1, 100.0, "iv", None, 50.0),
        (2, 3.0, 0, None, "", 1.5, 50.0),
    ]
    return pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV", "WT"])


def test_subjects_turn_rows_into_nocb_changes_at_the_previous_row_time():
    spec = weight_model()
    first, second = subjects(read_frame(weight_rows(), spec), spec)
    assert first.covariates == {"WT": 70.0}
    assert first.schedule.changes == changes((2.0, 90.0), (6.0, 60.0))
    assert second.schedule.changes == ()
    # the data path gives the closed form's values: 1.6 at 2 h is still at 70 kg
    prof = simulate(spec, first.schedule, first.covariates, [2.0, 6.0, 8.0]).outputs["plasma"][0]
    (k0, v0), (k1, v1), (k2, v2) = k_and_v(70), k_and_v(90), k_and_v(60)
    a2, a6 = 100 * np.exp(-k0 * 2), 100 * np.exp(-k0 * 2 - k1 * 4)
    np.testing.assert_allclose(prof, [a2 / v0, a6 / v1, a6 * np.exp(-k2 * 2) / v2], rtol=1e-12)


def test_steady_state_dose_after_a_change_uses_the_new_weight():
    # SS=1 bolus every 12 h from 10 h, weight 70 -> 100 kg after 5 h: the periodic state of the
    # 100 kg parameters, A = D/(1 - e^{-k·12}), then e^{-k·3}; rtol 1e-12
    schedule = Schedule((Dose(0.0, 100.0, Target("iv")), Dose(10.0, 100.0, Target("iv"), ii=12.0, ss=1)), (),
                        changes((5.0, 100.0)))
    got = simulate(weight_model(), schedule, {}, [10.0, 13.0]).outputs["plasma"][0]
    k, v = k_and_v(100)
    a = 100 / (1 - np.exp(-k * 12))
    np.testing.assert_allclose(got, [a / v, a * np.exp(-3 * k) / v], rtol=1e-12)


def test_change_before_time_zero_is_refused():
    with pytest.raises(ScheduleError, match="finite number >= 0"):
        CovariateChange(-1.0, (("WT", 80.0),))


# -- a route sent to another of its sites (ROUTE=it, CMT=lesion2) -----------------------------------


def two_lesion_models():
    """it_antibody (linear: exact path) and it_linear with saturable clearance added (nonlinear: the ODE kernel)."""
    import tomllib
    from importlib.resources import files

    from itpk.spec import parse_model

    raw = tomllib.loads(files("itpk.models").joinpath("it_linear.toml").read_text())
    raw["name"] = "it_linear_mm"
    raw["parameters"]["Vmax"] = {"value": 3.0, "unit": "mg/h"}
    raw["parameters"]["Km"] = {"value": 0.5, "unit": "mg/L"}
    raw["odes"] = {"central": "-Vmax * central / (Km * V + central)"}
    return load_model("it_antibody"), parse_model(raw)


@pytest.mark.parametrize("index", [0, 1], ids=["linear", "nonlinear"])
def test_it_dose_into_the_second_lesion_is_its_share_there_and_the_leak_into_blood(index):
    # 10 mg by it into lesion2 at 0 h and 5 mg at 30 h = (1 - f_leak) of each into lesion2 and
    # f_leak into central, given as compartment doses at the same times; an ordinary it dose at 12 h
    # in both. Linear: rtol 1e-12 (the same propagators); nonlinear: the kernel at rtol 1e-10 takes
    # slightly different steps from last-bit different amounts, so within 1e-9 of each output's peak
    spec = two_lesion_models()[index]
    f = 0.35
    moved = Schedule((Dose(0.0, 10.0, Target("it", site="lesion2")), Dose(12.0, 4.0, Target("it")),
                      Dose(30.0, 5.0, Target("it", site="lesion2"))))
    split = Schedule(tuple(Dose(t, a * share, Target(c, compartment=True)) for t, a in ((0.0, 10.0), (30.0, 5.0))
                           for c, share in (("lesion2", 1 - f), ("central", f))) + (Dose(12.0, 4.0, Target("it")),))
    times = np.array([0.0, 1.0, 6.0, 12.0, 13.0, 30.0, 31.0, 48.0, 96.0])
    params = {"f_leak": f, "DIAM2": 3.0}
    got, want = (simulate(spec, s, params, times).outputs for s in (moved, split))
    for name in ("plasma", "tumor", "lesion2", "lymph"):
        atol = 0.0 if index == 0 else 1e-9 * np.max(want[name])
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12 if index == 0 else 0.0, atol=atol, err_msg=name)
    assert got["lesion2"][0, 1] > 10 * got["tumor"][0, 1]  # lesion2 was injected, tumor only fed by blood


def test_a_target_label_parses_back():
    for target in (Target("iv"), Target("it", site="lesion2"), Target("central", compartment=True)):
        assert Target.parse(str(target)) == target


def test_simulate_each_gives_every_set_its_own_times():
    # simulate_each solves each set at its own times (the peak zoom's windows); reference: simulate of each
    # set alone at those times, through the same kernel (rtol 1e-10: only the step sequence differs, and
    # a solve that stops at fewer times takes other steps)
    from itpk.simulate import simulate_each

    spec = load_model("one_cpt_mm")
    schedule = Schedule((Dose(0.0, 100.0, Target("iv")), Dose(12.0, 50.0, Target("iv"))), ())
    params = {"Vmax": np.array([5.0, 20.0, 40.0])}
    values = resolve(spec, params)
    times = np.array([[1.0, 12.0, 3.0], [0.5, 0.5, 30.0], [20.0, 13.0, 2.0]])  # unsorted, repeated, at a dose
    got = simulate_each(values, schedule, times, ["plasma"])["plasma"]
    for s in range(3):
        alone = simulate(spec, schedule, {"Vmax": params["Vmax"][s]}, np.unique(times[s]))
        expected = alone.outputs["plasma"][0][np.searchsorted(np.unique(times[s]), times[s])]
        np.testing.assert_allclose(got[s], expected, rtol=1e-8)


def test_simulate_each_follows_covariate_changes_and_linear_models():
    # tv_weight (linear) across a weight change at 3 h: the piecewise closed form at each set's times (rtol 1e-12)
    from itpk.simulate import simulate_each

    schedule = Schedule((Dose(0.0, 100.0, Target("iv")),), (), changes((3.0, 35.0)))
    values = resolve(weight_model(), {"TVCL": np.array([5.0, 8.0])})
    times = np.array([[1.0, 3.0, 5.0], [5.0, 2.0, 3.0]])
    got = simulate_each(values, schedule, times, ["plasma"])["plasma"]
    for s, tvcl in enumerate((5.0, 8.0)):
        k0, (k1, v1) = tvcl / TVV, (tvcl * 0.5 ** 0.75 / (TVV * 0.5), TVV * 0.5)
        for j, t in enumerate(times[s]):
            expected = 100 / TVV * np.exp(-k0 * t) if t <= 3 else 100 * np.exp(-k0 * 3 - k1 * (t - 3)) / v1
            assert got[s, j] == pytest.approx(expected, rel=1e-12)


def test_simulate_each_refuses_times_of_the_wrong_shape():
    from itpk.simulate import simulate_each

    values = resolve(load_model("one_cpt_mm"), {"Vmax": np.array([5.0, 20.0])})
    with pytest.raises(ScheduleError, match="simulate_each"):
        simulate_each(values, Schedule((Dose(0.0, 100.0, Target("iv")),), ()), np.ones((3, 2)), ["plasma"])
