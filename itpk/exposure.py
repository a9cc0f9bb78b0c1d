"""Exposure metrics of SPEC.md §6, vectorised over parameter sets.

Linear models are treated exactly: the AUC of every output over [0, ∞) is
c·(−K⁻¹ Σ doses) (a time-invariant system integrates each dose to the same
total wherever it sits in time), and peaks and threshold crossings are found
on a dense grid, then polished by a safeguarded Newton iteration on the exact
solution x(t) = e^{KΔ}x_a + G(Δ)u_a, so Tmax is the true peak location, not a
grid point. Nonlinear models report AUC over a stated horizon, integrated with
the states (one extra state per output, :func:`auc_nonlinear`), and peaks on a
dense grid that holds every dose time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from itpk.errors import ItpkError, ScheduleError
from itpk.events import Schedule
from itpk.linear import auc_infinity
from itpk.peaks import PEAK_CANDIDATES, Trace, grid_modes, local_maxima, peak, time_above, trajectory
from itpk.simulate import Profiles, simulate, simulate_each
from itpk.spec import ModelSpec
from itpk.system import Values, evaluate_outputs, input_fractions, rate_matrix
from itpk.threads import single_blas_thread

GRID_POINTS = 400  # per chunk of the dense peak-search grid (plus log-spaced points after each dose)
CHUNK = 512  # parameter sets per chunk (bounds memory: CHUNK x grid x n floats)


@dataclass(frozen=True)
class RouteExposure:
    """Exposure of one regimen, per output: arrays of shape (S,).

    ``auc`` is over [0, ∞) for linear models and over [0, horizon] otherwise
    (``horizon`` is then set); units are the output's unit × time unit.
    """

    auc: Mapping[str, np.ndarray]
    cmax: Mapping[str, np.ndarray]
    tmax: Mapping[str, np.ndarray]
    time_above: Mapping[str, np.ndarray]
    horizon: float | None


def output_coefficients(values: Values, name: str) -> np.ndarray:
    """c (S, n) with output = c·amounts, for an output linear in the amounts.

    Raises ItpkError if the output has a constant offset or is not linear.
    """
    spec = values.spec
    n = len(spec.compartments)
    probes = np.concatenate([np.zeros((1, n)), np.eye(n)])  # zero, then unit vectors
    amounts = np.broadcast_to(probes, (values.size, n + 1, n))
    y = evaluate_outputs(values, amounts, [name])[name]
    offset = y[:, 0]
    if np.any(np.abs(offset) > 0):
        raise ItpkError(f"output {name!r} of model {spec.name!r} is not zero at zero amounts; exact exposure needs a linear output")
    return y[:, 1:] - offset[:, None]


def total_input(values: Values, schedule: Schedule) -> np.ndarray:
    """Σ over doses of amount × route fractions: the amounts that end up in the system, (S, n)."""
    total = np.zeros((values.size, len(values.spec.compartments)))
    for dose in schedule.doses:
        if dose.ss:
            raise ItpkError("exposure over [0, ∞) is defined for regimens without steady-state doses")
        total += dose.amount * (dose.addl + 1) * input_fractions(values, dose.target)
    return total


def auc_linear(values: Values, schedule: Schedule, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Exact AUC over [0, ∞) of each output (output unit × time unit), (S,) each."""
    x_auc = auc_infinity(rate_matrix(values), total_input(values, schedule), tuple(values.spec.state_names))
    return {name: np.einsum("sn,sn->s", output_coefficients(values, name), x_auc) for name in outputs}


def peak_grid(schedule: Schedule, horizon: float) -> np.ndarray:
    """Dense times for peak search: a uniform grid plus log-spaced points after each dose."""
    starts = [t for d in schedule.doses for t in d.times()]
    ends = [t + d.infusion_duration for d in schedule.doses if d.is_infusion for t in d.times()]
    pieces = [np.linspace(0.0, horizon, GRID_POINTS), np.asarray(ends), np.asarray(starts)]
    for t in starts:
        pieces.append(t + (horizon - t) * np.geomspace(1e-7, 1.0, 80))
    grid = np.unique(np.concatenate(pieces))
    return grid[(grid >= 0) & (grid <= horizon)]


