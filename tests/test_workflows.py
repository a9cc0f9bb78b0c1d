"""Workflows: a population simulated in chunks, with a progress bar on a terminal."""

import io
import sys

import numpy as np

from itpk import load_model, workflows
from itpk.events import regimen
from itpk.population import sample_population
from itpk.simulate import simulate
from itpk.system import resolve


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_chunks_give_the_numbers_of_one_call_and_the_bar_counts_profiles(monkeypatch):
    # 7 parameter sets in chunks of 3 (linear) and 2 (nonlinear): identical to one call (exact)
    monkeypatch.setattr(workflows, "CHUNK_LINEAR", 3)
    monkeypatch.setattr(workflows, "CHUNK_NONLINEAR", 2)
    for name, route in (("it_linear", "it"), ("one_cpt_mm", "iv")):
        spec = load_model(name)
        values = resolve(spec, sample_population(spec, 7, seed=2))
        times = np.array([0.5, 4.0, 24.0])
        stream = Terminal()
        monkeypatch.setattr(sys, "stderr", stream)
        chunked = workflows.simulate_population(spec, regimen(route, 10.0), values, times, progress=True)
        whole = simulate(spec, regimen(route, 10.0), values, times)
        np.testing.assert_array_equal(chunked.amounts, whole.amounts)
        for output, value in whole.outputs.items():
            np.testing.assert_array_equal(chunked.outputs[output], value)
        assert "simulate: 7 profiles" in stream.getvalue() and "7/7" in stream.getvalue()
