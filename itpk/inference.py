"""Hierarchical Bayesian models of dosed compartment systems (PyMC), and ``fit``.

``build_model`` turns a model file and a dataset into a ``pm.Model`` whose
variable names are the model file's names:

- typical values ``CL``, ``V``… from the file's priors (log-normal priors are
  sampled on the log scale as ``log_CL``; fractions on the logit scale);
- between-subject variability for parameters marked ``iiv``: ``omega_CL``
  (standard deviation of the log-normal η, prior HalfNormal(1)), non-centred
  ``z_CL`` ~ N(0, 1) per subject, individual ``CL_i = CL·exp(omega_CL·z_CL)``;
- covariates and derived quantities exactly as the file writes them;
- predictions of linear models exactly: 1–2 compartment models (bolus doses; infusions into one
  compartment) by the elementwise closed forms of :mod:`itpk.closedform`, built at each
  (observation, dose) pair, the others by the eigen Op of :mod:`itpk.linop`; nonlinear models (and
  models with initial amounts) by the sensitivity Op of :mod:`itpk.odeop`;
- one residual error model per output (additive, proportional, combined, log)
  with the M3 likelihood for values below the limit of quantification.
"""

from __future__ import annotations

import math
import threading
import warnings as python_warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from itpk.covdoses import CovariateDoses, changing_inputs, covariate_doses
from itpk.dataset import DOSE_EVIDS, Dataset, check_against, listed_dv
from itpk.dosecuts import cut_doses
from itpk.errors import FitError, problems_error
from itpk.expr import pytensor_backend
from itpk.interrupts import checkpoint
from itpk.population import MAX_SEED
from itpk.residuals import location_scale, observed_outputs, pointwise, sigma_names
from itpk.spec import ELIMINATION, ERROR_MODELS, ModelSpec, Parameter
from itpk.subjects import ExpandedDoses, Subject, expand_doses, last_reset, subjects

CENSORING_METHOD = "M3 (Beal 2001): censored values contribute P(value < LLOQ) to the likelihood"
OMEGA_PRIOR_SIGMA = 1.0  # HalfNormal on the SD of log-normal IIV: CVs up to ~130% are plausible a priori


@dataclass(frozen=True)
class FitData:
    """The static side of a fit: subjects, doses, observations and which parameters are estimated."""

    spec: ModelSpec
    dataset: Dataset
    subjects: list[Subject]
    doses: ExpandedDoses
    observations: pd.DataFrame  # one row per observation: ROW, ID, subject, TIME, output, DV, censored, LLOQ
    outputs: tuple[str, ...]
    errors: Mapping[str, str]
    estimated: tuple[str, ...]
    iiv: tuple[str, ...]
    fixed: Mapping[str, float] = field(default_factory=dict)

    @property
    def coords(self) -> dict[str, Any]:
        return {
            "subject": [s.id for s in self.subjects],
            "observation": self.observations["ROW"].to_numpy(),
        }


def prepare(spec: ModelSpec, dataset: Dataset, *, errors: Mapping[str, str] | None = None) -> FitData:
    """Check that the model can be fitted to the dataset and collect the static arrays."""
    errors = {**{o: spec.outputs[o].error for o in spec.outputs}, **dict(errors or {})}
    bad = {o: e for o, e in errors.items() if o not in spec.outputs or e not in ERROR_MODELS}
    if bad:
        raise FitError(
            f"error model override(s) {bad} invalid; outputs: {', '.join(spec.outputs)}; error models: {', '.join(ERROR_MODELS)}"
        )
    check_against(dataset, spec)
    subject_list = subjects(dataset, spec)
    doses = expand_doses(subject_list)
    obs = _observations(subject_list, dataset)
    if obs.empty:
        raise FitError(f"{dataset.source}: no observations to fit")
    if not dataset.data["EVID"].isin(DOSE_EVIDS).any() and _stays_empty(spec):
        raise FitError(f"{dataset.source}: no dose rows (EVID 1 or 4), and model {spec.name!r} starts empty: every prediction "
                       f"would be 0; add the dosing history")
    outputs = tuple(o for o in spec.outputs if o in set(obs["output"]))
    _check_log_dv(obs, {o: errors[o] for o in outputs})
    relevant = relevant_names(spec, doses, outputs)
    estimated = tuple(n for n, p in spec.parameters.items() if p.prior is not None and not p.fixed and n in relevant)
    fixed = {n: p.value for n, p in spec.parameters.items() if n not in estimated}
    iiv = tuple(n for n in estimated if spec.parameters[n].iiv_cv is not None)
    return FitData(spec, dataset, subject_list, doses, obs, outputs, {o: errors[o] for o in outputs}, estimated, iiv, fixed)


def _stays_empty(spec: ModelSpec) -> bool:
    """Whether the model without doses stays at zero amounts: no initial amounts and no source terms."""
    return not any(c.initial is not None for c in spec.compartments) and not _sources(spec)


def _sources(spec: ModelSpec) -> set[str]:
    """Compartments whose ODE term is not 0 at zero amounts, at the model's own values (a turnover
    model's production, kin - kout·R): they fill without doses. Flows are first order, 0 at 0."""
    from itpk.system import resolve

    env = {**resolve(spec).env, **dict.fromkeys(spec.state_names, 0.0)}
    with np.errstate(all="ignore"):
        return {c for c, e in spec.odes.items() if np.any(np.asarray(e.evaluate(env), dtype=float) != 0.0)}


def _check_log_dv(obs: pd.DataFrame, errors: Mapping[str, str]) -> None:
    """Quantified DV <= 0 under a ``log`` error model: a data problem, named with its rows."""
    problems = []
    for output, kind in errors.items():
        rows = obs[(obs["output"] == output) & ~obs["censored"] & ~(obs["DV"] > 0)] if kind == "log" else obs.iloc[:0]
        if len(rows):
            problems.append(f"{output}: DV <= 0 on rows {listed_dv(rows)} under the log error model, which needs DV > 0; "
                            f"mark them BLQ=1 with their LLOQ, or use --error {output}=additive")
    if problems:
        raise FitError("; ".join(problems))


def relevant_names(spec: ModelSpec, doses: ExpandedDoses, outputs: tuple[str, ...]) -> set[str]:
    """Parameters, covariates and derived names that can change a prediction for these doses and outputs.

    A parameter used only by routes that were never given (e.g. ``E`` without ``ia`` doses) or by
    flows out of compartments that never hold drug (``ka_sc`` without ``sc`` doses) is not informed
    by the data: it is held at its value instead of being sampled from its prior (which also keeps
    NUTS from starting with a zero gradient).
    """
    targets = {t for row in doses.target for t in row if t is not None}
    names: set[str] = set()
    reached: set[str] = {c.name for c in spec.compartments if c.initial is not None} | _sources(spec)
    for c in spec.compartments:
        if c.initial is not None:
            names |= c.initial.names
    for t in targets:
        into = spec.dose_into(t)
        reached.update(into)
        for frac in into.values():
            names |= frac.names
    changed = True
    while changed:  # compartments reachable through flows and ODE terms
        changed = False
        for flow in spec.flows:
            if flow.source in reached and flow.target != ELIMINATION and flow.target not in reached:
                reached.add(flow.target)
                changed = True
        for cmt, expr in spec.odes.items():
            if cmt not in reached and expr.names & reached:
                reached.add(cmt)
                changed = True
    for flow in spec.flows:
        if flow.source in reached:
            names |= flow.rate.names
    for cmt, expr in spec.odes.items():
        if cmt in reached:
            names |= expr.names
    for o in outputs:
        names |= spec.outputs[o].expr.names
    for name in reversed(list(spec.derived)):  # derived quantities bring in what they use
        if name in names:
            names |= spec.derived[name].expr.names
    return names


