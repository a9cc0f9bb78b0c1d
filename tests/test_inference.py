"""Hierarchical fits: the log-density by hand (M3 included), fast modes, run directory, CLI."""

import json
import math
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from itpk.cli.main import app
from scipy import stats
from typer.testing import CliRunner

from itpk import load_model
from itpk.dataset import read_frame
from itpk.errors import DatasetError, FitError
from itpk.inference import build_model, fit

THEOPH = Path(str(files("itpk.data") / "theoph.csv"))


def tiny_dataset(first_dv: float = 1.7):
    rows = [
        # ID TIME EVID AMT ROUTE CMT DV BLQ
        (1, 0.0, 1, 100.0, "iv", "", None, 0),
        (1, 1.0, 0, None, "", "plasma", first_dv, 0),
        (1, 6.0, 0, None, "", "plasma", 1.1, 0),
        (1, 24.0, 0, None, "", "plasma", 0.2, 1),  # BLQ: DV holds the limit
        (2, 0.0, 1, 50.0, "iv", "", None, 0),
        (2, 2.0, 0, None, "", "plasma", 0.8, 0),
        (2, 12.0, 0, None, "", "plasma", 0.35, 0),
    ]
    frame = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV", "BLQ"])
    return read_frame(frame, load_model("one_cpt_iv"))


def test_log_density_matches_hand_computation_with_m3():
    spec = load_model("one_cpt_iv")
    model, _ = build_model(spec, tiny_dataset(), errors={"plasma": "additive"})
    point = {
        "log_CL": math.log(4.0), "log_V": math.log(45.0),
        "omega_CL_log__": math.log(0.3), "omega_V_log__": math.log(0.2),
        "z_CL": np.array([0.5, -1.0]), "z_V": np.array([-0.3, 0.8]),
        "sigma_plasma_log__": math.log(0.15),
    }
    logp = model.compile_logp(jacobian=False)(point)

    CL = 4.0 * np.exp(0.3 * np.array([0.5, -1.0]))
    V = 45.0 * np.exp(0.2 * np.array([-0.3, 0.8]))
    pred = lambda i, dose, t: dose / V[i] * np.exp(-CL[i] / V[i] * t)
    prior = (stats.norm.logpdf(math.log(4.0), math.log(5.0), 1.0) + stats.norm.logpdf(math.log(45.0), math.log(50.0), 1.0)
             + stats.halfnorm.logpdf(0.3, scale=1.0) + stats.halfnorm.logpdf(0.2, scale=1.0)
             + stats.norm.logpdf([0.5, -1.0, -0.3, 0.8]).sum()
             + stats.halfnorm.logpdf(0.15, scale=float(np.median([1.7, 1.1, 0.8, 0.35]))))
    like = (stats.norm.logpdf(1.7, pred(0, 100, 1.0), 0.15) + stats.norm.logpdf(1.1, pred(0, 100, 6.0), 0.15)
            + stats.norm.logcdf(0.2, pred(0, 100, 24.0), 0.15)  # M3: P(value < LLOQ)
            + stats.norm.logpdf(0.8, pred(1, 50, 2.0), 0.15) + stats.norm.logpdf(0.35, pred(1, 50, 12.0), 0.15))
    # exact algebra, except the compiled normal log-CDF (M3 term), which agrees with scipy's to ~3e-10: rtol 1e-9
    assert logp == pytest.approx(prior + like, rel=1e-9)


def test_proportional_and_log_error_models_build():
    for kind in ("proportional", "combined", "log"):
        model, _ = build_model(load_model("one_cpt_iv"), tiny_dataset(), errors={"plasma": kind})
        assert np.isfinite(model.compile_logp()(model.initial_point()))


