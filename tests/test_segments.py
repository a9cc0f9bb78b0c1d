"""Exact linear fits through covariate changes (itpk.segments): IPRED and gradients against simulate."""

import tomllib
from pathlib import Path

import ipred_reference as reference
import numpy as np
import pandas as pd
import pytest
from pytensor.graph.traversal import io_toposort

from itpk import load_model
from itpk.dataset import read_frame
from itpk.errors import FitError
from itpk.inference import build_model
from itpk.spec import parse_model

DATA = Path(__file__).parent / "data"
COLUMNS = ["ID", "TIME", "EVID", "AMT", "ROUTE", "RATE", "ADDL", "II", "DV", "WT"]


def split_model():
    """tv_route without its initial amount: linear, SC split FD = WT/(WT + 70), CL and V scaled by WT."""
    raw = tomllib.loads((DATA / "tv_route.toml").read_text())
    del raw["compartments"]["central"]["initial"]
    return parse_model(raw, source="tv_split")


ROWS = [
    # subject 1: SC doses every 12 h (ADDL) across two changes, an SC infusion running through one
    (1, 0.0, 1, 100.0, "sc", None, 2, 12.0, None, 70.0),
    (1, 1.0, 0, None, "", None, None, None, 2.0, 70.0),
    (1, 5.0, 0, None, "", None, None, None, 2.5, 70.0),  # the weight changes after 5 h
    (1, 8.0, 1, 60.0, "sc", 10.0, None, None, None, 100.0),  # 6 h infusion, through the change after 10 h
    (1, 10.0, 0, None, "", None, None, None, 2.0, 100.0),
    (1, 13.0, 0, None, "", None, None, None, 1.0, 55.0),
    (1, 30.0, 0, None, "", None, None, None, 0.5, 55.0),
    # subject 2: an observation at the change time (old weight), then a reset right at a change and an
    # iv dose after it; one more change with nothing given after it
    (2, 0.0, 1, 80.0, "iv", None, None, None, None, 50.0),
    (2, 2.0, 0, None, "", None, None, None, 1.5, 50.0),
    (2, 4.0, 0, None, "", None, None, None, 1.0, 80.0),
    (2, 4.0, 3, None, "", None, None, None, None, 80.0),
    (2, 4.0, 1, 40.0, "sc", None, None, None, None, 80.0),
    (2, 6.0, 0, None, "", None, None, None, 0.8, 80.0),
    (2, 9.0, 0, None, "", None, None, None, 0.5, 120.0),
    (2, 12.0, 2, None, "", None, None, None, None, 90.0),
    # subject 3: constant weight
    (3, 0.0, 1, 100.0, "sc", None, None, None, None, 65.0),
    (3, 3.0, 0, None, "", None, None, None, 1.2, 65.0),
]


def frame(rows=ROWS):
    return pd.DataFrame(rows, columns=COLUMNS)


def op_names(model):
    return [type(node.op).__name__ for node in io_toposort([], [model["IPRED"]])]


@pytest.mark.parametrize("which", ["tv_weight", "split"])
def test_linear_fits_follow_covariate_changes_exactly(which):
    # IPRED at a random point against simulate (piecewise exact propagators) with the same individual
    # parameters, rtol 1e-10. The split model's SC fractions use the weight: each dose, and the
    # running infusion's rest after the change, splits by the weight in force. Only the linear Op
    # is in the graph (3 links: subject 2 has 3 changes, the last with no observation after it)
    spec = load_model(DATA / "tv_weight.toml") if which == "tv_weight" else split_model()
    rows = ROWS if which == "split" else [tuple("iv" if v == "sc" else v for v in r) for r in ROWS]
    ipred, ref, model, _ = reference.ipred_and_reference(spec, read_frame(frame(rows), spec))
    np.testing.assert_allclose(ipred, ref, rtol=1e-10)
    ops = op_names(model)
    assert ops.count("LinearPredict") == 3 and "OdePredict" not in ops


