"""The Laplace fit's inner Newton step."""

import numpy as np

from itpk.laplace import _solve_blocks


def test_newton_step_descends_on_the_curvature_scale_where_the_hessian_is_indefinite():
    # H = diag(4, -2) (a saddle of -log p, as at a population draw in the tail): the step H⁻¹g with
    # |eigenvalues| is (g1/4, g2/2), a descent direction of the right size; a floor of the negative
    # eigenvalue alone gave g2/1e-8, which the line search could not shorten enough. Exact to 1e-15.
    H = np.array([[[4.0, 0.0], [0.0, -2.0]]])
    g = np.array([[1.0], [3.0]])  # (k, N)
    np.testing.assert_allclose(_solve_blocks(H, g), [[0.25], [1.5]], rtol=1e-15)
    # a positive definite block is plain Newton: H⁻¹g
    H = np.array([[[2.0, 1.0], [1.0, 3.0]]])
    np.testing.assert_allclose(_solve_blocks(H, g)[:, 0], np.linalg.solve(H[0], g[:, 0]), rtol=1e-13)


def test_a_draw_without_conditional_mode_stops_the_fit_with_a_message(monkeypatch):
    # the draws' per-subject Cholesky failing (an indefinite conditional Hessian) is a FitError
    # naming the draw and the way out, not numpy's LinAlgError
    import pandas as pd
    import pytest

    from itpk import load_model
    from itpk.dataset import read_frame
    from itpk.errors import FitError
    from itpk.inference import fit

    rows = [(1, 0.0, 1, 100.0, "iv", None), (1, 1.0, 0, None, "", 1.7), (1, 6.0, 0, None, "", 1.1),
            (2, 0.0, 1, 50.0, "iv", None), (2, 2.0, 0, None, "", 0.8), (2, 12.0, 0, None, "", 0.35)]
    spec = load_model("one_cpt_iv")
    data = read_frame(pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV"]), spec)
    real = np.linalg.cholesky

    def blocks_fail(a, *args, **kwargs):
        if np.ndim(a) == 3:  # the per-subject blocks of the draws, not the population covariance
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(np.linalg, "cholesky", blocks_fail)
    with pytest.raises(FitError, match="at population draw 1 of 5 the random effects have no conditional mode .*use --method nuts"):
        fit(spec, data, method="laplace", draws=5, seed=1, errors={"plasma": "additive"})


def test_a_model_without_iiv_is_fitted_at_its_posterior_mode():
    # review (session 20): no random effect (k = 0) raised a ValueError traceback. Without random
    # effects the approximation is Gaussian around the posterior mode: its medians are MAP's
    # (to the noise of 4 000 Gaussian draws: within 1%), and nothing is reported as IIV
    import tomllib
    from importlib.resources import files
    from pathlib import Path

    import pandas as pd

    from itpk.dataset import read_frame
    from itpk.inference import fit
    from itpk.run import summary_table
    from itpk.spec import parse_model

    raw = tomllib.loads(Path(str(files("itpk.models") / "one_cpt_iv.toml")).read_text(encoding="utf-8"))
    for parameter in raw["parameters"].values():
        parameter.pop("iiv", None)
    spec = parse_model(raw)
    rows = [(1, 0.0, 1, 100.0, "iv", None), (1, 1.0, 0, None, "", 1.7), (1, 6.0, 0, None, "", 1.1),
            (2, 0.0, 1, 50.0, "iv", None), (2, 2.0, 0, None, "", 0.8), (2, 12.0, 0, None, "", 0.35)]
    data = read_frame(pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV"]), spec)
    laplace = summary_table(fit(spec, data, method="laplace", draws=4000, seed=1)).set_index("parameter")
    mode = summary_table(fit(spec, data, method="map", seed=1)).set_index("parameter")
    assert not any(name.startswith("omega_") for name in laplace.index)
    for name in ("CL", "V"):
        np.testing.assert_allclose(laplace.loc[name, "median"], mode.loc[name, "median"], rtol=0.01, err_msg=name)
