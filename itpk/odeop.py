"""Predictions of nonlinear (ODE) compartment models as a pytensor Op, with gradients.

For subject i the amounts x (n,) follow

    dx/dt = f(x, p_i) + u(t),   f_k = Σ_flows ± rate(p)·x_source + odes_k(x, p),

from x(t₀) = x0_i, where u is the sum of the running infusion rates F[i, d]
(amount/time per compartment) and a bolus adds F[i, d] (amount) to x at its
time. Observation m of subject i is output o: y_m = g_o(x(t_m), p_i).

``p_i`` (P,) holds, in this order (:attr:`OdeSystem.input_names`), the
model's parameters, covariates and derived quantities. Derived quantities are
computed *outside* the Op (in pytensor, where their own gradients come for
free) and enter as plain inputs, as do the initial amounts x0.

The solver is an adaptive explicit Dormand–Prince 5(4) (FSAL, PI-free
standard controller), restarted at every dose, infusion switch, reset and
observation so a discontinuity never sits inside a step and no dense output
is needed. Forward sensitivities S = ∂x/∂θ for θ = (p, x0, F) are integrated
with the states (dS/dt = ∂f/∂x·S + ∂f/∂θ, bolus: S[:, F[d]] += I, reset:
S = [0, I, 0]); the Op returns the Jacobian J = ∂y/∂θ (M, P + n + D·n) next
to y, and the gradient is the contraction ȳᵀJ summed per subject. f, g and
their Jacobians are programs of :mod:`itpk.exprvm` (no code generation from
model text), passed to one numba kernel as constant inputs.

Limits (see the report in the module's tests): explicit method — a stiff
system costs steps in proportion to its fastest rate × horizon (the virus
model's blood clearance, 5/h up to 55/h with antibodies, dominates its step
count); no steady-state doses; error control on the states only by default
(``sens_error=True`` adds the sensitivities); subjects are solved one after
the other (no threads).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType, disconnected_type
from pytensor.graph.basic import Apply, Constant
from pytensor.graph.op import Op
from pytensor.link.numba.dispatch.basic import register_funcify_default_op_cache_key

from itpk import exprvm
from itpk.errors import FitError
from itpk.linop import Design
from itpk.spec import ELIMINATION, ModelSpec

__all__ = ["EventTable", "OdePredict", "OdeSystem", "initial_amounts", "ode_predict"]

_CACHE_VERSION = int(
    hashlib.sha256(Path(__file__).read_bytes() + Path(exprvm.__file__).read_bytes()).hexdigest()[:12], 16
)
_njit = numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True)
# Inner kernels are inlined into their callers: a numba call with ~15 array arguments pays
# an atomic reference-count increment and decrement per array (~150 ns), as much as the
# right-hand side itself costs for a small model.
_njit_inline = numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True, inline="always")

# Expression groups of an OdeSystem program, in this order (rows/cols in OdeSystem.rc):
F_RHS, JX, JP, G_OUT, GX, GP = range(6)
# Event kinds, in the order they are applied at one time: a reset first (a dose at the
# reset time counts), infusions off before on, observations last (value just after doses).
RESET, INF_OFF, BOLUS, INF_ON, OBS = range(5)

# Dormand–Prince 5(4) tableau (Hairer, Nørsett & Wanner, Solving ODEs I, Table 5.2).
_A = np.zeros((7, 6))
_A[1, :1] = [1 / 5]
_A[2, :2] = [3 / 40, 9 / 40]
_A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
_A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
_A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
_A[6, :6] = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]  # = b (FSAL)
_E = np.array([71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])  # b − b̂

DEFAULT_RTOL = 1e-8
DEFAULT_ATOL = 1e-10  # amount units; small against any amount that matters, so rtol governs
DEFAULT_MAX_STEPS = 200_000  # accepted + rejected steps per subject; beyond: NaN for that subject


# --------------------------------------------------------------------------------------
# The system: programs of f, ∂f/∂x, ∂f/∂p, g, ∂g/∂x, ∂g/∂p
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class OdeSystem:
    """A model's right-hand side, outputs and their Jacobians as one :class:`~itpk.exprvm.Program`.

    Slots: ``0..n-1`` the amounts (``state_names`` order), ``n..n+P-1`` the
    inputs p (``input_names``: parameters, covariates, derived quantities,
    each in model-file order).

    Attributes
    ----------
    program : exprvm.Program
        Expressions grouped F_RHS (n), JX, JP, G_OUT (O), GX, GP; only the
        structurally non-zero Jacobian entries are kept.
    groups : ndarray (7,) int64
        Group k is expressions ``groups[k]:groups[k+1]``.
    rc : ndarray (E, 2) int64
        (row, column) of each expression: (state or output, 0) for F_RHS/G_OUT,
        (row, state) for JX/GX, (row, input index 0..P−1) for JP/GP.
    """

    state_names: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    program: exprvm.Program
    groups: np.ndarray
    rc: np.ndarray

    @property
    def n_states(self) -> int:
        return len(self.state_names)

    @property
    def n_inputs(self) -> int:
        return len(self.input_names)

    @classmethod
    def from_spec(cls, spec: ModelSpec, outputs: Sequence[str] | None = None) -> OdeSystem:
        """Compile a model's flows, ``[odes]`` and outputs (all, or ``outputs`` in that order)."""
        states = spec.state_names
        inputs = (*spec.parameters, *spec.covariates, *spec.derived)
        names = tuple(outputs) if outputs is not None else tuple(spec.outputs)
        unknown = [o for o in names if o not in spec.outputs]
        if unknown:
            raise FitError(f"model {spec.name!r} has no output(s) {unknown}; outputs: {', '.join(spec.outputs)}")
        n = len(states)
        slots = {**{s: k for k, s in enumerate(states)}, **{name: n + k for k, name in enumerate(inputs)}}
        rhs: list[exprvm.Node] = [exprvm.ZERO] * n
        for flow in spec.flows:  # first-order: rate(p)·x_source out of the source, into the target
            src = spec.index(flow.source)
            term = exprvm.mul(exprvm.lower(flow.rate, slots), ("v", src))
            rhs[src] = exprvm.sub(rhs[src], term)
            if flow.target != ELIMINATION:
                dst = spec.index(flow.target)
                rhs[dst] = exprvm.add(rhs[dst], term)
        for name, expr in spec.odes.items():
            k = spec.index(name)
            rhs[k] = exprvm.add(rhs[k], exprvm.lower(expr, slots))
        outs = [exprvm.lower(spec.outputs[o].expr, slots) for o in names]
        return cls._build(states, inputs, names, rhs, outs)

    @classmethod
    def _build(cls, states: tuple[str, ...], inputs: tuple[str, ...], outputs: tuple[str, ...],
               rhs: list[exprvm.Node], outs: list[exprvm.Node]) -> OdeSystem:
        n = len(states)
        groups: list[list[tuple[exprvm.Node, int, int]]] = [[] for _ in range(6)]
        for which, exprs, (gx, gp) in ((F_RHS, rhs, (JX, JP)), (G_OUT, outs, (GX, GP))):
            for row, tree in enumerate(exprs):
                groups[which].append((tree, row, 0))
                for slot in sorted(exprvm.slots_of(tree)):
                    d = exprvm.derivative(tree, slot)
                    if d == exprvm.ZERO:
                        continue
                    if slot < n:
                        groups[gx].append((d, row, slot))
                    else:
                        groups[gp].append((d, row, slot - n))
        flat = [item for group in groups for item in group]
        bounds = np.cumsum([0] + [len(g) for g in groups]).astype(np.int64)
        program = exprvm.compile_trees([tree for tree, _, _ in flat])
        rc = np.array([(r, c) for _, r, c in flat], dtype=np.int64).reshape(-1, 2)
        return cls(states, inputs, outputs, program, bounds, rc)

    def stack_inputs(self, env: Mapping[str, Any], n_subjects: int) -> Any:
        """p (N, P) as a pytensor tensor from values by name (scalars or (N,) tensors)."""
        ones = pt.ones(n_subjects)
        return pt.stack([pt.as_tensor_variable(env[name]) * ones for name in self.input_names], axis=-1)