def default_horizon(values: Values, schedule: Schedule) -> float:
    """Last dose + 10 × the slowest half-life of the system (linear), so every peak is inside."""
    last = max(schedule.dose_times(), default=0.0)
    ends = [t + d.infusion_duration for d in schedule.doses if d.is_infusion for t in d.times()]
    eig = np.linalg.eigvals(rate_matrix(values)).real
    slowest = -eig[eig < 0].max() if np.any(eig < 0) else 1.0
    return float(max(last, *ends, 0.0) + 10 * np.log(2) / slowest)


@single_blas_thread
def route_exposure(
    values: Values,
    schedule: Schedule,
    *,
    outputs: Sequence[str],
    targets: Mapping[str, float] | None = None,
    horizon: float | None = None,
) -> RouteExposure:
    """AUC, Cmax, Tmax and time above target of each output for one regimen.

    Parameters
    ----------
    values
        S parameter sets.
    schedule
        The regimen.
    outputs
        Output names.
    targets
        Output name -> target concentration (output unit) for time above target.
    horizon
        Time window for peaks and time above target (model time unit); for
        nonlinear models also for AUC. Default: last dose + 10 slowest
        half-lives (linear), last dose + 30 days (nonlinear).
    """
    targets = dict(targets or {})
    if values.spec.is_linear:
        return _linear_exposure(values, schedule, outputs, targets, horizon)
    return _grid_exposure(values, schedule, outputs, targets, horizon)


def _linear_exposure(
    values: Values, schedule: Schedule, outputs: Sequence[str], targets: Mapping[str, float], horizon: float | None
) -> RouteExposure:
    auc = auc_linear(values, schedule, outputs)
    end = horizon if horizon is not None else default_horizon(values, schedule)
    grid = peak_grid(schedule, end)
    cmax = {o: np.empty(values.size) for o in outputs}
    tmax = {o: np.empty(values.size) for o in outputs}
    above = {o: np.zeros(values.size) for o in targets}
    for start in range(0, values.size, CHUNK):
        part = values.take(slice(start, start + CHUNK))
        rows = slice(start, start + part.size)
        traj = trajectory(part, schedule)
        modes = grid_modes(traj, grid)
        for name in outputs:
            trace = Trace(traj, output_coefficients(part, name))
            cmax[name][rows], tmax[name][rows] = peak(trace, grid, modes)
            if name in targets:
                tail = end if horizon is not None else _end_below(trace, end, targets[name])
                above[name][rows] = time_above(trace, grid, targets[name], modes) if tail == end else \
                    time_above(trace, (g := peak_grid(schedule, tail)), targets[name], grid_modes(traj, g))
    return RouteExposure(auc, cmax, tmax, above, horizon)


def _end_below(trace: Trace, end: float, level: float) -> float:
    """A time after the last event from which the output stays below ``level``: T_above over [0, inf).

    ``end`` (last dose + 10 slowest half-lives) holds every peak but not every crossing of a low
    target (0.1% of Cmax lies 10 half-lives out): the window after the last event is doubled until
    every parameter set ends below the level there.
    """
    last = float(np.max(trace.traj.event_times, initial=0.0))
    for _ in range(40):
        if np.all(trace.grid(np.array([end]))[:, 0] < level):
            break
        end = last + 2.0 * (end - last)
    return end


def _grid_exposure(
    values: Values, schedule: Schedule, outputs: Sequence[str], targets: Mapping[str, float], horizon: float | None
) -> RouteExposure:
    end = _nonlinear_end(values.spec, schedule, horizon)
    grid = peak_grid(schedule, end)  # ends at ``end``: one solve gives the peaks and the AUC
    prof, auc = _profiles_and_auc(values, schedule, outputs, grid)
    cmax, tmax = _refined_peaks(values, schedule, outputs, grid, prof)
    jumps = np.isin(grid[1:], [t for d in schedule.doses if not d.is_infusion for t in d.times()])
    above = {o: _grid_time_above(prof.outputs[o], grid, lvl, jumps) for o, lvl in targets.items()}
    return RouteExposure(auc, cmax, tmax, above, end)


def _nonlinear_end(spec: ModelSpec, schedule: Schedule, horizon: float | None) -> float:
    """The window of a nonlinear model's metrics: the horizon, or the last dose + 30 days (in the model's time unit)."""
    if horizon is not None:
        return horizon
    from itpk.units import conversion

    hours = 1.0 if spec.time_unit == "h" else conversion("h", spec.time_unit).factor  # pint loads in ~1 s: not for h
    return max(schedule.dose_times(), default=0.0) + 720.0 * hours


