"""Centred or non-centred between-subject effects, per parameter, from the data (``--iiv auto``).

Non-centred (``X_i = X·exp(ω·z_i)``, free z_i ~ N(0, 1)) suits parameters the data say little
about per subject; centred (free log X_i ~ N(log X, ω)) suits parameters each subject's own data
pin down. The choice is a property of the data, so ``auto`` measures it before sampling.

The measure is each subject's Fisher information about its own random effect, in units of the
prior's precision: I_i = Σ_j (∂μ_j/∂η_i)² ω² / σ_j² over the subject's quantified observations
(μ, σ: the likelihood's location and scale, :func:`itpk.residuals.location_scale`). The
posterior SD of z_i is then about 1/√(1 + I_i). Non-centred, every z_i of a parameter follows the
shared typical value and ω: if the data fix η_i to ±ω/√I and the typical value is known to
±ω/√N (N subjects), the z's are mutually correlated by about I/(I + N), and their coupling with ω
grows the same way. Centred, that correlation is about 1/(1 + N(I + 1)), and the centred funnel
(log X_i squeezed as ω → 0) needs weak data, I ≲ 1. So a parameter is centred when the median
subject has I > N (z correlation above ½).

Where it is evaluated: at the initial point (the priors' medians, z = 0), with ω the model
file's IIV (CV → SD of log X) and σ the residuals' RMS at that point on the likelihood's scale
(misfit there inflates σ, so the rule leans to non-centred, the choice that is safe for sparse
data). ∂μ/∂η by central differences: moving η of every subject at once moves each subject's own
predictions only, so two evaluations per parameter give every subject's derivative.

Measured (4 × (500 + 500) or 4 × (1000 + 1000); ``benchmarks/README.md``): virus example
(N = 6) I_beta ≈ 13 → centred (26.6 against 56 leapfrogs per draw, R-hat 1.008 against 1.033),
I_k_efflux ≈ 0.1 → non-centred; it_antibody example (N = 12) I ≈ 0.5–6 → non-centred (centring CL
and V there cut leapfrogs by a quarter but halved ESS per leapfrog and doubled divergences on one
seed of two); Theoph (N = 12) I ≈ 0.3–0.4 → non-centred.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from itpk.residuals import ObservedOutput, location_scale

__all__ = ["STEP", "choose", "information", "omega_of_cv"]

STEP = 1e-3  # central-difference step in η (log or logit scale); predictions are smooth in η


def omega_of_cv(cv: float) -> float:
    """SD of log X whose log-normal CV is ``cv`` (a fraction's logit-normal SD is taken as the same:
    the model file gives one number)."""
    return math.sqrt(math.log1p(cv * cv))


def information(ipred: np.ndarray, sigmas: Sequence[Mapping[str, float]], observed: Sequence[ObservedOutput],
                subject: np.ndarray, censored: np.ndarray, omegas: Mapping[str, float],
                n_subjects: int, step: float = STEP) -> dict[str, np.ndarray]:
    """Each subject's information about its own effect of each IIV parameter, in units of ω⁻².

    Parameters
    ----------
    ipred
        (1 + 2k, M): IPRED at the start point, then with every subject's η of parameter j moved by
        +step and −step (rows 1 + 2j and 2 + 2j), in the order of ``omegas``.
    sigmas
        Per output (order of ``observed``): the residual-error σ's at the start point (role -> value);
        only their ratios matter, the level is refitted to the residuals.
    observed
        The likelihood's outputs.
    subject, censored
        (M,) subject index and BLQ flag of every observation.
    omegas
        Parameter -> ω (SD of its log or logit), the prior scale of the information.
    n_subjects
        N.

    Returns
    -------
    dict
        Parameter -> (N,) I_i (dimensionless; censored values contribute nothing).
    """
    result = {name: np.zeros(n_subjects) for name in omegas}
    for obs, sigma in zip(observed, sigmas, strict=True):
        keep = ~censored[obs.rows]
        if not keep.any():
            continue
        with np.errstate(all="ignore"):
            mu, scale = location_scale(obs.kind, ipred[0, obs.rows], sigma, np)
            scale = np.broadcast_to(np.asarray(scale, dtype=float), mu.shape)
            # σ's level from the residuals at the start (RMS of the standardised residuals), shape
            # (add vs prop) from the start values
            level = math.sqrt(float(np.mean(((obs.observed - mu) / scale)[keep] ** 2)))
        scale = scale * level
        for j, (name, omega) in enumerate(omegas.items()):
            with np.errstate(all="ignore"):
                up, _ = location_scale(obs.kind, ipred[1 + 2 * j, obs.rows], sigma, np)
                down, _ = location_scale(obs.kind, ipred[2 + 2 * j, obs.rows], sigma, np)
                terms = ((up - down) / (2 * step) * omega / scale) ** 2
            terms = np.where(keep & np.isfinite(terms), terms, 0.0)
            np.add.at(result[name], subject[obs.rows], terms)
    return result


def choose(info: Mapping[str, np.ndarray], n_subjects: int) -> dict[str, str]:
    """``centred`` where the median subject's information exceeds the number of subjects."""
    return {name: "centred" if float(np.median(values)) > n_subjects else "non-centred"
            for name, values in info.items()}