def initial_amounts(spec: ModelSpec, env: Mapping[str, Any], n_subjects: int,
                    backend: Mapping[str, Callable[..., Any]]) -> Any:
    """x0 (N, n) from the compartments' ``initial`` expressions (0 when absent), pytensor."""
    ones = pt.ones(n_subjects)
    cols = [c.initial.evaluate(env, backend) * ones if c.initial is not None else 0.0 * ones for c in spec.compartments]
    return pt.stack(cols, axis=-1)


# --------------------------------------------------------------------------------------
# Events: the design as one sorted timeline per subject
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EventTable:
    """Each subject's doses, infusion ends, resets and observations, sorted by (time, kind).

    Resets are the distinct finite ``obs_after`` of a subject's observations
    (the only resets that change a prediction). Arrays: ``start`` (N+1,)
    delimits subjects; ``time`` (E,) float64; ``kind`` (E,) int64 (RESET,
    INF_OFF, BOLUS, INF_ON, OBS); ``index`` (E,) int64: dose column or
    observation row.
    """

    start: np.ndarray
    time: np.ndarray
    kind: np.ndarray
    index: np.ndarray

    @classmethod
    def from_design(cls, design: Design) -> EventTable:
        rows: list[tuple[int, float, int, int]] = []
        for i in range(design.n_subjects):
            for d in np.flatnonzero(design.dose_valid[i]):
                t, dur = float(design.dose_time[i, d]), float(design.dose_duration[i, d])
                if dur == 0.0:
                    rows.append((i, t, BOLUS, int(d)))
                else:
                    rows.append((i, t, INF_ON, int(d)))
                    if np.isfinite(t + dur):  # an endless infusion never switches off
                        rows.append((i, t + dur, INF_OFF, int(d)))
        for m in range(design.n_obs):
            i = int(design.obs_subject[m])
            rows.append((i, float(design.obs_time[m]), OBS, m))
        for i in range(design.n_subjects):
            after = design.obs_after[design.obs_subject == i]
            for r in np.unique(after[np.isfinite(after)]):
                rows.append((i, float(r), RESET, -1))
        rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
        subject = np.array([r[0] for r in rows], dtype=np.int64)
        return cls(
            start=np.searchsorted(subject, np.arange(design.n_subjects + 1), side="left").astype(np.int64),
            time=np.array([r[1] for r in rows], dtype=np.float64),
            kind=np.array([r[2] for r in rows], dtype=np.int64),
            index=np.array([r[3] for r in rows], dtype=np.int64),
        )