PEAK_ROUNDS = 4  # zoom rounds after the grid: each solves at more times around every peak candidate's best so far
PEAK_POINTS = 25  # per window of one peak candidate


def _refined_peaks(values: Values, schedule: Schedule, outputs: Sequence[str], grid: np.ndarray,
                   prof: Profiles) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cmax and Tmax (S,) of each output: the grid's best peaks, then zoomed in by solving at more times.

    Every value is a solution of the model (no interpolation). The candidates of a set are its
    grid's largest separate peaks (:func:`~itpk.peaks.local_maxima`) within :data:`~itpk.peaks.PEAK_TIE` of the largest (at most
    :data:`~itpk.peaks.PEAK_CANDIDATES`): repeated doses give nearly equal peaks, and the grid's
    largest need not be the true one's (an audit found Tmax 25.03 h for 49.03 h). Each round solves
    every set at PEAK_POINTS times across the window around each of its candidates' best time so
    far (its neighbours on the last grid), all candidates and outputs of a set in one solve of its
    own; a candidate keeps any better value. A window shrinks 12x a round, so the spacing near a
    peak (hours on a weeks-long horizon) falls to seconds; a peak at a bolus stays at its dose
    time, the value just after. The set's peak is its best candidate, the earliest of equal ones.
    """
    if not outputs:
        return {}, {}
    end = float(grid[-1])
    zooms = {o: _Candidates.of(prof.outputs[o], grid) for o in outputs}
    slots = _Slots.of(values.size, [z.row for z in zooms.values()])
    for _ in range(PEAK_ROUNDS):
        windows = [np.clip(z.t[:, None] + z.gap[:, None] * np.linspace(-1.0, 1.0, PEAK_POINTS), 0.0, end)
                   for z in zooms.values()]
        times = slots.gather(windows)  # (S, K, PEAK_POINTS)
        sim = simulate_each(values, schedule, times.reshape(values.size, -1), list(outputs))
        for (o, z), index in zip(zooms.items(), slots.index, strict=True):
            y = sim[o].reshape(times.shape)[z.row, index]
            zooms[o] = z.zoomed(y, times[z.row, index])
    picked = {o: z.best(values.size) for o, z in zooms.items()}
    return {o: p[0] for o, p in picked.items()}, {o: p[1] for o, p in picked.items()}


@dataclass(frozen=True)
class _Candidates:
    """Peak candidates of all sets, flattened: set index, value, time and half-window width (C,) each."""

    row: np.ndarray
    y: np.ndarray
    t: np.ndarray
    gap: np.ndarray

    @classmethod
    def of(cls, y: np.ndarray, grid: np.ndarray) -> _Candidates:
        index, valid = local_maxima(y, PEAK_CANDIDATES)
        row = np.broadcast_to(np.arange(y.shape[0])[:, None], index.shape)[valid]
        j = index[valid]
        gap = np.maximum(grid[np.minimum(j + 1, grid.size - 1)] - grid[j], grid[j] - grid[np.maximum(j - 1, 0)])
        return cls(row, y[row, j], grid[j].astype(float), gap)

    def zoomed(self, y: np.ndarray, times: np.ndarray) -> _Candidates:
        """Each candidate's best of its window's values ``y`` at ``times`` (C, PEAK_POINTS); windows narrow 12x."""
        k = np.argmax(np.nan_to_num(y, nan=-np.inf), axis=1)
        rows = np.arange(k.size)
        found = y[rows, k]
        better = found > self.y
        return _Candidates(self.row, np.where(better, found, self.y), np.where(better, times[rows, k], self.t),
                           2 * self.gap / (PEAK_POINTS - 1))

    def best(self, sets: int) -> tuple[np.ndarray, np.ndarray]:
        """(Cmax, Tmax) (S,) each: the largest candidate of each set, the earliest among equal ones."""
        order = np.lexsort((self.t, -np.nan_to_num(self.y, nan=-np.inf), self.row))
        first = order[np.unique(self.row[order], return_index=True)[1]]
        cmax, tmax = np.full(sets, np.nan), np.full(sets, np.nan)
        cmax[self.row[first]], tmax[self.row[first]] = self.y[first], self.t[first]
        return cmax, tmax


@dataclass(frozen=True)
class _Slots:
    """Where each candidate's window sits among its set's: per output, the candidates' sets and slots (C,)."""

    rows: list[np.ndarray]
    index: list[np.ndarray]
    sets: int
    K: int

    @classmethod
    def of(cls, sets: int, rows: list[np.ndarray]) -> _Slots:
        used = np.zeros(sets, dtype=np.int64)
        index = []
        for row in rows:  # ascending: a set's candidates of one output are consecutive
            rank = np.arange(row.size) - np.searchsorted(row, row, side="left")
            index.append(used[row] + rank)
            np.add.at(used, row, 1)
        return cls(list(rows), index, sets, int(used.max(initial=1)))

    def gather(self, windows: list[np.ndarray]) -> np.ndarray:
        """(S, K, P) times: each candidate's window (C, P) in its slot; spare slots repeat the set's first window
        (every set has its largest grid point as a candidate of the first output, in slot 0)."""
        out = np.empty((self.sets, self.K, windows[0].shape[1]))
        filled = np.zeros((self.sets, self.K), dtype=bool)
        for row, index, w in zip(self.rows, self.index, windows, strict=True):
            out[row, index] = w
            filled[row, index] = True
        return np.where(filled[..., None], out, out[:, :1])


