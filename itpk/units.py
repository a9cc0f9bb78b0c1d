"""Units of a dataset: the ``NAME.units.toml`` sidecar and conversion into model units.

A dataset ``trial.csv`` may have a sidecar ``trial.units.toml`` beside it::

    TIME = "h"            # also used for II and DUR unless they are given
    AMT = "mg"            # or a table by receiving compartment or route: [AMT] it = "PFU"
    RATE = "mg/min"       # optional; default AMT unit / TIME unit
    WT = "lb"             # any covariate column; converted to the model's covariate unit

    [DV]                  # or DV = "ng/mL" for every output
    plasma = "ng/mL"
    tumor = "ng/g"        # tissue: converted with a density of 1 g/mL

``LLOQ`` takes the unit of ``DV`` unless it is given (a ``[LLOQ]`` table without an
output too); ``RATE`` takes AMT's unit per TIME's unless it is given (a ``[RATE]``
table without the dose's route or compartment too). With a model, every name in a
table must be one the model has (``[AMT]``/``[RATE]``: its routes and compartments;
``[DV]``/``[LLOQ]``: its outputs), and every entry must convert to the model's unit,
whether or not a row uses it. With a model, every column
is converted to the model's units: time to ``spec.time_unit``; ``AMT`` to the
amount unit of the receiving compartment; ``RATE`` to that amount unit per model
time; ``DV``/``LLOQ`` to the output's unit. A column the sidecar does not name
is taken to be in the model's unit already, and :class:`DatasetUnits` says so
(``assumed``), as it does when there is no sidecar at all.

Units are parsed by pint with three count units added: ``PFU`` (plaque-forming
units), ``copies`` (genome copies, alias ``copy``) and ``cells``. Each is its
own dimension, so ``PFU/mL`` converts to ``PFU/L`` but never to ``copies/mL``:
the particle-to-PFU ratio depends on the agent and belongs in the model.

Tissue concentrations per tissue mass (``ng/g``) are converted to and from
concentrations per volume (``mg/L``) with a tissue density of 1 g/mL
(:data:`TISSUE_DENSITY`), and the conversion note says so.
"""

from __future__ import annotations

import functools
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itpk.errors import DatasetError

if TYPE_CHECKING:  # pint and pandas load lazily so that the CLI starts fast
    import pandas as pd
    import pint

    from itpk.spec import ModelSpec

TISSUE_DENSITY = "1 g/mL"
"""Density used to turn a concentration per tissue mass into one per volume."""

TIME_COLUMNS = ("TIME", "II", "DUR")
REPORTED = "<an invalid unit, already reported>"
"""What :meth:`_Converter._lookup` returns for a sidecar entry whose unit was refused."""
UNIT_KEYS = ("TIME", "II", "DUR", "AMT", "RATE", "DV", "LLOQ")
_TABLE_KEYS = ("AMT", "RATE", "DV", "LLOQ")  # keys that may be a table by name
_TIME_KEYS = ("TIME", "II", "DUR")


@functools.cache
def registry() -> pint.UnitRegistry:
    """The pint registry itpk uses, with PFU, copies and cells as count units."""
    import pint

    ureg = pint.UnitRegistry()
    # Separate dimensions: counts of different things must never convert into
    # each other (1 PFU is not 1 genome copy, nor 1 cell).
    ureg.define("PFU = [plaque_forming_units] = pfu")
    ureg.define("copies = [genome_copies] = copy")
    ureg.define("cells = [cells] = cell")
    # biologics and vectors: international units (cytokines; MIU is mega-IU), vector genomes and
    # TCID50 of a virus stock, each its own dimension too (an IU is defined per substance)
    ureg.define("IU = [international_units]")
    ureg.define("vg = [vector_genomes]")
    ureg.define("TCID50 = [tissue_culture_infectious_dose]")
    ureg.define("wk = week")
    return ureg


@dataclass(frozen=True)
class Conversion:
    """A multiplicative unit conversion: ``value_in_target = factor * value_in_source``.

    Attributes
    ----------
    source, target : str
        Unit texts as written (in the sidecar and in the model file).
    factor : float
        Multiplier from ``source`` to ``target`` (dimensionless).
    note : str
        Assumption used, if any (the tissue density).
    """

    source: str
    target: str
    factor: float
    note: str = ""

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"a unit conversion factor must be > 0, found {self.factor}")

    def describe(self) -> str:
        """E.g. ``ng/mL -> mg/L (x 0.001)``, with the note if any."""
        text = f"{self.source} -> {self.target} (x {self.factor:g})"
        return f"{text}, {self.note}" if self.note else text