def _observations(subject_list: list[Subject], dataset: Dataset) -> pd.DataFrame:
    frames = []
    for i, s in enumerate(subject_list):
        o = s.observations
        times = o["TIME"].to_numpy(dtype=float)
        censored = (o["BLQ"].to_numpy() == 1)
        lloq = np.where(censored, o["LLOQ"].fillna(o["DV"]).to_numpy(dtype=float), np.nan)
        frames.append(pd.DataFrame({
            "ROW": o["ROW"].to_numpy(),
            "ID": s.id,
            "subject": i,
            "TIME": times,
            "output": o["CMT"].to_numpy(),
            "DV": o["DV"].to_numpy(dtype=float),
            "censored": censored,
            "LLOQ": lloq,
            "after": last_reset(s, times),
        }))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def build_model(spec: ModelSpec, dataset: Dataset, *, errors: Mapping[str, str] | None = None,
                iiv: str | Mapping[str, str] = "non-centred"):
    """The hierarchical PyMC model of ``spec`` for ``dataset``; returns ``(model, FitData)``.

    ``iiv``: ``non-centred`` (free ``z_X`` ~ N(0, 1) per subject) or ``centred`` (free
    ``log_X_i`` ~ N(log_X, omega_X), ``logit_X_i`` for fractions), for every IIV parameter or per
    parameter (a mapping; parameters it leaves out are non-centred); ``eta_X`` and ``X_i`` are the
    same deterministics either way.

    Raises
    ------
    FitError
        When the model or dataset cannot be fitted (nonlinear models, steady-state doses…).
    """
    import pymc as pm
    import pytensor.tensor as pt

    iiv = _parse_iiv(iiv)
    data = prepare(spec, dataset, errors=errors)
    unknown = sorted(set(iiv) - set(data.iiv)) if isinstance(iiv, Mapping) else []
    if unknown:
        raise FitError(f"--iiv: {', '.join(unknown)} has no estimated IIV; parameters with IIV: {', '.join(data.iiv) or 'none'}")
    N = len(data.subjects)
    backend = pytensor_backend()
    with pm.Model(coords=data.coords) as model:
        env: dict[str, Any] = {}
        for name, p in spec.parameters.items():
            kind = _kind(iiv, name)
            env[name] = _individual(pm, pt, p, data, N, kind) if name in data.estimated else pt.as_tensor_variable(np.full(N, p.value))
        for name in spec.covariates:
            env[name] = pt.as_tensor_variable(np.array([s.covariates[name] for s in data.subjects], dtype=float))
        _derive(pt, spec, env, backend, N)
        pred = pm.Deterministic("IPRED", _predict(pt, spec, data, env, backend), dims="observation")
        _likelihood(pm, pt, data, pred)
    return model, data


def _individual(pm: Any, pt: Any, p: Parameter, data: FitData, N: int, iiv: str = "non-centred") -> Any:
    """Typical value with its prior, and individual values (N,) with log-normal/logit-normal IIV."""
    prior = p.prior
    assert prior is not None  # estimated parameters have priors (prepare)
    args = prior.args
    if prior.dist == "lognormal":
        log_typ = pm.Normal(f"log_{p.name}", mu=math.log(args["median"]), sigma=args["sigma"])
        typical = pm.Deterministic(p.name, pt.exp(log_typ))
        scale, inverse, label = log_typ, pt.exp, "log"
    elif prior.dist == "logitnormal":
        m = args["median"]
        logit_typ = pm.Normal(f"logit_{p.name}", mu=math.log(m / (1 - m)), sigma=args["sigma"])
        typical = pm.Deterministic(p.name, pt.sigmoid(logit_typ))
        scale, inverse, label = logit_typ, pt.sigmoid, "logit"
    else:
        dist = {
            "normal": lambda: pm.Normal(p.name, mu=args["mu"], sigma=args["sigma"]),
            "halfnormal": lambda: pm.HalfNormal(p.name, sigma=args["sigma"]),
            "beta": lambda: pm.Beta(p.name, alpha=args["alpha"], beta=args["beta"]),
            "uniform": lambda: pm.Uniform(p.name, lower=args["lower"], upper=args["upper"]),
        }[prior.dist]
        typical = dist()
        if p.iiv_scale == "logit":  # a fraction or a beta prior (the scale posterior populations use too)
            scale, inverse, label = pt.log(typical) - pt.log1p(-typical), pt.sigmoid, "logit"
        else:
            scale, inverse, label = pt.log(typical), pt.exp, "log"
    if p.name not in data.iiv:
        return typical * pt.ones(N)
    omega = pm.HalfNormal(f"omega_{p.name}", sigma=OMEGA_PRIOR_SIGMA)
    if iiv == "centred":
        # the subject's own value on the log/logit scale: better geometry when the data pin each
        # subject's value down more tightly than omega does (no funnel between z, the typical value
        # and omega)
        individual = pm.Normal(f"{label}_{p.name}_i", mu=scale, sigma=omega, dims="subject")
        pm.Deterministic(f"eta_{p.name}", individual - scale, dims="subject")
        return pm.Deterministic(f"{p.name}_i", inverse(individual), dims="subject")
    z = pm.Normal(f"z_{p.name}", 0.0, 1.0, dims="subject")
    eta = pm.Deterministic(f"eta_{p.name}", omega * z, dims="subject")
    return pm.Deterministic(f"{p.name}_i", inverse(scale + eta), dims="subject")


def _derive(pt: Any, spec: ModelSpec, env: dict[str, Any], backend: Mapping[str, Any], N: int) -> None:
    """Add the derived quantities to ``env`` (in file order: each may use the ones before it), each (N,)."""
    for name, d in spec.derived.items():
        env[name] = pt.as_tensor_variable(d.expr.evaluate(env, backend)) * pt.ones(N)


def _with_values(pt: Any, spec: ModelSpec, env: Mapping[str, Any], backend: Mapping[str, Any], names: tuple[str, ...],
                 values: np.ndarray) -> dict[str, Any]:
    """``env`` with covariates ``names`` set to ``values`` (N, C) and the derived quantities recomputed."""
    out = dict(env)
    for k, name in enumerate(names):
        out[name] = pt.as_tensor_variable(values[:, k])
    _derive(pt, spec, out, backend, values.shape[0])
    return out


def _predict(pt: Any, spec: ModelSpec, data: FitData, env: Mapping[str, Any], backend: Mapping[str, Any]) -> Any:
    from itpk import closedform
    from itpk.linop import Design, linear_predict

    N = len(data.subjects)
    obs = data.observations
    d = data.doses
    outputs = data.outputs
    design = Design(
        dose_time=d.time,
        dose_duration=d.duration,
        dose_valid=d.valid,
        obs_subject=obs["subject"].to_numpy(dtype=np.int64),
        obs_time=obs["TIME"].to_numpy(dtype=float),
        obs_output=np.array([data.outputs.index(o) for o in obs["output"]], dtype=np.int64),
        obs_after=obs["after"].to_numpy(dtype=float),
        dose_ss_period=d.ss_period,
    )
    # linear models follow covariate changes exactly, segment by segment (itpk.segments); the ODE
    # path carries them as states (itpk.covdoses)
    linear = uses_exact_solution(spec)
    segmented = changing_inputs(spec, data.subjects, _linear_expressions(spec)) if linear else ()
    changes = None if linear else covariate_doses(spec, data.subjects)
    exact = linear and not segmented
    if d.has_steady_state and not linear:
        why = "has initial amounts" if spec.is_linear else "is nonlinear"
        raise FitError(f"{data.dataset.source}: steady-state doses (SS=1/2) can be fitted with linear models without initial "
                       f"amounts only; {spec.name} {why} (give the dosing history explicitly with ADDL instead)")
    if segmented:
        return _segmented(pt, spec, data, env, backend, design, segmented)
    if exact and closedform.supports(len(spec.compartments), design):
        return _closed_form(pt, spec, data, env, backend, design)
    G, fractions = _dose_parts(pt, spec, data, env, backend)
    if exact:
        C = pt.stack([_output_row(pt, spec, name, env, backend, N) for name in outputs], axis=1)  # (N, O, n)
        return linear_predict(_rate_matrices(pt, spec, env, backend, N), pt.matmul(G, fractions), C, design, method="eigen")
    from itpk.odeop import OdeSystem, initial_amounts, ode_predict

    x0 = initial_amounts(spec, env, N, backend)
    cuts = cut_doses(spec, data.subjects, d)
    if cuts is not None:  # route fractions or initial amounts that follow covariate changes (itpk.dosecuts)
        design, G, fractions = _follow_cuts(pt, spec, data, env, backend, design, G, cuts)
    if changes is None:
        system = OdeSystem.from_spec(spec, outputs=list(outputs))
        return ode_predict(system, system.stack_inputs(env, N), x0, pt.matmul(G, fractions), design, fit=True)
    # time-varying covariates: extra states that jump at the changes (itpk.covdoses)
    system = OdeSystem.from_spec(spec, outputs=list(outputs), state_covariates=changes.names)
    design, G, fractions, late = _with_changes(pt, design, G, fractions, changes)
    x0 = pt.concatenate([x0, pt.as_tensor_variable(changes.first)], axis=1)
    return ode_predict(system, system.stack_inputs(env, N), x0, pt.matmul(G, fractions), design, fit=True, late=late)


def _linear_expressions(spec: ModelSpec) -> list[Any]:
    """What a linear model's predictions are made of: flow rates, outputs and route fractions."""
    return ([f.rate for f in spec.flows] + [o.expr for o in spec.outputs.values()]
            + [frac for r in spec.routes.values() for frac in r.into.values()])


