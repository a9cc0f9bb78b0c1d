"""Covariate values the model cannot use, found when the dataset is read, not minutes into a fit.

A lesion diameter of -3 cm gives a negative lesion volume and so a negative uptake rate; a fit
would stop on it after compiling, naming a rate but no row. Each row's covariates are put into
the model at its own parameter values (the typical subject: the parameters cannot make a rate
negative, the covariates can), and a row is refused when a first-order rate is not finite or
negative there, or when the volume behind the output it observes is not > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from itpk.expr import Expr
    from itpk.spec import ModelSpec

MAX_PER_RULE = 5  # subjects listed for one bad rate or volume: the first ones say what is wrong

Problem = tuple[int, str, str, str]  # file row, column, found, allowed (itpk.dataset.Problem's fields)


@dataclass(frozen=True)
class _Rows:
    """The rows checked (those with every covariate finite): file rows, subjects, covariate values, units."""

    rows: np.ndarray
    ids: np.ndarray
    covariates: dict[str, np.ndarray]
    units: dict[str, str]

    def describe(self, i: int, names: list[str]) -> str:
        """``DIAM=-3 cm (ID 2)``: the covariates of row ``i`` in the model's units."""
        shown = ", ".join(f"{n}={self.covariates[n][i]:g} {self.units[n]}".rstrip() for n in names)
        return f"{shown} (ID {_id(self.ids[i])})"


def covariate_problems(frame: pd.DataFrame, spec: ModelSpec) -> list[Problem]:
    """(row, column, found, allowed) for rows whose covariates make a rate or a volume invalid.

    ``frame`` is the converted dataset (model units, ``ROW`` the file row); only the model's
    covariates the file gives are used (the others keep the model file's values).
    """
    from itpk.system import inputs_of, resolve

    given = [name for name in spec.covariates if name in frame.columns]
    if not given or frame.empty:
        return []
    values = {name: frame[name].to_numpy(dtype=float) for name in given}
    usable = np.all([np.isfinite(v) for v in values.values()], axis=0)
    if not usable.any():
        return []
    rows = _Rows(frame["ROW"].to_numpy()[usable], frame["ID"].to_numpy()[usable],
                 {name: v[usable] for name, v in values.items()}, {name: spec.covariates[name].unit for name in given})
    model = resolve(spec, rows.covariates)  # finite inputs: resolve refuses nothing here

    def involved(expr: Expr) -> list[str]:
        return [n for n in inputs_of(spec, expr.names) if n in given]

    problems = []
    for flow in spec.flows:
        rate = model.evaluate(flow.rate)
        bad = ~(np.isfinite(rate) & (rate >= 0))
        problems += _listed(rows, bad, rate, involved(flow.rate), f"the rate of {flow.key} {flow.rate.text}", ">= 0")
    observed = frame["CMT"].to_numpy()[usable]
    counted = (frame["EVID"].to_numpy()[usable] == 0) & (frame["MDV"].to_numpy()[usable] == 0)
    for name, output in spec.outputs.items():
        for c in spec.compartments:
            if c.volume is None or c.name not in output.expr.names:
                continue
            volume = model.evaluate(c.volume)
            bad = counted & (observed == name) & ~(np.isfinite(volume) & (volume > 0))
            problems += _listed(rows, bad, volume, involved(c.volume), f"the volume of {c.name} (observed as {name}) {c.volume.text}", "> 0")
    return sorted(problems)


def _listed(rows: _Rows, bad: np.ndarray, computed: np.ndarray, names: list[str], what: str, allowed: str) -> list[Problem]:
    """The first bad row of each subject (a covariate is usually constant within one), at most :data:`MAX_PER_RULE`
    of them, the last saying how many more subjects there are."""
    if not names:  # not the covariates' doing: the model's own values (checked when it loads)
        return []
    first: dict[object, int] = {}
    for i in np.flatnonzero(bad):
        first.setdefault(rows.ids[i], int(i))
    found = []
    for k, i in enumerate(list(first.values())[:MAX_PER_RULE]):
        more = len(first) - MAX_PER_RULE
        tail = f" (and {more} more subject(s))" if k == MAX_PER_RULE - 1 and more > 0 else ""
        found.append((int(rows.rows[i]), "/".join(names),
                      f"found {rows.describe(i, names)}, for which {what} = {computed[i]:.4g} at the model's parameter values{tail}",
                      f"covariate values that keep it {allowed}"))
    return found


def _id(value: object) -> str:
    """A subject ID as the file would show it (123456789, not 1.23457e+08)."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)
