"""From a ModelSpec and parameter values to numbers: parameters, K, routes, outputs.

Everything here is vectorised over S parameter sets (subjects or posterior
draws): a value is an array of shape (S,), a rate matrix (S, n, n), amounts
(S, ..., n).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from itpk.errors import ModelSpecError, raise_problems
from itpk.events import Target
from itpk.spec import ELIMINATION, ModelSpec


@dataclass(frozen=True)
class Values:
    """Resolved parameters, covariates and derived quantities, each of shape (S,)."""

    spec: ModelSpec
    env: Mapping[str, np.ndarray]
    size: int

    def __getitem__(self, name: str) -> np.ndarray:
        return self.env[name]

    def evaluate(self, expr: Any) -> np.ndarray:
        """An expression of the model over the parameter sets, (S,) floats (inf and nan where it has no value)."""
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(expr.evaluate(self.env), dtype=float), (self.size,))

    def take(self, index: np.ndarray | slice) -> Values:
        """The parameter sets at ``index`` (for working through a population in chunks)."""
        env = {k: np.asarray(v)[index] for k, v in self.env.items()}
        return Values(self.spec, env, len(next(iter(env.values()))) if env else 0)


def overridable(spec: ModelSpec) -> list[str]:
    """Names a user may set: parameters and covariates."""
    return [*spec.parameters, *spec.covariates]


def unknown_names(spec: ModelSpec, names: Iterable[str]) -> str | None:
    """The message for the ``names`` that are not parameters or covariates of ``spec`` (None if all are)."""
    known = overridable(spec)
    unknown = sorted(set(names) - set(known))
    if not unknown:
        return None
    return f"model {spec.name!r} has no parameter or covariate {', '.join(map(repr, unknown))}; known: {', '.join(known)}"


def resolve(spec: ModelSpec, values: Mapping[str, Any] | None = None) -> Values:
    """Parameters and covariates (defaults overridden by ``values``) plus derived quantities.

    Parameters
    ----------
    spec
        The model.
    values
        Overrides by name: scalars or 1-D arrays of one common length S
        (parameter sets); scalars broadcast.

    Raises
    ------
    ModelSpecError
        For an unknown name (the message lists the known ones), arrays of
        different lengths, or values that are not finite.
    """
    values = dict(values or {})
    problem = unknown_names(spec, values)
    if problem:
        raise ModelSpecError(problem)
    arrays = {k: np.atleast_1d(np.asarray(v, dtype=float)) for k, v in values.items()}
    sizes = {a.shape[0] for a in arrays.values() if a.ndim == 1 and a.shape[0] != 1}
    if len(sizes) > 1 or any(a.ndim != 1 for a in arrays.values()):
        raise ModelSpecError(f"parameter values must be scalars or 1-D arrays of one common length; found lengths {sorted(sizes)}")
    size = sizes.pop() if sizes else 1
    env: dict[str, np.ndarray] = {}
    for name, item in [*spec.parameters.items(), *spec.covariates.items()]:
        raw = arrays.get(name, np.asarray([item.value]))
        if not np.all(np.isfinite(raw)):
            raise ModelSpecError(f"{name}: values must be finite numbers, found {raw[~np.isfinite(raw)][:3].tolist()}")
        env[name] = np.broadcast_to(raw, (size,)).astype(float)
    return Values(spec, _derive(spec, env, size), size)


def with_covariates(values: Values, covariates: Mapping[str, Any]) -> Values:
    """The same parameter sets with some covariates set to new values and derived quantities recomputed.

    Parameters
    ----------
    values
        Resolved values (S sets).
    covariates
        New value of each named covariate (its unit): one for every set, or an array (S,).

    Raises
    ------
    ModelSpecError
        For a name that is not a covariate of the model.
    """
    spec = values.spec
    unknown = sorted(set(covariates) - set(spec.covariates))
    if unknown:
        raise ModelSpecError(f"model {spec.name!r} has no covariate {', '.join(map(repr, unknown))}; "
                             f"covariates: {', '.join(spec.covariates) or 'none'}")
    env = dict(values.env)
    for name, value in covariates.items():
        env[name] = np.array(np.broadcast_to(np.asarray(value, dtype=float), (values.size,)))
    return Values(spec, _derive(spec, env, values.size), values.size)


def _derive(spec: ModelSpec, env: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """``env`` with the derived quantities (re)computed from it, in model-file order, each (size,)."""
    with np.errstate(all="ignore"):
        for name, item in spec.derived.items():
            env[name] = np.broadcast_to(np.asarray(item.expr.evaluate(env), dtype=float), (size,))
    return env


def check_volumes(values: Values, outputs: Sequence[str], *, zero: bool = False) -> None:
    """The volumes behind ``outputs`` finite and > 0 (``zero``: >= 0) in every parameter set.

    A lesion of diameter 0 makes its concentration 0/0. Only the compartments the named outputs
    read are checked: a patient without a second lesion (``DIAM2 = 0``) is fine as long as
    nothing asks for ``lesion2``; ``simulate``, which writes every output, passes ``zero`` and
    notes such outputs (:func:`zero_volumes`).

    Raises
    ------
    ModelSpecError
        Naming each compartment, its volume expression and the inputs behind it, one per line.
    """
    raise_problems(volume_problems(values, outputs, zero=zero), ModelSpecError)


def volume_problems(values: Values, outputs: Sequence[str], *, zero: bool = False) -> list[str]:
    """:func:`check_volumes`' problems, one line per compartment."""
    return [f"compartment {c}: volume {text} = {v:g} with {inputs}; a volume must be {'>= 0' if zero else '> 0'}"
            for c, text, v, inputs in _volumes(values, outputs) if not (np.isfinite(v) and (v >= 0 if zero else v > 0))]


