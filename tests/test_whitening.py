"""Whitened sampling coordinates: mode and curvature of known densities, the exact change of variables."""

import arviz as az
import numpy as np
import pytest
from test_inference import tiny_dataset

from itpk import load_model
from itpk.inference import build_model, fit
from itpk.whitening import MEAN, MIN_CURVATURE, ROOT, WHITENED, Whitening, find_whitening, from_draws, unwhiten, whitened_model


def gaussian(mu, precision):
    def logp_dlogp(x):
        d = x - mu
        return -0.5 * d @ precision @ d, -precision @ d
    return logp_dlogp


def test_the_mode_and_covariance_of_a_correlated_gaussian_are_recovered():
    rng = np.random.default_rng(4)
    mu = rng.normal(size=5)
    # correlation 0.99 between two coordinates and scales from 0.01 to 10, as in the virus posterior
    cov = np.diag([0.01, 1.0, 10.0, 0.5, 2.0]) ** 2
    cov[3, 4] = cov[4, 3] = 0.99 * 0.5 * 2.0
    result = find_whitening(gaussian(mu, np.linalg.inv(cov)), np.zeros(5))
    # L-BFGS stops at |grad| < 1e-3 (gtol): the mode within 1e-3 of each sd; central differences of
    # a linear gradient are exact up to rounding: the covariance to 1e-6 relative
    assert np.all(np.abs(result.mean - mu) < 1e-3 * np.sqrt(np.diag(cov)) + 1e-8)
    np.testing.assert_allclose(result.root @ result.root.T, cov, rtol=1e-6, atol=1e-12)
    assert result.clipped == 0
    assert result.logp == pytest.approx(0.0, abs=1e-6)


def test_flat_and_negative_curvatures_are_clipped_to_a_positive_metric():
    # a saddle in x1 around a maximum in x0; x2 flat: no mode, but a usable metric
    def logp_dlogp(x):
        return -0.5 * x[0] ** 2 + 0.5 * 0.04 * x[1] ** 2 - 1e-9 * x[2], np.array([-x[0], 0.04 * x[1], -1e-9])
    result = find_whitening(logp_dlogp, np.array([1.0, 0.0, 0.0]))
    cov = result.root @ result.root.T
    assert result.clipped == 2
    # |eigenvalue| where it exceeds the floor (0.04), the floor where it is flat; the exact values
    np.testing.assert_allclose(np.diag(cov), [1.0, 1 / 0.04, 1 / MIN_CURVATURE], rtol=1e-6)