# --------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------


@_njit_inline
def _deriv(X: np.ndarray, p: np.ndarray, u: np.ndarray, running: np.ndarray, sens: bool,
           code: np.ndarray, arg: np.ndarray, consts: np.ndarray, starts: np.ndarray,
           groups: np.ndarray, rc: np.ndarray, z: np.ndarray, vals: np.ndarray, stack: np.ndarray,
           out: np.ndarray) -> None:
    """out (n, W) = d/dt of [x | S]: f(x, p) + u, and ∂f/∂x·S + ∂f/∂θ."""
    n = X.shape[0]
    P = p.shape[0]
    for k in range(n):
        z[k] = X[k, 0]
    for k in range(P):
        z[n + k] = p[k]
    a, b = groups[F_RHS], groups[F_RHS + 1]
    exprvm.run_program(code, arg, consts, starts, a, b, z, vals, stack)
    for e in range(a, b):
        out[rc[e, 0], 0] = vals[e - a] + u[rc[e, 0]]
    if not sens:
        return
    W = X.shape[1]
    out[:, 1:] = 0.0
    a, b = groups[JX], groups[JX + 1]
    exprvm.run_program(code, arg, consts, starts, a, b, z, vals, stack)
    for e in range(a, b):  # sparse ∂f/∂x · S
        r, c, v = rc[e, 0], rc[e, 1], vals[e - a]
        for col in range(1, W):
            out[r, col] += v * X[c, col]
    a, b = groups[JP], groups[JP + 1]
    exprvm.run_program(code, arg, consts, starts, a, b, z, vals, stack)
    for e in range(a, b):
        out[rc[e, 0], 1 + rc[e, 1]] += vals[e - a]
    base = 1 + P + n
    for d in range(running.shape[0]):  # ∂(rate F[d, j])/∂F[d, j] = 1 while infusion d runs
        if running[d]:
            for j in range(n):
                out[j, base + d * n + j] += 1.0