def zero_volumes(values: Values, outputs: Sequence[str]) -> list[str]:
    """The compartments read by ``outputs`` whose volume is 0 in some parameter set (their concentrations are undefined)."""
    return [f"{c} (volume {text} = 0 with {inputs})" for c, text, v, inputs in _volumes(values, outputs) if v == 0]


def _volumes(values: Values, outputs: Sequence[str]) -> list[tuple[str, str, float, str]]:
    """Per compartment read by ``outputs``: name, volume expression, its worst value (non-finite, else the
    smallest) over the parameter sets, and the inputs behind it there."""
    spec, env = values.spec, values.env
    wanted = {name for o in outputs for name in spec.outputs[o].expr.names}
    found = []
    for c in spec.compartments:
        if c.volume is None or c.name not in wanted:
            continue
        volume = values.evaluate(c.volume)
        finite = np.isfinite(volume)
        at = int(np.argmin(finite)) if not finite.all() else int(np.argmin(volume))
        inputs = ", ".join(f"{n}={np.broadcast_to(env[n], (values.size,))[at]:g}" for n in inputs_of(spec, c.volume.names))
        found.append((c.name, c.volume.text, float(volume[at]), inputs))
    return found


def rate_problems(values: Values, rates: Sequence[np.ndarray] | None = None) -> list[str]:
    """First-order flows whose rate is not finite or < 0 in some parameter set (one line); ``rates``:
    the flows' rates when the caller has them already (:func:`rate_matrix`)."""
    spec = values.spec
    rates = [values.evaluate(f.rate) for f in spec.flows] if rates is None else rates
    bad = sorted({f"{f.key} = {f.rate}" for f, r in zip(spec.flows, rates, strict=True)
                  if not (np.all(np.isfinite(r)) and np.all(r >= 0))})
    return [f"model {spec.name!r}: first-order rate(s) {'; '.join(bad)} must be finite and >= 0 for the given parameters"] if bad else []


def inputs_of(spec: ModelSpec, names: Any) -> list[str]:
    """The parameters and covariates behind ``names``, through derived quantities."""
    found: list[str] = []
    for name in sorted(names):
        if name in spec.derived:
            found += [n for n in inputs_of(spec, spec.derived[name].expr.names) if n not in found]
        elif name not in found and (name in spec.parameters or name in spec.covariates):
            found.append(name)
    return found


