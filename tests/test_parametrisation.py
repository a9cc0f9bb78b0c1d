"""--iiv auto: each subject's information about its random effects, by hand, and the choice."""

import math

import numpy as np
import pandas as pd
import pytest

from itpk import load_model
from itpk.dataset import read_frame
from itpk.inference import _at_start, _auto_iiv, build_model, fit
from itpk.parametrisation import choose, omega_of_cv

CL, V = 5.0, 50.0  # one_cpt_iv's values (the initial point: prior medians)


def trial(n_subjects: int, times: list[float], dose: float = 100.0, seed: int = 0) -> pd.DataFrame:
    """One IV bolus per subject; DV = the typical curve × a log-normal error of 20%."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n_subjects + 1):
        rows.append((i, 0.0, 1, dose, "iv", "", None))
        for t in times:
            rows.append((i, t, 0, None, "", "plasma", dose / V * math.exp(-CL / V * t) * math.exp(0.2 * rng.standard_normal())))
    return pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV"])


def test_information_matches_the_hand_computation_additive():
    # C = D/V exp(-k t), k = CL/V: ∂C/∂η_CL = -C k t, ∂C/∂η_V = C (k t - 1); additive σ = RMS residual
    spec = load_model("one_cpt_iv")
    frame = trial(3, [0.5, 1, 2, 4, 8, 12, 24])
    model, data = build_model(spec, read_frame(frame, spec), errors={"plasma": "additive"})
    _, info = _auto_iiv(_at_start(model, data, data.iiv), data)
    obs = frame[frame["EVID"] == 0]
    t, dv = obs["TIME"].to_numpy(), obs["DV"].to_numpy()
    k = CL / V
    c = 100.0 / V * np.exp(-k * t)
    sigma = math.sqrt(np.mean((dv - c) ** 2))
    per_subject = {"CL": (c * k * t) ** 2 * omega_of_cv(0.3) ** 2 / sigma**2,
                   "V": (c * (k * t - 1)) ** 2 * omega_of_cv(0.2) ** 2 / sigma**2}
    for name, terms in per_subject.items():
        expected = np.median(terms.reshape(3, -1).sum(axis=1))
        assert info[name] == pytest.approx(expected, rel=1e-5)  # central differences, step 1e-3 in η


def test_information_under_a_proportional_model_uses_the_log_derivative():
    # proportional: σ_j = s·C_j, so (∂C/∂η / σ_j)² = (∂log C/∂η)² / s²; s = RMS of (DV - C)/C
    spec = load_model("one_cpt_iv")
    frame = trial(2, [1, 4, 12])
    model, data = build_model(spec, read_frame(frame, spec))
    _, info = _auto_iiv(_at_start(model, data, data.iiv), data)
    obs = frame[frame["EVID"] == 0]
    t, dv = obs["TIME"].to_numpy(), obs["DV"].to_numpy()
    c = 100.0 / V * np.exp(-CL / V * t)
    s = math.sqrt(np.mean(((dv - c) / c) ** 2))
    expected = np.median(((CL / V * t) ** 2).reshape(2, -1).sum(axis=1)) * omega_of_cv(0.3) ** 2 / s**2
    assert info["CL"] == pytest.approx(expected, rel=1e-5)


def test_rich_data_on_few_subjects_is_centred_and_sparse_data_is_not():
    spec = load_model("one_cpt_iv")
    rich = read_frame(trial(3, [0.25, 0.5, 1, 2, 4, 6, 8, 12, 16, 24, 36, 48], seed=1), spec)
    kinds, info = _auto_iiv(_at_start(*build_model(spec, rich), ("CL", "V")), build_model(spec, rich)[1])
    assert kinds == {"CL": "centred", "V": "centred"} and min(info.values()) > 3  # I > N = 3
    sparse = read_frame(trial(30, [6.0], seed=2), spec)
    model, data = build_model(spec, sparse)
    kinds, info = _auto_iiv(_at_start(model, data, data.iiv), data)
    assert kinds == {"CL": "non-centred", "V": "non-centred"} and max(info.values()) < 1


def test_choose_centres_where_the_median_subject_outweighs_the_number_of_subjects():
    info = {"a": np.array([5.0, 7.0, 0.1]), "b": np.array([5.0, 1.0, 0.1]), "c": np.array([3.0, 3.0, 3.0])}
    assert choose(info, 3) == {"a": "centred", "b": "non-centred", "c": "non-centred"}


def test_auto_is_resolved_and_recorded_with_its_information():
    spec = load_model("one_cpt_iv")
    data = read_frame(trial(3, [0.25, 0.5, 1, 2, 4, 6, 8, 12, 16, 24, 36, 48], seed=1), spec)
    result = fit(spec, data, draws=20, tune=20, chains=1, seed=1)
    assert result.settings["iiv"] == {"CL": "centred", "V": "centred"}
    assert set(result.settings["iiv_information"]) == {"CL", "V"}
    assert "log_CL_i" in result.tree["posterior"] and "z_CL" not in result.tree["posterior"]
    # an explicit choice is kept and no information is computed
    fixed = fit(spec, data, draws=20, tune=20, chains=1, seed=1, iiv="non-centred")
    assert fixed.settings["iiv"] == "non-centred" and fixed.settings["iiv_information"] == {}
