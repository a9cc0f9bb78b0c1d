"""Library verbs behind the CLI commands (and batch jobs): options in, files out.

The CLI only parses text into these arguments; batch pipelines call the same
functions, so a job and a command always do the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from itpk.errors import Interrupted, ItpkError, problems_error, raise_problems  # noqa: F401 - re-exported
from itpk.events import MAX_DOSES, Schedule, Target, regimen
from itpk.exposure import LOCAL_ROUTES, Comparison, compare_routes, quantity_units, roles_at, route_quantities, summarize
from itpk.io import atomic_write
from itpk.population import MAX_SEED, MAX_SUBJECTS, estimated_problems, sample_population
from itpk.progress import Progress
from itpk.simulate import Profiles, simulate
from itpk.spec import ModelSpec, load_model
from itpk.system import Values, check_volumes, inputs_of, rate_problems, resolve, unknown_names, volume_problems, zero_volumes

if TYPE_CHECKING:
    import pandas as pd

    from itpk.dataset import Dataset

MAX_GRID = 200_000
MAX_VALUES = 100_000_000  # numbers a simulation holds at once (0.8 GB of float64)


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


def build_schedule(
    spec: ModelSpec,
    *,
    route: str | None,
    dose: float | None,
    every: float | None,
    doses: int | None,
    infusion: float | None,
    regimen_name: str | None,
    diam: float | None,
    overrides: dict[str, float],
    site: str | None = None,
) -> tuple[Schedule, str]:
    """The schedule of a command: a regular regimen, or a named one (``tvec``).

    A named regimen fixes amounts and times; with ``diam`` it also sets the
    covariate that sizes the injected lesion (:func:`lesion_size`: ``DIAM``,
    or ``DIAM2`` when ``site`` is ``lesion2``; ``DIAM`` for a route into no
    lesion) unless ``overrides`` set it.
    ``site`` sends the route's doses to another of its sites (``--cmt
    lesion2``). Returns the schedule and its route.
    """
    if doses is not None and doses < 1:
        raise ItpkError(f"--doses must be >= 1, found {doses}")
    if regimen_name is not None:
        from itpk.regimens import REGIMENS, unit_problem

        if regimen_name not in REGIMENS:
            raise ItpkError(f"--regimen {regimen_name!r} is unknown; regimens: {', '.join(REGIMENS)}")
        if dose is not None or every is not None or infusion is not None:
            raise ItpkError(f"--regimen {regimen_name} sets amounts and times: do not give --dose, --every or --infusion")
        if diam is None:
            raise ItpkError(f"--regimen {regimen_name} needs the lesion's longest diameter: --diam CM")
        route = route or "it"
        site = check_sites(spec, [route], site)
        size = lesion_size(spec, site or (spec.routes[route].site if route in spec.routes else None))
        if size is None and site is None and "DIAM" in spec.covariates:
            size = "DIAM"  # a regimen by a route that injects no lesion (iv): the patient's lesion still has that size
        if size is not None:
            overrides.setdefault(size, diam)
        problem = unit_problem(regimen_name, _dose_unit(spec, route), route) if route in spec.routes else None
        if problem:
            raise ItpkError(problem)
        return REGIMENS[regimen_name](diam, visits=doses or 6, route=route, site=site, hours=_per_hour(spec)), route
    if route is None or dose is None:
        raise ItpkError(f"give {' and '.join(o for o, v in (('--route', route), ('--dose', dose)) if v is None)} "
                        "(or --regimen tvec --diam CM)")
    site = check_sites(spec, [route], site)
    return regimen(Target(route, site=site), dose, every=every, doses=doses or 1, infusion=infusion), route


def lesion_size(spec: ModelSpec, compartment: str | None) -> str | None:
    """The covariate that sizes ``compartment`` (the one covariate its volume uses, through
    derived quantities), or None (no volume, none, or several)."""
    found = next((c for c in spec.compartments if c.name == compartment), None)
    if found is None or found.volume is None:
        return None
    covariates = [n for n in inputs_of(spec, found.volume.names) if n in spec.covariates]
    return covariates[0] if len(covariates) == 1 else None


def option_problems(spec: ModelSpec, *, routes: Sequence[str] = (), overrides: Mapping[str, object] | None = None,
                    targets: Mapping[str, float] | None = None) -> list[str]:
    """What a command's options name that ``spec`` does not have (routes, ``--set`` names, ``--target``
    outputs), one line each: the commands and a batch's pre-flight check the same way."""
    problems = []
    unknown = [r for r in routes if r not in spec.routes]
    if unknown:
        problems.append(f"model {spec.name!r} has no route(s) {', '.join(unknown)}; routes: {', '.join(spec.routes)}")
    problems += [p for p in [unknown_names(spec, overrides or {})] if p]
    problems += [f"--set {name}={_shown(value)}: {name} is a fraction; allowed: a number from 0 to 1"
                 for name, value in (overrides or {}).items()
                 if name in spec.parameters and spec.parameters[name].fraction and _is_number(value) and not 0 <= value <= 1]
    bad_targets = sorted(set(targets or {}) - set(spec.outputs))
    if bad_targets:
        problems.append(f"--target: unknown output(s) {', '.join(bad_targets)}; outputs: {', '.join(spec.outputs)}")
    return problems


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float | np.floating) else repr(value)


