"""Workflows: a population simulated in chunks, with a progress bar on a terminal."""

import io
import sys

import numpy as np
import pytest

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


def test_comparison_csv_columns_keep_one_order_whichever_rows_come_first():
    # route rows have no P(>x) and covariate rows hold a value: pandas would order the columns by first
    # appearance (unit before P(>x), value last), and a reader by position would mix them up
    from itpk.workflows import comparison_table

    interval = {"median": 2.0, "ci_low": 1.0, "ci_high": 3.0}
    report = {"units": {"AUC_plasma": "mg/L*h", "DIAM": "cm"},
              "routes": {"it": {"AUC_plasma": interval}, "iv": {"AUC_plasma": interval}},
              "metrics": {"G": {**interval, "P(>1)": 0.8, "P(>10)": 0.1, "undefined_fraction": 0.25}},
              "reference_route": "iv", "trial_covariates": {"DIAM": 2.7}}
    table = comparison_table(report)
    assert list(table.columns) == ["kind", "route", "quantity", "value", "median", "ci_low", "ci_high", "P(>1)", "P(>10)",
                                   "undefined_fraction", "unit"]  # any other key of summarize() kept, before unit
    assert table[table["kind"] == "covariate"]["value"].item() == 2.7
    assert table[table["quantity"] == "G"]["P(>10)"].item() == 0.1


def test_a_profile_cut_short_by_the_default_window_is_noted(tmp_path):
    # one IT antibody dose: the default window (24 h) ends with plasma still rising (its peak is at
    # ~106 h); with --horizon the profile is whole and nothing is said
    from itpk.workflows import run_simulation

    short = run_simulation("it_antibody", route="it", dose=10.0, out=tmp_path / "a.csv")
    assert "the default window (last dose + one interval, at least 24) ends at 24 h with plasma at 100%" in short.message
    assert "pass --horizon" in short.message
    whole = run_simulation("it_antibody", route="it", dose=10.0, horizon=3000.0, out=tmp_path / "b.csv")
    assert "default window" not in whole.message


def test_an_infinite_output_is_refused_before_anything_is_written(tmp_path):
    # found by an audit: DIAM=1e-102 makes the lesion's volume ~1e-309 L, the tumour concentration inf;
    # the CSV of inf was written and the plot failed with matplotlib's traceback
    from itpk.errors import ItpkError
    from itpk.workflows import run_simulation

    with pytest.raises(ItpkError, match=r"output tumor = tumor / V_T is infinite for 1 profile\(s\) \(first: profile 1 at 0 h\)"):
        run_simulation("it_antibody", route="it", dose=10.0, overrides={"DIAM": 1e-102}, out=tmp_path / "t.csv",
                       plot=tmp_path / "t.png")
    assert list(tmp_path.iterdir()) == []
