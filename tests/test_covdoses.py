"""Fits with time-varying covariates: covariate states, their boluses, IPRED and gradients against simulate."""

from pathlib import Path

import ipred_reference as reference
import numpy as np
import pandas as pd
import pytest

from itpk import load_model
from itpk.covdoses import covariate_doses
from itpk.dataset import read_frame
from itpk.errors import FitError
from itpk.inference import build_model
from itpk.simulate import simulate
from itpk.subjects import subjects

DATA = Path(__file__).parent / "data"

ROWS = [
    # ID TIME EVID AMT ROUTE DV WT
    (1, 0.0, 1, 100.0, "iv", None, 70.0),
    (1, 1.0, 0, None, "", 1.8, 70.0),
    (1, 2.0, 0, None, "", 1.6, 70.0),  # still 70 kg at 2 h: the change below holds after it
    (1, 4.0, 2, None, "", None, 90.0),
    (1, 6.0, 0, None, "", 1.0, 90.0),
    (1, 8.0, 0, None, "", 0.8, 60.0),
    (1, 10.0, 0, None, "", 0.6, 60.0),
    (2, 0.0, 1, 100.0, "iv", None, 50.0),
    (2, 0.0, 0, None, "", 2.5, 50.0),  # an observation at the time of a change sees the old value
    (2, 3.0, 0, None, "", 1.5, 80.0),
    (2, 3.0, 3, None, "", None, 80.0),  # a reset after a change: the weight stays 80
    (2, 3.0, 1, 50.0, "iv", None, 80.0),
    (2, 5.0, 0, None, "", 0.5, 80.0),
    (2, 7.0, 0, None, "", 0.3, 80.0),
    (3, 0.0, 1, 80.0, "iv", None, 65.0),  # constant weight
    (3, 4.0, 0, None, "", 1.2, 65.0),
]


