"""The intratumoral model library: presets, sources, and metrics against independent solutions."""

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.optimize import brentq

from itpk import load_model
from itpk.events import Target, regimen
from itpk.exposure import compare_routes, route_exposure
from itpk.system import input_fractions, rate_matrix, resolve

PRESETS = ["it_linear", "it_small_molecule", "it_cytokine", "it_antibody", "it_peptide"]
IT_PARAMETERS = {"CL", "V", "Q", "V2", "k_out", "Kp", "k_ly", "k_ln", "k_deg", "V_LN", "f_leak", "E", "ka_sc", "F_sc"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_with_spec_names_units_sources_and_gain(name):
    spec = load_model(name)
    assert set(spec.parameters) == IT_PARAMETERS
    assert set(spec.routes) == {"it", "ia", "iv", "sc"}
    assert set(spec.outputs) == {"plasma", "tumor", "lesion2", "lymph"}
    assert set(spec.covariates) == {"DIAM", "DIAM2"}
    for p in spec.parameters.values():
        assert p.unit, p.name
        assert p.source, p.name
    assert spec.references
    cmp = compare_routes(spec, resolve(spec), {"it": regimen("it", 1.0), "iv": regimen("iv", 1.0)}, dose=1.0)
    assert cmp.metrics["it"]["G"][0] > 1


def test_presets_share_the_structure():
    base = load_model("it_linear")
    for name in PRESETS[1:]:
        spec = load_model(name)
        assert [f.key for f in spec.flows] == [f.key for f in base.flows]
        assert spec.agent != "generic"


def dense_reference(spec, values, route, t_end):
    """Independent solution: solve_ivp (Radau, rtol 1e-12) of dx/dt = K x from the dose split."""
    K = rate_matrix(values)[0]
    x0 = input_fractions(values, Target(route))[0]
    t = np.concatenate([[0.0], np.geomspace(1e-6, t_end, 40000)])
    sol = solve_ivp(lambda _, x: K @ x, (0, t_end), x0, method="Radau", t_eval=t, rtol=1e-12, atol=1e-16, jac=K)
    c = {"plasma": sol.y[spec.index("central")] / values["V"][0]}
    c["tumor"] = sol.y[spec.index("tumor")] / values["V_T"][0]
    c["lesion2"] = sol.y[spec.index("lesion2")] / values["V_T2"][0]
    return t, c


def test_metrics_with_local_loss_against_solve_ivp():
    spec = load_model("it_cytokine")  # fast kinetics: the dense reference reaches steady decay quickly
    values = resolve(spec, {"k_deg": 0.3, "f_leak": 0.25})
    cmp = compare_routes(spec, values, {"it": regimen("it", 1.0), "iv": regimen("iv", 1.0)}, dose=1.0)
    ref = {r: dense_reference(spec, values, r, 400.0) for r in ("it", "iv")}
    auc = {r: {o: np.trapezoid(c, ref[r][0]) for o, c in ref[r][1].items()} for r in ref}
    cmax = {r: ref[r][1]["plasma"].max() for r in ref}
    m = {k: v[0] for k, v in cmp.metrics["it"].items()}
    # trapezoid on 40,000 log-spaced points and a grid maximum: rtol 1e-5 and 1e-4
    assert m["G"] == pytest.approx(auc["it"]["tumor"] / auc["iv"]["tumor"], rel=1e-5)
    assert m["S"] == pytest.approx(auc["it"]["plasma"] / auc["iv"]["plasma"], rel=1e-5)
    assert m["S"] < 1
    assert m["TI"] == pytest.approx(m["G"] / m["S"], rel=1e-12)
    assert m["abscopal"] == pytest.approx(auc["it"]["lesion2"] / auc["iv"]["lesion2"], rel=1e-5)
    assert m["S_max"] == pytest.approx(cmax["it"] / cmax["iv"], rel=1e-4)


def test_dsf_and_sparing_by_root_finding_equal_closed_forms_for_linear_models():
    spec = load_model("it_small_molecule")
    values = resolve(spec, {"k_deg": 0.8})
    cmp = compare_routes(spec, values, {"it": regimen("it", 1.0), "iv": regimen("iv", 1.0)}, dose=1.0)
    m = {k: v[0] for k, v in cmp.metrics["it"].items()}

    def auc(route, dose, output):
        return route_exposure(values, regimen(route, dose), outputs=[output]).auc[output][0]

    b = brentq(lambda d: auc("it", d, "tumor") - auc("iv", 1.0, "tumor"), 1e-9, 10.0, rtol=1e-12)
    dsf = 1.0 / b  # SPEC §6: the iv dose over the it dose that gives the same tumour AUC
    sparing = auc("iv", 1.0, "plasma") / auc("it", b, "plasma")
    # root finding to rtol 1e-12: DSF = G and systemic sparing = TI at rtol 1e-9
    assert dsf == pytest.approx(m["G"], rel=1e-9)
    assert m["DSF"] == pytest.approx(m["G"], rel=1e-15)
    assert sparing == pytest.approx(m["TI"], rel=1e-9)
    assert m["systemic_sparing"] == pytest.approx(m["TI"], rel=1e-12)


def test_identity_to_1e9_with_everything_switched_on():
    spec = load_model("it_antibody")
    values = resolve(spec, {"k_deg": 0.0, "k_ly": 0.01, "Q": 0.05, "DIAM2": 3.0, "f_leak": 0.35})
    cmp = compare_routes(spec, values, {"it": regimen("it", 1.0), "iv": regimen("iv", 1.0)}, dose=1.0)
    m = cmp.metrics["it"]
    expected = 1 + (1 - 0.35) * values["CL"][0] / values["CL_in"][0]
    assert m["S"][0] == pytest.approx(1.0, rel=1e-9)
    for name in ("G", "DSF", "TI"):
        assert m[name][0] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", [*PRESETS, "it_oncolytic_virus"])
def test_priors_are_centred_on_the_defaults(name):
    # a preset that overrides a value must override its prior too (extends merges field by field)
    for p in load_model(name).parameters.values():
        if p.prior is None:
            continue
        if p.prior.dist in ("lognormal", "logitnormal"):
            assert p.prior.args["median"] == pytest.approx(p.value, rel=1e-12), p.name
        if p.prior.dist == "beta":
            a, b = p.prior.args["alpha"], p.prior.args["beta"]
            assert abs(a / (a + b) - p.value) <= 0.05, p.name
