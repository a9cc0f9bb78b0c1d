"""Exact solution of linear compartment systems, batched over parameter sets.

Between events the input u is constant, so over a step Δ

    x(t + Δ) = E(Δ) x(t) + G(Δ) u,   E = e^{KΔ},  G = ∫₀^Δ e^{Ks} ds,

and both blocks come from one matrix exponential of the augmented matrix
[[K, I], [0, 0]]·Δ (Van Loan), which stays exact when K is singular (no
elimination from a compartment). Steps of equal length share one
exponential, so a regular output grid costs a handful of ``expm`` calls for a
whole population. Steady states solve the linear fixed point of one dosing
interval; AUC over [0, ∞) is −K⁻¹x.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import expm

from itpk.errors import ScheduleError
from itpk.events import Dose, Target
from itpk.system import Values, initial_state, input_fractions, rate_matrix

Inputs = tuple[tuple[Target, float], ...]


def propagators(K: np.ndarray, dt: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E = e^{KΔ} and G = ∫₀^Δ e^{Ks} ds for a batch of matrices K (S, n, n).

    Parameters
    ----------
    K
        Compartment matrices, 1/time.
    dt
        Step Δ >= 0, time: one for all, or one per matrix (S,).
    """
    S, n, _ = K.shape
    step = np.broadcast_to(np.asarray(dt, dtype=float), (S,))[:, None, None]
    block = np.zeros((S, 2 * n, 2 * n))
    block[:, :n, :n] = K * step
    block[:, :n, n:] = np.eye(n) * step
    M = expm(block)
    return M[:, :n, :n], M[:, :n, n:]


