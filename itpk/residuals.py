"""Residual error models and the M3 censored likelihood, shared by the PyMC model and numpy.

One definition serves both sides: :mod:`itpk.inference` builds the likelihood
from it in pytensor, and :func:`pointwise` evaluates the same likelihood (and
draws the posterior predictive) in numpy from the stored IPRED draws. The
numpy side replaces PyMC's ``compute_log_likelihood`` and
``sample_posterior_predictive``, each of which compiles the whole model graph
again (measured on Theoph: 1.2 s of compilation after a 2 s sampling run).

Error models, for a prediction y of output o (σ's are per output):

- ``additive``      DV ~ N(y, σ)
- ``proportional``  DV ~ N(y, σ·y)
- ``combined``      DV ~ N(y, √(σ_add² + (σ_prop·y)²))
- ``log``           log DV ~ N(log y, σ)

A censored value (BLQ) contributes log P(DV < LLOQ) (M3, Beal 2001); its
predictive draw is clipped at the LLOQ, as a censored observation is reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ObservedOutput", "location_scale", "observed_outputs", "pointwise", "sigma_names"]

TINY = 1e-300  # floor of a prediction under a log or proportional model (log 0 = −inf)


@dataclass(frozen=True, eq=False)
class ObservedOutput:
    """The observations of one output, on the scale the likelihood uses.

    Attributes
    ----------
    output : str
        Output name (model file).
    kind : str
        Error model: additive, proportional, combined or log.
    rows : ndarray (m,) int
        Positions of this output's observations in the fit's observation table (and IPRED).
    row_ids : ndarray (m,) int
        Dataset ROW of each observation (coordinate ``obs_<output>``).
    observed : ndarray (m,)
        DV, or the LLOQ for a censored value; logarithms under the ``log`` model.
    lower : ndarray (m,)
        Censoring bound on the same scale (−inf for a quantified value).
    scale : float
        Median |DV| of the quantified values (scale of the additive σ prior), DV unit.
    """

    output: str
    kind: str
    rows: np.ndarray
    row_ids: np.ndarray
    observed: np.ndarray
    lower: np.ndarray
    scale: float

    @property
    def name(self) -> str:
        """Name of the observed variable: ``DV_<output>``."""
        return f"DV_{self.output}"

    @property
    def dim(self) -> str:
        return f"obs_{self.output}"


def observed_outputs(observations: pd.DataFrame, outputs: tuple[str, ...], errors: Mapping[str, str]) -> list[ObservedOutput]:
    """One :class:`ObservedOutput` per output, in the order of ``outputs``."""
    result = []
    for output in outputs:
        rows = np.flatnonzero((observations["output"] == output).to_numpy())
        dv = observations["DV"].to_numpy(dtype=float)[rows]
        censored = observations["censored"].to_numpy(dtype=bool)[rows]
        lloq = observations["LLOQ"].to_numpy(dtype=float)[rows]
        kind = errors[output]
        scale = float(np.nanmedian(np.abs(dv[~censored]))) if np.any(~censored) else 1.0
        observed = np.where(censored, lloq, dv)
        lower = np.where(censored, lloq, -np.inf)
        if kind == "log":
            with np.errstate(divide="ignore"):
                observed, lower = np.log(observed), np.where(censored, np.log(lloq), -np.inf)
        result.append(ObservedOutput(output, kind, rows, observations["ROW"].to_numpy()[rows], observed, lower, scale))
    return result


def sigma_names(kind: str, output: str) -> dict[str, str]:
    """Variable names of the residual-error parameters: role (add, prop, log) -> name."""
    if kind == "combined":
        return {"add": f"sigma_add_{output}", "prop": f"sigma_prop_{output}"}
    role = {"additive": "add", "proportional": "prop", "log": "log"}[kind]
    return {role: f"sigma_{output}"}


def location_scale(kind: str, y: Any, sigmas: Mapping[str, Any], ops: Any) -> tuple[Any, Any]:
    """(μ, σ) of the normal the observation follows, in numpy (``ops=np``) or pytensor (``ops=pt``)."""
    if kind == "log":
        return ops.log(ops.maximum(y, TINY)), sigmas["log"]
    if kind == "additive":
        return y, sigmas["add"]
    if kind == "proportional":
        return y, sigmas["prop"] * ops.maximum(y, TINY)
    return y, ops.sqrt(sigmas["add"] ** 2 + (sigmas["prop"] * y) ** 2)


def pointwise(posterior: Mapping[str, Any], obs: ObservedOutput, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise log-likelihood and one posterior predictive draw per posterior draw.

    Parameters
    ----------
    posterior
        ``IPRED`` (..., M) over all observations and this output's σ's (...,).
    obs
        This output's observations.
    rng
        Source of the predictive draws.

    Returns
    -------
    loglik, predictive : ndarray (..., m)
        log p(DV | draw) with the M3 term for censored values (nats), always the density of DV
        on its own scale: under the ``log`` model that of log DV minus log DV (the Jacobian), so
        the pointwise log-likelihoods of fits with different error models are comparable (LOO);
        predictive values on the likelihood's scale (log under the ``log`` model), clipped at the LLOQ.
    """
    from scipy.special import log_ndtr

    y = np.asarray(posterior["IPRED"])[..., obs.rows]
    sigmas = {role: np.asarray(posterior[name])[..., None] for role, name in sigma_names(obs.kind, obs.output).items()}
    mu, sd = location_scale(obs.kind, y, sigmas, np)
    censored = np.isfinite(obs.lower)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # prior draws reach extreme predictions
        z = (obs.observed - mu) / sd
        density = -0.5 * z**2 - np.log(sd) - 0.5 * math.log(2 * math.pi)
        if obs.kind == "log":  # the density of DV itself (Jacobian 1/DV), so LOO compares error models fairly
            density = density - obs.observed
        loglik = np.where(censored, log_ndtr(np.where(censored, z, 0.0)), density)
    predictive = np.maximum(rng.normal(mu, sd), obs.lower)
    return loglik, predictive
