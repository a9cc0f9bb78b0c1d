"""Shared by the gradient benchmarks: a model's compiled log-density + gradient, and its cost."""

from __future__ import annotations

import time
from typing import Any


def logp_and_gradient(model: Any) -> tuple[Any, list[Any]]:
    """(compiled log-density + gradient of a PyMC model, its arguments at the model's initial point)."""
    import pytensor

    logp = model.logp()
    fn = pytensor.function(model.value_vars, [logp, *pytensor.grad(logp, model.value_vars)])
    point = model.initial_point()
    return fn, [point[v.name] for v in model.value_vars]


def seconds_per_call(fn: Any, args: list[Any], repeats: int) -> float:
    """Wall seconds per call of ``fn(*args)``, after one warm-up call."""
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats
