"""Benchmark: is a closed form for 2-compartment infusions worth writing?

A fit of ``two_cpt_iv`` takes its predictions from the 2-compartment closed form when every
dose is a bolus, and from the general linear Op (eigendecomposition, numba kernels) as soon
as one dose is an infusion. This script times one log-density + gradient of the same
hierarchical model, data and parameters both ways (a 200 mg bolus against a 200 mg infusion
at 100 mg/h) and prints the ratio. A closed form of its own would at best bring the infusion
case down to the bolus figure.

Usage::

    python benchmarks/bench_infusion_path.py [--subjects N] [--repeats R] [--seed S]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from gradient_timing import logp_and_gradient, seconds_per_call

from itpk import load_model
from itpk.dataset import read_frame
from itpk.inference import build_model

TIMES_H = (0.5, 1, 2, 3, 4, 6, 8, 12, 24, 48)


def frame(subjects: int, rate: float | None, seed: int) -> pd.DataFrame:
    """One 200 mg IV dose (a bolus when ``rate`` is None, else mg/h) and 10 plasma samples each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, subjects + 1):
        rows.append((i, 0.0, 1, 200.0, rate, "iv", "", None))
        rows += [(i, t, 0, None, None, "", "plasma", float(rng.lognormal(0.0, 0.3))) for t in TIMES_H]
    return pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "RATE", "ROUTE", "CMT", "DV"])


def seconds_per_gradient(rate: float | None, subjects: int, repeats: int, seed: int) -> float:
    """Wall seconds of one compiled log-density + gradient at the model's initial point."""
    spec = load_model("two_cpt_iv")
    model, _ = build_model(spec, read_frame(frame(subjects, rate, seed), spec))
    return seconds_per_call(*logp_and_gradient(model), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # interleaved, best of 3, so that drift on a shared machine hits both sides alike
    bolus, infusion = [], []
    for _ in range(3):
        bolus.append(seconds_per_gradient(None, args.subjects, args.repeats, args.seed))
        infusion.append(seconds_per_gradient(100.0, args.subjects, args.repeats, args.seed))
    b, f = min(bolus), min(infusion)
    print(f"two_cpt_iv, {args.subjects} subjects x {len(TIMES_H)} samples, log-density + gradient (best of 3):")
    print(f"  bolus (2-compartment closed form):   {b * 1e6:8.1f} us")
    print(f"  infusion (general linear Op):        {f * 1e6:8.1f} us")
    print(f"  ratio infusion / bolus:              {f / b:8.2f}x")


if __name__ == "__main__":
    main()
