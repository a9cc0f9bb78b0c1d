"""Benchmark: ``itpk.exposure.compare_routes`` vs a per-draw scipy ``solve_ivp`` loop.

Workload: N parameter draws of ``it_antibody`` (``sample_population`` with a
fixed seed: log-normal IIV of CL, V and k_out from the model file, standing in
for posterior draws), one 10 mg bolus, routes ``it`` and ``iv``. Both methods
produce, per draw, AUC over [0, inf), Cmax and Tmax of every output for each
route and the SPEC section 6 metrics (G, S, S_max, TI, DSF, systemic_sparing,
abscopal). Both run in the same process with BLAS limited to one thread
(``threadpoolctl.threadpool_limits(1)``).

Baseline, per draw and route: ``solve_ivp`` (LSODA by default, analytic
Jacobian, rtol 1e-8, atol 1e-12 x dose) of dx/dt = K x from the dosed state, on
a grid from 0 to 20 terminal half-lives of that draw (about 4,000 points,
log-spaced near 0 plus uniform); AUC by the trapezoid rule, Cmax and Tmax the
grid maximum.

Exact answer, built in this script with numpy/scipy only (K is assembled from
the flows of models/it_linear.toml with the it_antibody parameters, and checked
against ``itpk.system.rate_matrix`` on one draw): AUC = c . (-K^-1 x0), the
solve polished by iterative refinement with long-double residuals, for all
draws; Cmax for a random subset of draws by bracketing the maximum of the exact
solution on a dense grid and refining it with ``minimize_scalar`` on
y(t) = c . expm(K t) x0 (Tmax polished as the root of y').

Usage::

    python benchmarks/bench_compare.py [--draws N] [--method LSODA|Radau|BDF]
                                       [--budget S] [--subset M] [--profile]

If the baseline loop over all N draws is estimated (from a pilot) to take more
than ``--budget`` seconds (default 90), it runs on a random subset of
``--subset`` draws (default 400) and its time is scaled linearly to N; the
output says so.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from scipy.integrate import solve_ivp
from scipy.linalg import expm
from scipy.optimize import brentq, minimize_scalar
from threadpoolctl import threadpool_info, threadpool_limits

import itpk
from itpk import load_model
from itpk.events import regimen
from itpk.exposure import compare_routes
from itpk.population import sample_population
from itpk.system import rate_matrix, resolve

DOSE_MG = 10.0
ROUTES = ("it", "iv")
RTOL = 1e-8
ATOL_REL = 1e-12  # atol = ATOL_REL x dose (mg)
HALF_LIVES = 20  # baseline grid: 0 .. 20 terminal half-lives
N_LOG, N_LIN, T_FIRST = 3000, 1000, 1e-3  # log-spaced points from T_FIRST h, plus uniform points
METRICS = ("G", "S", "S_max", "TI", "DSF", "systemic_sparing", "abscopal")

# Independent model construction (models/it_linear.toml, parameters from it_antibody).
STATES = ("tumor", "lesion2", "lymph", "central", "peripheral", "depot")
TU, L2, LY, CE, PE, DE = range(6)
OUTPUTS = {"plasma": (CE, "V"), "tumor": (TU, "V_T"), "lesion2": (L2, "V_T2"), "lymph": (LY, "V_LN")}


# --------------------------------------------------------------------------- #
# Exact reference, written from the TOML without itpk.
# --------------------------------------------------------------------------- #
def derived(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parameters plus the [derived] quantities of it_linear.toml."""
    q = {k: np.asarray(v, dtype=float) for k, v in p.items()}
    q["V_T"] = np.pi / 6 * q["DIAM"] ** 3 / 1000
    q["V_T2"] = np.pi / 6 * q["DIAM2"] ** 3 / 1000
    q["CL_in"] = q["k_out"] * q["Kp"] * q["V_T"]
    q["CL_in2"] = q["k_out"] * q["Kp"] * q["V_T2"]
    return q


