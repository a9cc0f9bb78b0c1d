"""Exact peaks and threshold crossings of linear outputs, batched over parameter sets.

Between events a linear output is a sum of exponential modes,

    y(τ) = Σ_k (cV)_k [e^{λ_k τ} a_k + φ_k(τ) b_k],   a = V⁻¹x_e,  b = V⁻¹u_e,
    φ_k(τ) = (e^{λ_k τ} − 1)/λ_k,

from the eigendecomposition K = VΛV⁻¹ and the exact state x_e and input u_e
at the last event. A dense grid of this form brackets every peak and crossing;
a safeguarded Newton iteration on the same form (y' and y'' are analytic)
locates them to machine precision. Sets whose V is ill-conditioned
(cond(V) >= 1e4: near-repeated eigenvalues) are evaluated with ``expm`` from
the last event instead, so every reported number is exact to ~1e-12 or better.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from itpk.events import Schedule
from itpk.linear import EIGEN_MAX_COND, Inputs, LinearStepper, matvec, propagators
from itpk.simulate import walk
from itpk.system import Values


@dataclass(frozen=True)
class Trajectory:
    """Exact states at every event of a schedule, and their modal coordinates.

    Attributes
    ----------
    event_times : (E,)
    before, after, inputs : (S, E, n)
        Amounts just before and after the events at each event time, and the
        input rate (amount/time) from that time on.
    lam, V : (S, n), (S, n, n)
        Eigenvalues and eigenvectors of K (real when all eigenvalues are).
    a, b : (S, E, n)
        V⁻¹·after and V⁻¹·inputs.
    good : (S,)
        cond(V) small enough for modal values to be reported.
    """

    event_times: np.ndarray
    before: np.ndarray
    after: np.ndarray
    inputs: np.ndarray
    K: np.ndarray
    lam: np.ndarray
    V: np.ndarray
    a: np.ndarray
    b: np.ndarray
    good: np.ndarray
    has_input: bool


def trajectory(values: Values, schedule: Schedule) -> Trajectory:
    """Walk the schedule's events exactly (``LinearStepper``) and decompose K."""
    stepper = LinearStepper(values, schedule.targets())
    rows: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = []

    def record(t: float, before: np.ndarray, after: np.ndarray, running: Inputs) -> None:
        u = np.zeros_like(after)
        for target, rate in running:
            u += rate * stepper.fractions[target]
        rows.append((t, before, after, u))

    ends = [t + d.infusion_duration for d in schedule.doses if d.is_infusion for t in d.times()]
    walk(stepper, schedule, np.union1d([0.0], [*schedule.dose_times(), *ends]), record)
    times = np.array([r[0] for r in rows])
    before, after, inputs = (np.stack([r[i] for r in rows], 1) for i in (1, 2, 3))
    lam, V = np.linalg.eig(stepper.K)
    if np.all(lam.imag == 0) and np.all(V.imag == 0):  # the usual case: real arithmetic is 2-4x cheaper
        lam, V = lam.real, V.real
    Vinv = np.linalg.pinv(V)
    with np.errstate(all="ignore"):  # Frobenius condition number: an upper bound of the 2-norm one, no SVD
        cond = np.linalg.norm(V, axis=(1, 2)) * np.linalg.norm(Vinv, axis=(1, 2))
    good = np.isfinite(cond) & (cond < EIGEN_MAX_COND)
    a = np.einsum("sij,sej->sei", Vinv, after)
    b = np.einsum("sij,sej->sei", Vinv, inputs)
    return Trajectory(times, before, after, inputs, stepper.K, lam, V, a, b, good, bool(np.any(inputs)))