def test_nonlinear_model_builds_with_the_ode_op():
    frame = pd.DataFrame([(1, 0.0, 1, 100.0, "iv", "", None), (1, 1.0, 0, None, "", "plasma", 1.0),
                          (2, 0.0, 1, 300.0, "iv", "", None), (2, 2.0, 0, None, "", "plasma", 4.0)],
                         columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV"])
    spec = load_model("one_cpt_mm")
    model, _ = build_model(spec, read_frame(frame, spec))
    logp = model.compile_logp()(model.initial_point())
    dlogp = model.compile_dlogp()(model.initial_point())
    assert np.isfinite(logp) and np.all(np.isfinite(dlogp))


@pytest.mark.parametrize("kind", ["additive", "proportional", "combined", "log"])
def test_numpy_log_likelihood_equals_pymc(kind):
    # the log_likelihood group comes from IPRED draws in numpy (itpk.residuals), not from PyMC's
    # compute_log_likelihood: both on the same 50 prior draws. Quantified values rtol 1e-10; the
    # M3 terms (row 2 is censored) rtol 1e-6: PyMC's compiled normal log-CDF differs from scipy's
    # log_ndtr (exact to rounding) by up to ~3e-7 relative in the tail
    import pymc as pm
    import xarray as xr

    from itpk.inference import _complete

    fast = {"mode": "FAST_COMPILE"}  # the python linker: no numba compile in the fast suite
    model, data = build_model(load_model("one_cpt_iv"), tiny_dataset(), errors={"plasma": kind})
    prior = pm.sample_prior_predictive(draws=50, model=model, random_seed=3, compile_kwargs=fast)
    tree = xr.DataTree.from_dict({"posterior": prior["prior"].to_dataset()})
    ours = _complete(tree.copy(), model, data, seed=3)["log_likelihood"]["DV_plasma"].values
    theirs = pm.compute_log_likelihood(tree.copy(), model=model, progressbar=False,
                                       compile_kwargs=fast)["log_likelihood"]["DV_plasma"].values
    assert ours.shape == theirs.shape == (1, 50, 5)
    if kind == "log":  # PyMC's is the density of log DV; ours of DV (review, session 20): minus log DV, uncensored rows
        dv = np.array([1.7, 1.1, np.nan, 0.8, 0.35])
        theirs = theirs - np.where(np.isnan(dv), 0.0, np.log(np.where(np.isnan(dv), 1.0, dv)))
    finite = np.isfinite(theirs)
    assert finite.mean() > 0.9 and np.array_equal(finite, np.isfinite(ours))
    censored = np.zeros_like(finite)
    censored[..., 2] = True
    for mask, rtol in ((finite & ~censored, 1e-10), (finite & censored, 1e-6)):
        np.testing.assert_allclose(ours[mask], theirs[mask], rtol=rtol, atol=1e-12)


def test_posterior_predictive_draws_follow_the_error_model():
    # 20,000 draws at one posterior point: mean and SD of each observation within 4 standard
    # errors of N(μ, σ) for quantified values; censored ones never below the LLOQ (M3 reporting)
    from itpk.residuals import location_scale, observed_outputs, pointwise

    data = build_model(load_model("one_cpt_iv"), tiny_dataset(), errors={"plasma": "combined"})[1]
    (obs,) = observed_outputs(data.observations, data.outputs, data.errors)
    n = 20_000
    ipred = np.tile(np.array([[2.0, 1.2, 0.05, 0.9, 0.3]]), (n, 1))
    post = {"IPRED": ipred, "sigma_add_plasma": np.full(n, 0.1), "sigma_prop_plasma": np.full(n, 0.2)}
    _, draws = pointwise(post, obs, np.random.default_rng(0))
    mu, sd = location_scale("combined", ipred[0], {"add": 0.1, "prop": 0.2}, np)
    quantified = ~np.isfinite(obs.lower)
    np.testing.assert_allclose(draws.mean(0)[quantified], mu[quantified], atol=4 * sd.max() / math.sqrt(n))
    np.testing.assert_allclose(draws.std(0)[quantified], sd[quantified], rtol=4 / math.sqrt(2 * n))
    assert np.all(draws[:, ~quantified] >= obs.lower[~quantified])
    assert np.mean(draws[:, ~quantified] == obs.lower[~quantified]) > 0.5  # LLOQ 0.2 above the mean 0.05


def test_bad_method_and_error_override():
    with pytest.raises(FitError, match="--method 'hmc' is unknown"):
        fit(load_model("one_cpt_iv"), tiny_dataset(), method="hmc")
    with pytest.raises(FitError, match="error model override"):
        build_model(load_model("one_cpt_iv"), tiny_dataset(), errors={"plasma": "poisson"})
    with pytest.raises(FitError, match="--mass-matrix 'dense' is unknown; choices: auto, diag, low-rank"):
        fit(load_model("one_cpt_iv"), tiny_dataset(), mass_matrix="dense")


def test_low_rank_mass_matrix_samples_and_is_recorded():
    # smoke: nutpie's low-rank adaptation runs through fit(); "auto" resolves to diag for a linear model
    kw = {"draws": 30, "tune": 30, "chains": 1, "seed": 1, "errors": {"plasma": "additive"}}
    result = fit(load_model("one_cpt_iv"), tiny_dataset(), mass_matrix="low-rank", **kw)
    assert result.settings["mass_matrix"] == "low-rank"
    assert np.all(np.isfinite(np.asarray(result.tree["posterior"]["CL"])))
    assert fit(load_model("one_cpt_iv"), tiny_dataset(), **kw).settings["mass_matrix"] == "diag"


def test_centred_iiv_is_the_same_posterior_reparametrised():
    # log_CL_i = log_CL + omega_CL * z_CL: the centred density is the non-centred one divided by the
    # Jacobian omega per subject and IIV parameter; eta_* and *_i are the same deterministics
    spec = load_model("one_cpt_iv")
    kw = {"errors": {"plasma": "additive"}}
    nc, _ = build_model(spec, tiny_dataset(), **kw)
    c, _ = build_model(spec, tiny_dataset(), iiv="centred", **kw)
    assert {v.name for v in c.free_RVs} == {"log_CL", "log_V", "omega_CL", "omega_V", "log_CL_i", "log_V_i", "sigma_plasma"}
    z = {"CL": np.array([0.5, -1.0]), "V": np.array([-0.3, 0.8])}
    typical, omega = {"CL": math.log(4.0), "V": math.log(45.0)}, {"CL": 0.3, "V": 0.2}
    common = {"sigma_plasma_log__": math.log(0.15), **{f"log_{p}": typical[p] for p in z},
              **{f"omega_{p}_log__": math.log(omega[p]) for p in z}}
    p_nc = {**common, **{f"z_{p}": z[p] for p in z}}
    p_c = {**common, **{f"log_{p}_i": typical[p] + omega[p] * z[p] for p in z}}
    jacobian = sum(len(z[p]) * math.log(omega[p]) for p in z)
    assert c.compile_logp()(p_c) == pytest.approx(nc.compile_logp()(p_nc) - jacobian, rel=1e-12)
    value = lambda m, name, point: m.compile_fn(m.replace_rvs_by_values([m[name]])[0], inputs=m.value_vars,
                                                on_unused_input="ignore")(point)
    for name in ("eta_CL", "CL_i", "V_i", "IPRED"):
        np.testing.assert_allclose(value(c, name, p_c), value(nc, name, p_nc), rtol=1e-12)


def test_iiv_option_is_checked_resolved_and_recorded():
    kw = {"draws": 20, "tune": 20, "chains": 1, "seed": 1, "errors": {"plasma": "additive"}}
    with pytest.raises(FitError, match="--iiv 'partial' is unknown; choices: auto, non-centred, centred"):
        fit(load_model("one_cpt_iv"), tiny_dataset(), iiv="partial", **kw)
    result = fit(load_model("one_cpt_iv"), tiny_dataset(), iiv="centred", **kw)
    assert result.settings["iiv"] == "centred" and "log_CL_i" in result.tree["posterior"]
    assert np.all(np.isfinite(np.asarray(result.tree["posterior"]["CL_i"])))
    assert "eta_CL" in result.tree["posterior"] and "z_CL" not in result.tree["posterior"]
    # laplace integrates out the z_* values: it keeps the non-centred model whatever is asked
    laplace = fit(load_model("one_cpt_iv"), tiny_dataset(), method="laplace", iiv="centred", **kw)
    assert laplace.settings["iiv"] == "non-centred"


def test_the_compiled_sampler_is_reused_only_for_the_same_log_density(monkeypatch):
    import nutpie

    from itpk import inference

    calls = []
    real = nutpie.compile_pymc_model
    monkeypatch.setattr(nutpie, "compile_pymc_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(inference, "_compiled_models", [])
    spec = load_model("one_cpt_iv")
    kw = {"draws": 30, "tune": 30, "chains": 1, "errors": {"plasma": "additive"}}
    def draws(result):
        return np.asarray(result.tree["posterior"]["CL"]).ravel()

    first = fit(spec, tiny_dataset(), seed=5, **kw)
    again = fit(spec, tiny_dataset(), seed=5, **kw)
    assert len(calls) == 1
    np.testing.assert_array_equal(draws(again), draws(first))  # same seed, same draws
    other_seed = fit(spec, tiny_dataset(), seed=6, **kw)
    assert len(calls) == 1 and not np.array_equal(draws(other_seed), draws(first))
    # one observation changed: a different log-density, compiled anew; so is another error model
    fit(spec, tiny_dataset(first_dv=1.8), seed=5, **kw)
    assert len(calls) == 2
    fit(spec, tiny_dataset(), seed=5, **{**kw, "errors": {"plasma": "proportional"}})
    assert len(calls) == 3


@pytest.fixture(scope="module")
def theoph_nuts(tmp_path_factory):
    from itpk.dataset import read_dataset
    from itpk.run import write_run

    spec = load_model("one_cpt_oral")
    result = fit(spec, read_dataset(THEOPH, spec), draws=100, tune=100, chains=2, seed=1, errors={"plasma": "additive"})
    out = tmp_path_factory.mktemp("runs") / "theoph"
    write_run(result, out, command=["test"])
    return result, out


def test_smoke_nuts_run_directory(theoph_nuts):
    result, out = theoph_nuts
    for name in ("posterior.nc", "summary.csv", "predictions.csv", "run.json", "model.toml"):
        assert (out / name).is_file(), name
    assert not (out / "exposure.csv").exists()  # no it route in one_cpt_oral
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns[:10]) == ["parameter", "unit", "median", "mean", "sd", "ci_low", "ci_high", "r_hat", "ess_bulk", "ess_tail"]
    assert list(summary["parameter"][:3]) == ["ka", "CL", "V"]
    assert summary.set_index("parameter").loc["CL", "unit"] == "L/h"
    omegas = summary[summary["parameter"].str.startswith("omega_")]
    assert omegas["cv_percent"].notna().all() and omegas["shrinkage_percent"].notna().all()
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["ID", "TIME", "CMT", "DV", "BLQ", "PRED", "IPRED", "IRES", "PIT", "LLOQ"]
    assert len(pred) == 132 and pred["IPRED"].notna().all() and pred["PRED"].notna().all()
    record = json.loads((out / "run.json").read_text())
    assert record["model"] == "one_cpt_oral" and len(record["data_sha256"]) == 64
    assert record["units_sha256"] is None  # Theoph has no units sidecar
    assert "M3" in record["censoring_method"] and record["settings"]["seed"] == 1
    assert set(record["diagnostics"]) >= {"max_r_hat", "min_ess_bulk", "divergences", "passed"}
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data", "constant_data", "sample_stats", "prior"):
        assert group in result.tree.children, group
    # constant_data, read back from posterior.nc: the design on IPRED's observation coordinate
    import xarray as xr

    const = xr.open_datatree(out / "posterior.nc")["constant_data"].to_dataset()
    np.testing.assert_array_equal(const["observation"].values, result.tree["posterior"]["observation"].values)
    assert const["TIME"].values[:2].tolist() == [0.0, 0.25] and set(const["output"].values.tolist()) == {"plasma"}
    assert const["dose_ROUTE"].values.tolist() == ["po"] * 12 and const["dose_AMT"].values[0] == pytest.approx(319.992)
    assert const.sizes == {"observation": 132, "subject": 12, "dose_row": 12}
    # a short run: CL within a factor 1.5 of the published 2.75 L/h
    cl = summary.set_index("parameter").loc["CL", "median"]
    assert 2.75 / 1.5 < cl < 2.75 * 1.5


def test_a_fit_whose_exposure_table_fails_is_kept_with_a_warning(theoph_nuts, tmp_path, monkeypatch):
    # e.g. a trial that injected a lesion no [exposure] output reads alone (itpk.exposure.roles_at):
    # the run directory is written without exposure.csv and run.json says why
    import itpk.run
    from itpk.errors import ItpkError

    def refuse(result):
        raise ItpkError("model 'x': no [exposure] output reads lesion 'lesion2' alone")

    monkeypatch.setattr(itpk.run, "exposure_table", refuse)
    result, _ = theoph_nuts
    out = itpk.run.write_run(result, tmp_path / "run", command=["test"])
    assert (out / "posterior.nc").is_file() and not (out / "exposure.csv").exists()
    warnings = json.loads((out / "run.json").read_text())["warnings"]
    assert warnings[-1] == "exposure.csv not written: model 'x': no [exposure] output reads lesion 'lesion2' alone"


def test_simulate_from_a_posterior(theoph_nuts, tmp_path):
    # one subject: the typical profile at every draw (200 here), each equal to simulate at that
    # draw's values (rtol 1e-12); --subjects N: reproducible by seed, different across seeds
    from itpk.simulate import simulate
    from itpk.workflows import run_simulation

    result, out = theoph_nuts
    spec = load_model("one_cpt_oral")
    times = [0.5, 2.0, 12.0]
    typical = run_simulation("one_cpt_oral", route="po", dose=320.0, at=times, posterior=out)
    profiles = typical.profiles.outputs["plasma"]
    assert profiles.shape == (200, 3)
    post = result.tree["posterior"]
    for k in (0, 77, 199):
        values = {name: float(np.asarray(post[name]).reshape(-1)[k]) for name in ("ka", "CL", "V")}
        want = simulate(spec, typical.schedule, values, np.array(times)).outputs["plasma"][0]
        np.testing.assert_allclose(profiles[k], want, rtol=1e-12)
    assert "the typical subject at 200 posterior draw(s)" in typical.message
    pop = [run_simulation("one_cpt_oral", route="po", dose=320.0, at=times, posterior=out, subjects=40, seed=seed,
                          out=tmp_path / f"pop{seed}.csv") for seed in (7, 7, 8)]
    first, again, other = (p.profiles.outputs["plasma"] for p in pop)
    assert first.shape == (40, 3) and np.array_equal(first, again) and not np.array_equal(first, other)
    assert pd.read_csv(tmp_path / "pop7.csv").columns.tolist() == ["ID", "TIME", "OUTPUT", "VALUE", "UNIT"]


def test_same_seed_same_numbers(theoph_nuts):
    from itpk.dataset import read_dataset

    result, _ = theoph_nuts
    spec = load_model("one_cpt_oral")
    again = fit(spec, read_dataset(THEOPH, spec), draws=100, tune=100, chains=2, seed=1, errors={"plasma": "additive"})
    np.testing.assert_array_equal(np.asarray(again.tree["posterior"]["CL"]), np.asarray(result.tree["posterior"]["CL"]))


@pytest.mark.parametrize("method", ["map", "laplace", "advi"])
def test_fast_modes(method, tmp_path):
    from itpk.dataset import read_dataset
    from itpk.run import write_run

    spec = load_model("one_cpt_oral")
    result = fit(spec, read_dataset(THEOPH, spec), method=method, draws=50, seed=2, errors={"plasma": "additive"})
    assert result.warnings  # says which numbers not to trust
    out = write_run(result, tmp_path / method)
    assert (out / "summary.csv").is_file()
    # SPEC §5's groups for every method; lp is the log density of each draw (tests/test_deterministics.py)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data", "constant_data", "sample_stats", "prior"):
        assert group in result.tree.children, group
    lp = result.tree["sample_stats"]["lp"]
    assert lp.dims == ("chain", "draw") and lp.shape == result.tree["posterior"]["CL"].shape and np.isfinite(lp).all()
    cl = pd.read_csv(out / "summary.csv").set_index("parameter").loc["CL", "median"]
    assert 1.5 < cl < 5.0


def test_laplace_marginalises_the_random_effects_on_theoph():
    # Laplace on Theoph with additive error: within 5% of nlmixr2 FOCEi's published
    # ka 1.593 /h, CL 2.752 L/h, V 31.81 L; unlike MAP the IIV does not collapse: omega_CL and
    # omega_V within a factor 1.5 of this model's NUTS posterior medians (0.30, 0.16: 4 x 1000 draws, seed 1)
    # and every omega's 95% interval away from 0
    from itpk.dataset import read_dataset
    from itpk.run import summary_table

    spec = load_model("one_cpt_oral")
    result = fit(spec, read_dataset(THEOPH, spec), method="laplace", draws=400, seed=3, errors={"plasma": "additive"})
    table = summary_table(result).set_index("parameter")
    for name, published in (("ka", 1.593), ("CL", 2.752), ("V", 31.81)):
        assert table.loc[name, "median"] == pytest.approx(published, rel=0.05), name
    for name, nuts in (("omega_CL", 0.30), ("omega_V", 0.16)):
        assert nuts / 1.5 < table.loc[name, "median"] < nuts * 1.5, name
    assert (table.loc[["omega_ka", "omega_CL", "omega_V"], "ci_low"] > 0.05).all()
    assert "Laplace" in result.warnings[0]


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", str(THEOPH), "--model", "nope", "--out", "x"], "unknown model 'nope'"),
        (["fit", str(THEOPH), "--model", "one_cpt_oral", "--out", "x", "--method", "hmc"], "--method 'hmc' is unknown"),
        (["fit", str(THEOPH), "--model", "one_cpt_oral", "--out", "x", "--draws", "0"], "--draws must be a whole number >= 1"),
        (["fit", str(THEOPH), "--model", "one_cpt_oral", "--out", "x", "--error", "plasma"], "--error 'plasma': expected OUTPUT=MODEL"),
        (["fit", str(THEOPH), "--model", "one_cpt_oral", "--out", "x", "--target-accept", "1.2"], "--target-accept must be in [0.5, 1)"),
        (["fit", "missing.csv", "--model", "one_cpt_oral", "--out", "x"], "missing.csv"),
    ],
)
def test_fit_bad_input_exits_1(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_compare_with_posterior_of_a_run(tmp_path):
    from itpk.dataset import read_dataset
    from itpk.run import write_run

    spec = load_model("it_antibody")
    data = read_dataset(Path(str(files("itpk.data") / "example_it_vs_iv.csv")), spec)
    result = fit(spec, data, method="map", seed=3)
    run_dir = write_run(result, tmp_path / "run")
    assert (run_dir / "exposure.csv").is_file()
    import hashlib

    sidecar = Path(str(files("itpk.data") / "example_it_vs_iv.units.toml"))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["units_sha256"] == hashlib.sha256(sidecar.read_bytes()).hexdigest()
    # simulate from the same run at the CLI: the model named by its file, a covariate set, 3 subjects
    model_file = Path(str(files("itpk.models") / "it_antibody.toml"))
    sim = runner.invoke(app, ["simulate", str(model_file), "--route", "it", "--dose", "10", "--at", "1,24",
                              "--posterior", str(run_dir), "--subjects", "3", "--seed", "1", "--set", "DIAM=2.5",
                              "--out", str(tmp_path / "sim.csv")])
    assert sim.exit_code == 0, sim.output
    frame = pd.read_csv(tmp_path / "sim.csv")
    assert len(frame) == 3 * 2 * 4 and sorted(frame["ID"].unique()) == [1, 2, 3]
    wrong = runner.invoke(app, ["simulate", "one_cpt_oral", "--route", "po", "--dose", "1", "--posterior", str(run_dir),
                                "--out", str(tmp_path / "x.csv")])
    assert wrong.exit_code == 1 and "holds a fit of model 'it_antibody', not 'one_cpt_oral'" in wrong.output
    out = runner.invoke(app, ["compare", "it_antibody", "--dose", "10", "--posterior", str(run_dir), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["metrics"]["G"] > 1  # one MAP draw: a single number
    # without --set, the typical subject of the fitted trial (its median covariates), as in
    # exposure.csv: G is dose-free in this linear model, so the same number to rounding
    trial = record["typical_covariates"]  # DIAM only: the file has no DIAM2 column (that keeps the model's 2 cm)
    assert list(trial) == ["DIAM"] and trial["DIAM"] != spec.covariates["DIAM"].value
    assert doc["trial_covariates"] == pytest.approx(trial, rel=1e-12)
    exposure = pd.read_csv(run_dir / "exposure.csv").set_index("metric")
    assert doc["metrics"]["G"] == pytest.approx(exposure.loc["G", "median"], rel=1e-9)
    # one MAP draw: NUTS's columns, but no interval or probability (not a zero-width interval)
    assert {"ci_low", "ci_high", "P(>1)"} <= set(exposure.columns)
    assert exposure[["ci_low", "ci_high", "P(>1)"]].isna().all().all()
    assert "covariates of the fitted trial (median): DIAM" in runner.invoke(
        app, ["compare", "it_antibody", "--dose", "10", "--posterior", str(run_dir), "--out", str(tmp_path / "c.csv")]).output
    # the CSV says which patient too: one covariate row, in the model's unit
    rows = pd.read_csv(tmp_path / "c.csv")
    covariate = rows[rows["kind"] == "covariate"]
    assert list(covariate["quantity"]) == ["DIAM"] and list(covariate["unit"]) == ["cm"]
    assert covariate["value"].item() == pytest.approx(trial["DIAM"], rel=1e-12)
    # --set wins over the trial's value, and is no longer listed as the trial's
    given = json.loads(runner.invoke(app, ["compare", "it_antibody", "--dose", "10", "--posterior", str(run_dir),
                                           "--set", "DIAM=2.0", "--json"]).output)
    assert "DIAM" not in given.get("trial_covariates", {}) and given["metrics"]["G"] != pytest.approx(doc["metrics"]["G"], rel=1e-3)
    # a regimen's --diam (which build_schedule puts in the overrides) wins over the trial's median too;
    # the T-VEC regimen itself doses PFU, which this antibody model does not count
    from itpk.workflows import _trial_covariates

    assert _trial_covariates(spec, {"DIAM": 2.0}, trial, posterior=True)[0] == {}
    refused = runner.invoke(app, ["compare", "it_antibody", "--regimen", "tvec", "--diam", "2.0", "--posterior", str(run_dir)])
    assert refused.exit_code == 1 and "--regimen tvec doses PFU (a virus), but route it doses mg" in refused.output
    # simulate takes the trial's covariates too: the same lesion profile as --set DIAM=<median>
    median = f"DIAM={trial['DIAM']!r}"
    sims = [runner.invoke(app, ["simulate", "it_antibody", "--route", "it", "--dose", "10", "--at", "1,24", "--posterior", str(run_dir),
                                *extra, "--out", str(tmp_path / f"s{k}.csv")]) for k, extra in enumerate([[], ["--set", median]])]
    assert "covariates of the fitted trial (median): DIAM" in sims[0].output and "covariates of the fitted" not in sims[1].output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "s0.csv"), pd.read_csv(tmp_path / "s1.csv"))
    # a run written before fits recorded them: the model file's values, and a note saying so
    del record["typical_covariates"]
    (run_dir / "run.json").write_text(json.dumps(record))
    old = json.loads(runner.invoke(app, ["compare", "it_antibody", "--dose", "10", "--posterior", str(run_dir), "--json"]).output)
    assert "trial_covariates" not in old and any("does not record its trial's covariates" in n for n in old["notes"])


def test_compare_posterior_bad_run_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    out = runner.invoke(app, ["compare", "it_antibody", "--dose", "10", "--posterior", str(tmp_path / "empty")])
    assert out.exit_code == 1 and "is incomplete: missing posterior.nc" in out.output


def test_infinite_initial_log_density_is_explained():
    from itpk.dataset import read_dataset

    spec = load_model("one_cpt_oral")
    # Theoph has pre-dose concentrations (0.74 mg/L at t = 0) where the prediction is exactly 0
    with pytest.raises(FitError, match=r"not finite at the initial point \(DV_plasma\).*--error plasma=combined"):
        fit(spec, read_dataset(THEOPH, spec), errors={"plasma": "proportional"}, method="map")


def test_dv_not_positive_under_the_log_error_model_is_a_data_problem():
    # the message names the rows and the fixes, not "a prediction of 0"
    rows = [(1, 0.0, 1, 100.0, None, None, None, 0, "po", "", None),
            (1, 1.0, 0, None, None, None, None, 0, "", "plasma", 0.0),
            (1, 2.0, 0, None, None, None, None, 0, "", "plasma", 1.5),
            (1, 4.0, 0, None, None, None, None, 0, "", "plasma", -0.2)]
    spec = load_model("one_cpt_oral")
    dataset = read_frame(steady_state_frame(rows), spec)
    with pytest.raises(FitError, match=r"^plasma: DV <= 0 on rows 3 \(0\), 5 \(-0.2\) under the log error model, which needs "
                                       r"DV > 0; mark them BLQ=1 with their LLOQ, or use --error plasma=additive$"):
        fit(spec, dataset, method="map", errors={"plasma": "log"})


def steady_state_frame(rows):
    return pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "RATE", "II", "ADDL", "SS", "ROUTE", "CMT", "DV"])