def build_K(q: dict[str, np.ndarray]) -> np.ndarray:
    """K (S, 6, 6) with dx/dt = K x, one flow at a time as in [flows]."""
    S = np.broadcast_shapes(*(np.shape(v) for v in q.values()))[0]
    K = np.zeros((S, 6, 6))

    def flow(src: int, dst: int | None, rate: np.ndarray) -> None:
        K[:, src, src] -= rate
        if dst is not None:
            K[:, dst, src] += rate

    flow(TU, CE, q["k_out"])
    flow(TU, LY, q["k_ly"])
    flow(TU, None, q["k_deg"])
    flow(L2, CE, q["k_out"])
    flow(L2, None, q["k_deg"])
    flow(LY, CE, q["k_ln"])
    flow(DE, CE, q["F_sc"] * q["ka_sc"])
    flow(DE, None, (1 - q["F_sc"]) * q["ka_sc"])
    flow(CE, None, q["CL"] / q["V"])
    flow(CE, PE, q["Q"] / q["V"])
    flow(PE, CE, q["Q"] / q["V2"])
    flow(CE, TU, q["CL_in"] / q["V"])
    flow(CE, L2, q["CL_in2"] / q["V"])
    return K


def dosed_state(q: dict[str, np.ndarray], route: str, dose: float) -> np.ndarray:
    """Amounts just after a bolus (S, 6), from [routes.*].into."""
    S = q["CL"].shape[0]
    x0 = np.zeros((S, 6))
    if route == "it":
        x0[:, TU] = dose * (1 - q["f_leak"])
        x0[:, CE] = dose * q["f_leak"]
    elif route == "iv":
        x0[:, CE] = dose
    else:
        raise ValueError(route)
    return x0


def out_coef(q: dict[str, np.ndarray], name: str) -> np.ndarray:
    """c (S, 6) with output = c . x."""
    state, vol = OUTPUTS[name]
    c = np.zeros((q["CL"].shape[0], 6))
    c[:, state] = 1.0 / q[vol]
    return c


def solve_refined(K: np.ndarray, b: np.ndarray, steps: int = 3) -> np.ndarray:
    """x with K x = b (batched), polished by iterative refinement with long-double residuals.

    A plain float64 solve is accurate to about eps x cond(K); K here spans rates
    from ~1e-7 to 0.1 /h. Residuals r = b - K x in extended precision (x86
    80-bit) and float64 corrections bring x to near full float64 accuracy.
    """
    x = np.linalg.solve(K, b[..., None])[..., 0].astype(np.longdouble)
    K_ld, b_ld = K.astype(np.longdouble), b.astype(np.longdouble)
    for _ in range(steps):
        r = b_ld - np.einsum("sij,sj->si", K_ld, x)
        x = x + np.linalg.solve(K, r.astype(float)[..., None])[..., 0]
    return x


