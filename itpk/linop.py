"""Exact predictions of linear compartment models as a pytensor Op, with gradients.

For subject i with compartment matrix K = VΛV⁻¹ (dx/dt = Kx + input), an
output row c and a dose vector f, the contribution of one dose to one
observation is a modal sum

    y = cᵀ g(K) f = Σ_j (Vᵀc)_j g(λ_j) (V⁻¹f)_j,

    bolus     g(λ) = e^{λτ},                      τ = t − t_d,
    infusion  g(λ) = e^{λs} φ(λ, u),  φ(λ, u) = (e^{λu} − 1)/λ,
              u = t_e − t_d, s = t − t_e, t_e = min(t, t_d + duration),

and the observation is the sum over the doses given since the last reset.
The gradient with respect to K is the Daleckii–Krein formula

    K̄ = Re(V⁻ᵀ [ (Vᵀc)(V⁻¹f)ᵀ ∘ Γ ] Vᵀ),  Γ_jk = (g(λ_j) − g(λ_k))/(λ_j − λ_k),  Γ_jj = g'(λ_j),

accumulated over every (observation, dose) pair of a subject before the two
n×n products, so K̄ costs one O(n³) transform per subject. Eigenvalues come
in complex arithmetic when they are complex (cyclic flows) and in real
arithmetic otherwise (the usual case, ~2× cheaper). A 2×2 K is decomposed in
closed form (LAPACK's call overhead was most of the cost of a Theoph-sized
gradient); larger ones by LAPACK ``dgeev`` through numba's ``np.linalg.eig``.
Models of 1–2 compartments (whose eigenvalues are always real) get kernels
in real arithmetic only (``LinearPredict(small=True)``, chosen by
:func:`linear_predict` from K's static shape): same sums, but numba compiles
no complex specialisation and no LAPACK call, which was most of a short
fit's wall time. Where the closed forms of :mod:`itpk.closedform` cover the
model and doses (bolus doses of 1–2 compartments, infusions into one),
:func:`linear_predict` returns those instead (``method="auto"``): a fused
elementwise graph, cheaper per gradient and exact through ka = k.

Both Ops (:class:`LinearPredict` and :class:`LinearPredictGrad`) run the same
numba kernels from ``perform`` and from pytensor's numba backend, so a model
compiled with ``mode="NUMBA"`` or by nutpie runs with no Python in the loop.
The forward Op also returns Λ, V and V⁻¹ so the gradient reuses the
eigendecomposition instead of repeating it.

Steady-state doses (SS = 1, 2) add one more pair per observation for their past
doses: g(λ)·1/(1 − e^{λτ}) with τ = II (a geometric series of modal responses; its
λ-derivative τR(R − 1) for R = 1/(1 − e^{λτ})), and a constant infusion at steady
state (II = 0) contributes g(λ) = −1/λ. A periodic infusion longer than II adds
K − 1 more (K = ⌈duration/II⌉, at most :data:`MAX_OVERLAP`): its predecessors still
running when it starts, as ordinary infusions; the geometric series then starts K·II back.

Limits: no nonzero initial amounts; periodic steady-state doses of finite
duration; K must be diagonalisable with cond₁(V) <= 1e12 — otherwise that
subject's predictions and gradients are NaN so a sampler rejects the point
(an exactly repeated, defective eigenvalue such as ka == CL/V, or a chain of
transit compartments with one shared rate, is always NaN). Nearly equal
eigenvalues (ka ≈ CL/V) cost accuracy: y has an absolute error of about
cond(V)·1e-16 of the profile's scale (3.7e-7 at ka = CL/V·(1 + 1e-9), where
cond(V) ≈ 2e9), and K̄ entries that split the near-repeated pair (there, the
structurally zero K̄[depot, central]) up to cond(V)²·1e-16; the entries a
compartment model uses stay within ~1e-6.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType, disconnected_type
from pytensor.graph.basic import Apply, Constant
from pytensor.graph.op import Op
from pytensor.link.numba.dispatch.basic import register_funcify_default_op_cache_key

from itpk import closedform, native
from itpk.errors import FitError
from itpk.native import NativeKernel, as_pointer, keep_alive

__all__ = ["Design", "LinearPredict", "LinearPredictGrad", "linear_predict"]

MAX_COND = 1e12  # cond₁(V) above this: modal sums lose everything, return NaN
NEAR_EQUAL = 1e-5  # |λ_j − λ_k|·T below this: divided difference by g' at the midpoint (error ~(δT)²/24)
TAYLOR_RADIUS = 0.5  # |z| below this: φ₁ and ψ by their Taylor series (direct forms cancel)

# Taylor coefficients for |z| < 0.5, 15 terms: truncation < 1e-16 relative.
_PHI1 = tuple(1.0 / math.factorial(k + 1) for k in range(15))  # φ₁(z) = (e^z − 1)/z = Σ z^k/(k+1)!
_PSI = tuple((k + 1) / math.factorial(k + 2) for k in range(15))  # ψ(z) = φ₁'(z) = Σ (k+1) z^k/(k+2)!

# pytensor caches compiled graphs by Op type and this number; numba's own cache
# does not see edits to the kernels it inlines, so the key follows this file's text.
_CACHE_VERSION = int(hashlib.sha256(Path(__file__).read_bytes() + Path(native.__file__).read_bytes()).hexdigest()[:12], 16)

_njit = numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True)


# --------------------------------------------------------------------------------------
# The static design
# --------------------------------------------------------------------------------------


MAX_OVERLAP = 1000  # predecessors a steady-state infusion may overlap (duration/II): more is a data error


@dataclass(frozen=True, eq=False)  # arrays: compared and hashed by identity
class Design:
    """Doses and observations of N subjects: everything a prediction needs but parameters.

    Arrays are converted to read-only numpy arrays of the stated dtype.

    Attributes
    ----------
    dose_time : ndarray (N, D) float64
        Time of each dose of each subject, model time unit; padding where
        ``dose_valid`` is False (its value is ignored).
    dose_duration : ndarray (N, D) float64
        0 for a bolus; the infusion duration (time unit, ``inf`` for an
        infusion that never stops), already truncated at the next reset.
    dose_valid : ndarray (N, D) bool
        False for padding.
    obs_subject : ndarray (M,) int64
        Subject (row of K, F, C) of each observation, 0..N−1.
    obs_time : ndarray (M,) float64
        Observation time (time unit); a dose at that time counts (value just after it).
    obs_output : ndarray (M,) int64
        Output row of C, 0..O−1.
    obs_after : ndarray (M,) float64
        Doses count only if ``dose_time >= obs_after``: the last reset at or
        before the observation, ``-inf`` if none.
    dose_ss_period : ndarray (N, D) float64, optional
        Steady-state doses (SS = 1 or 2): 0 for an ordinary dose; the interval
        II (time unit) when the dose stands for its repetition every II since
        long before (an infusion may last longer than II, up to MAX_OVERLAP·II:
        the repetitions overlap; its duration must be finite); ``inf`` for a constant
        infusion at steady state (II = 0). Default: no steady-state doses. An
        SS = 1 dose's reset is a reset like any other (``obs_after``).
    """

    dose_time: np.ndarray
    dose_duration: np.ndarray
    dose_valid: np.ndarray
    obs_subject: np.ndarray
    obs_time: np.ndarray
    obs_output: np.ndarray
    obs_after: np.ndarray
    dose_ss_period: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.dose_ss_period is None:
            object.__setattr__(self, "dose_ss_period", np.zeros(np.shape(self.dose_time)))
        dtypes = {
            "dose_time": np.float64, "dose_duration": np.float64, "dose_valid": np.bool_,
            "obs_subject": np.int64, "obs_time": np.float64, "obs_output": np.int64, "obs_after": np.float64,
            "dose_ss_period": np.float64,
        }  # fmt: skip
        for name, dtype in dtypes.items():
            value = getattr(self, name)
            try:
                array = np.array(value, dtype=dtype, copy=True, order="C")
            except (TypeError, ValueError) as exc:
                raise FitError(f"Design.{name}: cannot be read as {np.dtype(dtype).name} ({exc})") from None
            if np.issubdtype(dtype, np.integer) and not np.array_equal(array, np.asarray(value)):
                raise FitError(f"Design.{name}: must hold whole numbers, found {np.asarray(value)[:3].tolist()}")
            array.flags.writeable = False
            object.__setattr__(self, name, array)
        problems = self._problems()
        if problems:
            raise FitError("invalid Design:\n" + "\n".join(f"- {p}" for p in problems))

    def _problems(self) -> list[str]:
        problems = []
        shape = self.dose_time.shape
        if len(shape) != 2 or shape[0] < 1:
            return [f"dose_time must be 2-D (subjects N >= 1, doses D), found shape {shape}"]
        for name in ("dose_duration", "dose_valid", "dose_ss_period"):
            if getattr(self, name).shape != shape:
                problems.append(f"{name} must have the shape of dose_time {shape}, found {getattr(self, name).shape}")
        M = self.obs_subject.shape
        if len(M) != 1:
            problems.append(f"obs_subject must be 1-D, found shape {M}")
        for name in ("obs_time", "obs_output", "obs_after"):
            if getattr(self, name).shape != M:
                problems.append(f"{name} must have the shape of obs_subject {M}, found {getattr(self, name).shape}")
        if problems:
            return problems
        valid = self.dose_valid
        if not np.all(np.isfinite(self.dose_time[valid])):
            problems.append(f"dose_time must be finite for valid doses, found {_first(self.dose_time[valid], lambda v: ~np.isfinite(v))}")
        dur = self.dose_duration[valid]
        if np.any(np.isnan(dur) | (dur < 0)):
            problems.append(f"dose_duration must be >= 0 (inf allowed), found {_first(dur, lambda d: np.isnan(d) | (d < 0))}")
        period, duration = self.dose_ss_period[valid], self.dose_duration[valid]
        if np.any(np.isnan(period) | (period < 0)):
            problems.append(f"dose_ss_period must be >= 0 (inf allowed), found {_first(period, lambda p: np.isnan(p) | (p < 0))}")
        else:
            periodic = np.isfinite(period) & (period > 0)
            if np.any(periodic & np.isinf(duration)):
                problems.append("a periodic steady-state dose must have a finite duration (dose_duration inf with a finite dose_ss_period)")
            with np.errstate(divide="ignore", invalid="ignore"):
                overlap = np.where(periodic & np.isfinite(duration), duration / np.where(periodic, period, 1.0), 0.0)
            if np.any(overlap > MAX_OVERLAP):
                problems.append(f"a steady-state infusion lasting {overlap.max():.4g} times its interval overlaps more than "
                                f"{MAX_OVERLAP} of its predecessors (check RATE, AMT and II)")
        N = shape[0]
        if np.any((self.obs_subject < 0) | (self.obs_subject >= N)):
            problems.append(f"obs_subject must be in 0..{N - 1}, found {_first(self.obs_subject, lambda s: (s < 0) | (s >= N))}")
        if not np.all(np.isfinite(self.obs_time)):
            problems.append(f"obs_time must be finite, found {_first(self.obs_time, lambda v: ~np.isfinite(v))}")
        if np.any(self.obs_output < 0):
            problems.append(f"obs_output must be >= 0, found {_first(self.obs_output, lambda o: o < 0)}")
        after_ok = ~np.isnan(self.obs_after) & (self.obs_after <= self.obs_time)
        if not np.all(after_ok):
            problems.append(f"obs_after must be <= obs_time (or -inf), found {self.obs_after[~after_ok][:3].tolist()}")
        return problems

    @property
    def n_subjects(self) -> int:
        return self.dose_time.shape[0]

    @property
    def n_doses(self) -> int:
        """D: doses per subject including padding."""
        return self.dose_time.shape[1]

    @property
    def n_obs(self) -> int:
        return self.obs_time.shape[0]

    @cached_property
    def pairs(self) -> dict[str, np.ndarray]:
        """Every (observation, dose) pair that contributes, grouped by subject.

        ``subject_start`` (N+1,) delimits each subject's pairs; per pair:
        ``obs``, ``dose`` (column of F), ``output``, ``infusion`` (bool),
        ``s`` = time since the input ended and ``u`` = time the infusion has
        run (0 for a bolus; inf for a constant steady-state infusion), time unit,
        and ``period`` (0, or τ for the past doses of a steady-state dose: a
        second pair of that dose and observation whose response repeats every τ;
        its ``s`` counts from the end of the last of them that had ended when the
        dose started, K·τ before it). A steady-state infusion longer than τ also
        gets K − 1 ordinary pairs (period 0), its predecessors started k·τ before
        it (k = 1..K−1, K = ⌈duration/τ⌉), still running at its start.
        """
        subj = self.obs_subject
        td, valid = self.dose_time[subj], self.dose_valid[subj]  # (M, D)
        t, after = self.obs_time[:, None], self.obs_after[:, None]
        with np.errstate(invalid="ignore"):  # padding may hold NaN
            counts = valid & (td <= t) & (td >= after)
        obs, dose = np.nonzero(counts)
        tau, d = self.dose_ss_period[subj[obs], dose], self.dose_duration[subj[obs], dose]
        past = np.isfinite(tau) & (tau > 0)  # τ: the doses before this one, every τ
        # A steady-state infusion longer than τ overlaps its K − 1 predecessors (K = ⌈d/τ⌉): they
        # are still running at its start and enter as ordinary infusions that began k·τ before it;
        # the periodic pair then stands for the ones that have ended (k >= K).
        with np.errstate(invalid="ignore", divide="ignore"):
            K = np.where(past, np.maximum(1.0, np.ceil(d / np.where(past, tau, 1.0))), 1.0).astype(np.int64)
        running = np.repeat(np.arange(obs.size), K - 1)
        k_running = np.arange(running.size) - np.repeat(np.cumsum(K - 1) - (K - 1), K - 1) + 1
        obs = np.concatenate([obs, obs[past], obs[running]])
        dose = np.concatenate([dose, dose[past], dose[running]])
        kind = np.repeat(np.array([0, 1, 2], dtype=np.int8), [past.size, int(past.sum()), running.size])
        back = np.concatenate([np.zeros(past.size), K[past], k_running]).astype(float)  # intervals before the dose
        order = np.argsort(subj[obs], kind="stable")
        obs, dose, kind, back = obs[order], dose[order], kind[order], back[order]
        tau = np.where(kind > 0, self.dose_ss_period[subj[obs], dose], 0.0)
        period = np.where(kind == 1, tau, 0.0)
        t_obs, d = self.obs_time[obs], self.dose_duration[subj[obs], dose]
        t_dose = self.dose_time[subj[obs], dose] - back * tau
        constant = (kind == 0) & np.isinf(self.dose_ss_period[subj[obs], dose])  # constant infusion at steady state
        infusion = d > 0
        t_end = np.where(infusion, np.minimum(t_obs, t_dose + d), t_dose)
        s, u = t_obs - t_end, t_end - t_dose
        # the periodic pair: the last of the ended doses started K·τ before this one and ended
        # (K·τ >= d) by the time this one started
        s = np.where(kind == 1, np.maximum(t_obs - t_dose - d, 0.0), np.where(constant, 0.0, s))
        u = np.where(kind == 1, d, np.where(constant, np.inf, u))
        start = np.searchsorted(subj[obs], np.arange(self.n_subjects + 1), side="left")
        return {
            "subject_start": start.astype(np.int64),
            "obs": obs.astype(np.int64),
            "dose": dose.astype(np.int64),
            "output": self.obs_output[obs].astype(np.int64),
            "infusion": infusion,
            "s": s,
            "u": u,
            "period": period,
        }


def _first(values: np.ndarray, bad: Any) -> list[Any]:
    return values[bad(values)][:3].tolist()


# --------------------------------------------------------------------------------------
# Scalar modal functions (real or complex λ: numba compiles one version of each)
# --------------------------------------------------------------------------------------


@_njit
def _horner(coef: tuple[float, ...], z: Any) -> Any:
    acc = z * 0.0 + coef[len(coef) - 1]
    for k in range(len(coef) - 2, -1, -1):
        acc = acc * z + coef[k]
    return acc


@_njit
def _phi1(z: Any, ez: Any) -> Any:
    """φ₁(z) = (e^z − 1)/z (→ 1 at z = 0), given ez = e^z."""
    if abs(z) < TAYLOR_RADIUS:
        return _horner(_PHI1, z)
    return (ez - 1.0) / z


@_njit
def _psi(z: Any, ez: Any) -> Any:
    """ψ(z) = φ₁'(z) = (e^z (z − 1) + 1)/z² (→ 1/2 at z = 0), given ez = e^z."""
    if abs(z) < TAYLOR_RADIUS:
        return _horner(_PSI, z)
    return (ez * (z - 1.0) + 1.0) / (z * z)