def value_problems(*, dose: float | None = None, diam: float | None = None, every: float | None = None,
                   doses: int | None = None, infusion: float | None = None, horizon: float | None = None,
                   step: float | None = None, at: Sequence[float] | None = None, subjects: int | None = None,
                   seed: int | None = None, overrides: Mapping[str, object] | None = None) -> list[str]:
    """What is wrong with the numbers of a simulate/compare command, whatever the model: one line each.

    Amounts, durations and windows must be finite and > 0, counts whole numbers >= 1 (``seed`` >= 0),
    output times finite and >= 0, ``--set`` values finite.
    """
    problems = []
    if dose is not None and not (_is_number(dose) and dose > 0):
        problems.append(f"--dose: amount must be a finite number > 0, found {_shown(dose)}")
    if diam is not None and not (_is_number(diam) and diam > 0):
        problems.append(f"--diam must be a lesion diameter > 0 cm, found {_shown(diam)}")
    for name, value in (("every", every), ("infusion", infusion), ("horizon", horizon), ("step", step)):
        if value is not None and not (_is_number(value) and value > 0):
            problems.append(f"--{name} must be a finite number > 0, found {_shown(value)}")
    for name, value, low, high in (("doses", doses, 1, MAX_DOSES), ("subjects", subjects, 1, MAX_SUBJECTS),
                                   ("seed", seed, 0, MAX_SEED)):
        if value is not None and not (_is_whole(value) and low <= value <= high):
            problems.append(f"--{name} must be a whole number from {low} to {high}, found {_shown(value)}")
    if at is not None:
        bad = [t for t in at if not (_is_number(t) and t >= 0)]
        if bad or not len(at):
            problems.append(f"--at: output times must be finite and >= 0, found {', '.join(map(_shown, bad[:3])) or 'none'}")
    problems += [f"--set {name}={_shown(value)}: must be a finite number" for name, value in (overrides or {}).items()
                 if not (_is_number(value) or (isinstance(value, np.ndarray) and np.all(np.isfinite(value))))]
    return problems


def _schedule_problems(spec: ModelSpec, *, route: str | None, dose: float | None, every: float | None,
                       doses: int | None, infusion: float | None, regimen_name: str | None, diam: float | None,
                       required: bool) -> list[str]:
    """What :func:`build_schedule` would refuse, without building anything."""
    problems = []
    if regimen_name is not None:
        from itpk.regimens import REGIMENS, unit_problem

        if regimen_name not in REGIMENS:
            problems.append(f"--regimen {regimen_name!r} is unknown; regimens: {', '.join(REGIMENS)}")
        dosed = route or "it"
        problems += [p for p in [unit_problem(regimen_name, _dose_unit(spec, dosed), dosed)] if p] if dosed in spec.routes else []
        if dose is not None or every is not None or infusion is not None:
            problems.append(f"--regimen {regimen_name} sets amounts and times: do not give --dose, --every or --infusion")
        if diam is None and required:
            problems.append(f"--regimen {regimen_name} needs the lesion's longest diameter: --diam CM")
    elif required and (route is None or dose is None):
        missing = [option for option, value in (("--route", route), ("--dose", dose)) if value is None]
        problems.append(f"give {' and '.join(missing)} (or --regimen tvec --diam CM)")
    elif required and doses is not None and _is_whole(doses) and doses > 1 and every is None:
        problems.append(f"--doses {doses}: several doses need their interval, --every H (none given)")
    elif every is not None and doses is None:
        problems.append(f"--every {_shown(every)}: gives the interval between doses, but --doses is not given (one dose); "
                        "add --doses N")
    return problems


def _site_problems(spec: ModelSpec, routes: Sequence[str], site: str | None) -> list[str]:
    try:
        check_sites(spec, routes, site)
    except ItpkError as exc:
        return [str(exc)]
    return []


def simulation_problems(spec: ModelSpec | None, *, route: str | None = None, dose: float | None = None,
                        site: str | None = None, regimen_name: str | None = None, diam: float | None = None,
                        every: float | None = None, doses: int | None = None, infusion: float | None = None,
                        horizon: float | None = None, step: float | None = None, at: Sequence[float] | None = None,
                        overrides: Mapping[str, float] | None = None, subjects: int | None = 1,
                        seed: int | None = None, required: bool = True) -> list[str]:
    """Every problem of the options of :func:`run_simulation` (``itpk simulate``, a batch's simulate job), one line
    each, before any work: numbers (:func:`value_problems`), the regimen, and what the model lacks (routes,
    ``--set`` names, ``--cmt`` sites). ``spec`` None (a model that did not load): the numbers only.
    ``required=False`` skips the check that the options a run needs (route and dose, or a regimen's ``--diam``)
    are given (a batch job whose other keys were unreadable)."""
    problems = value_problems(dose=dose, diam=diam, every=every, doses=doses, infusion=infusion, horizon=horizon,
                              step=step, at=at, subjects=subjects, seed=seed, overrides=overrides)
    if spec is None:
        return problems
    problems += _schedule_problems(spec, route=route, dose=dose, every=every, doses=doses, infusion=infusion,
                                   regimen_name=regimen_name, diam=diam, required=required)
    if route is None and regimen_name is not None:
        route = "it"  # what build_schedule does
    problems += option_problems(spec, routes=[route] if route else [], overrides=overrides)
    return problems + _site_problems(spec, [route] if route else [], site)


def comparison_problems(spec: ModelSpec | None, *, dose: float | None = None, routes: Sequence[str] = ("it", "iv"),
                        site: str | None = None, regimen_name: str | None = None, diam: float | None = None,
                        every: float | None = None, doses: int | None = None, infusion: float | None = None,
                        overrides: Mapping[str, float] | None = None, targets: Mapping[str, float] | None = None,
                        thresholds: Sequence[float] = (), horizon: float | None = None,
                        required: bool = True) -> list[str]:
    """Every problem of the options of :func:`run_comparison` (``itpk compare``, a batch's compare job), one line
    each, before any work: as :func:`simulation_problems`, plus targets, thresholds and the routes compared."""
    problems = value_problems(dose=dose, diam=diam, every=every, doses=doses, infusion=infusion, horizon=horizon,
                              overrides=overrides)
    problems += [f"--target {name}={_shown(level)}: a concentration must be a finite number > 0"
                 for name, level in (targets or {}).items() if not (_is_number(level) and level > 0)]
    problems += [f"--threshold {_shown(x)}: must be a finite number" for x in thresholds if not _is_number(x)]
    if regimen_name is not None and infusion is not None:  # the iv reference would lose the regimen's visits
        problems.append(f"--regimen {regimen_name} sets amounts and times for every route: do not give --infusion")
    if spec is None:
        return problems
    routes = list(dict.fromkeys(routes))
    if not routes:
        problems.append(f"model {spec.name!r}: give the routes to compare; routes: {', '.join(spec.routes)}")
    problems += _schedule_problems(spec, route=(routes or [None])[0], dose=dose, every=every, doses=doses,
                                   infusion=None, regimen_name=regimen_name, diam=diam,
                                   required=required and bool(routes))
    problems += option_problems(spec, routes=routes, overrides=overrides, targets=targets)
    if regimen_name is not None:  # the regimen's amounts go to every route compared, not just the first
        from itpk.regimens import unit_problem

        problems += [p for r in routes[1:] if r in spec.routes for p in [unit_problem(regimen_name, _dose_unit(spec, r), r)] if p]
    local = [r for r in routes if r in LOCAL_ROUTES]
    if site is not None and routes and not local:
        problems.append(f"--cmt {site}: names the lesion a local route ({', '.join(LOCAL_ROUTES)}) injects; none is compared")
    elif site is not None:
        problems += _site_problems(spec, local, site)
    return problems


