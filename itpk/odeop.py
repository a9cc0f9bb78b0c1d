"""Predictions of nonlinear (ODE) compartment models as a pytensor Op, with gradients.

For subject i the amounts x (n,) follow

    dx/dt = f(x, p_i) + u(t),   f_k = Σ_flows ± rate(p)·x_source + odes_k(x, p),

from x(t₀) = x0_i, where u is the sum of the running infusion rates F[i, d]
(amount/time per compartment) and a bolus adds F[i, d] (amount) to x at its
time. Observation m of subject i is output o: y_m = g_o(x(t_m), p_i). When
the dose vectors are constant amounts times parameter-dependent route
fractions, F = Gd @ Fr (:func:`dose_factors`), the Op takes Fr.

``p_i`` (P,) holds, in this order (:attr:`OdeSystem.input_names`), the
model's parameters, covariates and derived quantities. Derived quantities are
computed *outside* the Op (in pytensor, where their own gradients come for
free) and enter as plain inputs, as do the initial amounts x0.

Two solvers share the event loop, restarted at every dose, infusion switch,
reset and observation so a discontinuity never sits inside a step and no
dense output is needed:

- ``"dp5"``: adaptive explicit Dormand–Prince 5(4) (FSAL, standard controller);
- ``"rosenbrock"``: the linearly implicit Rosenbrock-W method ROS34PW2 (Rang &
  Angermann 2005; order 3, embedded order 2, L-stable, stiffly accurate),
  applied to the augmented system [x | S] with the block-diagonal matrix
  diag(J, …, J), J = ∂f/∂x at the step start (the ∂f/∂x program the
  sensitivities already use). A W-method keeps its order with any matrix, so
  dropping the coupling block ∂(J·S + ∂f/∂θ)/∂x costs no accuracy, and one
  hand-written n×n LU (partial pivoting) of I/(hγ) − J per step serves the
  states and every sensitivity column.

Forward sensitivities S = ∂x/∂θ for θ = (p, x0, Fr) are integrated with the
states (dS/dt = ∂f/∂x·S + ∂f/∂θ, bolus d: S[:, Fr[r]] += Gd[d, r]·I, reset:
S = [0, I, 0]); the Op returns the Jacobian J = ∂y/∂θ (M, P + n + R·n) next
to y, and the gradient is the contraction ȳᵀJ summed per subject. Only the θ
entries that can reach a free variable are tracked (:func:`tracked_columns`:
fixed parameters, covariates, constant initial amounts and dose fractions are
skipped; their columns of J are 0), and a tracked input that f does not use
has no sensitivity to integrate (only ∂g/∂p reaches J). The virus fit
integrates 9 of 32 columns: r, β, δ, burst, ω, k_efflux, k_clear and the
fractions into virus and blood. f, g and their Jacobians come from
:mod:`itpk.exprvm` (no code generation from model text), passed to one numba
kernel as constant inputs: each step evaluates f, ∂f/∂x and the integrated
columns of ∂f/∂p as one :class:`~itpk.exprvm.Tape` (straight-line register
code with shared subexpressions; the part that reads p only runs once per
subject), the outputs at observations as stack programs. The solver is a
number in the kernel's settings, so the Op's inputs and outputs are the same
for both.

Choice of solver (``method="auto"``, the default; measured 2026-11-27 on a
shared 2-core machine, CPU ms per log-density + gradient through the compiled
graph, states-only error control; the virus row after the tape, the dose
factors and the loop changes, which cut its cost at rtol 1e-7 from ~170–210 ms
and at 1e-5 from ~40 ms; one_cpt_mm before them):

============================  ===================  =========================
case                          dp5 (rtol 1e-8)      rosenbrock
============================  ===================  =========================
virus, data/example_virus     ~490 ms (kernel      53 ms (1e-7), 12 ms (1e-5),
(6 subjects, 77 days)         only), ~30,000       6.1 ms (1e-4, the fit's);
                              steps/subj           5,000/1,100/550 steps/subj
one_cpt_mm, 12 subjects, 72h  4.2 ms, 25 steps     3.1 ms (1e-6), 7.9 ms (1e-8)
============================  ===================  =========================

A Rosenbrock step of the virus fit (n = 6, 9 sensitivity columns) costs ~1.7 µs:
~0.4 µs the tape (4 stages × f, ∂f/∂x, ∂f/∂p: ~70 instructions each), the
rest the stage updates, the sparse ∂f/∂x·S products and the 4 triangular
solves over the 10 columns (~0.07 µs per column).

DP5's step is capped by stability (h·ρ(J) ≲ 3.3: blood clearance 5/h, up to
55/h with antibodies, over weeks), the Rosenbrock step by accuracy only. At
equal tight tolerance the gain is only ~2–3× (order 3 against order 5); on a
non-stiff model DP5 is faster at equal tolerance. So "auto"
(:func:`choose_method`) picks "rosenbrock" when the spectral radius of ∂f/∂x
at the model file's values and initial amounts (:attr:`OdeSystem.typical_rate`)
times the design's horizon exceeds :data:`STIFF_THRESHOLD` (1000: DP5 would
need ≳ 300 steps per subject for stability alone), else "dp5". The virus model
(ρ ≈ 5/h) is stiff beyond ~200 h; one_cpt_mm (ρ = Vmax/(V·Km) = 0.1/h) never
is in practice. Default rtol: 1e-8 for "dp5", 1e-7 for "rosenbrock" (order 3:
its global error is ~3–5× rtol; 1e-7 keeps predictions within 1e-6 of a tight
reference, as the tests check). A fit needs far less (residual errors are
5–50 %): ``fit=True`` (what :func:`itpk.inference.fit` asks for) runs the
stiff method at :data:`FIT_RTOL_STIFF` = 1e-4 (see there for its accuracy).

Limits: the explicit method with states-only error control can let h outgrow
its stability limit where the states are flat (e.g. after a reset to amounts
that are 0) while the sensitivities are not, and the sensitivities then blow
up (seen: ∂y/∂x0 ~1e16 on the virus model after a reset; ~1e72 at rtol 1e-6);
the Rosenbrock method is L-stable and does not (``sens_error=True`` is the
DP5 remedy). No steady-state doses; subjects are solved one after the other
(no threads).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType, disconnected_type
from pytensor.graph.basic import Apply, Constant
from pytensor.graph.op import Op
from pytensor.link.numba.dispatch.basic import register_funcify_default_op_cache_key

from itpk import exprvm, native
from itpk.errors import FitError, ItpkError
from itpk.linop import Design
from itpk.native import NativeKernel, as_pointer, keep_alive
from itpk.spec import ELIMINATION, ModelSpec
from itpk.system import initial_state, resolve

__all__ = [
    "METHODS", "EventTable", "OdePredict", "OdeSystem", "choose_method", "dense_jacobian", "design_horizon",
    "initial_amounts", "ode_predict",
]

_CACHE_VERSION = int(
    hashlib.sha256(Path(__file__).read_bytes() + Path(exprvm.__file__).read_bytes()
                   + Path(native.__file__).read_bytes()).hexdigest()[:12], 16
)
_njit = numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True)
# Inner kernels are inlined into their callers: a numba call with ~15 array arguments pays
# an atomic reference-count increment and decrement per array (~150 ns), as much as the
# right-hand side itself costs for a small model.
_njit_inline = numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True, inline="always")
# The integrators allocate nothing: compiled without numba's reference counting (NRT), their
# inlined helpers pay no atomic increment/decrement per array argument, which the LLVM pass
# that prunes them leaves in loops (measured: 12% of a Rosenbrock step). The caller keeps
# every array alive across the call.
_njit_no_rc = numba.njit(cache=True, fastmath=False, boundscheck=False, nogil=True, _nrt=False)

# Expression groups of an OdeSystem program, in this order (rows/cols in OdeSystem.rc):
F_RHS, JX, JP, G_OUT, GX, GP = range(6)
# The kernel's tape description (int64, see _tape_arrays): output-group bounds of F_RHS, JX, JP
# (4 entries from _T_OUT), then the instruction sections: p only, F_RHS, JX, JP (5 from _T_SEC).
_T_OUT, _T_SEC = 0, 4
# Event kinds, in the order they are applied at one time: a reset first (a dose at the
# reset time counts), infusions off before on, observations (value just after doses), then
# late boluses: covariate changes, which hold only after their time (NOCB).
RESET, INF_OFF, BOLUS, INF_ON, OBS, LATE = range(6)

# Dormand–Prince 5(4) tableau (Hairer, Nørsett & Wanner, Solving ODEs I, Table 5.2).
_A = np.zeros((7, 6))
_A[1, :1] = [1 / 5]
_A[2, :2] = [3 / 40, 9 / 40]
_A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
_A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
_A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
_A[6, :6] = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]  # = b (FSAL)
_E = np.array([71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])  # b − b̂



def _rosenbrock_tableau() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """ROS34PW2 (Rang & Angermann, BIT 45:761, 2005) in the form that needs no product with J.

    The paper's method, k_i = h·f(y0 + Σ α_ij k_j) + h·W·Σ γ_ij k_j (W ≈ ∂f/∂x),
    is rewritten with u = Γk (Hairer & Wanner, Solving ODEs II, IV.7) as
    (I/(hγ) − W) u_i = f(y0 + Σ a_ij u_j) + Σ c_ij u_j / h, y1 = y0 + Σ m_j u_j,
    with a = αΓ⁻¹, c = diag(1/γ) − Γ⁻¹, m = bΓ⁻¹. Returns a, c, m, e = (b − b̂)Γ⁻¹
    (the local error estimate) and γ. Order 3 for *any* W (a W-method), L-stable,
    stiffly accurate; embedded order 2.
    """
    alpha = np.zeros((4, 4))
    alpha[1, 0] = 8.7173304301691801e-01
    alpha[2, :2] = [8.4457060015369423e-01, -1.1299064236484185e-01]
    alpha[3, 2] = 1.0
    gamma = 4.3586652150845900e-01
    G = np.diag(np.full(4, gamma))
    G[1, 0] = -8.7173304301691801e-01
    G[2, :2] = [-9.0338057013044082e-01, 5.4180672388095326e-02]
    G[3, :3] = [2.4212380706095346e-01, -1.2232505839045147e00, 5.4526025533510214e-01]
    b = np.array([2.4212380706095346e-01, -1.2232505839045147e00, 1.5452602553351020e00, 4.3586652150845900e-01])
    b_hat = np.array([3.7810903145819369e-01, -9.6042292212423178e-02, 0.5, 2.1793326075422950e-01])
    G_inv = np.linalg.inv(G)
    a = np.tril(alpha @ G_inv, -1)  # tril: drop the inverse's round-off above the diagonal
    c = np.tril(np.diag(1.0 / np.diag(G)) - G_inv, -1)
    return a, c, b @ G_inv, (b - b_hat) @ G_inv, gamma


_RA, _RC, _RM, _RE, _RGAMMA = _rosenbrock_tableau()

# Solver choice, element 5 of the kernel's settings (see the module docstring for "auto").
METHODS = ("dp5", "rosenbrock", "auto")
DP5, ROSENBROCK = 0, 1

DEFAULT_RTOL = 1e-8
DEFAULT_RTOL_STIFF = 1e-7  # order 3: ~2.2x the steps per 10x tighter; see the module docstring
# rtol of the stiff method inside a fit's log-density (ode_predict(fit=True)); DP5 keeps DEFAULT_RTOL.
# Measured on the virus fit (data/example_virus.csv) at 40 posterior draws against rtol 1e-8: log-density
# within 0.011 (median 0.003), gradient within 1.0% (median 0.35%); predictions within 6e-4 (relative)
# of Radau at 1e-10, against residual errors of 5% (proportional) and 0.5 (log). 3e-4 (0.71x the steps,
# log-density within 0.034 in the typical set) was tried and reverted: on seed 2 of the example fit
# one chain stuck with 227 divergences (max R-hat 1.33), against 7 divergences (R-hat 1.040) at 1e-4;
# far from the typical set the looser solve's log-density error is what NUTS's energy check sees.
FIT_RTOL_STIFF = 1e-4
STIFF_THRESHOLD = 1000.0  # typical rate × horizon above which "auto" picks the stiff method
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
    method : str
        Solver :func:`ode_predict` uses unless told otherwise: "dp5",
        "rosenbrock" or "auto" (:func:`choose_method`).
    typical_rate : float
        Spectral radius of ∂f/∂x (1/time) at the model file's values and
        initial amounts: the fastest local rate, for "auto" (NaN: unknown).
    """

    state_names: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    program: exprvm.Program
    groups: np.ndarray
    rc: np.ndarray
    method: str = "auto"
    typical_rate: float = float("nan")
    trees: tuple[exprvm.Node, ...] = ()

    @property
    def n_states(self) -> int:
        return len(self.state_names)

    @property
    def n_inputs(self) -> int:
        return len(self.input_names)

    @classmethod
    def from_spec(cls, spec: ModelSpec, outputs: Sequence[str] | None = None, method: str = "auto",
                  state_covariates: Sequence[str] = ()) -> OdeSystem:
        """Compile a model's flows, ``[odes]`` and outputs (all, or ``outputs`` in that order).

        ``state_covariates`` (time-varying covariates) become extra states after
        the compartments, with derivative 0: a change of value is a jump of the
        state at the change time, so the solver's restart at events applies it.
        Derived quantities that use them are inlined as expressions of those
        states; their input columns (like the covariates') are then unused.
        """
        if method not in METHODS:
            raise FitError(f"method {method!r} is unknown; methods: {', '.join(METHODS)}")
        tv = tuple(state_covariates)
        unknown_tv = [c for c in tv if c not in spec.covariates]
        if unknown_tv:
            raise FitError(f"model {spec.name!r} has no covariate(s) {unknown_tv}; covariates: {', '.join(spec.covariates)}")
        states = (*spec.state_names, *tv)
        inputs = (*spec.parameters, *spec.covariates, *spec.derived)
        names = tuple(outputs) if outputs is not None else tuple(spec.outputs)
        unknown = [o for o in names if o not in spec.outputs]
        if unknown:
            raise FitError(f"model {spec.name!r} has no output(s) {unknown}; outputs: {', '.join(spec.outputs)}")
        n = len(states)
        slots: dict[str, int | exprvm.Node] = {
            **{s: k for k, s in enumerate(states)}, **{name: n + k for k, name in enumerate(inputs)}}
        for k, c in enumerate(tv):
            slots[c] = len(spec.state_names) + k
        varying = set(tv)
        for name, d in spec.derived.items():  # model-file order: a derived name only uses earlier ones
            if d.expr.names & varying:
                slots[name] = exprvm.lower(d.expr, slots)
                varying.add(name)
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
        system = cls._build(states, inputs, names, rhs, outs, method)
        return replace(system, typical_rate=_typical_rate(spec, system, tv))

    @classmethod
    def _build(cls, states: tuple[str, ...], inputs: tuple[str, ...], outputs: tuple[str, ...],
               rhs: list[exprvm.Node], outs: list[exprvm.Node], method: str = "auto") -> OdeSystem:
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
        return cls(states, inputs, outputs, program, bounds, rc, method, trees=tuple(tree for tree, _, _ in flat))

    def with_state_outputs(self) -> OdeSystem:
        """The same right-hand side with the amounts as outputs (``output_names`` = ``state_names``)."""
        rhs = list(self.trees[self.groups[F_RHS]:self.groups[F_RHS + 1]])
        outs: list[exprvm.Node] = [("v", k) for k in range(self.n_states)]
        system = self._build(self.state_names, self.input_names, self.state_names, rhs, outs, self.method)
        return replace(system, typical_rate=self.typical_rate)

    def stack_inputs(self, env: Mapping[str, Any], n_subjects: int) -> Any:
        """p (N, P) as a pytensor tensor from values by name (scalars or (N,) tensors)."""
        ones = pt.ones(n_subjects)
        return pt.stack([pt.as_tensor_variable(env[name]) * ones for name in self.input_names], axis=-1)