def exact_auc(K: np.ndarray, q: dict[str, np.ndarray], *, refine: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """route -> output -> AUC over [0, inf) = c . (-K^-1 x0) (refined solve unless ``refine`` is False)."""
    out = {}
    for route in ROUTES:
        x0 = dosed_state(q, route, DOSE_MG)
        x_auc = solve_refined(K, -x0) if refine else -np.linalg.solve(K, x0[..., None])[..., 0]
        out[route] = {name: (np.einsum("sn,sn->s", out_coef(q, name).astype(x_auc.dtype), x_auc)).astype(float)
                      for name in OUTPUTS}
    return out


def baseline_grid(K1: np.ndarray) -> np.ndarray:
    """0 .. HALF_LIVES terminal half-lives: log-spaced near 0 plus uniform."""
    lam = np.linalg.eigvals(K1).real
    t_end = HALF_LIVES * np.log(2) / (-lam).min()
    return np.unique(np.concatenate([[0.0], np.geomspace(T_FIRST, t_end, N_LOG), np.linspace(0.0, t_end, N_LIN)]))


def exact_cmax(K1: np.ndarray, x0: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    """Exact (Cmax, Tmax) of y = c . e^{Kt} x0 on [0, inf): bracket, then refine with expm.

    The maximum is bracketed on a dense grid (eigendecomposition of K), then
    located with bounded Brent minimisation of -y(t), y evaluated with
    ``scipy.linalg.expm``; the interval ends are candidates too. Tmax is then
    polished as the root of y'(t) (brentq).
    """
    grid = baseline_grid(K1)
    lam, V = np.linalg.eig(K1)
    a = np.linalg.solve(V, x0.astype(complex))
    y_grid = ((c @ V) * np.exp(np.outer(grid, lam))) @ a
    j = int(np.argmax(y_grid.real))
    lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, grid.size - 1)]

    def y(t: float) -> float:
        return float(c @ (expm(K1 * t) @ x0))

    best_t, best_y = lo, y(lo)
    y_hi = y(hi)
    if y_hi > best_y:
        best_t, best_y = hi, y_hi
    res = minimize_scalar(lambda t: -y(t), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-13 * max(hi, 1.0), "maxiter": 500})
    if -res.fun > best_y:
        best_t, best_y = float(res.x), -float(res.fun)
    # Brent's minimiser locates a flat peak only to ~sqrt(eps) x t; polish the
    # time as the root of y'(t) = c . K expm(K t) x0 when it is bracketed.
    cK = c @ K1
    d_lo, d_hi = float(cK @ (expm(K1 * lo) @ x0)), float(cK @ (expm(K1 * hi) @ x0))
    if d_lo > 0 > d_hi:
        t_root = brentq(lambda t: float(cK @ (expm(K1 * t) @ x0)), lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps)
        y_root = y(t_root)
        if y_root >= best_y or abs(t_root - best_t) < 1e-6 * max(best_t, 1.0):
            best_t, best_y = t_root, max(y_root, best_y)
    return best_y, best_t


def metrics_from(auc: dict, cmax: dict) -> dict[str, np.ndarray]:
    """SPEC section 6 metrics of a linear model from per-route AUC and Cmax dicts."""
    G = auc["it"]["tumor"] / auc["iv"]["tumor"]
    S = auc["it"]["plasma"] / auc["iv"]["plasma"]
    out = {"G": G, "S": S, "TI": G / S, "DSF": G, "systemic_sparing": G / S,
           "abscopal": auc["it"]["lesion2"] / auc["iv"]["lesion2"]}
    if cmax is not None:
        out["S_max"] = cmax["it"]["plasma"] / cmax["iv"]["plasma"]
    return out


# --------------------------------------------------------------------------- #
# Baseline: one solve_ivp per draw and route.
# --------------------------------------------------------------------------- #
def baseline_loop(q: dict[str, np.ndarray], idx: np.ndarray, method: str) -> dict:
    """Per draw in ``idx``: K, grid, a solve per route, trapezoid AUC, grid Cmax/Tmax, metrics."""
    n = idx.size
    auc = {r: {o: np.empty(n) for o in OUTPUTS} for r in ROUTES}
    cmax = {r: {o: np.empty(n) for o in OUTPUTS} for r in ROUTES}
    tmax = {r: {o: np.empty(n) for o in OUTPUTS} for r in ROUTES}
    atol = ATOL_REL * DOSE_MG
    for k, i in enumerate(idx):
        qi = {name: v[i : i + 1] for name, v in q.items()}
        K1 = build_K(qi)[0]
        grid = baseline_grid(K1)
        for route in ROUTES:
            x0 = dosed_state(qi, route, DOSE_MG)[0]
            sol = solve_ivp(lambda t, x: K1 @ x, (0.0, grid[-1]), x0, method=method, t_eval=grid,
                            rtol=RTOL, atol=atol, jac=lambda t, x: K1)
            if not sol.success:
                raise RuntimeError(f"solve_ivp failed for draw {i}, route {route}: {sol.message}")
            for name, (state, vol) in OUTPUTS.items():
                y = sol.y[state] / qi[vol][0]
                j = int(np.argmax(y))
                auc[route][name][k] = np.trapezoid(y, grid)
                cmax[route][name][k], tmax[route][name][k] = y[j], grid[j]
    return {"auc": auc, "cmax": cmax, "tmax": tmax, "metrics": metrics_from(auc, cmax)}


