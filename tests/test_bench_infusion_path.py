"""benchmarks/bench_infusion_path.py: its two sides take the two prediction paths it compares."""

from __future__ import annotations

from bench_scripts import load
from pytensor.graph.traversal import io_toposort

from itpk import load_model
from itpk.dataset import read_frame
from itpk.inference import build_model
from itpk.linop import LinearPredict


def _bench():
    return load("bench_infusion_path")


def test_bolus_side_is_the_closed_form_and_infusion_side_the_general_op():
    bench = _bench()
    spec = load_model("two_cpt_iv")
    general = {}
    for label, rate in (("bolus", None), ("infusion", 100.0)):
        model, _ = build_model(spec, read_frame(bench.frame(3, rate, seed=1), spec))
        general[label] = any(isinstance(node.op, LinearPredict) for node in io_toposort([], [model["IPRED"]]))
    assert general == {"bolus": False, "infusion": True}


def test_timing_returns_a_positive_duration():
    assert _bench().seconds_per_gradient(100.0, subjects=2, repeats=2, seed=1) > 0
