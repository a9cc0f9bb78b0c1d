"""Benchmark: itpk's exact linear engine vs a per-subject scipy ``solve_ivp`` loop.

Workload: a virtual population of N subjects of ``two_cpt_iv`` (log-normal IIV
from the model file), 4 infusions of 100 mg over 1 h every 12 h, 100 output
times on [0, 48] h. Both engines do the same work (parameters in, plasma
concentrations at the output times out) in the same process, and both are
checked against an independent closed-form reference (sum of exponentials with
the two-compartment macro-constants, superposed over the infusions).

Usage::

    python benchmarks/bench_simulate.py [--subjects N] [--method LSODA|DOP853]
                                        [--seed S] [--profile]

The scipy loop runs on every subject when its estimated cost (timed on a small
pilot) is under ``--scipy-budget`` seconds (default 60); otherwise it runs on a
random subset of ``--subset`` subjects (default 1000) and its time is scaled
linearly to N. The output says which was done.
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

import itpk
from itpk import load_model
from itpk.events import regimen
from itpk.population import sample_population
from itpk.simulate import simulate

DOSE_MG = 100.0
EVERY_H = 12.0
N_DOSES = 4
INFUSION_H = 1.0
RTOL = 1e-8
ATOL_REL = 1e-10  # atol = ATOL_REL x scale, scale = one dose (mg)
REL_FLOOR = 1e-6  # errors are measured where C > REL_FLOOR * (subject's Cmax)


# --------------------------------------------------------------------------- #
# Exact reference: closed-form two-compartment infusion, vectorised.
# --------------------------------------------------------------------------- #
def closed_form_two_cpt_infusion(
    CL: np.ndarray,
    V1: np.ndarray,
    Q: np.ndarray,
    V2: np.ndarray,
    starts: np.ndarray,
    duration: float,
    rate: float,
    times: np.ndarray,
) -> np.ndarray:
    """Central concentration (S, T) for zero-order infusions into the central compartment.

    Macro-constants α > β are the roots of λ² − (k10+k12+k21)λ + k10·k21 = 0.
    A unit bolus into the central compartment gives a central amount
    A·e^{−αt} + B·e^{−βt} with A = (α−k21)/(α−β), B = (k21−β)/(α−β).
    An infusion of rate R starting at t0 for D gives, with τ = t − t0 > 0 and
    τ_on = min(τ, D):

        x1(t) = R Σ_λ c_λ/λ · (1 − e^{−λ τ_on}) · e^{−λ (τ − τ_on)}

    and the infusions superpose. β is computed as k10·k21/α (no cancellation)
    and 1 − e^{−x} as −expm1(−x).
    """
    k10, k12, k21 = CL / V1, Q / V1, Q / V2
    s = k10 + k12 + k21
    disc = np.sqrt(s * s - 4.0 * k10 * k21)
    alpha = 0.5 * (s + disc)
    beta = k10 * k21 / alpha
    A = (alpha - k21) / (alpha - beta)
    B = (k21 - beta) / (alpha - beta)
    lam = np.stack([alpha, beta], axis=-1)[:, None, None, :]  # (S, 1, 1, 2)
    coef = np.stack([A, B], axis=-1)[:, None, None, :]
    tau = times[None, :, None] - starts[None, None, :]  # (1, T, K)
    tau = tau[..., None]  # (1, T, K, 1)
    on = np.clip(tau, 0.0, duration)
    off = np.maximum(tau - duration, 0.0)
    term = coef / lam * (-np.expm1(-lam * on)) * np.exp(-lam * off)  # (S, T, K, 2); 0 for tau <= 0
    amount = rate * term.sum(axis=(2, 3))
    return amount / V1[:, None]


# --------------------------------------------------------------------------- #
# Comparator: one solve_ivp per subject, restarted at every infusion switch.
# --------------------------------------------------------------------------- #
def segments(starts: np.ndarray, duration: float, rate: float, times: np.ndarray) -> list[tuple[float, float, float]]:
    """Intervals (a, b, total infusion rate) between infusion starts/stops, covering [0, max(times)]."""
    cuts = np.union1d(np.union1d(starts, starts + duration), [0.0, float(times.max())])
    cuts = cuts[cuts <= times.max()]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        mid = 0.5 * (a + b)
        running = np.sum((starts <= mid) & (mid < starts + duration))
        out.append((float(a), float(b), float(running * rate)))
    return out


def scipy_loop(
    CL: np.ndarray,
    V1: np.ndarray,
    Q: np.ndarray,
    V2: np.ndarray,
    segs: list[tuple[float, float, float]],
    times: np.ndarray,
    method: str,
    scale: float,
) -> np.ndarray:
    """Central concentration (S, T) from solve_ivp, one subject at a time.

    Each subject's rate matrix K is built, then each segment between infusion
    switches is integrated with dx/dt = K x + u (u constant on the segment),
    the state carried over at the segment end. Output times on a segment start
    belong to that segment (value just after the dose); the last segment also
    keeps its end point.
    """
    S, T = CL.size, times.size
    out = np.empty((S, T))
    last = segs[-1][1]
    plan = []
    for a, b, rate in segs:
        sel = np.flatnonzero((times >= a) & ((times < b) | ((b == last) & (times == b))))
        t_eval = times[sel]
        with_end = t_eval.size == 0 or t_eval[-1] != b
        if with_end:
            t_eval = np.append(t_eval, b)
        plan.append((a, b, np.array([rate, 0.0]), sel, t_eval, with_end))
    atol = ATOL_REL * scale
    for i in range(S):
        k10, k12, k21 = CL[i] / V1[i], Q[i] / V1[i], Q[i] / V2[i]
        K = np.array([[-(k10 + k12), k21], [k12, -k21]])
        x = np.zeros(2)
        for a, b, u, sel, t_eval, with_end in plan:
            sol = solve_ivp(lambda t, y, K=K, u=u: K @ y + u, (a, b), x, method=method,
                            t_eval=t_eval, rtol=RTOL, atol=atol)
            if not sol.success:
                raise RuntimeError(f"solve_ivp failed for subject {i} on [{a}, {b}]: {sol.message}")
            y = sol.y
            out[i, sel] = y[0, : sel.size]
            x = y[:, -1]
        out[i] /= V1[i]
    return out


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
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "itpk"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
        source = f"git {head}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else " (clean)")
    except (OSError, subprocess.CalledProcessError):
        source = "unknown (not a git checkout)"
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical ({affinity} usable by this process)",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
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


def rel_err(value: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    return float(np.max(np.abs(value[mask] - ref[mask]) / np.abs(ref[mask])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=10000, help="population size N (default 10000)")
    ap.add_argument("--seed", type=int, default=20240601, help="population seed")
    ap.add_argument("--method", default="LSODA", choices=["LSODA", "DOP853", "RK45", "Radau", "BDF"],
                    help="solve_ivp method of the comparator (default LSODA, the fastest here)")
    ap.add_argument("--repeats", type=int, default=3, help="itpk timing: best of this many runs")
    ap.add_argument("--scipy-budget", type=float, default=60.0,
                    help="run scipy on all subjects if the estimate is under this many seconds")
    ap.add_argument("--subset", type=int, default=1000, help="subset size for scipy when over budget")
    ap.add_argument("--full", action="store_true", help="always run scipy on every subject")
    ap.add_argument("--profile", action="store_true", help="cProfile one itpk run and print the top entries")
    args = ap.parse_args(argv)
    N = args.subjects

    spec = load_model("two_cpt_iv")
    schedule = regimen("iv", DOSE_MG, every=EVERY_H, doses=N_DOSES, infusion=INFUSION_H)
    times = np.linspace(0.0, 48.0, 100)
    params = sample_population(spec, N, seed=args.seed)
    CL, V1, Q, V2 = (np.asarray(params[k], dtype=float) for k in ("CL", "V1", "Q", "V2"))
    dose = schedule.doses[0]
    starts = np.asarray(dose.times())
    rate = dose.infusion_rate

    print("itpk simulate benchmark: two_cpt_iv, "
          f"{N_DOSES} x {DOSE_MG:g} mg infusions over {INFUSION_H:g} h every {EVERY_H:g} h, "
          f"{times.size} output times on [0, 48] h")
    for k, v in machine().items():
        print(f"  {k:8s} {v}")
    print(f"  N        {N} subjects (seed {args.seed})")
    print(f"  load     {load()}  [at start]")

    # --- itpk ------------------------------------------------------------- #
    ours_times, ours_cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        prof = simulate(spec, schedule, params, times)
        ours_times.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
    ours = prof.outputs["plasma"]
    t_ours = min(ours_times)
    c_ours = ours_cpu[ours_times.index(t_ours)]

    # --- exact reference -------------------------------------------------- #
    t0 = time.perf_counter()
    ref = closed_form_two_cpt_infusion(CL, V1, Q, V2, starts, dose.infusion_duration, rate, times)
    t_ref = time.perf_counter() - t0
    mask = ref > REL_FLOOR * ref.max(axis=1, keepdims=True)

    # --- scipy loop ------------------------------------------------------- #
    segs = segments(starts, dose.infusion_duration, rate, times)
    rng = np.random.default_rng(args.seed + 1)
    order = rng.permutation(N)
    pilot = order[: min(N, 50)]
    t0 = time.perf_counter()
    scipy_loop(CL[pilot], V1[pilot], Q[pilot], V2[pilot], segs, times, args.method, DOSE_MG)
    estimate = (time.perf_counter() - t0) / pilot.size * N
    if args.full or estimate <= args.scipy_budget or N <= args.subset:
        idx = np.arange(N)
        subset_note = f"all {N} subjects (pilot estimate {estimate:.1f} s <= budget {args.scipy_budget:g} s)"
    else:
        idx = np.sort(order[: args.subset])
        subset_note = (f"random subset of {idx.size} of {N} subjects, time scaled x{N / idx.size:g} "
                       f"(pilot estimate for all N: {estimate:.1f} s > budget {args.scipy_budget:g} s)")
    t0, c0 = time.perf_counter(), time.process_time()
    sp = scipy_loop(CL[idx], V1[idx], Q[idx], V2[idx], segs, times, args.method, DOSE_MG)
    t_sp_measured = time.perf_counter() - t0
    c_sp = (time.process_time() - c0) * N / idx.size
    t_sp = t_sp_measured * N / idx.size

    # --- accuracy --------------------------------------------------------- #
    err_ours = rel_err(ours, ref, mask)
    err_ours_sub = rel_err(ours[idx], ref[idx], mask[idx])
    err_sp = rel_err(sp, ref[idx], mask[idx])
    diff = rel_err(ours[idx], sp, mask[idx])

    print()
    print(f"itpk.simulate          {t_ours:9.3f} s  (best of {args.repeats}: "
          + ", ".join(f"{x:.3f}" for x in ours_times) + f"; CPU time {c_ours:.3f} s)")
    print(f"scipy solve_ivp loop   {t_sp:9.3f} s  (CPU time {c_sp:.3f} s; {args.method}, rtol {RTOL:g}, atol {ATOL_REL:g} x {DOSE_MG:g} mg; "
          f"{len(segs)} segments/subject)")
    print(f"  scipy ran on         {subset_note}")
    if idx.size != N:
        print(f"  measured             {t_sp_measured:.3f} s for {idx.size} subjects "
              f"({t_sp_measured / idx.size * 1e3:.2f} ms/subject)")
    else:
        print(f"  per subject          {t_sp_measured / idx.size * 1e3:.2f} ms")
    ratio, cpu_ratio = t_sp / t_ours, c_sp / c_ours
    print(f"speed ratio            {ratio:9.1f} x  wall-clock (target >= 200 x: {'met' if ratio >= 200 else 'NOT met'})")
    print(f"                       {cpu_ratio:9.1f} x  CPU time (the robust figure when the machine is shared)")
    print(f"closed-form reference  {t_ref:9.3f} s  (vectorised, for the accuracy check)")
    print()
    print(f"max relative error vs closed form (points with C > {REL_FLOOR:g} x subject Cmax; "
          f"{int(mask.sum())} of {mask.size} points):")
    print(f"  itpk                 {err_ours:.2e}  (all {N} subjects; {err_ours_sub:.2e} on the scipy subjects)")
    print(f"  scipy {args.method:14s} {err_sp:.2e}  ({idx.size} subjects)")
    print(f"max relative difference itpk vs scipy: {diff:.2e}")
    print(f"load average {load()}  [at end]")
    busy = t_sp_measured / max(c_sp * idx.size / N, 1e-9)
    if busy > 1.1:
        print(f"WARNING: the scipy loop's wall-clock time is {busy:.2f} x its CPU time: other processes were "
              "competing for the CPU, wall-clock figures are inflated; prefer the CPU-time ratio or rerun.")

    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        simulate(spec, schedule, params, times)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
        print()
        print("cProfile of one itpk.simulate call (sorted by own time):")
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