def parse_unit(text: str) -> pint.Unit:
    """Parse a unit text, raising :class:`DatasetError` if pint does not know it."""
    ureg = registry()
    try:
        quantity = ureg.parse_expression(text)
    except Exception:  # pint raises several types (undefined unit, syntax, ...)
        raise DatasetError(f"{text!r} is not a unit itpk knows (e.g. h, day, mg, ug, ng/mL, mg/L, ng/g, PFU, copies/mL)") from None
    if quantity.magnitude != 1:  # "1e6 PFU" parses as a scaled quantity, not a unit
        raise DatasetError(f"{text!r} is a quantity, not a unit; write the scale into the values")
    return quantity.units


def conversion(source: str, target: str) -> Conversion:
    """The factor that converts values in ``source`` units to ``target`` units.

    Parameters
    ----------
    source, target
        Unit texts such as ``"ng/mL"`` and ``"mg/L"``.

    Raises
    ------
    DatasetError
        If either unit is unknown or they measure different things; a
        concentration per tissue mass (``ng/g``) and one per volume (``mg/L``)
        convert with the tissue density of 1 g/mL.

    Examples
    --------
    >>> conversion("ng/mL", "mg/L").factor
    0.001
    >>> conversion("ng/g", "mg/L").note
    'tissue density 1 g/mL'
    """
    if source == target:
        return Conversion(source, target, 1.0)
    try:
        return _conversion(source, target)
    except ArithmeticError:  # pint overflows on a unit such as mg/L**1000 while reducing it
        raise DatasetError(f"{source!r} -> {target!r}: no finite conversion factor (is the unit written as meant?)") from None


def _conversion(source: str, target: str) -> Conversion:
    """:func:`conversion` of two different unit texts (pint may raise ArithmeticError)."""
    ureg = registry()
    src, dst = parse_unit(source), parse_unit(target)
    one = ureg.Quantity(1.0, src)
    density = ureg.Quantity(TISSUE_DENSITY)
    candidates = [(one, "")]
    # Tissue: per-mass <-> per-volume only when a mass really is in a denominator,
    # so that e.g. a plain ratio "1" never picks up a density.
    if _per_mass(src):
        candidates.append((one * density, f"tissue density {TISSUE_DENSITY}"))
    if _per_mass(dst):
        candidates.append((one / density, f"tissue density {TISSUE_DENSITY}"))
    for quantity, note in candidates:
        if quantity.dimensionality == ureg.Quantity(1.0, dst).dimensionality:
            zero = ureg.Quantity(0.0, src) if not note else 0.0 * quantity  # a density changes no offset
            return Conversion(source, target, _factor(quantity, zero, dst, source, target), note)
    raise DatasetError(f"{source!r} cannot be converted to {target!r} (they measure different things)")


def _factor(one: Any, zero: Any, dst: Any, source: str, target: str) -> float:
    """The multiplier taking 1 ``source`` to ``target``; DatasetError when there is none (an offset
    scale such as degF, or a unit whose size overflows a float, e.g. ``mg/L**1000``)."""
    import pint

    try:
        factor, offset = float(one.to(dst).magnitude), float(zero.to(dst).magnitude)
    except (ArithmeticError, ValueError, TypeError, pint.errors.PintError):
        factor, offset = math.nan, 0.0
    if offset != 0.0:
        raise DatasetError(f"{source!r} -> {target!r} is not a conversion by a factor (an offset or logarithmic scale: "
                           f"0 {source} is {offset:g} {target}): give these values in {target!r}")
    if not (math.isfinite(factor) and factor > 0):
        raise DatasetError(f"{source!r} -> {target!r}: no finite conversion factor (is the unit written as meant?)")
    return factor


def _per_mass(unit: pint.Unit) -> bool:
    """True for units such as ng/g: a mass per mass (tissue concentration)."""
    ureg = registry()
    if not ureg.Quantity(1.0, unit).dimensionless:
        return False
    return any(power < 0 and ureg.Quantity(1.0, name).dimensionality == {"[mass]": 1} for name, power in unit._units.items())