def _segmented(pt: Any, spec: ModelSpec, data: FitData, env: Mapping[str, Any], backend: Mapping[str, Any], design: Any,
               names: tuple[str, ...]) -> Any:
    """Exact predictions of a linear model through the subjects' covariate changes (:mod:`itpk.segments`)."""
    from itpk.segments import plan_segments, segmented_predict

    N = len(data.subjects)
    G, _ = _dose_parts(pt, spec, data, env, backend)
    plan = plan_segments(data.subjects, data.doses, design, G, names, len(spec.compartments), len(data.outputs))
    K, fractions, C = [], [], []
    for segment in plan.segments:
        env_j = _with_values(pt, spec, env, backend, names, segment.values)
        K.append(_rate_matrices(pt, spec, env_j, backend, N))
        fractions.append(_dose_parts(pt, spec, data, env_j, backend)[1])
        C.append(pt.stack([_output_row(pt, spec, name, env_j, backend, N) for name in data.outputs], axis=1))
    return segmented_predict(pt, plan, K, fractions, C)


def _follow_cuts(pt: Any, spec: ModelSpec, data: FitData, env: Mapping[str, Any], backend: Mapping[str, Any], design: Any,
                 G: np.ndarray, cuts: Any) -> tuple[Any, np.ndarray, Any]:
    """Design, G (N, P + Q, U) and fractions (N, U, n) of the cut doses.

    Of the (R + 1)·S candidate columns, target r in segment k is r·S + k, its fractions evaluated
    with segment k's covariates, and R·S + k holds x0(segment k) − x0(first values), the bolus that
    follows a reset there; the U columns kept are those some dose uses.
    """
    from dataclasses import replace

    from itpk.odeop import initial_amounts

    N, _, R = G.shape
    S, n = cuts.values.shape[0], len(spec.compartments)
    fractions, x0 = [], []
    for k in range(S):
        env_k = _with_values(pt, spec, env, backend, cuts.names, cuts.values[k])
        fractions.append(_dose_parts(pt, spec, data, env_k, backend)[1])
        x0.append(initial_amounts(spec, env_k, N, backend))
    by_target = pt.stack(fractions, axis=2).reshape((N, R * S, n))  # column r·S + k
    restore = pt.stack([x - x0[0] for x in x0], axis=1)  # (N, S, n)
    P, Q = cuts.time.shape[1], cuts.restore_time.shape[1]
    G_cut = np.zeros((N, P + Q, (R + 1) * S))
    for i, p in zip(*np.nonzero(cuts.valid), strict=True):
        G_cut[i, p, np.arange(R) * S + cuts.segment[i, p]] = G[i, cuts.column[i, p]]
    for i, q in zip(*np.nonzero(cuts.restore_valid), strict=True):
        G_cut[i, P + q, R * S + cuts.restore_segment[i, q]] = 1.0
    design = replace(
        design,
        dose_time=np.concatenate([cuts.time, cuts.restore_time], axis=1),
        dose_duration=np.concatenate([cuts.duration, np.zeros((N, Q))], axis=1),
        dose_valid=np.concatenate([cuts.valid, cuts.restore_valid], axis=1),
        dose_ss_period=np.zeros((N, P + Q)),
    )
    # only the (target, segment) pairs some dose uses: the ODE Op integrates sensitivities for
    # every fraction row that reaches a parameter (unused ones cost 2-5x per gradient)
    used = np.flatnonzero(G_cut.any(axis=(0, 1)))
    return design, G_cut[:, :, used], pt.concatenate([by_target, restore], axis=1)[:, used, :]


def _with_changes(pt: Any, design: Any, G: np.ndarray, fractions: Any, changes: CovariateDoses) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """Design, G (N, D + Dc, R + C), fractions (N, R + C, n + C) and the late mask with the covariate boluses appended.

    The covariate targets put their amount into their own state only (an identity block), so
    the ODE Op sees constant fractions there and integrates no sensitivity for them.
    """
    from dataclasses import replace

    N, D, R = G.shape
    Dc, C = changes.amount.shape[1:]
    n = fractions.type.shape[2]
    G_all = np.zeros((N, D + Dc, R + C))
    G_all[:, :D, :R] = G
    G_all[:, D:, R:] = changes.amount
    identity = np.broadcast_to(np.concatenate([np.zeros((C, n)), np.eye(C)], axis=1), (N, C, n + C))
    fractions = pt.concatenate([pt.concatenate([fractions, pt.zeros((N, R, C))], axis=2), pt.as_tensor_variable(identity)], axis=1)
    design = replace(
        design,
        dose_time=np.concatenate([design.dose_time, changes.time], axis=1),
        dose_duration=np.concatenate([design.dose_duration, np.zeros((N, Dc))], axis=1),
        dose_valid=np.concatenate([design.dose_valid, changes.valid], axis=1),
        dose_ss_period=np.concatenate([design.dose_ss_period, np.zeros((N, Dc))], axis=1),
    )
    late = np.concatenate([np.zeros((N, D), dtype=bool), changes.late & changes.valid], axis=1)
    return design, G_all, fractions, late


def _closed_form(pt: Any, spec: ModelSpec, data: FitData, env: Mapping[str, Any], backend: Mapping[str, Any],
                 design: Any) -> Any:
    """Predictions of a 1–2 compartment model by :func:`itpk.closedform.pair_predict`.

    The individual parameters are taken at each (observation, dose) pair and K, f and c are
    built from them there, so rates, doses, outputs and the closed form are one elementwise
    loop (and one for the gradient): gathering entries of K, F and C instead cost four times
    as much per gradient on Theoph (18 µs against 4.5 µs).
    """
    from itpk.closedform import is_zero, pair_predict, pair_subjects

    n = len(spec.compartments)
    pairs = design.pairs
    subject = pair_subjects(design)
    at_pairs = {name: value[subject] if getattr(value, "ndim", 0) == 1 else value for name, value in env.items()}
    K = _entries(_rate_terms(spec, at_pairs, backend), n * n)
    targets, G, fraction_terms = _dose_terms(spec, data, at_pairs, backend)
    fractions = _entries(fraction_terms, len(targets) * n)
    G_pairs = G[subject, pairs["dose"]]  # (P, R): the pair's dose amount (or rate) per target
    # entries no term reaches stay the number 0, which pair_predict leaves out of the graph
    # (depot -> central: c·f = 0, so α drops out; 0.3 s of compile and 1.5 µs per Theoph
    # gradient went to the general form, measured against the textbook closed form)
    F = [sum(G_pairs[:, r] * fractions[r * n + k] for r in range(len(targets)) if not is_zero(fractions[r * n + k]))
         for k in range(n)]
    C: list[Any] = [0] * n
    for o, name in enumerate(data.outputs):
        mask = pairs["output"] == o
        for k, value in enumerate(_entries(_output_terms(spec, name, at_pairs, backend), n)):
            if not is_zero(value):
                C[k] = C[k] + (value if mask.all() else mask.astype(float) * value)
    return pair_predict([K[i * n:(i + 1) * n] for i in range(n)], F, C, design)


def _entries(terms: list[tuple[Any, dict[int, float]]], size: int) -> list[Any]:
    """Σ_k value_k · E_k entry by entry (0.0 where no term reaches)."""
    out: list[Any] = [0.0] * size
    for value, entries in terms:
        for index, coef in entries.items():
            out[index] = out[index] + coef * value
    return out


def _assemble(pt: Any, terms: list[tuple[Any, dict[int, float]]], shape: tuple[int, ...], N: int) -> Any:
    """Σ_k value_k · E_k as one product with a constant matrix: (N, *shape).

    ``terms`` pairs a value (a tensor of shape (N,) or a number) with the entries of the
    constant E_k it multiplies (flat index -> coefficient). One stack and one dot keep the
    graph (and its gradient) small: entry-by-entry stacks of n² zeros and sums made the
    it_antibody graph several times larger and slower to compile.
    """
    size = math.prod(shape)
    constant = np.zeros(size)
    values, rows = [], []
    for value, entries in terms:
        if isinstance(value, (int, float)):
            for index, coef in entries.items():
                constant[index] += coef * value
            continue
        row = np.zeros(size)
        for index, coef in entries.items():
            row[index] += coef
        values.append(value * pt.ones(N))
        rows.append(row)
    if values:
        flat = pt.dot(pt.stack(values, axis=1), np.stack(rows)) + constant
    else:
        flat = pt.as_tensor_variable(np.tile(constant, (N, 1)))
    return flat.reshape((N, *shape))


def _rate_matrices(pt: Any, spec: ModelSpec, env: Mapping[str, Any], backend: Mapping[str, Any], N: int) -> Any:
    """K (N, n, n) of the first-order flows, built from the individual parameters."""
    n = len(spec.compartments)
    return _assemble(pt, _rate_terms(spec, env, backend), (n, n), N)