def test_steady_state_doses_in_a_fit_predict_what_simulate_does():
    # IPRED of the fitted model at the initial point (typical values, z = 0) against simulate for
    # the same schedules, rtol 1e-10: SS=1 oral doses with ADDL, an SS=2 dose, an SS=1 infusion
    rows = [
        (1, 0.0, 1, 320.0, None, 12.0, 2, 1, "po", "", None),
        (1, 1.0, 0, None, None, None, None, 0, "", "plasma", 8.0),
        (1, 11.9, 0, None, None, None, None, 0, "", "plasma", 3.0),
        (1, 30.0, 0, None, None, None, None, 0, "", "plasma", 6.0),
        (1, 40.0, 1, 100.0, None, 8.0, 0, 2, "po", "", None),
        (1, 41.0, 0, None, None, None, None, 0, "", "plasma", 7.0),
        (2, 5.0, 1, 200.0, 100.0, 24.0, 0, 1, "iv", "", None),
        (2, 5.5, 0, None, None, None, None, 0, "", "plasma", 5.0),
        (2, 20.0, 0, None, None, None, None, 0, "", "plasma", 2.0),
    ]
    check_ipred_is_simulated(load_model("one_cpt_oral"), rows)


def test_steady_state_infusions_longer_than_their_interval_predict_what_simulate_does():
    # a 20 h infusion every 12 h (its predecessor still runs when it starts) and a 30 h one every
    # 8 h on top (SS=2): IPRED against simulate, rtol 1e-10
    rows = [(1, 0.0, 1, 100.0, 5.0, 12.0, 0, 1, "iv", "", None),
            (1, 2.0, 0, None, None, None, None, 0, "", "plasma", 1.0),
            (1, 25.0, 0, None, None, None, None, 0, "", "plasma", 1.0),
            (1, 30.0, 1, 90.0, 3.0, 8.0, 0, 2, "iv", "", None),
            (1, 31.0, 0, None, None, None, None, 0, "", "plasma", 1.0),
            (1, 70.0, 0, None, None, None, None, 0, "", "plasma", 1.0)]
    check_ipred_is_simulated(load_model("one_cpt_iv"), rows)


