"""benchmarks/posterior_geometry.py: the curvature and R-hat measurements behind the virus notes."""

from __future__ import annotations

import numpy as np
import pytest
from bench_scripts import load


@pytest.fixture(scope="module")
def geometry():
    return load("posterior_geometry")


def _gaussian(cov: np.ndarray):
    precision = np.linalg.inv(cov)

    def logp_dlogp(x: np.ndarray):
        return -0.5 * x @ precision @ x, -precision @ x

    return logp_dlogp


def test_curvature_of_a_gaussian_is_one_when_whitened_by_its_covariance(geometry):
    # a correlated Gaussian (scales 0.01-10, correlation 0.9): exactly 1 in its own whitening,
    # exactly 4 when whitened by twice its standard deviations; the Hessian is constant, so central
    # differences are exact up to rounding (tolerance 1e-8)
    rng = np.random.default_rng(0)
    scales = np.array([0.01, 1.0, 10.0])
    corr = np.full((3, 3), 0.9) + 0.1 * np.eye(3)
    cov = corr * np.outer(scales, scales)
    root = np.linalg.cholesky(cov)
    x = rng.standard_normal(3)
    lam, vector = geometry.local_curvature(_gaussian(cov), x, root, 1e-2)
    assert lam == pytest.approx(1.0, abs=1e-8)
    lam2, _ = geometry.local_curvature(_gaussian(cov), x, 2 * root, 1e-2)
    assert lam2 == pytest.approx(4.0, abs=1e-7)
    assert vector.shape == (3,)


def test_ar1_rhat_grows_as_the_ess_falls(geometry):
    # seeded, so deterministic: independent draws (ESS = N) keep max R-hat of 24 scalars near 1
    # (200 replicates of 4 x 500: median 1.003, every one below 1.01); ESS of 1% of the draws
    # (rho 0.98) does not
    iid = geometry.ar1_max_rhat(np.ones(24), 4, 500, np.random.default_rng(1))
    sticky = geometry.ar1_max_rhat(np.full(24, 0.01), 4, 500, np.random.default_rng(1))
    assert 1.0 <= iid < 1.01
    assert sticky > 1.03


def test_unconstrained_draws_follow_the_model_transforms(geometry):
    # a HalfNormal is sampled on the log scale, a Beta on the logit scale, a Normal as is
    pm = pytest.importorskip("pymc")
    import xarray as xr

    with pm.Model() as model:
        pm.Normal("a", 0.0, 1.0, shape=2)
        pm.HalfNormal("s", 1.0)
        pm.Beta("f", 2.0, 3.0)
    a = np.arange(12.0).reshape(2, 3, 2)
    s = np.linspace(0.5, 3.0, 6).reshape(2, 3)
    f = np.linspace(0.1, 0.9, 6).reshape(2, 3)
    posterior = xr.Dataset({"a": (("chain", "draw", "a_dim"), a), "s": (("chain", "draw"), s), "f": (("chain", "draw"), f)})
    U, names = geometry.unconstrained_draws(model, posterior)
    assert names == ["a[0]", "a[1]", "s", "f"]
    np.testing.assert_allclose(U[:, 0:2], a.reshape(6, 2), rtol=0, atol=0)
    np.testing.assert_allclose(U[:, 2], np.log(s.ravel()), rtol=1e-12)
    np.testing.assert_allclose(U[:, 3], np.log(f.ravel() / (1 - f.ravel())), rtol=1e-12)


def test_ar1_chains_have_the_asked_ess(geometry):
    # 4 x 5000 draws at an ESS of a quarter of the draws: ArviZ's bulk ESS within 15% of 5000
    # (rho = 1 - f = 0.75 instead of 0.6 would give 20 000 * 0.25 / 1.75, about 2 860)
    import arviz as az

    x = geometry.ar1_chains(0.25, 4, 5000, np.random.default_rng(2))
    assert abs(x.std() - 1.0) < 0.05
    assert float(az.ess(x, method="bulk")) == pytest.approx(5000, rel=0.15)


def test_ess_profiles_parse(geometry):
    np.testing.assert_array_equal(geometry.parse_ess("450,550x2,1200"), [450, 550, 550, 1200])
