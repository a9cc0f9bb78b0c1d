"""benchmarks/bench_covariate_changes.py: its sides take the paths it compares and predict alike where they should."""

from __future__ import annotations

import numpy as np
from bench_scripts import load
from pytensor.graph.traversal import io_toposort

from itpk.dataset import read_frame
from itpk.inference import build_model


def _bench():
    return load("bench_covariate_changes")


def test_sides_take_the_closed_form_the_segments_and_the_ode_op():
    bench = _bench()
    paths = []
    for side in bench.SIDES:
        spec = bench.spec_of(side)
        model, _ = build_model(spec, read_frame(bench.frame(3, side != bench.SIDES[0], seed=1), spec))
        ops = {type(node.op).__name__ for node in io_toposort([], [model["IPRED"]])}
        paths.append(("OdePredict" in ops, "LinearPredict" in ops))
    assert paths == [(False, False), (False, True), (True, False)]


def test_the_ode_side_predicts_what_the_segments_do():
    # rtol 1e-6: the ODE Op at its default rtol 1e-8 against the exact segments
    bench = _bench()
    (_, xb, pb), (_, xc, pc) = (bench.compiled(side, 3, 1) for side in bench.SIDES[1:])
    np.testing.assert_allclose(pc(*xc), pb(*xb), rtol=1e-6)