@dataclass(frozen=True)
class UnitsSidecar:
    """The parsed ``NAME.units.toml``: column -> unit, or column -> {name: unit}.

    Column keys are upper case (as dataset headers are); table keys (output,
    compartment or route names) are kept as written.
    """

    path: str
    columns: Mapping[str, str | Mapping[str, str]]
    rejected: frozenset[str] = frozenset()
    """Entries given with an invalid unit (already reported): ``KEY`` or ``KEY.name``. Their conversions
    are skipped without a second, misleading "no unit for ..." problem."""

    def __post_init__(self) -> None:
        for key, value in self.columns.items():
            if key != key.upper():
                raise ValueError(f"sidecar keys are upper case, found {key!r}")
            if not isinstance(value, (str, Mapping)):
                raise ValueError(f"sidecar {key}: a unit text or a table, found {value!r}")


def sidecar_path(csv_path: str | Path) -> Path:
    """``dir/NAME.csv`` -> ``dir/NAME.units.toml``."""
    path = Path(csv_path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.units.toml")


def read_sidecar(csv_path: str | Path, covariates: tuple[str, ...] = (), *,
                 collect: list[str] | None = None) -> UnitsSidecar | None:
    """Read the units sidecar of a dataset, or None if there is none.

    Parameters
    ----------
    csv_path
        The dataset file; the sidecar is looked for beside it.
    covariates
        The dataset's covariate columns (upper case): a sidecar may also give
        their units.
    collect
        If given, the problems of its entries are appended here instead of raised, and the
        sidecar keeps its valid entries, so that their conversions can be checked in the same
        pass (one message for every problem). Unreadable TOML still raises.

    Raises
    ------
    DatasetError
        Listing every problem: invalid TOML, unknown keys, values that are not
        unit texts, units pint does not know.
    """
    path = sidecar_path(csv_path)
    if path.is_dir():  # ignoring it would take every unit to be the model's without a word
        raise DatasetError(f"units file {path}: is a folder; allowed: a TOML file of units (or no such name)")
    if not path.is_file():
        return None
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DatasetError(f"units file {path}: cannot be read as TOML ({exc})") from None
    problems: list[str] = []
    allowed = (*UNIT_KEYS, *(c.upper() for c in covariates))
    parsed: dict[str, str | dict[str, str]] = {}
    rejected: set[str] = set()
    for key, value in raw.items():
        where = f"units file {path.name}, {key}"
        upper = key.upper()
        if upper not in allowed:
            problems.append(f"{where}: unknown key; allowed: {', '.join(allowed)}")
        elif upper in parsed:
            problems.append(f"{where}: given twice (keys are case-insensitive)")
        elif isinstance(value, dict) and upper in _TABLE_KEYS:
            table = {}
            for name, unit in value.items():
                if _check_unit_text(unit, f"{where}.{name}", problems):
                    table[str(name)] = unit
                else:
                    rejected.add(f"{upper}.{name}")
            parsed[upper] = table
        elif _check_unit_text(value, where, problems):
            if upper in _TIME_KEYS and parse_unit(value).dimensionality != registry().hour.dimensionality:
                # checked here too, so that `data validate` without a model catches it
                problems.append(f"{where}: found {value!r}, which is not a time; allowed: a time unit such as h, min or day")
                rejected.add(upper)
            else:
                parsed[upper] = value
        else:
            rejected.add(upper)
    if problems and collect is None:
        raise DatasetError(f"units file {path}: invalid\n  - " + "\n  - ".join(problems))
    if collect is not None:
        collect += problems
    return UnitsSidecar(str(path), parsed, frozenset(rejected))


def _check_unit_text(value: Any, where: str, problems: list[str]) -> bool:
    if not isinstance(value, str) or not value.strip():
        problems.append(f'{where}: found {value!r}; allowed: a unit text such as "h", "mg" or "ng/mL"')
        return False
    try:
        parse_unit(value)
    except DatasetError as exc:
        problems.append(f"{where}: {exc}")
        return False
    return True


@dataclass(frozen=True)
class DatasetUnits:
    """The units a dataset's values are in, after any conversion.

    Attributes
    ----------
    time : str or None
        Unit of TIME, II and DUR (None: unknown, no model and no sidecar).
    amount : Mapping[str, str]
        Dose key (receiving compartment or route) -> unit of AMT.
    outputs : Mapping[str, str]
        Output name -> unit of DV and LLOQ.
    covariates : Mapping[str, str]
        Covariate column -> unit, where known.
    assumed : tuple of str
        Columns whose unit was not declared and was taken to be the model's
        (or left unknown without a model).
    conversions : tuple of str
        One line per conversion applied, e.g. ``DV[plasma]: ng/mL -> mg/L (x 0.001)``.
    sidecar : str or None
        Path of the units file read, if any.
    """

    time: str | None = None
    amount: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    covariates: Mapping[str, str] = field(default_factory=dict)
    assumed: tuple[str, ...] = ()
    conversions: tuple[str, ...] = ()
    sidecar: str | None = None

    @property
    def is_assumed(self) -> bool:
        """True when some column's unit was taken, not declared."""
        return bool(self.assumed)

    def assumption(self) -> str | None:
        """One line for a command's output when units were taken rather than declared (SPEC §2:
        every output says so), or None when the units file declared them all."""
        if not self.assumed:
            return None
        units = {"TIME": [f"TIME {self.time}"] if self.time else [],
                 "AMT": [f"AMT[{k}] {u}" for k, u in self.amount.items()],
                 "DV": [f"DV[{k}] {u}" for k, u in self.outputs.items()]}
        taken = ", ".join(line for column in self.assumed for line in (units.get(column) or [column]))
        if self.sidecar is None:
            return f"units: no units file beside the data; taken to be the model's ({taken})"
        return f"units: not in {self.sidecar}, taken to be the model's: {taken}"

    def describe(self) -> list[str]:
        """Lines for summaries: what the units are and where they came from."""
        lines = []
        if self.sidecar is None:
            lines.append("units: no units file; values taken to be in the model's units" if self.time else "units: no units file and no model; values used as given")
        else:
            lines.append(f"units: from {self.sidecar}")
        if self.time:
            lines.append(f"  time: {self.time}")
        lines += [f"  AMT[{key}]: {unit}" for key, unit in self.amount.items()]
        lines += [f"  DV[{key}]: {unit}" for key, unit in self.outputs.items()]
        lines += [f"  {key}: {unit}" for key, unit in self.covariates.items()]
        if self.assumed and self.sidecar is not None:
            lines.append(f"  assumed (not in the units file): {', '.join(self.assumed)}")
        lines += [f"  converted {line}" for line in self.conversions]
        return lines


def convert_units(frame: pd.DataFrame, sidecar: UnitsSidecar | None, spec: ModelSpec | None) -> tuple[pd.DataFrame, DatasetUnits]:
    """Convert a validated, normalised dataset frame into the model's units.

    Parameters
    ----------
    frame
        The normalised dataset (CMT already resolved to names).
    sidecar
        The units file, or None.
    spec
        The model; without one nothing is converted and the declared units are recorded.

    Returns
    -------
    frame, units
        A converted copy of the frame and the record of its units.

    Raises
    ------
    DatasetError
        Listing every column whose unit is unknown or incompatible with the model.
    """
    if spec is None:
        return frame, _declared_only(frame, sidecar)
    return _Converter(frame, sidecar, spec).run()


def _declared_only(frame: pd.DataFrame, sidecar: UnitsSidecar | None) -> DatasetUnits:
    """Without a model: record what the sidecar declares, convert nothing."""
    if sidecar is None:
        return DatasetUnits(assumed=("TIME", "AMT", "DV"))
    cols = sidecar.columns
    time = cols.get("TIME") if isinstance(cols.get("TIME"), str) else None
    amount = _as_table(cols.get("AMT"), "all doses")
    outputs = _as_table(cols.get("DV"), "all outputs")
    covariates = {k: v for k, v in cols.items() if k not in UNIT_KEYS and isinstance(v, str)}
    assumed = tuple(k for k in ("TIME", "AMT", "DV") if k not in cols)
    return DatasetUnits(time, amount, outputs, covariates, assumed, (), sidecar.path)


def _as_table(value: str | Mapping[str, str] | None, label: str) -> dict[str, str]:
    if value is None:
        return {}
    return {label: value} if isinstance(value, str) else dict(value)


def _per(amount: str, time: str) -> str:
    """``amount/time`` as a unit text, parenthesised only when needed."""
    wrap = lambda u: u if u.replace("_", "").isalnum() else f"({u})"  # noqa: E731
    return f"{wrap(amount)}/{wrap(time)}"


class _Converter:
    """Converts each column of a frame into model units, collecting every problem."""

    def __init__(self, frame: pd.DataFrame, sidecar: UnitsSidecar | None, spec: ModelSpec) -> None:
        self.frame = frame.copy()
        self.sidecar = sidecar
        self.cols: Mapping[str, Any] = sidecar.columns if sidecar else {}
        self.spec = spec
        self.where = f"units file {Path(sidecar.path).name}" if sidecar else f"model {spec.name}"
        self.problems: list[str] = []
        self.conversions: list[str] = []
        self.amount: dict[str, str] = {}
        self.outputs: dict[str, str] = {}
        self.covariates: dict[str, str] = {}
        self.used: set[tuple[str, str]] = set()  # (column, table name) looked up for some row

    def run(self) -> tuple[pd.DataFrame, DatasetUnits]:
        self._table_keys()
        self._time()
        self._doses()
        self._observations()
        self._covariates()
        self._unused_entries()
        if self.problems:
            unique = list(dict.fromkeys(self.problems))  # one line per distinct problem
            raise DatasetError("cannot convert the dataset to the model's units\n  - " + "\n  - ".join(unique))
        assumed = tuple(k for k in ("TIME", "AMT", "DV") if k not in self.cols)
        units = DatasetUnits(
            self.spec.time_unit, self.amount, self.outputs, self.covariates, assumed,
            tuple(self.conversions), self.sidecar.path if self.sidecar else None,
        )
        return self.frame, units

    def _convert(self, source: str, target: str, label: str) -> float | None:
        """Factor source -> target, recording the conversion (or the problem)."""
        try:
            conv = conversion(source, target)
        except DatasetError as exc:
            self.problems.append(f"{self.where}, {label}: {exc}")
            return None
        if conv.factor != 1 or conv.source != conv.target:
            self.conversions.append(f"{label}: {conv.describe()}")
        return conv.factor

    def _time(self) -> None:
        target = self.spec.time_unit
        base = self.cols.get("TIME", target)
        factors = {}
        for column in TIME_COLUMNS:
            source = self.cols.get(column, base)
            factors[column] = self._convert(source, target, column) if column in self.cols or column == "TIME" else factors["TIME"]
        for column, factor in factors.items():
            if factor is not None and factor != 1 and column in self.frame:
                self.frame[column] = self.frame[column] * factor

    def _table_keys(self) -> None:
        """Every name in a table ([AMT], [RATE]: receiving compartments or routes; [DV], [LLOQ]: outputs)
        is one the model has: a misspelt key would otherwise be ignored and its column left unconverted."""
        spec = self.spec
        doses = (*spec.routes, *(n for n in spec.state_names if n not in spec.routes))
        known = {"AMT": (doses, "routes and compartments"), "RATE": (doses, "routes and compartments"),
                 "DV": (tuple(spec.outputs), "outputs"), "LLOQ": (tuple(spec.outputs), "outputs")}
        for key, (names, kind) in known.items():
            table = self.cols.get(key)
            if not isinstance(table, Mapping):
                continue
            for name in table:
                if name not in names:
                    self.problems.append(f"{self.where}, {key}.{name}: not one of the {kind} of model {spec.name}; "
                                         f"allowed: {', '.join(names)} (names as in the model, case-sensitive)")

    def _lookup(self, key: str, names: tuple[str, ...], default: str) -> str | None:
        """The sidecar unit of a column: ``default`` if the key is absent, None if
        its table has none of ``names`` (the first found wins), ``REPORTED`` if the
        entry was given with an invalid unit (a problem already listed)."""
        value = self.cols.get(key)
        rejected = self.sidecar.rejected if self.sidecar else frozenset()
        if value is None:
            return REPORTED if key in rejected else default
        if isinstance(value, str):
            return value
        name = next((name for name in names if name in value), None)
        if name is None:
            return REPORTED if any(f"{key}.{n}" in rejected for n in names) else None
        self.used.add((key, name))
        return value[name]

    def _doses(self) -> None:
        import numpy as np

        frame = self.frame
        doses = frame.index[frame["EVID"].isin((1, 4))]
        amt = frame["AMT"].to_numpy(dtype=float, copy=True)
        rate = frame["RATE"].to_numpy(dtype=float, copy=True)
        time_source = self.cols.get("TIME", self.spec.time_unit)
        cache: dict[tuple[str, str, str], float | None] = {}
        for i in doses:
            route, cmt = frame.at[i, "ROUTE"], frame.at[i, "CMT"]
            names = tuple(n for n in (cmt, route) if isinstance(n, str))
            target = self._dose_target(route, cmt)
            key = names[0]
            self.amount.setdefault(key, target)
            source = self._lookup("AMT", names, target)
            if source is REPORTED:
                continue
            if source is None:
                self.problems.append(f"{self.where}, AMT: no unit for {' or '.join(repr(n) for n in names)} (row {frame.at[i, 'ROW']}); allowed: a key for each receiving compartment or route, or one AMT unit")
                continue
            amt_factor = self._cached(cache, source, target, f"AMT[{key}]")
            rate_factor = None
            # a RATE table without this dose's route or compartment falls back to AMT's unit per TIME's
            derived = _per(source, time_source)
            rate_source = (self._lookup("RATE", names, derived) or derived) if rate[i] > 0 else None
            # a RATE unit derived from an AMT unit that does not convert would repeat its problem
            if rate_source == derived and amt_factor is None:
                rate_source = None
            if rate_source not in (None, REPORTED):
                rate_factor = self._cached(cache, rate_source, _per(target, self.spec.time_unit), f"RATE[{key}]")
            if amt_factor is not None:
                amt[i] *= amt_factor
            if rate_factor is not None:
                rate[i] *= rate_factor
        frame["AMT"] = amt
        frame["RATE"] = np.where(np.isfinite(rate), rate, 0.0)

    def _cached(self, cache: dict[tuple[str, str, str], float | None], source: str, target: str, label: str) -> float | None:
        if (source, target, label) not in cache:
            cache[(source, target, label)] = self._convert(source, target, label)
        return cache[(source, target, label)]

    def _dose_target(self, route: Any, cmt: Any) -> str:
        """Amount unit of the compartment(s) a dose row goes into (a model's route doses compartments of one
        amount unit: :mod:`itpk.dimensions` refuses others when the model loads)."""
        spec = self.spec
        name = cmt if isinstance(cmt, str) else spec.routes[route].site
        return next(c.amount_unit for c in spec.compartments if c.name == name)

    def _observations(self) -> None:
        frame = self.frame
        obs = frame["EVID"] == 0
        for name, output in self.spec.outputs.items():
            self.outputs[name] = output.unit
            rows = obs & (frame["CMT"] == name)
            if not rows.any():
                continue
            dv_source = self._lookup("DV", (name,), output.unit)
            # LLOQ is in DV's unit unless the units file gives its own (a [LLOQ] table without this output too)
            lloq_source = self._lookup("LLOQ", (name,), dv_source or output.unit) or dv_source
            if REPORTED in (dv_source, lloq_source):  # an invalid unit, already listed
                continue
            if dv_source is None or lloq_source is None:  # LLOQ falls back to DV: only DV can lack a unit
                self.problems.append(
                    f"{self.where}, DV: no unit for output {name!r}; allowed: DV = \"unit\" "
                    f"or a [DV] table with a key for each output measured ({', '.join(self.spec.outputs)})"
                )
                continue
            dv_factor = self._convert(dv_source, output.unit, f"DV[{name}]")
            lloq_factor = dv_factor if lloq_source == dv_source else self._convert(lloq_source, output.unit, f"LLOQ[{name}]")
            for column, factor in (("DV", dv_factor), ("LLOQ", lloq_factor)):
                if factor is not None and factor != 1:
                    frame.loc[rows, column] = frame.loc[rows, column] * factor

    def _unused_entries(self) -> None:
        """Entries of the unit tables that no row used (an output not measured, a route not given, or rows
        with problems of their own) are still checked against the model: their conversion needs no row."""
        spec = self.spec
        for key in _TABLE_KEYS:
            table = self.cols.get(key)
            if not isinstance(table, Mapping):
                continue
            for name, source in table.items():
                if (key, name) in self.used:
                    continue
                if key in ("DV", "LLOQ") and name in spec.outputs:
                    target = spec.outputs[name].unit
                elif key in ("AMT", "RATE") and (name in spec.routes or name in spec.state_names):
                    amount = self._dose_target(name if name in spec.routes else None, name if name not in spec.routes else None)
                    target = amount if key == "AMT" else _per(amount, spec.time_unit)
                else:
                    continue  # not a name of the model: reported by _table_keys
                try:
                    conversion(source, target)
                except DatasetError as exc:
                    self.problems.append(f"{self.where}, {key}[{name}]: {exc}")

    def _covariates(self) -> None:
        declared = {name.upper(): cov for name, cov in self.spec.covariates.items()}
        for key, source in self.cols.items():
            if key in UNIT_KEYS:
                continue
            cov = declared.get(key)
            if cov is None or not cov.unit:
                self.covariates[key] = source
                continue
            column = cov.name if cov.name in self.frame else key
            factor = self._convert(source, cov.unit, column)
            self.covariates[column] = cov.unit
            if factor is not None and factor != 1:
                self.frame[column] = self.frame[column] * factor