def check_ipred_is_simulated(spec, rows):
    """IPRED of the fitted model at the initial point (typical values, z = 0) against simulate."""
    from itpk.simulate import simulate
    from itpk.subjects import subjects

    dataset = read_frame(steady_state_frame(rows), spec)
    model, data = build_model(spec, dataset)
    ipred_of_values = model.replace_rvs_by_values([model["IPRED"]])[0]
    ipred = model.compile_fn(ipred_of_values, inputs=model.value_vars, on_unused_input="ignore")(model.initial_point())
    typical = {name: p.prior.args["median"] for name, p in spec.parameters.items() if name in data.estimated}
    for i, subject in enumerate(subjects(dataset, spec)):
        rows_i = data.observations["subject"].to_numpy() == i
        times = data.observations["TIME"].to_numpy()[rows_i]
        want = simulate(spec, subject.schedule, typical, times).outputs["plasma"][0]
        np.testing.assert_allclose(ipred[rows_i], want, rtol=1e-10)


def test_steady_state_doses_a_fit_cannot_use_are_refused_with_the_reason():
    # RATE far too small: a 1 mg/h infusion of 5 000 mg every 2 h would overlap 2 500 predecessors
    too_long = [(1, 0.0, 1, 5000.0, 1.0, 2.0, 0, 1, "iv", "", None), (1, 2.0, 0, None, None, None, None, 0, "", "plasma", 1.0)]
    with pytest.raises(DatasetError, match=r"subject 1, time 0: steady-state infusion lasting 5000, 2500 times its interval "
                                           r"II=2: more than 1000 overlapping predecessors \(check RATE, AMT and II\)"):
        build_model(load_model("one_cpt_iv"), read_frame(steady_state_frame(too_long), load_model("one_cpt_iv")))
    nonlinear = [(1, 0.0, 1, 100.0, None, 12.0, 0, 1, "iv", "", None), (1, 2.0, 0, None, None, None, None, 0, "", "plasma", 1.0)]
    spec = load_model("one_cpt_mm")
    with pytest.raises(FitError, match=r"steady-state doses \(SS=1/2\) can be fitted with linear models without initial amounts only; one_cpt_mm is nonlinear"):
        build_model(spec, read_frame(steady_state_frame(nonlinear), spec))


