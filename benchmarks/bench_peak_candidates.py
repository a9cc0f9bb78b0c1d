"""Peaks of nonlinear models: each set zoomed into its own nearly tied grid peaks (session 24) against session
23's zoom into the grid's largest point only, through windows shared by all sets, side by side in one process.

    /work/venv/bin/python benchmarks/bench_peak_candidates.py            # 200 sets per case
    /work/venv/bin/python benchmarks/bench_peak_candidates.py --sets 4   # a quick look

Two cases, each ``route_exposure`` over parameter sets drawn from the model's IIV (seed 1):
``it_oncolytic_virus`` on the T-VEC schedule (6 visits, 3 cm lesion, default window), and ``it_small_molecule``
put through the nonlinear path (a zero ODE term) with three 1-h iv infusions a day apart, whose tumour
peaks differ by ~1e-6 (the audit's case: the grid's largest was the second peak, the true one the third).
Prints each side's wall time, the ratio, and for how many sets Tmax and Cmax differ between them.
"""

from __future__ import annotations

import time
import tomllib
from importlib.resources import files
from typing import Any

import numpy as np

SHARED_MAX_POINTS = 2000  # session 23's cap on the shared windows' times, per output and round
SESSION23_ROUNDS = 3  # and its zoom rounds (now 4)


def session23_refined_peaks(values: Any, schedule: Any, outputs: Any, grid: np.ndarray, prof: Any) -> tuple[dict, dict]:
    """Session 23's zoom: the grid's largest point of each set, every round one solve of all sets at the
    union of all sets' windows (so every set stops at every other set's times)."""
    from itpk.exposure import PEAK_POINTS
    from itpk.simulate import simulate

    S = values.size
    best = {o: np.argmax(prof.outputs[o], axis=1) for o in outputs}
    cmax = {o: prof.outputs[o][np.arange(S), best[o]] for o in outputs}
    tmax = {o: grid[best[o]] for o in outputs}
    gap = {o: np.maximum(grid[np.minimum(best[o] + 1, grid.size - 1)] - grid[best[o]],
                         grid[best[o]] - grid[np.maximum(best[o] - 1, 0)]) for o in outputs}
    end = float(grid[-1])
    for _ in range(SESSION23_ROUNDS):
        times = {o: _shared_windows(tmax[o], gap[o], end, PEAK_POINTS) for o in outputs}
        times = {o: t for o, t in times.items() if t[0].size}
        if not times:
            break
        extra = np.unique(np.concatenate([t for t, _ in times.values()]))
        sim = simulate(values.spec, schedule, values, extra, outputs=list(times))
        for o, (_, step) in times.items():
            y = sim.outputs[o]
            k = np.argmax(y, axis=1)
            found = y[np.arange(S), k]
            better = found > cmax[o]
            cmax[o] = np.where(better, found, cmax[o])
            tmax[o] = np.where(better, extra[k], tmax[o])
            gap[o] = np.full(S, step)
    return cmax, tmax


def _shared_windows(centre: np.ndarray, gap: np.ndarray, end: float, points: int) -> tuple[np.ndarray, float]:
    """Evenly spaced times over the union of the windows [centre − gap, centre + gap], and the spacing."""
    lo, hi = np.clip(centre - gap, 0.0, end), np.clip(centre + gap, 0.0, end)
    keep = hi > lo
    if not keep.any():
        return np.empty(0), 0.0
    order = np.argsort(lo[keep])
    merged: list[list[float]] = []
    for a, b in zip(lo[keep][order], hi[keep][order], strict=True):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    total = sum(b - a for a, b in merged)
    step = max(float(np.min((hi - lo)[keep])) / (points - 1), total / SHARED_MAX_POINTS)
    return np.concatenate([np.append(np.arange(a, b, step), b) for a, b in merged]), step


def small_molecule_nonlinear() -> Any:
    """it_small_molecule's values in it_linear's structure plus a zero ODE term: the nonlinear path."""
    from itpk.spec import parse_model

    raw = tomllib.loads(files("itpk.models").joinpath("it_linear.toml").read_text())
    agent = tomllib.loads(files("itpk.models").joinpath("it_small_molecule.toml").read_text())
    for key, entry in agent["parameters"].items():
        raw["parameters"][key]["value"] = entry["value"]
        if "iiv" in entry:
            raw["parameters"][key]["iiv"] = entry["iiv"]
    raw["odes"] = {"central": "0 * central"}
    return parse_model(raw)


def cases(sets: int, seed: int) -> dict[str, tuple[Any, Any, list[str]]]:
    """{label: (values, schedule, outputs)}."""
    from itpk import load_model
    from itpk.events import regimen
    from itpk.population import sample_population
    from itpk.regimens import tvec_schedule
    from itpk.system import resolve

    virus = load_model("it_oncolytic_virus")
    small = small_molecule_nonlinear()
    return {
        "virus, T-VEC": (resolve(virus, {**sample_population(virus, sets, seed=seed), "DIAM": 3.0}), tvec_schedule(3.0),
                         list(virus.outputs)),
        "small molecule, 3 iv infusions": (resolve(small, sample_population(small, sets, seed=seed)),
                                           regimen("iv", 5.0, every=24, doses=3, infusion=1), ["tumor"]),
    }


def run(sets: int, seed: int = 1) -> dict[str, dict[str, tuple[float, Any]]]:
    """{case: {"own peaks": (wall seconds, RouteExposure), "session 23": (...)}}; the zoom is put back."""
    import itpk.exposure as ex

    current = ex._refined_peaks
    out: dict[str, dict[str, tuple[float, Any]]] = {}
    try:
        for label, (values, schedule, outputs) in cases(sets, seed).items():
            ex.route_exposure(values.take([0]), schedule, outputs=outputs)  # compile and warm up outside the timing
            out[label] = {}
            for side, zoom in (("own peaks", current), ("session 23", session23_refined_peaks)):
                ex._refined_peaks = zoom
                start = time.perf_counter()
                result = ex.route_exposure(values, schedule, outputs=outputs)
                out[label][side] = (time.perf_counter() - start, result)
    finally:
        ex._refined_peaks = current
    return out


def main() -> None:
    from sets_args import sets_arguments

    args = sets_arguments(__doc__)
    for label, sides in run(args.sets, args.seed).items():
        (new_wall, new), (old_wall, old) = sides["own peaks"], sides["session 23"]
        print(f"{label} ({args.sets} sets): own peaks {new_wall:.2f} s, session 23 {old_wall:.2f} s, "
              f"ratio {new_wall / old_wall:.2f}x")
        for o in new.cmax:
            shift = np.abs(new.tmax[o] - old.tmax[o])
            moved = shift > 1e-3
            gain = (new.cmax[o] - old.cmax[o]) / np.abs(old.cmax[o])
            print(f"  {o}: Tmax moved by > 0.001 for {int(moved.sum())} sets (median move {np.median(shift[moved]) if moved.any() else 0:.3g}); "
                  f"Cmax relative change from {gain.min():.2g} to {gain.max():.2g}")


if __name__ == "__main__":
    main()