def matvec(A: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Batched A @ x for A (S, n, n) and x (S, n)."""
    return np.einsum("sij,sj->si", A, x)


EIGEN_MAX_COND = 1e4  # above this, e^{KΔ} from eigenvectors loses more than ~1e-12: use expm


class EigenPropagator:
    """E(Δ) and G(Δ) from K = VΛV⁻¹, computed once per parameter set.

    A new step length then costs two batched matrix products instead of an
    ``expm``: 3.9x faster on the 10,000-subject benchmark. Sets whose V is
    ill-conditioned (near-repeated eigenvalues, e.g. ka ≈ k) use ``expm``.
    """

    def __init__(self, K: np.ndarray) -> None:
        self.K = K
        lam, V = np.linalg.eig(K)
        with np.errstate(all="ignore"):
            cond = np.linalg.cond(V)
        self.good = np.isfinite(cond) & (cond < EIGEN_MAX_COND)
        self.lam, self.V = lam[self.good], V[self.good]
        self.Vinv = np.linalg.inv(self.V) if self.V.size else self.V

    def __bool__(self) -> bool:
        return bool(self.good.any())

    def propagators(self, dt: float) -> tuple[np.ndarray, np.ndarray]:
        z = self.lam * dt
        with np.errstate(all="ignore"):
            phi = np.where(np.abs(z) > 1e-12, np.expm1(z) / self.lam, dt)
        E = np.empty_like(self.K)
        G = np.empty_like(self.K)
        E[self.good] = ((self.V * np.exp(z)[:, None, :]) @ self.Vinv).real
        G[self.good] = ((self.V * phi[:, None, :]) @ self.Vinv).real
        if not self.good.all():
            E[~self.good], G[~self.good] = propagators(self.K[~self.good], dt)
        return E, G


class LinearStepper:
    """State of S linear systems advanced through events exactly.

    Parameters
    ----------
    values
        Resolved parameters (S sets).
    targets
        Every dose target the schedule uses (routes or compartments).
    """

    def __init__(self, values: Values, targets: tuple[Target, ...]) -> None:
        self.K = rate_matrix(values)
        self.fractions = {t: input_fractions(values, t) for t in targets}
        self.x0 = initial_state(values)
        self.x = self.x0.copy()
        self._cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        self._eigen = EigenPropagator(self.K)

    def _propagators(self, dt: float) -> tuple[np.ndarray, np.ndarray]:
        if dt not in self._cache:
            self._cache[dt] = self._eigen.propagators(dt) if self._eigen else propagators(self.K, dt)
        return self._cache[dt]

    def _input(self, inputs: Inputs, scale: float = 1.0) -> np.ndarray:
        u = np.zeros_like(self.x)
        for target, rate in inputs:
            u += (scale * rate) * self.fractions[target]
        return u

    def advance(self, dt: float, inputs: Inputs) -> None:
        """Move the state forward by ``dt`` with constant infusion inputs."""
        if dt <= 0:
            return
        E, G = self._propagators(dt)
        self.x = matvec(E, self.x)
        if inputs:
            self.x += matvec(G, self._input(inputs))

    def bolus(self, target: Target, amount: float) -> None:
        """Add ``amount`` through ``target``."""
        self.x = self.x + amount * self.fractions[target]

    def reset(self) -> None:
        """Amounts back to their initial values (zero unless the model sets ``initial``);
        running infusions are stopped by the driver."""
        self.x = self.x0.copy()

    def state(self) -> np.ndarray:
        """Current amounts, (S, n)."""
        return self.x.copy()

    def steady_state(self, dose: Dose) -> None:
        """Replace (SS=1) or increment (SS=2) the state by the periodic steady state.

        The result is the state at the dose time just after a bolus, or at the
        start of an infusion (the running infusions are switched on by the
        driver). Raises ScheduleError when no steady state exists.
        """
        f = self.fractions[dose.target]
        n = self.K.shape[1]
        eye = np.broadcast_to(np.eye(n), self.K.shape)
        if dose.is_infusion and dose.ii == 0:
            lhs, rhs = -self.K, dose.infusion_rate * f  # K x + u = 0
        elif not dose.is_infusion:
            E, _ = self._propagators(dose.ii)
            lhs, rhs = eye - E, dose.amount * f
        else:
            lhs, rhs = eye - self._propagators(dose.ii)[0], self._periodic_infusion_input(dose, f)
        xss = _solve_steady_state(lhs, rhs, dose)
        self.x = xss if dose.ss == 1 else self.x + xss

    def _periodic_infusion_input(self, dose: Dose, f: np.ndarray) -> np.ndarray:
        """State contributed over one period by the infusions of a periodic regimen.

        Duration D = m·II + d: (m+1) infusions run for d, then m for II - d.
        """
        ii, duration, rate = dose.ii, dose.infusion_duration, dose.infusion_rate
        m = math.floor(duration / ii + 1e-12)
        d = max(duration - m * ii, 0.0)
        E_rest, G_rest = self._propagators(ii - d)
        _, G_d = self._propagators(d)
        u = rate * f
        return matvec(E_rest, matvec(G_d, (m + 1) * u)) + matvec(G_rest, m * u)


def _solve_steady_state(lhs: np.ndarray, rhs: np.ndarray, dose: Dose) -> np.ndarray:
    cond = np.linalg.cond(lhs)
    if not np.all(np.isfinite(cond)) or np.any(cond > 1e12):
        raise ScheduleError(
            f"steady-state dose at time {dose.time} into {dose.target}: no steady state exists "
            "(some amount is never eliminated, so repeated doses accumulate without bound)"
        )
    return np.linalg.solve(lhs, rhs[..., None])[..., 0]


def auc_infinity(K: np.ndarray, x0: np.ndarray, names: tuple[str, ...] | None = None) -> np.ndarray:
    """∫₀^∞ x(t) dt = −K⁻¹ x₀ for each system, amount·time; (S, n).

    Only the compartments that x₀ reaches through K's flows take part: a compartment
    cut off from the doses (a peripheral compartment with Q = 0) has AUC 0, although it
    makes K singular. Slow elimination gives a large, finite AUC.

    Raises
    ------
    ScheduleError
        When some amount reached has no path to elimination: the AUC is infinite. The
        message names where it stays (from ``names``, the compartments in K's order).
    """
    reached = _reached(K, x0)
    stuck = _trapped(K) & reached
    if stuck.any():
        s = int(np.flatnonzero(stuck.any(axis=1))[0])
        where = ", ".join(names[j] if names else str(j) for j in np.flatnonzero(stuck[s]))
        raise ScheduleError(f"exposure over [0, ∞) is infinite: the amount reaching {where} is never eliminated "
                            "(no path out of the system from there; a linear model's AUC is over [0, ∞)): "
                            "give an elimination rate > 0")
    out = np.zeros(x0.shape)
    for pattern in np.unique(reached, axis=0):  # usually one: every system has the same structure
        systems = np.flatnonzero((reached == pattern).all(axis=1))
        idx = np.flatnonzero(pattern)
        if idx.size:
            sub = K[np.ix_(systems, idx, idx)]
            out[np.ix_(systems, idx)] = -np.linalg.solve(sub, x0[np.ix_(systems, idx)][..., None])[..., 0]
    return out


def _trapped(K: np.ndarray) -> np.ndarray:
    """(S, n) bool: the compartments that hold amount for ever, those of a closed group (every compartment
    they flow to flows back to them) without elimination. A compartment that only passes amount on to such
    a group (a depot) is not one: the group is where it stays."""
    n = K.shape[-1]
    tol = 1e-13 * np.abs(K).max(axis=(1, 2), initial=0.0)[:, None]  # column sums carry ~1e-16 of the largest rate
    off = ~np.eye(n, dtype=bool)
    path = np.eye(n, dtype=bool) | ((K > tol[:, :, None]) & off).transpose(0, 2, 1)  # path[s, i, j]: i reaches j
    for _ in range(n):  # transitive closure (n: a handful of compartments)
        path = path | (np.einsum("sik,skj->sij", path, path.astype(np.int64)) > 0)
    escapes = (path & (-K.sum(axis=1) > tol)[:, None, :]).any(axis=2)
    closed = (~path | path.transpose(0, 2, 1)).all(axis=2)  # everything i reaches reaches i back
    return closed & ~escapes


def _reached(K: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """(S, n) bool: the compartments holding some of x₀ or fed by a flow from one that does (K[j, i] > 0: i → j)."""
    flows = K > 0  # off-diagonal entries of a rate matrix are >= 0; the diagonal is <= 0
    reached = x0 != 0
    for _ in range(K.shape[-1]):
        grown = reached | np.einsum("sji,si->sj", flows, reached)
        if (grown == reached).all():
            break
        reached = grown
    return reached