def output_problems(inputs: Mapping[str, str | Path | None] | None = None, **paths: str | Path | None) -> list[str]:
    """What keeps a command from writing its files, before any work: ``--out``/``--plot`` (by keyword) that is
    a folder, or whose folder is a file or cannot be written, or that would overwrite one of ``inputs``
    (description -> path), the other output or a run directory's file (:func:`itpk.io.clash_problems`).
    Names the option and the path as given."""
    from itpk.io import clash_problems, file_problem

    problems = [problem for option, path in paths.items() if path is not None and str(path) != ""
                for problem in [file_problem(f"--{option}", path)] if problem]
    plot = paths.get("plot")
    suffix = Path(plot).suffix.lower().lstrip(".") if plot else ""
    if suffix:
        from itpk.plot import plot_formats

        formats = plot_formats()
        if suffix not in formats:  # matplotlib would write PNG bytes under another name
            problems.append(f"--plot {plot}: found a .{suffix} file name; allowed: {', '.join('.' + f for f in formats)}")
    return problems + clash_problems({f"--{option}": path for option, path in paths.items()}, inputs)


def model_file(model: str | Path | ModelSpec) -> Path | None:
    """The file a model was given as (None for a built-in name or a model already loaded)."""
    return Path(model) if isinstance(model, str | Path) and Path(model).is_file() else None


def _load_spec(model: str | Path | ModelSpec, posterior: str | Path | None,
               problems: list[str]) -> tuple[ModelSpec | None, dict[str, np.ndarray] | None, dict[str, float] | None]:
    """The model (and a posterior's draws and its trial's covariates, None for a run that did not
    record them), or None after recording why it could not be read. When only the run directory
    is unusable, the model named is returned without draws (its problem recorded), so that the
    command's other options are checked too before it refuses."""
    try:
        if posterior is not None:
            return fitted_model(model, posterior)
        return (model if isinstance(model, ModelSpec) else load_model(model)), None, {}
    except ItpkError as exc:
        problems.append(str(exc))
    if posterior is None or model in (None, "") or isinstance(model, ModelSpec):
        return None, None, {}
    try:  # an unusable run directory: the other options are still checked against the model named
        named = load_model(model)
    except ItpkError as exc:
        if str(exc) not in problems:
            problems.append(str(exc))
        return None, None, {}
    return named, None, {}


def read_data(data: str | Path, model: str | Path | ModelSpec | None, problems: list[str]) -> tuple[ModelSpec | None, Dataset | None]:
    """The model (when given) and the dataset checked against it, or None for what could not be read,
    after recording why in ``problems``. A model that does not load still gets its dataset checked
    alone, so that one message lists the problems of both."""
    from itpk.dataset import read_dataset

    spec = _load_spec(model, None, problems)[0] if model is not None else None
    try:
        if model is not None and spec is None:
            read_dataset(data, None)  # for its own problems only: it was meant for the model that did not load
            return None, None
        return spec, read_dataset(data, spec)
    except ItpkError as exc:
        problems.append(str(exc))
        return spec, None


def _trial_covariates(spec: ModelSpec, overrides: dict[str, float], trial: Mapping[str, float] | None,
                      posterior: bool) -> tuple[dict[str, float], str]:
    """Add the fitted trial's covariates (``run.json`` ``typical_covariates``) that the user did not
    set (``--set``, or a regimen's ``--diam``) to ``overrides``; return those added, and a note when
    a posterior's run did not record them ("" otherwise).

    A posterior describes the trial's patients: its typical subject is at their median covariates,
    as in ``exposure.csv`` and the report, not at the model file's defaults (a 2 cm lesion where the
    trial's was 2.7 cm changes G by 2.5x in ``it_antibody``).
    """
    added = {name: float(value) for name, value in (trial or {}).items() if name not in overrides}
    overrides.update(added)
    missing = [name for name in spec.covariates if name not in overrides]
    if not posterior or trial is not None or not missing:
        return added, ""
    return added, (f"the run does not record its trial's covariates (written by an itpk before session 20): "
                   f"{', '.join(missing)} at the model file's values; give the trial's with --set NAME=VALUE")


TRIAL_LINE = "  covariates of the fitted trial (median): {}; --set NAME=VALUE for another patient"


def check_sites(spec: ModelSpec, routes: Sequence[str], site: str | None) -> str | None:
    """``site`` (``--cmt``) if every route in ``routes`` can inject it, None for their own site.

    Unknown routes are left to the caller's message. Raises ItpkError listing every route
    that cannot send a dose to ``site`` with the sites it allows.
    """
    known = [spec.routes[r] for r in routes if r in spec.routes]
    if site is None or all(site == r.site for r in known):
        return None
    problems = [f"route {r.name!r} cannot inject {site!r} (sites: {', '.join(r.sites)})"
                for r in known if site != r.site and site not in r.sites]
    if problems:
        raise ItpkError("--cmt: " + "; ".join(problems))
    return site