def _grid_time_above(y: np.ndarray, grid: np.ndarray, level: float, jumps: np.ndarray) -> np.ndarray:
    """Time (S,) at or above ``level`` from values (S, T) on ``grid``: crossings by linear interpolation.

    An interval that ends at a bolus (``jumps``) holds the pre-dose profile, whose end the grid does
    not have (its value there is after the dose): it counts whole when it starts above, else not.
    (A left-endpoint sum was 1.5% off on a Michaelis–Menten test model; interpolation is second order.)
    """
    a, b, dt = y[:, :-1] >= level, y[:, 1:] >= level, np.diff(grid)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.clip((level - y[:, :-1]) / (y[:, 1:] - y[:, :-1]), 0.0, 1.0)  # where the line meets the level
    part = np.where(a & b, dt, np.where(a & ~b, frac * dt, np.where(~a & b, (1.0 - frac) * dt, 0.0)))
    part = np.where(jumps[None, :], np.where(a, dt, 0.0), part)
    return part.sum(axis=1)


def auc_nonlinear(values: Values, schedule: Schedule, outputs: Sequence[str], horizon: float) -> dict[str, np.ndarray]:
    """AUC over [0, ``horizon``] of each output of a nonlinear model (output unit × time unit), (S,) each.

    Integrated with the states, to the ODE solver's tolerance: one extra state per output whose
    derivative is the output (:func:`_with_auc_states`). A trapezoid on an output grid spans
    the jump of a bolus (the grid has no left limit at a dose time) and misses spikes narrower
    than its spacing: on the T-VEC regimen of ``it_oncolytic_virus`` it made the blood AUC 2.7x
    too large.

    Raises
    ------
    ScheduleError
        For resets or steady-state doses: they would reset or balance the AUC states too.
    """
    return _profiles_and_auc(values, schedule, outputs, np.array([horizon]))[1]


def _profiles_and_auc(values: Values, schedule: Schedule, outputs: Sequence[str],
                      times: np.ndarray) -> tuple[Profiles, dict[str, np.ndarray]]:
    """The outputs at ``times`` and their AUC over [0, times[-1]], from one solve with AUC states."""
    if schedule.resets or any(d.reset or d.ss for d in schedule.doses):
        raise ScheduleError("the AUC of a nonlinear model is computed for regimens without resets or steady-state doses")
    augmented, names = _with_auc_states(values.spec.text_toml, tuple(outputs), bool(values.spec.conversions))
    prof = simulate(augmented, schedule, Values(augmented, values.env, values.size), times, outputs=list(outputs))
    return prof, {o: prof.amounts[:, -1, augmented.state_names.index(names[o])] for o in outputs}


