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
from itpk.events import Dose, Target, steady_state_infusions
from itpk.system import Values, input_fractions, rate_matrix

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
        self.x = np.zeros(self.K.shape[:2])
        self._cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def _propagators(self, dt: float) -> tuple[np.ndarray, np.ndarray]:
        if dt not in self._cache:
            self._cache[dt] = propagators(self.K, dt)
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
        """All amounts to zero (running infusions are stopped by the driver)."""
        self.x = np.zeros_like(self.x)

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


def auc_infinity(K: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """∫₀^∞ x(t) dt = −K⁻¹ x₀ for each system, amount·time; (S, n).

    Requires every amount to be eventually eliminated (K invertible).
    """
    return -np.linalg.solve(K, x0[..., None])[..., 0]
