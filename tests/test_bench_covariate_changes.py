"""benchmarks/bench_covariate_changes.py: its sides take the paths it compares and predict alike where they should."""

from __future__ import annotations

import numpy as np
from bench_scripts import load
from pytensor.graph.traversal import io_toposort

from itpk import load_model
from itpk.dataset import read_frame
from itpk.inference import build_model
from itpk.odeop import OdePredict


def _bench():
    return load("bench_covariate_changes")


def test_sides_take_the_closed_form_then_the_ode_op():
    bench = _bench()
    spec = load_model(bench.MODEL)
    paths = []
    for side in bench.SIDES:
        model, _ = build_model(spec, read_frame(bench.frame(3, side, seed=1), spec))
        paths.append(any(isinstance(node.op, OdePredict) for node in io_toposort([], [model["IPRED"]])))
    assert paths == [False, True, True]


def test_a_change_after_the_last_sample_predicts_as_the_closed_form():
    # rtol 1e-6: the ODE Op at its default rtol 1e-8 against the exact closed form
    bench = _bench()
    (_, xa, pa), (_, xb, pb) = (bench.compiled(side, 3, 1) for side in bench.SIDES[:2])
    np.testing.assert_allclose(pb(*xb), pa(*xa), rtol=1e-6)