def run_simulation(
    model: str | Path | ModelSpec,
    *,
    route: str | None = None,
    dose: float | None = None,
    site: str | None = None,
    regimen_name: str | None = None,
    diam: float | None = None,
    every: float | None = None,
    doses: int | None = None,
    infusion: float | None = None,
    horizon: float | None = None,
    step: float | None = None,
    at: Sequence[float] | None = None,
    overrides: Mapping[str, float] | None = None,
    subjects: int = 1,
    seed: int | None = None,
    posterior: str | Path | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    progress: bool = False,
    problems: Sequence[str] = (),
) -> SimulationResult:
    """Simulate a regular regimen and write the long CSV (and a PNG).

    Parameters mirror ``itpk simulate``: ``dose`` in the receiving
    compartment's amount unit, times in the model's time unit; ``site``
    (``--cmt``) sends the route's doses to another of its sites; ``overrides``
    set typical parameter/covariate values; ``subjects > 1`` draws a virtual
    population from the model's IIV with ``seed``. With ``posterior`` (a run
    directory of ``itpk fit``) the parameters come from the fit instead: each
    subject takes a posterior draw and, with ``subjects > 1``, its own η from
    that draw's omegas (:func:`itpk.population.sample_posterior_population`);
    with ``subjects == 1``, one typical-subject profile per posterior draw (at
    most :data:`POSTERIOR_PROFILES`, evenly thinned; ``ID`` is the profile).
    ``progress`` shows a bar on a terminal while the profiles are computed.

    Every problem of the options (:func:`simulation_problems`, unwritable ``out``/``plot``, and
    ``problems`` a caller found already, e.g. the CLI's unparsable ``--set``) is raised at once in
    one :class:`ItpkError`, before any work.
    """
    problems = list(problems)
    spec, draws, trial = _load_spec(model, posterior, problems)
    overrides = dict(overrides or {})
    problems += simulation_problems(spec, route=route, dose=dose, site=site, regimen_name=regimen_name, diam=diam,
                                    every=every, doses=doses, infusion=infusion, horizon=horizon, step=step, at=at,
                                    overrides=overrides, subjects=subjects, seed=seed)
    problems += output_problems(inputs={"the model file": model_file(model)}, out=out, plot=plot)
    problems += estimated_problems(spec, draws, overrides) if spec is not None else []
    raise_problems(problems)
    assert spec is not None  # a model that did not load is a problem
    schedule, route = build_schedule(spec, route=route, dose=dose, every=every, doses=doses, infusion=infusion,
                                     regimen_name=regimen_name, diam=diam, overrides=overrides, site=site)
    added, unrecorded = _trial_covariates(spec, overrides, trial, posterior=draws is not None)
    typical = resolve(spec, overrides)  # and the values themselves (finite, one length)
    # as compare does, before any work: negative volumes and rates give numbers that mean nothing (a
    # volume of 0, a patient without that lesion, is allowed: its output is undefined, and said so)
    raise_problems([*rate_problems(typical), *volume_problems(typical, list(spec.outputs), zero=True)])
    empty = zero_volumes(typical, list(spec.outputs))
    times = np.asarray(at, dtype=float) if at is not None else output_grid(schedule, horizon=horizon, step=step)
    if subjects < 1:
        raise ItpkError(f"--subjects must be >= 1, found {subjects}")
    held = subjects * times.size * (len(spec.compartments) + len(spec.outputs))  # amounts and outputs, float64
    if held > MAX_VALUES:
        raise ItpkError(f"--subjects {subjects} × {times.size} output times × {len(spec.compartments) + len(spec.outputs)} "
                        f"amounts and outputs = {held:.3g} numbers ({8 * held / 1e9:.1f} GB), more than the {MAX_VALUES:.0e} "
                        "itpk holds at once: use fewer --subjects, a coarser --step or --at")
    if draws is not None:
        params = _posterior_parameters(spec, draws, subjects, seed, overrides)
    else:
        params = sample_population(spec, subjects, seed=seed, typical=overrides) if subjects > 1 else overrides
    profiles = simulate_population(spec, schedule, resolve(spec, params), times, progress=progress)
    count = profiles.amounts.shape[0]  # with a posterior and one subject: one profile per draw
    raise_problems(infinite_outputs(spec, profiles))  # before anything is written
    if draws is None:
        who = f"{count} subject(s)"
    elif subjects > 1:
        who = f"{count} subject(s) drawn from the posterior in {posterior}"
    else:
        who = f"the typical subject at {count} posterior draw(s) from {posterior}"
    csv = atomic_write(out, lambda tmp: profiles.to_frame().to_csv(tmp, index=False)) if out else None
    png = None
    if plot:
        from itpk.plot import plot_profiles

        label = f"{spec.name}: {regimen_name or _describe_regimen(schedule, spec.time_unit)} {schedule.doses[0].target}" + (
            f", {infusion:g} {spec.time_unit} infusion" if infusion else ""
        )
        png = plot_profiles(profiles, plot, dose_times=schedule.dose_times(), title=label)
    written = ", ".join(str(p) for p in (csv, png) if p)
    message = f"simulated {spec.name}: {who} × {times.size} times × {len(profiles.outputs)} output(s)" + (
        f"; wrote {written}" if written else ""
    ) + ("\n" + TRIAL_LINE.format(_listed(added, {k: spec.covariates[k].unit for k in added})) if added else "") + (
        f"\n  note: {unrecorded}" if unrecorded else "") + (
        f"\n  note: concentrations undefined in {', '.join(empty)}" if empty else "")
    cut = cut_short(profiles) if horizon is None and at is None else {}
    if cut:
        message += (f"\n  note: the default window (last dose + one interval, at least 24) ends at {times[-1]:g} "
                    f"{spec.time_unit} with {_listed_levels(cut)} of the peak in the window (median profile): "
                    "pass --horizon for the whole profile")
    return SimulationResult(profiles, schedule, csv, png, message)


