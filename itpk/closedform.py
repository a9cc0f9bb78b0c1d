"""Closed-form predictions of 1–2 compartment models as an elementwise pytensor graph.

For a 2×2 compartment matrix K with eigenvalues λ₁ ≥ λ₂ (real: its off-diagonal
rates are ≥ 0), any function of K is, by Sylvester's formula, g(K) = α I + β K with

    β = g[λ₁, λ₂] = (g(λ₁) − g(λ₂))/(λ₁ − λ₂),    α = g(λ₁) − λ₁ β,

so one dose f contributes cᵀ g(K) f = α (c·f) + β (cᵀK f) to an output row c: two
numbers per (observation, dose) pair times two per-pair constants. For a bolus,
g(λ) = e^{λτ} (τ = time since the dose) and

    β = (e^{λ₁τ} − e^{λ₂τ})/(λ₁ − λ₂) = e^{λ₁τ} · τ · φ₁(−(λ₁ − λ₂)τ),    φ₁(z) = (e^z − 1)/z,

the first form when (λ₁ − λ₂)τ ≥ 0.01, the second (φ₁ by its Taylor series) below:
exact to ~1e-14 for every gap, including ka = k, where the textbook form divides by
zero and the eigen-decomposition Op of :mod:`itpk.linop` loses accuracy; and
α = e^{λ₁τ} + |λ₁| β is a sum of positive terms. A chain (K triangular, e.g.
depot → central) takes its eigenvalues from the diagonal, a general 2×2 from
m ± √(((a − d)/2)² + bc). A one-compartment model is the scalar case: e^{λτ} for a
bolus, e^{λs} u φ₁(λu) for an infusion that has run for u and stopped s ago.

Why a graph and not an Op: when K, f and c are built from the individual
parameters taken at each pair (:func:`pair_predict`, as :mod:`itpk.inference`
does), pytensor fuses rates, doses, outputs and the closed form into one numba
loop, and its gradient into another, so a gradient costs about what a
hand-written closed form costs (``benchmarks/bench_fit.py``), where the general
Op pays for its generality (eigenvectors, per-subject O(n³) transforms).

Scope: bolus doses of 1–2 compartment models, and every dose (infusions and
steady-state doses included) of 1-compartment models (:func:`supports`); :func:`itpk.linop.linear_predict` uses the eigen Op
for the rest (2-compartment infusions, n ≥ 3).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytensor.tensor as pt

__all__ = ["closed_form_predict", "is_zero", "pair_predict", "pair_subjects", "supports"]

# Below |z| = 0.01, φ₁ by 7 Taylor terms (truncation 0.01⁷/8! < 1e-18); above, the direct
# difference of exponentials, whose rounding error relative to the value is ≲ 2e-16/|z|
# (≤ 2e-14) and to its derivatives ≲ 4e-16/z² (≤ 4e-12). Both branches are branch-free
# arithmetic that numba vectorises (a scalar op with an if doubled the cost of a gradient, and
# every Taylor term costs ~0.1 µs per Theoph gradient: measured).
Z_SERIES = 0.01
_PHI1 = tuple(1.0 / math.factorial(k + 1) for k in range(7))  # φ₁(z) = Σ z^k/(k+1)!


def supports(n: int | None, design: Any) -> bool:
    """Whether the closed forms cover ``n`` compartments (static) and the design's doses."""
    if n == 1:
        return True
    pairs = design.pairs
    return n == 2 and not bool(np.any(pairs["infusion"]) or np.any(pairs["period"] > 0))


def _phi1(z: Any) -> Any:
    """φ₁(z) = (e^z − 1)/z elementwise: Taylor series for |z| < Z_SERIES, expm1(z)/z beyond."""
    small = pt.abs(z) < Z_SERIES
    z_direct = pt.switch(small, 1.0, z)  # keeps the unused branch (and its gradient) finite
    return pt.switch(small, _taylor(z), pt.expm1(z_direct) / z_direct)


def _taylor(z: Any) -> Any:
    acc = _PHI1[-1]
    for c in reversed(_PHI1[:-1]):
        acc = acc * z + c
    return acc


def _bolus_2(K: list[list[Any]], tau: np.ndarray) -> tuple[Any, Any]:
    """(α, β) with e^{Kτ} = α I + β K for a 2×2 K given entry by entry, per pair."""
    (a, b), (c, d) = K
    if is_zero(b) or is_zero(c):
        return _bolus_chain(pt.maximum(a, d), pt.minimum(a, d), tau)
    return _bolus_general((a + d) / 2, (a - d) ** 2 / 4 + b * c, tau)


def _bolus_chain(slow: Any, fast: Any, tau: np.ndarray) -> tuple[Any, Any]:
    """K triangular (a chain, e.g. depot -> central): eigenvalues slow >= fast from its diagonal."""
    gap = slow - fast
    z = gap * tau
    small = z < Z_SERIES
    decay = pt.exp(slow * tau)
    direct = (decay - pt.exp(fast * tau)) / pt.switch(small, 1.0, gap)
    beta = pt.switch(small, decay * tau * _taylor(-z), direct)
    return decay - slow * beta, beta


