"""itpk.population: virtual subjects from the model's IIV or from a fit's posterior.

Tolerances: the empirical SD of 20 000 log-normal (logit-normal) η within 3 % of ω (the SE of an
SD from n draws is ω/√(2n), 0.5 % here, so 3 % is six standard errors); means within 0.01.
"""

from __future__ import annotations

import numpy as np
import pytest

from itpk import load_model
from itpk.errors import ModelSpecError
from itpk.population import sample_posterior_population


def test_each_subject_takes_one_posterior_draw_and_fixed_values_stay():
    spec = load_model("it_antibody")
    draws = {"CL": np.array([0.01, 0.05]), "V": np.array([3.0, 9.0]), "omega_CL": np.zeros(2), "omega_V": np.zeros(2)}
    pop = sample_posterior_population(spec, draws, 200, seed=4, typical={"DIAM": 2.5})
    pairs = set(zip(pop["CL"].tolist(), pop["V"].tolist(), strict=True))
    assert pairs == {(0.01, 3.0), (0.05, 9.0)}  # CL and V from the same draw, both draws used
    assert np.all(pop["Q"] == spec.parameters["Q"].value) and np.all(pop["DIAM"] == 2.5)
    again = sample_posterior_population(spec, draws, 200, seed=4, typical={"DIAM": 2.5})
    assert all(np.array_equal(pop[k], again[k]) for k in pop)


def test_iiv_uses_the_draws_omega_on_the_fits_scale():
    spec = load_model("it_antibody")
    draws = {"CL": np.array([0.02]), "omega_CL": np.array([0.3]), "f_leak": np.array([0.2]), "omega_f_leak": np.array([0.5])}
    pop = sample_posterior_population(spec, draws, 20000, seed=1)
    log_cl = np.log(pop["CL"])
    assert log_cl.std() == pytest.approx(0.3, rel=0.03) and abs(log_cl.mean() - np.log(0.02)) < 0.01
    logit = np.log(pop["f_leak"] / (1 - pop["f_leak"]))  # a fraction: logit-normal, as in the fit
    assert logit.std() == pytest.approx(0.5, rel=0.03) and abs(logit.mean() - np.log(0.2 / 0.8)) < 0.01


def test_an_estimated_parameter_cannot_be_set():
    spec = load_model("it_antibody")
    with pytest.raises(ModelSpecError, match="--set CL: estimated in the posterior"):
        sample_posterior_population(spec, {"CL": np.array([0.02])}, 3, seed=1, typical={"CL": 1.0})