def infinite_outputs(spec: ModelSpec, profiles: Profiles) -> list[str]:
    """Outputs that are +inf somewhere: an expression that divides by 0 or overflows at these values
    (``--set DIAM=1e-102`` gave a lesion volume of ~0 and a CSV of inf; its plot failed in matplotlib).
    -inf is allowed: the log of an empty compartment before its first dose."""
    problems = []
    for name, values in profiles.outputs.items():
        bad = np.isposinf(np.asarray(values, dtype=float))  # -inf is a log output of an empty compartment
        if bad.any():
            subject, k = np.argwhere(bad)[0]
            problems.append(f"output {name} = {spec.outputs[name].expr.text} is infinite for {int(bad.any(axis=1).sum())} "
                            f"profile(s) (first: profile {int(subject) + 1} at {profiles.times[k]:g} {spec.time_unit}): "
                            "it divides by 0 or overflows at these values; check --set and the model file")
    return problems


CUT_SHORT = 0.5  # a profile ending at or above this fraction of its peak in the window was cut short


def cut_short(profiles: Profiles) -> dict[str, float]:
    """Outputs whose median profile ends at or above :data:`CUT_SHORT` of its peak: {output: last/peak}."""
    out = {}
    for name, values in profiles.outputs.items():
        median = np.median(np.asarray(values, dtype=float), axis=0)
        peak = float(np.nanmax(median)) if np.isfinite(median).any() else 0.0
        if peak > 0 and median[-1] >= CUT_SHORT * peak:
            out[name] = float(median[-1] / peak)
    return out


def _listed_levels(levels: Mapping[str, float]) -> str:
    return ", ".join(f"{name} at {100 * level:.0f}%" for name, level in levels.items())


# Parameter sets per simulate() call: both solve a chunk in one call (a linear model vectorised,
# a nonlinear one in the compiled kernel, ~30 ms per virus subject for the T-VEC regimen), small
# enough for the bar to move.
CHUNK_LINEAR, CHUNK_NONLINEAR = 1000, 20


def simulate_population(spec: ModelSpec, schedule: Schedule, values: Values, times: np.ndarray, *,
                        progress: bool = False) -> Profiles:
    """:func:`itpk.simulate.simulate` of every parameter set, in chunks, with a progress bar when asked.

    The same numbers as one call (each set is solved on its own either way).
    """
    chunk = CHUNK_LINEAR if spec.is_linear else CHUNK_NONLINEAR
    if values.size <= chunk:
        return simulate(spec, schedule, values, times)
    parts = []
    with Progress(values.size, enabled=progress, label="simulate") as bar:
        bar.step(f"{values.size} profiles")
        for start in range(0, values.size, chunk):
            part = values.take(slice(start, start + chunk))
            parts.append(simulate(spec, schedule, part, times))
            bar.advance(part.size)
    return Profiles(spec, parts[0].times, np.concatenate([p.amounts for p in parts]),
                    {name: np.concatenate([p.outputs[name] for p in parts]) for name in parts[0].outputs})


def fitted_model(model: str | Path | ModelSpec | None,
                 posterior: str | Path) -> tuple[ModelSpec, dict[str, np.ndarray], dict[str, float] | None]:
    """The model, posterior draws and the trial's typical covariates of a run directory, checked
    against the model the user named.

    ``model`` may be a built-in name, a path to a model file or a spec (or empty: the run's own);
    it must name the fitted model (the run directory keeps its own copy, which is the one used).
    The covariates are each covariate's median over the fitted subjects (``run.json``
    ``typical_covariates``, in the model's units: those the dataset gave; None for runs written
    before session 20, which did not record them).
    """
    from itpk.run import load_run, recorded_covariates

    spec, draws, record = load_run(posterior)
    if model not in (None, ""):
        asked = model.name if isinstance(model, ModelSpec) else load_model(model).name
        if asked != spec.name:
            raise ItpkError(f"--posterior {posterior} holds a fit of model {spec.name!r}, not {asked!r}")
    return spec, draws, recorded_covariates(spec, record)


POSTERIOR_PROFILES = 500  # typical-subject profiles drawn from a posterior (simulate --posterior, one subject)


