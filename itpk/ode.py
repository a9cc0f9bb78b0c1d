"""Nonlinear systems for plain simulation: scipy's stiff-capable integrators.

The integrator is restarted at every event (doses, infusion switches, resets)
so discontinuities never sit inside a step. Tolerances are tight by default
(rtol 1e-10); models whose amounts span many decades (virus copies) keep
relative accuracy because atol is scaled to each state's magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import root

from itpk.errors import ScheduleError
from itpk.events import Dose, Target
from itpk.linear import Inputs
from itpk.system import Values, initial_state, input_fractions, rhs_function

RTOL = 1e-10
ATOL = 1e-14
# Right-hand-side evaluations allowed for one solve between two events (2-4 s of Python). The
# test suite's solves need at most ~2 400; absurd parameters (Vmax = 1e300) made LSODA creep on
# for more than 5 minutes, so past this the solve stops with a message instead.
MAX_RHS_CALLS = 200_000


class _Budget(Exception):
    """Raised inside the right-hand side when a solve has used up MAX_RHS_CALLS."""


class NonlinearStepper:
    """S nonlinear systems, advanced one subject at a time with ``solve_ivp``.

    Parameters
    ----------
    values
        Resolved parameters (S sets).
    targets
        Every dose target the schedule uses.
    method
        A ``solve_ivp`` method; LSODA switches to a stiff (BDF) method when needed.
    labels
        The sets' numbers in messages (default 0..S-1; a retry of some sets passes theirs).
    """

    def __init__(self, values: Values, targets: tuple[Target, ...], *, method: str = "LSODA",
                 rtol: float = RTOL, atol: float = ATOL, labels: Sequence[int] | None = None) -> None:
        self.labels = list(labels) if labels is not None else list(range(values.size))
        self.rhs = [rhs_function(values, s) for s in range(values.size)]
        self.fractions = {t: input_fractions(values, t) for t in targets}
        self.x0 = initial_state(values)
        self.x = self.x0.copy()
        self.method, self.rtol, self.atol = method, rtol, atol

    def _flow(self, s: int, x0: np.ndarray, dt: float, u: np.ndarray) -> np.ndarray:
        if dt <= 0:
            return x0
        rhs = self.rhs[s]
        scale = self.atol * np.maximum(1.0, np.abs(x0).max())
        calls = 0

        def f(t: float, x: np.ndarray) -> np.ndarray:
            nonlocal calls
            calls += 1
            if calls > MAX_RHS_CALLS:
                raise _Budget
            return rhs(t, x) + u

        # only the end point is kept (t_eval): memory does not grow with the steps; an overflow
        # is reported below as one message, not as numpy warnings on the way
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                sol = solve_ivp(f, (0.0, dt), x0, method=self.method, rtol=self.rtol, atol=scale, t_eval=(dt,))
        except _Budget:
            raise ScheduleError(f"the ODE solver gave up on parameter set {self.labels[s]} after {MAX_RHS_CALLS:,} evaluations of the "
                                f"right-hand side over {dt:g} time units: the system is too stiff at these parameter "
                                "values (check them for extreme numbers)") from None
        if not sol.success:
            raise ScheduleError(f"the ODE solver failed for parameter set {self.labels[s]}: {sol.message}")
        if sol.y.shape[1] != 1 or not np.all(np.isfinite(sol.y[:, -1])):
            raise ScheduleError(f"the ODE solution of parameter set {self.labels[s]} became infinite or NaN within {dt:g} time units "
                                "(overflow: check the parameter values for extreme numbers)")
        # Amounts cannot be negative; values like -1e-25 after a state has decayed
        # over many decades are solver round-off, and would poison log-scale outputs.
        return np.maximum(sol.y[:, -1], 0.0)

    def _input(self, s: int, inputs: Inputs) -> np.ndarray:
        u = np.zeros(self.x.shape[1])
        for target, rate in inputs:
            u += rate * self.fractions[target][s]
        return u

    def advance(self, dt: float, inputs: Inputs) -> None:
        """Move every system forward by ``dt`` with constant infusion inputs."""
        for s in range(self.x.shape[0]):
            self.x[s] = self._flow(s, self.x[s], dt, self._input(s, inputs))

    def bolus(self, target: Target, amount: float) -> None:
        self.x = self.x + amount * self.fractions[target]

    def reset(self) -> None:
        self.x = self.x0.copy()

    def state(self) -> np.ndarray:
        return self.x.copy()

    def steady_state(self, dose: Dose) -> None:
        """Periodic steady state found as the fixed point of one dosing interval.

        Starts from 20 periods of plain iteration, then polishes with a root
        finder (tolerance 1e-12 relative).
        """
        for s in range(self.x.shape[0]):
            xss = self._steady_state_one(s, dose)
            self.x[s] = xss if dose.ss == 1 else self.x[s] + xss

    def _steady_state_one(self, s: int, dose: Dose) -> np.ndarray:
        f = self.fractions[dose.target][s]
        rate = dose.infusion_rate
        if dose.is_infusion and dose.ii == 0:
            u = rate * f
            x = self._flow(s, np.zeros_like(f), 1e3, u)
            sol = root(lambda y: self.rhs[s](0.0, y) + u, x, tol=1e-14)
            rate_scale = max(float(np.abs(u).max()), 1e-300)
            balanced = np.all(np.abs(self.rhs[s](0.0, sol.x) + u) <= 1e-9 * rate_scale) and np.all(sol.x >= 0)
            return self._accept(sol.x, bool(balanced), dose)
        if dose.is_infusion:
            m = math.floor(dose.infusion_duration / dose.ii + 1e-12)
            d = max(dose.infusion_duration - m * dose.ii, 0.0)

            def period(y: np.ndarray) -> np.ndarray:
                y = self._flow(s, y, d, (m + 1) * rate * f)
                return self._flow(s, y, dose.ii - d, m * rate * f)
        else:

            def period(y: np.ndarray) -> np.ndarray:
                return self._flow(s, y, dose.ii, np.zeros_like(f)) + dose.amount * f

        x = np.zeros_like(f) if dose.is_infusion else dose.amount * f
        for _ in range(20):
            x = period(x)
        sol = root(lambda y: period(y) - y, x, tol=1e-13)
        return self._accept(sol.x, self._is_fixed_point(period, sol.x), dose)

    @staticmethod
    def _is_fixed_point(period: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> bool:
        """Judge a root by its residual, not the root finder's flag: each evaluation
        is an ODE solve at rtol 1e-10, too noisy for the finder to report success."""
        scale = max(1.0, float(np.abs(x).max()))
        residual = period(x) - x
        return bool(np.all(np.abs(residual) <= 1e-8 * scale) and np.all(x >= -1e-9 * scale))

    @staticmethod
    def _accept(x: np.ndarray, success: bool, dose: Dose) -> np.ndarray:
        if not success or not np.all(np.isfinite(x)):
            raise ScheduleError(f"steady-state dose at time {dose.time}: no steady state was found")
        return x
