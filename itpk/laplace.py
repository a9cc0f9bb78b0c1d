"""Fast fits that marginalise the random effects: the Laplace approximation (NONMEM's LAPLACIAN).

The Hessian in z is the exact one (central differences of the exact gradient), as LAPLACIAN
has it, not FOCE's first-order approximation; and the objective is a *posterior*: priors and
the log-Jacobians of PyMC's transforms included, so the estimate is the posterior mode of the
approximate marginal on the unconstrained scale, not NONMEM's maximum-likelihood estimate (the
two are close with weak priors).

A plain MAP maximises the joint density over the population parameters θ *and*
every subject's random effects z, which drives the IIV standard deviations to 0
(the joint density grows without bound as ω → 0 and z → 0). NONMEM's Laplacian
method, and this module, integrate z out instead:

    −log p(θ | y) ≈ L(θ) = −log p(y, ẑ(θ), θ) + ½ log det H(θ) + const,
    ẑ(θ) = argmax_z log p(y, z, θ),   H = −∂²/∂z² log p(y, z, θ) at ẑ,

all on PyMC's unconstrained scale (log σ, log ω, logit fractions, with their
Jacobians), the scale on which the approximation is most nearly Gaussian.

- inner problem: Newton's method per subject. A subject's z only enters its own
  predictions and its own N(0, 1) prior, so H is block-diagonal with one k×k
  block per subject (k = number of IIV parameters); perturbing the j-th random
  effect of every subject at once gives column j of every block from one
  gradient (central differences of the exact gradient, 2k gradients per H);
- outer problem: L-BFGS on L(θ) with central-difference gradients, inner
  solves warm-started;
- uncertainty: Σ = (∇²L)⁻¹ at the mode (central differences), draws
  θ ~ N(θ̂, Σ), then z | θ ~ N(ẑ(θ), H⁻¹) per draw — a posterior sample in the
  same format as NUTS, so every downstream table works.

What to trust: population parameters, ω (CV%) and σ with approximate
intervals; no MCMC diagnostics; intervals are Gaussian on the unconstrained
scale (skewed parameters, e.g. a weakly identified ka, get symmetric log-scale
intervals); ω near 0 is where the approximation is weakest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

from itpk.errors import FitError

__all__ = ["LaplaceFit", "laplace"]

FD_STEP_Z = 1e-5  # central-difference step of the exact gradient (unconstrained z)
FD_STEP_THETA = 1e-4  # central-difference step of L(θ) (unconstrained θ: log scale, so relative)
NEWTON_TOL = 1e-8  # max |∇z| at the conditional mode
NEWTON_ITER = 50


@dataclass(frozen=True)
class LaplaceFit:
    """Mode θ̂ (unconstrained), its covariance, the objective and a flat-vector layout."""

    theta: np.ndarray
    cov: np.ndarray
    objective: float
    z_hat: np.ndarray
    converged: bool
    message: str


class _Problem:
    """The model's log-density and gradient on one flat unconstrained vector, split into θ and z."""

    def __init__(self, model: Any, z_names: list[str], n_subjects: int) -> None:
        from pymc.blocking import DictToArrayBijection

        self.model = model
        start = model.initial_point()
        self.layout = DictToArrayBijection.map(start).point_map_info
        fn = model.logp_dlogp_function(ravel_inputs=True)
        fn.set_extra_values({})
        self._fn = fn
        self.x0 = DictToArrayBijection.map({v.name: start[v.name] for v in fn._grad_vars}).data
        # flat positions: z_<name> has shape (N,), in the order of the grad vars
        offsets, pos = {}, 0
        for v in fn._grad_vars:
            size = int(np.prod(start[v.name].shape)) if np.ndim(start[v.name]) else 1
            offsets[v.name] = (pos, size)
            pos += size
        self.order = [v.name for v in fn._grad_vars]
        self.offsets = offsets
        self.z_index = np.array([[offsets[n][0] + i for i in range(n_subjects)] for n in z_names],
                                dtype=np.int64).reshape(len(z_names), n_subjects)  # (k, N); k = 0 without IIV
        mask = np.ones(pos, bool)
        mask[self.z_index.ravel()] = False
        self.theta_index = np.flatnonzero(mask)
        self.k, self.N = self.z_index.shape

    def logp_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        logp, grad = self._fn(x)
        return float(logp), np.asarray(grad, dtype=float)

    def full(self, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        x = np.empty(self.theta_index.size + self.z_index.size)
        x[self.theta_index] = theta
        x[self.z_index] = z
        return x

    def z_grad(self, theta: np.ndarray, z: np.ndarray) -> tuple[float, np.ndarray]:
        """log p and −∂ log p/∂z as (k, N)."""
        logp, grad = self.logp_grad(self.full(theta, z))
        return logp, -grad[self.z_index]

    def z_hessian(self, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        """H blocks (N, k, k) of −log p in z, symmetrised."""
        H = np.empty((self.N, self.k, self.k))
        for j in range(self.k):
            up, down = z.copy(), z.copy()
            up[j] += FD_STEP_Z
            down[j] -= FD_STEP_Z
            d = (self.z_grad(theta, up)[1] - self.z_grad(theta, down)[1]) / (2 * FD_STEP_Z)  # (k, N)
            H[:, :, j] = d.T
        return 0.5 * (H + H.transpose(0, 2, 1))

    def conditional_mode(self, theta: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, bool]:
        """ẑ(θ) by damped Newton per subject; returns ẑ, H blocks, log p at ẑ, converged."""
        logp, g = self.z_grad(theta, z)
        if self.k == 0:  # no random effects: nothing to integrate, the approximation is exact in z
            return z, np.zeros((self.N, 0, 0)), logp if np.isfinite(logp) else -math.inf, True
        for _ in range(NEWTON_ITER):
            H = self.z_hessian(theta, z)
            if not (np.isfinite(logp) and np.all(np.isfinite(H)) and np.all(np.isfinite(g))):
                return z, H, -math.inf, False  # θ outside the model's domain (e.g. an overflow)
            step = _solve_blocks(H, g)  # (k, N)
            t = 1.0
            while True:
                trial = z - t * step
                logp_new, g_new = self.z_grad(theta, trial)
                if np.isfinite(logp_new) and logp_new >= logp - 1e-12 * abs(logp):
                    break
                t *= 0.5
                if t < 1e-8:
                    return z, H, logp, False
            z, logp, g = trial, logp_new, g_new
            if np.max(np.abs(g)) < NEWTON_TOL:
                return z, self.z_hessian(theta, z), logp, True
        return z, self.z_hessian(theta, z), logp, False


def _solve_blocks(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    """H_i⁻¹ g_i per subject with |eigenvalues| (floored): a descent direction on the scale of the curvature.

    Where H has a negative eigenvalue (away from the mode, e.g. at a θ drawn in the tail) a
    floor alone would make the step along it ~1e8 times too long, and the line search ends
    before the mode is reached (saddle-free Newton, Dauphin et al. 2014, takes |λ|).
    """
    w, Q = np.linalg.eigh(H)
    w = np.maximum(np.abs(w), 1e-8 + 1e-6 * np.abs(w).max(axis=1, keepdims=True))
    gi = g.T[:, :, None]  # (N, k, 1)
    return np.einsum("nij,nj,nkj,nkl->ni", Q, 1.0 / w, Q, gi).T


def _logdet_blocks(H: np.ndarray) -> float:
    sign, logdet = np.linalg.slogdet(H)
    return float(np.sum(logdet)) if np.all(sign > 0) else math.inf


def laplace(model: Any, z_names: list[str], n_subjects: int, *, draws: int, seed: int,
            progress: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], LaplaceFit]:
    """Laplace-approximate posterior draws of every free variable (PyMC value-variable names).

    Parameters
    ----------
    model
        The hierarchical model of :func:`itpk.inference.build_model`.
    z_names
        Value variables of the non-centred random effects (``z_<param>``, one per subject each).
    n_subjects
        N.
    draws
        Number of posterior draws.
    seed
        Seed of the draws.

    Returns
    -------
    draws : dict
        Value-variable name -> (draws, *shape) on the unconstrained scale.
    fit : LaplaceFit
    """
    problem = _Problem(model, z_names, n_subjects)
    z_state = {"z": problem.x0[problem.z_index].copy()}

    def objective(theta: np.ndarray) -> float:
        # The inner problem can have several modes (flip-flop: a subject's ka and CL/V swapped);
        # Newton from the last mode and from z = 0 may end in different ones. Taking the higher
        # of the two keeps L(θ) from jumping between modes along the outer path.
        best = None
        for start in (z_state["z"], np.zeros_like(z_state["z"])):
            z, H, logp, _ = problem.conditional_mode(theta, start)
            if best is None or logp > best[2]:
                best = (z, H, logp)
        z, H, logp = best
        value = -logp + 0.5 * _logdet_blocks(H) if np.isfinite(logp) else math.inf
        if np.isfinite(value):
            z_state["z"] = z
            return value
        return 1e300

    def gradient(theta: np.ndarray) -> np.ndarray:
        g = np.empty_like(theta)
        for i in range(theta.size):
            up, down = theta.copy(), theta.copy()
            up[i] += FD_STEP_THETA
            down[i] -= FD_STEP_THETA
            g[i] = (objective(up) - objective(down)) / (2 * FD_STEP_THETA)
        objective(theta)  # leave the warm start at θ
        return g

    theta0 = problem.x0[problem.theta_index]
    result = optimize.minimize(objective, theta0, jac=gradient, method="L-BFGS-B", options={"maxiter": 500, "gtol": 1e-5})
    theta_hat = result.x
    z_hat, _, _, inner_ok = problem.conditional_mode(theta_hat, z_state["z"])
    hess = _fd_hessian(objective, theta_hat)
    try:
        cov = np.linalg.inv(hess)
        np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise FitError("method laplace: the approximate posterior is not positive definite at the mode "
                       "(a parameter is not identified by the data); use --method nuts") from None
    fit = LaplaceFit(theta_hat, cov, float(result.fun), z_hat, bool(result.success and inner_ok), str(result.message))
    rng = np.random.default_rng(seed)
    thetas = rng.multivariate_normal(theta_hat, cov, size=draws, method="cholesky")
    flat = np.empty((draws, problem.theta_index.size + problem.z_index.size))
    z = z_hat
    for s, theta in enumerate(thetas):
        z, H, _, _ = problem.conditional_mode(theta, z)
        try:
            L = np.linalg.cholesky(np.linalg.inv(H))  # (N, k, k): z | θ ~ N(ẑ, H⁻¹)
        except np.linalg.LinAlgError:
            raise FitError(f"method laplace: at population draw {s + 1} of {draws} the random effects have no "
                           "conditional mode (the curvature is not positive definite); use --method nuts") from None
        noise = np.einsum("nij,nj->in", L, rng.standard_normal((problem.N, problem.k)))
        flat[s] = problem.full(theta, z + noise)
        if progress is not None and (s + 1) % max(1, draws // 10) == 0:
            progress(f"laplace: {s + 1}/{draws} draws")
    out = {}
    for name in problem.order:
        start, size = problem.offsets[name]
        shape = np.shape(model.initial_point()[name])
        out[name] = flat[:, start:start + size].reshape((draws, *shape))
    return out, fit


def _fd_hessian(f: Callable[[np.ndarray], float], x: np.ndarray) -> np.ndarray:
    """Central-difference Hessian (symmetrised) of a scalar function."""
    n, h = x.size, 1e-3
    f0 = f(x)
    H = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            if i == j:
                up, down = x.copy(), x.copy()
                up[i] += h
                down[i] -= h
                H[i, i] = (f(up) - 2 * f0 + f(down)) / h**2
            else:
                pp, pm_, mp, mm = (x.copy() for _ in range(4))
                pp[i] += h; pp[j] += h
                pm_[i] += h; pm_[j] -= h
                mp[i] -= h; mp[j] += h
                mm[i] -= h; mm[j] -= h
                H[i, j] = H[j, i] = (f(pp) - f(pm_) - f(mp) + f(mm)) / (4 * h * h)
    f(x)
    return H
