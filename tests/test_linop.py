"""The pytensor prediction Op of linear models (itpk.linop) against the exact numpy engine.

Reference: ``itpk.simulate.simulate`` (matrix exponentials stepped through every
event, independent of the modal sums in the Op). Tolerances, stated per test:

- predictions: rtol 1e-10, atol 1e-12 × the largest prediction;
- gradients of a random scalar function of y: central finite differences,
  rtol 1e-6, atol 1e-7 × the largest gradient of that input;
- numba backend vs ``perform``: rtol 1e-13 (the same kernels).

Every call asks for the Op (``method="eigen"``); ``linear_predict``'s default takes the
closed forms of :mod:`itpk.closedform` where they apply (tests/test_closedform.py).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from itpk import load_model
from itpk.errors import FitError
from itpk.events import Dose, Schedule, Target
from itpk.linop import Design, linear_predict
from itpk.simulate import simulate
from itpk.spec import ModelSpec, parse_model
from itpk.system import evaluate_outputs, input_fractions, rate_matrix, resolve

RTOL, ATOL_REL = 1e-10, 1e-12  # predictions vs simulate
GRAD_RTOL, GRAD_ATOL_REL = 1e-6, 1e-7  # gradients vs central differences
PERFORM = "FAST_COMPILE"  # python linker: the Ops' perform
EIGEN = "eigen"  # this file tests the Op; the closed forms of 1–2 compartment models: test_closedform.py


# -- building K, F, C and the design from model files and schedules ---------------------


def build(spec: ModelSpec, subjects: list[tuple[dict, Schedule, np.ndarray]]):
    """K, F, C, Design and simulate's predictions for subjects (params, schedule, times).

    Every output of the model is observed at every time. Doses are ADDL-expanded
    into separate doses; infusions are truncated at the next reset; a steady-state
    dose keeps its duration and gets its period (II, inf for a constant infusion).
    """
    outputs = list(spec.outputs)
    n = len(spec.compartments)
    values = [resolve(spec, p) for p, _, _ in subjects]
    doses, resets = [], []
    for v, (_, schedule, _) in zip(values, subjects, strict=True):
        r = sorted({*schedule.resets, *(d.time for d in schedule.doses if d.reset or d.ss == 1)})
        rows = []
        for d in schedule.doses:
            for k, t in enumerate(d.times()):
                steady = bool(d.ss) and k == 0
                duration = d.infusion_duration if d.is_infusion else 0.0
                later = [x for x in r if t < x < t + duration]
                duration = later[0] - t if later and not steady else duration
                scale = d.infusion_rate if d.is_infusion else d.amount
                period = (d.ii or math.inf) if steady else 0.0
                rows.append((t, duration, scale * input_fractions(v, d.target)[0], period))
        doses.append(rows)
        resets.append(np.array(r))
    N, D = len(subjects), max(len(d) for d in doses)
    dose_time, dose_duration = np.full((N, D), np.nan), np.zeros((N, D))  # NaN padding must be ignored
    dose_valid, F, period = np.zeros((N, D), bool), np.zeros((N, D, n)), np.zeros((N, D))
    for i, rows in enumerate(doses):
        for j, (t, duration, f, p) in enumerate(rows):
            dose_time[i, j], dose_duration[i, j], dose_valid[i, j], F[i, j], period[i, j] = t, duration, True, f, p
    K = np.concatenate([rate_matrix(v) for v in values])
    unit = np.vstack([np.zeros(n), np.eye(n)])[None]  # amounts 0 and e_k: outputs are linear in x
    C = np.stack([
        np.stack([(out := evaluate_outputs(v, unit, [o])[o][0])[1:] - out[0] for o in outputs]) for v in values
    ])
    obs_subject, obs_time, obs_output, obs_after, reference = [], [], [], [], []
    for i, (p, schedule, times) in enumerate(subjects):
        sim = simulate(spec, schedule, p, times)
        for t_index, t in enumerate(times):
            before = resets[i][resets[i] <= t]
            for o, name in enumerate(outputs):
                obs_subject.append(i)
                obs_time.append(t)
                obs_output.append(o)
                obs_after.append(before[-1] if before.size else -math.inf)
                reference.append(sim.outputs[name][0, t_index])
    design = Design(dose_time, dose_duration, dose_valid, obs_subject, obs_time, obs_output, obs_after, period)
    return K, F, C, design, np.array(reference)


def inputs(K, F, C, static=False):
    """Symbolic K, F, C; with ``static`` their shapes are known, so n <= 2 takes the small kernels."""
    if static:
        return pt.tensor("K", shape=K.shape), pt.tensor("F", shape=F.shape), pt.tensor("C", shape=C.shape)
    return pt.tensor3("K"), pt.tensor3("F"), pt.tensor3("C")


def predict(K, F, C, design, mode=PERFORM, static=False, method=EIGEN):
    Kv, Fv, Cv = inputs(K, F, C, static)
    return pytensor.function([Kv, Fv, Cv], linear_predict(Kv, Fv, Cv, design, method=method), mode=mode)(K, F, C)


def check_predictions(K, F, C, design, reference, rtol=RTOL):
    got = predict(K, F, C, design)
    np.testing.assert_allclose(got, reference, rtol=rtol, atol=ATOL_REL * np.abs(reference).max())
    return got


def loss_and_gradients(design, scale=1.0, seed=0, mode=PERFORM, shapes=None, method=EIGEN):
    """L = Σ w·y + Σ v·y²/scale (random w, v: a nonlinear function of y) and its gradient w.r.t. K, F, C.

    ``shapes``: (K, F, C) arrays whose shapes become static (the small kernels for n <= 2).
    """
    rng = np.random.default_rng(seed)
    w, v = rng.normal(size=design.n_obs), rng.normal(size=design.n_obs)
    Kv, Fv, Cv = inputs(*shapes, static=True) if shapes is not None else inputs(None, None, None)
    y = linear_predict(Kv, Fv, Cv, design, method=method)
    loss = (w * y).sum() + (v * y**2).sum() / scale
    value = pytensor.function([Kv, Fv, Cv], loss, mode=mode)
    grads = pytensor.function([Kv, Fv, Cv], pytensor.grad(loss, [Kv, Fv, Cv]), mode=mode)
    return value, grads


def check_gradients(K, F, C, design, *, rtol=GRAD_RTOL, seed=0, static=False, method=EIGEN):
    scale = np.abs(predict(K, F, C, design, static=static, method=method)).max()
    value, grads = loss_and_gradients(design, scale, seed, shapes=(K, F, C) if static else None, method=method)
    analytic = grads(K, F, C)
    inputs = [K, F, C]
    for which, (x, g) in enumerate(zip(inputs, analytic, strict=True)):
        h = 1e-6 * np.abs(x).max()
        fd = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            up, down = [a.copy() for a in inputs], [a.copy() for a in inputs]
            up[which][index] += h
            down[which][index] -= h
            fd[index] = (value(*up) - value(*down)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=rtol, atol=GRAD_ATOL_REL * np.abs(fd).max(), err_msg="KFC"[which])


# -- predictions equal simulate ---------------------------------------------------------

TIMES = np.array([0.0, 0.25, 1.0, 2.0, 2.5, 6.0, 12.0, 12.5, 24.0, 36.0, 48.0, 72.0])
OVERLAP_TIMES = np.array([0.0, 1.0, 6.0, 12.0, 18.0, 29.0, 31.0, 40.0, 41.0, 50.0, 60.0, 70.0, 89.0, 90.0, 95.0, 113.0, 115.0, 130.0])


def test_two_cpt_oral_bolus_infusion_addl_matches_simulate():
    # rtol 1e-10 (3×3: LAPACK eigenvectors); plasma at the oral dose time exactly 0
    spec = load_model("two_cpt_oral")
    schedule = Schedule((
        Dose(0.0, 100.0, Target("po"), ii=12.0, addl=3),
        Dose(2.0, 50.0, Target("iv"), duration=0.5),
        Dose(30.0, 40.0, Target("iv"), rate=20.0, ii=6.0, addl=1),
    ))
    subjects = [
        ({"ka": 1.3, "CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}, schedule, TIMES),
        ({"ka": 0.4, "CL": 9.0, "V1": 30.0, "Q": 2.0, "V2": 20.0, "F": 0.6}, schedule, TIMES[::2]),
    ]
    K, F, C, design, reference = build(spec, subjects)
    y = check_predictions(K, F, C, design, reference)
    assert np.all(y[design.obs_time == 0.0] == 0.0)  # at an oral dose's time: exactly 0, not ±1e-16


def test_three_cpt_iv_overlapping_infusions_match_simulate():
    # rtol 1e-10; ADDL infusions longer than the interval overlap (superposition)
    spec = load_model("three_cpt_iv")
    schedule = Schedule((Dose(0.0, 500.0, Target("iv"), duration=8.0, ii=6.0, addl=2), Dose(1.0, 100.0, Target("iv"))))
    p = {"CL": 2.9, "V1": 9.5, "Q2": 14.0, "V2": 31.0, "Q3": 1.3, "V3": 140.0}
    check_predictions(*build(spec, [(p, schedule, TIMES)]))


def it_linear_subjects():
    """Routes it/iv/sc, bolus + infusions + ADDL, a reset that cuts an infusion short, and an EVID-4 dose."""
    first = Schedule(
        (
            Dose(0.0, 10.0, Target("it"), ii=24.0, addl=1),
            Dose(3.0, 5.0, Target("iv"), duration=2.0),
            Dose(6.0, 8.0, Target("sc")),
            Dose(26.0, 12.0, Target("iv"), duration=20.0),  # stopped by the reset at 36 h
            Dose(48.0, 4.0, Target("it"), reset=True),
        ),
        resets=(36.0,),
    )
    second = Schedule((Dose(1.0, 20.0, Target("sc"), ii=12.0, addl=2), Dose(2.0, 3.0, Target("it"), rate=6.0)))
    times = np.array([0.0, 0.5, 3.0, 4.0, 6.0, 10.0, 24.0, 30.0, 36.0, 40.0, 48.0, 50.0, 72.0])
    return [
        ({}, first, times),
        ({"CL": 3.1, "k_out": 0.2, "f_leak": 0.35, "ka_sc": 0.05, "DIAM": 3.0, "Kp": 0.5}, second, times[1:]),
    ]


def test_it_linear_routes_reset_and_infusions_match_simulate():
    # rtol 1e-10, every output (plasma, tumor, lesion2, lymph) at every time
    y = check_predictions(*build(load_model("it_linear"), it_linear_subjects()))
    assert np.all(np.isfinite(y))


def test_one_and_two_compartment_closed_form_eigenpairs_match_simulate():
    # rtol 1e-10: n = 1 and the 2×2 closed-form eigendecomposition (triangular and full)
    schedule = Schedule((Dose(0.0, 100.0, Target("iv"), duration=1.5, ii=12.0, addl=2), Dose(5.0, 30.0, Target("iv"))))
    check_predictions(*build(load_model("one_cpt_iv"), [({"CL": 4.2, "V": 33.0}, schedule, TIMES)]))
    check_predictions(*build(load_model("two_cpt_iv"), [({"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}, schedule, TIMES)]))
    oral = Schedule((Dose(0.0, 100.0, Target("po"), ii=12.0, addl=2), Dose(5.0, 30.0, Target("iv"), duration=1.0)))
    check_predictions(*build(load_model("one_cpt_oral"), [({"ka": 0.83, "CL": 4.2, "V": 33.0}, oral, TIMES)]))


def cyclic_model() -> ModelSpec:
    """a -> b -> c -> a plus elimination from a: complex eigenvalues."""
    return parse_model({
        "name": "cyclic",
        "time_unit": "h",
        "compartments": {c: {"amount_unit": "mg"} for c in "abc"},
        "parameters": {"k": {"value": 2.0, "unit": "1/h"}, "ke": {"value": 0.1, "unit": "1/h"}},
        "flows": {"a -> b": "k", "b -> c": "k", "c -> a": "k", "a -> out": "ke"},
        "routes": {"iv": {"into": {"a": 1}}, "split": {"into": {"b": 0.4, "c": 0.6}}},
        "outputs": {"b": {"expr": "b", "unit": "mg"}, "total": {"expr": "a + b + c", "unit": "mg"}},
    })


def cyclic_subjects():
    schedule = Schedule((Dose(0.0, 100.0, Target("iv")), Dose(1.0, 50.0, Target("split"), duration=2.0, ii=5.0, addl=1)))
    return [({}, schedule, TIMES[:8]), ({"k": 0.7, "ke": 0.3}, schedule, TIMES[:8])]


def test_complex_eigenvalues_match_simulate():
    # rtol 1e-10; the cyclic flow must really give complex eigenvalues
    spec = cyclic_model()
    K, F, C, design, reference = build(spec, cyclic_subjects())
    assert np.all(np.abs(np.linalg.eigvals(K).imag).max(axis=1) > 0.1)
    check_predictions(K, F, C, design, reference)


def test_no_elimination_compartment_zero_eigenvalue():
    # rtol 1e-10: CL = 0 gives λ = 0 exactly (2×2 closed form) and ~1e-17 (3×3 LAPACK); φ(0, u) = u
    schedule = Schedule((Dose(0.0, 100.0, Target("po")), Dose(2.0, 30.0, Target("iv"), duration=4.0)))
    for name, p in (("one_cpt_oral", {"ka": 0.9, "CL": 0.0, "V": 20.0}), ("two_cpt_oral", {"ka": 0.9, "CL": 0.0, "V1": 20.0, "Q": 3.0, "V2": 40.0})):
        K, F, C, design, reference = build(load_model(name), [(p, schedule, TIMES)])
        assert np.abs(np.linalg.eigvals(K)).min() < 1e-12
        check_predictions(K, F, C, design, reference)
        check_gradients(K, F, C, design)


def test_near_equal_eigenvalues_stay_accurate():
    # ka = CL/V·(1 + 1e-9): cond(V) ~ 2e9. Predictions within 1e-6 of the profile's maximum
    # (simulate switches to expm here); gradients finite, and the ones the model uses
    # (dL/dka = K̄[1,0] − K̄[0,0], dL/dk = −K̄[1,1]) within 1e-6 × max|K̄| of central differences
    # of simulate (step 1e-4·k). K̄[0,1], a structurally zero entry, is ill-conditioned here: not checked.
    spec = load_model("one_cpt_oral")
    CL, V = 4.2, 33.0
    schedule = Schedule((Dose(0.0, 100.0, Target("po")), Dose(12.0, 50.0, Target("po"), duration=3.0)))

    def setup(ka: float, k: float):
        return build(spec, [({"ka": ka, "CL": k * V, "V": V}, schedule, TIMES)])

    ka, k = CL / V * (1 + 1e-9), CL / V
    K, F, C, design, reference = setup(ka, k)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(predict(K, F, C, design), reference, rtol=1e-6, atol=1e-6 * scale)
    _, grads = loss_and_gradients(design, scale)
    K_bar, F_bar, C_bar = grads(K, F, C)
    assert all(np.all(np.isfinite(g)) for g in (K_bar, F_bar, C_bar))

    def loss_of_simulate(ka: float, k: float) -> float:
        rng = np.random.default_rng(0)  # the w, v of loss_and_gradients
        w, v = rng.normal(size=design.n_obs), rng.normal(size=design.n_obs)
        y = setup(ka, k)[4]
        return float((w * y).sum() + (v * y**2).sum() / scale)

    h = 1e-4 * k
    d_ka = (loss_of_simulate(ka + h, k) - loss_of_simulate(ka - h, k)) / (2 * h)
    d_k = (loss_of_simulate(ka, k + h) - loss_of_simulate(ka, k - h)) / (2 * h)
    np.testing.assert_allclose([K_bar[0, 1, 0] - K_bar[0, 0, 0], -K_bar[0, 1, 1]], [d_ka, d_k], rtol=0, atol=1e-6 * np.abs(K_bar).max())


@pytest.mark.parametrize("static", [False, True], ids=["general", "small"])
def test_defective_or_non_finite_k_gives_nan_for_that_subject_only(static):
    # ka == CL/V exactly: K is defective (V singular); then a NaN rate. That subject's predictions and
    # gradients are NaN, the other subject's finite; general (complex-capable) and small kernels
    spec = load_model("one_cpt_oral")
    schedule = Schedule((Dose(0.0, 100.0, Target("po")),))
    subjects = [({"ka": 0.5, "CL": 5.0, "V": 10.0}, schedule, TIMES), ({"ka": 0.8, "CL": 4.0, "V": 20.0}, schedule, TIMES)]
    K, F, C, design, _ = build(spec, subjects)
    bad = design.obs_subject == 0
    for K0 in (K[0].copy(), np.array([[-0.5, 0.0], [0.5, np.nan]])):
        K[0] = K0
        y = predict(K, F, C, design, static=static)
        assert np.all(np.isnan(y[bad])) and np.all(np.isfinite(y[~bad]))
        _, grads = loss_and_gradients(design, shapes=(K, F, C) if static else None)
        for g in grads(K, F, C):
            assert np.all(np.isnan(g[0])) and np.all(np.isfinite(g[1]))


# -- gradients --------------------------------------------------------------------------


def test_gradients_match_central_differences_it_linear():
    # rtol 1e-6 on every entry of K̄ (6×6), F̄ and C̄: bolus, infusions and a reset
    K, F, C, design, _ = build(load_model("it_linear"), it_linear_subjects())
    check_gradients(K, F, C, design)


def test_gradients_match_central_differences_closed_form_2x2_and_complex():
    # rtol 1e-6: the 2×2 closed-form path and the complex-arithmetic path
    schedule = Schedule((Dose(0.0, 100.0, Target("po"), ii=12.0, addl=1), Dose(5.0, 30.0, Target("iv"), duration=1.0)))
    check_gradients(*build(load_model("one_cpt_oral"), [({"ka": 0.83, "CL": 4.2, "V": 33.0}, schedule, TIMES)])[:4])
    check_gradients(*build(cyclic_model(), cyclic_subjects())[:4])


def test_verify_grad():
    # pytensor's own check (random projection, one-sided differences): its default float64 tolerance 1e-4
    K, F, C, design, _ = build(load_model("two_cpt_oral"), [
        ({"ka": 1.3}, Schedule((Dose(0.0, 100.0, Target("po")), Dose(3.0, 20.0, Target("iv"), duration=2.0))), TIMES[:7])
    ])
    pytensor.gradient.verify_grad(
        lambda k, f, c: linear_predict(k, f, c, design, method=EIGEN), [K, F, C], rng=np.random.default_rng(1), mode=PERFORM
    )


# -- numba backend and samplers -------------------------------------------------------------


def numba_and_perform(K, F, C, design, static=False, method=EIGEN):
    """y and its gradient (of a random quadratic loss) by the numba backend and by perform."""
    Kv, Fv, Cv = inputs(K, F, C, static)
    y = linear_predict(Kv, Fv, Cv, design, method=method)
    loss = (np.random.default_rng(0).normal(size=design.n_obs) * y**2).sum()
    outputs = [y, *pytensor.grad(loss, [Kv, Fv, Cv])]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*object mode.*")
        compiled = pytensor.function([Kv, Fv, Cv], outputs, mode="NUMBA")(K, F, C)
    return compiled, pytensor.function([Kv, Fv, Cv], outputs, mode=PERFORM)(K, F, C)


def test_numba_backend_equals_perform_without_object_mode():
    # rtol 1e-13: the numba dispatch runs the same kernels as perform; any object-mode fallback fails.
    # Subject 0 has complex eigenvalues (cyclic flow), subject 1 real ones (a 3×3 LAPACK K).
    K, F, C, design, _ = build(cyclic_model(), cyclic_subjects())
    K[1] = [[-1.3, 0.0, 0.0], [1.3, -0.9, 0.4], [0.0, 0.6, -0.4]]
    for got, want in zip(*numba_and_perform(K, F, C, design), strict=True):
        assert np.all(np.isfinite(want))
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15 * np.abs(want).max())


def test_nutpie_samples_a_tiny_model():
    # smoke test: a 3-subject one_cpt_oral model compiles for nutpie with no object mode and samples
    pm = pytest.importorskip("pymc")
    nutpie = pytest.importorskip("nutpie")
    spec = load_model("one_cpt_oral")
    schedule = Schedule((Dose(0.0, 100.0, Target("po")),))
    truth = [{"ka": 1.1, "CL": 4.0, "V": 30.0}, {"ka": 0.7, "CL": 5.0, "V": 45.0}, {"ka": 1.6, "CL": 3.0, "V": 35.0}]
    times = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0])
    _, F, _, design, reference = build(spec, [(p, schedule, times) for p in truth])
    observed = reference * np.exp(np.random.default_rng(2).normal(0.0, 0.1, reference.size))
    N = len(truth)
    with pm.Model() as model:
        log_ka = pm.Normal("log_ka", 0.0, 1.0, shape=N)
        log_k = pm.Normal("log_k", -2.0, 1.0)
        log_V = pm.Normal("log_V", 3.5, 1.0)
        ka, k, V = pt.exp(log_ka), pt.exp(log_k) * pt.ones(N), pt.exp(log_V) * pt.ones(N)
        zero = pt.zeros(N)
        K = pt.stack([pt.stack([-ka, zero], -1), pt.stack([ka, -k], -1)], -2)
        C = pt.stack([zero, 1.0 / V], -1)[:, None, :]
        y = linear_predict(K, F, C, design, method=EIGEN)
        pm.LogNormal("DV", mu=pt.log(y), sigma=pm.HalfNormal("sigma", 0.5), observed=observed)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*object mode.*")
        compiled = nutpie.compile_pymc_model(model)
        trace = nutpie.sample(compiled, draws=20, tune=20, chains=1, seed=3, progress_bar=False)
    assert np.all(np.isfinite(trace.posterior["log_k"].values))


# -- the design -----------------------------------------------------------------------------


def test_design_checks_name_the_field():
    ok = {
        "dose_time": np.zeros((1, 1)), "dose_duration": np.zeros((1, 1)), "dose_valid": np.ones((1, 1), bool),
        "obs_subject": [0], "obs_time": [1.0], "obs_output": [0], "obs_after": [-np.inf],
    }  # fmt: skip
    design = Design(**ok)
    assert design.obs_subject.dtype == np.int64 and not design.obs_time.flags.writeable
    with pytest.raises(FitError, match=r"obs_subject must be in 0\.\.0, found \[1\]"):
        Design(**{**ok, "obs_subject": [1]})
    with pytest.raises(FitError, match=r"dose_duration must be >= 0"):
        Design(**{**ok, "dose_duration": -np.ones((1, 1))})
    with pytest.raises(FitError, match=r"obs_after must be <= obs_time"):
        Design(**{**ok, "obs_after": [2.0]})
    with pytest.raises(FitError, match=r"obs_output: must hold whole numbers"):
        Design(**{**ok, "obs_output": [0.5]})
    with pytest.raises(FitError, match=r"C has 1 output rows"):
        linear_predict(np.zeros((1, 2, 2)), np.zeros((1, 1, 2)), np.zeros((1, 1, 2)), Design(**{**ok, "obs_output": [1]}))


def test_arrays_that_do_not_fit_the_design_raise():
    # the kernels run without bounds checks, so a runtime shape mismatch must raise, not read out of bounds
    K, F, C, design, _ = build(cyclic_model(), cyclic_subjects())
    Kv, Fv, Cv = pt.tensor3("K"), pt.tensor3("F"), pt.tensor3("C")
    f = pytensor.function([Kv, Fv, Cv], linear_predict(Kv, Fv, Cv, design, method=EIGEN), mode=PERFORM)
    with pytest.raises(ValueError, match="fewer doses"):
        f(K, F[:, :1], C)
    with pytest.raises(ValueError, match="disagree on N or n"):
        f(K, F[:1], C)


# -- the small (1–2 compartment, real-arithmetic) kernels ----------------------------------


def small_cases():
    schedule = Schedule((Dose(0.0, 100.0, Target("iv"), duration=1.5, ii=12.0, addl=2), Dose(5.0, 30.0, Target("iv"))))
    oral = Schedule((Dose(0.0, 100.0, Target("po"), ii=12.0, addl=2), Dose(5.0, 30.0, Target("iv"), duration=1.0)))
    return [
        build(load_model("one_cpt_iv"), [({"CL": 4.2, "V": 33.0}, schedule, TIMES), ({"CL": 1.1, "V": 9.0}, schedule, TIMES)]),
        build(load_model("two_cpt_iv"), [({"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}, schedule, TIMES)]),
        build(load_model("one_cpt_oral"), [({"ka": 0.83, "CL": 4.2, "V": 33.0}, oral, TIMES),
                                           ({"ka": 0.9, "CL": 0.0, "V": 20.0}, oral, TIMES)]),  # λ = 0
    ]


def test_small_kernels_are_chosen_from_static_shapes_only_for_n_up_to_2():
    design = small_cases()[0][3]
    for n, small in ((1, True), (2, True), (3, False)):
        K, F, C = np.zeros((2, n, n)), np.zeros((2, design.n_doses, n)), np.zeros((2, 1, n))
        y = linear_predict(*inputs(K, F, C, static=True), design, method=EIGEN)
        assert y.owner.op.small is small
    assert linear_predict(*inputs(None, None, None), design, method=EIGEN).owner.op.small is False  # n unknown


def test_small_kernels_match_simulate_and_the_general_kernels():
    # rtol 1e-10 vs simulate; rtol 1e-13 vs the general (complex-capable) kernels, the same modal sums
    for K, F, C, design, reference in small_cases():
        got = predict(K, F, C, design, static=True)
        np.testing.assert_allclose(got, reference, rtol=RTOL, atol=ATOL_REL * np.abs(reference).max())
        np.testing.assert_allclose(got, predict(K, F, C, design), rtol=1e-13, atol=1e-15 * np.abs(got).max())


def test_small_kernel_gradients_match_central_differences():
    # rtol 1e-6, atol 1e-7 × max: K̄, F̄, C̄ of the real-arithmetic backward pass
    for K, F, C, design, _ in small_cases():
        check_gradients(K, F, C, design, static=True)


def test_small_kernels_numba_backend_equals_perform_without_object_mode():
    # rtol 1e-13: the numba dispatch of the small kernels runs what perform runs
    for got, want in zip(*numba_and_perform(*small_cases()[2][:4], static=True), strict=True):
        assert np.all(np.isfinite(want))
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15 * np.abs(want).max())


def test_non_contiguous_inputs_give_the_same_numbers():
    # views (every other subject, Fortran-ordered copies) are made contiguous for the native kernels
    # and kept alive across the call: rtol 0 against the contiguous inputs, small and general kernels
    for K, F, C, design, _ in (small_cases()[1], build(cyclic_model(), cyclic_subjects())):
        want = predict(K, F, C, design)
        got = predict(np.asfortranarray(K), np.asfortranarray(F), np.asfortranarray(C), design)
        np.testing.assert_array_equal(got, want)
        n = K.shape[1]
        if n <= 2:
            got = predict(np.asfortranarray(K), np.asfortranarray(F), np.asfortranarray(C), design, static=True)
            np.testing.assert_array_equal(got, predict(K, F, C, design, static=True))


# -- steady-state doses (SS = 1, 2; periodic bolus and infusion, constant infusion) ----------


def interleaved(K, F, C, design, reference):
    """The same case with its observations in a shuffled order (subjects interleaved)."""
    order = np.random.default_rng(3).permutation(design.n_obs)
    fields = {name: getattr(design, name) for name in ("dose_time", "dose_duration", "dose_valid", "dose_ss_period")}
    shuffled = Design(**fields, **{name: getattr(design, name)[order] for name in ("obs_subject", "obs_time", "obs_output", "obs_after")})
    assert np.any(np.diff(shuffled.obs_subject) < 0)  # subjects interleaved
    return K, F, C, shuffled, reference[order]


def steady_state_cases():
    """Schedules with SS doses for 1-, 2- (chain and general) and 6-compartment models."""
    ss_bolus = Schedule((Dose(0.0, 100.0, Target("po"), ii=12.0, addl=2, ss=1), Dose(40.0, 50.0, Target("po"), ii=8.0, ss=2)))
    ss_infusion = Schedule((Dose(0.0, 100.0, Target("iv"), ii=12.0, addl=1, duration=2.0, ss=1),
                            Dose(30.0, 0.0, Target("iv"), rate=3.0, ss=1)))  # constant infusion from t = 30
    it = Schedule((Dose(6.0, 10.0, Target("iv"), ii=24.0, duration=1.0, ss=1), Dose(30.0, 5.0, Target("it"), ii=24.0, ss=2)))
    # infusions longer than their interval: 30 h every 12 h (K = 3: two predecessors still running
    # at its start), then SS = 2 on top, 20 h every 8 h with ADDL, and exactly 2 intervals (24 h every 12 h)
    overlapping = Schedule((Dose(0.0, 100.0, Target("iv"), ii=12.0, duration=30.0, ss=1),
                            Dose(40.0, 60.0, Target("iv"), ii=8.0, addl=2, duration=20.0, ss=2),
                            Dose(90.0, 50.0, Target("iv"), ii=12.0, duration=24.0, ss=1)))
    # a second subject: an EVID 3 reset while overlapping infusions run, then duration/II =
    # 2.1/0.7, which rounds to 3.0000000000000004 (K = 4, the 4th predecessor ended at the start)
    reset = Schedule((Dose(0.0, 80.0, Target("iv"), ii=6.0, duration=15.0, ss=1),
                      Dose(60.0, 10.0, Target("iv"), ii=0.7, duration=2.1, ss=2)), resets=(20.0,))
    two_cpt = {"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}
    return {
        "one_cpt_iv": build(load_model("one_cpt_iv"), [({"CL": 4.2, "V": 33.0}, ss_infusion, TIMES)]),
        "one_cpt_oral": build(load_model("one_cpt_oral"), [({"ka": 0.83, "CL": 4.2, "V": 33.0}, ss_bolus, TIMES)]),
        "two_cpt_iv": build(load_model("two_cpt_iv"), [({"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}, ss_infusion, TIMES)]),
        "one_cpt_iv_overlapping": build(load_model("one_cpt_iv"), [({"CL": 4.2, "V": 33.0}, overlapping, OVERLAP_TIMES)]),
        "two_cpt_iv_overlapping": interleaved(*build(load_model("two_cpt_iv"), [(two_cpt, overlapping, OVERLAP_TIMES),
                                                                                (two_cpt, reset, OVERLAP_TIMES)])),
        "three_cpt_iv_overlapping": interleaved(*build(load_model("three_cpt_iv"), [({}, overlapping, OVERLAP_TIMES),
                                                                                    ({}, reset, OVERLAP_TIMES)])),
        "it_linear": build(load_model("it_linear"), [({}, it, TIMES)]),
    }


@pytest.mark.parametrize("name", ["one_cpt_iv", "one_cpt_oral", "two_cpt_iv", "it_linear", "one_cpt_iv_overlapping",
                                  "two_cpt_iv_overlapping", "three_cpt_iv_overlapping"])
@pytest.mark.parametrize("static", [False, True], ids=["general", "small"])
def test_steady_state_doses_match_simulate(name, static):
    # rtol 1e-10 vs simulate's steady-state solver (a linear solve with the matrix exponential)
    K, F, C, design, reference = steady_state_cases()[name]
    if static and K.shape[1] > 2:
        pytest.skip("small kernels: n <= 2")
    got = predict(K, F, C, design, static=static)
    np.testing.assert_allclose(got, reference, rtol=RTOL, atol=ATOL_REL * np.abs(reference).max())


@pytest.mark.parametrize("name", ["one_cpt_oral", "two_cpt_iv", "two_cpt_iv_overlapping"])
def test_steady_state_gradients_match_central_differences(name):
    check_gradients(*steady_state_cases()[name][:4])


def test_steady_state_infusion_overlapping_too_many_predecessors_is_refused():
    ok = {
        "dose_time": np.zeros((1, 1)), "dose_valid": np.ones((1, 1), bool), "dose_ss_period": np.ones((1, 1)),
        "obs_subject": [0], "obs_time": [1.0], "obs_output": [0], "obs_after": [-np.inf],
    }  # fmt: skip
    # at the limit: the dose, its periodic past and the 999 predecessors still running
    assert Design(**ok, dose_duration=np.full((1, 1), 1000.0)).pairs["obs"].size == 1001
    with pytest.raises(FitError, match="lasting 1200 times its interval overlaps more than 1000 of its predecessors"):
        Design(**ok, dose_duration=np.full((1, 1), 1200.0))


def test_periodic_steady_state_dose_of_infinite_duration_is_refused():
    ok = {
        "dose_time": np.zeros((1, 1)), "dose_duration": np.full((1, 1), np.inf), "dose_valid": np.ones((1, 1), bool),
        "obs_subject": [0], "obs_time": [1.0], "obs_output": [0], "obs_after": [-np.inf],
    }  # fmt: skip
    with pytest.raises(FitError, match="must have a finite duration"):
        Design(**ok, dose_ss_period=np.full((1, 1), 12.0))


@pytest.mark.parametrize("static", [False, True], ids=["general", "small"])
def test_overlapping_steady_state_infusion_equals_its_explicit_history(static):
    # A 30 h infusion every 12 h at steady state against the same infusion given explicitly 80
    # times before (the slow eigenvalue is -0.042/h: e^{-0.042·960} ~ 4e-18 of the first is left
    # out): rtol 1e-10, independent of simulate's steady-state solver
    params = {"CL": 3.7, "V1": 12.0, "Q": 8.1, "V2": 55.0}
    start = 1000.0  # times are >= 0: the history starts at 40 h
    times = start + np.array([0.0, 0.5, 5.0, 12.0, 17.9, 18.0, 30.0, 31.0, 47.0])
    steady = Schedule((Dose(start, 100.0, Target("iv"), ii=12.0, addl=1, duration=30.0, ss=2),))
    history = Schedule(tuple(Dose(start - 12.0 * k, 100.0, Target("iv"), duration=30.0) for k in range(80, -2, -1)))
    K, F, C, design, _ = build(load_model("two_cpt_iv"), [(params, steady, times)])
    K2, F2, C2, design2, _ = build(load_model("two_cpt_iv"), [(params, history, times)])
    want = predict(K2, F2, C2, design2, static=static)
    assert np.abs(want).min() > 0.5  # far from 0 everywhere: the doses of the last days all count
    np.testing.assert_allclose(predict(K, F, C, design, static=static), want, rtol=1e-10)
