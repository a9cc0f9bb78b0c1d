"""benchmarks/bench_peak_candidates.py: both zooms run on the same sets, and the current one is put back."""

from __future__ import annotations

import numpy as np
from bench_scripts import load

import itpk.exposure


def test_both_zooms_run_and_the_current_one_is_restored():
    before = itpk.exposure._refined_peaks
    results = load("bench_peak_candidates").run(2)
    assert itpk.exposure._refined_peaks is before
    for sides in results.values():
        (_, new), (_, old) = sides["own peaks"], sides["session 23"]
        for o in new.cmax:
            # the same peaks or better ones: both are solutions of the model at the times they chose, to the
            # ODE solver's error (its steps follow the times asked for) and session 23's coarser zoom
            np.testing.assert_array_less(old.cmax[o] * (1 - 1e-7), new.cmax[o])
    small = results["small molecule, 3 iv infusions"]
    (_, new), (_, old) = small["own peaks"], small["session 23"]
    assert np.all(new.tmax["tumor"] > 48.0)  # the third infusion's peak, the true one
