"""The LSODA stepper (steady-state doses, covariate changes, kernel retries): failures end in clear messages."""

import time

import numpy as np
import pytest

from itpk import load_model, ode
from itpk.errors import ScheduleError
from itpk.events import Dose, Schedule, Target
from itpk.simulate import simulate
from itpk.spec import parse_model


def test_a_solve_that_creeps_stops_at_its_evaluation_budget(monkeypatch):
    # Vmax = 1e300 ran for more than 5 minutes before the budget; here the budget is cut to 2 000
    # evaluations so the test is quick (the default 200 000 takes 2-4 s)
    monkeypatch.setattr(ode, "MAX_RHS_CALLS", 2000)
    schedule = Schedule((Dose(0.0, 100.0, Target("iv"), ii=12.0, ss=1),))
    start = time.perf_counter()
    with pytest.raises(ScheduleError, match=r"the ODE solver gave up on parameter set 0 after 2,000 evaluations of the "
                                            r"right-hand side over 12 time units: the system is too stiff"):
        simulate(load_model("one_cpt_mm"), schedule, {"Vmax": 1e300}, np.array([1.0]))
    assert time.perf_counter() - start < 30
    ok = simulate(load_model("one_cpt_mm"), schedule, {"Vmax": 1e6}, np.array([1.0]))  # stiff but sane: fine
    assert np.all(np.isfinite(ok.outputs["plasma"]))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # one message, no numpy warnings on the way
def test_a_solution_that_blows_up_is_reported_as_such():
    # dx/dt = x²: from x0 = 1 it reaches infinity at t = 1 (a finite-time blow-up); the old message
    # quoted scipy's "The solver successfully reached the end of the integration interval."
    raw = {"name": "blowup", "time_unit": "h", "compartments": {"central": {"amount_unit": "mg", "volume": "V"}},
           "parameters": {"V": {"value": 1.0, "unit": "L"}, "k": {"value": 1.0, "unit": "1/(mg*h)"}}, "odes": {"central": "k * central**2"},
           "routes": {"iv": {"into": {"central": 1}}}, "outputs": {"plasma": {"expr": "central / V", "unit": "mg/L"}}}
    schedule = Schedule((Dose(0.0, 1.0, Target("iv"), ii=12.0, ss=1),))
    with pytest.raises(ScheduleError, match=r"^the ODE solution of parameter set 0 became infinite or NaN within 12 time units "
                                            r"\(overflow: check the parameter values for extreme numbers\)$"):
        simulate(parse_model(raw), schedule, {}, np.array([2.0]))