@dataclass(frozen=True)
class Trace:
    """One linear output (coefficients c, (S, n)) along a trajectory."""

    traj: Trajectory
    c: np.ndarray

    @cached_property
    def cV(self) -> np.ndarray:  # noqa: N802 - the algebra's name
        return np.einsum("sn,snk->sk", self.c, self.traj.V)

    def grid(self, times: np.ndarray, modes: np.ndarray | None = None) -> np.ndarray:
        """Values (S, T) after events, for bracketing: modal, or ``expm`` for ill-conditioned sets.

        ``modes`` (from :func:`grid_modes`) may be shared by every output of a trajectory.
        """
        tr = self.traj
        modes = grid_modes(tr, times) if modes is None else modes
        y = np.einsum("sk,stk->st", self.cV, modes).real
        bad = np.flatnonzero(~tr.good)
        if bad.size:
            s_rep, t_rep = np.repeat(bad, times.size), np.tile(times, bad.size)
            y[bad] = self._expm(s_rep, t_rep)[0].reshape(bad.size, times.size)
        return y

    def left_limits(self) -> np.ndarray:
        """Exact values (S, E) just before each event."""
        return np.einsum("sen,sn->se", self.traj.before, self.c)

    def exact(self, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Values of sets ``s`` at times ``t`` (after events at t)."""
        return self.values(s, t, order=0)

    def values(self, s: np.ndarray, t: np.ndarray, order: int) -> np.ndarray:
        """y (order 0), y' (1) or y'' (2): modal for well-conditioned sets, ``expm`` for the others."""
        y = self._modal(s, t, order)
        bad = ~self.traj.good[s]
        if np.any(bad):
            y[bad] = self._expm(s[bad], t[bad])[order]
        return y

    def _modal(self, s: np.ndarray, t: np.ndarray, order: int) -> np.ndarray:
        tr = self.traj
        e = np.searchsorted(tr.event_times, t, side="right") - 1
        tau = (t - tr.event_times[e])[:, None]
        lam, cV, a, b = tr.lam[s], self.cV[s], tr.a[s, e], tr.b[s, e]
        ez = np.exp(lam * tau)
        if order == 0:
            terms = ez * a + (_phi(lam, lam * tau, tau) * b if tr.has_input else 0)
        elif order == 1:
            terms = ez * (lam * a + b)
        else:
            terms = lam * ez * (lam * a + b)
        return np.einsum("mk,mk->m", cV, terms).real

    def _expm(self, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact y, y', y'' with ``expm`` from the last event."""
        tr = self.traj
        e = np.searchsorted(tr.event_times, t, side="right") - 1
        K, u, c = tr.K[s], tr.inputs[s, e], self.c[s]
        E, G = propagators(K, t - tr.event_times[e])
        x = matvec(E, tr.after[s, e]) + matvec(G, u)
        dx = matvec(K, x) + u
        dot = lambda v: np.einsum("mn,mn->m", c, v)  # noqa: E731
        return dot(x), dot(dx), dot(matvec(K, dx))


def grid_modes(tr: Trajectory, times: np.ndarray) -> np.ndarray:
    """Modal terms e^{λτ}a + φ(τ)b at every grid time, (S, T, n), shared by all outputs."""
    seg = np.searchsorted(tr.event_times, times, side="right") - 1
    tau = times - tr.event_times[seg]
    z = tr.lam[:, None, :] * tau[None, :, None]
    modes = np.exp(z) * tr.a[:, seg]
    if tr.has_input:
        modes = modes + _phi(tr.lam[:, None, :], z, tau[None, :, None]) * tr.b[:, seg]
    return modes


def _phi(lam: np.ndarray, z: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """(e^{λτ} − 1)/λ, and τ where λ = 0."""
    with np.errstate(all="ignore"):
        return np.where(lam == 0, tau, np.expm1(z) / np.where(lam == 0, 1, lam))


def peak(trace: Trace, grid: np.ndarray, modes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maximum value and its time for every set, (S,) each.

    Candidates: the grid maximum (value recomputed exactly), the largest left
    limit at an event (an infusion's end), and stationary points inside the two
    grid intervals next to each of the grid's separate peaks near its largest
    (:func:`local_maxima`; repeated doses give nearly equal peaks, and the grid's
    largest need not be the true one's: an audit found Tmax 25.03 h for 49.03 h,
    Cmax 1.1e-6 low).
    """
    y = trace.grid(grid, modes)
    S, T = y.shape
    rows = np.arange(S)
    j = np.argmax(y, axis=1)
    at = grid[j].astype(float)
    best = trace.exact(rows, at)
    left = trace.left_limits()
    k = np.argmax(left, axis=1)
    better = left[rows, k] > best
    best[better], at[better] = left[rows, k][better], trace.traj.event_times[k][better]
    candidates, valid = local_maxima(y, PEAK_CANDIDATES)
    for j, use in zip(candidates.T, valid.T, strict=True):
        for a in (j - 1, j):
            ok = use & (a >= 0) & (a + 1 < T)
            if not ok.any():
                continue
            s, a = rows[ok], a[ok]
            t_star, y_star = _root(trace, s, grid[a], grid[a + 1], level=None)
            better = y_star > best[s]
            best[s[better]], at[s[better]] = y_star[better], t_star[better]
    return best, at


PEAK_CANDIDATES = 32  # separate peaks of the grid refined per set, at most (a month of daily doses nearly)
PEAK_TIE = 0.1  # ... those within this fraction of the grid's maximum (the others cannot hold the peak)
PEAK_DIP = 1e-6  # ... and apart from one another by a valley at least this fraction of the maximum deep


def local_maxima(y: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, k ≤ m) grid indices of the largest separate peaks of each row (the row's maximum first), and
    (S, k) whether each is one (the maximum always is).

    A peak counts when it lies within :data:`PEAK_TIE` of the row's maximum; neighbouring local maxima
    with no valley deeper than :data:`PEAK_DIP` of the maximum between them are one peak (wiggles at a
    solver's tolerance on a flat top are local maxima too, and took the slots of the peaks that
    matter). The tie is wide because a dense grid still misses a narrow peak by a few percent: on
    three doses of a small molecule, the grid put the true (third) peak 1.1% below the first.
    """
    S, T = y.shape
    rows = np.arange(S)
    top = np.argmax(y, axis=1)
    peak = y[rows, top]
    local = np.ones(y.shape, dtype=bool)
    local[:, 1:] &= y[:, 1:] >= y[:, :-1]
    local[:, :-1] &= y[:, :-1] >= y[:, 1:]
    with np.errstate(invalid="ignore"):
        tied = local & (y >= (peak - PEAK_TIE * np.abs(peak))[:, None])
    tied[rows, top] = True
    r, j = np.nonzero(tied)  # row by row, in time order
    v = y[r, j]
    valley = np.fmin.reduceat(y.reshape(-1), r * T + j)[:-1]  # lowest value from one to the next (NaN skipped)
    with np.errstate(invalid="ignore"):
        apart = (r[1:] != r[:-1]) | (valley < np.minimum(v[1:], v[:-1]) - PEAK_DIP * np.abs(peak[r[1:]]))
    group = np.concatenate([[0], np.cumsum(apart)])
    order = np.lexsort((j, -np.nan_to_num(v, nan=-np.inf), group))
    best = order[np.unique(group[order], return_index=True)[1]]  # each group's highest (earliest of equal)
    best = best[j[best] != top[r[best]]]  # the row's maximum goes first, below
    best = best[np.lexsort((j[best], -np.nan_to_num(v[best], nan=-np.inf), r[best]))]
    rank = np.arange(best.size) - np.searchsorted(r[best], r[best], side="left")
    k = int(min(m - 1, rank.max(initial=-1) + 1))
    keep = best[rank < k]
    index = np.repeat(top[:, None], k + 1, axis=1)
    valid = np.zeros(index.shape, dtype=bool)
    valid[:, 0] = True
    index[r[keep], 1 + rank[rank < k]] = j[keep]
    valid[r[keep], 1 + rank[rank < k]] = True
    return index, valid


def time_above(trace: Trace, grid: np.ndarray, level: float, modes: np.ndarray | None = None) -> np.ndarray:
    """Total time (S,) with the output at or above ``level``; crossings located exactly.

    The grid holds every event time, so the output is smooth inside each grid
    interval; the value at an interval's end is its left limit.
    """
    tr = trace.traj
    y = trace.grid(grid, modes)
    start, end = y[:, :-1], y[:, 1:].copy()
    is_event = np.isin(grid[1:], tr.event_times)
    if np.any(is_event):
        end[:, is_event] = trace.left_limits()[:, np.searchsorted(tr.event_times, grid[1:][is_event])]
    total = np.where((start >= level) & (end >= level), np.diff(grid)[None, :], 0.0).sum(axis=1)
    s, a = np.nonzero((start >= level) != (end >= level))
    if s.size:
        t_cross, _ = _root(trace, s, grid[a], grid[a + 1], level=level)
        part = np.where(start[s, a] >= level, t_cross - grid[a], grid[a + 1] - t_cross)
        np.add.at(total, s, part)
    return total


def _root(trace: Trace, s: np.ndarray, t_lo: np.ndarray, t_hi: np.ndarray, *, level: float | None):  # noqa: ANN202
    """Root of h in (t_lo, t_hi) per item: h = y' (peaks, level None) or y − level.

    Safeguarded Newton (bisection where a step leaves the bracket), iterating
    only unconverged items; values come from ``Trace.values``. Items where h does
    not change sign return y = −inf for peaks (their ends are candidates already).
    """
    order = 1 if level is None else 0
    offset = 0.0 if level is None else level

    def h(items: np.ndarray, t: np.ndarray) -> np.ndarray:
        return trace.values(s[items], t, order) - offset

    def slope(items: np.ndarray, t: np.ndarray) -> np.ndarray:
        return trace.values(s[items], t, order + 1)

    eps = 1e-13 * np.maximum(np.abs(t_hi), 1.0)
    lo, hi = t_lo + eps, t_hi - eps
    everyone = np.arange(s.size)
    h_lo = h(everyone, lo)
    bracketed = np.sign(h_lo) * np.sign(h(everyone, hi)) < 0
    t = np.where(bracketed, 0.5 * (lo + hi), lo)
    active = everyone[bracketed]
    for _ in range(100):
        if active.size == 0:
            break
        ta = t[active]
        ha, da = h(active, ta), slope(active, ta)
        same = np.sign(ha) == np.sign(h_lo[active])
        lo[active] = np.where(same, ta, lo[active])
        hi[active] = np.where(same, hi[active], ta)
        with np.errstate(all="ignore"):
            newton = ta - ha / da
        inside = np.isfinite(newton) & (newton > lo[active]) & (newton < hi[active])
        step = np.where(inside, newton, 0.5 * (lo[active] + hi[active]))
        t[active] = step
        active = active[np.abs(step - ta) > 1e-13 * np.maximum(np.abs(ta), 1.0)]
    y = trace.exact(s, t)
    if level is None:
        y = np.where(bracketed, y, -np.inf)
    return t, y