def two_lesion_frame():
    """it_antibody-style trial: subject 1 injects lesion2 then the first lesion, subject 2 only the first,
    subject 3 gets iv; plasma, tumor and lesion2 measured."""
    rows = []
    for sid, doses in ((1, (("it", "lesion2", 0.0), ("it", "", 24.0), ("it", "2", 48.0))), (2, (("it", "", 0.0),)),
                       (3, (("iv", "", 0.0),))):
        rows += [(sid, t, 1, 10.0, route, cmt, None, 2.5) for route, cmt, t in doses]
        rows += [(sid, t, 0, None, "", output, 0.1, 2.5) for t in (0.5, 6.0, 30.0, 72.0) for output in ("plasma", "tumor", "lesion2")]
    frame = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV", "DIAM2"])
    return frame.sort_values(["ID", "TIME"], kind="stable")


@pytest.mark.parametrize(("index", "rtol"), [(0, 1e-9), (1, 1e-5)], ids=["linear-eigen-op", "nonlinear-ode-op"])
def test_fit_predictions_of_it_doses_into_the_second_lesion_are_simulated(index, rtol):
    # IPRED at a random point against simulate with the same individual parameters: the eigen Op
    # (exact, rtol 1e-9) and the ODE Op (DP5 at rtol 1e-8 on this non-stiff model, rtol 1e-5). Sending
    # the lesion2 doses to the first lesion instead changes lesion2 by orders of magnitude.
    from ipred_reference import ipred_and_reference
    from test_simulate import two_lesion_models

    spec = two_lesion_models()[index]
    ipred, ref, *_ = ipred_and_reference(spec, read_frame(two_lesion_frame(), spec))
    np.testing.assert_allclose(ipred, ref, rtol=rtol)


