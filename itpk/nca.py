"""Non-compartmental analysis (NCA) of a dataset, one row per subject and output.

Conventions (those of PKNCA's defaults, so results can be checked against it):

- **AUC**: linear-up/log-down trapezoids: the log trapezoid on every interval
  where the concentration falls and both ends are > 0, the linear one otherwise.
  AUC starts at the subject's first sample at or after its first dose (no
  extrapolation back to the dose time: give a sample at the dose time, e.g. a
  pre-dose 0, to start there) and ``AUClast`` ends at ``Tlast``, the last
  concentration > 0.
- **lambda_z**: log-linear least squares on the last ``n >= 3`` points after
  ``Tmax`` (Tmax itself excluded) with concentration > 0. Among the fits with
  ``lambda_z > 0``, those whose adjusted R² is within 1e-4 of the best adjusted
  R² (over all fits) qualify, and the one with the most points wins.
  ``AUCinf = AUClast + Clast / lambda_z`` (observed Clast);
  ``half_life = ln 2 / lambda_z``.
- **BLQ** (censored observations, see :attr:`itpk.dataset.Dataset.censored`):
  before the first measurable concentration they count as 0; after it they are
  dropped (PKNCA's ``conc.blq`` first = keep as 0, middle = drop; dropping the
  trailing ones does not change any reported quantity). Rows with MDV=1 are ignored.
- Profiles are treated as single-dose profiles from the first dose; doses after
  the first are not separated into dosing intervals.

Units: the values are in the units the dataset holds after reading: with a
model, the model's units (a units file's values converted); without one, the
units file's (or unknown). Times are in the time unit, concentrations in the
output's unit, AUC in time × concentration, lambda_z in 1/time; the columns
:data:`UNIT_COLUMNS` say which, row by row (blank where unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from itpk.dataset import Dataset
from itpk.errors import raise_problems

COLUMNS = ("ID", "OUTPUT", "Cmax", "Tmax", "AUClast", "AUCinf", "lambda_z", "half_life", "lambda_z_points", "adj_r2")
UNIT_COLUMNS = ("Cmax_unit", "Tmax_unit", "AUC_unit", "lambda_z_unit", "half_life_unit")
"""Units of each row's values, after the values (and ``AUC_end``): ``Cmax_unit`` (the output's unit),
``Tmax_unit`` and ``half_life_unit`` (the time unit), ``AUC_unit`` (AUClast, AUCinf and AUC_end: time ×
concentration, e.g. ``h*mg/L``), ``lambda_z_unit`` (``1/h``). Blank where the dataset's units are unknown
(no model and no units file)."""
MIN_POINTS = 3
ADJ_R2_TOLERANCE = 1e-4
BLQ_RULE = "BLQ before the first measurable concentration = 0; BLQ after it dropped (PKNCA default)"


def auc_linear_up_log_down(time: np.ndarray, conc: np.ndarray) -> float:
    """Area under ``conc(time)`` by linear-up/log-down trapezoids.

    Parameters
    ----------
    time : array, increasing (time unit)
    conc : array, same length (concentration unit)

    Returns
    -------
    float
        AUC in concentration × time; 0 for fewer than two points.

    Examples
    --------
    >>> round(auc_linear_up_log_down(np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 1.0])), 6)
    2.442695
    """
    if len(time) < 2:
        return 0.0
    dt = np.diff(time)
    c1, c2 = conc[:-1], conc[1:]
    falling = (c2 < c1) & (c2 > 0)
    linear = 0.5 * (c1 + c2) * dt
    ratio = np.where(falling, c1 / np.where(falling, c2, 1.0), 2.0)  # 2.0: any value off the log branch
    log = (c1 - c2) * dt / np.log(ratio)
    return float(np.sum(np.where(falling, log, linear)))


@dataclass(frozen=True)
class TerminalFit:
    """The chosen terminal-phase fit: ``log C = intercept - lambda_z * t``.

    Attributes
    ----------
    lambda_z : float
        Terminal rate constant (1/time); NaN when no fit qualifies.
    points : int
        Number of points used (0 when no fit).
    adj_r2 : float
        Adjusted R² of the chosen fit.
    """

    lambda_z: float = math.nan
    points: int = 0
    adj_r2: float = math.nan

    def __post_init__(self) -> None:
        if self.points and not (self.points >= MIN_POINTS and self.lambda_z > 0):
            raise ValueError(f"a terminal fit needs >= {MIN_POINTS} points and lambda_z > 0, found {self.points} and {self.lambda_z}")


def terminal_fit(time: np.ndarray, conc: np.ndarray, tmax: float) -> TerminalFit:
    """Best log-linear fit of the terminal phase (rules in the module docstring)."""
    keep = (time > tmax) & (conc > 0)
    t, y = time[keep], np.log(conc[keep])
    fits = [_loglinear(t[-n:], y[-n:]) for n in range(MIN_POINTS, len(t) + 1)]
    if not fits:
        return TerminalFit()
    best = max(adj for _, adj, _ in fits)
    qualified = [(n, lz, adj) for lz, adj, n in fits if lz > 0 and adj > best - ADJ_R2_TOLERANCE]
    if not qualified:
        return TerminalFit()
    n, lz, adj = max(qualified)  # the most points
    return TerminalFit(lz, n, adj)


def _loglinear(t: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """(lambda_z, adjusted R², n) of the least-squares line through (t, log C)."""
    n = len(t)
    tc, yc = t - t.mean(), y - y.mean()
    sxx, syy = float(tc @ tc), float(yc @ yc)
    if sxx == 0:
        return math.nan, -math.inf, n
    slope = float(tc @ yc) / sxx
    # A flat line (syy = 0) fits perfectly; R² = 1 keeps it comparable.
    r2 = 1.0 if syy == 0 else 1.0 - (syy - slope * slope * sxx) / syy
    adj = 1.0 - (1.0 - r2) * (n - 1) / (n - 2)
    return -slope, adj, n


def profile_nca(time: np.ndarray, conc: np.ndarray, *, end: float | None = None) -> dict[str, float]:
    """NCA of one concentration-time profile (BLQ already handled).

    Parameters
    ----------
    time, conc : arrays
        Sample times (increasing) and concentrations (>= 0).
    end : float, optional
        Also return ``AUC_end``: AUClast over the samples at or before ``end``
        (no interpolation at ``end``, as PKNCA's fixed intervals).

    Returns
    -------
    dict
        ``Cmax, Tmax, AUClast, AUCinf, lambda_z, half_life, lambda_z_points, adj_r2``
        (and ``AUC_end``).
    """
    out: dict[str, float] = {name: math.nan for name in COLUMNS[2:]}
    out["lambda_z_points"] = 0
    if len(time) == 0:
        return out | ({"AUC_end": math.nan} if end is not None else {})
    imax = int(np.argmax(conc))  # the first time the maximum is reached
    out["Cmax"], out["Tmax"] = float(conc[imax]), float(time[imax])
    out["AUClast"], clast = _auclast(time, conc)
    fit = terminal_fit(time, conc, out["Tmax"])
    if fit.points:
        out |= {
            "lambda_z": fit.lambda_z, "half_life": math.log(2) / fit.lambda_z,
            "lambda_z_points": fit.points, "adj_r2": fit.adj_r2,
            "AUCinf": out["AUClast"] + clast / fit.lambda_z,
        }
    if end is not None:
        within = time <= end
        out["AUC_end"] = _auclast(time[within], conc[within])[0] if within.any() else math.nan
    return out


def _auclast(time: np.ndarray, conc: np.ndarray) -> tuple[float, float]:
    """(AUC from the first sample to Tlast, Clast); (0, 0) when nothing is > 0."""
    positive = np.flatnonzero(conc > 0)
    if len(positive) == 0:
        return 0.0, 0.0
    last = positive[-1]
    return auc_linear_up_log_down(time[: last + 1], conc[: last + 1]), float(conc[last])


def nca(dataset: Dataset, *, end: float | None = None) -> pd.DataFrame:
    """Non-compartmental analysis per subject and output.

    Parameters
    ----------
    dataset
        A dataset from :func:`itpk.dataset.read_dataset`.
    end : float, optional
        End of a fixed interval (dataset time unit): adds the column ``AUC_end``,
        AUClast over the samples at or before ``end`` (PKNCA's ``auclast`` on
        ``[0, end]``). The other columns always use every sample.

    Returns
    -------
    pandas.DataFrame
        Columns ``ID, OUTPUT, Cmax, Tmax, AUClast, AUCinf, lambda_z, half_life,
        lambda_z_points, adj_r2`` (and ``AUC_end``), one row per subject and
        output observed, in file order. ``attrs["blq"]`` states the BLQ rule.

    Examples
    --------
    >>> from importlib.resources import files
    >>> from itpk.dataset import read_dataset
    >>> table = nca(read_dataset(files("itpk.data") / "theoph.csv"), end=24)
    >>> round(float(table.loc[0, "AUC_end"]), 3)
    92.365

    Raises
    ------
    ItpkError
        An option out of range (one message listing every problem).
    """
    check_options(end=end)
    data = dataset.data
    first_dose = dataset.doses.groupby("ID", sort=False)["TIME"].min()
    obs = data[(data["EVID"] == 0) & (data["MDV"] == 0)]
    obs = obs.assign(CENSORED=dataset.censored[obs.index])
    rows = []
    for (subject, output), group in obs.groupby(["ID", "CMT"], sort=False):
        start = first_dose.get(subject, -math.inf)
        time, conc = _clean(group[group["TIME"] >= start])
        if len(time) == 0:
            continue
        rows.append({"ID": subject, "OUTPUT": output} | profile_nca(time, conc, end=end) | _units(dataset, output))
    columns = list(COLUMNS) + (["AUC_end"] if end is not None else []) + list(UNIT_COLUMNS)
    table = pd.DataFrame(rows, columns=columns)
    table["lambda_z_points"] = table["lambda_z_points"].astype("int64")
    table.attrs["blq"] = BLQ_RULE
    return table


def option_problems(*, end: float | None = None) -> list[str]:
    """Every problem of the NCA options, one line each (CLI option names); empty if none."""
    problems = []
    if end is not None and not (math.isfinite(end) and end > 0):
        problems.append(f"--end: found {end:g}; allowed: a time > 0 (in the dataset's time unit; the end of the AUC_end interval)")
    return problems


def check_options(*, end: float | None = None) -> None:
    """Raise one :class:`~itpk.errors.ItpkError` listing every problem of the NCA options."""
    raise_problems(option_problems(end=end))


def _units(dataset: Dataset, output: str) -> dict[str, str | None]:
    """The unit columns of one output's row (None where unknown)."""
    units = dataset.units
    time = units.time
    conc = units.outputs.get(output) or units.outputs.get("all outputs")  # the latter: a units file without a model
    wrap = lambda u: u if u.replace("_", "").isalnum() else f"({u})"
    simple = conc is not None and conc.count("/") <= 1 and not any(c in conc for c in " *()^")
    auc = None if time is None or conc is None else f"{wrap(time)}*{conc if simple else f'({conc})'}"
    return {"Cmax_unit": conc, "Tmax_unit": time, "AUC_unit": auc,
            "lambda_z_unit": None if time is None else f"1/{wrap(time)}", "half_life_unit": time}


def _clean(group: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Times and concentrations after the BLQ rule; missing values dropped."""
    censored = group["CENSORED"].to_numpy(dtype=bool)
    conc = group["DV"].to_numpy(dtype=float)
    time = group["TIME"].to_numpy(dtype=float)
    measurable = ~censored & (conc > 0)
    first = np.argmax(measurable) if measurable.any() else len(conc)
    index = np.arange(len(conc))
    conc = np.where(censored & (index < first), 0.0, conc)
    keep = ~(censored & (index > first)) & np.isfinite(conc)
    return time[keep], conc[keep]