@functools.lru_cache(maxsize=16)
def _with_auc_states(text: str, outputs: tuple[str, ...], units: bool) -> tuple[ModelSpec, dict[str, str]]:
    """The model (its ``model.toml`` text) with a state per output whose derivative is the output.

    ``units``: the model's expressions carry unit conversions (:attr:`ModelSpec.conversions`), which
    the text does not: the augmented model is analysed again, and each AUC state, declared in its
    output's unit × time, gets its output's conversion. Without any, pint is not loaded.
    """
    import tomllib

    from itpk.spec import parse_model

    raw = tomllib.loads(text)
    spec = parse_model(raw, units=False)  # names, units and expression texts only
    used = {*spec.state_names, *spec.parameters, *spec.covariates, *spec.derived, *spec.outputs}
    names = {}
    for o in outputs:
        name = f"AUC_{o}"
        while name in used:
            name += "_"
        used.add(name)
        names[o] = name
        unit = f"({spec.outputs[o].unit})*({spec.time_unit})"
        raw["compartments"][name] = {"amount_unit": unit, "description": f"integral of output {o} (exposure metrics)"}
        raw.setdefault("odes", {})[name] = str(spec.outputs[o].expr)
    return parse_model(raw, source=f"{spec.name} with AUC states", units=units), names


@dataclass(frozen=True)
class Comparison:
    """Exposure per route at the same dose and schedule, and the §6 metrics.

    ``metrics[route]`` compares a local route (``it``/``ia``) with the
    systemic reference route; each value is an array (S,). ``roles`` are the
    ``[exposure]`` outputs in force (:func:`roles_at`); ``site`` is the lesion
    (compartment) the local routes injected, None without a local route.
    """

    spec: ModelSpec
    dose: float
    routes: Mapping[str, RouteExposure]
    metrics: Mapping[str, Mapping[str, np.ndarray]]
    reference: str | None
    size: int
    roles: Mapping[str, str]
    site: str | None = None


LOCAL_ROUTES = ("it", "ia")
REFERENCE_ROUTES = ("iv", "sc")


@single_blas_thread
def compare_routes(
    spec: ModelSpec,
    values: Values,
    schedules: Mapping[str, Schedule],
    *,
    dose: float,
    targets: Mapping[str, float] | None = None,
    horizon: float | None = None,
) -> Comparison:
    """Exposure of each route's regimen and the local-vs-systemic metrics of SPEC §6.

    Metrics (dimensionless, per parameter set): ``G`` local gain, ``S``
    systemic AUC ratio, ``S_max`` systemic peak ratio, ``TI = G/S``, ``DSF``
    dose-sparing factor, ``systemic_sparing``, ``abscopal`` (when the model has
    a non-injected lesion). For linear models DSF = G and systemic sparing = TI
    exactly; for nonlinear models they are found by adjusting the local dose.

    "Tumor" is the injected lesion (SPEC §6): when the local routes' doses go to
    another of their sites (``Target.site``, e.g. ``lesion2``), the roles follow
    (:func:`roles_at`).
    """
    site = injected_site(spec, schedules)
    roles = roles_at(spec, site)
    outputs = list(spec.outputs)
    exposures = {r: route_exposure(values, sch, outputs=outputs, targets=targets, horizon=horizon) for r, sch in schedules.items()}
    reference = next((r for r in REFERENCE_ROUTES if r in schedules), None)
    metrics: dict[str, dict[str, np.ndarray]] = {}
    if reference and "systemic" in roles and "local" in roles:
        for route in (r for r in LOCAL_ROUTES if r in schedules):
            metrics[route] = _metrics(values, exposures[route], exposures[reference], roles, schedules[route], horizon)
    return Comparison(spec, dose, exposures, metrics, reference, values.size, roles, site)


def injected_site(spec: ModelSpec, schedules: Mapping[str, Schedule]) -> str | None:
    """The compartment the local routes' doses inject (None without a local route).

    Raises
    ------
    ItpkError
        When the local routes' doses go to different lesions: the metrics would mix them.
    """
    sites = {
        spec.routes[route].site if dose.target.site is None else dose.target.site
        for route, schedule in schedules.items() if route in LOCAL_ROUTES
        for dose in schedule.doses if not dose.target.compartment
    }
    if len(sites) > 1:
        raise ItpkError(f"the local routes inject different lesions ({', '.join(sorted(sites))}): compare one lesion at a time")
    return next(iter(sites), None)


ROLE_TITLES = {"local": "injected lesion", "systemic": "systemic circulation", "abscopal": "non-injected lesion"}