@_njit
def _g(lam: Any, s: float, u: float, infusion: bool, period: float) -> Any:
    """g(λ): amount response of a unit bolus (e^{λs}) or unit-rate infusion (e^{λs} φ(λ, u)).

    ``period`` τ > 0: the same input repeated every τ forever before (a steady-state dose's past
    doses), g·1/(1 − e^{λτ}); ``u`` = inf: an infusion running since −∞ (a constant steady-state
    infusion), −1/λ.
    """
    if infusion and u == np.inf:
        return -1.0 / lam
    es = np.exp(lam * s)
    if infusion:
        z = lam * u
        es = es * u * _phi1(z, np.exp(z))
    if period > 0.0:
        es = es * _repeat(lam, period)
    return es


@_njit
def _repeat(lam: Any, period: float) -> Any:
    """Σ_{k≥0} e^{kλτ} = 1/(1 − e^{λτ}) = −1/expm1(λτ) (Re λ < 0; inf at λ = 0: no steady state)."""
    return 1.0 / (1.0 - np.exp(lam * period)) if lam.imag != 0.0 else -1.0 / math.expm1(lam.real * period)


@_njit
def _g_and_dg(lam: Any, s: float, u: float, infusion: bool, period: float) -> tuple[Any, Any]:
    """g(λ) and dg/dλ (amount·time per unit dose or rate); see :func:`_g`."""
    if infusion and u == np.inf:
        return -1.0 / lam, 1.0 / (lam * lam)
    es = np.exp(lam * s)
    if infusion:
        z = lam * u
        ez = np.exp(z)
        phi = u * _phi1(z, ez)
        g, dg = es * phi, es * (s * phi + u * u * _psi(z, ez))
    else:
        g, dg = es, s * es
    if period > 0.0:
        r = _repeat(lam, period)
        # dR/dλ = τ e^{λτ} R² = τ R (R − 1)
        return g * r, dg * r + g * period * r * (r - 1.0)
    return g, dg