def test_a_whitening_from_draws_is_their_mean_and_shrunk_covariance():
    rng = np.random.default_rng(6)
    cov = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.01]])
    x = rng.multivariate_normal([1.0, -2.0, 3.0], cov, size=400)
    result = from_draws(x, gradients=123)
    sample = np.cov(x.T)
    # Stan's regularisation, by hand: (n C + 5 diag C) / (n + 5); the root's square exact to rounding
    np.testing.assert_allclose(result.root @ result.root.T, (400 * sample + 5 * np.diag(np.diag(sample))) / 405,
                               rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(result.mean, x.mean(axis=0), rtol=1e-12)
    # and close to the truth: 400 draws, standard errors ~5% of each sd
    np.testing.assert_allclose(np.sqrt(np.diag(result.root @ result.root.T)), [1.0, 1.0, 0.1], rtol=0.15)
    assert result.gradients == 123
    with pytest.raises(ValueError, match="at least 2 finite draws"):
        from_draws(x[:1])


def test_a_whitening_validates_its_shapes():
    with pytest.raises(ValueError, match=r"mean \(D,\) and root \(D, D\)"):
        Whitening(np.zeros(3), np.eye(2), 0.0, 0, 0)
    with pytest.raises(ValueError, match="finite"):
        Whitening(np.array([0.0, np.nan]), np.eye(2), 0.0, 0, 0)


def test_the_whitened_density_is_the_models_at_the_mapped_point():
    model, _ = build_model(load_model("one_cpt_iv"), tiny_dataset(), errors={"plasma": "additive"})
    whitened = whitened_model(model)
    point = model.initial_point()
    size = sum(np.size(point[v.name]) for v in model.value_vars)
    rng = np.random.default_rng(5)
    mean, root, u = rng.normal(size=size), rng.normal(size=(size, size)) / 3, rng.normal(size=size)
    whitened[MEAN].set_value(mean)
    whitened[ROOT].set_value(root)
    values = unwhiten(u, Whitening(mean, root, 0.0, 0, 0), model)
    theirs = model.compile_logp(mode="FAST_COMPILE")(values)
    ours = whitened.compile_logp(mode="FAST_COMPILE")({WHITENED: u})
    # the same graph evaluated at the same point: equal to rounding (rel 1e-12)
    assert ours == pytest.approx(theirs, rel=1e-12)
    for v in model.value_vars:
        assert np.shape(values[v.name]) == np.shape(point[v.name])


def test_a_preconditioned_fit_samples_the_same_posterior_in_the_models_own_variables():
    spec = load_model("one_cpt_iv")
    options = {"draws": 200, "tune": 300, "chains": 2, "seed": 2, "errors": {"plasma": "additive"}}
    plain = fit(spec, tiny_dataset(), precondition="none", **options)
    whitened = fit(spec, tiny_dataset(), precondition="mode", **options)
    ours, theirs = whitened.tree["posterior"], plain.tree["posterior"]
    assert set(ours.data_vars) == set(theirs.data_vars)
    for name in theirs.data_vars:
        assert ours[name].dims == theirs[name].dims, name
    assert ours.sizes["draw"] == 200 and np.all(ours["omega_CL"].values > 0)
    # the deterministics follow from the unwhitened draws
    np.testing.assert_allclose(ours["CL"].values, np.exp(ours["log_CL"].values), rtol=1e-12)
    # the same posterior: means within 4 Monte Carlo standard errors of their difference
    names = [n for n in theirs.data_vars if n.startswith(("log_", "z_", "omega_", "sigma_"))]
    mcse = [az.mcse(tree.to_dataset()[names], method="mean") for tree in (ours, theirs)]
    for name in names:
        diff = np.abs(ours[name].mean(("chain", "draw")).values - theirs[name].mean(("chain", "draw")).values)
        bound = 4 * np.hypot(mcse[0][name].values, mcse[1][name].values)
        assert np.all(diff < bound), (name, diff, bound)
    record = whitened.settings["precondition"]
    model, _ = build_model(spec, tiny_dataset(), errors={"plasma": "additive"}, iiv=whitened.settings["iiv"])
    size = sum(np.size(value) for value in model.initial_point().values())
    assert record["method"] == "mode" and record["dimension"] == size and record["gradients"] > 2 * size
    assert record["pilot_tune"] == 100 and record["pilot_gradients"] >= 150
    assert plain.settings["precondition"] == {"method": "none"}
    assert "log_likelihood" in whitened.tree.children and "warmup_posterior" not in whitened.tree.children


def test_a_nonlinear_model_is_whitened_by_default_and_keeps_its_own_variables():
    from test_deterministics import dataset

    spec, data = dataset("one_cpt_mm", "iv", None)
    result = fit(spec, data, draws=20, tune=20, chains=1, seed=4)
    record = result.settings["precondition"]
    # tune 20 < 300: the mode's Hessian only, no pilot; diag on top (mass_matrix "auto")
    assert record["method"] == "mode" and "pilot_tune" not in record and result.settings["mass_matrix"] == "diag"
    post = result.tree["posterior"]
    assert np.all(np.isfinite(post["IPRED"].values)) and post["IPRED"].dims == ("chain", "draw", "observation")
    assert "whitened" not in post and post.sizes["draw"] == 20