@_njit_inline
def _error_norm(X: np.ndarray, Xn: np.ndarray, err: np.ndarray, rtol: float, atol: float, cols: int) -> float:
    """RMS of err/(atol + rtol·max(|X|, |Xn|)) over the first ``cols`` columns (1: states only)."""
    total = 0.0
    count = 0
    for k in range(X.shape[0]):
        for c in range(cols):
            sc = atol + rtol * max(abs(X[k, c]), abs(Xn[k, c]))
            q = err[k, c] / sc
            total += q * q
            count += 1
    return np.sqrt(total / count)


@_njit
def _integrate(X: np.ndarray, t0: float, t1: float, h: float, p: np.ndarray, u: np.ndarray,
               running: np.ndarray, sens: bool, rtol: float, atol: float, err_cols: int,
               max_steps: int, steps: np.ndarray, A: np.ndarray, E: np.ndarray,
               code: np.ndarray, arg: np.ndarray, consts: np.ndarray, starts: np.ndarray,
               groups: np.ndarray, rc: np.ndarray, z: np.ndarray, vals: np.ndarray, stack: np.ndarray,
               K: np.ndarray, Xs: np.ndarray, Xn: np.ndarray, err: np.ndarray) -> float:
    """Advance X (n, W) from t0 to t1 in place; returns the next step size, or −1 on failure.

    h <= 0 asks for a starting step (Hairer's d0/d1 estimate). ``steps[0]``
    counts every attempted step, ``steps[1]`` the rejected ones.
    """
    n, W = X.shape
    span = t1 - t0
    _deriv(X, p, u, running, sens, code, arg, consts, starts, groups, rc, z, vals, stack, K[0])
    if h <= 0.0:
        d0 = 0.0
        d1 = 0.0
        for k in range(n):
            sc = atol + rtol * abs(X[k, 0])
            d0 += (X[k, 0] / sc) ** 2
            d1 += (K[0, k, 0] / sc) ** 2
        d0, d1 = np.sqrt(d0 / n), np.sqrt(d1 / n)
        h = 1e-6 * span if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        if not h > 0.0:
            h = 1e-6 * span
    t = t0
    while t < t1:
        if steps[0] >= max_steps:
            return -1.0
        steps[0] += 1
        last = t + h >= t1 or (t1 - (t + h)) < 1e-12 * span
        hs = t1 - t if last else h
        for s in range(1, 7):
            for k in range(n):
                for c in range(W):
                    acc = X[k, c]
                    for j in range(s):
                        acc += hs * A[s, j] * K[j, k, c]
                    Xs[k, c] = acc
            _deriv(Xs, p, u, running, sens, code, arg, consts, starts, groups, rc, z, vals, stack, K[s])
        # stage 7 was evaluated at the 5th-order solution (FSAL): Xs holds it
        for k in range(n):
            for c in range(W):
                Xn[k, c] = Xs[k, c]
                acc = 0.0
                for j in range(7):
                    acc += E[j] * K[j, k, c]
                err[k, c] = hs * acc
        q = _error_norm(X, Xn, err, rtol, atol, err_cols)
        if q <= 1.0:
            t = t1 if last else t + hs
            for k in range(n):  # explicit loops: numba's slice assignment costs ~100 ns here
                for c in range(W):
                    X[k, c] = Xn[k, c]
                    K[0, k, c] = K[6, k, c]
            fac = 5.0 if q == 0.0 else min(5.0, max(0.2, 0.9 * q ** -0.2))
            h_next = hs * fac
            h = max(h, h_next) if last else h_next  # a step cut short by t1 says little about the scale
        else:
            steps[1] += 1
            fac = 0.2 if np.isnan(q) else max(0.2, 0.9 * q ** -0.2)  # NaN error: shrink hard
            h = hs * fac
            if h < 1e-14 * max(abs(t), 1.0) or not np.isfinite(X[0, 0]):
                return -1.0
    return h


@_njit_inline
def _restart(X: np.ndarray, x0: np.ndarray, P: int, sens: bool, running: np.ndarray, u: np.ndarray) -> None:
    """State x0 with ∂x/∂x0 = I and no infusion running: the start, and every reset."""
    X[:, :] = 0.0
    for k in range(x0.shape[0]):
        X[k, 0] = x0[k]
        if sens:
            X[k, 1 + P + k] = 1.0
    running[:] = False
    u[:] = 0.0


@_njit
def _forward(p: np.ndarray, x0: np.ndarray, F: np.ndarray, obs_subject: np.ndarray, obs_output: np.ndarray,
             ev_start: np.ndarray, ev_time: np.ndarray, ev_kind: np.ndarray, ev_index: np.ndarray,
             code: np.ndarray, arg: np.ndarray, consts: np.ndarray, starts: np.ndarray,
             groups: np.ndarray, rc: np.ndarray, settings: np.ndarray,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y (M,), J = ∂y/∂(p, x0, F) (M, P + n + D·n, or 0 columns) and step counts (N, 2).

    ``settings``: rtol, atol, max_steps, sensitivities (0/1), error control on
    sensitivities (0/1). A subject whose solve fails (step count exceeded,
    step size underflow, non-finite values) gets NaN for the observations
    not yet reached.
    """
    N, n = x0.shape
    P = p.shape[1]
    D = F.shape[1]
    M = obs_output.shape[0]
    if p.shape[0] != N or F.shape[0] != N or F.shape[2] != n:
        raise ValueError("ode_predict: p, x0 and F disagree on N or n")
    if ev_start.shape[0] != N + 1:
        raise ValueError("ode_predict: the design has a different number of subjects")
    rtol, atol = settings[0], settings[1]
    max_steps = int(settings[2])
    sens = settings[3] != 0.0
    nc = P + n + D * n if sens else 0
    W = 1 + nc
    err_cols = W if settings[4] != 0.0 else 1
    A, E = _A, _E  # globals: numba freezes them as constants

    y = np.full(M, np.nan)
    J = np.full((M, nc), np.nan)
    counts = np.zeros((N, 2), dtype=np.int64)
    E_total = starts.shape[0] - 1
    z = np.empty(n + P)
    vals = np.empty(max(E_total, 1))
    depth = 1
    for e in range(E_total):  # the stack never grows past the program's length
        depth = max(depth, starts[e + 1] - starts[e])
    stack = np.empty(depth)
    X = np.zeros((n, W))
    K = np.zeros((7, n, W))
    Xs = np.zeros((n, W))
    Xn = np.zeros((n, W))
    err = np.zeros((n, W))
    u = np.zeros(n)
    running = np.zeros(D, dtype=np.bool_)
    steps = np.zeros(2, dtype=np.int64)
    ga = groups[G_OUT]
    xa, xb = groups[GX], groups[GX + 1]
    pa, pb = groups[GP], groups[GP + 1]
    gvals = np.empty(1)
    for i in range(N):
        e0, e1 = ev_start[i], ev_start[i + 1]
        _restart(X, x0[i], P, sens, running, u)
        steps[:] = 0
        t = 0.0 if e0 == e1 else min(0.0, ev_time[e0])  # the system starts from x0 at time 0
        h = 0.0
        ok = True
        for e in range(e0, e1):
            te = ev_time[e]
            if te > t:
                h = _integrate(X, t, te, h, p[i], u, running, sens, rtol, atol, err_cols, max_steps, steps,
                               A, E, code, arg, consts, starts, groups, rc, z, vals, stack, K, Xs, Xn, err)
                if h < 0.0:
                    ok = False
                    break
                t = te
            kind = ev_kind[e]
            d = ev_index[e]
            if kind == RESET:  # amounts back to x0 (sensitivity ∂x/∂x0 = I), infusions stopped
                _restart(X, x0[i], P, sens, running, u)
                h = 0.0
            elif kind == BOLUS:
                for k in range(n):
                    X[k, 0] += F[i, d, k]
                    if sens:
                        X[k, 1 + P + n + d * n + k] += 1.0
                h = 0.0  # a jump: the old step size means nothing for the new profile
            elif kind == INF_ON or kind == INF_OFF:
                running[d] = kind == INF_ON
                u[:] = 0.0  # recomputed, not updated, so switching off leaves no round-off
                for dd in range(D):
                    if running[dd]:
                        for k in range(n):
                            u[k] += F[i, dd, k]
                h = 0.0
            else:  # OBS
                m = d
                o = obs_output[m]
                for k in range(n):
                    z[k] = X[k, 0]
                for k in range(P):
                    z[n + k] = p[i, k]
                exprvm.run_program(code, arg, consts, starts, ga + o, ga + o + 1, z, gvals, stack)
                y[m] = gvals[0]
                if sens:
                    for c in range(nc):
                        J[m, c] = 0.0
                    for q in range(xa, xb):
                        if rc[q, 0] == o:
                            exprvm.run_program(code, arg, consts, starts, q, q + 1, z, gvals, stack)
                            v = gvals[0]
                            for c in range(nc):
                                J[m, c] += v * X[rc[q, 1], 1 + c]
                    for q in range(pa, pb):
                        if rc[q, 0] == o:
                            exprvm.run_program(code, arg, consts, starts, q, q + 1, z, gvals, stack)
                            J[m, rc[q, 1]] += gvals[0]
        counts[i, 0] = steps[0]
        counts[i, 1] = steps[1]
        if not ok:
            counts[i, 0] = -1
    return y, J, counts


# --------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------


class OdePredict(Op):
    """(y, J, steps) from p (N, P), x0 (N, n), F (N, D, n) and constant design/program arrays.

    Only y is differentiable (through J, which the forward pass computes with
    the sensitivities). ``steps`` (N, 2) int64: attempted and rejected steps
    per subject (−1 attempted: the solve failed). Use :func:`ode_predict`.
    """

    __props__ = ()

    def make_node(self, p: Any, x0: Any, F: Any, *constants: Any) -> Apply:
        p, x0, F = (pt.as_tensor_variable(v).astype("float64") for v in (p, x0, F))
        const_vars = [pt.as_tensor_variable(c) for c in constants]
        M = const_vars[1].type.shape[0]
        outputs = [
            pt.tensor(dtype="float64", shape=(M,)),
            pt.tensor(dtype="float64", shape=(M, None)),
            pt.tensor(dtype="int64", shape=(p.type.shape[0], 2)),
        ]
        return Apply(self, [p, x0, F, *const_vars], outputs)

    def perform(self, node: Apply, inputs: list[np.ndarray], output_storage: list[list[Any]]) -> None:
        for storage, value in zip(output_storage, _forward(*inputs), strict=True):
            storage[0] = value

    def connection_pattern(self, node: Apply) -> list[list[bool]]:
        return [[True, True, False]] * 3 + [[False] * 3] * (len(node.inputs) - 3)

    def pullback(self, inputs: list[Any], outputs: list[Any], output_grads: list[Any]) -> list[Any]:
        # pytensor >= 3.3 name of L_op. ȳᵀJ per subject: the sensitivities did the work.
        p, x0, F, obs_subject, *rest = inputs
        ybar = output_grads[0]
        if any(not isinstance(g.type, DisconnectedType) for g in output_grads[1:]):
            raise NotImplementedError("OdePredict: gradients through J or steps are not implemented; use y only")
        settings = rest[-1]
        if isinstance(settings, Constant) and settings.data[3] == 0.0:
            raise NotImplementedError("ode_predict(gradient=False) has no gradient; build it with gradient=True")
        nothing = [disconnected_type() for _ in range(len(inputs) - 3)]
        if isinstance(ybar.type, DisconnectedType):
            return [pt.zeros_like(p), pt.zeros_like(x0), pt.zeros_like(F), *nothing]
        J = outputs[1]
        N, P = p.shape[0], p.shape[1]
        n, D = x0.shape[1], F.shape[1]
        G = pt.zeros((N, J.shape[1]), dtype="float64")
        G = pt.inc_subtensor(G[obs_subject], ybar[:, None] * J)  # duplicates accumulate
        return [G[:, :P], G[:, P : P + n], G[:, P + n :].reshape((N, D, n)), *nothing]


@register_funcify_default_op_cache_key(OdePredict)
def _numba_ode_predict(op: OdePredict, node: Apply | None = None, **kwargs: Any) -> tuple[Any, int]:
    # Same kernel as perform; every model-specific array is an input, so one compiled kernel serves all models.
    return _forward, _CACHE_VERSION


def ode_predict(
    system: OdeSystem,
    p: Any,
    x0: Any,
    F: Any,
    design: Design,
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    max_steps: int = DEFAULT_MAX_STEPS,
    gradient: bool = True,
    sens_error: bool = False,
    return_steps: bool = False,
) -> Any:
    """Predictions y_m = g_o(x_i(t_m), p_i) of a nonlinear compartment model.

    Parameters
    ----------
    system
        :meth:`OdeSystem.from_spec` of the model; ``design.obs_output`` indexes
        ``system.output_names``.
    p
        Inputs (N, P) in ``system.input_names`` order (parameter, covariate and
        derived-quantity values in their own units).
    x0
        Amounts at time 0 and after each reset (N, n), amount units.
    F
        Per dose (N, D, n): bolus amounts or infusion rates (amount/time) into
        each compartment, as for :func:`itpk.linop.linear_predict`.
    design
        Dose and observation times (model time unit); resets come from ``obs_after``.
    rtol, atol
        Local error tolerances of the states (atol in amount units).
    max_steps
        Attempted steps per subject before giving up (its remaining
        predictions are then NaN).
    gradient
        Integrate forward sensitivities (needed for gradients; ~(1 + P + n + D·n)× the work).
    sens_error
        Include the sensitivities in the error control (slower, more accurate gradients).
    return_steps
        Also return the step counts (N, 2): attempted, rejected (−1: failed).

    Returns
    -------
    TensorVariable (M,), or (y, steps) with ``return_steps``.
    """
    p, x0, F = (pt.as_tensor_variable(v).astype("float64") for v in (p, x0, F))
    for name, v, nd in (("p", p, 2), ("x0", x0, 2), ("F", F, 3)):
        if v.type.ndim != nd:
            raise FitError(f"ode_predict: {name} must be {nd}-D, found {v.type.ndim}-D")
    N, D = design.n_subjects, design.n_doses
    n, P = system.n_states, system.n_inputs
    expected = {"p": (p, (N, P)), "x0": (x0, (N, n)), "F": (F, (N, D, n))}
    for name, (v, shape) in expected.items():
        for have, want in zip(v.type.shape, shape, strict=True):
            if have is not None and have != want:
                raise FitError(f"ode_predict: {name} has static shape {v.type.shape}, the design and system need {shape}")
    if design.n_obs and design.obs_output.max() >= len(system.output_names):
        raise FitError(
            f"ode_predict: obs_output goes up to {design.obs_output.max()} but the system has outputs {system.output_names}"
        )
    if not (rtol > 0 and atol > 0 and max_steps > 0):
        raise FitError(f"ode_predict: rtol, atol and max_steps must be > 0, found {rtol}, {atol}, {max_steps}")
    events = EventTable.from_design(design)
    prog = system.program
    settings = np.array([rtol, atol, float(max_steps), float(gradient), float(sens_error)])
    constants = [
        design.obs_subject, design.obs_output, events.start, events.time, events.kind, events.index,
        prog.code, prog.arg, prog.consts, prog.starts, system.groups, system.rc, settings,
    ]
    y, _, steps = OdePredict()(p, x0, F, *(pt.constant(np.asarray(c)) for c in constants))
    return (y, steps) if return_steps else y