# --------------------------------------------------------------------------------------
# Per-subject kernels
# --------------------------------------------------------------------------------------


@_njit
def _invert(A: np.ndarray, out: np.ndarray, work: np.ndarray) -> bool:
    """out = A⁻¹ by Gauss–Jordan with partial pivoting; False if A is singular.

    Hand-written (n <= ~12) so a singular V gives NaN, not a LinAlgError raised
    inside a sampler.
    """
    n = A.shape[0]
    work[:, :] = A
    out[:, :] = 0.0
    for i in range(n):
        out[i, i] = 1.0
    for col in range(n):
        piv, best = col, abs(work[col, col])
        for r in range(col + 1, n):
            if abs(work[r, col]) > best:
                piv, best = r, abs(work[r, col])
        if not best > 0.0:
            return False
        if piv != col:
            for c in range(n):
                work[col, c], work[piv, c] = work[piv, c], work[col, c]
                out[col, c], out[piv, c] = out[piv, c], out[col, c]
        inv = 1.0 / work[col, col]
        for c in range(n):
            work[col, c] *= inv
            out[col, c] *= inv
        for r in range(n):
            if r != col:
                factor = work[r, col]
                if factor != 0.0:
                    for c in range(n):
                        work[r, c] -= factor * work[col, c]
                        out[r, c] -= factor * out[col, c]
    return True


@_njit
def _norm1(A: np.ndarray) -> float:
    best = 0.0
    for c in range(A.shape[1]):
        total = 0.0
        for r in range(A.shape[0]):
            total += abs(A[r, c])
        best = max(best, total)
    return best


@_njit
def _eig2(K: np.ndarray, lam: np.ndarray, V: np.ndarray) -> bool:
    """Real eigenpairs of a 2×2 K in closed form; False if they are complex.

    LAPACK's call overhead (~1 µs) is most of the cost of a 2×2 model, and
    most PK models are 1–2 compartments. Eigenvalues of a triangular K (an
    absorption depot) are taken exactly from the diagonal; otherwise the
    discriminant ((a−d)/2)² + bc has no cancellation for compartment matrices
    (b, c >= 0). Each eigenvector is orthogonal to the larger row of K − λI.
    """
    a, b, c, d = K[0, 0], K[0, 1], K[1, 0], K[1, 1]
    if b == 0.0 or c == 0.0:
        l0, l1 = a, d
    else:
        half = 0.5 * (a - d)
        disc = half * half + b * c
        if disc < 0.0:
            return False
        m, r = 0.5 * (a + d), math.sqrt(disc)
        l0 = m - r if m <= 0.0 else m + r  # larger magnitude first: no cancellation
        l1 = (a * d - b * c) / l0 if l0 != 0.0 else m + r
    for j in range(2):
        lj = l0 if j == 0 else l1
        n1 = abs(a - lj) + abs(b)
        n2 = abs(c) + abs(d - lj)
        if n1 == 0.0 and n2 == 0.0:  # K = λI
            v0, v1 = (1.0, 0.0) if j == 0 else (0.0, 1.0)
        elif n1 >= n2:
            v0, v1 = b, lj - a
        else:
            v0, v1 = lj - d, c
        norm = math.hypot(v0, v1)
        lam[j] = lj
        V[0, j] = v0 / norm
        V[1, j] = v1 / norm
    return True


