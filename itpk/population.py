"""Virtual populations drawn from a model's between-subject variability (IIV)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from itpk.errors import ModelSpecError, raise_problems
from itpk.spec import ModelSpec


def omega(cv: float) -> float:
    """Standard deviation of the log-normal η giving a coefficient of variation ``cv``.

    ω² = log(1 + CV²), the exact relation for a log-normal distribution.
    """
    return float(np.sqrt(np.log1p(cv**2)))


def cv_percent(omega: float, scale: str = "log", typical: float | None = None) -> float:
    """Coefficient of variation (%) of individual values θᵢ whose η ~ N(0, ω²) is on ``scale``.

    ``log``: 100·sqrt(exp(ω²) − 1), exact for a log-normal θᵢ = θ·exp(η), whatever θ.
    ``logit``: θᵢ = expit(logit θ + η) (a fraction), whose CV depends on the typical value θ too:
    SD(θᵢ)/E(θᵢ) by 80-point Gauss–Hermite quadrature (ω = 0.5: 38.5% at θ = 0.2, 5.5% at 0.9,
    where the log formula says 53.3% at any θ).
    """
    if not (np.isfinite(omega) and omega >= 0):
        return float("nan")
    if scale == "log":
        return 100 * float(np.sqrt(np.expm1(omega**2)))
    if typical is None or not 0 < typical < 1:
        return float("nan")
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    values = 1 / (1 + np.exp(-(np.log(typical / (1 - typical)) + omega * nodes)))
    mean = float(weights @ values)
    return 100 * float(np.sqrt(max(weights @ (values - mean) ** 2, 0.0))) / mean


MAX_SEED = 2**63 - 1  # numpy takes any seed, nutpie an unsigned 64-bit one (a larger one overflows after compiling)
MAX_SUBJECTS = 1_000_000  # a virtual population: past this, the profiles alone outgrow memory


def estimated_problems(spec: ModelSpec, draws: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> list[str]:
    """``--set`` names that a posterior estimates (they cannot be set beside its draws), in one line; none
    without draws."""
    clash = sorted(name for name in overrides if name in spec.parameters and name in (draws or {}))
    return [f"--set {', '.join(clash)}: estimated in the posterior; only fixed parameters and covariates can be set"] if clash else []


def sample_population(
    spec: ModelSpec,
    n: int,
    *,
    seed: int | None,
    typical: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Draw ``n`` individual parameter sets around typical values.

    Each parameter with ``iiv`` gets θᵢ = θ·exp(ηᵢ), ηᵢ ~ N(0, ω²) with
    ω² = log(1 + CV²); fractions get the same η on the logit scale so they stay
    in (0, 1). Parameters without IIV, and covariates, keep their typical value.

    Parameters
    ----------
    spec
        The model.
    n
        Number of subjects (>= 1).
    seed
        Seed of the random generator; the same seed gives the same population.
    typical
        Typical values overriding the model defaults (parameters or covariates).

    Returns
    -------
    dict of name -> ndarray (n,)
        Values for every parameter and covariate, in their declared units.
    """
    typical = _checked(n, typical)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, p in spec.parameters.items():
        theta = float(typical.get(name, p.value))
        if p.iiv_cv is None:
            out[name] = np.full(n, theta)
            continue
        eta = rng.normal(0.0, omega(p.iiv_cv), size=n)
        if p.fraction and not 0 < theta < 1:
            out[name] = np.full(n, theta)
            continue
        out[name] = _individual(np.full(n, theta), eta, logit=p.fraction)
    return {**out, **_covariates(spec, n, typical)}


def _checked(n: int, typical: Mapping[str, float] | None) -> dict[str, float]:
    if n < 1:
        raise ModelSpecError(f"the number of subjects must be >= 1, found {n}")
    return dict(typical or {})


def _individual(theta: np.ndarray, eta: np.ndarray, *, logit: bool) -> np.ndarray:
    """θ·e^η, or θ moved by η on the logit scale (a fraction stays in (0, 1))."""
    if logit:
        return 1.0 / (1.0 + np.exp(-(np.log(theta / (1 - theta)) + eta)))
    return theta * np.exp(eta)


def _covariates(spec: ModelSpec, n: int, typical: Mapping[str, float]) -> dict[str, np.ndarray]:
    return {name: np.full(n, float(typical.get(name, c.value))) for name, c in spec.covariates.items()}


def sample_posterior_population(
    spec: ModelSpec,
    draws: Mapping[str, np.ndarray],
    n: int,
    *,
    seed: int | None,
    typical: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Draw ``n`` individual parameter sets from a fit's posterior: uncertainty and IIV together.

    Subject i takes posterior draw jᵢ (uniform over the draws, seeded) for every estimated typical
    value; a parameter whose IIV was estimated (``omega_<name>`` among the draws) gets its own
    ηᵢ ~ N(0, omega_<name>[jᵢ]²) on the scale the fit used (log; logit for fractions). Parameters
    the fit held fixed, and covariates, take ``typical`` or the model's value.

    Parameters
    ----------
    spec
        The fitted model (the run directory's ``model.toml``).
    draws
        Flattened posterior draws by name (:func:`itpk.run.load_run`): typical values and omegas.
    n, seed
        As :func:`sample_population`; so is the result (name -> ndarray (n,), declared units).
    typical
        Values of fixed parameters and covariates; an estimated parameter cannot be set.
    """
    typical = _checked(n, typical)
    estimated = [name for name in spec.parameters if name in draws]
    raise_problems(estimated_problems(spec, draws, typical), ModelSpecError)
    rng = np.random.default_rng(seed)
    size = len(draws[estimated[0]]) if estimated else 1
    pick = rng.integers(0, size, size=n)
    out: dict[str, np.ndarray] = {}
    for name, p in spec.parameters.items():
        if name not in draws:
            out[name] = np.full(n, float(typical.get(name, p.value)))
            continue
        theta = np.asarray(draws[name], dtype=float)[pick]
        sd = draws.get(f"omega_{name}")
        if sd is None:
            out[name] = theta
            continue
        eta = rng.normal(0.0, 1.0, size=n) * np.asarray(sd, dtype=float)[pick]
        out[name] = _individual(theta, eta, logit=p.iiv_scale == "logit")  # the scale the fit used
    return {**out, **_covariates(spec, n, typical)}
