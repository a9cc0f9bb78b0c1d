"""The nonlinear prediction Op (itpk.odeop) against scipy's path and the exact linear Op.

Reference: ``itpk.simulate.simulate`` (scipy LSODA at rtol 1e-10, restarted at
every event) and, for a linear model, ``itpk.linop.linear_predict``.
Tolerances, stated per test:

- predictions: rtol 1e-6 (the Op runs at rtol 1e-8/1e-10), atol 1e-9 × the largest prediction;
- gradients of a random scalar function of y: central finite differences of
  the Op itself at rtol 1e-10 (step 1e-4 relative, so solver noise ~1e-10/1e-4
  stays below the checked 1e-4), compared at rtol 1e-4;
- numba backend vs ``perform``: rtol 1e-12 (the same kernel);
- the stiff method (``method="rosenbrock"``, ROS34PW2) at rtol 1e-9: states and outputs within
  rtol 1e-7 of piecewise scipy Radau (rtol 1e-10) and of the Michaelis–Menten Lambert-W solution;
  gradients as above (rtol 1e-4 against central differences); sensitivities at rtol 1e-6 within
  1e-3 (of the largest entry) of rtol 1e-10.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from itpk import load_model
from itpk.events import Dose, Schedule, Target
from itpk.expr import parse_expr
from itpk.exprvm import compile_tape, compile_trees, derivative, lower
from itpk.linop import Design, linear_predict
from itpk.odeop import OdeSystem, ode_predict
from itpk.regimens import tvec_schedule
from itpk.simulate import simulate
from itpk.spec import ModelSpec
from itpk.system import initial_state, input_fractions, rate_matrix, resolve

PERFORM = "FAST_COMPILE"  # python linker: the Op's perform
RTOL = 1e-6


def build(spec: ModelSpec, subjects: list[tuple[dict, Schedule, np.ndarray]], outputs: list[str] | None = None):
    """System, p, x0, F, Design and simulate's predictions for subjects (params, schedule, times).

    Every listed output (all by default) is observed at every time; doses are
    ADDL-expanded; infusions are truncated at the next reset.
    """
    outputs = list(outputs or spec.outputs)
    system = OdeSystem.from_spec(spec, outputs)
    n = len(spec.compartments)
    values = [resolve(spec, p) for p, _, _ in subjects]
    doses, resets = [], []
    for v, (_, schedule, _) in zip(values, subjects, strict=True):
        r = sorted({*schedule.resets, *(d.time for d in schedule.doses if d.reset)})
        rows = []
        for d in schedule.doses:
            for t in d.times():
                duration = d.infusion_duration if d.is_infusion else 0.0
                later = [x for x in r if t < x < t + duration]
                duration = later[0] - t if later else duration
                scale = d.infusion_rate if d.is_infusion else d.amount
                rows.append((t, duration, scale * input_fractions(v, d.target)[0]))
        doses.append(rows)
        resets.append(np.array(r))
    N, D = len(subjects), max(len(d) for d in doses)
    dose_time, dose_duration = np.full((N, D), np.nan), np.zeros((N, D))
    dose_valid, F = np.zeros((N, D), bool), np.zeros((N, D, n))
    for i, rows in enumerate(doses):
        for j, (t, duration, f) in enumerate(rows):
            dose_time[i, j], dose_duration[i, j], dose_valid[i, j], F[i, j] = t, duration, True, f
    p = np.stack([np.array([float(v[name][0]) for name in system.input_names]) for v in values])
    x0 = np.concatenate([initial_state(v) for v in values])
    obs_subject, obs_time, obs_output, obs_after, reference = [], [], [], [], []
    for i, (params, schedule, times) in enumerate(subjects):
        sim = simulate(spec, schedule, params, times)
        for t_index, t in enumerate(times):
            before = resets[i][resets[i] <= t]
            for o, name in enumerate(outputs):
                obs_subject.append(i)
                obs_time.append(t)
                obs_output.append(o)
                obs_after.append(before[-1] if before.size else -math.inf)
                reference.append(sim.outputs[name][0, t_index])
    design = Design(dose_time, dose_duration, dose_valid, obs_subject, obs_time, obs_output, obs_after)
    return system, p, x0, F, design, np.array(reference)


def predict(system, p, x0, F, design, mode=PERFORM, **kwargs):
    pv, xv, Fv = pt.matrix("p"), pt.matrix("x0"), pt.tensor3("F")
    return pytensor.function([pv, xv, Fv], ode_predict(system, pv, xv, Fv, design, **kwargs), mode=mode)(p, x0, F)


def check_predictions(system, p, x0, F, design, reference, rtol=RTOL, **kwargs):
    got = predict(system, p, x0, F, design, **kwargs)
    np.testing.assert_allclose(got, reference, rtol=rtol, atol=1e-9 * np.abs(reference).max())
    return got


# -- the expression machine --------------------------------------------------------------


def test_programs_and_derivatives_match_evaluate_and_differences():
    # every operator, n-ary max, constant powers; derivatives vs central differences (rtol 1e-7)
    text = "-Vmax * (c / V) / (Km + c / V) + abs(c - 3)**2 + max(c, V, 2) + (6/pi*c)**(1/3) + exp(-c) * log(V) + sqrt(Km) ** V + min(c, Km)"
    expr = parse_expr(text, where="test")
    slots = {"c": 0, "Vmax": 1, "V": 2, "Km": 3}
    tree = lower(expr, slots)
    prog = compile_trees([tree] + [derivative(tree, s) for s in range(4)])
    z = np.array([5.0, 10.0, 1.5, 2.0])
    values = prog.evaluate(z)

    def f(v):
        return expr.evaluate(dict(zip(slots, v, strict=True)))

    assert math.isclose(values[0], f(z), rel_tol=1e-14)
    h = 1e-6
    fd = [(f(z + h * e) - f(z - h * e)) / (2 * h) for e in np.eye(4)]
    np.testing.assert_allclose(values[1:], fd, rtol=1e-7)


def test_program_gives_nan_not_exceptions():
    tree = lower(parse_expr("log(a) + sqrt(a) + 1 / b", where="t"), {"a": 0, "b": 1})
    out = compile_trees([tree]).evaluate(np.array([-1.0, 0.0]))
    assert np.isnan(out[0])


def test_tape_equals_program_bit_for_bit_and_hoists_what_reads_no_varying_slot():
    # every operator, n-ary max/min (SEL in the derivatives); slot 0 varies, 1..3 are per-subject constants
    text = "-Vmax * (c / V) / (Km + c / V) + abs(c - 3)**2 + max(c, V, 2) + (6/pi*c)**(1/3) + exp(-c) * log(V) + sqrt(Km) ** V + min(c, Km) + Vmax/V*c + c*(Vmax/V)"
    tree = lower(parse_expr(text, where="test"), {"c": 0, "Vmax": 1, "V": 2, "Km": 3})
    trees = [tree] + [derivative(tree, s) for s in range(4)]
    prog = compile_trees(trees)
    tape = compile_tape([trees[:1], trees[1:]], 4, [0])
    points = [[5.0, 10.0, 1.5, 2.0], [-1.0, 0.0, 0.0, -2.0], [3.0, 1.0, 2.0, 3.0], [0.0, np.nan, 1.0, 1.0], [2.0, 1e308, 1e-308, 0.5]]
    with np.errstate(all="ignore"):
        for z in points:
            np.testing.assert_array_equal(tape.evaluate(np.array(z)), prog.evaluate(np.array(z)))  # NaN == NaN here
    first, hoisted = tape.n_slots + tape.consts.size, tape.sections[1]
    varying = {0} | {first + k for k in range(hoisted, tape.ops.shape[0])}
    assert hoisted > 0 and not (set(tape.ops[:hoisted, 2:].ravel()) & varying)  # section 0 reads no varying value
    assert np.all(tape.ops[tape.ops[:, 0] == 4, 4:] == -1) and np.all(tape.ops[:, 1] == first + np.arange(tape.ops.shape[0]))
    assert tape.ops.shape[0] < 0.7 * np.sum(prog.code >= 2)  # shared subexpressions: 89 operations against 143


def test_tape_shares_commuted_products_and_keeps_signed_zeros_apart():
    a, b = ("v", 0), ("v", 1)
    tape = compile_tape([[("+", ("*", a, b), ("c", 0.0)), ("*", ("*", b, a), ("c", 2.0)), ("/", ("c", 1.0), ("c", -0.0))]], 2, [0, 1])
    assert sorted(tape.consts.tolist()) == [-0.0, 0.0, 1.0, 2.0] and np.signbit(tape.consts).sum() == 1
    assert int(np.sum(tape.ops[:, 0] == 4)) == 2  # a*b once, then *2
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(tape.evaluate(np.array([3.0, 4.0])), [12.0, 24.0, -np.inf])


# -- predictions vs simulate -----------------------------------------------------------------

TIMES = np.array([0.0, 0.25, 1.0, 2.0, 2.5, 6.0, 12.0, 12.5, 24.0, 36.0, 48.0, 72.0])


def mm_subjects():
    """Two one_cpt_mm subjects: bolus + ADDL, zero-order infusion, RATE infusion, a reset."""
    schedule = Schedule(
        (Dose(0.0, 500.0, Target("iv"), ii=12.0, addl=3), Dose(2.0, 200.0, Target("iv"), duration=3.0),
         Dose(30.0, 50.0, Target("iv"), rate=20.0, ii=6.0, addl=1), Dose(60.0, 80.0, Target("iv"), reset=True)),
    )  # fmt: skip
    return [({"Vmax": 12.0, "Km": 1.5, "V": 40.0}, schedule, TIMES), ({"Vmax": 30.0, "Km": 8.0, "V": 60.0}, schedule, TIMES[1::2])]


def test_one_cpt_mm_bolus_infusion_repeated_doses_match_simulate():
    # rtol 1e-6: saturable elimination far above and below Km, a reset, two subjects
    spec, subjects = load_model("one_cpt_mm"), mm_subjects()
    y = check_predictions(*build(spec, subjects))
    assert np.all(np.isfinite(y))


def test_virus_tvec_60_days_matches_simulate():
    # rtol 1e-6 over 60 days of the T-VEC schedule (3 visits), every output; counts span 1e0..1e11
    spec = load_model("it_oncolytic_virus")
    schedule = tvec_schedule(3.0, visits=3)
    times = np.array([1.0, 6.0, 24.0, 100.0, 300.0, 504.0, 505.0, 600.0, 840.0, 1000.0, 1440.0])
    system, p, x0, F, design, reference = build(spec, [({}, schedule, times), ({"beta": 1e-10, "k_clear": 2.0}, schedule, times)])
    check_predictions(system, p, x0, F, design, reference, gradient=False)


def test_linear_model_through_the_ode_op_equals_the_exact_op():
    # rtol 1e-6 against linop (exact modal sums): two_cpt_iv, bolus + infusion + ADDL
    spec = load_model("two_cpt_iv")
    schedule = Schedule((Dose(0.0, 100.0, Target("iv"), duration=1.5, ii=12.0, addl=2), Dose(5.0, 30.0, Target("iv"))))
    system, p, x0, F, design, reference = build(spec, [({"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}, schedule, TIMES), ({}, schedule, TIMES)])
    K = np.concatenate([rate_matrix(resolve(spec, s)) for s in ({"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}, {})])
    C = np.zeros((2, 1, 2))
    C[:, 0, 0] = 1.0 / p[:, system.input_names.index("V1")]
    exact = linear_predict(K, F, C, design).eval(mode=PERFORM)
    got = predict(system, p, x0, F, design)
    np.testing.assert_allclose(got, exact, rtol=RTOL, atol=1e-12 * np.abs(exact).max())
    np.testing.assert_allclose(reference, exact, rtol=1e-9)


# -- gradients ------------------------------------------------------------------------------


def loss_functions(system, design, scale, mode=PERFORM, **kwargs):
    rng = np.random.default_rng(0)
    w, v = rng.normal(size=design.n_obs), rng.normal(size=design.n_obs)
    pv, xv, Fv = pt.matrix("p"), pt.matrix("x0"), pt.tensor3("F")
    y = ode_predict(system, pv, xv, Fv, design, **kwargs)
    loss = (w * y).sum() + (v * y**2).sum() / scale
    value = pytensor.function([pv, xv, Fv], loss, mode=mode)
    grads = pytensor.function([pv, xv, Fv], pytensor.grad(loss, [pv, xv, Fv]), mode=mode)
    return value, grads


def check_gradients(system, p, x0, F, design, reference, *, rtol=1e-4, skip_zero_x0=True, method=None, zero_step=1e-3):
    kwargs = {"rtol": 1e-10, "atol": 1e-12, "method": method}
    value, grads = loss_functions(system, design, np.abs(reference).max(), **kwargs)
    analytic = grads(p, x0, F)
    inputs = [p, x0, F]
    for which, (x, g) in enumerate(zip(inputs, analytic, strict=True)):
        fd = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            h = 1e-4 * abs(x[index]) if x[index] != 0 else zero_step  # absolute for zeros: amounts of any unit stay tiny
            up, down = [a.copy() for a in inputs], [a.copy() for a in inputs]
            up[which][index] += h
            down[which][index] -= h
            fd[index] = (value(*up) - value(*down)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=rtol, atol=1e-6 * np.abs(fd).max(), err_msg=["p", "x0", "F"][which])


def test_gradients_match_central_differences_one_cpt_mm():
    # rtol 1e-4 on p̄ (Vmax, Km, V), x̄0 and F̄ (bolus amounts and infusion rates)
    spec = load_model("one_cpt_mm")
    schedule = Schedule((Dose(0.0, 300.0, Target("iv")), Dose(4.0, 40.0, Target("iv"), duration=2.0), Dose(12.0, 100.0, Target("iv"))))
    subjects = [({"Vmax": 12.0, "Km": 1.5, "V": 40.0}, schedule, TIMES[1:]), ({}, schedule, TIMES[2::3])]
    system, p, x0, F, design, reference = build(spec, subjects)
    x0[:, 0] = [5.0, 0.0]  # a non-zero initial amount, so x̄0 is exercised
    check_gradients(system, p, x0, F, design, reference)


def test_gradients_match_central_differences_nonlinear_outputs():
    # rtol 1e-4: virus model over 10 days, outputs with state- and parameter-dependent expressions (** (1/3), /V)
    spec = load_model("it_oncolytic_virus")
    schedule = Schedule((Dose(0.0, 2e6, Target("it")), Dose(96.0, 1e8, Target("it"))))
    times = np.array([2.0, 24.0, 90.0, 100.0, 240.0])
    system, p, x0, F, design, reference = build(spec, [({}, schedule, times)], ["virus_tumor", "tumor_diameter", "virus_blood"])
    check_gradients(system, p, x0, F, design, reference)


# -- numba backend and samplers -------------------------------------------------------------


def check_numba_equals_perform(method: str):
    """y and its gradient on one_cpt_mm by the numba backend and by perform (rtol 1e-12, no object
    mode); returns the system, inputs and design for further checks."""
    spec = load_model("one_cpt_mm")
    schedule = Schedule((Dose(0.0, 300.0, Target("iv"), ii=8.0, addl=2), Dose(4.0, 40.0, Target("iv"), duration=2.0)))
    system, p, x0, F, design, _ = build(spec, [({}, schedule, TIMES), ({"Km": 9.0}, schedule, TIMES[::2])])
    pv, xv, Fv = pt.matrix("p"), pt.matrix("x0"), pt.tensor3("F")
    y = ode_predict(system, pv, xv, Fv, design, method=method)
    loss = (np.random.default_rng(0).normal(size=design.n_obs) * y**2).sum()
    outputs = [y, *pytensor.grad(loss, [pv, xv, Fv])]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*object mode.*")
        compiled = pytensor.function([pv, xv, Fv], outputs, mode="NUMBA")(p, x0, F)
    wanted = pytensor.function([pv, xv, Fv], outputs, mode=PERFORM)(p, x0, F)
    for got, want in zip(compiled, wanted, strict=True):
        assert np.all(np.isfinite(want))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * np.abs(want).max())
    return system, p, x0, F, design


def test_numba_backend_equals_perform_without_object_mode():
    check_numba_equals_perform("dp5")  # what "auto" picks for one_cpt_mm


def test_failed_solve_gives_nan_for_that_subject_only():
    spec = load_model("one_cpt_mm")
    schedule = Schedule((Dose(0.0, 300.0, Target("iv")),))
    system, p, x0, F, design, _ = build(spec, [({}, schedule, TIMES), ({}, schedule, TIMES)])
    p[0, system.input_names.index("Km")] = np.nan
    y = predict(system, p, x0, F, design)
    bad = design.obs_subject == 0
    assert np.all(np.isnan(y[bad][1:])) and np.all(np.isfinite(y[~bad]))


def test_nutpie_samples_a_tiny_model():
    # smoke test: 3 subjects of one_cpt_mm, Vmax per subject, compiled for nutpie with no object mode
    pm = pytest.importorskip("pymc")
    nutpie = pytest.importorskip("nutpie")
    spec = load_model("one_cpt_mm")
    schedule = Schedule((Dose(0.0, 400.0, Target("iv")),))
    truth = [{"Vmax": 10.0}, {"Vmax": 14.0}, {"Vmax": 7.0}]
    times = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0])
    system, _, x0, F, design, reference = build(spec, [(t, schedule, times) for t in truth])
    observed = reference * np.exp(np.random.default_rng(2).normal(0.0, 0.1, reference.size))
    N = len(truth)
    with pm.Model() as model:
        log_vmax = pm.Normal("log_Vmax", np.log(10.0), 0.5, shape=N)
        log_V = pm.Normal("log_V", np.log(50.0), 0.5)
        env = {"Vmax": pt.exp(log_vmax), "Km": 2.0, "V": pt.exp(log_V)}
        y = ode_predict(system, system.stack_inputs(env, N), x0, F, design)
        pm.LogNormal("DV", mu=pt.log(y), sigma=pm.HalfNormal("sigma", 0.5), observed=observed)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*object mode.*")
        compiled = nutpie.compile_pymc_model(model)
        trace = nutpie.sample(compiled, draws=20, tune=20, chains=1, seed=3, progress_bar=False)
    assert np.all(np.isfinite(trace.posterior["log_V"].values))


# -- the stiff method (ROS34PW2) ------------------------------------------------------------
#
# Independent references: scipy solve_ivp(Radau, rtol 1e-10, atol 1e-12 × the state's scale) on
# the same programs' f and ∂f/∂x, restarted at every event exactly as the Op is (same EventTable);
# and, for one_cpt_mm, the Lambert-W closed form. The Op runs at rtol 1e-9 there, so its global
# error (~3x rtol for ROS34PW2 over these designs) stays below the checked rtol 1e-7.

STIFF_RTOL = 1e-7


def radau_reference(system, p, x0, F, design, rtol=1e-10):
    """(y (M,), amounts (M, n) just before g is applied) by piecewise Radau; observations in design order."""
    from scipy.integrate import solve_ivp

    from itpk.odeop import BOLUS, INF_OFF, INF_ON, RESET, EventTable, dense_jacobian

    events = EventTable.from_design(design)
    n, g = system.n_states, system.groups
    y, amounts = np.full(design.n_obs, np.nan), np.full((design.n_obs, n), np.nan)
    for i in range(design.n_subjects):
        def rhs(t, x, u, i=i):
            v = system.program.evaluate(np.concatenate([x, p[i]]))
            out = u.copy()
            np.add.at(out, system.rc[g[0]:g[1], 0], v[g[0]:g[1]])
            return out

        def jac(t, x, u, i=i):
            return dense_jacobian(system, x, p[i])

        x, u, running, t = x0[i].astype(float).copy(), np.zeros(n), set(), 0.0
        scale = max(np.abs(x0[i]).max(), np.abs(F[i]).max(), 1e-300)
        for e in range(events.start[i], events.start[i + 1]):
            te, kind, d = events.time[e], events.kind[e], events.index[e]
            if te > t:
                sol = solve_ivp(rhs, (t, te), x, method="Radau", jac=jac, rtol=rtol, atol=1e-12 * scale, args=(u,))
                assert sol.success, sol.message
                x, t = sol.y[:, -1], te
            if kind == RESET:
                x, u, running = x0[i].astype(float).copy(), np.zeros(n), set()
            elif kind == BOLUS:
                x = x + F[i, d]
            elif kind in (INF_ON, INF_OFF):
                (running.add if kind == INF_ON else running.discard)(d)
                u = np.sum([F[i, dd] for dd in running], axis=0) if running else np.zeros(n)
            else:
                o = design.obs_output[d]
                y[d] = system.program.evaluate(np.concatenate([x, p[i]]))[g[3] + o]
                amounts[d] = x
    return y, amounts


def with_state_outputs(name: str) -> ModelSpec:
    """The model with one extra output per state (``amt_<state>`` = the amount), to check amounts through the Op."""
    import tomllib
    from importlib import resources

    from itpk.spec import parse_model

    raw = tomllib.loads((resources.files("itpk.models") / f"{name}.toml").read_text(encoding="utf-8"))
    for state in raw["compartments"]:
        raw["outputs"][f"amt_{state}"] = {"expr": state, "unit": raw["compartments"][state]["amount_unit"]}
    return parse_model(raw)


def virus_events() -> Schedule:
    """T-VEC visits 1–2 (IT boluses at 0 and 504 h), an IV infusion of virus over 2 h at 100 h and a reset at 700 h."""
    tvec = tvec_schedule(3.0, visits=2)
    return Schedule((*tvec.doses, Dose(100.0, 4e6, Target("iv"), duration=2.0)), resets=(700.0,))


VIRUS_TIMES = np.array([0.5, 3.0, 24.0, 99.0, 101.0, 102.0, 150.0, 504.0, 505.0, 650.0, 700.0, 701.0, 800.0, 1000.0])


def test_rosenbrock_virus_states_and_outputs_match_radau():
    # rtol 1e-7 on every amount and output: T-VEC boluses, an IV infusion, a reset, two subjects (one with NAb off)
    spec = with_state_outputs("it_oncolytic_virus")
    subjects = [({}, virus_events(), VIRUS_TIMES), ({"beta": 1e-10, "k_clear": 2.0, "nab_max": 0.0}, virus_events(), VIRUS_TIMES)]
    system, p, x0, F, design, _ = build(spec, subjects)
    want, amounts = radau_reference(system, p, x0, F, design)
    got, steps = predict(system, p, x0, F, design, method="rosenbrock", rtol=1e-9, return_steps=True)
    np.testing.assert_allclose(got, want, rtol=STIFF_RTOL, atol=1e-12 * np.abs(want).max())
    amt = [system.output_names.index(f"amt_{s}") for s in system.state_names]
    for k, o in enumerate(amt):  # the amount outputs are the states themselves
        rows = design.obs_output == o
        np.testing.assert_allclose(got[rows], amounts[rows, k], rtol=STIFF_RTOL, atol=1e-12 * np.abs(amounts[:, k]).max())
    assert np.all(steps[:, 0] > 0) and np.all(steps[:, 1] < steps[:, 0])


def test_rosenbrock_one_cpt_mm_matches_radau_with_bolus_infusion_reset():
    # rtol 1e-7: saturable elimination above and below Km, bolus + ADDL, zero-order infusion, RATE infusion, reset
    spec, subjects = load_model("one_cpt_mm"), mm_subjects()
    system, p, x0, F, design, reference = build(spec, subjects)
    want, _ = radau_reference(system, p, x0, F, design)
    np.testing.assert_allclose(want, reference, rtol=1e-6)  # the Radau helper agrees with itpk.simulate (LSODA)
    got = predict(system, p, x0, F, design, method="rosenbrock", rtol=1e-9)
    np.testing.assert_allclose(got, want, rtol=STIFF_RTOL, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("method", ["rosenbrock", "dp5"])
def test_mm_bolus_matches_lambert_w_through_the_op(method):
    # rtol 1e-7 against C(t) = Km·W((C0/Km)·exp((C0 − Vmax/V·t)/Km)), from C0 = 40·Km down to C << Km
    from scipy.special import lambertw

    spec = load_model("one_cpt_mm")
    params = {"Vmax": 10.0, "Km": 2.0, "V": 50.0}
    times = np.array([0.1, 1.0, 2.5, 5.0, 10.0, 24.0, 48.0, 72.0, 120.0])
    system, p, x0, F, design, _ = build(spec, [(params, Schedule((Dose(0.0, 4000.0, Target("iv")),)), times)])
    got = predict(system, p, x0, F, design, method=method, rtol=1e-9)
    c0, km = 4000.0 / params["V"], params["Km"]
    exact = km * lambertw((c0 / km) * np.exp((c0 - params["Vmax"] / params["V"] * times) / km)).real
    np.testing.assert_allclose(got, exact, rtol=STIFF_RTOL, atol=1e-14 * c0)


def test_rosenbrock_gradients_match_central_differences_one_cpt_mm():
    # rtol 1e-4 on p̄, x̄0, F̄ (bolus amounts, infusion rates), the same check as for DP5
    spec = load_model("one_cpt_mm")
    schedule = Schedule((Dose(0.0, 300.0, Target("iv")), Dose(4.0, 40.0, Target("iv"), duration=2.0), Dose(12.0, 100.0, Target("iv"))))
    subjects = [({"Vmax": 12.0, "Km": 1.5, "V": 40.0}, schedule, TIMES[1:]), ({}, schedule, TIMES[2::3])]
    system, p, x0, F, design, reference = build(spec, subjects)
    x0[:, 0] = [5.0, 0.0]
    check_gradients(system, p, x0, F, design, reference, method="rosenbrock")


def test_rosenbrock_gradients_match_central_differences_virus_with_infusion_and_reset():
    # rtol 1e-4: virus model over 10 days, IT boluses, an IV infusion, a reset; outputs with ** (1/3) and /V.
    # Zero entries step by 1e-5 (not 1e-3): F into the 0..1 states P and N must stay a small perturbation.
    # (DP5 fails this one: after the reset every amount but U is 0, its states-only step control lets h
    # outgrow the stability limit, and ∂x/∂x0 explodes to ~1e16; see the module docstring.)
    spec = load_model("it_oncolytic_virus")
    schedule = Schedule((Dose(0.0, 2e6, Target("it")), Dose(30.0, 1e6, Target("iv"), duration=2.0), Dose(96.0, 1e8, Target("it"))),
                        resets=(200.0,))
    times = np.array([2.0, 24.0, 31.0, 90.0, 100.0, 190.0, 201.0, 240.0])
    system, p, x0, F, design, reference = build(spec, [({}, schedule, times)], ["virus_tumor", "tumor_diameter", "virus_blood"])
    check_gradients(system, p, x0, F, design, reference, method="rosenbrock", zero_step=1e-5)


def test_rosenbrock_sensitivities_stay_accurate_at_loose_tolerance():
    # ∂y/∂θ at rtol 1e-6 within 1e-3 (relative to the largest entry) of rtol 1e-10, over 42 days of T-VEC;
    # the states-only error control leaves the sensitivities to the method's stability (an explicit
    # method at its stability limit lets them grow without bound)
    spec = load_model("it_oncolytic_virus")
    system, p, x0, F, design, _ = build(spec, [({}, tvec_schedule(3.0, visits=3), np.array([24.0, 300.0, 505.0, 840.0, 1000.0]))])
    pv, xv, Fv = pt.matrix("p"), pt.matrix("x0"), pt.tensor3("F")

    def jac(rtol):
        y = ode_predict(system, pv, xv, Fv, design, method="rosenbrock", rtol=rtol)
        return pytensor.function([pv, xv, Fv], y.owner.outputs[1], mode=PERFORM)(p, x0, F)

    loose, tight = jac(1e-6), jac(1e-10)
    assert np.all(np.isfinite(loose))
    np.testing.assert_allclose(loose, tight, rtol=0, atol=1e-3 * np.abs(tight).max())


def test_rosenbrock_needs_far_fewer_steps_than_dp5_on_the_stiff_virus_model():
    # same rtol 1e-6: the explicit method's step is capped by stability (blood clearance × (1 + nab_max·N)),
    # the implicit one's by accuracy only (at rtol 1e-8 the gap narrows to ~2x: order 3 against order 5)
    spec = load_model("it_oncolytic_virus")
    system, p, x0, F, design, _ = build(spec, [({}, tvec_schedule(3.0, visits=3), np.array([24.0, 505.0, 1000.0]))])
    steps = {m: predict(system, p, x0, F, design, method=m, rtol=1e-6, gradient=False, return_steps=True)[1][0, 0]
             for m in ("dp5", "rosenbrock")}
    assert 0 < 5 * steps["rosenbrock"] < steps["dp5"], steps


def test_auto_picks_the_stiff_method_for_the_virus_model_only():
    from itpk.odeop import choose_method, design_horizon

    virus = OdeSystem.from_spec(load_model("it_oncolytic_virus"))
    mm = OdeSystem.from_spec(load_model("one_cpt_mm"))
    assert virus.typical_rate == pytest.approx(5.002, rel=1e-3)  # blood clearance k_clear dominates
    assert mm.typical_rate == pytest.approx(10.0 / 50.0 / 2.0)  # Vmax/(V·Km) at zero amount
    assert choose_method(virus, 1440.0) == "rosenbrock" and choose_method(mm, 72.0) == "dp5"
    assert choose_method(virus, 24.0) == "dp5"  # a day of blood clearance is not worth an implicit method
    _, _, _, _, design, _ = build(load_model("one_cpt_mm"), [({}, Schedule((Dose(5.0, 1.0, Target("iv"), duration=100.0),)), TIMES)])
    assert design_horizon(design) == 105.0  # to the infusion's end, past the last observation (72 h)
    with pytest.raises(Exception, match="method 'euler' is unknown"):
        predict(mm, np.ones((1, 3)), np.zeros((1, 1)), np.zeros((1, 1, 1)), design, method="euler")


def test_rosenbrock_numba_backend_equals_perform_and_fails_per_subject():
    system, p, x0, F, design = check_numba_equals_perform("rosenbrock")
    p[0, system.input_names.index("Km")] = np.nan
    y = predict(system, p, x0, F, design, method="rosenbrock")
    bad = design.obs_subject == 0
    assert np.all(np.isnan(y[bad][1:])) and np.all(np.isfinite(y[~bad]))


# -- which sensitivities are integrated -----------------------------------------------------


def test_tracked_columns_skip_constant_inputs_only():
    # p: a free and a fixed parameter; x0: a constant and a free initial amount; F: a free fraction
    # into state 0 only, through advanced indexing of a stack (as inference builds dose vectors)
    from itpk.odeop import tracked_columns

    N, n, D = 3, 2, 2
    free = pt.vector("free")
    p = pt.stack([free * pt.ones(N), pt.as_tensor_variable(np.full(N, 2.0)) * pt.ones(N)], axis=-1)
    x0 = pt.stack([pt.zeros(N), pt.exp(free)], axis=-1)
    route = pt.stack([pt.stack([pt.sigmoid(free) * pt.ones(N), pt.zeros(N)], axis=-1)], axis=0)  # (1, N, n)
    F = route[np.zeros((N, D), dtype=np.int64), np.repeat(np.arange(N)[:, None], D, axis=1)] * np.ones((N, D, 1))
    mask = tracked_columns(p, x0, F, 2, n, D)
    np.testing.assert_array_equal(mask, [True, False, False, True, True, False, True, False])
    opaque = pt.matrix("opaque")  # an input the analysis cannot see into: every column tracked
    assert tracked_columns(opaque, x0, F, 2, n, D)[:2].all()


def test_tracked_columns_follow_products_with_constant_matrices_and_reshapes():
    # F as itpk.inference builds it: per-dose amounts (constant G) @ route fractions (a dot of free values
    # with a constant incidence matrix, plus a constant, reshaped to (N, R, n)): only the fractions' targets
    from itpk.odeop import tracked_columns

    N, D, n, R = 3, 4, 5, 2
    free = pt.vector("free")
    values = pt.stack([pt.sigmoid(free) * pt.ones(N), (1 - pt.sigmoid(free)) * pt.ones(N)], axis=1)  # (N, 2)
    rows = np.zeros((2, R * n))
    rows[0, 1], rows[1, 3] = 1.0, 1.0  # route 0: states 1 and 3
    constant = np.zeros(R * n)
    constant[n + 4] = 1.0  # route 1: all into state 4, a constant
    fractions = (pt.dot(values, rows) + constant).reshape((N, R, n))
    G = np.ones((N, D, R))
    F = pt.matmul(G, fractions)
    p = pt.stack([free * pt.ones(N)], axis=-1)
    x0 = pt.zeros((N, n))
    mask = tracked_columns(p, x0, F, 1, n, D)
    want_F = np.tile([False, True, False, True, False], D)
    np.testing.assert_array_equal(mask, np.concatenate([[True], np.zeros(n, bool), want_F]))
    # a free matrix on the left makes every column whose constant right-hand rows are not all zero free
    F2 = pt.matmul(pt.exp(free)[0] * np.ones((N, D, n)), pt.as_tensor_variable(np.diag([1.0, 0, 1, 0, 0])[None].repeat(N, 0)))
    np.testing.assert_array_equal(tracked_columns(p, x0, F2, 1, n, D)[1 + n :], np.tile([True, False, True, False, False], D))


def test_dose_factors_give_the_same_virus_fit_gradient_as_the_dose_entries(monkeypatch):
    # F = amounts @ route fractions: sensitivities to the 2 tracked fractions instead of the 8 tracked dose
    # entries (4 doses x virus, blood); same states and steps, so the log-density gradient agrees to rtol 1e-10
    from itpk import odeop
    from itpk.dataset import read_dataset
    from itpk.inference import build_model

    spec = load_model("it_oncolytic_virus")
    data = read_dataset("data/example_virus.csv", spec)
    seen = []

    def gradient():
        model, _ = build_model(spec, data)
        point = {k: v + 0.1 for k, v in model.initial_point().items()}
        return model.compile_dlogp(mode=PERFORM)(point)

    def spy(F, N, D, n):
        Gd, Fr = factors(F, N, D, n)
        seen.append(Gd.shape)
        return Gd, Fr

    factors = odeop.dose_factors
    monkeypatch.setattr(odeop, "dose_factors", spy)
    factored = gradient()
    assert seen == [(6, 4, 1)]  # 6 subjects, 4 doses, one route (it)
    monkeypatch.setattr(odeop, "dose_factors", lambda F, N, D, n: (np.zeros((N, D, 0)), F))
    entries = gradient()
    assert np.all(np.isfinite(factored)) and np.abs(entries).max() > 0
    np.testing.assert_allclose(factored, entries, rtol=1e-10, atol=1e-12 * np.abs(entries).max())


def test_dose_factors_with_boluses_infusion_and_reset_match_the_plain_doses():
    # F = Gd @ Fr (R = 2, some Gd entries 0) through the factored path against the same F given as numbers:
    # predictions to rtol 1e-10, and ∂/∂Fr against Σ_d Gd[d, r]·∂/∂F[d] to rtol 1e-8 (same states, same steps)
    spec = load_model("it_oncolytic_virus")
    system, p, x0, F, design, _ = build(spec, [({}, virus_events(), VIRUS_TIMES), ({"beta": 1e-10}, virus_events(), VIRUS_TIMES)])
    rng = np.random.default_rng(3)
    N, D, _ = F.shape
    Gd = rng.uniform(0.5, 2.0, (N, D, 2)) * (rng.uniform(size=(N, D, 2)) > 0.25)
    Fr = 0.5 * F[:, :2, :]
    F_plain = np.einsum("idr,irk->idk", Gd, Fr)
    w = rng.normal(size=design.n_obs)
    pv, xv, Fv, Frv = pt.matrix("p"), pt.matrix("x0"), pt.tensor3("F"), pt.tensor3("Fr")
    kw = {"method": "rosenbrock", "rtol": 1e-8}
    y_plain = ode_predict(system, pv, xv, Fv, design, **kw)
    y_fact = ode_predict(system, pv, xv, pt.matmul(Gd, Frv), design, **kw)
    assert y_fact.owner.inputs[2].type.shape[1] in (2, None)  # the Op got Fr, not F
    plain = pytensor.function([pv, xv, Fv], [y_plain, pytensor.grad((w * y_plain).sum(), Fv)], mode=PERFORM)(p, x0, F_plain)
    fact = pytensor.function([pv, xv, Frv], [y_fact, pytensor.grad((w * y_fact).sum(), Frv)], mode=PERFORM)(p, x0, Fr)
    np.testing.assert_allclose(fact[0], plain[0], rtol=1e-10, atol=1e-14 * np.abs(plain[0]).max())
    want = np.einsum("idr,idk->irk", Gd, plain[1])
    np.testing.assert_allclose(fact[1], want, rtol=1e-8, atol=1e-12 * np.abs(want).max())


def test_fit_tolerance_applies_to_the_stiff_method_only():
    from itpk.odeop import DEFAULT_RTOL, FIT_RTOL_STIFF

    def rtol(name, **kwargs):
        spec = load_model(name)
        system, *_, design, _ = build(spec, [({}, tvec_schedule(3.0, visits=2) if name == "it_oncolytic_virus"
                                                       else Schedule((Dose(0.0, 100.0, Target("iv")),)), np.array([24.0, 600.0]))])
        y = ode_predict(system, pt.matrix("p"), pt.matrix("x0"), pt.tensor3("F"), design, **kwargs)
        return float(y.owner.inputs[-1].data[0])

    assert rtol("it_oncolytic_virus", fit=True) == FIT_RTOL_STIFF == 1e-4
    assert rtol("it_oncolytic_virus", fit=True, rtol=1e-6) == 1e-6
    assert rtol("one_cpt_mm", fit=True) == DEFAULT_RTOL


def test_virus_predictions_at_the_fit_tolerance_stay_within_1e_3_of_radau():
    # FIT_RTOL_STIFF (1e-4) over the example data's design (4 T-VEC visits, 77 days): every output within
    # 1e-3 (relative) of Radau rtol 1e-10, against residual errors of 5% (diameter) and 0.5 (log, blood)
    spec = load_model("it_oncolytic_virus")
    times = np.array([0.0, 24.0, 72.0, 168.0, 504.0, 528.0, 840.0, 1176.0, 1512.0, 1848.0])
    subjects = [({}, tvec_schedule(3.0, visits=4), times), ({"beta": 6e-11, "k_efflux": 0.004}, tvec_schedule(1.5, visits=4), times)]
    system, p, x0, F, design, _ = build(spec, subjects, ["virus_blood", "tumor_diameter"])
    want, _ = radau_reference(system, p, x0, F, design)
    got = predict(system, p, x0, F, design, fit=True)
    blood = design.obs_output == 0
    np.testing.assert_allclose(got[~blood], want[~blood], rtol=1e-3)
    np.testing.assert_allclose(got[blood], want[blood], rtol=1e-3, atol=1e-2)  # atol: 1e-3 of the LLOQ (10 copies/mL)


def test_virus_log_density_at_the_fit_tolerance_is_within_0_05_of_a_tight_solve(monkeypatch):
    # the fit's log-density within 0.05 (absolute; a density ratio off by at most 5%) of the same graph
    # solved at rtol 1e-8, at 8 points around the initial point (measured: 0.009 at rtol 3e-4; 0.069 at 3e-3)
    from itpk import odeop
    from itpk.dataset import read_dataset
    from itpk.inference import build_model

    spec = load_model("it_oncolytic_virus")
    data = read_dataset("data/example_virus.csv", spec)
    fitted = build_model(spec, data)[0].compile_logp(mode=PERFORM)
    monkeypatch.setattr(odeop, "FIT_RTOL_STIFF", 1e-8)
    model = build_model(spec, data)[0]
    tight = model.compile_logp(mode=PERFORM)
    rng = np.random.default_rng(11)
    start = model.initial_point()
    for _ in range(8):
        point = {k: v + rng.normal(scale=0.2, size=np.shape(v)) for k, v in start.items()}
        assert abs(fitted(point) - tight(point)) < 0.05


def test_gradient_of_the_virus_fit_graph_is_unchanged_by_skipping_constant_columns(monkeypatch):
    # the log-density gradient of build_model's graph with 16 of 50 columns tracked equals the one with all
    # (same step sequence: the error control sees the states only), rtol 1e-10
    from itpk import odeop
    from itpk.dataset import read_dataset
    from itpk.inference import build_model

    spec = load_model("it_oncolytic_virus")
    data = read_dataset("data/example_virus.csv", spec)

    def gradient():
        model, _ = build_model(spec, data)
        point = {k: v + 0.1 for k, v in model.initial_point().items()}
        return model.compile_dlogp(mode=PERFORM)(point)

    pruned = gradient()
    monkeypatch.setattr(odeop, "tracked_columns", lambda p, x0, F, P, n, D: np.ones(P + n + D * n, dtype=bool))
    full = gradient()
    assert np.all(np.isfinite(pruned)) and np.abs(full).max() > 0
    np.testing.assert_allclose(pruned, full, rtol=1e-10, atol=1e-12 * np.abs(full).max())