@_njit
def _decompose(K: np.ndarray, lam: np.ndarray, V: np.ndarray, W: np.ndarray, work: np.ndarray) -> bool:
    """Λ, V and W = V⁻¹ of one K into the given complex arrays; False when unusable."""
    n = K.shape[0]
    for r in range(n):
        for c in range(n):
            if not np.isfinite(K[r, c]):  # LAPACK would raise on inf/NaN
                return False
    if n == 1:
        lam[0] = K[0, 0]
        V[0, 0] = 1.0
    elif not (n == 2 and _eig2(K, lam, V)):
        w, v = np.linalg.eig(np.ascontiguousarray(K))  # real input: dgeev, complex output in conjugate pairs
        lam[:] = w
        V[:, :] = v
    if not _invert(V, W, work):
        return False
    cond = _norm1(V) * _norm1(W)
    return np.isfinite(cond) and cond <= MAX_COND


@_njit
def _is_real(lam: np.ndarray) -> bool:
    for value in lam:
        if value.imag != 0.0:
            return False
    return True


BAD, REAL, COMPLEX = 0, 1, 2  # subject status: unusable K, real or complex eigenvalues


@_njit
def _decompose_all(K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Λ (N, n), V, V⁻¹ (N, n, n) complex — NaN for unusable subjects — and each subject's status."""
    N, n = K.shape[0], K.shape[1]
    lam = np.empty((N, n), dtype=np.complex128)
    V = np.empty((N, n, n), dtype=np.complex128)
    W = np.empty((N, n, n), dtype=np.complex128)
    work = np.empty((n, n), dtype=np.complex128)
    status = np.empty(N, dtype=np.int64)
    for i in range(N):
        if _decompose(K[i], lam[i], V[i], W[i], work):
            status[i] = REAL if _is_real(lam[i]) else COMPLEX
        else:
            status[i] = BAD
            lam[i] = np.nan
            V[i] = np.nan
            W[i] = np.nan
    return lam, V, W, status


@_njit
def _status(lam: np.ndarray) -> np.ndarray:
    """Status of each subject from the forward pass's Λ (NaN marks an unusable one)."""
    status = np.empty(lam.shape[0], dtype=np.int64)
    for i in range(lam.shape[0]):
        if not np.isfinite(lam[i, 0].real):
            status[i] = BAD
        else:
            status[i] = REAL if _is_real(lam[i]) else COMPLEX
    return status


# The passes below loop over all subjects of one arithmetic (real, or complex)
# inside one call: a numba call costs ~8 ns per array argument (reference
# counting), which per subject was a third of the Theoph-sized gradient.


@numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True, inline="always")
def _modal_coordinates(V, W, C, F, zero, a, b):
    """a[o] = Vᵀc_o (output rows) and b[d] = V⁻¹f_d (dose vectors) of one subject, in place."""
    n = V.shape[0]
    for o in range(C.shape[0]):
        for j in range(n):
            acc = zero
            for r in range(n):
                acc += V[r, j] * C[o, r]
            a[o, j] = acc
    for d in range(F.shape[0]):
        for j in range(n):
            acc = zero
            for r in range(n):
                acc += W[j, r] * F[d, r]
            b[d, j] = acc


@_njit
def _forward_pass(lam, V, W, F, C, status, which, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period, y):
    """Add to y the modal sums of every subject whose status is ``which`` (real or complex arrays)."""
    N, n = lam.shape[0], lam.shape[1]
    D, O = F.shape[1], C.shape[1]
    a = np.empty((O, n), lam.dtype)  # Vᵀc per output
    b = np.empty((D, n), lam.dtype)  # V⁻¹f per dose
    zero = np.zeros(1, lam.dtype)[0]  # typed zero (lam[0, 0]·0 would be NaN if subject 0 is unusable)
    for i in range(N):
        if status[i] != which:
            continue
        _modal_coordinates(V[i], W[i], C[i], F[i], zero, a, b)
        for p in range(subject_start[i], subject_start[i + 1]):
            d, o, s, u, inf, tau = pair_dose[p], pair_out[p], pair_s[p], pair_u[p], pair_inf[p], pair_period[p]
            if s == 0.0 and not inf and tau == 0.0:
                # observed at the bolus time: g(K) = I, so exactly c·f — the modal sum would
                # leave ±1e-16·cond(V) where c·f = 0 (a pre-dose sample of an oral dose)
                direct = 0.0
                for r in range(n):
                    direct += C[i, o, r] * F[i, d, r]
                y[pair_obs[p]] += direct
                continue
            acc = zero
            for j in range(n):
                acc += a[o, j] * _g(lam[i, j], s, u, inf, tau) * b[d, j]
            y[pair_obs[p]] += acc.real


@_njit
def _backward_pass(
    lam, V, W, F, C, status, which, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period,
    ybar, Kbar, Fbar, Cbar,
):
    """K̄, F̄, C̄ of every subject whose status is ``which``: modal adjoints summed over its pairs, then one transform."""
    N, n = lam.shape[0], lam.shape[1]
    D, O = F.shape[1], C.shape[1]
    a, abar = np.empty((O, n), lam.dtype), np.empty((O, n), lam.dtype)
    b, bbar = np.empty((D, n), lam.dtype), np.empty((D, n), lam.dtype)
    X, T1 = np.empty((n, n), lam.dtype), np.empty((n, n), lam.dtype)
    g, dg = np.empty(n, lam.dtype), np.empty(n, lam.dtype)
    invd, dist = np.empty((n, n), lam.dtype), np.empty((n, n))
    zero = np.zeros(1, lam.dtype)[0]
    for i in range(N):
        if status[i] != which:
            continue
        _modal_coordinates(V[i], W[i], C[i], F[i], zero, a, b)
        abar[:, :] = zero
        bbar[:, :] = zero
        for j in range(n):
            for k in range(n):
                X[j, k] = zero
                dist[j, k] = abs(lam[i, j] - lam[i, k])
                invd[j, k] = 1.0 / (lam[i, j] - lam[i, k]) if dist[j, k] > 0.0 else zero
        for p in range(subject_start[i], subject_start[i + 1]):
            w = ybar[pair_obs[p]]
            if w == 0.0:
                continue
            d, o, s, u, inf, tau = pair_dose[p], pair_out[p], pair_s[p], pair_u[p], pair_inf[p], pair_period[p]
            span = s + u + tau
            for j in range(n):
                g[j], dg[j] = _g_and_dg(lam[i, j], s, u, inf, tau)
                abar[o, j] += w * g[j] * b[d, j]
                bbar[d, j] += w * g[j] * a[o, j]
            for j in range(n):
                aj = w * a[o, j]
                X[j, j] += aj * b[d, j] * dg[j]
                for k in range(j + 1, n):
                    if inf and u == np.inf:  # g = −1/λ: the divided difference is 1/(λ_j λ_k)
                        gamma = 1.0 / (lam[i, j] * lam[i, k])
                    elif dist[j, k] * span < NEAR_EQUAL:
                        # divided difference -> g' at the midpoint: second-order exact, no cancellation
                        gamma = _g_and_dg(0.5 * (lam[i, j] + lam[i, k]), s, u, inf, tau)[1]
                    else:
                        gamma = (g[j] - g[k]) * invd[j, k]
                    X[j, k] += aj * b[d, k] * gamma
                    X[k, j] += w * a[o, k] * b[d, j] * gamma
        for j in range(n):  # K̄ = Re(Wᵀ X Vᵀ)
            for q in range(n):
                acc = zero
                for k in range(n):
                    acc += X[j, k] * V[i, q, k]
                T1[j, q] = acc
        for p in range(n):
            for q in range(n):
                acc = zero
                for j in range(n):
                    acc += W[i, j, p] * T1[j, q]
                Kbar[i, p, q] = acc.real
        for o in range(O):  # C̄ = Re(V ā)
            for r in range(n):
                acc = zero
                for j in range(n):
                    acc += V[i, r, j] * abar[o, j]
                Cbar[i, o, r] = acc.real
        for d in range(D):  # F̄ = Re(Wᵀ b̄)
            for r in range(n):
                acc = zero
                for j in range(n):
                    acc += W[i, j, r] * bbar[d, j]
                Fbar[i, d, r] = acc.real


