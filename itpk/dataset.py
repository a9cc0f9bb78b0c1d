"""Datasets: one NONMEM-style CSV, read, checked and normalised (SPEC.md §2).

:func:`read_dataset` is the only way data enter itpk. It reads the file as
text, checks every row and column (against a model's routes, compartments and
outputs when one is given), and either returns a :class:`Dataset` or raises a
single :class:`~itpk.errors.DatasetError` that lists every problem found: file
row number (the header is row 1, as in a spreadsheet), column, what was found
and what is allowed. Rows are never reordered or dropped; fully blank rows are
skipped and listed in :attr:`Dataset.ignored_rows`.

Missing cells are blank, ``.`` (NONMEM), ``NA``, ``N/A`` or ``NaN``; where a value is
needed, a message quotes such a marker (``found 'nan'``) rather than calling it blank.
A number that is not finite (``inf``, or ``1e400``: beyond the largest float) is refused.
Units-file problems are listed in the same message as the rows' problems; the
conversions are then checked on the rows that have none.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from itpk.errors import DatasetError
from itpk.events import MAX_DOSES
from itpk.units import DatasetUnits, convert_units, read_sidecar

if TYPE_CHECKING:
    from itpk.spec import ModelSpec

STANDARD_COLUMNS = (
    "ID", "TIME", "EVID", "AMT", "DV", "ROUTE", "CMT", "RATE", "DUR", "II", "ADDL", "SS", "MDV", "BLQ", "LLOQ", "ARM",
)
REQUIRED_COLUMNS = ("ID", "TIME", "EVID")
ALIASES = {"CENS": "BLQ"}
ROUTES = ("it", "ia", "iv", "sc", "po")
EVIDS = {0: "observation", 1: "dose", 2: "other", 3: "reset", 4: "reset and dose"}
DOSE_EVIDS = (1, 4)
MISSING_TEXT = ("", ".", "NA", "N/A", "NAN")  # compared upper case
MAX_LISTED = 50
"""At most this many problems are listed; the rest are counted."""

_FLOATS = ("TIME", "AMT", "DV", "RATE", "DUR", "II", "LLOQ")
_INTEGERS = {"EVID": tuple(EVIDS), "ADDL": None, "SS": (0, 1, 2), "MDV": (0, 1), "BLQ": (0, 1)}
_NUMBER = "a finite number (with a decimal point, e.g. 1.5)"
_EVID_TEXT = ", ".join(f"{k} ({v})" for k, v in EVIDS.items())


@dataclass(frozen=True)
class Dataset:
    """A checked dataset in normalised form, in the model's units.

    Attributes
    ----------
    data : pandas.DataFrame
        One row per file row, in file order, with every column of SPEC.md §2
        (absent optional columns filled: AMT/RATE/DUR/II/ADDL/SS/BLQ 0, MDV 1
        on non-observation rows), covariates, and ``ROW``: the row number in
        the file (header = row 1). ``BLQ`` is 1 exactly on censored
        observations (flagged in the file, or DV < LLOQ) and their ``LLOQ`` is
        the censoring limit (LLOQ if given, else DV). ``CMT`` holds names (a
        model's numbers resolved); ``ROUTE`` is lower case. Treat it as read-only.
    source : str
        The file read.
    units : DatasetUnits
        The units the values are in and any conversion applied.
    model : str or None
        Name of the model the data were checked against.
    ignored_rows : tuple of int
        Fully blank rows skipped (file row numbers).
    """

    data: pd.DataFrame = field(repr=False)
    source: str
    units: DatasetUnits = field(default_factory=DatasetUnits)
    model: str | None = None
    ignored_rows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        missing = [c for c in ("ROW", *STANDARD_COLUMNS) if c not in self.data.columns]
        if missing:
            raise DatasetError(f"{self.source}: a Dataset needs the columns {', '.join(missing)} (build it with read_dataset)")
        if len(self.data) == 0:
            raise DatasetError(f"{self.source}: a Dataset needs at least one row")

    @property
    def subjects(self) -> tuple[Any, ...]:
        """Subject IDs in file order."""
        return tuple(pd.unique(self.data["ID"]).tolist())

    @property
    def arms(self) -> tuple[str, ...]:
        """Study arm labels in file order (empty without an ARM column)."""
        return tuple(pd.unique(self.data["ARM"].dropna()).tolist())

    @property
    def outputs(self) -> tuple[str, ...]:
        """Names of the outputs observed, in file order."""
        return tuple(pd.unique(self.data.loc[self.data["EVID"] == 0, "CMT"].dropna()).tolist())

    @property
    def covariates(self) -> tuple[str, ...]:
        """Covariate columns (everything that is not a standard column)."""
        return tuple(c for c in self.data.columns if c not in STANDARD_COLUMNS and c != "ROW")

    @property
    def doses(self) -> pd.DataFrame:
        """Dose rows (EVID 1 or 4)."""
        return self.data[self.data["EVID"].isin(DOSE_EVIDS)]

    @property
    def observations(self) -> pd.DataFrame:
        """Observation rows that count (EVID 0, MDV 0), censored ones included."""
        return self.data[(self.data["EVID"] == 0) & (self.data["MDV"] == 0)]

    @property
    def censored(self) -> pd.Series:
        """Boolean mask over :attr:`data`: observations below the limit of quantification."""
        return (self.data["EVID"] == 0) & (self.data["MDV"] == 0) & (self.data["BLQ"] == 1)

    @property
    def units_assumed(self) -> bool:
        """True when some units were not declared (no or partial units file)."""
        return self.units.is_assumed


def read_dataset(path: str | Path, spec: ModelSpec | None = None) -> Dataset:
    """Read, check and normalise a dataset CSV (SPEC.md §2).

    Parameters
    ----------
    path
        The CSV file. A units file ``NAME.units.toml`` beside it is read too
        (see :mod:`itpk.units`).
    spec
        The model the data are for: CMT is resolved against its compartments
        (dose rows) and outputs (observation rows), ROUTE against its routes,
        covariates against its declarations, and values are converted into its
        units. Without a model only the model-free checks run.

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetError
        One error listing every problem (row, column, found, allowed), also for
        files that are missing, unreadable, empty or not CSV.

    Examples
    --------
    >>> from importlib.resources import files
    >>> ds = read_dataset(files("itpk.data") / "theoph.csv")
    >>> len(ds.subjects), ds.outputs
    (12, ('plasma',))
    """
    source = str(path)
    header, rows, blank = _read_cells(Path(str(path)))
    return _build(header, rows, blank, source, spec, Path(str(path)))


def log_error_notes(dataset: Dataset, spec: ModelSpec) -> list[str]:
    """Quantified DV <= 0 of the outputs whose model-file error model is ``log``, one line per output.

    Not a problem of the dataset (a fit with ``--error OUTPUT=additive`` takes them), but a fit with the
    model's own error model refuses them: ``itpk data validate --model`` says so beforehand.
    """
    obs = dataset.observations
    notes = []
    for name, output in spec.outputs.items():
        if output.error != "log":
            continue
        rows = obs[(obs["CMT"] == name) & (obs["BLQ"] == 0) & ~(obs["DV"] > 0)]
        if len(rows):
            notes.append(f"{name}: DV <= 0 on rows {listed_dv(rows)}; the model file's log error model needs DV > 0: mark "
                         f"them BLQ=1 with their LLOQ, or fit with --error {name}=additive")
    return notes


def listed_dv(rows: pd.DataFrame, shown: int = 10) -> str:
    """``4 (0), 5 (-1) and 3 more``: the file rows (``ROW``) and DV of the first ``shown`` rows."""
    listed = ", ".join(f"{r} ({dv:g})" for r, dv in zip(rows["ROW"][:shown], rows["DV"][:shown], strict=True))
    return listed + (f" and {len(rows) - shown} more" if len(rows) > shown else "")


def check_against(dataset: Dataset, spec: ModelSpec) -> None:
    """Check the routes, sites, compartments and outputs of a dataset read without ``spec``.

    :func:`read_dataset` with the model does this (and more) while reading; a dataset read
    without one, or with another model, is checked here before a fit uses it. A no-op for a
    dataset read with ``spec``.

    Raises
    ------
    DatasetError
        Every name the model does not have, one line per row, at once.
    """
    if dataset.model == spec.name:
        return
    problems = []
    df = dataset.data
    for row, evid, route, cmt in zip(df["ROW"], df["EVID"], df["ROUTE"], df["CMT"], strict=True):
        route = route if isinstance(route, str) and route else None
        cmt = cmt if isinstance(cmt, str) and cmt else None
        if evid in (1, 4) and route is not None and route not in spec.routes:
            problems.append(Problem(int(row), "ROUTE", f"found {route!r}", f"a route of model {spec.name}: {', '.join(spec.routes)}"))
        elif evid in (1, 4) and route is not None and cmt is not None and cmt not in spec.routes[route].sites:
            sites = spec.routes[route].sites
            problems.append(Problem(int(row), "CMT", f"found {cmt!r} with ROUTE={route}", f"blank or {' or '.join(sites)}"))
        elif evid in (1, 4) and route is None and cmt is not None and cmt not in spec.state_names:
            problems.append(Problem(int(row), "CMT", f"found {cmt!r} on a dose row",
                                    f"a compartment of model {spec.name}: {', '.join(spec.state_names)}"))
        elif evid == 0 and cmt is not None and cmt not in spec.outputs:
            problems.append(Problem(int(row), "CMT", f"found {cmt!r} on an observation row",
                                    f"an output of model {spec.name}: {', '.join(spec.outputs)}"))
    if problems:
        read = f"read with model {dataset.model}" if dataset.model else "read without a model"
        raise DatasetError(_message(f"{dataset.source} ({read}, fitted with {spec.name})", problems, []))


def read_frame(frame: pd.DataFrame, spec: ModelSpec | None = None, *, source: str = "<frame>") -> Dataset:
    """Check and normalise a dataset given as a DataFrame (as if read from CSV).

    Row numbers in messages count the header as row 1, as for a file. No units
    file is read: values are taken to be in the model's units.
    """
    header = [str(c) for c in frame.columns]
    rows = [(i + 2, ["" if _isna(v) else str(v) for v in record]) for i, record in enumerate(frame.itertuples(index=False))]
    if not rows:
        raise DatasetError(f"{source}: invalid dataset\n  - file: has a header but no data rows; allowed: one row per event")
    return _build(header, rows, (), source, spec, None)


def _isna(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def _build(
    header: list[str], rows: list[tuple[int, list[str]]], blank: Iterable[int], source: str,
    spec: ModelSpec | None, path: Path | None,
) -> Dataset:
    reader = _Reader(header, rows, source, spec)
    frame = reader.run()
    sidecar = None
    if path is not None:
        try:
            sidecar = read_sidecar(path, reader.covariate_columns, collect=reader.extra)
        except DatasetError as exc:
            reader.extra += _listed(exc)
    # the units' conversions are checked with the units file's own problems, so one message lists them
    # all (a time key that is not a time used to hide the rest); with rows that have problems, they are
    # checked on the other rows (what a bad row needs is known once the row is mended)
    checked = frame if frame is not None else reader.partial
    converted = None
    if checked is not None:
        try:
            converted = convert_units(checked, sidecar, spec)
        except DatasetError as exc:
            reader.extra += _listed(exc)
    if converted is not None:
        reader.problems += _flag_problems(converted[0], spec)
        if spec is not None:
            from itpk.covcheck import covariate_problems

            reader.problems += [Problem(*p) for p in covariate_problems(converted[0], spec)]
    reader.raise_if_problems()
    assert frame is not None and converted is not None  # no problems: the whole frame was converted
    frame, units = converted
    return Dataset(_censor(frame), source, units, spec.name if spec else None, tuple(blank))


def _listed(exc: DatasetError) -> list[str]:
    """The ``  - `` items of a multi-line error message (or the message itself)."""
    lines = [line[4:] for line in str(exc).splitlines() if line.startswith("  - ")]
    return lines or [str(exc)]


def _flag_problems(frame: pd.DataFrame, spec: ModelSpec | None) -> list[Problem]:
    """A measured value above its limit on a row flagged below it (BLQ=1): the flag or the value is
    wrong, and the fit would silently drop the value. Checked after unit conversion, since DV and
    LLOQ may be in different units (with a relative tolerance: each went through its own factor)."""
    obs = (frame["EVID"] == 0) & (frame["MDV"] == 0) & (frame["BLQ"] == 1)
    above = obs & frame["DV"].notna() & frame["LLOQ"].notna() & (frame["DV"] > frame["LLOQ"] * (1 + 1e-9))
    problems = []
    for row, cmt, dv, lloq in zip(*(frame.loc[above, c] for c in ("ROW", "CMT", "DV", "LLOQ")), strict=True):
        unit = f" {spec.outputs[cmt].unit}" if spec is not None and cmt in spec.outputs else ""
        units = f" ({cmt} in the model's unit)" if unit else ""
        problems.append(Problem(int(row), "DV", f"found {_fmt(dv)}{unit} above LLOQ {_fmt(lloq)}{unit} on a row flagged BLQ=1{units}",
                                "a value at or below LLOQ (or blank) when BLQ=1, or BLQ=0 for a measured value"))
    return problems


def _censor(frame: pd.DataFrame) -> pd.DataFrame:
    """BLQ = 1 exactly on censored observations, whose LLOQ becomes the limit.

    Done after unit conversion, since DV and LLOQ may have been given in different units.
    """
    obs = (frame["EVID"] == 0) & (frame["MDV"] == 0)
    censored = obs & ((frame["BLQ"] == 1) | (frame["DV"] < frame["LLOQ"]))
    frame = frame.assign(BLQ=censored.astype("int64"))
    # Every censored row carries its limit: LLOQ if given, else DV (which then holds it).
    return frame.assign(LLOQ=frame["LLOQ"].where(~censored | frame["LLOQ"].notna(), frame["DV"]))


# -- reading the file ------------------------------------------------------------------


def _fail(source: str, found: str, allowed: str) -> DatasetError:
    return DatasetError(f"{source}: cannot read dataset\n  - file: {found}; allowed: {allowed}")


def _read_cells(path: Path) -> tuple[list[str], list[tuple[int, list[str]]], tuple[int, ...]]:
    """Header and data rows (with file row numbers) as text; blank rows apart."""
    source = str(path)
    allowed = "a comma-separated text file (CSV) with a header row"
    if not path.exists():
        raise _fail(source, "does not exist", "a path to a CSV file")
    if path.is_dir():
        raise _fail(source, "is a directory", "a path to a CSV file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _fail(source, f"cannot be read ({exc.strerror})", allowed) from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text" export
        raise _fail(source, "is UTF-16 text", "CSV saved as UTF-8 (e.g. Excel's 'CSV UTF-8')")
    if b"\x00" in raw[:65536]:
        raise _fail(source, "contains binary data (NUL bytes), not text", allowed)
    try:
        text = raw.decode("utf-8-sig")  # Excel writes a byte-order mark
    except UnicodeDecodeError as exc:
        raise _fail(source, f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})", "CSV saved as UTF-8") from None
    if not text.strip():
        raise _fail(source, "is empty", "a header row, then one row per event")
    records: list[tuple[int, list[str]]] = []
    try:
        for number, cells in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            records.append((number, cells))
    except csv.Error as exc:
        raise _fail(source, f"row {len(records) + 1} cannot be parsed as CSV ({exc})", allowed) from None
    blank = tuple(n for n, cells in records if not any(c.strip() for c in cells))
    skip = {1, *blank}
    data = [(n, cells) for n, cells in records if n not in skip]
    if 1 in blank:
        raise _fail(source, "row 1 is blank", "a header row naming the columns (ID, TIME, EVID, ...)")
    if not data:
        raise _fail(source, "has a header but no data rows", "one row per event")
    return records[0][1], data, blank


@dataclass(frozen=True)
class Problem:
    """One problem in a dataset: where, what was found, what is allowed.

    ``row`` is the file row (header = 1) or None for the whole column/file.
    """

    row: int | None
    column: str | None
    found: str
    allowed: str

    def __str__(self) -> str:
        parts = []
        if self.row is not None:
            parts.append("row 1 (header)" if self.row == 1 else f"row {self.row}")
        if self.column is not None:
            parts.append(self.column if self.row is not None else f"column {self.column}")
        return f"{', '.join(parts) or 'file'}: {self.found}; allowed: {self.allowed}"


def _message(source: str, problems: list[Problem], extra: list[str]) -> str:
    ordered = sorted(problems, key=lambda p: (p.row or 0))
    lines = [str(p) for p in ordered] + extra
    shown = lines[:MAX_LISTED]
    more = len(lines) - len(shown)
    count = f"{len(lines)} problem{'s' if len(lines) != 1 else ''}"
    text = f"{source}: invalid dataset, {count}:\n  - " + "\n  - ".join(shown)
    return text + (f"\n  ... and {more} more" if more else "")


def _not_a_number(text: str, value: float) -> str:
    """What a numeric cell holds when it is not a finite number: 'abc' is not a number, 'inf'
    and '1e400' (beyond the largest float) are numbers that are not finite."""
    return f"found {text!r}: not a finite number" if np.isinf(value) else f"found {text!r}, not a number"


def _fmt(value: Any) -> str:
    """A cell value as a person would type it: 2 not 2.0."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


class _Reader:
    """Checks the text cells of a dataset, collecting every problem, then normalises it."""

    def __init__(self, header: list[str], rows: list[tuple[int, list[str]]], source: str, spec: ModelSpec | None) -> None:
        self.raw_header = header
        self.raw_rows = rows
        self.source = source
        self.spec = spec
        self.problems: list[Problem] = []
        self.extra: list[str] = []  # already-formatted problems (units file)
        self.present: set[str] = set()
        self.covariate_columns: tuple[str, ...] = ()
        self._blank_cells: dict[str, pd.Series] = {}
        self.partial: pd.DataFrame | None = None  # the rows without problems, in normal form, when some have them

    def add(self, row: int | None, column: str | None, found: str, allowed: str) -> None:
        self.problems.append(Problem(row, column, found, allowed))

    def add_rows(self, mask: pd.Series, column: str | None, found: Any, allowed: str) -> None:
        """One problem per row in ``mask``; ``found`` may be a function of the row index."""
        for i in np.flatnonzero(mask.to_numpy(dtype=bool)):
            self.add(int(self.row[i]), column, found(i) if callable(found) else found, allowed)

    def raise_if_problems(self) -> None:
        if self.problems or self.extra:
            raise DatasetError(_message(self.source, self.problems, self.extra))

    # -- the pipeline --------------------------------------------------------------
    def run(self) -> pd.DataFrame | None:
        names = self._header()
        absent = [name for name in REQUIRED_COLUMNS if name not in self.present]
        if len(self.problems) > len(absent):  # the header itself cannot be read (duplicates, a separator)
            self.raise_if_problems()
        text = self._text_frame(names)
        self.text = text
        self.row = text["ROW"].to_numpy()
        values = self._coerce(text)
        self._check_columns(values)
        self._check_subjects(values)
        if "EVID" in self.present:  # without it no row is a dose or an observation
            self._check_evid(values)
            self._check_doses(values)
            self._check_observations(values)
        self._check_routes_and_cmt(values)  # route names are checked on every row; the rest needs EVID
        self._check_covariates(values)
        self._check_duplicates(text)
        if absent:  # reported with every problem the rows have without the missing columns
            self.raise_if_problems()
        return self._normalise(values)

    def _header(self) -> list[str]:
        """Upper-case names, aliases applied; blank, duplicated and missing columns reported."""
        names = [ALIASES.get(h.strip().upper(), h.strip().upper()) for h in self.raw_header]
        for j, name in enumerate(names):
            if not name and any(j < len(cells) and cells[j].strip() for _, cells in self.raw_rows):
                self.add(1, f"column {j + 1}", "blank name above values", "a column name")
        seen: dict[str, list[int]] = {}
        for j, name in enumerate(names):
            if name:
                seen.setdefault(name, []).append(j + 1)
        for name, where in seen.items():
            if len(where) > 1:
                self.add(1, name, f"appears {len(where)} times (columns {', '.join(map(str, where))})",
                         "each column once (headers are case-insensitive; CENS is BLQ)")
        if "ROW" in seen:
            self.add(1, "ROW", "a column named ROW", "another name (itpk adds ROW, the file row number)")
        for name in REQUIRED_COLUMNS:
            if name not in seen:
                self.add(None, name, "missing", f"a header with the required columns {', '.join(REQUIRED_COLUMNS)}")
        if len(seen) == 1 and any(sep in self.raw_header[0] for sep in ";\t|"):
            self.add(1, None, f"one column named {self.raw_header[0][:60]!r}", "commas between columns (the file seems to use another separator)")
        self.present = set(seen)
        return names

    def _text_frame(self, names: list[str]) -> pd.DataFrame:
        """Cells as stripped text, one column per header name (absent standard columns blank)."""
        width = len(names)
        cells = []
        for number, row in self.raw_rows:
            extra = [c for c in row[width:] if c.strip()]
            if extra:
                self.add(number, None, f"{len(row)} cells, the last non-blank ones beyond the header",
                         f"at most {width} cells (one per header column)")
            cells.append([c.strip() for c in row[:width]] + [""] * (width - len(row)))
        keep = [j for j, n in enumerate(names) if n]
        frame = pd.DataFrame([[r[j] for j in keep] for r in cells], columns=[names[j] for j in keep], dtype=object)
        for name in STANDARD_COLUMNS:
            if name not in frame:
                frame[name] = pd.Series("", index=frame.index, dtype=object)
        frame["ROW"] = [n for n, _ in self.raw_rows]
        self.covariate_columns = tuple(c for c in frame.columns if c not in STANDARD_COLUMNS and c != "ROW")
        return frame

    # -- types ---------------------------------------------------------------------
    def _coerce(self, text: pd.DataFrame) -> dict[str, pd.Series]:
        """Typed columns; unparseable cells are reported and become missing."""
        values: dict[str, pd.Series] = {}
        values["ID"] = self._ids(text["ID"])
        for name in _FLOATS:
            values[name] = self._numbers(name)
        for name, allowed in _INTEGERS.items():
            values[name] = self._integers(name, allowed)
        for name in ("ROUTE", "CMT", "ARM"):
            values[name] = text[name].where(~self._missing(name))
        values["ROUTE"] = values["ROUTE"].str.lower()
        return values

    def _missing(self, column: str) -> pd.Series:
        """Blank cells of a column (computed once per column)."""
        if column not in self._blank_cells:
            self._blank_cells[column] = self.text[column].str.upper().isin(MISSING_TEXT)
        return self._blank_cells[column]

    def _numbers(self, column: str, allowed: str = _NUMBER) -> pd.Series:
        text = self.text[column]
        missing = self._missing(column)
        values = pd.to_numeric(text.where(~missing), errors="coerce").astype(float)
        bad = ~missing & ~np.isfinite(values)
        self.add_rows(bad, column, lambda i: _not_a_number(text.iat[i], values.iat[i]), allowed)
        return values.where(~bad)

    def _integers(self, column: str, allowed: tuple[int, ...] | None) -> pd.Series:
        allowed_text = _EVID_TEXT if column == "EVID" else ("a whole number >= 0" if allowed is None else " or ".join(map(str, allowed)))
        values = self._numbers(column, allowed_text)
        ok = values.isna() | (values % 1 == 0)
        ok &= values.isna() | (values.isin(allowed) if allowed is not None else values >= 0)
        self.add_rows(~ok, column, lambda i: f"found {self.text[column].iat[i]!r}", allowed_text)
        return values.where(ok)

    def _ids(self, text: pd.Series) -> pd.Series:
        missing = text.str.upper().isin(MISSING_TEXT)
        ids = text.where(~missing)
        # Integer IDs when every one reads back unchanged (so "01" and "1" stay distinct).
        numeric = pd.to_numeric(ids, errors="coerce")
        if numeric.notna().all() and (numeric % 1 == 0).all() and (numeric.astype("int64").astype(str) == ids).all():
            return numeric.astype("int64")
        return ids

    # -- checks ----------------------------------------------------------------------
    def _blank(self, values: dict[str, pd.Series], column: str, mask: pd.Series, found: str, allowed: str) -> None:
        """Report blank cells of ``column`` on ``mask`` rows: one line if the column is absent."""
        mask = mask & self._missing(column)
        if not mask.any():
            return
        if column not in self.present:
            rows = self.row[mask.to_numpy()]
            listed = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            self.add(None, column, f"missing, needed on {len(rows)} rows ({listed})", allowed)
        else:
            self.add_rows(mask, column, self._as_found(column, found), allowed)

    def _as_found(self, column: str, found: str) -> Any:
        """``found`` for a blank cell; for a missing-value marker (NaN, NA, .) what the cell holds instead
        ("found 'nan' ..." rather than "blank ..."), so that the user can find it."""
        text = self.text[column]
        if not found.startswith("blank"):
            return found
        return lambda i: found if not text.iat[i] else f"found {text.iat[i]!r} (read as a missing value){found[len('blank'):]}"

    def _check_columns(self, values: dict[str, pd.Series]) -> None:
        everywhere = pd.Series(True, index=values["ID"].index)
        for column, allowed in (("ID", "a subject identifier"), ("TIME", _NUMBER), ("EVID", _EVID_TEXT)):
            if column in self.present:  # a missing column is one problem of the header's
                self._blank(values, column, everywhere, "blank", allowed)
        time = values["TIME"]  # the models start from their initial amounts at time 0
        self.add_rows(time < 0, "TIME", lambda i: f"found {_fmt(time.iat[i])}", "a time >= 0 (time 0 is the start of the model's clock)")

    def _check_subjects(self, values: dict[str, pd.Series]) -> None:
        """Each subject's rows together, and TIME non-decreasing within them."""
        ids, time = values["ID"], values["TIME"]
        known = ids.notna()
        first_row: dict[Any, int] = {}
        previous = None
        for i in np.flatnonzero(known.to_numpy()):
            current = ids.iat[i]
            if current != previous and current in first_row:
                self.add(int(self.row[i]), "ID", f"found {current} again after other subjects (its rows start at row {first_row[current]})",
                         "each subject's rows together, in time order")
            first_row.setdefault(current, int(self.row[i]))
            previous = current
        usable = known & time.notna()
        frame = pd.DataFrame({"ID": ids[usable], "TIME": time[usable], "ROW": self.row[usable.to_numpy()]})
        # Compare with the latest earlier time of the same subject (a running maximum),
        # so one early value is reported once, not for every row after it.
        before = frame.groupby("ID", sort=False)["TIME"].cummax().groupby(frame["ID"], sort=False).shift()
        for i in np.flatnonzero((frame["TIME"] < before).to_numpy()):
            self.add(int(frame["ROW"].iat[i]), "TIME", f"found {_fmt(frame['TIME'].iat[i])}, earlier than {_fmt(before.iat[i])} on an earlier row of ID {frame['ID'].iat[i]}",
                     "times non-decreasing within a subject")

    def _check_evid(self, values: dict[str, pd.Series]) -> None:
        evid, mdv = values["EVID"], values["MDV"]
        bad = evid.notna() & (evid != 0) & (mdv == 0)
        self.add_rows(bad, "MDV", lambda i: f"found 0 on an EVID={_fmt(evid.iat[i])} row", "1 or blank (only observations, EVID=0, have MDV=0)")

    def _check_doses(self, values: dict[str, pd.Series]) -> None:
        evid, amt, rate, dur, ii, addl, ss = (values[c] for c in ("EVID", "AMT", "RATE", "DUR", "II", "ADDL", "SS"))
        dose = evid.isin(DOSE_EVIDS)
        # NONMEM's constant infusion at steady state has AMT=0, RATE>0, II=0.
        ss_infusion = dose & ss.isin((1, 2)) & (ii.fillna(0) == 0) & (rate > 0)
        self._blank(values, "AMT", dose & ~ss_infusion, "blank on a dose row", "an amount > 0")
        self.add_rows(dose & ~ss_infusion & (amt <= 0), "AMT", lambda i: f"found {_fmt(amt.iat[i])} on a dose row (EVID={_fmt(evid.iat[i])})", "an amount > 0")
        self.add_rows(ss_infusion & (amt < 0), "AMT", lambda i: f"found {_fmt(amt.iat[i])}", "0 or blank for a constant infusion at steady state")
        dv = values["DV"]
        ignored = evid.notna() & (evid != 0) & dv.notna() & (dv != 0)
        self.add_rows(ignored, "DV", lambda i: f"found {_fmt(dv.iat[i])} on an EVID={_fmt(evid.iat[i])} row, where it would be ignored",
                      "blank or 0 (put the sample on its own row with EVID=0)")
        for column, series in (("RATE", rate), ("DUR", dur), ("II", ii)):
            extra = " (modelled rates, RATE=-1/-2, are not supported)" if column == "RATE" else ""
            self.add_rows(series < 0, column, lambda i, s=series: f"found {_fmt(s.iat[i])}", f"a value >= 0 or blank{extra}")
        self.add_rows((rate > 0) & (dur > 0), "RATE/DUR", lambda i: f"found RATE={_fmt(rate.iat[i])} and DUR={_fmt(dur.iat[i])}",
                      "one of them (the other blank or 0)")
        self.add_rows(dose & (addl > 0) & ~(ii > 0), "II", lambda i: f"found {_fmt(ii.fillna(0).iat[i])} with ADDL={_fmt(addl.iat[i])}",
                      "II > 0 when ADDL > 0 (the interval between the additional doses)")
        self.add_rows(dose & ss.isin((1, 2)) & ~(ii > 0) & ~(rate > 0), "II", lambda i: f"found {_fmt(ii.fillna(0).iat[i])} with SS={_fmt(ss.iat[i])}",
                      "II > 0 at steady state (or RATE > 0 with II=0 for a constant infusion)")
        not_dose = evid.notna() & ~dose
        self.add_rows(dose & (addl > MAX_DOSES), "ADDL", lambda i: f"found {_fmt(addl.iat[i])}",
                      f"at most {MAX_DOSES} additional doses on one row")
        blq = values["BLQ"]
        self.add_rows(evid.notna() & (evid != 0) & (blq > 0), "BLQ", lambda i: f"found {_fmt(blq.iat[i])} on an EVID={_fmt(evid.iat[i])} row",
                      "blank or 0 (BLQ marks observations, EVID=0)")
        for column in ("AMT", "RATE", "DUR", "II", "ADDL", "SS"):
            series = values[column]
            self.add_rows(not_dose & (series > 0), column, lambda i, s=series: f"found {_fmt(s.iat[i])} on an EVID={_fmt(evid.iat[i])} row, where it would be ignored",
                          "blank or 0 (dosing columns apply to dose rows, EVID 1 or 4)")

    def _check_observations(self, values: dict[str, pd.Series]) -> None:
        evid, mdv, dv, blq, lloq = (values[c] for c in ("EVID", "MDV", "DV", "BLQ", "LLOQ"))
        counted = (evid == 0) & (mdv.fillna(0) == 0)
        with_limit = (blq == 1) & lloq.notna()  # BLQ=1 and LLOQ given: DV may be blank
        self._blank(values, "DV", counted & ~with_limit, "blank on an observation row (EVID=0)",
                    "a measured value (a finite number), MDV=1 to ignore the row, or with BLQ=1 the limit in LLOQ")
        self.add_rows(lloq <= 0, "LLOQ", lambda i: f"found {_fmt(lloq.iat[i])}", "a limit > 0 or blank")

    def _check_routes_and_cmt(self, values: dict[str, pd.Series]) -> None:
        spec = self.spec
        evid, route, cmt = values["EVID"], values["ROUTE"], values["CMT"]
        routes = tuple(spec.routes) if spec else ROUTES
        owner = f" (model {spec.name})" if spec else ""
        self.add_rows(route.notna() & ~route.isin(routes), "ROUTE", lambda i: f"found {self.text['ROUTE'].iat[i]!r}", f"one of {', '.join(routes)}{owner}")
        dose, obs = evid.isin(DOSE_EVIDS), evid == 0
        if route.isna().all() and cmt.isna().all() and dose.any() and not ({"ROUTE", "CMT"} & self.present):
            self.add(None, "ROUTE", "missing (and no CMT column)", "ROUTE on dose rows (it, ia, iv, sc, po) or CMT naming the receiving compartment")
        else:
            self.add_rows(dose & route.isna() & cmt.isna(), "ROUTE/CMT", "both blank on a dose row",
                          f"a route ({', '.join(routes)}) or a receiving compartment in CMT")
        single = spec is not None and len(spec.outputs) == 1
        if not single:
            hint = f"an output of model {spec.name}: {', '.join(spec.outputs)}" if spec else "the name of the output measured (e.g. plasma)"
            self._blank(values, "CMT", obs, "blank on an observation row", hint)
        if spec is not None:
            values["CMT"] = self._resolve_cmt(cmt, dose, obs)
            self._check_route_targets(route, values["CMT"], dose)

    def _check_route_targets(self, route: pd.Series, cmt: pd.Series, dose: pd.Series) -> None:
        """CMT beside ROUTE on a dose row names one of the route's sites (SPEC §2: with ROUTE=it, which lesion).

        The route still decides how the dose splits (a leak into blood stays a leak); CMT only
        moves the site's share, and only to compartments the model lists in the route's ``sites``.
        """
        spec = self.spec
        assert spec is not None
        for i in np.flatnonzero((dose & route.notna() & cmt.notna()).to_numpy()):
            r, c = route.iat[i], cmt.iat[i]
            sites = spec.routes[r].sites if r in spec.routes else ()
            if sites and c not in sites and c in spec.state_names:
                into = ", ".join(spec.routes[r].into)
                moved = f"; a site other than {sites[0]} takes {sites[0]}'s share" if len(sites) > 1 else ""
                raw = str(self.text["CMT"].iat[i]).strip()
                found = repr(c) if raw == c else f"{raw!r} ({c})"
                self.add(int(self.row[i]), "CMT", f"found {found} with ROUTE={r}, whose doses go into {into}",
                         f"blank or {' or '.join(sites)} (route {r}'s sites in model {spec.name}{moved}); "
                         f"to dose {c} itself give CMT={c} with ROUTE blank")

    def _resolve_cmt(self, cmt: pd.Series, dose: pd.Series, obs: pd.Series) -> pd.Series:
        """Model names for CMT: 1-based numbers resolved, unknown names reported."""
        spec = self.spec
        assert spec is not None
        resolved = cmt.copy()
        for mask, names, kind in ((dose, spec.state_names, "a compartment"), (obs, tuple(spec.outputs), "an output")):
            for i in np.flatnonzero((mask & cmt.notna()).to_numpy()):
                name = _resolve_name(cmt.iat[i], names)
                if name is None:
                    row_kind = "dose" if kind == "a compartment" else "observation"
                    numbers = "1" if len(names) == 1 else f"1-{len(names)}"
                    self.add(int(self.row[i]), "CMT", f"found {cmt.iat[i]!r} on a{'n' if row_kind[0] == 'o' else ''} {row_kind} row",
                             f"{kind} of model {spec.name}: {', '.join(names)} (or its number {numbers})")
                resolved.iat[i] = name
        if len(spec.outputs) == 1:
            resolved = resolved.where(~(obs & cmt.isna()), next(iter(spec.outputs)))
        return resolved

    def _check_covariates(self, values: dict[str, pd.Series]) -> None:
        """Covariates numeric where the model uses them, constant unless time-varying; ARM per subject."""
        declared = {name.upper(): cov for name, cov in (self.spec.covariates.items() if self.spec else ())}
        renamed = []
        for column in self.covariate_columns:
            cov = declared.get(column)
            text = self.text[column]
            missing = self._missing(column)
            numbers = pd.to_numeric(text.where(~missing), errors="coerce").astype(float)
            numeric = bool((missing | np.isfinite(numbers)).all())
            name = cov.name if cov else column
            renamed.append(name)
            if cov is not None:
                allowed = f"a finite number (covariate {cov.name} of model {self.spec.name}, {cov.unit or 'no unit'}; drop the column to use the default {cov.value:g})"
                self.add_rows(~missing & ~np.isfinite(numbers), column, lambda i, t=text, n=numbers: _not_a_number(t.iat[i], n.iat[i]), allowed)
                self.add_rows(missing, column, self._as_found(column, "blank"), allowed)
            values[name] = numbers if numeric or cov is not None else text.where(~missing)
            if not (cov is not None and cov.time_varying):
                why = f"{name} is not time-varying in model {self.spec.name}" if self.spec else "without a model, covariates are constant; a model may declare them time-varying"
                self._agree(values, name, f"one value per subject ({why})", per_time=False)
            else:
                self._agree(values, name, f"one value per time within a subject ({name} is time-varying: NOCB, "
                                          "a row's value holds from the subject's previous row to its own)", per_time=True)
        self.covariate_columns = tuple(renamed)
        self._agree(values, "ARM", "one arm per subject", per_time=False)

    def _agree(self, values: dict[str, pd.Series], column: str, allowed: str, *, per_time: bool) -> None:
        """Every row of a subject has the first such row's value; with ``per_time``, only rows at one TIME
        (a time-varying covariate: a change between them would have no interval to hold on)."""
        ids, times, series = values["ID"], values["TIME"], values[column]
        usable = ids.notna() & series.notna() & (times.notna() if per_time else True)
        first: dict[tuple[Any, ...], tuple[Any, int]] = {}
        for i in np.flatnonzero(usable.to_numpy()):
            key, value = ((ids.iat[i], times.iat[i]) if per_time else (ids.iat[i],)), series.iat[i]
            if key not in first:
                first[key] = (value, int(self.row[i]))
            elif value != first[key][0]:
                seen, row = first[key]
                where = f" at the same TIME {_fmt(key[1])}" if per_time else ""
                self.add(int(self.row[i]), column, f"found {_fmt(value)}, but ID {key[0]} has {_fmt(seen)}{where} on row {row}",
                         allowed)

    def _check_duplicates(self, text: pd.DataFrame) -> None:
        cells = text.drop(columns="ROW")
        dup = cells.duplicated(keep=False)
        first: dict[tuple[str, ...], int] = {}
        for i in np.flatnonzero(dup.to_numpy()):
            key = tuple(cells.iloc[i])
            if key in first:
                self.add(int(self.row[i]), None, f"a copy of row {first[key]}", "each event once (merge or delete the copy)")
            else:
                first[key] = int(self.row[i])

    # -- normal form -----------------------------------------------------------------
    def _normalise(self, values: dict[str, pd.Series]) -> pd.DataFrame | None:
        """The normal form, or None if there are problems; then :attr:`partial` holds the normal form of the
        rows without any (their units' conversions are checked in the same message)."""
        if not self.problems:
            return self._frame(values)
        bad = {p.row for p in self.problems if p.row is not None}
        keep = ~np.isin(self.row, list(bad)) & values["EVID"].notna().to_numpy()
        # a dose row needs its receiving compartment (a missing ROUTE column is a problem without a row)
        dose = values["EVID"].isin(DOSE_EVIDS).to_numpy()
        keep &= ~dose | (values["ROUTE"].notna() | values["CMT"].notna()).to_numpy()
        self.partial = self._frame({k: v[keep] for k, v in values.items()}, self.row[keep]).reset_index(drop=True)
        return None

    def _frame(self, values: dict[str, pd.Series], row: np.ndarray | None = None) -> pd.DataFrame:
        row = self.row if row is None else row
        evid = values["EVID"].astype("int64")
        out = pd.DataFrame({"ROW": row.astype("int64"), "ID": values["ID"], "TIME": values["TIME"], "EVID": evid})
        for column in ("AMT", "DV", "RATE", "DUR", "II", "LLOQ"):
            out[column] = values[column]
        for column in ("AMT", "RATE", "DUR", "II"):
            out[column] = out[column].fillna(0.0)
        for column in ("ADDL", "SS"):
            out[column] = values[column].fillna(0).astype("int64")
        out["MDV"] = values["MDV"].fillna((evid != 0).astype(float)).astype("int64")
        for column in ("ROUTE", "CMT", "ARM"):
            out[column] = values[column]
        out["BLQ"] = values["BLQ"].fillna(0).astype("int64")
        # in one concat: a column at a time fragmented the frame (pandas warned once per column past
        # ~100, and 5 000 covariate columns took ~1 min for 24 rows)
        covariates = pd.DataFrame({c: values[c] for c in self.covariate_columns}, index=out.index)
        return pd.concat([out[["ROW", *STANDARD_COLUMNS]], covariates], axis=1)


def _resolve_name(text: str, names: tuple[str, ...]) -> str | None:
    """A name in ``names``, or its 1-based number."""
    if text in names:
        return text
    try:
        number = float(text)
    except ValueError:
        return None
    if number.is_integer() and 1 <= number <= len(names):
        return names[int(number) - 1]
    return None
