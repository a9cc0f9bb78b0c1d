"""Virtual populations drawn from a model's between-subject variability (IIV)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from itpk.errors import ModelSpecError
from itpk.spec import ModelSpec


def omega(cv: float) -> float:
    """Standard deviation of the log-normal η giving a coefficient of variation ``cv``.

    ω² = log(1 + CV²), the exact relation for a log-normal distribution.
    """
    return float(np.sqrt(np.log1p(cv**2)))


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
    if n < 1:
        raise ModelSpecError(f"the number of subjects must be >= 1, found {n}")
    typical = dict(typical or {})
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, p in spec.parameters.items():
        theta = float(typical.get(name, p.value))
        if p.iiv_cv is None:
            out[name] = np.full(n, theta)
            continue
        eta = rng.normal(0.0, omega(p.iiv_cv), size=n)
        if p.fraction:
            if not 0 < theta < 1:
                out[name] = np.full(n, theta)
                continue
            out[name] = 1.0 / (1.0 + np.exp(-(np.log(theta / (1 - theta)) + eta)))
        else:
            out[name] = theta * np.exp(eta)
    for name, c in spec.covariates.items():
        out[name] = np.full(n, float(typical.get(name, c.value)))
    return out