@_njit
def _modal_sums(lam, V, W, status, F, C, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period, obs_subject,
                y, lam_out, V_out, W_out):
    """y (M,) from a decomposition (real or complex arrays; NaN for unusable subjects), and Λ, V, V⁻¹
    copied to the outputs for the gradient. Real arrays never reach the complex pass."""
    y[:] = 0.0
    pairs = (subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period)
    if np.any(status == REAL):
        lr, Vr, Wr = np.ascontiguousarray(lam.real), np.ascontiguousarray(V.real), np.ascontiguousarray(W.real)
        _forward_pass(lr, Vr, Wr, F, C, status, REAL, *pairs, y)
    if np.any(status == COMPLEX):
        _forward_pass(lam, V, W, F, C, status, COMPLEX, *pairs, y)
    for m in range(y.shape[0]):
        if status[obs_subject[m]] == BAD:
            y[m] = np.nan
    lam_out[:] = lam
    V_out[:] = V
    W_out[:] = W


@_njit
def _backward_core(F, C, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period, ybar, lam, V, W, Kbar, Fbar, Cbar):
    """K̄ (N, n, n), F̄ (N, D, n), C̄ (N, O, n) given ȳ (M,) into the given arrays; NaN for unusable subjects.

    Λ, V, V⁻¹ are complex (general kernels) or real (1–2 compartments); real ones are all REAL or BAD."""
    Kbar[:] = 0.0
    Fbar[:] = 0.0
    Cbar[:] = 0.0
    status = _status(lam)
    pairs = (subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period)
    if np.any(status == REAL):
        lr, Vr, Wr = np.ascontiguousarray(lam.real), np.ascontiguousarray(V.real), np.ascontiguousarray(W.real)
        _backward_pass(lr, Vr, Wr, F, C, status, REAL, *pairs, ybar, Kbar, Fbar, Cbar)
    if np.any(status == COMPLEX):
        _backward_pass(lam, V, W, F, C, status, COMPLEX, *pairs, ybar, Kbar, Fbar, Cbar)
    _nan_bad(status, Kbar, Fbar, Cbar)


@_njit
def _nan_bad(status, Kbar, Fbar, Cbar):
    for i in range(status.shape[0]):
        if status[i] == BAD:
            Kbar[i] = np.nan
            Fbar[i] = np.nan
            Cbar[i] = np.nan