def _posterior_parameters(spec: ModelSpec, draws: Mapping[str, np.ndarray], subjects: int, seed: int | None,
                          overrides: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Parameter sets from a fit: a virtual population (subjects > 1) or the typical subject per draw."""
    from itpk.errors import ModelSpecError
    from itpk.population import sample_posterior_population
    from itpk.run import posterior_values

    if subjects > 1:
        try:
            return sample_posterior_population(spec, draws, subjects, seed=seed, typical=overrides)
        except ModelSpecError as exc:
            raise ItpkError(str(exc)) from None
    # fixed parameters and covariates not set keep the model's value (resolve broadcasts them)
    return posterior_values(spec, draws, overrides=overrides, max_draws=POSTERIOR_PROFILES)


def _per_hour(spec: ModelSpec) -> float:
    """The model's time unit per hour (named regimens are written in hours and days)."""
    if spec.time_unit == "h":
        return 1.0
    from itpk.units import conversion

    return conversion("h", spec.time_unit).factor


def _dose_unit(spec: ModelSpec, route: str) -> str:
    cmts = list(spec.routes[route].into)
    return next(c.amount_unit for c in spec.compartments if c.name == cmts[0])


@dataclass(frozen=True)
class ComparisonResult:
    """What a comparison run produced: the numbers (as a JSON-ready dict) and files."""

    comparison: Comparison
    report: dict
    csv: Path | None
    png: Path | None
    message: str


def run_comparison(
    model: str | Path | ModelSpec,
    *,
    dose: float | None = None,
    routes: Sequence[str] = ("it", "iv"),
    site: str | None = None,
    regimen_name: str | None = None,
    diam: float | None = None,
    every: float | None = None,
    doses: int | None = None,
    infusion: float | None = None,
    overrides: Mapping[str, float] | None = None,
    targets: Mapping[str, float] | None = None,
    thresholds: Sequence[float] = (),
    horizon: float | None = None,
    posterior: str | Path | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    problems: Sequence[str] = (),
) -> ComparisonResult:
    """Exposure of the same dose and schedule by each route, and the SPEC §6 metrics.

    ``dose`` is in the receiving compartment's amount unit, times in the
    model's time unit; ``infusion`` (a duration) applies to the ``iv`` route
    only (injections into a lesion or artery are boluses); ``site`` (``--cmt``)
    sends the local routes' (``it``, ``ia``) doses to another of their sites,
    which then is the "tumor" of the metrics; ``targets`` maps an
    output to a concentration for time above target; ``thresholds`` adds
    P(metric > x) when several parameter sets are compared.

    Every problem of the options (:func:`comparison_problems`, unwritable ``out``/``plot``, and
    ``problems`` a caller found already) is raised at once in one :class:`ItpkError`, before any work.
    """
    problems = list(problems)
    spec, draws, trial = _load_spec(model, posterior, problems)
    overrides = dict(overrides or {})
    routes = list(dict.fromkeys(routes))
    problems += comparison_problems(spec, dose=dose, routes=routes, site=site, regimen_name=regimen_name, diam=diam,
                                    every=every, doses=doses, infusion=infusion, overrides=overrides, targets=targets,
                                    thresholds=thresholds, horizon=horizon)
    problems += output_problems(inputs={"the model file": model_file(model)}, out=out, plot=plot)
    problems += estimated_problems(spec, draws, overrides) if spec is not None else []
    raise_problems(problems)
    assert spec is not None  # a model that did not load is a problem
    local = [r for r in routes if r in LOCAL_ROUTES]
    site = check_sites(spec, local, site)
    # built for a local route when there is one, so that --regimen's --diam sizes the lesion it injects
    base, _ = build_schedule(spec, route=(local or routes)[0], dose=dose, every=every, doses=doses, infusion=None,
                             regimen_name=regimen_name, diam=diam, overrides=overrides, site=site)
    added, unrecorded = _trial_covariates(spec, overrides, trial, posterior=draws is not None)
    if draws is not None:
        from itpk.run import posterior_values

        overrides = posterior_values(spec, draws, overrides=overrides)
    values = resolve(spec, overrides)
    # the lesion and plasma concentrations the metrics divide by (not the abscopal lesion's: a
    # patient without one, DIAM2 = 0, still gets every other metric)
    roles = roles_at(spec, site)
    check_volumes(values, [roles[role] for role in ("local", "systemic") if role in roles])
    iv_infused = regimen("iv", base.doses[0].amount, every=every, doses=doses or 1, infusion=infusion) if infusion else None
    schedules = {r: iv_infused if (r == "iv" and iv_infused) else base.retarget(r, site if r in local else None)
                 for r in routes}
    dose = base.doses[0].amount if dose is None else dose
    comparison = compare_routes(spec, values, schedules, dose=dose, targets=targets, horizon=horizon)
    report = comparison_report(comparison, schedules, thresholds=thresholds)
    if added:
        report["trial_covariates"] = added  # the fitted trial's medians, used where --set gave none
        report["units"].update({name: spec.covariates[name].unit for name in added})
    if unrecorded:
        report["notes"] = [*report.get("notes", []), unrecorded]
    csv = atomic_write(out, lambda tmp: comparison_table(report).to_csv(tmp, index=False)) if out else None
    png = None
    if plot:
        from itpk.plot import plot_routes

        png = plot_routes(spec, values, schedules, plot, roles=roles, title=f"{spec.name}: {regimen_name or f'{dose:g} {_dose_unit(spec, routes[0])}'} by route")
    written = ", ".join(str(p) for p in (csv, png) if p)
    return ComparisonResult(comparison, report, csv, png, format_comparison(report, thresholds) + (f"\nwrote {written}" if written else ""))


def comparison_report(comparison: Comparison, schedules: Mapping[str, Schedule], *, thresholds: Sequence[float] = ()) -> dict:
    """The JSON document of ``itpk compare --json`` (SPEC §4), with units."""
    spec = comparison.spec
    units = quantity_units(spec)
    routes = {
        r: {k: summarize(v) for k, v in route_quantities(ex).items()} for r, ex in comparison.routes.items()
    }
    by_route = {r: {k: summarize(v, thresholds) for k, v in m.items()} for r, m in comparison.metrics.items()}
    first = next(iter(by_route.values()), {})
    linear = spec.is_linear
    horizon = next((ex.horizon for ex in comparison.routes.values()), None)
    report = {
        "model": spec.name,
        "dose": comparison.dose,
        "dose_unit": _dose_unit(spec, next(iter(schedules))),
        "regimen": _describe_regimens(schedules, spec.time_unit),
        "auc_interval": "[0, inf)" if linear else f"[0, {horizon:g}] {spec.time_unit}",
        "t_above_interval": "[0, inf)" if horizon is None else f"[0, {horizon:g}] {spec.time_unit}",
        "routes": routes,
        "metrics": first,
        "reference_route": comparison.reference,
        "exposure_outputs": dict(comparison.roles),
        "site": comparison.site,
        "units": {**units, **dict.fromkeys(("G", "S", "S_max", "TI", "DSF", "systemic_sparing", "abscopal"), "1")},
        "parameter_sets": comparison.size,
    }
    if len(by_route) > 1:
        report["metrics_by_route"] = by_route
    notes = _unsolved_notes(comparison)
    if notes:
        report["notes"] = notes
    return report


def _unsolved_notes(comparison: Comparison) -> list[str]:
    """Why a metric is missing (null in JSON; inf or nan in the CSV), per local route and cause."""
    notes = []
    solved = ("DSF", "systemic_sparing")  # dose factors found by root search in a nonlinear model
    for route, metrics in comparison.metrics.items():
        for name, raw in metrics.items():
            values = np.asarray(raw, dtype=float)
            infinite, undefined = int(np.count_nonzero(np.isinf(values))), int(np.count_nonzero(np.isnan(values)))
            of = "" if values.size == 1 else f" of {values.size}"
            where = f"{name} ({route} vs {comparison.reference})"
            if infinite:
                notes.append(f"{where}: infinite for {infinite}{of} parameter set(s): a ratio whose denominator is 0 "
                             "(e.g. no exposure of that lesion by the reference route)")
            if undefined and name in solved and not comparison.spec.is_linear:
                notes.append(f"{where}: no dose factor in [1e-6, 1e6] matches the lesion AUC between the routes for "
                             f"{undefined}{of} parameter set(s) (in a nonlinear model it need not rise with the dose)")
            elif undefined:
                notes.append(f"{where}: undefined (0/0) for {undefined}{of} parameter set(s): no exposure of that "
                             "output by either route, or a lesion of volume 0")
    return notes


def comparison_table(report: dict) -> pd.DataFrame:
    """The CSV of ``itpk compare``: one row per route quantity or metric."""
    import pandas as pd

    rows = []
    units = report["units"]
    for route, quantities in report["routes"].items():
        rows += [_row("route", route, k, v, units.get(k, "")) for k, v in quantities.items()]
    metrics = report.get("metrics_by_route") or ({_local_route(report): report["metrics"]} if report["metrics"] else {})
    for route, values in metrics.items():
        rows += [_row("metric", f"{route} vs {report['reference_route']}", k, v, "1") for k, v in values.items()]
    # which patient the numbers describe when a posterior supplied the covariates (the JSON's
    # trial_covariates), so that the CSV alone says so
    rows += [_row("covariate", "", k, v, units.get(k, "")) for k, v in report.get("trial_covariates", {}).items()]
    frame = pd.DataFrame(rows)
    # one column order whichever rows come first (route rows have no P(>x); covariate rows hold a value)
    first = ["kind", "route", "quantity", *(c for c in ("value", "median", "ci_low", "ci_high") if c in frame.columns)]
    probabilities = [c for c in frame.columns if c.startswith("P(")]
    others = [c for c in frame.columns if c not in {*first, *probabilities, "unit"}]  # e.g. undefined_fraction
    return frame[[*first, *probabilities, *others, "unit"]]


def _local_route(report: dict) -> str:
    return next(r for r in ("it", "ia") if r in report["routes"])


def _row(kind: str, route: str, quantity: str, value: float | dict, unit: str) -> dict:
    if isinstance(value, dict):
        return {"kind": kind, "route": route, "quantity": quantity, **value, "unit": unit}
    return {"kind": kind, "route": route, "quantity": quantity, "value": value, "unit": unit}


def _describe_regimen(schedule: Schedule, time_unit: str) -> str:
    parts = []
    for d in schedule.doses:
        text = f"{d.amount:g} at {d.time:g} {time_unit}"
        if d.is_infusion:
            text += f" infused over {d.infusion_duration:g} {time_unit}"
        if d.addl:
            text += f" then {d.addl} more every {d.ii:g} {time_unit}"
        parts.append(text)
    return "; ".join(parts)


def _describe_regimens(schedules: Mapping[str, Schedule], time_unit: str) -> str:
    """One description when every route gets the same regimen, else one per route (an infused iv reference)."""
    texts = {route: _describe_regimen(s, time_unit) for route, s in schedules.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{route}: {text}" for route, text in texts.items())


def format_comparison(report: dict, thresholds: Sequence[float] = ()) -> str:
    """Plain-text summary for the terminal: the tumour and plasma exposure per route, times above
    target, every local route's metrics, and P(metric > x) for ``thresholds``."""
    lines = [f"{report['model']}: {report['regimen']} ({report['dose_unit']}); AUC over {report['auc_interval']}"]
    if report.get("parameter_sets", 1) > 1:
        lines.append(f"  numbers: median [95% CrI lo, hi] over {report['parameter_sets']} parameter sets")
    if report.get("trial_covariates"):
        lines.append(TRIAL_LINE.format(_listed(report["trial_covariates"], report["units"])))
    if report.get("site") and report["exposure_outputs"].get("local"):
        lines.append(f"  injected lesion: {report['site']} (local output {report['exposure_outputs']['local']})")
    units = report["units"]
    shown = tuple(f"_{name}" for role, name in report["exposure_outputs"].items() if role in ("local", "systemic"))
    for route, q in report["routes"].items():
        parts = [f"{k} {_fmt(v)} {units.get(k, '')}".rstrip() for k, v in q.items()
                 if k.endswith(shown) or k.startswith("T_above_")]  # every --target, whichever lesion is injected
        lines.append(f"  {route:>3}: " + "; ".join(parts))
    metrics = report.get("metrics_by_route") or ({_local_route(report): report["metrics"]} if report["metrics"] else {})
    for route, values in metrics.items():
        lines.append(f"  metrics ({route} vs {report['reference_route']}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in values.items()))
    for route, values in metrics.items():
        chances = [f"{k} " + ", ".join(f"{p} {v[p]:.3g}" for p in v if p.startswith("P(>"))
                   for k, v in values.items() if isinstance(v, dict) and any(p.startswith("P(>") for p in v)]
        if chances:
            lines.append(f"  P(metric > x) ({route} vs {report['reference_route']}): " + "; ".join(chances))
    if thresholds and report.get("parameter_sets", 1) <= 1:
        lines.append(f"  note: --threshold {', '.join(f'{x:g}' for x in thresholds)}: one parameter set has no "
                     "probabilities; give --posterior RUN_DIR")
    lines += [f"  note: {note}" for note in report.get("notes", ())]
    return "\n".join(lines)


def _listed(values: Mapping[str, float], units: Mapping[str, str]) -> str:
    return ", ".join(f"{name} {value:.4g} {units.get(name, '')}".rstrip() for name, value in values.items())


def _fmt(value: float | dict) -> str:
    if isinstance(value, dict):
        return f"{value['median']:.4g} [{value['ci_low']:.4g}, {value['ci_high']:.4g}]"
    return f"{value:.4g}"


def format_parameters(table: pd.DataFrame) -> list[str]:
    """The terminal lines of a fit's ``summary.csv``: a header, then each parameter's median, unit,
    95% credible interval (none for map: one draw) and an omega's CV."""
    rows = list(table.itertuples(index=False))
    intervals = any(math.isfinite(row.ci_low) for row in rows)
    name, unit = (max([w, *(len(str(v)) for v in values)]) for w, values in ((16, table["parameter"]), (8, table["unit"])))
    unit = min(unit, 12)  # a long unit (mL/(PFU*h)) shifts its own row only
    lines = [(f"  {'parameter':<{name}} {'median':>10} {'unit':<{unit}}" + (" [95% CrI lo, hi]" if intervals else "")).rstrip()]
    for row in rows:
        cv = f"CV {row.cv_percent:.0f}%" if row.parameter.startswith("omega_") and math.isfinite(row.cv_percent) else ""
        interval = f" [{row.ci_low:.4g}, {row.ci_high:.4g}]" if math.isfinite(row.ci_low) else ""  # map: one draw, no interval
        extra = f"{interval}, {cv}" if interval and cv else f"{interval} {cv}" if cv else interval
        lines.append(f"  {row.parameter:<{name}} {row.median:>10.4g} {row.unit:<{unit}}{extra}".rstrip())
    return lines


@dataclass(frozen=True)
class NcaResult:
    """``itpk nca``'s table, the dataset it came from, and the file written."""

    table: pd.DataFrame
    dataset: Dataset
    csv: Path


def run_nca(data: str | Path, *, out: str | Path, model: str | Path | None = None, end: float | None = None) -> NcaResult:
    """Read the dataset (checked against ``model`` when given), run :func:`itpk.nca.nca` and write the CSV.

    Every problem (``--end``, ``--out`` including an output that would replace the dataset, its
    units file or the model file, the model, the dataset) is raised at once, before any work.
    """
    from itpk.nca import nca, option_problems
    from itpk.units import sidecar_path

    problems = option_problems(end=end)
    problems += output_problems(inputs={"the dataset": data, "its units file": sidecar_path(data),
                                        "the model file": model_file(model) if model is not None else None}, out=out)
    _, dataset = read_data(data, model, problems)
    raise_problems(problems)
    assert dataset is not None
    table = nca(dataset, end=end)
    return NcaResult(table, dataset, atomic_write(out, lambda tmp: table.to_csv(tmp, index=False)))


@dataclass(frozen=True)
class FitRunResult:
    """A fit written to its run directory."""

    run_dir: Path
    diagnostics: dict
    message: str


def run_fit(
    data: str | Path,
    *,
    model: str | Path,
    out: str | Path,
    method: str = "nuts",
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    cores: int | None = None,
    seed: int | None = None,
    errors: Mapping[str, str] | None = None,
    target_accept: float = 0.9,
    mass_matrix: str = "auto",
    iiv: str = "auto",
    precondition: str = "auto",
    progress: bool = False,
    command: Sequence[str] = (),
    problems: Sequence[str] = (),
) -> FitRunResult:
    """Read the data against the model, fit, and write the run directory (SPEC §5).

    Every problem of the options (``out``, the model, the fit's arguments:
    :func:`itpk.inference.argument_problems`, the dataset, and ``problems`` a caller found already,
    e.g. the CLI's unparsable ``--error``) is raised at once in one :class:`ItpkError`, before the fit.
    """
    from itpk.inference import argument_problems, fit
    from itpk.interrupts import described, exit_code, interrupt_behind, signal_of, watch_interrupts
    from itpk.run import check_run_target, summary_table, write_run
    from itpk.units import sidecar_path

    problems = list(problems)
    try:  # before the fit, not after it; replacing the run directory must not delete what the fit reads
        check_run_target(out, inputs={"the dataset": data, "its units file": sidecar_path(data),
                                      "the model file": model_file(model)})
    except ItpkError as exc:
        problems.append(str(exc))
    spec, dataset = read_data(data, model, problems)
    problems += argument_problems(spec, method=method, draws=draws, tune=tune, chains=chains, cores=cores, seed=seed,
                                  errors=errors, target_accept=target_accept, mass_matrix=mass_matrix, iiv=iiv,
                                  precondition=precondition)
    raise_problems(problems)
    assert spec is not None and dataset is not None
    kept = f"; {out} is unchanged" if Path(out).exists() else ""

    def stopped(signum: int) -> Interrupted:
        return Interrupted(f"{described(signum)} before the fit finished: nothing was written{kept}", exit_code(signum))

    with watch_interrupts() as interrupted:
        try:
            result = fit(spec, dataset, method=method, draws=draws, tune=tune, chains=chains, cores=cores, seed=seed,
                         errors=errors, target_accept=target_accept, mass_matrix=mass_matrix, iiv=iiv,
                         precondition=precondition, progress=progress)
        except KeyboardInterrupt as exc:
            raise stopped(interrupted() or signal_of(exc)) from None
        except Exception as exc:
            if interrupted() or interrupt_behind(exc):  # a stage that returned a partial result the next one could not use
                raise stopped(interrupted() or signal_of(exc)) from None
            raise
    if interrupted():  # nutpie, PyMC and ADVI return what they have on Ctrl-C: never a run directory
        raise stopped(interrupted())
    run_dir = write_run(result, out, command=command)
    recorded = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))  # diagnostics and warnings, as written
    diag = recorded["diagnostics"]
    table = summary_table(result)
    n, m = len(result.data.subjects), len(result.data.observations)
    lines = [f"fitted {spec.name} to {dataset.source} ({n} subject{'s' * (n != 1)}, "
             f"{m} observation{'s' * (m != 1)}) with {method}; wrote {run_dir}"]
    assumed = dataset.units.assumption()
    lines += [assumed] if assumed else []
    lines += format_parameters(table)
    verdict = diag["passed"]
    lines.append("diagnostics: " + ("passed" if verdict else ("not applicable" if verdict is None else "FAILED: " + "; ".join(diag["reasons"]))))
    lines += [f"advice: {a}" for a in diag.get("advice", [])]
    lines += [f"warning: {w}" for w in recorded["warnings"]]  # the fit's and the writer's
    return FitRunResult(run_dir, diag, "\n".join(lines))
