"""Statistical checks of fits (slow: run with `pytest -m slow`)."""

from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from itpk import load_model
from itpk.dataset import read_dataset
from itpk.inference import fit

pytestmark = pytest.mark.slow

# nlmixr2 FOCEi on Theoph (../shared/data/README.md): ka 1.593 /h, CL 2.752 L/h, V 31.81 L
PUBLISHED = {"ka": 1.593, "CL": 2.752, "V": 31.81}


def test_theoph_matches_published_estimates():
    spec = load_model("one_cpt_oral")
    data = read_dataset(Path(str(files("itpk.data") / "theoph.csv")), spec)
    result = fit(spec, data, draws=1000, tune=1000, chains=4, seed=2026)  # the model file's combined error
    from itpk.run import diagnostics

    post = result.tree["posterior"]
    for name, value in PUBLISHED.items():
        median = float(np.median(np.asarray(post[name])))
        assert abs(median / value - 1) < 0.10, (name, median, value)  # within 10%
    diag = diagnostics(result)
    assert diag["max_r_hat"] <= 1.01
    assert diag["divergences"] == 0


TRUE_ANTIBODY = {"CL": 0.0168, "V": 4.0, "k_out": 0.005, "f_leak": 0.2, "Kp": 0.1}


def test_example_it_vs_iv_recovers_true_values():
    spec = load_model("it_antibody")
    data = read_dataset(Path(str(files("itpk.data") / "example_it_vs_iv.csv")), spec)
    result = fit(spec, data, draws=1000, tune=1000, chains=4, seed=7)
    post = result.tree["posterior"]
    for name, value in TRUE_ANTIBODY.items():
        draws = np.asarray(post[name]).reshape(-1)
        lo, hi = np.quantile(draws, [0.05, 0.95])
        assert lo <= value <= hi, (name, lo, hi, value)  # inside the 90% interval
    from itpk.run import diagnostics

    diag = diagnostics(result)
    assert diag["max_r_hat"] <= 1.01 and diag["divergences"] == 0, diag
