"""Benchmark: what a time-varying covariate costs a fit.

A covariate that changes within a subject (NOCB) takes a linear model off its exact paths
(closed form, eigen Op): the fit carries the covariate as an extra state of the ODE Op and
applies each change as a jump of it (``itpk.covdoses``). This script times one log-density +
gradient of ``tests/data/tv_weight.toml`` (one compartment, allometric weight on CL and V)
on the same subjects, samples and parameters three ways:

(a) constant weights: the 1-compartment closed form;
(b) the same, plus a weight change after each subject's last sample: no prediction changes
    (checked: IPRED equal to (a) at rtol 1e-6), but the fit takes the ODE path;
(c) a weight change at 4 h in every subject (x0.6 or x1.5): the case the path exists for.

Usage::

    python benchmarks/bench_covariate_changes.py [--subjects N] [--repeats R] [--seed S]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from gradient_timing import logp_and_gradient, seconds_per_call

from itpk import load_model
from itpk.dataset import read_frame
from itpk.inference import build_model

MODEL = Path(__file__).resolve().parents[1] / "tests" / "data" / "tv_weight.toml"
TIMES_H = (0.5, 1, 2, 4, 6, 8, 12, 16, 24)
SIDES = ("constant", "change after the last sample", "change at 4 h")


def frame(subjects: int, side: str, seed: int) -> pd.DataFrame:
    """100 mg IV and 9 plasma samples per subject; weights per ``side`` (one of :data:`SIDES`)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, subjects + 1):
        w0 = float(rng.uniform(50, 100))
        w1 = w0 * float(rng.choice([0.6, 1.5]))
        later = w1 if side == SIDES[2] else w0
        rows.append((i, 0.0, 1, 100.0, "iv", None, w0))
        rows += [(i, t, 0, None, "", float(rng.lognormal(0.0, 0.3)), w0 if t <= 4 else later) for t in TIMES_H]
        if side == SIDES[1]:
            rows.append((i, 30.0, 2, None, "", None, w1))  # holds after 24 h: no sample sees it
    return pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV", "WT"])


def compiled(side: str, subjects: int, seed: int):
    """(log-density + gradient function, its arguments at the initial point, IPRED function)."""
    import pytensor

    spec = load_model(MODEL)
    model, _ = build_model(spec, read_frame(frame(subjects, side, seed), spec))
    (ipred,) = model.replace_rvs_by_values([model["IPRED"]])  # the graph in the value variables
    return *logp_and_gradient(model), pytensor.function(model.value_vars, ipred, on_unused_input="ignore")


def seconds_per_gradient(side: str, subjects: int, repeats: int, seed: int) -> float:
    """Wall seconds of one compiled log-density + gradient at the model's initial point."""
    fn, args, _ = compiled(side, subjects, seed)
    return seconds_per_call(fn, args, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    (_, xa, pa), (_, xb, pb) = (compiled(s, args.subjects, args.seed) for s in SIDES[:2])
    np.testing.assert_allclose(pb(*xb), pa(*xa), rtol=1e-6)  # (b) predicts what (a) does
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for _ in range(3):  # interleaved, best of 3: drift on a shared machine hits every side alike
        for side in SIDES:
            times[side].append(seconds_per_gradient(side, args.subjects, args.repeats, args.seed))
    best = {s: min(t) for s, t in times.items()}
    print(f"tv_weight, {args.subjects} subjects x {len(TIMES_H)} samples, log-density + gradient (best of 3):")
    for label, side in zip("abc", SIDES, strict=True):
        print(f"  ({label}) {side:30s} {best[side] * 1e6:9.1f} us   {best[side] / best[SIDES[0]]:6.2f}x (a)")


if __name__ == "__main__":
    main()