def dataset(spec, rows=ROWS):
    return read_frame(pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV", "WT"]), spec)


def test_changes_become_late_boluses_and_resets_get_a_restore():
    spec = load_model(DATA / "tv_weight.toml")
    doses = covariate_doses(spec, subjects(dataset(spec), spec))
    assert doses.names == ("WT",)
    np.testing.assert_array_equal(doses.first[:, 0], [70.0, 50.0, 65.0])
    # subject 1: +20 after 2 h, -30 after 6 h; subject 2: +30 after 0 h, and +30 again right after
    # the reset at 3 h, which puts the state back to 50
    assert doses.valid.sum(axis=1).tolist() == [2, 2, 0]
    got = {(i, doses.time[i, j], doses.amount[i, j, 0], bool(doses.late[i, j]))
           for i, j in zip(*np.nonzero(doses.valid), strict=True)}
    assert got == {(0, 2.0, 20.0, True), (0, 6.0, -30.0, True), (1, 0.0, 30.0, True), (1, 3.0, 30.0, False)}
    constant = dataset(spec, [r for r in ROWS if r[0] == 3])
    assert covariate_doses(spec, subjects(constant, spec)) is None


def ipred_and_reference(spec, rows=ROWS):
    """IPRED of the fit's graph at a random point, and simulate's values with the same individual parameters."""
    return reference.ipred_and_reference(spec, dataset(spec, rows))


@pytest.mark.parametrize(("model", "rtol"), [("tv_weight.toml", 1e-7), ("tv_mm.toml", 1e-6)])
def test_fit_predictions_follow_the_weight_changes(model, rtol):
    # the fit's ODE path (DP5 at rtol 1e-8) against simulate's exact/LSODA solution per segment;
    # ignoring the changes would be 15-60% off after them (subject 1: +26%, -16%; subject 2: +52-60%)
    ipred, ref, *_ = ipred_and_reference(load_model(DATA / model))
    np.testing.assert_allclose(ipred, ref, rtol=rtol)


def test_log_density_gradient_matches_finite_differences():
    # central differences, step 1e-5 on the unconstrained variables; rtol 1e-4
    spec = load_model(DATA / "tv_weight.toml")
    _, _, model, point = ipred_and_reference(spec)
    grad, numeric = reference.gradient_and_finite_differences(model, point)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_steady_state_doses_on_the_ode_path_are_refused_with_the_reason():
    spec = load_model(DATA / "tv_route.toml")
    rows = [(1, 0.0, 1, 100.0, "iv", None, 70.0), (1, 1.0, 0, None, "", 1.8, 70.0), (1, 2.0, 0, None, "", 1.6, 80.0)]
    frame = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV", "WT"])
    frame["SS"], frame["II"] = [1, None, None], [12.0, None, None]
    with pytest.raises(FitError, match=r"tv_route has initial amounts \(give the dosing history explicitly with ADDL instead\)"):
        build_model(spec, read_frame(frame, spec))


def weight_change_trial(seed: int, subjects: int = 16) -> pd.DataFrame:
    """A simulated trial of tv_weight: 100 mg IV, 9 samples to 24 h, each subject's weight ×0.6 or ×1.5
    from 4 h on (recorded at the 6 h sample), true TVCL 5 L/h (ω 0.3), TVV 50 L, proportional error 10%."""
    from itpk.events import CovariateChange, Dose, Schedule, Target

    spec = load_model(DATA / "tv_weight.toml")
    rng = np.random.default_rng(seed)
    times = [0.5, 1, 2, 4, 6, 8, 12, 16, 24]
    rows = []
    for i in range(1, subjects + 1):
        w0 = rng.uniform(50, 100)
        w1 = w0 * rng.choice([0.6, 1.5])
        schedule = Schedule((Dose(0.0, 100.0, Target("iv")),), (), (CovariateChange(4.0, (("WT", w1),)),))
        c = simulate(spec, schedule, {"TVCL": 5.0 * np.exp(rng.normal(0, 0.3)), "WT": w0}, times).outputs["plasma"][0]
        rows.append((i, 0.0, 1, 100.0, "iv", None, w0))
        rows += [(i, t, 0, None, "", v * np.exp(rng.normal(0, 0.1)), w0 if t <= 4 else w1) for t, v in zip(times, c, strict=True)]
    return pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV", "WT"])


def test_map_fit_recovers_the_population_values_through_the_weight_changes():
    # The joint mode (MAP) on 16 simulated subjects: TVCL within 10% and TVV within 5% of the truth
    # (5 L/h, 50 L), sigma within 25% of 0.1. Before the optimiser restarts, L-BFGS stopped after 4
    # iterations here at TVV 60.5 L.
    from itpk.inference import fit
    from itpk.run import summary_table

    spec = load_model(DATA / "tv_weight.toml")
    result = fit(spec, read_frame(weight_change_trial(11), spec), method="map", seed=1)
    table = summary_table(result).set_index("parameter")["median"]
    assert table["TVCL"] == pytest.approx(5.0, rel=0.10)
    assert table["TVV"] == pytest.approx(50.0, rel=0.05)
    assert table["sigma_plasma"] == pytest.approx(0.1, rel=0.25)


def test_cli_fit_and_report_with_weight_changes(tmp_path):
    # end to end: the report re-simulates each subject with its changes and checks the curves
    # against the fitted IPRED (itpk.report, relative 1e-2); a mismatch would leave a note that
    # the individual fits are drawn at the observation times only
    from itpk.cli.main import app
    from typer.testing import CliRunner

    data = tmp_path / "trial.csv"
    weight_change_trial(3, subjects=6).to_csv(data, index=False)
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["fit", str(data), "--model", str(DATA / "tv_weight.toml"), "--method", "map",
                                 "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    report = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(run), "--out", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "Individual" in text and "re-simulated predictions differ" not in text
    assert "drawn at the observation times only" not in text


def test_models_show_marks_time_varying_covariates():
    from itpk.describe import describe_model

    assert "WT = 70 kg Body weight (time-varying: NOCB)" in describe_model(load_model(DATA / "tv_weight.toml"))


def route_rows(*extra):
    """tv_route: SC dose at 0, weight 70 -> 100 kg after 2 h, samples to 8 h, plus ``extra`` rows."""
    rows = [(1, 0.0, 1, 100.0, "sc", None, 70.0), (1, 1.0, 0, None, "", 2.0, 70.0), (1, 2.0, 0, None, "", 2.5, 70.0),
            (1, 4.0, 0, None, "", 2.0, 100.0), (1, 8.0, 0, None, "", 1.0, 100.0), *extra]
    return sorted(rows, key=lambda r: r[1])


def route_models():
    """tv_route (linear with an initial amount: the ODE path) and the same with saturable elimination added."""
    import tomllib

    from itpk.spec import parse_model

    raw = tomllib.loads((DATA / "tv_route.toml").read_text())
    raw["name"] = "tv_route_mm"
    raw["odes"] = {"central": "-2.0 * central / (10.0 + central)"}
    return load_model(DATA / "tv_route.toml"), parse_model(raw)


@pytest.mark.parametrize("index", [0, 1], ids=["linear-with-initial", "nonlinear"])
def test_route_fractions_and_initial_amounts_follow_the_changes(index):
    # tv_route's SC split (FD = WT/(WT + 70)) and central's initial amount (0.5 WT) use the weight,
    # which goes 70 -> 100 kg after 2 h: an SC bolus after the change, an SC infusion running
    # through it (cut there: each piece split by the weight in force), and a reset after it
    # (back to the initial amount of 100 kg) predict what simulate does, rtol 1e-6 (DP5 at 1e-8).
    # Frozen at the first weight they would be 2-30% off (session 16 refused these cases).
    spec = route_models()[index]
    extra = [(1, 6.0, 1, 50.0, "sc", None, 100.0), (1, 7.0, 0, None, "", 1.5, 100.0),
             (1, 9.0, 3, None, "", None, 100.0), (1, 10.0, 0, None, "", 0.5, 100.0)]
    ipred, ref, *_ = ipred_and_reference(spec, route_rows(*extra))
    np.testing.assert_allclose(ipred, ref, rtol=1e-6)
    running = [(1, 0.0, 1, 100.0, "sc", None, 70.0, 20.0), *(r + (None,) for r in route_rows()[1:])]
    frame = pd.DataFrame(running, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV", "WT", "RATE"])  # 5 h through 2 h
    ipred, ref, *_ = reference.ipred_and_reference(spec, read_frame(frame, spec))
    np.testing.assert_allclose(ipred, ref, rtol=1e-6)


def test_cut_doses_split_infusions_at_the_changes_and_restore_after_resets():
    from itpk.dosecuts import cut_doses
    from itpk.subjects import expand_doses

    spec = route_models()[0]
    rows = [(1, 0.0, 1, 100.0, "sc", None, 70.0, 10.0), (1, 2.0, 1, 50.0, "sc", None, 70.0, None),
            (1, 4.0, 0, None, "", 1.0, 100.0, None), (1, 4.0, 3, None, "", None, 100.0, None),
            (1, 8.0, 0, None, "", 1.0, 90.0, None), (1, 9.0, 0, None, "", 1.0, 90.0, None)]
    frame = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV", "WT", "RATE"])
    subject_list = subjects(read_frame(frame, spec), spec)
    cuts = cut_doses(spec, subject_list, expand_doses(subject_list))
    assert cuts.names == ("WT",)
    np.testing.assert_array_equal(cuts.values[:, 0, 0], [70.0, 100.0, 90.0])  # changes after 2 h and 4 h
    # the 10 h infusion, stopped by the reset at 4 h (expand_doses truncates it): 0-2 h at 70 kg,
    # 2-4 h at 100; the bolus at 2 h, a change time, still splits at 70 kg; the reset at 4 h, also a
    # change time, restores the initial amount of the 100 kg in force there (90 holds after 4 h)
    got = sorted((float(t), float(u), int(k)) for t, u, k, v in zip(cuts.time[0], cuts.duration[0], cuts.segment[0], cuts.valid[0],
                                                                     strict=True) if v)
    assert got == [(0.0, 2.0, 0), (2.0, 0.0, 0), (2.0, 2.0, 1)]
    assert [(float(t), int(k)) for t, k, v in zip(cuts.restore_time[0], cuts.restore_segment[0], cuts.restore_valid[0],
                                                  strict=True) if v] == [(4.0, 1)]


def test_a_changing_covariate_that_nothing_uses_keeps_the_exact_path():
    # it_mini's TVOL is declared time-varying but no expression uses it: its changes are ignored by
    # the fit, which stays on the closed form
    from pytensor.graph.traversal import io_toposort

    from itpk.odeop import OdePredict

    spec = load_model(DATA / "it_mini.toml")
    rows = [(1, 0.0, 1, 10.0, "it", None, 4.0), (1, 1.0, 0, None, "", 0.1, 4.0), (1, 2.0, 0, None, "", 0.05, 5.0)]
    frame = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV", "TVOL"])
    frame["CMT"] = ["", "plasma", "plasma"]
    model, _ = build_model(spec, read_frame(frame, spec))
    assert not any(isinstance(node.op, OdePredict) for node in io_toposort([], [model["IPRED"]]))


def test_nothing_is_cut_when_only_initial_amounts_use_the_changes_and_no_reset_follows():
    # the cut doses cost sensitivities (the review measured 4.9 -> 20 ms per gradient on a virus
    # fit with a time-varying diameter and no resets): they are planned only when a dose or a reset needs them
    import tomllib

    from itpk.dosecuts import cut_doses
    from itpk.spec import parse_model
    from itpk.subjects import expand_doses

    raw = tomllib.loads((DATA / "tv_route.toml").read_text())
    raw["derived"]["FD"]["expr"] = "0.5"  # the SC split no longer uses the weight; B0 still does
    spec = parse_model(raw)
    subject_list = subjects(dataset(spec, route_rows()), spec)
    assert cut_doses(spec, subject_list, expand_doses(subject_list)) is None
    with_reset = subjects(dataset(spec, route_rows((1, 6.0, 3, None, "", None, 100.0))), spec)
    assert cut_doses(spec, with_reset, expand_doses(with_reset)) is not None