@_njit
def _decompose_small(K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Λ (N, n), V, V⁻¹ (N, n, n) in real arithmetic for n <= 2, and each subject's status.

    A 1×1 K is its own eigenvalue; a 2×2 compartment matrix (off-diagonal
    rates >= 0) always has real eigenvalues, taken in closed form. A subject
    whose K is not finite, complex or too ill-conditioned is BAD (NaN).
    """
    N, n = K.shape[0], K.shape[1]
    lam = np.empty((N, n))
    V = np.empty((N, n, n))
    W = np.empty((N, n, n))
    work = np.empty((n, n))
    status = np.empty(N, dtype=np.int64)
    for i in range(N):
        ok = True
        for r in range(n):
            for c in range(n):
                ok = ok and np.isfinite(K[i, r, c])
        if ok:
            if n == 1:
                lam[i, 0] = K[i, 0, 0]
                V[i, 0, 0] = 1.0
            else:
                ok = _eig2(K[i], lam[i], V[i])
        if ok:
            ok = _invert(V[i], W[i], work)
        if ok:
            cond = _norm1(V[i]) * _norm1(W[i])
            ok = np.isfinite(cond) and cond <= MAX_COND
        status[i] = REAL if ok else BAD
        if not ok:
            lam[i] = np.nan
            V[i] = np.nan
            W[i] = np.nan
    return lam, V, W, status


# --------------------------------------------------------------------------------------
# Native entry points
# --------------------------------------------------------------------------------------
# The kernels run as native entry points (:mod:`itpk.native`): compiled once per machine,
# not re-optimised by LLVM inside every model's graph (measured on Theoph: ~3.5 s of each
# fit's compilation; on it_antibody, more). Block layout (int64): sizes N, n, D, O, M, P;
# the addresses of K, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out,
# pair_inf, pair_s, pair_u, pair_period; the kernel's own arrays; last, a flag the kernel sets to 1 when
# it finished (an exception inside a C entry point cannot propagate: the caller sees the
# flag still 0 and returns NaN, which a sampler rejects).
_SIZES, _DESIGN = 6, 12
_F64, _I64, _C128, _BOOL = (as_pointer(t) for t in (numba.types.float64, numba.types.int64, numba.types.complex128,
                                                    numba.types.boolean))


@_njit
def _unpack(a):
    """Sizes and the input arrays of a block (see above)."""
    N, n, D, O, M, P = a[0], a[1], a[2], a[3], a[4], a[5]
    K = numba.carray(_F64(a[6]), (N, n, n))
    F = numba.carray(_F64(a[7]), (N, D, n))
    C = numba.carray(_F64(a[8]), (N, O, n))
    obs_subject = numba.carray(_I64(a[9]), (M,))
    subject_start = numba.carray(_I64(a[10]), (N + 1,))
    pair_obs = numba.carray(_I64(a[11]), (P,))
    pair_dose = numba.carray(_I64(a[12]), (P,))
    pair_out = numba.carray(_I64(a[13]), (P,))
    pair_inf = numba.carray(_BOOL(a[14]), (P,))
    pair_s = numba.carray(_F64(a[15]), (P,))
    pair_u = numba.carray(_F64(a[16]), (P,))
    pair_period = numba.carray(_F64(a[17]), (P,))
    return K, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period


@_njit
def _pack(K, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period, extra):
    """The int64 block of C-contiguous arrays, ``extra`` addresses and the completion flag (0)."""
    a = np.empty(_SIZES + _DESIGN + extra.shape[0] + 1, dtype=np.int64)
    a[0], a[1], a[2], a[3] = K.shape[0], K.shape[1], F.shape[1], C.shape[1]
    a[4], a[5] = obs_subject.shape[0], pair_obs.shape[0]
    arrays = (K.ctypes.data, F.ctypes.data, C.ctypes.data, obs_subject.ctypes.data, subject_start.ctypes.data,
              pair_obs.ctypes.data, pair_dose.ctypes.data, pair_out.ctypes.data, pair_inf.ctypes.data,
              pair_s.ctypes.data, pair_u.ctypes.data, pair_period.ctypes.data)
    for k in range(_DESIGN):
        a[_SIZES + k] = arrays[k]
    for k in range(extra.shape[0]):
        a[_SIZES + _DESIGN + k] = extra[k]
    a[-1] = 0
    return a


_FWD_SLOTS, _BWD_SLOTS = _SIZES + _DESIGN + 4 + 1, _SIZES + _DESIGN + 7 + 1


@_njit
def _modal_real(a, first):
    """Λ (N, n), V, V⁻¹ (N, n, n) float64 at block slots first..first+2."""
    N, n = a[0], a[1]
    return (numba.carray(_F64(a[first]), (N, n)), numba.carray(_F64(a[first + 1]), (N, n, n)),
            numba.carray(_F64(a[first + 2]), (N, n, n)))


@_njit
def _modal_complex(a, first):
    """Λ (N, n), V, V⁻¹ (N, n, n) complex128 at block slots first..first+2."""
    N, n = a[0], a[1]
    return (numba.carray(_C128(a[first]), (N, n)), numba.carray(_C128(a[first + 1]), (N, n, n)),
            numba.carray(_C128(a[first + 2]), (N, n, n)))


@_njit
def _gradients(a, first):
    """K̄ (N, n, n), F̄ (N, D, n), C̄ (N, O, n) at block slots first..first+2."""
    N, n, D, O = a[0], a[1], a[2], a[3]
    return (numba.carray(_F64(a[first]), (N, n, n)), numba.carray(_F64(a[first + 1]), (N, D, n)),
            numba.carray(_F64(a[first + 2]), (N, O, n)))


def _forward_native(block):
    a = numba.carray(_I64(block), (_FWD_SLOTS,))
    u = _unpack(a)  # K, F, C, obs_subject, then the pair arrays
    _modal_sums(*_decompose_all(u[0]), u[1], u[2], *u[4:], u[3], numba.carray(_F64(a[18]), (a[4],)), *_modal_complex(a, 19))
    a[-1] = 1


def _forward_small_native(block):
    a = numba.carray(_I64(block), (_FWD_SLOTS,))
    u = _unpack(a)
    _modal_sums(*_decompose_small(u[0]), u[1], u[2], *u[4:], u[3], numba.carray(_F64(a[18]), (a[4],)), *_modal_real(a, 19))
    a[-1] = 1


def _backward_native(block):
    a = numba.carray(_I64(block), (_BWD_SLOTS,))
    u = _unpack(a)
    _backward_core(u[1], u[2], *u[4:], numba.carray(_F64(a[18]), (a[4],)), *_modal_complex(a, 19), *_gradients(a, 22))
    a[-1] = 1


def _backward_small_native(block):
    a = numba.carray(_I64(block), (_BWD_SLOTS,))
    u = _unpack(a)
    _backward_core(u[1], u[2], *u[4:], numba.carray(_F64(a[18]), (a[4],)), *_modal_real(a, 19), *_gradients(a, 22))
    a[-1] = 1


_NATIVE = {
    name: NativeKernel(kernel, f"itpk_linop_{name}_{_CACHE_VERSION:x}")
    for name, kernel in (("forward", _forward_native), ("forward_small", _forward_small_native),
                         ("backward", _backward_native), ("backward_small", _backward_small_native))
}
_call_forward, _call_forward_small = _NATIVE["forward"].call, _NATIVE["forward_small"].call
_call_backward, _call_backward_small = _NATIVE["backward"].call, _NATIVE["backward_small"].call


# --------------------------------------------------------------------------------------
# What the Ops run (perform and the numba backend): check, allocate, call the entry point
# --------------------------------------------------------------------------------------


@_njit
def _check_shapes(N, n, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out) -> None:
    """Raise on arrays that do not fit the design: the kernels run without bounds checks."""
    if F.shape[0] != N or C.shape[0] != N or F.shape[2] != n or C.shape[2] != n:
        raise ValueError("linear_predict: K (N, n, n), F (N, D, n) and C (N, O, n) disagree on N or n")
    if subject_start.shape[0] != N + 1:
        raise ValueError("linear_predict: K has a different number of subjects than the design")
    for p in range(pair_obs.shape[0]):
        if pair_dose[p] >= F.shape[1] or pair_out[p] >= C.shape[1] or pair_obs[p] >= obs_subject.shape[0]:
            raise ValueError("linear_predict: F has fewer doses or C fewer outputs than the design uses")


@_njit
def _flagged(block, outputs):
    """NaN in every output when the entry point did not finish (its flag, the block's last slot, is 0)."""
    if block[-1] != 1:
        for out in outputs:  # same-typed arrays (a UniTuple)
            out[:] = np.nan


@_njit
def _forward(K, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period):
    """y (M,), and Λ, V, V⁻¹ (complex; NaN for unusable subjects) for the gradient."""
    if K.shape[2] != K.shape[1]:
        raise ValueError("linear_predict: K must be (N, n, n)")
    N, n = K.shape[0], K.shape[1]
    _check_shapes(N, n, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out)
    c = np.ascontiguousarray
    K, F, C, obs_subject, subject_start = c(K), c(F), c(C), c(obs_subject), c(subject_start)
    pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period = (
        c(pair_obs), c(pair_dose), c(pair_out), c(pair_inf), c(pair_s), c(pair_u), c(pair_period))
    y = np.empty(obs_subject.shape[0])
    lam = np.empty((N, n), dtype=np.complex128)
    V, W = np.empty((N, n, n), dtype=np.complex128), np.empty((N, n, n), dtype=np.complex128)
    extra = np.array([y.ctypes.data, lam.ctypes.data, V.ctypes.data, W.ctypes.data], dtype=np.int64)
    block = _pack(K, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period, extra)
    _call_forward(block.ctypes.data)
    keep_alive((K, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period))
    _flagged(block, (y,))
    return y, lam, V, W


@_njit
def _backward(ybar, F, C, lam, V, W, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period):
    """K̄ (N, n, n), F̄ (N, D, n), C̄ (N, O, n) given ȳ (M,); NaN for unusable subjects."""
    N, n = lam.shape[0], lam.shape[1]
    _check_shapes(N, n, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out)
    if ybar.shape[0] != obs_subject.shape[0]:
        raise ValueError("linear_predict: the output gradient does not have one value per observation")
    c = np.ascontiguousarray
    ybar, F, C, lam, V, W = c(ybar), c(F), c(C), c(lam), c(V), c(W)
    obs_subject, subject_start = c(obs_subject), c(subject_start)
    pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period = (
        c(pair_obs), c(pair_dose), c(pair_out), c(pair_inf), c(pair_s), c(pair_u), c(pair_period))
    Kbar, Fbar, Cbar = np.empty((N, n, n)), np.empty(F.shape), np.empty(C.shape)
    extra = np.array([ybar.ctypes.data, lam.ctypes.data, V.ctypes.data, W.ctypes.data,
                      Kbar.ctypes.data, Fbar.ctypes.data, Cbar.ctypes.data], dtype=np.int64)
    # Kbar stands in for K in the block (same shape; the backward kernels do not read K)
    block = _pack(Kbar, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period, extra)
    _call_backward(block.ctypes.data)
    keep_alive((ybar, F, C, lam, V, W, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period))
    _flagged(block, (Kbar, Fbar, Cbar))
    return Kbar, Fbar, Cbar


@_njit
def _forward_small(K, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period):
    """:func:`_forward` for 1–2 compartments in real arithmetic only: Λ, V, V⁻¹ are real.

    Same modal sums; no complex specialisation and no LAPACK in its entry point
    (which compiles in seconds where the general one takes tens), a third less
    time per gradient, and no shape checks at run time: they are made once when
    the node is made (:func:`_check_small_node`, static shapes; the design arrays
    are C-contiguous constants).
    """
    N, n = K.shape[0], K.shape[1]
    c = np.ascontiguousarray
    K, F, C = c(K), c(F), c(C)
    y = np.empty(obs_subject.shape[0])
    lam, V, W = np.empty((N, n)), np.empty((N, n, n)), np.empty((N, n, n))
    extra = np.array([y.ctypes.data, lam.ctypes.data, V.ctypes.data, W.ctypes.data], dtype=np.int64)
    block = _pack(K, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period, extra)
    _call_forward_small(block.ctypes.data)
    keep_alive((K, F, C))
    _flagged(block, (y,))
    return y, lam, V, W


@_njit
def _backward_small(ybar, F, C, lam, V, W, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period):
    """:func:`_backward` for the real Λ, V, V⁻¹ of :func:`_forward_small`."""
    N, n = lam.shape[0], lam.shape[1]
    c = np.ascontiguousarray
    ybar, F, C, lam, V, W = c(ybar), c(F), c(C), c(lam), c(V), c(W)
    Kbar, Fbar, Cbar = np.empty((N, n, n)), np.empty(F.shape), np.empty(C.shape)
    extra = np.array([ybar.ctypes.data, lam.ctypes.data, V.ctypes.data, W.ctypes.data,
                      Kbar.ctypes.data, Fbar.ctypes.data, Cbar.ctypes.data], dtype=np.int64)
    block = _pack(Kbar, F, C, obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period, extra)
    _call_backward_small(block.ctypes.data)
    keep_alive((ybar, F, C, lam, V, W))
    _flagged(block, (Kbar, Fbar, Cbar))
    return Kbar, Fbar, Cbar


def _check_small_node(K: Any, F: Any, C: Any, design: list[Any]) -> None:
    """The checks :func:`_forward` makes at run time, made once on static shapes and constant design arrays."""
    shapes = [x.type.shape for x in (K, F, C)]
    if any(d is None for shape in shapes for d in shape):
        raise FitError(f"linear_predict: the small-system kernels need static shapes, found K, F, C {shapes}")
    (N, n, n2), (NF, D, nF), (NC, O, nC) = shapes
    if n > 2 or n2 != n or nF != n or nC != n or NF != N or NC != N:
        raise FitError(f"linear_predict: K {shapes[0]}, F {shapes[1]} and C {shapes[2]} disagree (small kernels: n <= 2)")
    if not all(isinstance(x, Constant) for x in design):
        raise FitError("linear_predict: the design arrays must be constants")
    obs_subject, subject_start, pair_obs, pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period = (x.data for x in design)
    P = pair_obs.shape[0]
    problems = []
    if subject_start.shape != (N + 1,) or (N and subject_start[-1] != P):
        problems.append("subject_start does not delimit the pairs of N subjects")
    if any(a.shape != (P,) for a in (pair_dose, pair_out, pair_inf, pair_s, pair_u, pair_period)):
        problems.append("pair arrays differ in length")
    if P and (pair_dose.max() >= D or pair_out.max() >= O or pair_obs.max() >= obs_subject.shape[0]):
        problems.append("F has fewer doses or C fewer outputs than the design uses")
    if obs_subject.size and obs_subject.max() >= N:
        problems.append("observations of more subjects than K has")
    for x, dtype in zip(design, (np.int64,) * 5 + (np.bool_, np.float64, np.float64, np.float64), strict=True):
        if x.data.dtype != dtype or not x.data.flags.c_contiguous:
            problems.append(f"a design array is {x.data.dtype} (needs C-contiguous {np.dtype(dtype)})")
    if problems:
        raise FitError("linear_predict: " + "; ".join(problems))


def _register_native(small: bool) -> None:
    """Publish the entry points the Ops call (once per process) before anything calls them."""
    for direction in ("forward", "backward"):
        _NATIVE[direction + ("_small" if small else "")].register()


# --------------------------------------------------------------------------------------
# pytensor Ops
# --------------------------------------------------------------------------------------

_PAIR_KEYS = ("subject_start", "obs", "dose", "output", "infusion", "s", "u", "period")


class LinearPredict(Op):
    """y (M,) from K (N, n, n), F (N, D, n), C (N, O, n) and the design's constant arrays.

    Outputs ``(y, Λ, V, V⁻¹)``; only y is differentiable, the others let the
    gradient reuse the eigendecomposition. Use :func:`linear_predict`.

    Parameters
    ----------
    small
        True for 1–2 compartments: real-arithmetic kernels (Λ, V, V⁻¹ float64),
        which compile in a fraction of the time of the general ones.
    """

    __props__ = ("small",)

    def __init__(self, small: bool = False) -> None:
        self.small = bool(small)
        super().__init__()

    def make_node(self, K: Any, F: Any, C: Any, *design: Any) -> Apply:
        K, F, C = (pt.as_tensor_variable(x).astype("float64") for x in (K, F, C))
        design_vars = [pt.as_tensor_variable(x) for x in design]
        N, n = K.type.shape[0], K.type.shape[1]
        if self.small:
            _check_small_node(K, F, C, design_vars)
        M = design_vars[0].type.shape[0]
        modal = "float64" if self.small else "complex128"
        outputs = [
            pt.tensor(dtype="float64", shape=(M,)),
            pt.tensor(dtype=modal, shape=(N, n)),
            pt.tensor(dtype=modal, shape=(N, n, n)),
            pt.tensor(dtype=modal, shape=(N, n, n)),
        ]
        return Apply(self, [K, F, C, *design_vars], outputs)

    def perform(self, node: Apply, inputs: list[np.ndarray], output_storage: list[list[Any]]) -> None:
        _register_native(self.small)
        kernel = _forward_small if self.small else _forward
        for storage, value in zip(output_storage, kernel(*inputs), strict=True):
            storage[0] = value

    def infer_shape(self, node: Apply, shapes: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        N, n, _ = shapes[0]
        return [(shapes[3][0],), (N, n), (N, n, n), (N, n, n)]

    def connection_pattern(self, node: Apply) -> list[list[bool]]:
        # y depends on K, F, C; Λ, V, V⁻¹ on K only; nothing on the design
        return [[True] * 4, [True, False, False, False], [True, False, False, False]] + [[False] * 4] * (len(node.inputs) - 3)

    def pullback(self, inputs: list[Any], outputs: list[Any], output_grads: list[Any]) -> list[Any]:
        # pytensor >= 3.3 name of L_op: the vector–Jacobian product
        K, F, C, *design = inputs
        ybar = output_grads[0]
        if any(not isinstance(gr.type, DisconnectedType) for gr in output_grads[1:]):
            raise NotImplementedError("LinearPredict: gradients through Λ, V, V⁻¹ are not implemented; use y only")
        if isinstance(ybar.type, DisconnectedType):
            return [pt.zeros_like(K), pt.zeros_like(F), pt.zeros_like(C)] + [disconnected_type() for _ in design]
        Kbar, Fbar, Cbar = LinearPredictGrad(self.small)(ybar, F, C, *outputs[1:], *design)
        return [Kbar, Fbar, Cbar] + [disconnected_type() for _ in design]


class LinearPredictGrad(Op):
    """K̄, F̄, C̄ of :class:`LinearPredict` given ȳ, F, C, (Λ, V, V⁻¹) and the design arrays."""

    __props__ = ("small",)

    def __init__(self, small: bool = False) -> None:
        self.small = bool(small)
        super().__init__()

    def make_node(self, ybar: Any, F: Any, C: Any, lam: Any, V: Any, W: Any, *design: Any) -> Apply:
        inputs = [pt.as_tensor_variable(x) for x in (ybar, F, C, lam, V, W, *design)]
        F, C, V = inputs[1], inputs[2], inputs[4]
        outputs = [
            pt.tensor(dtype="float64", shape=V.type.shape),
            pt.tensor(dtype="float64", shape=F.type.shape),
            pt.tensor(dtype="float64", shape=C.type.shape),
        ]
        return Apply(self, inputs, outputs)

    def perform(self, node: Apply, inputs: list[np.ndarray], output_storage: list[list[Any]]) -> None:
        _register_native(self.small)
        kernel = _backward_small if self.small else _backward
        for storage, value in zip(output_storage, kernel(*inputs), strict=True):
            storage[0] = value

    def infer_shape(self, node: Apply, shapes: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [shapes[4], shapes[1], shapes[2]]

    def pullback(self, inputs: list[Any], outputs: list[Any], output_grads: list[Any]) -> list[Any]:
        from pytensor.gradient import grad_not_implemented

        return [grad_not_implemented(self, i, x, "second derivatives of linear_predict") for i, x in enumerate(inputs)]


@register_funcify_default_op_cache_key(LinearPredict)
def _numba_linear_predict(op: LinearPredict, node: Apply | None = None, **kwargs: Any) -> tuple[Any, int]:
    # The kernel already has the node's input order; pytensor inlines it into the graph's function.
    _register_native(op.small)
    return (_forward_small, _CACHE_VERSION + 1) if op.small else (_forward, _CACHE_VERSION)


@register_funcify_default_op_cache_key(LinearPredictGrad)
def _numba_linear_predict_grad(op: LinearPredictGrad, node: Apply | None = None, **kwargs: Any) -> tuple[Any, int]:
    _register_native(op.small)
    return (_backward_small, _CACHE_VERSION + 3) if op.small else (_backward, _CACHE_VERSION + 2)


def linear_predict(K: Any, F: Any, C: Any, design: Design, method: str = "auto") -> pt.TensorVariable:
    """Exact predictions y_m = C[i, o]·x_i(t_m) of linear compartment models.

    Parameters
    ----------
    K
        Compartment matrices (N, n, n), 1/time: dx/dt = K x + input.
    F
        Input vector per dose (N, D, n): for a bolus the amount in each
        compartment (amount × route fractions), for an infusion the rate
        (amount/time) into each compartment; zero for padding.
    C
        Output rows (N, O, n): output o = C[i, o]·x (e.g. 1/V for a concentration).
    design
        Dose and observation times (constant).
    method
        ``"auto"``: the elementwise closed forms of :mod:`itpk.closedform` when they cover the
        model and doses (1–2 compartments known statically, no 2-compartment infusion), else
        the eigen Op; ``"eigen"``: always the Op; ``"closed"``: the closed forms or an error.

    Returns
    -------
    TensorVariable (M,)
        Output o at each observation, in the unit of C·amount. NaN for a
        subject whose K is not finite or not diagonalisable (cond₁(V) > 1e12).

    Examples
    --------
    >>> import numpy as np
    >>> k, ka = 0.1, 1.0
    >>> design = Design(np.zeros((1, 1)), np.zeros((1, 1)), np.ones((1, 1), bool),
    ...                 np.zeros(1, np.int64), np.array([2.0]), np.zeros(1, np.int64), np.array([-np.inf]))
    >>> y = linear_predict([[[-ka, 0.0], [ka, -k]]], [[[100.0, 0.0]]], [[[0.0, 1.0 / 50]]], design)
    >>> exact = 100 / 50 * ka / (ka - k) * (np.exp(-k * 2) - np.exp(-ka * 2))
    >>> bool(np.isclose(y.eval(mode="FAST_COMPILE")[0], exact, rtol=1e-12))
    True
    """
    K, F, C = (pt.as_tensor_variable(x).astype("float64") for x in (K, F, C))
    for name, x in (("K", K), ("F", F), ("C", C)):
        if x.type.ndim != 3:
            raise FitError(f"linear_predict: {name} must be 3-D, found {x.type.ndim}-D")
    N, D, M = design.n_subjects, design.n_doses, design.n_obs
    expected = {"K": (K, (N, None, None)), "F": (F, (N, D, None)), "C": (C, (N, None, None))}
    for name, (x, shape) in expected.items():
        for have, want in zip(x.type.shape, shape, strict=True):
            if have is not None and want is not None and have != want:
                raise FitError(f"linear_predict: {name} has static shape {x.type.shape}, the design needs {shape}")
    O = C.type.shape[1]
    if O is not None and M and design.obs_output.max() >= O:
        raise FitError(f"linear_predict: obs_output goes up to {design.obs_output.max()} but C has {O} output rows")
    pairs = design.pairs
    constants = [pt.constant(design.obs_subject)] + [pt.constant(pairs[key]) for key in _PAIR_KEYS]
    static = all(d is not None for x in (K, F, C) for d in x.type.shape)
    if method not in ("auto", "eigen", "closed"):
        raise FitError(f"linear_predict: method must be auto, eigen or closed, found {method!r}")
    if method != "eigen" and static and closedform.supports(K.type.shape[1], design):
        return closedform.closed_form_predict(K, F, C, design)
    if method == "closed":
        raise FitError(f"linear_predict: no closed form for K of static shape {K.type.shape} with these doses")
    return LinearPredict(small=static and K.type.shape[1] <= 2)(K, F, C, *constants)[0]