# --------------------------------------------------------------------------- #
def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    blas = ", ".join(f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')}, {d.get('num_threads')} threads)"
                     for d in threadpool_info() if d.get("user_api") == "blas") or "unknown"
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "itpk"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
        source = f"git {head}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else " (itpk/ clean)")
    except (OSError, subprocess.CalledProcessError):
        source = "unknown (not a git checkout)"
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical ({affinity} usable by this process)",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "blas": blas,
        "itpk": itpk.__version__,
        "os": platform.platform(),
        "source": source,
    }


def load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def rel(value: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(value) - ref) / np.abs(ref)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=4000, help="number of parameter draws N (default 4000)")
    ap.add_argument("--seed", type=int, default=20240601, help="seed of sample_population")
    ap.add_argument("--method", default="LSODA", choices=["LSODA", "Radau", "BDF"],
                    help="solve_ivp method of the baseline (default LSODA, the fastest of the three here)")
    ap.add_argument("--repeats", type=int, default=3, help="itpk timing: best of this many calls")
    ap.add_argument("--budget", type=float, default=90.0, help="run the baseline on all draws if estimated under this (s)")
    ap.add_argument("--subset", type=int, default=400, help="baseline subset size when over budget")
    ap.add_argument("--cmax-subset", type=int, default=400, help="draws with an exact (refined) Cmax reference")
    ap.add_argument("--profile", action="store_true", help="cProfile one compare_routes call")
    args = ap.parse_args(argv)
    N = args.draws
    wall0 = time.perf_counter()

    spec = load_model("it_antibody")
    params = sample_population(spec, N, seed=args.seed)
    schedules = {r: regimen(r, DOSE_MG) for r in ROUTES}
    varied = [k for k, v in params.items() if np.ptp(v) > 0]

    print(f"itpk compare_routes benchmark: it_antibody, one {DOSE_MG:g} mg bolus, routes {' and '.join(ROUTES)}")
    for k, v in machine().items():
        print(f"  {k:8s} {v}")
    print(f"  N        {N} draws (sample_population seed {args.seed}; varied: {', '.join(varied)})")
    print(f"  load     {load()}  [at start]")

    # --- itpk ------------------------------------------------------------- #
    with threadpool_limits(1):
        ours_times, ours_cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            values = resolve(spec, params)
            cmp = compare_routes(spec, values, schedules, dose=DOSE_MG)
            ours_times.append(time.perf_counter() - t0)
            ours_cpu.append(time.process_time() - c0)
    t_ours = min(ours_times)
    c_ours = ours_cpu[ours_times.index(t_ours)]
    ours_auc = {r: dict(cmp.routes[r].auc) for r in ROUTES}
    ours_cmax = {r: dict(cmp.routes[r].cmax) for r in ROUTES}
    ours_tmax = {r: dict(cmp.routes[r].tmax) for r in ROUTES}
    ours_metrics = cmp.metrics["it"]

    # --- exact reference -------------------------------------------------- #
    with threadpool_limits(1):
        q = derived(params)
        K = build_K(q)
        K_itpk = rate_matrix(resolve(spec, {k: v[:1] for k, v in params.items()}))[0]
        assert tuple(spec.state_names) == STATES, spec.state_names
        k_check = float(np.max(np.abs(K[0] - K_itpk)) / np.max(np.abs(K[0])))
        t0 = time.perf_counter()
        ex_auc = exact_auc(K, q)
        t_exact = time.perf_counter() - t0
        plain = exact_auc(K, q, refine=False)
    plain_vs_refined = max(rel(plain[r][o], ex_auc[r][o]) for r in ROUTES for o in OUTPUTS)
    plain_vs_ours = max(rel(ours_auc[r][o], plain[r][o]) for r in ROUTES for o in OUTPUTS)
    ex_metrics = metrics_from(ex_auc, None)

    # --- baseline loop ---------------------------------------------------- #
    rng = np.random.default_rng(args.seed + 1)
    order = rng.permutation(N)
    with threadpool_limits(1):
        pilot = order[: min(N, 20)]
        t0 = time.perf_counter()
        baseline_loop(q, pilot, args.method)
        estimate = (time.perf_counter() - t0) / pilot.size * N
        if estimate <= args.budget or N <= args.subset:
            idx = np.arange(N)
            note = f"all {N} draws (pilot estimate {estimate:.1f} s <= budget {args.budget:g} s)"
        else:
            idx = np.sort(order[: args.subset])
            note = (f"random subset of {idx.size} of {N} draws, time scaled linearly x{N / idx.size:g} "
                    f"(pilot estimate for all N: {estimate:.1f} s > budget {args.budget:g} s)")
        t0, c0 = time.perf_counter(), time.process_time()
        base = baseline_loop(q, idx, args.method)
        t_base_measured = time.perf_counter() - t0
        c_base_measured = time.process_time() - c0
    t_base, c_base = t_base_measured * N / idx.size, c_base_measured * N / idx.size

    # --- exact Cmax on a subset (inside the baseline's draws) ------------- #
    cm_idx = np.sort(order[np.isin(order, idx)][: args.cmax_subset])
    t0 = time.perf_counter()
    with threadpool_limits(1):
        ex_cmax = {r: {"plasma": np.empty(cm_idx.size)} for r in ROUTES}
        ex_tmax = {r: {"plasma": np.empty(cm_idx.size)} for r in ROUTES}
        for k, i in enumerate(cm_idx):
            qi = {name: v[i : i + 1] for name, v in q.items()}
            for r in ROUTES:
                ex_cmax[r]["plasma"][k], ex_tmax[r]["plasma"][k] = exact_cmax(
                    K[i], dosed_state(qi, r, DOSE_MG)[0], out_coef(qi, "plasma")[0])
    t_cmax_ref = time.perf_counter() - t0
    ex_smax = ex_cmax["it"]["plasma"] / ex_cmax["iv"]["plasma"]
    pos = np.searchsorted(idx, cm_idx)  # positions of the Cmax subset inside the baseline's arrays

    # --- report ----------------------------------------------------------- #
    ratio, cpu_ratio = t_base / t_ours, c_base / c_ours
    print()
    print(f"itpk resolve + compare_routes {t_ours:8.3f} s  (best of {args.repeats}: "
          + ", ".join(f"{x:.3f}" for x in ours_times) + f"; CPU time {c_ours:.3f} s)")
    print(f"scipy solve_ivp loop          {t_base:8.3f} s  (CPU time {c_base:.3f} s; {args.method}, analytic Jacobian, "
          f"rtol {RTOL:g}, atol {ATOL_REL:g} x {DOSE_MG:g} mg; 2 solves/draw)")
    print(f"  baseline ran on             {note}")
    print(f"  measured                    {t_base_measured:.3f} s for {idx.size} draws "
          f"({t_base_measured / idx.size * 1e3:.2f} ms/draw)")
    print(f"  grid                        0..{HALF_LIVES} terminal half-lives, {N_LOG} log-spaced points from "
          f"{T_FIRST:g} h + {N_LIN} uniform (about {N_LOG + N_LIN} points)")
    print(f"speed ratio                   {ratio:8.1f} x  wall-clock (target >= 100 x: {'met' if ratio >= 100 else 'NOT met'})")
    print(f"                              {cpu_ratio:8.1f} x  CPU time")
    print(f"exact reference               AUC c.(-K^-1 x0) for all {N} draws ({t_exact:.3f} s); own K vs "
          f"itpk.system.rate_matrix on draw 0: max rel. diff {k_check:.1e}")
    print(f"                              (refined in long double; a plain float64 solve differs from it by "
          f"{plain_vs_refined:.1e} and from itpk by {plain_vs_ours:.1e})")
    print(f"                              Cmax by expm + minimize_scalar on {cm_idx.size} draws ({t_cmax_ref:.1f} s)")

    rows = []
    for label, o in (("AUC_tumor", "tumor"), ("AUC_plasma", "plasma"), ("AUC_lesion2", "lesion2")):
        e_ours = max(rel(ours_auc[r][o], ex_auc[r][o]) for r in ROUTES)
        e_base = max(rel(base["auc"][r][o], ex_auc[r][o][idx]) for r in ROUTES)
        rows.append((label + " (it, iv)", e_ours, N, e_base, idx.size))
    for m in ("G", "S", "TI", "DSF", "systemic_sparing", "abscopal"):
        rows.append((m, rel(ours_metrics[m], ex_metrics[m]), N, rel(base["metrics"][m], ex_metrics[m][idx]), idx.size))
    e_ours = max(rel(ours_cmax[r]["plasma"][cm_idx], ex_cmax[r]["plasma"]) for r in ROUTES)
    e_base = max(rel(base["cmax"][r]["plasma"][pos], ex_cmax[r]["plasma"]) for r in ROUTES)
    rows.append(("Cmax_plasma (it, iv)", e_ours, cm_idx.size, e_base, cm_idx.size))
    rows.append(("S_max", rel(ours_metrics["S_max"][cm_idx], ex_smax), cm_idx.size,
                 rel(base["metrics"]["S_max"][pos], ex_smax), cm_idx.size))
    print()
    print(f"max relative error vs the exact answer      itpk (draws)        scipy {args.method} (draws)")
    for label, a, na, b, nb in rows:
        print(f"  {label:40s} {a:9.1e} ({na:5d})     {b:9.1e} ({nb:5d})")
    dt_ours = max(float(np.max(np.abs(ours_tmax[r]["plasma"][cm_idx] - ex_tmax[r]["plasma"]))) for r in ROUTES)
    dt_base = max(float(np.max(np.abs(base["tmax"][r]["plasma"][pos] - ex_tmax[r]["plasma"]))) for r in ROUTES)
    print(f"  {'Tmax_plasma (it, iv), max abs. error, h':40s} {dt_ours:9.1e} ({cm_idx.size:5d})     {dt_base:9.1e} ({cm_idx.size:5d})")
    print()
    print("exact metrics over the draws (median [2.5%, 97.5%]):")
    for m, v in {**ex_metrics, "S_max": ex_smax}.items():
        print(f"  {m:17s} {np.median(v):10.4g}  [{np.quantile(v, 0.025):.4g}, {np.quantile(v, 0.975):.4g}]")
    print(f"load average {load()}  [at end]; total script time {time.perf_counter() - wall0:.1f} s")
    busy = t_base_measured / max(c_base_measured, 1e-9)
    if busy > 1.1:
        print(f"WARNING: the baseline's wall-clock time is {busy:.2f} x its CPU time: the machine was busy; "
              "prefer the CPU-time ratio or rerun.")

    if args.profile:
        pr = cProfile.Profile()
        with threadpool_limits(1):
            pr.enable()
            compare_routes(spec, resolve(spec, params), schedules, dose=DOSE_MG)
            pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(15)
        print()
        print("cProfile of one compare_routes call (sorted by own time):")
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