def test_exposure_table_compares_the_lesion_the_trial_injected():
    # exposure.csv is the §6 metrics at the posterior: "tumor" is the lesion the dataset's first it
    # dose injected. A trial whose first it dose went to lesion2 gets lesion2's gain, equal to
    # compare_routes with Target("it", site="lesion2") at the same draws (rtol 1e-12); the same
    # trial injecting the first lesion first gets the first lesion's (different: DIAM2 = 2.5 != DIAM).
    import xarray as xr

    from itpk.events import Target, regimen
    from itpk.exposure import compare_routes
    from itpk.inference import FitResult, prepare
    from itpk.run import exposure_table
    from itpk.system import resolve

    spec = load_model("it_linear")
    rng = np.random.default_rng(5)

    def table(frame):
        data = prepare(spec, read_frame(frame, spec))
        post = xr.Dataset({n: (("chain", "draw"), float(spec.parameters[n].value) * np.exp(0.2 * rng.standard_normal((2, 3))))
                           for n in data.estimated})
        return exposure_table(FitResult({"posterior": post}, data, "nuts", {}, {}, ())), post, data

    frame = two_lesion_frame()
    frame["DIAM"] = frame["ID"].map({1: 2.0, 2: 3.0, 3: 3.5})
    into2, post, data = table(frame)
    assert set(into2["route"]) == {"it@lesion2 vs iv"}
    # the trial's typical subject: median DIAM 3 cm and DIAM2 2.5 cm, not the model file's 2 and 2 cm
    # (review, session 20: G was computed for a lesion of another size)
    assert set(into2["covariates"]) == {"DIAM=3 cm; DIAM2=2.5 cm"}
    values = resolve(spec, {**{n: np.asarray(post[n]).reshape(-1) for n in data.estimated}, "DIAM": 3.0, "DIAM2": 2.5})
    ref = compare_routes(spec, values, {"it": regimen(Target("it", site="lesion2"), 10.0), "iv": regimen("iv", 10.0)}, dose=10.0)
    got = into2.set_index("metric")["median"]
    for name in ("G", "S", "TI", "abscopal"):
        assert got[name] == pytest.approx(np.median(ref.metrics["it"][name]), rel=1e-12), name
    at_defaults = compare_routes(spec, resolve(spec, {n: np.asarray(post[n]).reshape(-1) for n in data.estimated}),
                                 {"it": regimen(Target("it", site="lesion2"), 10.0), "iv": regimen("iv", 10.0)}, dose=10.0)
    assert got["G"] != pytest.approx(np.median(at_defaults.metrics["it"]["G"]), rel=0.1)
    first = frame[~((frame["ID"] == 1) & (frame["TIME"] == 0.0) & (frame["EVID"] == 1))]  # subject 1 starts at 24 h
    own, *_ = table(first)
    assert set(own["route"]) == {"it vs iv"}
    assert own.set_index("metric")["median"]["abscopal"] != pytest.approx(got["abscopal"], rel=1e-3)