def _rate_terms(spec: ModelSpec, env: Mapping[str, Any], backend: Mapping[str, Any]) -> list[tuple[Any, dict[int, float]]]:
    """K as (rate, {flat index of K: ±1}) per flow."""
    n = len(spec.compartments)
    terms = []
    for flow in spec.flows:
        i = spec.index(flow.source)
        entries = {i * n + i: -1.0}
        if flow.target != ELIMINATION:
            entries[spec.index(flow.target) * n + i] = 1.0
        terms.append((flow.rate.evaluate(env, backend), entries))
    return terms


def uses_exact_solution(spec: ModelSpec) -> bool:
    """Linear models starting from zero amounts use the exact Op; everything else the ODE Op."""
    return spec.is_linear and all(c.initial is None for c in spec.compartments)


def _dose_parts(pt: Any, spec: ModelSpec, data: FitData, env: Mapping[str, Any], backend: Mapping[str, Any]) -> tuple[np.ndarray, Any]:
    """G (N, D, R) and fractions (N, R, n): the doses F = G @ fractions (amount or rate times the route's fractions)."""
    N = data.doses.time.shape[0]
    targets, G, terms = _dose_terms(spec, data, env, backend)
    return G, _assemble(pt, terms, (max(len(targets), 1), len(spec.compartments)), N)


def _dose_terms(spec: ModelSpec, data: FitData, env: Mapping[str, Any], backend: Mapping[str, Any]) -> tuple[list[Any], np.ndarray, list[tuple[Any, dict[int, float]]]]:
    """Dose targets, G (N, D, R) and the fraction terms of the (R, n) target-to-compartment matrix.

    G[i, d, r] is the amount (or infusion rate) of dose d of subject i when it goes to target r.
    """
    d = data.doses
    N, D = d.time.shape
    n = len(spec.compartments)
    targets = sorted({t for row in d.target for t in row if t is not None}, key=str)
    terms: list[tuple[Any, dict[int, float]]] = []
    for r, t in enumerate(targets):
        for cmt, frac in spec.dose_into(t).items():
            terms.append((frac.evaluate(env, backend), {r * n + spec.index(cmt): 1.0}))
    G = np.zeros((N, D, max(len(targets), 1)))
    scale = np.where(d.rate > 0, d.rate, d.amount) * d.valid
    for i, row in enumerate(d.target):
        for k, t in enumerate(row):
            if t is not None:
                G[i, k, targets.index(t)] = scale[i, k]
    return targets, G, terms


def _output_row(pt: Any, spec: ModelSpec, name: str, env: Mapping[str, Any], backend: Mapping[str, Any], N: int) -> Any:
    """Coefficients c (N, n) of a linear output: y = c·x (the output at each unit amount)."""
    return _assemble(pt, _output_terms(spec, name, env, backend), (len(spec.state_names),), N)


def _output_terms(spec: ModelSpec, name: str, env: Mapping[str, Any], backend: Mapping[str, Any]) -> list[tuple[Any, dict[int, float]]]:
    expr = spec.outputs[name].expr
    states = spec.state_names
    zero = {**env, **dict.fromkeys(states, 0.0)}
    base = expr.evaluate(zero, backend)
    # a state the output does not name has coefficient 0: no graph for it
    return [(expr.evaluate({**zero, s: 1.0}, backend) - base, {k: 1.0}) for k, s in enumerate(states) if s in expr.names]


def _likelihood(pm: Any, pt: Any, data: FitData, pred: Any) -> None:
    """One censored-normal likelihood per output (:mod:`itpk.residuals` defines the error models)."""
    model = pm.modelcontext(None)
    for obs in observed_outputs(data.observations, data.outputs, data.errors):
        model.add_coords({obs.dim: obs.row_ids})
        sigmas = {}
        for role, name in sigma_names(obs.kind, obs.output).items():
            # additive σ in the DV's unit, scaled by the data; proportional and log σ are unitless
            sigmas[role] = pm.HalfNormal(name, sigma=obs.scale if role == "add" else (0.5 if role == "prop" else 1.0))
        mu, sigma = location_scale(obs.kind, pred[obs.rows], sigmas, pt)
        pm.Censored(obs.name, pm.Normal.dist(mu, sigma), lower=obs.lower, upper=None, observed=obs.observed, dims=obs.dim)


METHODS = ("nuts", "pymc", "map", "laplace", "advi")
# Upper bounds, checked before any work: nutpie allocates a chain's draws up front (--draws 1e10
# aborted in Rust asking for 80 GB) and runs one thread per chain (--chains 100000 started thousands
# of threads and ignored SIGTERM while it did). More chains than this belong in a batch of fits.
MAX_CHAINS = 64
MAX_ITERATIONS = 1_000_000  # per chain, for draws and for tune
PRIOR_DRAWS = 200  # draws in the prior and prior_predictive groups
MASS_MATRICES = ("auto", "diag", "low-rank")
PRECONDITIONS = ("auto", "mode", "none")
IIV_PARAMETRISATIONS = ("non-centred", "centred")


@dataclass(frozen=True)
class FitResult:
    """A finished fit: the ArviZ DataTree, the static data, timings (s) and warnings."""

    tree: Any
    data: FitData
    method: str
    settings: Mapping[str, Any]
    timings: Mapping[str, float]
    warnings: tuple[str, ...]


def argument_problems(
    spec: ModelSpec | None,
    *,
    method: Any = "nuts",
    draws: Any = 1000,
    tune: Any = 1000,
    chains: Any = 4,
    cores: Any = None,
    seed: Any = None,
    errors: Mapping[str, str] | None = None,
    target_accept: Any = 0.9,
    mass_matrix: Any = "auto",
    iiv: Any = "auto",
    precondition: Any = "auto",
) -> list[str]:
    """Every problem of :func:`fit`'s arguments (``itpk fit``'s options, a batch's fit job), one line each.

    Choices must be known, counts whole numbers (``draws``, ``chains``, ``cores`` >= 1; ``tune``,
    ``seed`` >= 0; ``draws`` and ``tune`` at most :data:`MAX_ITERATIONS`, ``chains`` :data:`MAX_CHAINS`),
    ``target_accept`` in [0.5, 1); with ``spec``, ``errors`` must name its outputs and
    known error models, and ``iiv`` mappings its parameters with IIV.
    """
    problems = []
    if method not in METHODS:
        problems.append(f"--method {method!r} is unknown; methods: {', '.join(METHODS)}")
    whole = lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool)
    for label, value, low, high in (("draws", draws, 1, MAX_ITERATIONS), ("tune", tune, 0, MAX_ITERATIONS),
                                    ("chains", chains, 1, MAX_CHAINS)):
        if not whole(value) or value < low:
            problems.append(f"--{label} must be a whole number >= {low}, found {value!r}")
        elif value > high:
            problems.append(f"--{label} must be a whole number from {low} to {high}, found {value!r}")
    if cores is not None and not (whole(cores) and cores >= 1):
        problems.append(f"--cores must be a whole number >= 1, found {cores!r}")
    if seed is not None and not (whole(seed) and 0 <= seed <= MAX_SEED):
        problems.append(f"--seed must be a whole number from 0 to {MAX_SEED}, found {seed!r}")
    if not (isinstance(target_accept, int | float) and not isinstance(target_accept, bool) and 0.5 <= target_accept < 1.0):
        problems.append(f"--target-accept must be in [0.5, 1), found {target_accept!r}")
    if mass_matrix not in MASS_MATRICES:
        problems.append(f"--mass-matrix {mass_matrix!r} is unknown; choices: {', '.join(MASS_MATRICES)}")
    if precondition not in PRECONDITIONS:
        problems.append(f"--precondition {precondition!r} is unknown; choices: {', '.join(PRECONDITIONS)}")
    for output, kind in (errors or {}).items():
        if spec is not None and output not in spec.outputs:
            problems.append(f"--error {output}={kind}: model {spec.name!r} has no output {output!r}; outputs: {', '.join(spec.outputs)}")
        if kind not in ERROR_MODELS:
            problems.append(f"--error {output}={kind}: error model {kind!r} is unknown; error models: {', '.join(ERROR_MODELS)}")
    problems += _iiv_problems(spec, iiv)
    return problems


