"""Deterministics evaluated after sampling, vectorised over draws, against the model point by point."""

import re

import numpy as np
import pandas as pd
import pytensor
import pytest

from itpk import load_model
from itpk.dataset import read_frame
from itpk.deterministics import add_deterministics, evaluate, prior_draws
from itpk.inference import build_model, fit

COLUMNS = ["ID", "TIME", "EVID", "AMT", "RATE", "ROUTE", "CMT", "DV"]


def dataset(model_name: str, route: str, rate: float | None):
    rows = [(1, 0.0, 1, 100.0, rate, route, "", None), (1, 1.0, 0, None, None, "", "plasma", 1.2),
            (1, 6.0, 0, None, None, "", "plasma", 0.9), (2, 0.0, 1, 300.0, rate, route, "", None),
            (2, 2.0, 0, None, None, "", "plasma", 4.0), (2, 12.0, 0, None, None, "", "plasma", 1.5)]
    spec = load_model(model_name)
    return spec, read_frame(pd.DataFrame(rows, columns=COLUMNS), spec)


# one model per prediction path: elementwise closed form, eigen Op (2-compartment infusion), ODE Op
CASES = [("one_cpt_oral", "po", None), ("two_cpt_iv", "iv", 200.0), ("one_cpt_mm", "iv", None)]


def draws_near_the_initial_point(model, S: int, seed: int = 0) -> list[np.ndarray]:
    """S points on the constrained scale, one array (S, *shape) per free variable."""
    rng = np.random.default_rng(seed)
    point = model.initial_point()
    values = []
    for rv in model.free_RVs:
        value = model.rvs_to_values[rv]
        x = point[value.name] + 0.3 * rng.standard_normal((S, *np.shape(point[value.name])))
        values.append(np.exp(x) if model.rvs_to_transforms.get(rv) is not None else x)  # all transforms here are log
    return values


def virus():
    from importlib.resources import files
    from pathlib import Path

    from itpk.dataset import read_dataset

    spec = load_model("it_oncolytic_virus")
    return spec, read_dataset(Path(str(files("itpk.data") / "example_virus.csv")), spec)


@pytest.mark.parametrize("model_name, route, rate", [*CASES, ("it_oncolytic_virus", None, None)])
def test_evaluate_equals_the_model_draw_by_draw(model_name, route, rate):
    # the ODE Op is evaluated without its sensitivities (itpk.deterministics._vectorize_ode): the
    # same steps, so the same predictions as the sampler's Op with them
    spec, data = virus() if model_name == "it_oncolytic_virus" else dataset(model_name, route, rate)
    model, _ = build_model(spec, data)
    rvs, outs = list(model.free_RVs), list(model.deterministics)
    values = draws_near_the_initial_point(model, S=6)
    batched = evaluate(rvs, outs, values)
    one = pytensor.function(rvs, outs, mode="FAST_COMPILE", on_unused_input="ignore")
    for s in range(6):
        for name, expected, got in zip([o.name for o in outs], one(*[v[s] for v in values]), batched, strict=True):
            # the same operations on the same numbers, batched: agreement to rounding (rtol 1e-12)
            np.testing.assert_allclose(got[s], expected, rtol=1e-12, atol=0, err_msg=f"{model_name}: {name}")


def test_nuts_stores_free_variables_and_the_deterministics_follow_from_them():
    spec, data = dataset("one_cpt_oral", "po", None)
    result = fit(spec, data, draws=20, tune=20, chains=1, seed=3, errors={"plasma": "additive"})
    post = result.tree["posterior"]
    model, _ = build_model(spec, data, errors={"plasma": "additive"}, iiv=result.settings["iiv"])  # as --iiv auto chose
    one = pytensor.function(list(model.free_RVs), [model["IPRED"], model["CL_i"]], mode="FAST_COMPILE", on_unused_input="ignore")
    for draw in (0, 7, 19):
        ipred, cl_i = one(*[post[rv.name].values[0, draw] for rv in model.free_RVs])
        np.testing.assert_allclose(post["IPRED"].values[0, draw], ipred, rtol=1e-12)
        np.testing.assert_allclose(post["CL_i"].values[0, draw], cl_i, rtol=1e-12)
    assert post["IPRED"].dims == ("chain", "draw", "observation")
    assert post["CL_i"].dims == ("chain", "draw", "subject") and list(post["subject"].values) == [1, 2]


def test_add_deterministics_leaves_a_complete_posterior_alone():
    spec, data = dataset("one_cpt_oral", "po", None)
    result = fit(spec, data, method="map", seed=1, errors={"plasma": "additive"})
    model, _ = build_model(spec, data, errors={"plasma": "additive"}, iiv=result.settings["iiv"])
    before = result.tree["posterior"].to_dataset()
    after = add_deterministics(result.tree, model)["posterior"].to_dataset()
    assert set(after.data_vars) == set(before.data_vars)