def _bolus_general(mean: Any, q: Any, tau: np.ndarray) -> tuple[Any, Any]:
    """Any 2×2 K: eigenvalues mean ± √q, q = ((a − d)/2)² + bc.

    Near q = 0 the even series in w = qτ² (cosh and sinh(x)/x, x² = w) needs no √q, whose
    derivative is infinite at 0 (a chain passed as a full matrix has q = 0 at ka = k).
    """
    w = q * tau**2
    small = pt.abs(w) < (Z_SERIES / 2) ** 2  # (λ₁ − λ₂)τ < Z_SERIES, as for a chain
    w_small = pt.switch(small, w, 0.0)
    em = pt.exp(mean * tau)
    beta_s = em * tau * (1 + w_small * (1 / 6 + w_small / 120))  # truncation w³/5040 < 1e-18
    mean_s = em * (1 + w_small * (1 / 2 + w_small * (1 / 24 + w_small / 720)))  # (g(λ₁) + g(λ₂))/2
    delta = pt.sqrt(pt.switch(small, 1.0, q))  # NaN for complex eigenvalues beyond the series
    tau_l = pt.switch(small, 0.0, tau)  # keeps the unused branch finite (e^{(mean ± 1)τ} could overflow)
    g1, g2 = pt.exp((mean + delta) * tau_l), pt.exp((mean - delta) * tau_l)
    beta = pt.switch(small, beta_s, (g1 - g2) / (2 * delta))
    return pt.switch(small, mean_s, (g1 + g2) / 2) - mean * beta, beta


def is_zero(x: Any) -> bool:
    """Whether ``x`` is the number 0 (a term no rate, dose or output reaches), not a tensor."""
    return isinstance(x, (int, float)) and x == 0


def _one_compartment(lam: Any, pairs: dict[str, np.ndarray]) -> Any:
    """g(λ) per pair: e^{λs}, times u·φ₁(λu) for an infusion; −1/λ for a constant infusion at
    steady state (u = inf); times 1/(1 − e^{λτ}) for the past doses of a steady-state dose."""
    u, period = pairs["u"], pairs["period"]
    constant = np.isinf(u)
    g = pt.exp(lam * pairs["s"])
    if pairs["infusion"].any():
        u_finite = np.where(constant, 0.0, u)  # unused branches stay finite, as do their gradients
        g = g * pt.switch(pairs["infusion"] & ~constant, u_finite * _phi1(lam * u_finite), 1.0)
    if constant.any():
        g = pt.switch(constant, -1.0 / lam, g)
    if (period > 0).any():
        g = g * pt.switch(period > 0, -1.0 / pt.expm1(lam * np.where(period > 0, period, 1.0)), 1.0)
    return g


def _scatter(values: Any, obs: np.ndarray, M: int) -> Any:
    """y (M,) = Σ of the pair values of each observation."""
    if len(obs) == M and np.array_equal(obs, np.arange(M)):
        return values  # one pair per observation, in order (one dose per subject)
    return pt.inc_subtensor(pt.zeros(M)[obs], values) if len(obs) else pt.zeros(M)


def closed_form_predict(K: Any, F: Any, C: Any, design: Any) -> pt.TensorVariable:
    """y_m = C[i, o]·x_i(t_m) for 1–2 compartment models, as :func:`itpk.linop.linear_predict`.

    Parameters
    ----------
    K, F, C
        (N, n, n) rates (1/time), (N, D, n) dose amounts or infusion rates, (N, O, n) output
        rows, with n and O known statically (see :func:`supports`).
    design
        :class:`itpk.linop.Design`.

    Returns
    -------
    TensorVariable (M,)
        Output o at each observation, in the unit of C·amount.
    """
    n, O = K.type.shape[1], C.type.shape[1]
    if O is None or not supports(n, design):
        raise ValueError(f"closed_form_predict: no closed form for n = {n}, O = {O} with these doses")
    pairs = design.pairs
    subject = pair_subjects(design)
    dose = subject * design.n_doses + pairs["dose"]
    output = subject * O + pairs["output"]
    Kp = [[K[:, i, j][subject] for j in range(n)] for i in range(n)]
    Fp = [F[:, :, k].reshape((-1,))[dose] for k in range(n)]
    Cp = [C[:, :, k].reshape((-1,))[output] for k in range(n)]
    return pair_predict(Kp, Fp, Cp, design)


def pair_subjects(design: Any) -> np.ndarray:
    """Subject (row of K, F, C) of each (observation, dose) pair of ``design.pairs``."""
    return design.obs_subject[design.pairs["obs"]]


def pair_predict(K: list[list[Any]], F: list[Any], C: list[Any], design: Any) -> pt.TensorVariable:
    """Predictions from K, f and c already taken at each (observation, dose) pair.

    Parameters
    ----------
    K
        n×n nested list: K[i][j] is a (P,) tensor (the subject's rate at each pair, 1/time) or
        a number (0 for flows the model does not have).
    F, C
        n lists of (P,) tensors or numbers: the pair's dose vector (amount, or rate for an
        infusion) and its observation's output row.
    design
        :class:`itpk.linop.Design`; P = the number of its ``pairs``.

    Building these from per-pair parameters (rather than gathering entries of K, F, C) keeps
    the whole prediction and its gradient one elementwise loop: see :mod:`itpk.inference`.
    """
    n = len(F)
    if not supports(n, design):
        raise ValueError(f"pair_predict: no closed form for n = {n} with these doses")
    pairs = design.pairs
    # terms with a zero factor (the number 0) stay out of the graph: a smaller graph compiles
    # faster and its fused loop runs faster (a chain read at its end has c·f = 0, so no α)
    cf = sum(C[k] * F[k] for k in range(n) if not (is_zero(C[k]) or is_zero(F[k])))
    if n == 1:
        return _scatter(cf * _one_compartment(K[0][0], pairs), pairs["obs"], design.n_obs)
    ckf = sum(C[i] * K[i][j] * F[j] for i in range(n) for j in range(n) if not any(is_zero(x) for x in (C[i], K[i][j], F[j])))
    alpha, beta = _bolus_2(K, pairs["s"])
    y = beta * ckf if is_zero(cf) else alpha * cf + beta * ckf
    return _scatter(y, pairs["obs"], design.n_obs)
