"""Shared by the fit tests: IPRED of a fit's graph at a point against simulate with the same individual
parameters, and the log-density gradient against central finite differences."""

from __future__ import annotations

from typing import Any

import numpy as np

from itpk.inference import build_model
from itpk.simulate import simulate


def ipred_and_reference(spec: Any, dataset: Any, *, seed: int = 4, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray, Any, dict]:
    """IPRED at the initial point moved by N(0, spread) per unconstrained value, and simulate's
    value of each observation's output for each subject's individual parameters and covariates.

    Returns ``(ipred, reference, model, point)``.
    """
    model, data = build_model(spec, dataset)
    rng = np.random.default_rng(seed)
    point = {k: v + rng.normal(0, spread, np.shape(v)) for k, v in model.initial_point().items()}
    names = [n + "_i" if n in data.iiv else n for n in data.estimated]
    outputs = model.replace_rvs_by_values([model["IPRED"], *(model[n] for n in names)])  # at the point, not prior draws
    f = model.compile_fn(outputs, inputs=model.value_vars, on_unused_input="ignore")
    ipred, *values = f(point)
    N = len(data.subjects)
    values = [np.broadcast_to(v, (N,)) for v in values]
    obs = data.observations
    ref = np.empty(len(obs))
    for i, s in enumerate(data.subjects):
        params = {name: float(v[i]) for name, v in zip(data.estimated, values, strict=True)}
        for output in set(obs["output"][obs["subject"] == i]):
            rows = np.flatnonzero(((obs["subject"] == i) & (obs["output"] == output)).to_numpy())
            times = obs["TIME"].to_numpy()[rows]
            ref[rows] = simulate(spec, s.schedule, {**params, **s.covariates}, times, outputs=[output]).outputs[output][0]
    return ipred, ref, model, point


def gradient_and_finite_differences(model: Any, point: dict, h: float = 1e-5) -> tuple[np.ndarray, list[float]]:
    """The compiled log-density gradient at ``point`` and central differences (step ``h`` on each
    unconstrained value), in the order of ``model.value_vars``."""
    logp, dlogp = model.compile_logp(), model.compile_dlogp()
    numeric = []
    for name in (v.name for v in model.value_vars):
        value = np.atleast_1d(np.asarray(point[name], dtype=float))
        shape = np.shape(point[name])
        for k in range(value.size):
            up, down = value.copy(), value.copy()
            up[k] += h
            down[k] -= h
            numeric.append((logp({**point, name: up.reshape(shape)}) - logp({**point, name: down.reshape(shape)})) / (2 * h))
    return dlogp(point), numeric