def _iiv_problems(spec: ModelSpec | None, iiv: Any) -> list[str]:
    """What is wrong with an ``iiv`` argument (``auto``, a parametrisation, ``PARAM=KIND,...`` or a mapping)."""
    choices = f"choices: auto, {', '.join(IIV_PARAMETRISATIONS)}, or PARAM=centred|non-centred[,...]"
    if isinstance(iiv, str) and "=" not in iiv:
        return [] if iiv == "auto" or iiv in IIV_PARAMETRISATIONS else [f"--iiv {iiv!r} is unknown; {choices}"]
    problems, table = [], {}
    if isinstance(iiv, str):
        for item in (i.strip() for i in iiv.split(",") if i.strip()):
            name, sep, kind = item.partition("=")
            if not sep or not name.strip():
                problems.append(f"--iiv {item!r}: expected PARAM=centred|non-centred")
            else:
                table[name.strip()] = kind.strip()
    elif isinstance(iiv, Mapping):
        table = dict(iiv)
    else:
        return [f"--iiv {iiv!r} is unknown; {choices}"]
    problems += [f"--iiv {name}={kind}: {kind!r} is unknown; {choices}" for name, kind in table.items()
                 if kind not in IIV_PARAMETRISATIONS]
    if spec is not None:
        with_iiv = [n for n, p in spec.parameters.items() if p.iiv_cv is not None and p.prior is not None and not p.fixed]
        unknown = [n for n in table if n not in with_iiv]
        if unknown:
            problems.append(f"--iiv: {', '.join(unknown)} has no estimated IIV; parameters with IIV: {', '.join(with_iiv) or 'none'}")
    return problems


def fit(
    spec: ModelSpec,
    dataset: Dataset,
    *,
    method: str = "nuts",
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    cores: int | None = None,
    seed: int | None = None,
    errors: Mapping[str, str] | None = None,
    target_accept: float = 0.9,
    mass_matrix: str = "auto",
    iiv: str | Mapping[str, str] = "auto",
    precondition: str = "auto",
    progress: bool = False,
) -> FitResult:
    """Fit ``spec`` to ``dataset`` and return the posterior with predictive and log-likelihood groups.

    Parameters
    ----------
    method
        ``nuts`` (nutpie, default), ``pymc`` (PyMC's own NUTS), ``map`` (posterior mode of all
        parameters *including the subjects' random effects*: the IIV (omega) estimates are
        distorted, inflated in non-centred coordinates and collapsed toward 0 in centred ones, and
        must not be trusted; the run says so), ``laplace`` (random effects integrated out by the
        Laplace approximation, as NONMEM's LAPLACIAN: population parameters, omegas and sigmas with
        approximate intervals, see :mod:`itpk.laplace`), ``advi`` (mean-field variational, quick look).
    draws, tune, chains, cores
        Sampler settings (NUTS: per chain; ADVI: draws from the approximation). ``cores``: threads
        running the chains; default one per chain (nutpie), which keeps every CPU busy until the
        last chain ends; PyMC's sampler (processes): min(chains, CPUs).
    seed
        Seed of every random step (initialisation, sampling, predictive draws).
    errors
        Residual error model per output overriding the model file (e.g. ``{"plasma": "additive"}``).
    target_accept
        NUTS target acceptance rate; 0.9 (rather than 0.8) removes the occasional divergence of
        hierarchical models with funnels (measured on the it_antibody example: 5 divergences -> 0).
    mass_matrix
        NUTS (nutpie) mass-matrix adaptation: ``diag``; ``low-rank`` (diagonal plus the leading
        directions of the draws' covariance, for strongly correlated posteriors); ``auto``: diag, or
        low-rank for a nonlinear (ODE) model sampled with ``precondition="none"``. Measured on the
        virus example in its own coordinates: 450–500 leapfrog steps per draw with diag (tree depth
        10; posterior correlations up to 0.98), 45–68 with low-rank; whitened (``mode``), diag gave
        min ESS 456 against low-rank's 203 (seed 2, same time). On Theoph diag is the baseline of
        ``benchmarks/bench_fit.py``.
    iiv
        Parametrisation of the between-subject effects: ``non-centred`` (free ``z_X`` ~ N(0, 1),
        ``X_i = X·exp(omega_X·z_X)``: best when the data say little about each subject's value),
        ``centred`` (free ``log_X_i`` ~ N(log_X, omega_X): best when each subject's value is well
        determined by its own data), per parameter as a mapping or ``"beta=centred,k_efflux=non-centred"``
        (parameters left out are non-centred); ``auto`` (default): centred where the median
        subject's Fisher information about its own effect, in units of the model file's IIV,
        exceeds the number of subjects (the non-centred z's would then be correlated by more than
        ½), non-centred elsewhere; see :mod:`itpk.parametrisation`. The choice and the information
        are recorded in ``settings["iiv"]`` and ``settings["iiv_information"]``. ``laplace``
        always uses the non-centred model (it integrates out the ``z_*``). Measured on the virus
        example (4 × (500 + 500), seed 1, low-rank): ``beta=centred`` (what ``auto`` picks there)
        took 24–30 leapfrog steps per draw (warm-up 65–87) against 45–68 (130–179), max R-hat
        1.008 against 1.033, min bulk ESS 293 against 117.
    precondition
        NUTS (nutpie) only: ``mode`` samples in whitened coordinates, a dense metric found before
        sampling (:mod:`itpk.whitening`): the posterior mode by L-BFGS and the inverse Hessian
        there, then, when ``tune`` >= 300, a pilot of 100 warm-up and 50 draws with trees capped at
        depth 5 whose draws' covariance whitens the main run (the pilot counts towards ``tune``);
        ``none`` samples the model's own coordinates; ``auto`` (default): ``mode`` for nonlinear
        (ODE) models, whose gradients are dear and whose posteriors are correlated, ``none`` for
        linear ones, whose whole warm-up costs seconds. Recorded in ``settings["precondition"]``
        (gradients spent by the mode search and the pilot). Measured on the virus example, 4 ×
        (500 + 500), seed 2: 935 s and max R-hat 1.040 unwhitened, 601 s and 1.011 whitened.
    """
    import time

    import pymc as pm

    problems = argument_problems(spec, method=method, draws=draws, tune=tune, chains=chains, cores=cores, seed=seed,
                                 errors=errors, target_accept=target_accept, mass_matrix=mass_matrix, iiv=iiv,
                                 precondition=precondition)
    if problems:  # every one at once, before any work
        raise problems_error(problems, FitError)
    # laplace integrates out the z_* values, so it always uses the non-centred model
    iiv = "non-centred" if method == "laplace" else ("auto" if iiv == "auto" else _parse_iiv(iiv))
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, data = build_model(spec, dataset, errors=errors, iiv="non-centred" if iiv == "auto" else iiv)
    at_start = _at_start(model, data, data.iiv if iiv == "auto" else ())
    _check_initial_point(at_start, data)
    information: dict[str, float] = {}
    if iiv == "auto":
        iiv, information = _auto_iiv(at_start, data)
        if "centred" in iiv.values():
            model, data = build_model(spec, dataset, errors=errors, iiv=iiv)
    timings["build_s"] = time.perf_counter() - start
    warnings: list[str] = []
    preconditioning: dict[str, Any] = {}
    # nutpie runs chains as threads: one per chain even on fewer CPUs, so that no CPU idles while the
    # last chains finish (virus example, 4 chains on 2 CPUs: 1.83 of 2 CPUs busy on average with 2
    # threads); PyMC's sampler forks processes, at most one per CPU
    cores = cores or (chains if method == "nuts" else min(chains, _available_cores()))
    start = time.perf_counter()
    if method == "nuts":
        if precondition == "auto":
            precondition = "none" if uses_exact_solution(spec) else "mode"
        if mass_matrix == "auto":
            # whitened coordinates carry the correlations already: diag on top measured better than
            # low-rank (virus, seed 2: min ESS 456 against 203 in the same time)
            mass_matrix = "diag" if uses_exact_solution(spec) or precondition == "mode" else "low-rank"
        with python_warnings.catch_warnings():
            # an interrupted nutpie returns the few draws it has, and ArviZ warns about their shape;
            # the fit then refuses to write them, so the warning only cluttered the message
            python_warnings.filterwarnings("ignore", message="Found chain dimension to be longer than draw dimension")
            tree = _nuts(model, draws, tune, chains, cores, seed, progress, timings, target_accept, mass_matrix,
                         frozenset(p for p in data.iiv if _kind(iiv, p) == "centred"), precondition, preconditioning)
    elif method == "pymc":
        tree = pm.sample(draws=draws, tune=tune, chains=chains, cores=cores, random_seed=seed, model=model,
                         progressbar=progress, compute_convergence_checks=False, target_accept=target_accept,
                         nuts_sampler="pymc")  # PyMC 6 would otherwise hand over to nutpie
    elif method == "map":
        tree, note = _map(model, seed, progress)
        warnings.append("method map: a single posterior mode over all parameters including the random effects; "
                        "IIV (omega) and shrinkage are not estimates (a joint mode inflates omega in non-centred "
                        "coordinates, 1.5-5x on the bundled examples, and collapses it toward 0 in centred ones: "
                        "use --method laplace or nuts for them) and intervals are not computed" + note)
    elif method == "laplace":
        tree, note = _laplace(model, data, draws, seed, progress)
        warnings.append("method laplace: random effects integrated out by the Laplace approximation (as NONMEM's "
                        "LAPLACIAN, priors included: a posterior mode); "
                        "intervals are Gaussian on the log/logit scale and there are no MCMC diagnostics" + note)
    else:
        approx = pm.fit(n=20000, method="advi", model=model, random_seed=seed, progressbar=progress)
        tree = approx.sample(draws, random_seed=seed)
        warnings.append("method advi: mean-field approximation; intervals are typically too narrow")
    checkpoint()
    timings["sampling_s"] = time.perf_counter() - start - timings.get("compile_s", 0.0) - timings.get("precondition_s", 0.0)
    if method in ("nuts", "pymc") and "sample_stats" in tree.children and "diverging" in tree["sample_stats"]:
        divergent = int(np.asarray(tree["sample_stats"]["diverging"]).sum())
        if divergent:
            # a funnel the sampler's step size cannot resolve (measured on the it_antibody example:
            # 1-3 divergences per 4000 draws at 0.9 over seeds 7, 8, 9; none at 0.95)
            warnings.append(f"{divergent} divergent transitions: the posterior may be biased; rerun with a higher "
                            f"--target-accept (e.g. {min(0.99, round(target_accept + 0.05, 2))}; this fit used {target_accept})")
    start = time.perf_counter()
    tree = _complete(tree, model, data, seed)
    timings["predictive_s"] = time.perf_counter() - start
    settings = {"method": method, "draws": draws, "tune": tune, "chains": chains, "cores": cores, "seed": seed,
                "target_accept": target_accept, "mass_matrix": mass_matrix,
                "iiv": iiv if isinstance(iiv, str) else dict(iiv), "iiv_information": information,
                "precondition": {"method": precondition if method == "nuts" else "none", **preconditioning},
                "estimated": list(data.estimated), "held_fixed": dict(data.fixed), "errors": dict(data.errors), "censoring": CENSORING_METHOD}
    return FitResult(tree, data, method, settings, timings, tuple(warnings))


