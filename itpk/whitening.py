"""A dense initial metric for NUTS: sample the posterior in coordinates whitened at its mode.

nutpie adapts a diagonal (or diagonal plus low-rank) mass matrix during warm-up and takes no
initial one. On a posterior with strong correlations that costs most of a fit: on the virus
example (24 unconstrained dimensions; the centred ``log_beta_i`` move together with ``log_beta``,
``burst`` and ``omega``, and their differences are 30× narrower than their spread: eigenvalues of
the posterior correlation matrix from 1.2e-3 to 8.1) the first 150 of 500 warm-up draws took
150–300 leapfrog steps each, half of all the gradients of the fit.

So the sampler runs on u, with the unconstrained free variables x (PyMC's value variables,
flattened) = m + A u, where m is the posterior mode and A Aᵀ the inverse of the Hessian of
−log p there (:func:`find_whitening`). Near the mode u is then roughly N(0, I), the geometry a
diagonal metric adapts to quickly; the diagonal adaptation still runs on top, so a poor A costs
speed, never correctness (the map is linear with a constant Jacobian, so the density of u is
p(m + A u)·|det A| and the draws of x follow the same posterior).

The mode's Hessian misjudges non-Gaussian directions (on the virus posterior one whitened
direction still had 111× the Hessian's variance), so a fit with enough warm-up replaces it by the
mean and covariance of a short pilot run's draws (:func:`from_draws`; the pilot itself is
:func:`itpk.inference._pilot`).

m and A enter the compiled model as shared data (``itpk_whiten_mean``, ``itpk_whiten_root``),
first the identity (u = x) to find the mode with the compiled log-density itself, then the
whitening, so the model is compiled once and the in-process compiled-model cache still works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

__all__ = ["MEAN", "ROOT", "WHITENED", "Whitening", "find_whitening", "from_draws", "initial_x", "unwhiten",
           "whitened_model"]

MEAN = "itpk_whiten_mean"  # shared data: the mode m (D,)
ROOT = "itpk_whiten_root"  # shared data: A (D, D), A Aᵀ = H⁻¹
WHITENED = "whitened"  # the sampled free variable u (D,)
FD_STEP = 1e-2  # central-difference step of the gradient (unconstrained scale): the ODE
# solver's gradient at the fit's tolerance is accurate to ~1e-4 relative, so a smaller step
# would turn its noise into curvature
MIN_CURVATURE = 1e-2  # eigenvalue floor of H: no direction wider than 10 unconstrained units
MODE_ITERATIONS = 200  # L-BFGS iterations; the metric only needs to be roughly right


@dataclass(frozen=True)
class Whitening:
    """x = mean + root @ u; ``root @ root.T`` is the covariance the sampler's u sees as the identity.

    Attributes
    ----------
    mean : numpy.ndarray
        (D,) unconstrained scale: the mode (:func:`find_whitening`) or the draws' mean (:func:`from_draws`).
    root : numpy.ndarray
        (D, D) a square root of the covariance: H⁻¹ at the mode, or the draws' (shrunk) covariance.
    logp : float
        Log-density at ``mean`` (with PyMC's Jacobian terms); NaN from draws.
    gradients : int
        Gradient evaluations spent (mode search plus Hessian, or the pilot's leapfrog steps).
    clipped : int
        Eigenvalues raised to their floor (negative or flat directions).
    """

    mean: np.ndarray
    root: np.ndarray
    logp: float
    gradients: int
    clipped: int

    def to_x(self, u: np.ndarray) -> np.ndarray:
        """x = mean + root @ u for whitened points u (..., D)."""
        return self.mean + np.einsum("ij,...j->...i", self.root, u)

    def __post_init__(self) -> None:
        d = self.mean.shape
        if len(d) != 1 or self.root.shape != (d[0], d[0]):
            raise ValueError(f"whitening needs mean (D,) and root (D, D), found {self.mean.shape} and {self.root.shape}")
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.root))):
            raise ValueError("whitening mean and root must be finite")


def whitened_model(model: Any) -> Any:
    """A ``pm.Model`` on u (one flat free variable) whose density is ``model``'s at x = m + A u.

    ``model.logp()`` includes the transforms' Jacobians, so the value variables are replaced by
    slices of x directly; m and A start as 0 and the identity.
    """
    import pymc as pm
    import pytensor.tensor as pt
    from pytensor.graph.replace import graph_replace

    shapes = _shapes(model)
    size = sum(int(np.prod(s)) for s in shapes)
    with pm.Model() as whitened:
        mean = pm.Data(MEAN, np.zeros(size))
        root = pm.Data(ROOT, np.eye(size))
        u = pm.Flat(WHITENED, shape=(size,))
        x = mean + pt.dot(root, u)
        replace, start = {}, 0
        for value, shape in zip(model.value_vars, shapes, strict=True):
            n = int(np.prod(shape))
            replace[value] = x[start:start + n].reshape(shape) if shape else x[start]
            start += n
        pm.Potential("logp", graph_replace(model.logp(), replace, strict=False))
    return whitened


def find_whitening(logp_dlogp: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray) -> Whitening:
    """The mode of log p from ``x0`` (L-BFGS) and a square root of the inverse Hessian there.

    Parameters
    ----------
    logp_dlogp
        x (D,) ↦ (log p, ∇ log p) on the unconstrained scale.
    x0
        Start of the mode search (the model's initial point).

    Notes
    -----
    The Hessian is central differences of the gradient with step :data:`FD_STEP`, symmetrised;
    eigenvalues below :data:`MIN_CURVATURE` (a saddle, a funnel's neck, an unidentified
    direction) are replaced by their magnitude, at least the floor. A failed or unfinished
    search still gives a usable metric: its last (best) point is used.
    """
    calls = [0]

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        calls[0] += 1
        with np.errstate(all="ignore"):
            lp, grad = logp_dlogp(x)
        lp, grad = float(lp), np.asarray(grad, dtype=float)
        if not (np.isfinite(lp) and np.all(np.isfinite(grad))):
            return np.inf, np.zeros_like(x)  # makes the line search step back
        return -lp, -grad

    # L-BFGS only accepts steps that lower the objective, so its last point is its best
    result = optimize.minimize(objective, np.asarray(x0, dtype=float), jac=True, method="L-BFGS-B",
                               options={"maxiter": MODE_ITERATIONS, "gtol": 1e-3})
    hessian = _hessian(lambda x: objective(x)[1], result.x)
    values, vectors = np.linalg.eigh(hessian)
    curvature = np.maximum(np.abs(values), MIN_CURVATURE)
    clipped = int(np.sum(values < MIN_CURVATURE))
    root = vectors / np.sqrt(curvature)
    return Whitening(result.x, root, -float(result.fun), calls[0], clipped)


def from_draws(x: np.ndarray, gradients: int = 0) -> Whitening:
    """A whitening from draws x (n, D) of the unconstrained free variables: their mean and covariance.

    The covariance is shrunk towards its diagonal as Stan's windowed adaptation does,
    (n·C + 5·diag C)/(n + 5), so that a short pilot (a few hundred draws for tens of dimensions)
    still gives a positive-definite metric.
    """
    x = np.asarray(x, dtype=float)
    n = x.shape[0]
    if n < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"a whitening from draws needs at least 2 finite draws, found {n}")
    cov = np.atleast_2d(np.cov(x.T))
    cov = (n * cov + 5.0 * np.diag(np.diag(cov))) / (n + 5.0)
    values, vectors = np.linalg.eigh(cov)
    floor = 1e-12 * max(float(values.max()), 1e-300)
    clipped = int(np.sum(values < floor))
    root = vectors * np.sqrt(np.maximum(values, floor))
    return Whitening(x.mean(axis=0), root, float("nan"), gradients, clipped)


def initial_x(model: Any) -> np.ndarray:
    """The model's initial point as one flat unconstrained vector (D,), in the layout of :func:`unwhiten`."""
    point = model.initial_point()
    return np.concatenate([np.ravel(point[v.name]) for v in model.value_vars])


def unwhiten(u: np.ndarray, whitening: Whitening, model: Any) -> dict[str, np.ndarray]:
    """Value-variable draws (name ↦ (..., *shape)) from whitened draws u (..., D)."""
    x = whitening.to_x(u)
    out, start = {}, 0
    for value, shape in zip(model.value_vars, _shapes(model), strict=True):
        n = int(np.prod(shape))
        out[value.name] = x[..., start:start + n].reshape((*x.shape[:-1], *shape))
        start += n
    return out


def _hessian(gradient: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    columns = []
    for j in range(x.size):
        step = np.zeros_like(x)
        step[j] = FD_STEP
        columns.append((gradient(x + step) - gradient(x - step)) / (2 * FD_STEP))
    hessian = np.array(columns)
    hessian = 0.5 * (hessian + hessian.T)
    if not np.all(np.isfinite(hessian)):
        return np.eye(x.size)  # no curvature information: the identity, i.e. no whitening
    return hessian


def _shapes(model: Any) -> list[tuple[int, ...]]:
    point = model.initial_point()
    return [tuple(np.shape(point[v.name])) for v in model.value_vars]
