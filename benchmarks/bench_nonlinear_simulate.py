"""Benchmark: ``simulate`` of nonlinear models, the compiled ODE kernel against scipy's LSODA.

Workloads, side by side in one process, the same parameter sets (a virtual population drawn
from the model file's IIV, seed 1) and output times:

- ``it_oncolytic_virus``, the T-VEC regimen for a 3 cm lesion (6 visits, 80 days, 241 times);
- ``one_cpt_mm``, 100 mg IV every 12 h, 6 doses (97 times over 72 h);
- ``it_oncolytic_virus (growing)``: the T-VEC regimen with the lesion's diameter rising
  3 -> 3.3 -> 3.6 cm at days 21 and 49 (covariate changes, NOCB: ``simulate`` took LSODA for
  these until session 18).

LSODA is the stepper ``simulate`` keeps for steady-state doses (rtol 1e-10, event to event,
Python right-hand side); the kernel (:mod:`itpk.odesim`) is what it uses otherwise, covariate
changes included. Prints wall seconds, the ratio, and the largest difference between the two relative
to each output's peak.

Usage::

    python benchmarks/bench_nonlinear_simulate.py [--subjects N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from itpk import load_model
from itpk.events import CovariateChange, Schedule, regimen
from itpk.odesim import kernel_amounts
from itpk.population import sample_population
from itpk.regimens import tvec_schedule
from itpk.simulate import _run, make_stepper, segment_values
from itpk.system import resolve


def _growing() -> Schedule:
    """T-VEC into a lesion whose diameter is re-measured at days 21 and 49 (changes after those visits)."""
    return Schedule(tvec_schedule(3.0).doses, (), (CovariateChange(504.0, (("DIAM", 3.3),)), CovariateChange(1176.0, (("DIAM", 3.6),))))


WORKLOADS = {
    "it_oncolytic_virus": ("it_oncolytic_virus", lambda: tvec_schedule(3.0),
                           np.linspace(0.0, 80 * 24.0, 241), {"DIAM": 3.0}),
    "one_cpt_mm": ("one_cpt_mm", lambda: regimen("iv", 100.0, every=12.0, doses=6), np.linspace(0.0, 72.0, 97), {}),
    "it_oncolytic_virus (growing)": ("it_oncolytic_virus", _growing, np.linspace(0.0, 80 * 24.0, 241), {"DIAM": 3.0}),
}


def compare(name: str, subjects: int) -> tuple[float, float, float]:
    """(LSODA seconds, kernel seconds, max |difference| / peak) for one workload."""
    model, make_schedule, times, typical = WORKLOADS[name]
    spec, schedule = load_model(model), make_schedule()
    values = resolve(spec, sample_population(spec, subjects, seed=1, typical=typical))
    kernel_amounts(values.take(slice(0, 1)), schedule, times)  # compile and warm
    start = time.perf_counter()
    fast = kernel_amounts(values, schedule, times)
    t_kernel = time.perf_counter() - start
    start = time.perf_counter()
    slow = _run(make_stepper(segment_values(values, schedule), schedule), schedule, times)
    t_lsoda = time.perf_counter() - start
    peak = np.abs(slow).max(axis=1, keepdims=True)
    return t_lsoda, t_kernel, float(np.max(np.abs(fast - slow) / np.where(peak > 0, peak, 1.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6)
    args = parser.parse_args()
    print(f"simulate, {args.subjects} parameter sets per workload:")
    for name in WORKLOADS:
        lsoda, kernel, diff = compare(name, args.subjects)
        print(f"  {name:30s} LSODA {lsoda:8.3f} s   kernel {kernel:8.4f} s   {lsoda / kernel:7.1f}x   "
              f"max |difference| / peak {diff:.1e}")


if __name__ == "__main__":
    main()