def _parse_iiv(iiv: str | Mapping[str, str]) -> str | dict[str, str]:
    """``centred``, ``non-centred``, a mapping, or ``PARAM=KIND[,PARAM=KIND...]`` (CLI, batch)."""
    if isinstance(iiv, str) and "=" in iiv:
        items = [item.partition("=") for item in iiv.split(",") if item.strip()]
        iiv = {name.strip(): kind.strip() for name, _, kind in items}
    for kind in iiv.values() if isinstance(iiv, Mapping) else [iiv]:
        if kind not in IIV_PARAMETRISATIONS:
            raise FitError(f"--iiv {kind!r} is unknown; choices: auto, {', '.join(IIV_PARAMETRISATIONS)}, "
                           "or PARAM=centred|non-centred[,...]")
    return dict(iiv) if isinstance(iiv, Mapping) else iiv


def _kind(iiv: str | Mapping[str, str], name: str) -> str:
    return iiv.get(name, "non-centred") if isinstance(iiv, Mapping) else iiv


def _at_start(model: Any, data: FitData, perturbed: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """IPRED and the σ's at the initial point (row 0), then with every subject's ``z_X`` moved by
    ±:data:`itpk.parametrisation.STEP`/ω for each X of ``perturbed`` (rows 1 + 2j, 2 + 2j).

    One vectorised evaluation (:func:`itpk.deterministics.evaluate`): 0.04 s on Theoph against
    0.18 s for PyMC's ``point_logps`` at one point.
    """
    from itpk.deterministics import evaluate
    from itpk.parametrisation import STEP

    point = model.initial_point()
    points = [point]
    for name in perturbed:
        omega = float(np.exp(point[f"omega_{name}_log__"]))  # z = η/ω
        for sign in (1.0, -1.0):
            points.append({**point, f"z_{name}": point[f"z_{name}"] + sign * STEP / omega})
    observed = observed_outputs(data.observations, data.outputs, data.errors)
    wanted = {"IPRED", *(name for obs in observed for name in sigma_names(obs.kind, obs.output).values())}
    outs = [v for v in model.unobserved_value_vars if v.name in wanted]
    values = evaluate(model.value_vars, outs, [np.stack([np.asarray(p[v.name]) for p in points]) for v in model.value_vars])
    return {v.name: value for v, value in zip(outs, values, strict=True)}


def _check_initial_point(at_start: Mapping[str, np.ndarray], data: FitData) -> None:
    """Refuse, with the reason, a model whose log-density is not finite where sampling starts.

    The priors are finite at their support points by construction, so the check is the
    likelihood: each output's pointwise terms at IPRED and the σ's of :func:`_at_start`'s row 0.
    """
    start = {name: value[0] for name, value in at_start.items()}
    bad, hints = [], []
    for obs in observed_outputs(data.observations, data.outputs, data.errors):
        with np.errstate(all="ignore"):
            loglik, _ = pointwise(start, obs, np.random.default_rng(0))  # the predictive draw is not used
        if np.all(np.isfinite(loglik)):
            continue
        bad.append(obs.name)
        if obs.kind in ("proportional", "log"):
            hints.append(
                f"{obs.name}: some observations have a prediction of 0 (e.g. before the first dose) under a "
                f"{obs.kind} error model; use --error {obs.output}=combined (or additive)"
            )
    if bad:
        raise FitError("the log-density is not finite at the initial point (" + ", ".join(bad) + ")"
                       + ("; " + "; ".join(hints) if hints else ""))


def _auto_iiv(at_start: Mapping[str, np.ndarray], data: FitData) -> tuple[dict[str, str], dict[str, float]]:
    """``--iiv auto``: each IIV parameter's parametrisation, and the median subject's information."""
    from itpk.parametrisation import choose, information, omega_of_cv

    observed = observed_outputs(data.observations, data.outputs, data.errors)
    sigmas = [{role: float(at_start[name][0]) for role, name in sigma_names(obs.kind, obs.output).items()} for obs in observed]
    params = data.spec.parameters
    omegas = {name: omega_of_cv(params[name].iiv_cv) for name in data.iiv}  # type: ignore[arg-type]
    info = information(at_start["IPRED"], sigmas, observed, data.observations["subject"].to_numpy(),
                       data.observations["censored"].to_numpy(dtype=bool), omegas, len(data.subjects))
    return choose(info, len(data.subjects)), {name: float(np.median(v)) for name, v in info.items()}


def _available_cores() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _nuts(model: Any, draws: int, tune: int, chains: int, cores: int, seed: int, progress: bool,
          timings: dict[str, float], target_accept: float, mass_matrix: str = "diag",
          centred: frozenset[str] = frozenset(), precondition: str = "none",
          record: dict[str, Any] | None = None) -> Any:
    record = {} if record is None else record  # what preconditioning did, for settings["precondition"]
    import time

    import nutpie

    start = time.perf_counter()
    adaptation = "low_rank" if mass_matrix == "low-rank" else "diag"
    if precondition == "mode":
        compiled, whitening = _whitened(model, timings, start)
        record.update(gradients=whitening.gradients, clipped_curvatures=whitening.clipped,
                      mode_logp=round(whitening.logp, 3), dimension=int(whitening.mean.size))
        settings = {"chains": chains, "cores": cores, "progress_bar": progress, "target_accept": target_accept,
                    "adaptation": adaptation}
        checkpoint()  # each stage returns what it has on Ctrl-C: stop here instead of starting the next
        if tune >= 2 * (PILOT_TUNE + PILOT_DRAWS):
            whitening = _pilot(compiled, whitening, seed, settings, record)
            tune -= PILOT_TUNE + PILOT_DRAWS
            checkpoint()
        tree = nutpie.sample(_with(compiled, whitening), draws=draws, tune=tune, seed=seed, **settings)
        checkpoint()
        return _unwhitened(tree, model, whitening)
    # Chains start at the typical subject (z = 0) with the priors' central values, jittered only in
    # the variance parameters: jittering individual effects or rate constants can start a chain in a
    # flip-flop mode (ka <-> CL/V swapped for some subjects), where it stays (measured on Theoph:
    # one chain of four with R-hat 1.54 on omega_V).
    jitter = {v for v in model.free_RVs if v.name.startswith(("omega_", "sigma_"))}
    # and the typical value of a centred parameter: at its prior median, with every subject's value
    # equal to it, its log-density gradient is exactly 0, which nutpie refuses as an initial point
    typical = {n for p in centred for n in (f"log_{p}", f"logit_{p}", p)}
    jitter |= {v for v in model.free_RVs if v.name in typical}
    # only the free variables: the deterministics are computed after sampling, vectorised over the
    # draws (itpk.deterministics), rather than compiled into nutpie's per-draw "expand" function
    compiled = _compiled(model, jitter)
    timings["compile_s"] = time.perf_counter() - start
    return nutpie.sample(compiled, draws=draws, tune=tune, chains=chains, cores=cores, seed=seed,
                         progress_bar=progress, target_accept=target_accept, adaptation=adaptation)


PILOT_TUNE, PILOT_DRAWS, PILOT_MAXDEPTH = 100, 50, 5  # the pilot of precondition="mode"


def _pilot(compiled: Any, whitening: Any, seed: int, settings: dict[str, Any], record: dict[str, Any]) -> Any:
    """A short run whose draws give the metric of the main run (mean and covariance, dense).

    The mode's Hessian misjudges non-Gaussian directions (virus example: the posterior's variance
    along one whitened direction was 111× the Hessian's, the omega_k_efflux / z_k_efflux block).
    So the chains first run :data:`PILOT_TUNE` warm-up and :data:`PILOT_DRAWS` draws with trees
    capped at depth :data:`PILOT_MAXDEPTH` (≤ 31 leapfrog steps: a chain still moves, and early
    warm-up no longer spends 150–300 steps per draw); the second half of its warm-up and its draws
    (x, unconstrained) give the whitening of the main run, which then starts near a metric fitted
    to the posterior itself. The pilot counts towards ``tune``.
    """
    import nutpie

    from itpk.whitening import WHITENED, from_draws

    tree = nutpie.sample(_with(compiled, whitening), draws=PILOT_DRAWS, tune=PILOT_TUNE,
                         seed=int(np.random.SeedSequence([seed, 7]).generate_state(1)[0]),
                         maxdepth=PILOT_MAXDEPTH, **settings)
    checkpoint()  # a pilot cut short by Ctrl-C has too few draws to whiten with
    u = np.concatenate([tree["warmup_posterior"][WHITENED].values[:, PILOT_TUNE // 2:],
                        tree["posterior"][WHITENED].values], axis=1)
    x = whitening.to_x(u.reshape(-1, u.shape[-1]))
    steps = int(tree["warmup_sample_stats"]["n_steps"].values.sum() + tree["sample_stats"]["n_steps"].values.sum())
    record.update(pilot_tune=PILOT_TUNE, pilot_draws=PILOT_DRAWS, pilot_maxdepth=PILOT_MAXDEPTH, pilot_gradients=steps)
    try:
        return from_draws(x, steps)
    except ValueError:  # non-finite pilot draws: keep the mode's whitening, the main run adapts anyway
        return whitening


def _with(compiled: Any, whitening: Any) -> Any:
    from itpk.whitening import MEAN, ROOT

    return compiled.with_data(**{MEAN: whitening.mean, ROOT: whitening.root})


def _whitened(model: Any, timings: dict[str, float], start: float) -> tuple[Any, Any]:
    """nutpie's model on whitened coordinates, with the whitening found by its own log-density.

    Chains start at the whitening's mean (the mode; after a pilot, its draws' mean) jittered by
    U(-1, 1) per whitened coordinate, i.e. about one posterior standard deviation in every
    direction: dispersed enough for R-hat, local enough not to start in another mode (see the
    jitter note of :func:`_nuts`).
    """
    import time

    from itpk.whitening import find_whitening, initial_x, whitened_model

    whitened = whitened_model(model)
    compiled = _compiled(whitened, set(whitened.free_RVs))
    timings["compile_s"] = time.perf_counter() - start
    begin = time.perf_counter()
    # the compiled pytensor function with its shared data as compiled: m = 0, A = I, so u = x
    whitening = find_whitening(compiled.logp_func, initial_x(model))
    timings["precondition_s"] = time.perf_counter() - begin
    return compiled, whitening


def _unwhitened(tree: Any, model: Any, whitening: Any) -> Any:
    """The sampled tree with the whitened draws replaced by the model's free variables (constrained)
    and deterministics."""
    import xarray as xr

    from itpk.deterministics import posterior_dataset
    from itpk.whitening import WHITENED, unwhiten

    u = tree["posterior"][WHITENED].transpose("chain", "draw", ...).values
    posterior = posterior_dataset(model, unwhiten(u.reshape(-1, u.shape[-1]), whitening, model), chains=u.shape[0])
    kept = {name: tree[name].to_dataset() for name in tree.children if name not in ("posterior", "warmup_posterior")}
    return xr.DataTree.from_dict({"posterior": posterior, **kept})


COMPILED_CACHE_SIZE = 4  # nutpie models kept in memory for the next fits of this process
_compiled_models: list[tuple[tuple[Any, ...], Any, Any]] = []  # (quick key, pm.Model, compiled), newest last
_compiled_lock = threading.Lock()


def _compiled(model: Any, jitter: set[Any]) -> Any:
    """nutpie's compiled model, reused when this process has compiled the same log-density before.

    A second fit of the same model and data (another seed, more draws, a pipeline's replicate)
    then skips pytensor's rewrites and numba's compile (1.9–2.1 s warm on Theoph, 8–9 s cold).
    The same means the same free variables, jittered variables and coords, and the same graph,
    constants included (``equal_computations`` on the log-density, value variables and PyMC's
    shared dimension lengths matched up); so any change to the data, the model file or the fit's
    model options compiles anew. The graph comparison only runs when a candidate exists, so a
    first fit pays nothing for the cache.
    """
    import nutpie

    names = [v.name for v in model.free_RVs]
    key = (tuple(names), frozenset(v.name for v in jitter), repr(model.coords))
    with _compiled_lock:
        candidates = [(other, compiled) for k, other, compiled in reversed(_compiled_models) if k == key]
    for other, compiled in candidates:
        if _same_log_density(model, other):
            return compiled
    compiled = nutpie.compile_pymc_model(model, jitter_rvs=jitter, var_names=names)
    with _compiled_lock:
        _compiled_models.append((key, model, compiled))
        del _compiled_models[:-COMPILED_CACHE_SIZE]
    return compiled


def _same_log_density(model: Any, other: Any) -> bool:
    from pytensor.compile.sharedvalue import SharedVariable
    from pytensor.graph.basic import equal_computations
    from pytensor.graph.traversal import graph_inputs

    logps = [model.logp(), other.logp()]
    # PyMC keeps dimension lengths as shared variables: matched by name, compared by value
    shared = [sorted((v for v in graph_inputs([lp]) if isinstance(v, SharedVariable)), key=lambda v: str(v.name))
              for lp in logps]
    if [v.name for v in shared[0]] != [v.name for v in shared[1]] or not all(
            np.array_equal(a.get_value(), b.get_value()) for a, b in zip(*shared, strict=True)):
        return False
    return bool(equal_computations([logps[0]], [logps[1]], in_xs=[*model.value_vars, *shared[0]],
                                   in_ys=[*other.value_vars, *shared[1]]))


# L-BFGS can report convergence early after a line search through a region where the ODE
# solution blows up (measured on a time-varying-weight fit: stopped after 4 iterations at log p
# 29.7; one restart from there reached the mode, 166.9). So a run that claims convergence is
# restarted from its result until log p stops rising: one cheap extra run when it was right.
# A run that spent PyMC's budget is not restarted (the density may have no maximum); the fit's
# warnings say so.
MAP_RESTARTS = 10


def _map(model: Any, seed: int, progress: bool) -> tuple[Any, str]:
    """The joint posterior mode as a DataTree (one draw), and a note when the optimiser did not converge."""
    import pymc as pm
    import xarray as xr

    def run(initvals: dict[str, Any] | None = None) -> tuple[Any, float, list[str]]:
        # PyMC says "did not converge" with a UserWarning on stderr; the note puts it in run.json
        with python_warnings.catch_warnings(record=True) as caught:
            python_warnings.simplefilter("always")
            tree = pm.find_MAP(model=model, initvals=initvals, random_seed=seed, jitter=False, progressbar=progress,
                               return_inferencedata=True)
        unconverged = [str(w.message) for w in caught if "did not converge" in str(w.message)]
        for w in caught:
            if "did not converge" not in str(w.message):
                python_warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return tree, float(tree["optimizer_result"]["fun"]), unconverged  # -log p (no Jacobian terms) at the result

    tree, loss, unconverged = run()
    for _ in range(MAP_RESTARTS):
        if unconverged or not math.isfinite(loss):
            break
        posterior = tree["posterior"]
        again, new, new_unconverged = run({rv.name: np.asarray(posterior[rv.name])[0, 0] for rv in model.free_RVs})
        if not new < loss - 1e-9 * max(1.0, abs(loss)):
            break
        tree, loss, unconverged = again, new, new_unconverged
    note = f"; the optimiser stopped before converging ({unconverged[0].split(': ', 1)[-1]})" if unconverged else ""
    return xr.DataTree.from_dict({"posterior": tree["posterior"].to_dataset()}), note


def _laplace(model: Any, data: FitData, draws: int, seed: int, progress: bool) -> tuple[Any, str]:
    """Laplace-approximate posterior draws as a DataTree (one chain), and a note when not converged."""
    import xarray as xr

    from itpk.deterministics import posterior_dataset
    from itpk.laplace import laplace

    z_names = [f"z_{p}" for p in data.iiv]
    values, result = laplace(model, z_names, len(data.subjects), draws=draws, seed=seed,
                             progress=(lambda msg: print(msg, flush=True)) if progress else None)
    posterior = posterior_dataset(model, values)
    note = "" if result.converged else f"; the optimiser did not fully converge ({result.message})"
    return xr.DataTree.from_dict({"posterior": posterior}), note


def _complete(tree: Any, model: Any, data: FitData, seed: int) -> Any:
    """Add the deterministics (when the sampler left them out), log_likelihood, posterior_predictive,
    observed_data, prior and prior_predictive groups, ``predictions`` (new subjects, for the VPC:
    :func:`new_subjects`), and for methods without sampler statistics (map, laplace, advi) a
    ``sample_stats`` group with each draw's log density ``lp``.

    All come from the draws in numpy: the deterministics vectorised over draws
    (:mod:`itpk.deterministics`), likelihood and predictive draws from IPRED
    (:func:`itpk.residuals.pointwise`). PyMC's own functions would compile the model again or
    run it draw by draw.
    """
    import xarray as xr

    from itpk.deterministics import add_deterministics, log_density, prior_draws

    tree = add_deterministics(tree, model)
    post = tree["posterior"].to_dataset()
    if "sample_stats" not in tree.children or not tree["sample_stats"].data_vars:
        # map, laplace, advi (PyMC's ADVI leaves the group empty): SPEC §5 lists it for every method
        tree["sample_stats"] = xr.DataTree(xr.Dataset({"lp": (("chain", "draw"), log_density(model, post))},
                                                      coords={"chain": post["chain"], "draw": post["draw"]}))
    if "IPRED" not in post:
        raise FitError("the sampler returned no IPRED draws; cannot compute the log-likelihood")
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the sampler used ``seed``
    loglik, predictive, observed = _pointwise_groups(post, data, rng)
    tree["log_likelihood"] = xr.DataTree(loglik)
    tree["posterior_predictive"] = xr.DataTree(predictive)
    tree["observed_data"] = xr.DataTree(observed)
    tree["constant_data"] = xr.DataTree(constant_data(data))
    prior = prior_draws(model, PRIOR_DRAWS, seed)
    tree["prior"] = xr.DataTree(prior)
    tree["prior_predictive"] = xr.DataTree(_pointwise_groups(prior, data, rng)[1])
    if data.iiv:  # without IIV, new subjects are the fitted ones: posterior_predictive serves the VPC
        tree["predictions"] = xr.DataTree(new_subjects(post, model, data, np.random.default_rng([seed, 2])))
    return tree


NEW_SUBJECT_DRAWS = 200  # replicates of the trial with new subjects (evenly thinned posterior draws)


def new_subjects(post: Any, model: Any, data: FitData, rng: np.random.Generator) -> Any:
    """Replicates of the trial with new subjects: ArviZ's ``predictions`` group, for the VPC.

    At each of :data:`NEW_SUBJECT_DRAWS` evenly thinned posterior draws of the population
    parameters (θ, ω, σ), every subject gets a fresh η ~ N(0, ω²) (the fitted subjects' η are not
    used), keeps its own design (doses, times, covariates), and a residual error is drawn, as a
    VPC simulates (Bergstrand et al. 2011). The ``posterior_predictive`` group, conditioned on each
    subject's own η, cannot show a misspecified IIV. Values on the likelihood's scale, censored at
    the LLOQ like ``posterior_predictive``; one chain.
    """
    import xarray as xr

    from itpk.deterministics import evaluate

    free = {rv.name for rv in model.free_RVs}
    if not all(f"z_{p}" in free for p in data.iiv):  # a centred fit: new η come from the non-centred form
        model, _ = build_model(data.spec, data.dataset, errors=data.errors, iiv="non-centred")
    lead = ("chain", "draw")
    n = post.sizes["chain"] * post.sizes["draw"]
    pick = np.round(np.linspace(0, n - 1, NEW_SUBJECT_DRAWS)).astype(int)  # one draw (map): the same θ throughout
    values = []
    for rv in model.free_RVs:
        if rv.name.startswith("z_") and rv.name[2:] in data.iiv:
            values.append(rng.standard_normal((NEW_SUBJECT_DRAWS, len(data.subjects))))
        else:
            draws = post[rv.name].transpose(*lead, ...).values
            values.append(draws.reshape(n, *draws.shape[2:])[pick])
    (ipred,) = evaluate(model.free_RVs, [model["IPRED"]], values)
    draws = xr.Dataset(
        {"IPRED": (("chain", "draw", "observation"), ipred[None]),
         **{name: (lead, np.asarray(post[name].transpose(*lead).values).reshape(n)[pick][None])
            for name in post.data_vars if str(name).startswith("sigma_")}},
        coords={"chain": [0], "draw": np.arange(NEW_SUBJECT_DRAWS)})
    return _pointwise_groups(draws, data, rng)[1]


def constant_data(data: FitData) -> Any:
    """The design the fit conditioned on, as the ``constant_data`` group (model units).

    Per observation (coordinate ``observation`` = dataset ROW, as IPRED): ``ID``, ``TIME``,
    ``output``, ``censored`` and ``LLOQ``; per subject: each model covariate
    (``covariate_<NAME>``) and ``ARM``; per dose row (``dose_row``): ``dose_ID``, ``dose_TIME``,
    ``dose_AMT``, ``dose_RATE``, ``dose_ROUTE``, ``dose_CMT``, ``dose_II``, ``dose_ADDL``, ``dose_SS``.
    """
    import xarray as xr

    obs = data.observations
    by_obs = {"ID": obs["ID"], "TIME": obs["TIME"], "output": obs["output"].to_numpy(dtype=str), "censored": obs["censored"],
              "LLOQ": obs["LLOQ"]}
    variables = {name: xr.DataArray(np.asarray(values), dims=("observation",)) for name, values in by_obs.items()}
    for name in data.spec.covariates:
        values = [s.covariates[name] for s in data.subjects]
        variables[f"covariate_{name}"] = xr.DataArray(np.asarray(values, dtype=float), dims=("subject",))
    variables["ARM"] = xr.DataArray(np.asarray([s.arm for s in data.subjects], dtype=str), dims=("subject",))
    doses = data.dataset.doses
    for column in ("ID", "TIME", "AMT", "RATE", "ROUTE", "CMT", "II", "ADDL", "SS"):
        if column in doses:
            values = doses[column]
            numeric = pd.api.types.is_numeric_dtype(values)
            array = values.to_numpy(dtype=float) if numeric else values.fillna("").astype(str).to_numpy(dtype=str)
            variables[f"dose_{column}"] = xr.DataArray(array, dims=("dose_row",))
    coords = {**data.coords, "dose_row": doses["ROW"].to_numpy()}
    return xr.Dataset(variables, coords=coords)


def _pointwise_groups(draws: Any, data: FitData, rng: np.random.Generator) -> tuple[Any, Any, Any]:
    """Pointwise log-likelihood, one predictive draw per draw, and the observed values (Datasets)."""
    import xarray as xr

    lead = ("chain", "draw")
    coords = {d: draws[d].values for d in lead}
    loglik, predictive, observed = {}, {}, {}
    for obs in observed_outputs(data.observations, data.outputs, data.errors):
        ll, values = pointwise(draws.transpose(*lead, ...), obs, rng)
        dims = (*lead, obs.dim)
        loglik[obs.name] = xr.DataArray(ll, dims=dims, coords={**coords, obs.dim: obs.row_ids})
        predictive[obs.name] = xr.DataArray(values, dims=dims, coords={**coords, obs.dim: obs.row_ids})
        observed[obs.name] = xr.DataArray(obs.observed, dims=(obs.dim,), coords={obs.dim: obs.row_ids})
    return xr.Dataset(loglik), xr.Dataset(predictive), xr.Dataset(observed)