def test_a_dataset_without_doses_is_refused_before_fitting():
    # found by review (session 19): an IndexError traceback from the first log-density
    frame = pd.DataFrame({"ID": [1, 1], "TIME": [1.0, 2.0], "EVID": [0, 0], "DV": [1.0, 0.5], "CMT": ["plasma", "plasma"]})
    with pytest.raises(FitError, match=r"no dose rows \(EVID 1 or 4\), and model 'one_cpt_iv' starts empty"):
        fit(load_model("one_cpt_iv"), read_frame(frame, load_model("one_cpt_iv")), method="map")


def test_a_negative_seed_is_refused():
    with pytest.raises(FitError, match=r"--seed must be a whole number from 0 to 9223372036854775807, found -1"):
        fit(load_model("one_cpt_iv"), tiny_dataset(), method="map", seed=-1)


def test_a_turnover_model_needs_no_doses():
    # review (session 19): the no-dose check must not refuse a model whose ODEs produce on their own
    from itpk.inference import prepare
    from itpk.spec import parse_model

    raw = {"name": "turnover", "time_unit": "h", "compartments": {"R": {"amount_unit": "mg", "volume": "V"}},
           "parameters": {"kin": {"value": 1.0, "unit": "mg/h", "prior": {"dist": "lognormal", "median": 1.0, "sigma": 0.5}},
                          "kout": {"value": 0.1, "unit": "1/h"}, "V": {"value": 1.0, "unit": "L"}},
           "odes": {"R": "kin - kout * R"}, "routes": {"iv": {"into": {"R": 1}}},
           "outputs": {"plasma": {"expr": "R / V", "unit": "mg/L"}}}
    spec = parse_model(raw)
    frame = pd.DataFrame({"ID": [1, 1], "TIME": [1.0, 5.0], "EVID": [0, 0], "DV": [1.0, 4.0], "CMT": ["plasma", "plasma"]})
    assert prepare(spec, read_frame(frame, spec)).estimated == ("kin",)


def test_censored_rows_carry_their_limit_and_no_residual():
    # review (session 20): a BLQ row with its limit in LLOQ and DV blank gave the report NaN VPC bands,
    # and IRES = DV - IPRED on censored rows was not a residual. predictions.csv now has the limit
    # (LLOQ column) and a blank IRES there; a single-draw method has no PIT
    from itpk.report import _lloq
    from itpk.run import predictions_table

    rows = [(1, 0.0, 1, 100.0, "iv", "", None, 0, None), (1, 1.0, 0, None, "", "plasma", 1.7, 0, None),
            (1, 6.0, 0, None, "", "plasma", 1.1, 0, None), (1, 24.0, 0, None, "", "plasma", None, 1, 0.2),
            (2, 0.0, 1, 50.0, "iv", "", None, 0, None), (2, 2.0, 0, None, "", "plasma", 0.8, 0, None),
            (2, 12.0, 0, None, "", "plasma", 0.05, 0, 0.1)]  # DV below its LLOQ: censored at 0.1
    frame = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV", "BLQ", "LLOQ"])
    spec = load_model("one_cpt_iv")
    result = fit(spec, read_frame(frame, spec), method="map", seed=1)
    table = predictions_table(result)
    censored = table["BLQ"] == 1
    assert censored.tolist() == [False, False, True, False, True]
    assert table.loc[censored, "LLOQ"].tolist() == [0.2, 0.1] and table.loc[~censored, "LLOQ"].isna().all()
    assert table.loc[censored, "IRES"].isna().all() and table.loc[~censored, "IRES"].notna().all()
    assert table["PIT"].isna().all()  # one draw
    np.testing.assert_allclose(_lloq(table), [0.15, 0.15, 0.2, 0.15, 0.1], rtol=1e-12)  # uncensored rows: the median limit


def test_new_subjects_draw_fresh_random_effects_for_the_vpc():
    # review (session 20): the VPC simulated the fitted subjects with their own eta, blind to a wrong
    # IIV. itpk.inference.new_subjects keeps each subject's design and the posterior's population
    # values, draws eta ~ N(0, omega^2) afresh: here against the one-compartment closed form with the
    # same random numbers (sigma 1e-9: the values are the predictions, rtol 1e-7), censored rows
    # clipped at their LLOQ; the fitted subjects' z (3.0 here) play no part
    import xarray as xr

    from itpk.inference import NEW_SUBJECT_DRAWS, new_subjects

    spec = load_model("one_cpt_iv")
    model, data = build_model(spec, tiny_dataset(), errors={"plasma": "additive"})
    population = {"log_CL": np.log(2.0), "log_V": np.log(30.0), "omega_CL": 0.5, "omega_V": 0.2, "sigma_plasma": 1e-9}
    post = xr.Dataset({**{k: (("chain", "draw"), [[v]]) for k, v in population.items()},
                       **{f"z_{p}": (("chain", "draw", "subject"), np.full((1, 1, 2), 3.0)) for p in data.iiv}})
    got = new_subjects(post, model, data, np.random.default_rng(7))["DV_plasma"].values[0]
    rng = np.random.default_rng(7)
    z = {rv.name[2:]: rng.standard_normal((NEW_SUBJECT_DRAWS, 2)) for rv in model.free_RVs if rv.name.startswith("z_")}
    assert set(z) == {"CL", "V"}
    cl = 2.0 * np.exp(0.5 * z["CL"])
    v = 30.0 * np.exp(0.2 * z["V"])
    obs = data.observations
    subject = obs["subject"].to_numpy()
    dose = np.array([100.0, 50.0])[subject]
    expected = dose / v[:, subject] * np.exp(-cl[:, subject] / v[:, subject] * obs["TIME"].to_numpy())
    expected = np.where(obs["censored"].to_numpy(), np.maximum(expected, obs["LLOQ"].to_numpy()), expected)
    assert got.shape == (NEW_SUBJECT_DRAWS, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    # a centred fit (log_CL_i free) gets the same replicates: new eta come from the non-centred form
    centred, _ = build_model(spec, tiny_dataset(), errors={"plasma": "additive"}, iiv="centred")
    post_c = xr.Dataset({**{k: (("chain", "draw"), [[v]]) for k, v in population.items()},
                         **{f"log_{p}_i": (("chain", "draw", "subject"), np.full((1, 1, 2), 1.0)) for p in data.iiv}})
    again = new_subjects(post_c, centred, data, np.random.default_rng(7))["DV_plasma"].values[0]
    np.testing.assert_array_equal(again, got)