def roles_at(spec: ModelSpec, site: str | None) -> dict[str, str]:
    """The model's ``[exposure]`` roles when the local routes inject ``site``.

    The model file names the outputs for its routes' own sites. SPEC §6's
    "tumor" is the injected lesion, so injecting the other lesion (``ROUTE=it,
    CMT=lesion2``) swaps the ``local`` and ``abscopal`` outputs: the lesion
    injected becomes local, the one spared abscopal. That needs the
    ``abscopal`` output to read the injected compartment alone.

    Raises
    ------
    ItpkError
        When no ``[exposure]`` output reads ``site`` alone, so the local output is unknown.
    """
    roles = dict(spec.exposure)
    own = {spec.routes[r].site for r in LOCAL_ROUTES if r in spec.routes}
    if site is None or site in own or "local" not in roles:
        return roles
    abscopal = roles.get("abscopal")
    if abscopal is None or spec.outputs[abscopal].expr.names & set(spec.state_names) != {site}:
        raise ItpkError(f"model {spec.name!r}: no [exposure] output reads lesion {site!r} alone (roles: "
                        f"{', '.join(f'{k} = {v}' for k, v in roles.items())}), so its local exposure is unknown; "
                        "name that output as the 'abscopal' role in the model file")
    roles["local"], roles["abscopal"] = abscopal, roles["local"]
    return roles


def _metrics(
    values: Values,
    local: RouteExposure,
    ref: RouteExposure,
    roles: Mapping[str, str],
    local_schedule: Schedule,
    horizon: float | None,
) -> dict[str, np.ndarray]:
    sys_, loc = roles["systemic"], roles["local"]
    with np.errstate(all="ignore"):
        G = local.auc[loc] / ref.auc[loc]
        S = local.auc[sys_] / ref.auc[sys_]
        out = {"G": G, "S": S, "S_max": local.cmax[sys_] / ref.cmax[sys_], "TI": G / S}
        if values.spec.is_linear:
            # AUC is proportional to dose: the reference dose matching the local
            # tumour AUC is G x the local dose, and the local dose matching the
            # reference tumour AUC is 1/G of it, with S/G of the systemic AUC.
            out["DSF"] = G
            out["systemic_sparing"] = G / S
        else:
            out["DSF"], out["systemic_sparing"] = _matched_doses(values, local, local_schedule, loc, sys_, ref, horizon)
        if "abscopal" in roles:
            out["abscopal"] = local.auc[roles["abscopal"]] / ref.auc[roles["abscopal"]]
    return out


def _matched_doses(values, local, local_schedule, loc, sys_, ref, horizon):  # noqa: ANN001, ANN202
    """DSF and systemic sparing of a nonlinear model by solving for the matched tumour AUC.

    Both start from the reference (iv) regimen at dose D, as SPEC §6 words them: the local
    regimen at b·D with AUC_tumor(local, b·D) = AUC_tumor(reference, D) gives
    DSF = D / (b·D) = 1/b (the iv dose over the it dose that gives the same tumour AUC) and
    systemic sparing = AUC_plasma(reference, D) / AUC_plasma(local, b·D). (Solving instead for
    the iv dose that matches the it regimen at D answers another question, at another exposure,
    and disagreed with systemic sparing.) b is found per parameter set by :func:`_solve_factor`.
    """
    from scipy.optimize import brentq

    dsf, sparing = np.full(values.size, np.nan), np.full(values.size, np.nan)
    for s in range(values.size):
        one = values.take([s])

        def auc(schedule: Schedule, factor: float, name: str) -> float:
            scaled = schedule.scaled(factor)
            return float(auc_nonlinear(one, scaled, [name], _nonlinear_end(values.spec, scaled, horizon))[name][0])

        target = ref.auc[loc][s]
        b = _solve_factor(lambda f: auc(local_schedule, f, loc) - target, local.auc[loc][s] - target, brentq)
        if np.isfinite(b):
            dsf[s] = 1.0 / b
            sparing[s] = ref.auc[sys_][s] / auc(local_schedule, b, sys_)
    return dsf, sparing


FACTOR_STEP = np.log(10.0) / 2  # half a decade
FACTOR_RANGE = np.log(1e6)  # factors from 1e-6 to 1e6


