"""Benchmark: what a time-varying covariate costs a fit, on the exact segments and on the ODE path.

A covariate that changes within a subject (NOCB) splits each subject's time into segments
of constant parameters. A linear model follows them exactly: one linear-Op call per segment
index, the amounts carried from one to the next (``itpk.segments``). Before that (session 16)
the fit carried the covariate as an extra state of the ODE Op, a change as a jump of it
(``itpk.covdoses``, still the path of nonlinear models). This script times one log-density +
gradient of ``tests/data/tv_weight.toml`` (one compartment, allometric weight on CL and V) on
the same subjects, samples and parameters three ways:

(a) constant weights: the 1-compartment closed form;
(b) a weight change at 4 h in every subject (x0.6 or x1.5): the exact segments;
(c) the same data and model with a zero ODE term added (``central += 0``), which makes it
    "nonlinear" and sends it down the ODE path; IPRED equal to (b) (checked at rtol 1e-6).

Usage::

    python benchmarks/bench_covariate_changes.py [--subjects N] [--repeats R] [--seed S]
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
from gradient_timing import logp_and_gradient, seconds_per_call

from itpk import load_model
from itpk.dataset import read_frame
from itpk.inference import build_model
from itpk.spec import parse_model

MODEL = Path(__file__).resolve().parents[1] / "tests" / "data" / "tv_weight.toml"
TIMES_H = (0.5, 1, 2, 4, 6, 8, 12, 16, 24)
SIDES = ("constant weights (closed form)", "change at 4 h (exact segments)", "change at 4 h (ODE path)")


def frame(subjects: int, changes: bool, seed: int) -> pd.DataFrame:
    """100 mg IV and 9 plasma samples per subject; with ``changes``, the weight x0.6 or x1.5 after 4 h."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, subjects + 1):
        w0 = float(rng.uniform(50, 100))
        later = w0 * float(rng.choice([0.6, 1.5])) if changes else w0
        rows.append((i, 0.0, 1, 100.0, "iv", None, w0))
        rows += [(i, t, 0, None, "", float(rng.lognormal(0.0, 0.3)), w0 if t <= 4 else later) for t in TIMES_H]
    return pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "DV", "WT"])


def spec_of(side: str):
    """tv_weight, or for the ODE side the same model with a zero ODE term (nonlinear to the fit)."""
    if side != SIDES[2]:
        return load_model(MODEL)
    raw = tomllib.loads(MODEL.read_text())
    raw["odes"] = {"central": "0 * central"}
    return parse_model(raw, source=f"{MODEL} + zero ODE term")


def compiled(side: str, subjects: int, seed: int):
    """(log-density + gradient function, its arguments at the initial point, IPRED function)."""
    import pytensor

    spec = spec_of(side)
    model, _ = build_model(spec, read_frame(frame(subjects, side != SIDES[0], seed), spec))
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
    (_, xb, pb), (_, xc, pc) = (compiled(s, args.subjects, args.seed) for s in SIDES[1:])
    np.testing.assert_allclose(pc(*xc), pb(*xb), rtol=1e-6)  # (c) predicts what (b) does
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for _ in range(3):  # interleaved, best of 3: drift on a shared machine hits every side alike
        for side in SIDES:
            times[side].append(seconds_per_gradient(side, args.subjects, args.repeats, args.seed))
    best = {s: min(t) for s, t in times.items()}
    print(f"tv_weight, {args.subjects} subjects x {len(TIMES_H)} samples, log-density + gradient (best of 3):")
    for label, side in zip("abc", SIDES, strict=True):
        print(f"  ({label}) {side:32s} {best[side] * 1e6:9.1f} us   {best[side] / best[SIDES[0]]:6.2f}x (a)")
    print(f"  segments over the ODE path: {best[SIDES[2]] / best[SIDES[1]]:.1f}x faster")


if __name__ == "__main__":
    main()