def test_ignoring_the_changes_in_the_fractions_would_be_detected():
    # the same check with the route fractions frozen at the first weights is off by > 1%: the
    # comparison above is sensitive to what the segments add
    spec = split_model()
    first = {}
    for row in ROWS:
        first.setdefault(row[0], row[-1])
    frozen = [r[:-1] + (first[r[0]],) for r in ROWS]
    ipred, _, _, _ = reference.ipred_and_reference(spec, read_frame(frame(frozen), spec))
    _, ref, _, _ = reference.ipred_and_reference(spec, read_frame(frame(), spec))
    assert np.max(np.abs(ipred / ref - 1)) > 0.01


def test_gradient_through_the_carried_amounts_matches_finite_differences():
    # central differences, step 1e-5 on the unconstrained variables; rtol 1e-5
    spec = split_model()
    _, _, model, point = reference.ipred_and_reference(spec, read_frame(frame(), spec))
    grad, numeric = reference.gradient_and_finite_differences(model, point)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


SS_COLUMNS = ["ID", "TIME", "EVID", "AMT", "ROUTE", "RATE", "II", "SS", "DV", "WT"]
SS_ROWS = [
    # subject 1: SC at steady state every 12 h (SS=1) at 70 kg, the weight 90 kg after 6 h, a second
    # steady-state dose on top (SS=2) at 24 h: each computed with the weight in force when given
    (1, 0.0, 1, 100.0, "sc", None, 12.0, 1, None, 70.0),
    (1, 2.0, 0, None, "", None, None, 0, 2.0, 70.0),
    (1, 6.0, 0, None, "", None, None, 0, 2.0, 70.0),
    (1, 10.0, 0, None, "", None, None, 0, 1.0, 90.0),
    (1, 24.0, 1, 50.0, "sc", None, 8.0, 2, None, 90.0),
    (1, 26.0, 0, None, "", None, None, 0, 1.0, 90.0),
    # subject 2: a constant SC infusion at steady state (II = 0) running through two changes
    (2, 0.0, 1, 0.0, "sc", 5.0, 0.0, 1, None, 60.0),
    (2, 1.0, 0, None, "", None, None, 0, 2.0, 60.0),
    (2, 5.0, 0, None, "", None, None, 0, 2.0, 100.0),
    (2, 9.0, 0, None, "", None, None, 0, 2.0, 50.0),
    # subject 3: a 10 h SC infusion at steady state every 12 h given at a change time (the weight
    # after 4 h is 90: NOCB puts the change at the dose row), and one at 30 h running through the
    # change after 33 h; both run on as ordinary infusions with the new split
    (3, 4.0, 1, 100.0, "sc", 10.0, 12.0, 1, None, 70.0),
    (3, 6.0, 0, None, "", None, None, 0, 1.0, 90.0),
    (3, 30.0, 1, 100.0, "sc", 10.0, 12.0, 1, None, 90.0),
    (3, 33.0, 0, None, "", None, None, 0, 1.0, 90.0),
    (3, 36.0, 0, None, "", None, None, 0, 1.0, 60.0),
]


def test_steady_state_doses_across_changes_predict_what_simulate_does():
    # IPRED against simulate, rtol 1e-10: SS doses use the parameters in force when given, their
    # effect carries on through the amounts; the constant SS infusion goes on with the new split
    spec = split_model()
    ipred, ref, model, _ = reference.ipred_and_reference(spec, read_frame(pd.DataFrame(SS_ROWS, columns=SS_COLUMNS), spec))
    np.testing.assert_allclose(ipred, ref, rtol=1e-10)
    assert "OdePredict" not in op_names(model)


def test_a_steady_state_infusion_longer_than_its_interval_running_at_a_change_is_refused_with_the_reason():
    # 20 h every 12 h: the repetition started at -12 h still runs at the change after 2 h
    spec = split_model()
    rows = [(1, 0.0, 1, 100.0, "iv", 5.0, 12.0, 1, None, 70.0), (1, 2.0, 0, None, "", None, None, 0, 1.0, 70.0),
            (1, 4.0, 0, None, "", None, None, 0, 1.0, 90.0)]
    with pytest.raises(FitError, match=r"subject 1: the steady-state infusion given at 0 \(every 12, lasting 20\) still has an "
                                       r"earlier repetition running at 2, when covariates change; it would straddle the change"):
        build_model(spec, read_frame(pd.DataFrame(rows, columns=SS_COLUMNS), spec))