def _solve_factor(fn, at_one: float, brentq) -> float:  # noqa: ANN001
    """The dose factor where ``fn`` (local lesion AUC − the reference's) first crosses 0, going from
    factor 1 (``fn(1)`` = ``at_one``) the way that moves an AUC rising with the dose toward the
    reference: down when the local regimen gives more, up when it gives less. Half a decade at a
    time to the first change of sign, then Brent (relative 1e-8); if none within [1e-6, 1e6], the
    other way. nan when there is none.

    Going down, this is the dose-sparing question itself: the smallest dose that still gives the
    reference's exposure at every dose between it and the compared one. A lesion AUC need not rise
    with the dose in a nonlinear model (the virus model's falls, then rises: a small dose replicates
    before antibodies rise), so the two ends of the range alone do not tell whether a crossing
    lies between them.
    """
    if at_one == 0.0:
        return 1.0
    if not np.isfinite(at_one):
        return float("nan")
    first = -1.0 if at_one > 0 else 1.0
    for direction in (first, -first):
        z0, f0 = 0.0, at_one
        while abs(z0) < FACTOR_RANGE - 1e-9:
            z1 = z0 + direction * FACTOR_STEP
            f1 = fn(np.exp(z1))
            if not np.isfinite(f1):
                break
            if f1 == 0.0:
                return float(np.exp(z1))
            if f0 * f1 < 0:
                if z0 == 0.0:  # at_one came from another solve; within its error of 0 the signs may disagree
                    f0 = fn(1.0)
                    if f0 * f1 >= 0:  # then factor 1 is the crossing, to the solver's accuracy
                        return 1.0
                lo, hi = sorted((z0, z1))
                return float(np.exp(brentq(lambda v: fn(np.exp(v)), lo, hi, xtol=1e-10, rtol=1e-8)))
            z0, f0 = z1, f1
    return float("nan")


def summarize(values: np.ndarray, thresholds: Sequence[float] = ()) -> float | dict[str, float]:
    """One number for a single parameter set; else median, 95% interval and P(> x).

    The interval is equal-tailed (2.5% and 97.5% quantiles). Draws where the metric is
    undefined (NaN: 0/0, or no matching dose factor) are left out of every number alike, and
    ``undefined_fraction`` says how many there were (only when there were some); infinite
    values (x/0) are ordered and count. All undefined: every number is NaN.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 1:
        return float(values[0])
    undefined = np.isnan(values)
    defined = values[~undefined]
    some = defined.size > 0
    out = {
        "median": _quantile(defined, 0.5) if some else math.nan,
        "ci_low": _quantile(defined, 0.025) if some else math.nan,
        "ci_high": _quantile(defined, 0.975) if some else math.nan,
    }
    for x in thresholds:
        out[f"P(>{x:g})"] = float(np.mean(defined > x)) if some else math.nan
    if undefined.any():
        out["undefined_fraction"] = float(undefined.mean())
    return out


def _quantile(values: np.ndarray, q: float) -> float:
    """np.quantile, except between two infinite values (inf − inf): the nearest draw then."""
    with np.errstate(invalid="ignore"):
        value = float(np.quantile(values, q))
    return float(np.quantile(values, q, method="nearest")) if math.isnan(value) else value


def quantity_units(spec: ModelSpec) -> dict[str, str]:
    """Unit of every route quantity (AUC_o, Cmax_o, Tmax_o, T_above_o)."""
    t = spec.time_unit
    units = {}
    for name, out in spec.outputs.items():
        units[f"AUC_{name}"] = f"{out.unit}*{t}"
        units[f"Cmax_{name}"] = out.unit
        units[f"Tmax_{name}"] = t
        units[f"T_above_{name}"] = t
    return units


def route_quantities(exposure: RouteExposure) -> dict[str, np.ndarray]:
    """Flat ``{"AUC_plasma": ..., "Cmax_plasma": ..., ...}`` of one route."""
    out: dict[str, np.ndarray] = {}
    for name in exposure.auc:
        out[f"AUC_{name}"] = exposure.auc[name]
        out[f"Cmax_{name}"] = exposure.cmax[name]
        out[f"Tmax_{name}"] = exposure.tmax[name]
        if name in exposure.time_above:
            out[f"T_above_{name}"] = exposure.time_above[name]
    return out
