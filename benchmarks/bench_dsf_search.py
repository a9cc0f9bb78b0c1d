"""DSF of a nonlinear model: the dose search from the compared dose (session 23) against the old check of
the two ends of [1e-6, 1e6], side by side in one process on the same parameter sets.

    /work/venv/bin/python benchmarks/bench_dsf_search.py            # 200 sets, as a virus fit's exposure.csv
    /work/venv/bin/python benchmarks/bench_dsf_search.py --sets 4   # a quick look

``compare_routes`` of ``it_oncolytic_virus`` (one 2e6 PFU dose it vs iv, default horizon) over parameter sets
drawn from the model's IIV (seed 1). Prints the wall time of each and for how many sets DSF is defined: the
virus lesion AUC falls, then rises with the dose, so the old check found a crossing for few sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def ends_only(fn: Callable[[float], float], at_one: float, brentq: Any) -> float:
    """The search before session 23: a crossing only when the two ends of [1e-6, 1e6] differ in sign."""
    lo, hi = np.log(1e-6), np.log(1e6)
    f_lo, f_hi = fn(np.exp(lo)), fn(np.exp(hi))
    if not (np.isfinite(f_lo) and np.isfinite(f_hi)) or f_lo * f_hi > 0:
        return float("nan")
    return float(np.exp(brentq(lambda z: fn(np.exp(z)), lo, hi, xtol=1e-10, rtol=1e-8)))


def run(sets: int, seed: int = 1) -> dict[str, tuple[float, np.ndarray]]:
    """{label: (wall seconds, DSF per set)} for the current search ("stepping") and :func:`ends_only`."""
    import itpk.exposure as ex
    from itpk import load_model
    from itpk.events import regimen
    from itpk.population import sample_population
    from itpk.system import resolve

    spec = load_model("it_oncolytic_virus")
    values = resolve(spec, {**sample_population(spec, sets, seed=seed), "DIAM": 3.0})
    schedules = {"it": regimen("it", 2e6), "iv": regimen("iv", 2e6)}
    ex.compare_routes(spec, values.take([0]), schedules, dose=2e6)  # compile and warm up outside the timing
    stepping = ex._solve_factor
    out = {}
    try:
        for label, solver in (("stepping", stepping), ("ends only", ends_only)):
            ex._solve_factor = solver
            start = time.perf_counter()
            comparison = ex.compare_routes(spec, values, schedules, dose=2e6)
            out[label] = (time.perf_counter() - start, comparison.metrics["it"]["DSF"])
    finally:
        ex._solve_factor = stepping
    return out


def main() -> None:
    from sets_args import sets_arguments

    args = sets_arguments(__doc__)
    results = run(args.sets, args.seed)
    for label, (wall, dsf) in results.items():
        defined = np.isfinite(dsf)
        median = f"{np.median(dsf[defined]):.3g}" if defined.any() else "-"
        print(f"{label:>10}: {wall:7.1f} s for {args.sets} sets; DSF defined for {int(defined.sum())}, median {median}")
    print(f"ratio (stepping / ends only): {results['stepping'][0] / results['ends only'][0]:.2f}x the wall time")


if __name__ == "__main__":
    main()