def system_tape(system: OdeSystem, inputs: np.ndarray | None = None) -> tuple[exprvm.Tape, np.ndarray]:
    """The tape the kernel evaluates every step, and the system expression behind each of its outputs.

    Groups: f (F_RHS), ∂f/∂x (JX) and the ∂f/∂p entries of the inputs marked
    in ``inputs`` (bool (P,); None: none), in the system's expression order;
    slots x (varying) then p (constant per subject).
    """
    g = system.groups
    n, P = system.n_states, system.n_inputs
    wanted = np.zeros(P, dtype=bool) if inputs is None else np.asarray(inputs, dtype=bool)
    exprs = [
        list(range(g[F_RHS], g[F_RHS + 1])),
        list(range(g[JX], g[JX + 1])),
        [e for e in range(g[JP], g[JP + 1]) if wanted[system.rc[e, 1]]],
    ]
    tape = exprvm.compile_tape([[system.trees[e] for e in group] for group in exprs], n + P, range(n))
    return tape, np.array([e for group in exprs for e in group], dtype=np.int64)


def _tape_arrays(system: OdeSystem, inputs: np.ndarray | None) -> list[np.ndarray]:
    """ops, constants, tout (E, 2): (register, system expression) per output, and the int64 description."""
    tape, exprs = system_tape(system, inputs)
    tout = np.stack([tape.out, exprs], axis=1).astype(np.int64).reshape(-1, 2)
    meta = np.concatenate([tape.out_groups, tape.sections]).astype(np.int64)
    return [tape.ops, tape.consts, tout, meta]


