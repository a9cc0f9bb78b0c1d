"""Library verbs behind the CLI commands (and batch jobs): options in, files out.

The CLI only parses text into these arguments; batch pipelines call the same
functions, so a job and a command always do the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itpk.errors import ItpkError
from itpk.events import Schedule, regimen
from itpk.io import atomic_write
from itpk.population import sample_population
from itpk.simulate import Profiles, simulate
from itpk.spec import ModelSpec, load_model
from itpk.system import resolve

MAX_GRID = 200_000


@dataclass(frozen=True)
class SimulationResult:
    """What a simulation run produced."""

    profiles: Profiles
    schedule: Schedule
    csv: Path | None
    png: Path | None
    message: str


def output_grid(schedule: Schedule, *, horizon: float | None, step: float | None) -> np.ndarray:
    """Output times 0..horizon every ``step``, plus every dose and infusion end inside.

    Dose and infusion-end times are added so peaks are exact points of the grid.
    Default horizon: last dose + one interval (at least 24 time units); default
    step: horizon / 240.
    """
    dose_times = schedule.dose_times()
    last = dose_times[-1] if dose_times else 0.0
    interval = max((d.ii for d in schedule.doses), default=0.0)
    if horizon is None:
        horizon = max(24.0, last + (interval or 24.0))
    if not (np.isfinite(horizon) and horizon > 0):
        raise ItpkError(f"--horizon must be a number > 0, found {horizon}")
    if step is None:
        step = horizon / 240
    if not (np.isfinite(step) and step > 0) or horizon / step > MAX_GRID:
        raise ItpkError(f"--step must be > 0 and give at most {MAX_GRID} points up to --horizon {horizon}, found {step}")
    grid = np.arange(0.0, horizon + step * 1e-9, step)
    ends = [t + d.infusion_duration for d in schedule.doses if d.is_infusion for t in d.times()]
    extra = [t for t in (*dose_times, *ends) if 0 <= t <= horizon]
    return np.union1d(np.append(grid, horizon), extra)


def run_simulation(
    model: str | Path | ModelSpec,
    *,
    route: str,
    dose: float,
    every: float | None = None,
    doses: int = 1,
    infusion: float | None = None,
    horizon: float | None = None,
    step: float | None = None,
    at: Sequence[float] | None = None,
    overrides: Mapping[str, float] | None = None,
    subjects: int = 1,
    seed: int | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
) -> SimulationResult:
    """Simulate a regular regimen and write the long CSV (and a PNG).

    Parameters mirror ``itpk simulate``: ``dose`` in the receiving
    compartment's amount unit, times in the model's time unit; ``overrides``
    set typical parameter/covariate values; ``subjects > 1`` draws a virtual
    population from the model's IIV with ``seed``.
    """
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if route not in spec.routes:
        raise ItpkError(f"model {spec.name!r} has no route {route!r}; routes: {', '.join(spec.routes)}")
    overrides = dict(overrides or {})
    resolve(spec, overrides)  # unknown names fail here, before any work
    schedule = regimen(route, dose, every=every, doses=doses, infusion=infusion)
    times = np.asarray(at, dtype=float) if at is not None else output_grid(schedule, horizon=horizon, step=step)
    params = sample_population(spec, subjects, seed=seed, typical=overrides) if subjects > 1 else overrides
    if subjects < 1:
        raise ItpkError(f"--subjects must be >= 1, found {subjects}")
    profiles = simulate(spec, schedule, params, times)
    csv = atomic_write(out, lambda tmp: profiles.to_frame().to_csv(tmp, index=False)) if out else None
    png = None
    if plot:
        from itpk.plot import plot_profiles

        label = f"{spec.name}: {dose:g} {_dose_unit(spec, route)} {route}" + (
            f" × {doses} every {every:g} {spec.time_unit}" if doses > 1 else ""
        ) + (f", {infusion:g} {spec.time_unit} infusion" if infusion else "")
        png = plot_profiles(profiles, plot, dose_times=schedule.dose_times(), title=label)
    written = ", ".join(str(p) for p in (csv, png) if p)
    message = f"simulated {spec.name}: {subjects} subject(s) × {times.size} times × {len(profiles.outputs)} output(s)" + (
        f"; wrote {written}" if written else ""
    )
    return SimulationResult(profiles, schedule, csv, png, message)


def _dose_unit(spec: ModelSpec, route: str) -> str:
    cmts = list(spec.routes[route].into)
    return next(c.amount_unit for c in spec.compartments if c.name == cmts[0])