def rate_matrix(values: Values) -> np.ndarray:
    """Compartment matrix K (S, n, n) of the first-order flows: dx/dt = K x + input."""
    spec = values.spec
    n = len(spec.compartments)
    K = np.zeros((values.size, n, n))
    rates = [values.evaluate(flow.rate) for flow in spec.flows]
    for flow, k in zip(spec.flows, rates, strict=True):
        i = spec.index(flow.source)
        K[:, i, i] -= k
        if flow.target != ELIMINATION:
            K[:, spec.index(flow.target), i] += k
    raise_problems(rate_problems(values, rates), ModelSpecError)  # from the same rates, not evaluated again
    return K


def initial_state(values: Values) -> np.ndarray:
    """Amounts at time 0 and after a reset, (S, n): the compartments' ``initial`` (default 0)."""
    spec = values.spec
    x0 = np.zeros((values.size, len(spec.compartments)))
    for i, c in enumerate(spec.compartments):
        if c.initial is not None:
            x0[:, i] = values.evaluate(c.initial)
    if not np.all(np.isfinite(x0)) or np.any(x0 < 0):
        raise ModelSpecError(f"model {spec.name!r}: initial amounts must be finite and >= 0 for the given parameters")
    return x0


def input_fractions(values: Values, target: Target) -> np.ndarray:
    """Fraction of a dose that enters each compartment, shape (S, n)."""
    spec = values.spec
    out = np.zeros((values.size, len(spec.compartments)))
    for cmt, frac in spec.dose_into(target).items():
        out[:, spec.index(cmt)] += values.evaluate(frac)
    if not np.all(np.isfinite(out)) or np.any(out < 0) or np.any(out.sum(axis=1) > 1 + 1e-12):
        shares = "; ".join(f"into {cmt}: {frac.text} = {_span(out[:, spec.index(cmt)])}" for cmt, frac in spec.dose_into(target).items())
        raise ModelSpecError(
            f"model {spec.name!r}, route {target.name!r}: the fractions of a dose must be finite, >= 0 and sum to <= 1; "
            f"found {shares}"
        )
    return out


def _span(values: np.ndarray) -> str:
    """One value, or the range of several: ``-0.5`` or ``-0.5 to 0.8``."""
    low, high = float(np.min(values)), float(np.max(values))
    return f"{low:g}" if low == high else f"{low:g} to {high:g}"


def evaluate_outputs(values: Values, amounts: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Outputs from amounts of shape (S, T, n): name -> (S, T)."""
    spec = values.spec
    env: dict[str, Any] = {k: v[:, None] for k, v in values.env.items()}
    for i, state in enumerate(spec.state_names):
        env[state] = amounts[..., i]
    out = {}
    with np.errstate(all="ignore"):
        for name in names or list(spec.outputs):
            result = spec.outputs[name].expr.evaluate(env)
            out[name] = np.broadcast_to(np.asarray(result, dtype=float), amounts.shape[:-1]).copy()
    return out


def rhs_function(values: Values, subject: int) -> Callable[[float, np.ndarray], np.ndarray]:
    """Right-hand side f(t, x) of one subject (flows plus explicit ODE terms), amount/time."""
    spec = values.spec
    K = rate_matrix(values)[subject]
    env = {k: float(v[subject]) for k, v in values.env.items()}
    terms = [(spec.index(name), expr) for name, expr in spec.odes.items()]
    states = spec.state_names

    def rhs(t: float, x: np.ndarray) -> np.ndarray:
        dx = K @ x
        if terms:
            local = dict(env)
            local.update(zip(states, x, strict=True))
            for i, expr in terms:
                dx[i] += expr.evaluate(local, _SCALAR_BACKEND)
        return dx

    return rhs


def _smin(*a: float) -> float:
    return min(a)


def _smax(*a: float) -> float:
    return max(a)


def _slog(x: float) -> float:
    import math

    return math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)


def _ssqrt(x: float) -> float:
    import math

    return math.sqrt(x) if x >= 0 else math.nan


def _sexp(x: float) -> float:
    import math

    return math.exp(x) if x < 709.0 else math.inf


_SCALAR_BACKEND: dict[str, Callable[..., float]] = {
    "exp": _sexp,
    "log": _slog,
    "sqrt": _ssqrt,
    "abs": abs,
    "min": _smin,
    "max": _smax,
}