def dense_jacobian(system: OdeSystem, x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """∂f/∂x (n, n) at amounts x (n,) and inputs p (P,), in numpy (for checks and :func:`choose_method`)."""
    n = system.n_states
    values = system.program.evaluate(np.concatenate([np.asarray(x, float), np.asarray(p, float)]))
    J = np.zeros((n, n))
    for e in range(system.groups[JX], system.groups[JX + 1]):
        J[system.rc[e, 0], system.rc[e, 1]] += values[e]
    return J


def _typical_rate(spec: ModelSpec, system: OdeSystem, state_covariates: Sequence[str] = ()) -> float:
    """Spectral radius of ∂f/∂x (1/time) at the model file's values and initial amounts; NaN if not computable.

    At the initial amounts a saturable elimination runs at its fastest
    (Vmax/(V·Km) below Km), so the estimate leans towards "stiff".
    """
    try:
        values = resolve(spec)
        x0 = np.concatenate([initial_state(values)[0], [float(values[c][0]) for c in state_covariates]])
        p = np.array([float(np.ravel(values[name])[0]) for name in system.input_names])
    except (ItpkError, KeyError, ValueError):
        return float("nan")
    with np.errstate(all="ignore"):
        J = dense_jacobian(system, x0, p)
        if not np.all(np.isfinite(J)):
            return float("nan")
        return float(np.max(np.abs(np.linalg.eigvals(J)), initial=0.0))


def choose_method(system: OdeSystem, horizon: float) -> str:
    """The solver "auto" stands for, from the system's typical rate and the design's horizon (time).

    "rosenbrock" when ``typical_rate × horizon`` exceeds :data:`STIFF_THRESHOLD`:
    DP5 is stable only for h·ρ ≲ 3.3, so it would need more than ~300 steps
    per subject for stability alone, where the stiff method's step is set by
    accuracy. Otherwise (or when the rate is unknown) "dp5".
    """
    rate = system.typical_rate
    return "rosenbrock" if np.isfinite(rate) and rate * horizon > STIFF_THRESHOLD else "dp5"


def design_horizon(design: Design) -> float:
    """Time (model unit) from 0 (or the earliest event before it) to the last observation or infusion end."""
    ends = [0.0, *design.obs_time[np.isfinite(design.obs_time)]]
    valid = design.dose_valid
    if valid.any():
        t = design.dose_time[valid]
        end = t + design.dose_duration[valid]
        ends += [*t, *end[np.isfinite(end)]]
    return float(max(ends) - min(ends))


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
    INF_OFF, BOLUS, INF_ON, OBS, LATE); ``index`` (E,) int64: dose column or
    observation row. ``late`` (N, D) bool marks the bolus doses applied after
    the observations at their time (covariate changes).
    """

    start: np.ndarray
    time: np.ndarray
    kind: np.ndarray
    index: np.ndarray

    @classmethod
    def from_design(cls, design: Design, late: np.ndarray | None = None) -> EventTable:
        rows: list[tuple[int, float, int, int]] = []
        for i in range(design.n_subjects):
            for d in np.flatnonzero(design.dose_valid[i]):
                t, dur = float(design.dose_time[i, d]), float(design.dose_duration[i, d])
                if dur == 0.0:
                    rows.append((i, t, LATE if late is not None and late[i, d] else BOLUS, int(d)))
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
def _deriv(X: np.ndarray, u: np.ndarray, running: np.ndarray, sens: bool,
           ops: np.ndarray, regs: np.ndarray, tape: np.ndarray, tout: np.ndarray, rc: np.ndarray,
           cmap: np.ndarray, G: np.ndarray, out: np.ndarray, s: int, Jd: np.ndarray, want_jac: bool) -> None:
    """out[s] (n, W) = d/dt of [x | S]: f(x, p) + u, and ∂f/∂x·S + ∂f/∂θ; with ``want_jac`` also Jd (n, n) = ∂f/∂x.

    ``out`` (stages, n, W) is indexed, not sliced: a view pays two atomic
    reference-count updates, measured at ~12% of a Rosenbrock step.

    f, ∂f/∂x and the integrated columns of ∂f/∂p come from the system's
    :class:`~itpk.exprvm.Tape` (see :func:`_tape_arrays` for ``tape`` and
    ``tout``); ``regs`` already holds p and the instructions that depend on p
    only (run once per subject). ``cmap[c]`` is the column of X holding θ_c's
    sensitivity, 0 when θ_c is not integrated. ``G`` (D, R): the subject's dose
    factors (F[d] = Σ_r G[d, r]·Fr[r], θ holds Fr); R = 0 stands for G = I.
    """
    n = X.shape[0]
    for k in range(n):
        regs[k] = X[k, 0]
    exprvm.run_tape(ops, regs, tape[_T_SEC + 1], tape[_T_SEC + 2])
    for j in range(tape[_T_OUT + F_RHS], tape[_T_OUT + F_RHS + 1]):
        r = rc[tout[j, 1], 0]
        out[s, r, 0] = regs[tout[j, 0]] + u[r]
    if not (sens or want_jac):
        return
    exprvm.run_tape(ops, regs, tape[_T_SEC + 2], tape[_T_SEC + 3])
    a, b = tape[_T_OUT + JX], tape[_T_OUT + JX + 1]
    if want_jac:
        for k in range(n):
            for c in range(n):
                Jd[k, c] = 0.0
        for j in range(a, b):
            Jd[rc[tout[j, 1], 0], rc[tout[j, 1], 1]] += regs[tout[j, 0]]
    if not sens:
        return
    W = X.shape[1]
    for k in range(n):
        for col in range(1, W):
            out[s, k, col] = 0.0
    for j in range(a, b):  # sparse ∂f/∂x · S
        e = tout[j, 1]
        r, c, v = rc[e, 0], rc[e, 1], regs[tout[j, 0]]
        for col in range(1, W):
            out[s, r, col] += v * X[c, col]
    exprvm.run_tape(ops, regs, tape[_T_SEC + 3], tape[_T_SEC + 4])
    for j in range(tape[_T_OUT + JP], tape[_T_OUT + JP + 1]):  # the tape holds the integrated columns only
        e = tout[j, 1]
        col = cmap[rc[e, 1]]
        if col > 0:
            out[s, rc[e, 0], col] += regs[tout[j, 0]]
    D, R = G.shape
    identity = R == 0
    base = cmap.shape[0] - (D if identity else R) * n  # P + n: the dose columns are the last R·n of θ
    for d in range(D):  # ∂(rate F[d, j])/∂Fr[r, j] = G[d, r] while infusion d runs
        if running[d]:
            for r in range(d, d + 1) if identity else range(R):
                g = 1.0 if identity else G[d, r]
                if g != 0.0:
                    for j in range(n):
                        col = cmap[base + r * n + j]
                        if col > 0:
                            out[s, j, col] += g


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


@_njit_inline
def _starting_step(X: np.ndarray, f0: np.ndarray, rtol: float, atol: float, span: float) -> float:
    """Hairer's starting step from the states' |x| and |f(x)| (f0: the first stage's slopes, (n, W))."""
    n = X.shape[0]
    d0 = 0.0
    d1 = 0.0
    for k in range(n):
        sc = atol + rtol * abs(X[k, 0])
        d0 += (X[k, 0] / sc) ** 2
        d1 += (f0[k, 0] / sc) ** 2
    d0, d1 = np.sqrt(d0 / n), np.sqrt(d1 / n)
    h = 1e-6 * span if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    return h if h > 0.0 else 1e-6 * span


@_njit_no_rc
def _integrate(X: np.ndarray, t0: float, t1: float, h: float, u: np.ndarray,
               running: np.ndarray, sens: bool, rtol: float, atol: float, err_cols: int,
               max_steps: int, steps: np.ndarray, A: np.ndarray, E: np.ndarray,
               ops: np.ndarray, regs: np.ndarray, tape: np.ndarray, tout: np.ndarray, rc: np.ndarray,
               cmap: np.ndarray, G: np.ndarray, K: np.ndarray, Xs: np.ndarray, Xn: np.ndarray, err: np.ndarray,
               Jd: np.ndarray) -> float:
    """Advance X (n, W) from t0 to t1 in place; returns the next step size, or −1 on failure.

    h <= 0 asks for a starting step (Hairer's d0/d1 estimate). ``steps[0]``
    counts every attempted step, ``steps[1]`` the rejected ones.
    """
    n, W = X.shape
    span = t1 - t0
    _deriv(X, u, running, sens, ops, regs, tape, tout, rc, cmap, G, K, 0, Jd, False)
    if h <= 0.0:
        h = _starting_step(X, K[0], rtol, atol, span)
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
            _deriv(Xs, u, running, sens, ops, regs, tape, tout, rc, cmap, G, K, s, Jd, False)
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
def _lu_factor(M: np.ndarray, piv: np.ndarray) -> bool:
    """In-place LU of a small dense M with partial pivoting; False when a pivot is zero or not finite.

    Hand-written rather than numpy.linalg: n is the number of states (a handful),
    and LAPACK through numba adds compile time and call overhead for nothing.
    """
    n = M.shape[0]
    for j in range(n):
        best = j
        big = abs(M[j, j])
        for r in range(j + 1, n):
            if abs(M[r, j]) > big:
                big = abs(M[r, j])
                best = r
        if not (big > 0.0 and big < np.inf):
            return False
        piv[j] = best
        if best != j:
            for c in range(n):
                M[j, c], M[best, c] = M[best, c], M[j, c]
        inv = 1.0 / M[j, j]
        for r in range(j + 1, n):
            M[r, j] *= inv
            f = M[r, j]
            if f != 0.0:
                for c in range(j + 1, n):
                    M[r, c] -= f * M[j, c]
    return True


@_njit_inline
def _lu_solve(M: np.ndarray, piv: np.ndarray, B: np.ndarray, s: int) -> None:
    """B[s] (n, W) ← M⁻¹B[s] in place, M as left by :func:`_lu_factor`: every column shares the one factorisation."""
    n, W = B.shape[1], B.shape[2]
    for j in range(n):
        r = piv[j]
        if r != j:
            for c in range(W):
                B[s, j, c], B[s, r, c] = B[s, r, c], B[s, j, c]
    for j in range(n):
        for r in range(j + 1, n):
            f = M[r, j]
            if f != 0.0:
                for c in range(W):
                    B[s, r, c] -= f * B[s, j, c]
    for j in range(n - 1, -1, -1):
        inv = 1.0 / M[j, j]
        for c in range(W):
            B[s, j, c] *= inv
        for r in range(j):
            f = M[r, j]
            if f != 0.0:
                for c in range(W):
                    B[s, r, c] -= f * B[s, j, c]


@_njit_no_rc
def _integrate_rosenbrock(X: np.ndarray, t0: float, t1: float, h: float, u: np.ndarray,
                          running: np.ndarray, sens: bool, rtol: float, atol: float, err_cols: int,
                          max_steps: int, steps: np.ndarray,
                          ops: np.ndarray, regs: np.ndarray, tape: np.ndarray, tout: np.ndarray, rc: np.ndarray,
                          cmap: np.ndarray, G: np.ndarray, U: np.ndarray, Xs: np.ndarray, Xn: np.ndarray,
                          err: np.ndarray, Jd: np.ndarray, M: np.ndarray, piv: np.ndarray) -> float:
    """:func:`_integrate` with the linearly implicit ROS34PW2 (stiff systems); same contract.

    Applied to the augmented system [x | S] with the block-diagonal matrix
    diag(J, …, J), J = ∂f/∂x at the step start: it drops only ∂(J·S + ∂f/∂θ)/∂x,
    which a W-method tolerates without losing order, and lets one n×n LU of
    I/(hγ) − J serve the states and every sensitivity column. Stage 0 (f and
    J at the step start) goes through the same :func:`_deriv` call as the
    other stages: each call site inlines the expression interpreter again,
    and compile time grows with them (a rejected step, rare, re-evaluates it).
    """
    n, W = X.shape
    A, C, Mw, E, gamma = _RA, _RC, _RM, _RE, _RGAMMA  # globals: numba freezes them as constants
    nw = n * W  # flat views (all C-contiguous): element-wise updates run as single loops
    Xf, Xsf, Xnf = X.reshape(nw), Xs.reshape(nw), Xn.reshape(nw)
    Uf = U.reshape(U.shape[0], nw)
    span = t1 - t0
    t = t0
    while t < t1:
        if steps[0] >= max_steps:
            return -1.0
        steps[0] += 1
        last = False
        hs = h
        solved = True
        for s in range(4):
            if s > 0:  # stage point X + Σ_j a_sj u_j, flat: one loop per term (n·W long) vectorises
                for q in range(nw):
                    Xsf[q] = Xf[q]
                for j in range(s):
                    a = A[s, j]
                    if a != 0.0:
                        for q in range(nw):
                            Xsf[q] += a * Uf[j, q]
            _deriv(Xs if s > 0 else X, u, running, sens, ops, regs, tape, tout, rc, cmap, G, U, s, Jd, s == 0)
            if s == 0:
                if h <= 0.0:
                    h = _starting_step(X, U[0], rtol, atol, span)
                last = t + h >= t1 or (t1 - (t + h)) < 1e-12 * span
                hs = t1 - t if last else h
                shift = 1.0 / (hs * gamma)
                for k in range(n):
                    for c in range(n):
                        M[k, c] = -Jd[k, c]
                    M[k, k] += shift
                if not _lu_factor(M, piv):
                    solved = False
                    break
            else:
                for j in range(s):
                    cj = C[s, j] / hs
                    if cj != 0.0:
                        for q in range(nw):
                            Uf[s, q] += cj * Uf[j, q]
            _lu_solve(M, piv, U, s)
        q = np.nan
        if solved:
            for r in range(nw):
                Xnf[r] = Xf[r]
            for j in range(4):
                m = Mw[j]
                for r in range(nw):
                    Xnf[r] += m * Uf[j, r]
            for k in range(n):  # the error estimate of the controlled columns only
                for c in range(err_cols):
                    est = 0.0
                    for j in range(4):
                        est += E[j] * U[j, k, c]
                    err[k, c] = est
            q = _error_norm(X, Xn, err, rtol, atol, err_cols)
        if q <= 1.0:
            t = t1 if last else t + hs
            for r in range(nw):
                Xf[r] = Xnf[r]
            fac = 6.0 if q == 0.0 else min(6.0, max(0.2, 0.9 * q ** (-1.0 / 3.0)))
            h_next = hs * fac
            h = max(h, h_next) if last else h_next
        else:
            steps[1] += 1
            fac = 0.2 if np.isnan(q) else max(0.2, 0.9 * q ** (-1.0 / 3.0))  # NaN or singular: shrink hard
            h = hs * fac
            if h < 1e-14 * max(abs(t), 1.0) or not np.isfinite(X[0, 0]):
                return -1.0
    return h


@_njit_inline
def _restart(X: np.ndarray, x0: np.ndarray, P: int, sens: bool, running: np.ndarray, u: np.ndarray,
             cmap: np.ndarray) -> None:
    """State x0 with ∂x/∂x0 = I and no infusion running: the start, and every reset."""
    X[:, :] = 0.0
    for k in range(x0.shape[0]):
        X[k, 0] = x0[k]
        if sens and cmap[P + k] > 0:
            X[k, cmap[P + k]] = 1.0
    running[:] = False
    u[:] = 0.0


@_njit
def _forward_core(p: np.ndarray, x0: np.ndarray, Fr: np.ndarray, obs_subject: np.ndarray, obs_output: np.ndarray,
                  Gd: np.ndarray, ev_start: np.ndarray, ev_time: np.ndarray, ev_kind: np.ndarray, ev_index: np.ndarray,
                  code: np.ndarray, arg: np.ndarray, consts: np.ndarray, starts: np.ndarray,
                  groups: np.ndarray, rc: np.ndarray, ops: np.ndarray, tape_consts: np.ndarray,
                  tout: np.ndarray, tape: np.ndarray, settings: np.ndarray,
                  y: np.ndarray, J: np.ndarray, counts: np.ndarray) -> None:
    """Fill y (M,), J = ∂y/∂(p, x0, Fr) (M, P + n + R·n, or 0 columns) and step counts (N, 2).

    The arrays are checked by :func:`_forward` (this runs inside a native entry point,
    which must not raise).

    Dose d of subject i puts F[i, d] = Σ_r Gd[i, d, r]·Fr[i, r] (n,) into the
    states (bolus amounts or infusion rates): Gd (N, D, R) is constant (e.g.
    the dose amounts by route), Fr (N, R, n) may depend on parameters (e.g.
    the routes' fractions). Gd of shape (N, D, 0) stands for the identity:
    F = Fr (N, D, n).

    ``code``…``starts`` is the system's program (outputs and their Jacobians
    at observations), ``ops``…``tape`` its tape (:func:`_tape_arrays`: f, ∂f/∂x
    and the integrated columns of ∂f/∂p, every step). ``settings``: rtol, atol,
    max_steps, sensitivities (0/1), error control on sensitivities (0/1) and,
    optionally, the method (DP5 or ROSENBROCK; DP5 when absent) followed by a
    0/1 mask of the θ columns to track (all when absent; the others' columns
    of J are 0). A tracked θ column is integrated unless it is an input
    that f does not use (no ∂f/∂p entry on the tape: its sensitivity stays 0,
    only ∂g/∂p reaches J). A subject whose solve fails (step count exceeded,
    step size underflow, non-finite values) gets NaN for the observations
    not yet reached.
    """
    N, n = x0.shape
    P = p.shape[1]
    D = Gd.shape[1]
    identity = Gd.shape[2] == 0
    R = D if identity else Gd.shape[2]
    rtol, atol = settings[0], settings[1]
    max_steps = int(settings[2])
    sens = settings[3] != 0.0
    nc = J.shape[1]
    tracked = np.zeros(max(nc, 1), dtype=np.bool_)
    for c in range(nc):
        tracked[c] = settings.shape[0] <= 6 or settings[6 + c] != 0.0
    integrated = tracked.copy()
    uses = np.zeros(max(P, 1), dtype=np.bool_)  # p columns with a ∂f/∂p entry on the tape
    for j in range(tape[_T_OUT + JP], tape[_T_OUT + JP + 1]):
        uses[rc[tout[j, 1], 1]] = True
    for c in range(min(P, nc)):
        integrated[c] = tracked[c] and uses[c]
    cmap = np.zeros(max(nc, 1), dtype=np.int64)  # θ column → column of X (0: not integrated)
    cols = np.zeros(max(nc, 1), dtype=np.int64)  # column of X − 1 → θ column
    K_active = 0
    for c in range(nc):
        if integrated[c]:
            cols[K_active] = c
            K_active += 1
            cmap[c] = K_active
    W = 1 + K_active
    err_cols = W if settings[4] != 0.0 else 1
    stiff = settings.shape[0] > 5 and settings[5] == ROSENBROCK
    A, E = _A, _E  # globals: numba freezes them as constants

    y[:] = np.nan
    J[:, :] = np.nan
    counts[:, :] = 0
    E_total = starts.shape[0] - 1
    z = np.empty(n + P)
    depth = 1
    for e in range(E_total):  # the stack never grows past the program's length
        depth = max(depth, starts[e + 1] - starts[e])
    stack = np.empty(depth)
    X = np.zeros((n, W))
    K = np.zeros((4 if stiff else 7, n, W))  # DP5's stage derivatives, or Rosenbrock's u_i
    Jd = np.zeros((n, n))
    Mlu = np.zeros((n, n))
    piv = np.zeros(n, dtype=np.int64)
    Xs = np.zeros((n, W))
    Xn = np.zeros((n, W))
    S = n + P  # the tape's slots: x, then p
    regs = np.zeros(S + tape_consts.shape[0] + ops.shape[0])
    for k in range(tape_consts.shape[0]):
        regs[S + k] = tape_consts[k]
    err = np.zeros((n, W))
    u = np.zeros(n)
    running = np.zeros(D, dtype=np.bool_)
    steps = np.zeros(2, dtype=np.int64)
    ga = groups[G_OUT]
    xa, xb = groups[GX], groups[GX + 1]
    pa, pb = groups[GP], groups[GP + 1]
    gvals = np.empty(1)
    F = np.zeros((D, n))  # the subject's doses
    for i in range(N):
        e0, e1 = ev_start[i], ev_start[i + 1]
        for d in range(D):
            for k in range(n):
                acc = Fr[i, d, k] if identity else 0.0
                for r in range(0 if identity else R):
                    if Gd[i, d, r] != 0.0:  # skipped, not multiplied: 0·inf would be NaN
                        acc += Gd[i, d, r] * Fr[i, r, k]
                F[d, k] = acc
        _restart(X, x0[i], P, sens, running, u, cmap)
        steps[:] = 0
        for k in range(P):
            regs[n + k] = p[i, k]
        exprvm.run_tape(ops, regs, tape[_T_SEC], tape[_T_SEC + 1])  # what depends on p only
        t = 0.0 if e0 == e1 else min(0.0, ev_time[e0])  # the system starts from x0 at time 0
        h = 0.0
        ok = True
        for e in range(e0, e1):
            te = ev_time[e]
            if te > t:
                if stiff:
                    h = _integrate_rosenbrock(X, t, te, h, u, running, sens, rtol, atol, err_cols, max_steps,
                                              steps, ops, regs, tape, tout, rc, cmap, Gd[i], K, Xs, Xn, err, Jd,
                                              Mlu, piv)
                else:
                    h = _integrate(X, t, te, h, u, running, sens, rtol, atol, err_cols, max_steps, steps,
                                   A, E, ops, regs, tape, tout, rc, cmap, Gd[i], K, Xs, Xn, err, Jd)
                if h < 0.0:
                    ok = False
                    break
                t = te
            kind = ev_kind[e]
            d = ev_index[e]
            if kind == RESET:  # amounts back to x0 (sensitivity ∂x/∂x0 = I), infusions stopped
                _restart(X, x0[i], P, sens, running, u, cmap)
                h = 0.0
            elif kind == BOLUS or kind == LATE:
                for k in range(n):
                    X[k, 0] += F[d, k]
                    if sens:
                        for r in range(d, d + 1) if identity else range(R):
                            col = cmap[P + n + r * n + k]
                            if col > 0:
                                X[k, col] += 1.0 if identity else Gd[i, d, r]
                h = 0.0  # a jump: the old step size means nothing for the new profile
            elif kind == INF_ON or kind == INF_OFF:
                running[d] = kind == INF_ON
                u[:] = 0.0  # recomputed, not updated, so switching off leaves no round-off
                for dd in range(D):
                    if running[dd]:
                        for k in range(n):
                            u[k] += F[dd, k]
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
                    for c in range(nc):  # untracked columns stay 0
                        J[m, c] = 0.0
                    for q in range(xa, xb):
                        if rc[q, 0] == o:
                            exprvm.run_program(code, arg, consts, starts, q, q + 1, z, gvals, stack)
                            v = gvals[0]
                            for c in range(K_active):
                                J[m, cols[c]] += v * X[rc[q, 1], 1 + c]
                    for q in range(pa, pb):
                        if rc[q, 0] == o and tracked[rc[q, 1]]:
                            exprvm.run_program(code, arg, consts, starts, q, q + 1, z, gvals, stack)
                            J[m, rc[q, 1]] += gvals[0]
        counts[i, 0] = steps[0]
        counts[i, 1] = steps[1]
        if not ok:
            counts[i, 0] = -1


# The kernel as a native entry point (itpk.native): linked into every graph function instead,
# LLVM optimised it again whenever a model or dataset changed the graph (measured on the virus
# fit: 20 s of a 22 s nutpie compile for a new dataset; 7-9 s when the graph was cached).
# Block: 4 slots per array (address, then up to 3 sizes) in _forward_core's argument order,
# then the completion flag.
_ODE_ARRAYS = 24
_ODE_SLOTS = 4 * _ODE_ARRAYS + 1
_F64, _I64 = as_pointer(numba.types.float64), as_pointer(numba.types.int64)


@_njit_inline
def _f1(a, k):
    return numba.carray(_F64(a[4 * k]), (a[4 * k + 1],))


@_njit_inline
def _f2(a, k):
    return numba.carray(_F64(a[4 * k]), (a[4 * k + 1], a[4 * k + 2]))


@_njit_inline
def _f3(a, k):
    return numba.carray(_F64(a[4 * k]), (a[4 * k + 1], a[4 * k + 2], a[4 * k + 3]))


@_njit_inline
def _i1(a, k):
    return numba.carray(_I64(a[4 * k]), (a[4 * k + 1],))


@_njit_inline
def _i2(a, k):
    return numba.carray(_I64(a[4 * k]), (a[4 * k + 1], a[4 * k + 2]))


def _forward_native(block):
    a = numba.carray(_I64(block), (_ODE_SLOTS,))
    _forward_core(_f2(a, 0), _f2(a, 1), _f3(a, 2), _i1(a, 3), _i1(a, 4), _f3(a, 5), _i1(a, 6), _f1(a, 7), _i1(a, 8),
                  _i1(a, 9), _i1(a, 10), _i1(a, 11), _f1(a, 12), _i1(a, 13), _i1(a, 14), _i2(a, 15), _i2(a, 16),
                  _f1(a, 17), _i2(a, 18), _i1(a, 19), _f1(a, 20), _f1(a, 21), _f2(a, 22), _i2(a, 23))
    a[-1] = 1


_NATIVE_FORWARD = NativeKernel(_forward_native, f"itpk_odeop_forward_{_CACHE_VERSION:x}")
_call_forward = _NATIVE_FORWARD.call


@_njit
def _slot(block, k, arr):
    """Address and sizes of a C-contiguous array into slots 4k..4k+3."""
    block[4 * k] = arr.ctypes.data
    for d in range(3):
        block[4 * k + 1 + d] = arr.shape[d] if d < arr.ndim else 1


@_njit
def _forward(p: np.ndarray, x0: np.ndarray, Fr: np.ndarray, obs_subject: np.ndarray, obs_output: np.ndarray,
             Gd: np.ndarray, ev_start: np.ndarray, ev_time: np.ndarray, ev_kind: np.ndarray, ev_index: np.ndarray,
             code: np.ndarray, arg: np.ndarray, consts: np.ndarray, starts: np.ndarray,
             groups: np.ndarray, rc: np.ndarray, ops: np.ndarray, tape_consts: np.ndarray,
             tout: np.ndarray, tape: np.ndarray, settings: np.ndarray,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y (M,), J = ∂y/∂(p, x0, Fr) (M, P + n + R·n, or 0 columns) and step counts (N, 2).

    Checks the arrays, then runs :func:`_forward_core` through its native entry point.
    """
    N, n = x0.shape
    P = p.shape[1]
    D = Gd.shape[1]
    R = D if Gd.shape[2] == 0 else Gd.shape[2]
    M = obs_output.shape[0]
    if p.shape[0] != N or Fr.shape[0] != N or Fr.shape[2] != n or Gd.shape[0] != N or Fr.shape[1] != R:
        raise ValueError("ode_predict: p, x0, Fr and Gd disagree on N, n or R")
    if ev_start.shape[0] != N + 1:
        raise ValueError("ode_predict: the design has a different number of subjects")
    if settings.shape[0] < 4:
        raise ValueError("ode_predict: settings needs rtol, atol, max_steps and the sensitivity flag")
    nc = P + n + R * n if settings[3] != 0.0 else 0
    if nc and settings.shape[0] > 6 and settings.shape[0] != 6 + nc:
        raise ValueError("ode_predict: the sensitivity mask in settings has the wrong length")
    c = np.ascontiguousarray
    p, x0, Fr, Gd, rc, ops, tout = c(p), c(x0), c(Fr), c(Gd), c(rc), c(ops), c(tout)
    obs_subject, obs_output, ev_start, ev_time, ev_kind, ev_index = (
        c(obs_subject), c(obs_output), c(ev_start), c(ev_time), c(ev_kind), c(ev_index))
    code, arg, consts, starts, groups, tape_consts, tape, settings = (
        c(code), c(arg), c(consts), c(starts), c(groups), c(tape_consts), c(tape), c(settings))
    y = np.empty(M)
    J = np.empty((M, nc))
    counts = np.zeros((N, 2), dtype=np.int64)
    block = np.empty(_ODE_SLOTS, dtype=np.int64)
    _slot(block, 0, p)
    _slot(block, 1, x0)
    _slot(block, 2, Fr)
    _slot(block, 3, obs_subject)
    _slot(block, 4, obs_output)
    _slot(block, 5, Gd)
    _slot(block, 6, ev_start)
    _slot(block, 7, ev_time)
    _slot(block, 8, ev_kind)
    _slot(block, 9, ev_index)
    _slot(block, 10, code)
    _slot(block, 11, arg)
    _slot(block, 12, consts)
    _slot(block, 13, starts)
    _slot(block, 14, groups)
    _slot(block, 15, rc)
    _slot(block, 16, ops)
    _slot(block, 17, tape_consts)
    _slot(block, 18, tout)
    _slot(block, 19, tape)
    _slot(block, 20, settings)
    _slot(block, 21, y)
    _slot(block, 22, J)
    _slot(block, 23, counts)
    block[-1] = 0
    _call_forward(block.ctypes.data)
    keep_alive((p, x0, Fr, Gd, obs_subject, obs_output, ev_start, ev_time, ev_kind, ev_index, code, arg, consts, starts,
            groups, rc, ops, tape_consts, tout, tape, settings))
    if block[-1] != 1:
        y[:] = np.nan
        J[:, :] = np.nan
    return y, J, counts


# --------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------


class OdePredict(Op):
    """(y, J, steps) from p (N, P), x0 (N, n), Fr (N, R, n) and constant design/program arrays.

    The doses are F = Gd @ Fr (Gd (N, D, R), the first constant after the
    observations' subjects and outputs; see :func:`_forward`).

    The solver ("dp5" or "rosenbrock") and the tracked sensitivity columns
    are part of the last constant input (the kernel's settings), so one Op
    and one compiled kernel serve both. Only y is differentiable (through J, which the forward pass computes with
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
        _NATIVE_FORWARD.register()
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
        n, R = x0.shape[1], F.shape[1]
        G = pt.zeros((N, J.shape[1]), dtype="float64")
        G = pt.inc_subtensor(G[obs_subject], ybar[:, None] * J)  # duplicates accumulate
        return [G[:, :P], G[:, P : P + n], G[:, P + n :].reshape((N, R, n)), *nothing]


@register_funcify_default_op_cache_key(OdePredict)
def _numba_ode_predict(op: OdePredict, node: Apply | None = None, **kwargs: Any) -> tuple[Any, int]:
    # Same kernel as perform; every model-specific array is an input, so one compiled kernel serves all models.
    _NATIVE_FORWARD.register()
    return _forward, _CACHE_VERSION


def _has_free_input(v: Any, memo: dict[Any, bool]) -> bool:
    """Whether v depends on any graph input that is not a constant (a random variable, shared variable…)."""
    if v in memo:
        return memo[v]
    if v.owner is None:
        out = not isinstance(v, Constant)
    else:
        out = any(_has_free_input(i, memo) for i in v.owner.inputs)
    memo[v] = out
    return out


def _free_columns(v: Any, size: int, memo: dict[Any, bool]) -> np.ndarray:
    """(size,) bool: which slices along v's last axis may depend on a non-constant input.

    Follows the few ops that :meth:`OdeSystem.stack_inputs`, :func:`initial_amounts`
    and a model's dose vectors are built from (stack/join, expand_dims,
    elementwise ops, indexing of leading axes, alloc, products with a
    constant matrix, a reshape that splits the last axis); anything else
    counts as free in every column, so the answer errs towards tracking.
    """
    from pytensor.tensor.basic import Alloc, Join
    from pytensor.tensor.blockwise import Blockwise
    from pytensor.tensor.elemwise import DimShuffle, Elemwise
    from pytensor.tensor.math import Dot
    from pytensor.tensor.shape import Reshape
    from pytensor.tensor.subtensor import AdvancedSubtensor, Subtensor
    from pytensor.tensor.variable import TensorVariable

    everywhere = np.full(size, _has_free_input(v, memo))
    node = v.owner
    if node is None or not everywhere.any():
        return everywhere
    op, ndim = node.op, v.type.ndim
    if isinstance(op, Join):
        if hasattr(op, "axis"):  # pytensor >= 3: the axis is a property of the op
            axis, pieces = op.axis, node.inputs
        elif isinstance(node.inputs[0], Constant):
            axis, pieces = int(node.inputs[0].data), node.inputs[1:]
        else:
            return everywhere
        if axis % ndim != ndim - 1:  # joined along a leading axis: a column is free if free in any piece
            return np.any([_free_columns(x, size, memo) for x in pieces], axis=0)
        widths = [x.type.shape[-1] for x in pieces]
        if any(w is None for w in widths) or sum(widths) != size:
            return everywhere
        return np.concatenate([_free_columns(x, w, memo) for x, w in zip(pieces, widths, strict=True)])
    if isinstance(op, DimShuffle):
        order = op.new_order
        if order and order[-1] == node.inputs[0].type.ndim - 1:  # last axis stays last
            return _free_columns(node.inputs[0], size, memo)
        if order and order[-1] == "x":  # a new length-1 last axis
            return np.full(size, _has_free_input(node.inputs[0], memo))
        return everywhere
    if isinstance(op, (Elemwise, Alloc)):
        args = node.inputs if isinstance(op, Elemwise) else node.inputs[:1]
        out = np.zeros(size, dtype=bool)
        for x in args:
            if x.type.ndim == 0 or x.type.shape[-1] == 1:  # broadcast along the last axis
                out |= _has_free_input(x, memo)
            elif x.type.ndim == ndim or isinstance(op, Alloc):
                out |= _free_columns(x, size, memo)
            else:
                return everywhere
        return out
    if isinstance(op, Dot) or isinstance(op, Blockwise) and isinstance(op.core_op, Dot):
        # (…, i, k) @ (…, k, j): column j may be free if B's column j is, or if A is free and B[…, :, j] ≠ 0
        a, b = node.inputs
        if a.type.ndim < 2 or b.type.ndim < 2 or b.type.shape[-1] != size:
            return everywhere
        out = _free_columns(b, size, memo)
        if _has_free_input(a, memo):
            if isinstance(b, Constant):
                out = out | np.any(np.asarray(b.data).reshape(-1, size) != 0, axis=0)
            else:
                return everywhere
        return out
    if isinstance(op, Reshape):
        # (…, L) → (…, L/size, size) and the like: the leading axes stay, the last one is split
        source, shape = node.inputs
        if not isinstance(shape, Constant):
            return everywhere
        have, want = source.type.shape, tuple(int(x) for x in np.asarray(shape.data))
        lead = len(have) - 1
        if None in have or have[:lead] != want[:lead] or math.prod(want[lead:]) != have[-1] or want[-1] != size:
            return everywhere
        return np.any(_free_columns(source, have[-1], memo).reshape(-1, size), axis=0)
    if isinstance(op, (Subtensor, AdvancedSubtensor)):
        source, index_vars = node.inputs[0], node.inputs[1:]
        if isinstance(op, Subtensor):
            consumed = len(op.idx_list)
        elif all(isinstance(x, TensorVariable) for x in index_vars):  # integer arrays: one axis each, bool: x.ndim
            consumed = sum(x.type.ndim if x.type.dtype == "bool" else 1 for x in index_vars)
        else:  # slices or newaxis among advanced indices: not followed
            return everywhere
        if consumed < source.type.ndim:  # leading axes only: the last axis passes through
            return _free_columns(source, size, memo)
        return everywhere
    return everywhere


def dose_factors(F: Any, N: int, D: int, n: int) -> tuple[np.ndarray, Any]:
    """(Gd (N, D, R) constant, Fr (N, R, n)) with F = Gd @ Fr; Gd (N, D, 0) (the identity) and Fr = F otherwise.

    A model's dose vectors are the dose amounts (constant) times the routes'
    fractions (:func:`itpk.inference._dose_parts`: ``matmul(G, fractions)``):
    the Op then integrates sensitivities to the R·n fractions, not to the D·n
    dose entries (the virus fit: 2 columns instead of 8).
    """
    from pytensor.tensor.blockwise import Blockwise
    from pytensor.tensor.math import Dot

    node = F.owner
    if node is not None and isinstance(node.op, Blockwise) and isinstance(node.op.core_op, Dot):
        a, b = node.inputs
        if isinstance(a, Constant) and a.type.ndim == 3 and b.type.ndim == 3:
            G = np.asarray(a.data, dtype=np.float64)
            R = G.shape[2]
            if G.shape[:2] in ((N, D), (1, D)) and b.type.shape[1] in (R, None) and b.type.shape[2] in (n, None):
                Fr = pt.broadcast_to(b.astype("float64"), (N, R, n))
                return np.ascontiguousarray(np.broadcast_to(G, (N, D, R))), Fr
    return np.zeros((N, D, 0)), F


def tracked_columns(p: Any, x0: Any, F: Any, P: int, n: int, D: int) -> np.ndarray:
    """(P + n + D·n,) bool: the θ = (p, x0, F) entries whose sensitivities are worth integrating.

    An entry built from constants only (a fixed parameter, a covariate, an
    initial amount or a dose fraction that no random variable reaches) can
    have no gradient with respect to the model's free variables; its
    sensitivity column is skipped. Caveat: ``pytensor.grad`` with respect to
    such an intermediate expression itself then gets 0 for it.
    """
    memo: dict[Any, bool] = {}
    x0_cols = _free_columns(x0, n, memo)
    F_cols = _free_columns(F, n, memo)  # per state k, over every subject and dose
    F_doses = np.ones(D, dtype=bool)
    return np.concatenate([_free_columns(p, P, memo), x0_cols, (F_doses[:, None] & F_cols[None, :]).ravel()])


def ode_predict(
    system: OdeSystem,
    p: Any,
    x0: Any,
    F: Any,
    design: Design,
    *,
    rtol: float | None = None,
    atol: float = DEFAULT_ATOL,
    max_steps: int = DEFAULT_MAX_STEPS,
    gradient: bool = True,
    sens_error: bool = False,
    return_steps: bool = False,
    method: str | None = None,
    fit: bool = False,
    late: np.ndarray | None = None,
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
        Local error tolerances of the states (atol in amount units). rtol
        defaults to the method's own (:data:`DEFAULT_RTOL` for "dp5",
        :data:`DEFAULT_RTOL_STIFF` for "rosenbrock"; with ``fit``,
        :data:`FIT_RTOL_STIFF` for "rosenbrock").
    max_steps
        Attempted steps per subject before giving up (its remaining
        predictions are then NaN).
    gradient
        Integrate forward sensitivities (needed for gradients; ~(1 + K)× the
        work for the K of the P + n + D·n entries of θ that
        :func:`tracked_columns` keeps; the others' gradients are 0).
    sens_error
        Include the sensitivities in the error control (slower, more accurate gradients).
    return_steps
        Also return the step counts (N, 2): attempted, rejected (−1: failed).
    method
        "dp5" (explicit Dormand–Prince 5(4)), "rosenbrock" (linearly implicit
        ROS34PW2, for stiff systems) or "auto" (see :func:`choose_method`);
        None takes ``system.method``.
    fit
        The predictions feed a fit's log-density: the stiff method's default
        rtol is the looser :data:`FIT_RTOL_STIFF` (an explicit ``rtol`` wins).
    late
        (N, D) bool: bolus doses applied after the observations at their time
        (covariate changes into :meth:`OdeSystem.from_spec`'s covariate
        states, NOCB); None: none.

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
    method = system.method if method is None else method
    if method not in METHODS:
        raise FitError(f"ode_predict: method {method!r} is unknown; methods: {', '.join(METHODS)}")
    chosen = choose_method(system, design_horizon(design)) if method == "auto" else method
    if rtol is None:
        stiff_rtol = FIT_RTOL_STIFF if fit else DEFAULT_RTOL_STIFF
        rtol = stiff_rtol if chosen == "rosenbrock" else DEFAULT_RTOL
    if not (rtol > 0 and atol > 0 and max_steps > 0):
        raise FitError(f"ode_predict: rtol, atol and max_steps must be > 0, found {rtol}, {atol}, {max_steps}")
    if late is not None:
        late = np.asarray(late, dtype=bool)
        if late.shape != (N, D) or np.any(late & design.dose_valid & (design.dose_duration != 0)):
            raise FitError(f"ode_predict: late must be (N, D) = {(N, D)} and mark boluses only, found shape {late.shape}")
    events = EventTable.from_design(design, late)
    prog = system.program
    Gd, Fr = dose_factors(F, N, D, n)
    R = Gd.shape[2] or D
    code = ROSENBROCK if chosen == "rosenbrock" else DP5
    settings = [rtol, atol, float(max_steps), float(gradient), float(sens_error), float(code)]
    inputs = None  # the inputs whose ∂f/∂p goes on the tape
    if gradient:
        tracked = tracked_columns(p, x0, Fr, P, n, R)
        settings += list(tracked.astype(float))
        inputs = tracked[:P]
    settings = np.array(settings)
    constants = [
        design.obs_subject, design.obs_output, Gd, events.start, events.time, events.kind, events.index,
        prog.code, prog.arg, prog.consts, prog.starts, system.groups, system.rc, *_tape_arrays(system, inputs), settings,
    ]
    y, _, steps = OdePredict()(p, x0, Fr, *(pt.constant(np.asarray(c)) for c in constants))
    return (y, steps) if return_steps else y