def test_prior_draws_follow_the_priors_and_imply_the_deterministics():
    spec, data = dataset("one_cpt_oral", "po", None)
    model, _ = build_model(spec, data, errors={"plasma": "additive"})
    prior = prior_draws(model, 2000, seed=5)
    assert prior["log_CL"].shape == (1, 2000) and prior["IPRED"].dims == ("chain", "draw", "observation")
    # log_CL ~ Normal(log median, sigma) from models/one_cpt_oral.toml: mean within 4 standard errors
    args = spec.parameters["CL"].prior.args
    log_cl = prior["log_CL"].values.ravel()
    assert abs(log_cl.mean() - np.log(args["median"])) < 4 * args["sigma"] / np.sqrt(2000)
    assert np.std(log_cl) == pytest.approx(args["sigma"], rel=0.1)  # SE of an SD from 2000 draws: ~1.6 %
    # individual values follow from the drawn typical values and random effects (rounding only)
    expected = np.exp(prior["log_CL"].values[..., None] + prior["omega_CL"].values[..., None] * prior["z_CL"].values)
    np.testing.assert_allclose(prior["CL_i"].values, expected, rtol=1e-12)
    again = prior_draws(model, 2000, seed=5)
    np.testing.assert_array_equal(again["IPRED"].values, prior["IPRED"].values)


def test_the_ode_op_is_evaluated_without_sensitivities():
    from pytensor.graph.replace import vectorize_graph
    from pytensor.graph.traversal import ancestors

    from itpk.deterministics import DrawLoop

    spec, data = dataset("one_cpt_mm", "iv", None)
    model, _ = build_model(spec, data)
    rvs = list(model.free_RVs)
    batched = [rv.type.clone(shape=(None, *rv.type.shape))() for rv in rvs]
    (ipred,) = vectorize_graph([model["IPRED"]], replace=dict(zip(rvs, batched, strict=True)))
    loops = [v.owner.op for v in ancestors([ipred]) if v.owner is not None and isinstance(v.owner.op, DrawLoop)]
    assert len(loops) == 1
    settings = loops[0].core.inputs[-1].data
    assert settings[3] == 0.0  # rtol, atol, max_steps, sensitivities (off), …


def test_map_puts_an_unconverged_optimiser_in_the_fit_warnings(recwarn):
    # four observations of two subjects: the individual curves can pass through them, so sigma and
    # the omegas head for 0 (measured: sigma 8e-8, omega_V 2e-5), the density has no maximum and
    # the optimiser stops at PyMC's budget; the note says so in run.json instead of a bare
    # UserWarning on stderr
    spec, data = dataset("one_cpt_oral", "po", None)
    result = fit(spec, data, method="map", seed=1, errors={"plasma": "additive"})
    map_warning = next(w for w in result.warnings if w.startswith("method map"))
    # the reason is the optimiser's own words: PyMC's evaluation budget (`callback` raised
    # `StopIteration`) or, with other scipy/PyMC releases, L-BFGS-B's (TOTAL NO. OF F,G EVALUATIONS)
    assert re.search(r"; the optimiser stopped before converging \((`callback` raised `StopIteration`\.|STOP: TOTAL NO\. OF F,G "
                     r"EVALUATIONS EXCEEDS LIMIT)\)$", map_warning), map_warning
    assert not [w for w in recwarn if "did not converge" in str(w.message)]


@pytest.mark.parametrize("model_name", ["one_cpt_oral", "it_oncolytic_virus"])
def test_log_density_equals_pymcs_at_each_draw(model_name):
    # lp of the fast modes' sample_stats: PyMC's log density without the transforms' Jacobian
    # at the same points (rtol 1e-9); the virus model has a logit-scale fraction (f_leak), a
    # censored (M3) output and the ODE Op
    import xarray as xr

    from itpk.deterministics import log_density, posterior_dataset

    spec, data = virus() if model_name == "it_oncolytic_virus" else dataset("one_cpt_oral", "po", None)
    model, _ = build_model(spec, data)
    rng = np.random.default_rng(4)
    start = model.initial_point()
    points = [{k: v + 0.2 * rng.standard_normal(np.shape(v)) for k, v in start.items()} for _ in range(4)]
    unconstrained = {k: np.stack([p[k] for p in points]) for k in start}
    posterior = posterior_dataset(model, unconstrained, chains=2)
    assert isinstance(posterior, xr.Dataset)
    lp = log_density(model, posterior)
    expected = np.array([model.compile_logp(jacobian=False)(p) for p in points]).reshape(2, 2)
    assert lp.shape == (2, 2)
    np.testing.assert_allclose(lp, expected, rtol=1e-9)
    # and the Jacobian is what sets it apart from the sampler's density
    assert not np.allclose(lp, np.array([model.compile_logp()(p) for p in points]).reshape(2, 2), rtol=1e-6)
