"""Closed forms of 1–2 compartment models (itpk.closedform) against exact references.

Tolerances, stated per test:

- predictions vs ``itpk.simulate.simulate`` (matrix exponentials stepped through the events):
  rtol 1e-10, atol 1e-12 × the largest prediction;
- at ka = k exactly (a defective K): the analytic limit D·ka·τ·e^{−kτ}/V, rtol 1e-12;
- gradients: central finite differences, rtol 1e-6 (atol 1e-7 × the largest gradient);
- numba backend vs the python linker: rtol 1e-13 (predictions), 1e-9 (gradients);
- the fitted model's log-density and gradient vs the same model through the eigen Op: 1e-10.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import pytensor
import pytest
from pytensor.graph.traversal import io_toposort
from test_linop import GRAD_RTOL, TIMES, build, check_gradients, inputs, predict

from itpk import closedform, load_model
from itpk.events import Dose, Schedule, Target
from itpk.linop import LinearPredict, linear_predict

RTOL, ATOL_REL = 1e-10, 1e-12
THEOPH = Path(str(files("itpk.data") / "theoph.csv"))
CLOSED = "closed"

ORAL = Schedule((Dose(0.0, 100.0, Target("po"), ii=12.0, addl=2), Dose(30.0, 40.0, Target("po"), reset=True)))
IV_INFUSION = Schedule((Dose(0.0, 100.0, Target("iv"), duration=1.5, ii=12.0, addl=2), Dose(5.0, 30.0, Target("iv"))))
IV_BOLUS = Schedule((Dose(0.0, 100.0, Target("iv"), ii=12.0, addl=2), Dose(5.0, 30.0, Target("iv"))))


def cases():
    """1-compartment bolus + infusion, chain (oral, with a reset), general 2×2 (two_cpt_iv)."""
    k = 4.2 / 33.0
    return {
        "one_cpt_iv": build(load_model("one_cpt_iv"), [({"CL": 4.2, "V": 33.0}, IV_INFUSION, TIMES),
                                                       ({"CL": 1e-9, "V": 9.0}, IV_INFUSION, TIMES)]),  # λu ≈ 0
        "one_cpt_oral": build(load_model("one_cpt_oral"), [
            ({"ka": 0.83, "CL": 4.2, "V": 33.0}, ORAL, TIMES),
            ({"ka": 0.9, "CL": 0.0, "V": 20.0}, ORAL, TIMES),  # an eigenvalue 0
            ({"ka": k * (1 + 1e-6), "CL": 4.2, "V": 33.0}, ORAL, TIMES),  # ka ≈ k: the Taylor branch
            ({"ka": k * 1.02, "CL": 4.2, "V": 33.0}, ORAL, TIMES),  # (ka − k)·τ crosses 0.01 between times
            ({"ka": 80.0, "CL": 4.2, "V": 33.0}, ORAL, TIMES),  # e^{−ka·τ} underflows
        ]),
        "two_cpt_iv": build(load_model("two_cpt_iv"), [({"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}, IV_BOLUS, TIMES),
                                                       ({"CL": 0.2, "V1": 5.0, "Q": 30.0, "V2": 400.0}, IV_BOLUS, TIMES)]),
    }


@pytest.mark.parametrize("name", ["one_cpt_iv", "one_cpt_oral", "two_cpt_iv"])
def test_predictions_match_simulate(name):
    K, F, C, design, reference = cases()[name]
    got = predict(K, F, C, design, static=True, method=CLOSED)
    np.testing.assert_allclose(got, reference, rtol=RTOL, atol=ATOL_REL * np.abs(reference).max())


def test_ka_equal_to_k_gives_the_analytic_limit():
    # K defective (one repeated eigenvalue): the eigen Op returns NaN, the closed form the limit
    V, CL = 33.0, 4.2
    k = CL / V
    schedule = Schedule((Dose(0.0, 100.0, Target("po")),))
    K, F, C, design, _ = build(load_model("one_cpt_oral"), [({"ka": k, "CL": CL, "V": V}, schedule, TIMES)])
    got = predict(K, F, C, design, static=True, method=CLOSED)
    np.testing.assert_allclose(got, 100.0 * k * TIMES * np.exp(-k * TIMES) / V, rtol=1e-12, atol=0)
    assert np.all(np.isnan(predict(K, F, C, design, static=True)))  # the Op, for contrast


@pytest.mark.parametrize("name", ["one_cpt_iv", "one_cpt_oral", "two_cpt_iv"])
def test_gradients_match_central_differences(name):
    # every entry of K is perturbed, K[0, 1] too: with ka within a few % of k that makes the
    # eigenvalues complex, so ka ≈ k is checked in (ka, k) by the next test instead
    K, F, C, design, _ = cases()[name]
    if name == "one_cpt_oral":
        K, F, C, design, _ = build(load_model("one_cpt_oral"), [
            ({"ka": 0.83, "CL": 4.2, "V": 33.0}, ORAL, TIMES), ({"ka": 0.9, "CL": 0.0, "V": 20.0}, ORAL, TIMES),
            ({"ka": 80.0, "CL": 4.2, "V": 33.0}, ORAL, TIMES),
        ])
    check_gradients(K, F, C, design, static=True, method=CLOSED)


@pytest.mark.parametrize("ratio", [1.0, 1 + 1e-9, 1 + 1e-4, 1.02])
def test_gradient_in_ka_and_k_is_smooth_through_ka_equal_to_k(ratio):
    # d(loss)/d(ka) and d(loss)/d(k) from K̄ against central differences of the predictions in
    # (ka, k), rtol 1e-6: exact at ka = k and on both sides of the Taylor/direct switch
    V, CL = 33.0, 4.2
    k = CL / V
    schedule = Schedule((Dose(0.0, 100.0, Target("po"), ii=12.0, addl=1),))

    def arrays(ka, kk):
        return build(load_model("one_cpt_oral"), [({"ka": ka, "CL": kk * V, "V": V}, schedule, TIMES)])[:4]

    K, F, C, design = arrays(k * ratio, k)
    w = np.random.default_rng(0).normal(size=design.n_obs)
    Kv, Fv, Cv = inputs(K, F, C, static=True)
    loss = (w * linear_predict(Kv, Fv, Cv, design, method=CLOSED)).sum()
    value = pytensor.function([Kv, Fv, Cv], loss, mode="FAST_COMPILE")
    K_bar = pytensor.function([Kv, Fv, Cv], pytensor.grad(loss, Kv), mode="FAST_COMPILE")(K, F, C)[0]
    h = 1e-6 * k
    d_ka = (value(*arrays(k * ratio + h, k)[:3]) - value(*arrays(k * ratio - h, k)[:3])) / (2 * h)
    d_k = (value(*arrays(k * ratio, k + h)[:3]) - value(*arrays(k * ratio, k - h)[:3])) / (2 * h)
    # K = [[-ka, 0], [ka, -k]]
    np.testing.assert_allclose([K_bar[1, 0] - K_bar[0, 0], -K_bar[1, 1]], [d_ka, d_k], rtol=GRAD_RTOL)


def test_non_finite_rates_give_nan_for_that_subject_only():
    K, F, C, design, _ = cases()["two_cpt_iv"]
    K[0, 1, 1] = np.nan
    y = predict(K, F, C, design, static=True, method=CLOSED)
    bad = design.obs_subject == 0
    assert np.all(np.isnan(y[bad & (design.obs_time > 0)])) and np.all(np.isfinite(y[~bad]))


@pytest.mark.parametrize("name", ["one_cpt_iv", "one_cpt_oral", "two_cpt_iv"])
def test_numba_backend_equals_python_linker(name):
    K, F, C, design, _ = cases()[name]
    Kv, Fv, Cv = inputs(K, F, C, static=True)
    y = linear_predict(Kv, Fv, Cv, design, method=CLOSED)
    outputs = [y, *pytensor.grad((y**2).sum(), [Kv, Fv, Cv])]
    got = pytensor.function([Kv, Fv, Cv], outputs, mode="NUMBA")(K, F, C)
    want = pytensor.function([Kv, Fv, Cv], outputs, mode="FAST_COMPILE")(K, F, C)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-13, atol=1e-15 * np.abs(want[0]).max())
    # gradients 1e-9: K̄[0, 1] at ka ≈ k divides a last-bit difference of numba's and numpy's exp
    # by the gap between the eigenvalues (the fit's own graph never forms that entry: a chain)
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * np.abs(w).max())


def test_linear_predict_chooses_closed_forms_only_where_they_apply():
    one, two = cases()["one_cpt_iv"], cases()["two_cpt_iv"]
    infusion_2 = build(load_model("two_cpt_iv"), [({"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}, IV_INFUSION, TIMES)])
    for (K, F, C, design, _), closed in ((one, True), (two, True), (infusion_2, False)):
        y = linear_predict(*inputs(K, F, C, static=True), design)
        assert isinstance(y.owner.op, LinearPredict) is not closed
        assert closedform.supports(K.shape[1], design) is closed
    K, F, C, design, _ = two
    assert isinstance(linear_predict(*inputs(None, None, None), design).owner.op, LinearPredict)  # n unknown
    with pytest.raises(Exception, match="no closed form"):
        linear_predict(*inputs(*infusion_2[:3], static=True), infusion_2[3], method=CLOSED)


def it_mini_fit_case():
    """A 2-compartment chain (lesion -> plasma) with priors, two outputs, it and iv boluses, a covariate."""
    import tomllib

    import pandas as pd

    from itpk.dataset import read_frame
    from itpk.spec import parse_model

    raw = tomllib.loads((Path(__file__).parent / "data" / "it_mini.toml").read_text())
    for name, median in (("CL", 5.0), ("V", 50.0), ("k_out", 0.1)):
        raw["parameters"][name] |= {"prior": {"dist": "lognormal", "median": median, "sigma": 0.5}, "iiv": 0.3}
    raw["parameters"]["f_leak"] |= {"prior": {"dist": "beta", "alpha": 2.0, "beta": 6.0}}
    spec = parse_model(raw)
    rows = []
    for i, (route, diam) in enumerate((("it", 2.0), ("iv", 3.0), ("it", 1.5)), 1):
        rows.append((i, 0.0, 1, 10.0, route, "", None, diam))
        rows.append((i, 24.0, 1, 5.0, "it", "", None, diam))
        for t in (0.5, 2.0, 8.0, 30.0):
            rows.append((i, t, 0, None, "", "plasma", 0.05 * i, diam))
        rows.append((i, 28.0, 0, None, "", "tumor", 2.0 * i, diam))  # after an it dose for every subject
    frame = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV", "DIAM"])
    return spec, read_frame(frame.sort_values(["ID", "TIME"], kind="stable"), spec)


def theoph_fit_case():
    from itpk.dataset import read_dataset

    spec = load_model("one_cpt_oral")
    return spec, read_dataset(THEOPH, spec)


@pytest.mark.parametrize("case", [theoph_fit_case, it_mini_fit_case], ids=["theoph", "it_mini"])
def test_fitted_model_uses_the_closed_form_and_agrees_with_the_op(case, monkeypatch):
    # a fit's model: no LinearPredict in its graph; log-density and gradient equal to those through
    # the eigen Op within 1e-10 at random points (it_mini: two outputs, two routes, a route fraction)
    import itpk.inference as inf

    spec, dataset = case()
    model = inf.build_model(spec, dataset)[0]
    assert not any(isinstance(node.op, LinearPredict) for node in io_toposort([], [model["IPRED"]]))
    monkeypatch.setattr(closedform, "supports", lambda n, design: False)
    eigen = inf.build_model(spec, dataset)[0]
    rng = np.random.default_rng(4)
    start = model.initial_point()
    logp, dlogp = model.compile_logp(), model.compile_dlogp()
    logp_op, dlogp_op = eigen.compile_logp(), eigen.compile_dlogp()
    for _ in range(3):
        point = {k: v + rng.normal(scale=0.3, size=np.shape(v)) for k, v in start.items()}
        assert logp(point) == pytest.approx(logp_op(point), rel=1e-10)
        np.testing.assert_allclose(dlogp(point), dlogp_op(point), rtol=1e-10, atol=1e-10 * np.abs(dlogp_op(point)).max())


def test_steady_state_doses_of_one_compartment_models():
    # rtol 1e-10 vs simulate, gradients vs central differences: periodic SS infusion (SS=1), constant
    # SS infusion, SS boluses (SS=1 and SS=2); 2-compartment models with SS doses take the eigen Op
    from test_linop import steady_state_cases

    bolus = Schedule((Dose(0.0, 100.0, Target("iv"), ii=12.0, addl=1, ss=1), Dose(30.0, 50.0, Target("iv"), ii=6.0, ss=2)))
    cases = steady_state_cases()
    for K, F, C, design, reference in (cases["one_cpt_iv"], build(load_model("one_cpt_iv"), [({"CL": 1.3, "V": 20.0}, bolus, TIMES)])):
        got = predict(K, F, C, design, static=True, method=CLOSED)
        np.testing.assert_allclose(got, reference, rtol=RTOL, atol=ATOL_REL * np.abs(reference).max())
        check_gradients(K, F, C, design, static=True, method=CLOSED)
    assert not closedform.supports(2, cases["one_cpt_oral"][3])
