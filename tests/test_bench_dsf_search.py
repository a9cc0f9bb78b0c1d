"""benchmarks/bench_dsf_search.py: both sides run on the same sets, and the stepping search is put back."""

from __future__ import annotations

import numpy as np
from bench_scripts import load

import itpk.exposure


def test_both_searches_run_and_the_current_one_is_restored():
    before = itpk.exposure._solve_factor
    results = load("bench_dsf_search").run(2)
    assert itpk.exposure._solve_factor is before
    assert set(results) == {"stepping", "ends only"}
    for wall, dsf in results.values():
        assert wall > 0 and dsf.shape == (2,)
    # where the old check found a crossing, it is the one the stepping search finds or another of the same curve
    assert np.isfinite(results["stepping"][1]).sum() >= np.isfinite(results["ends only"][1]).sum()
