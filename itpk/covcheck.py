"""Covariate values the model cannot use, found when the dataset is read, not minutes into a fit.

A lesion diameter of -3 cm gives a negative lesion volume and so a negative uptake rate; a fit
would stop on it after compiling, naming a rate but no row. Each row's covariates are put into
the model at its own parameter values (the typical subject: the parameters cannot make a rate
negative, the covariates can), and a row is refused when a first-order rate is not finite or
negative there, or when the volume behind the output it observes is not > 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from itpk.errors import ItpkError

if TYPE_CHECKING:
    import pandas as pd

    from itpk.spec import ModelSpec

MAX_PER_RULE = 5  # rows listed for one bad rate or volume: the first ones say what is wrong


def covariate_problems(frame: pd.DataFrame, spec: ModelSpec) -> list[tuple[int, str, str, str]]:
    """(row, column, found, allowed) for rows whose covariates make a rate or a volume invalid.

    ``frame`` is the converted dataset (model units, ``ROW`` the file row); only the model's
    covariates the file gives are used (the others keep the model file's values).
    """
    from itpk.system import inputs_of, resolve

    given = [name for name in spec.covariates if name in frame.columns]
    if not given or frame.empty:
        return []
    columns = {name: frame[name].to_numpy(dtype=float) for name in given}
    usable = np.all([np.isfinite(v) for v in columns.values()], axis=0)
    if not usable.any():
        return []
    rows = frame["ROW"].to_numpy()[usable]
    ids = frame["ID"].to_numpy()[usable]
    try:
        values = resolve(spec, {name: v[usable] for name, v in columns.items()})
    except ItpkError:  # a derived quantity that is not finite for some row: reported per rule below is not possible
        return []
    def involved(expr: Any) -> list[str]:
        return [n for n in inputs_of(spec, expr.names) if n in given]

    problems = []
    for flow in spec.flows:
        rate = _evaluate(flow.rate, values)
        bad = ~(np.isfinite(rate) & (rate >= 0))
        problems += _listed(rows, ids, bad, rate, columns, usable, involved(flow.rate), flow.rate.text, f"the rate of {flow.key}", ">= 0")
    observed = frame["CMT"].to_numpy()[usable]
    obs = (frame["EVID"].to_numpy()[usable] == 0) & (frame["MDV"].to_numpy()[usable] == 0)
    for name, output in spec.outputs.items():
        for c in spec.compartments:
            if c.volume is None or c.name not in output.expr.names:
                continue
            volume = _evaluate(c.volume, values)
            bad = obs & (observed == name) & ~(np.isfinite(volume) & (volume > 0))
            problems += _listed(rows, ids, bad, volume, columns, usable, involved(c.volume), c.volume.text,
                                f"the volume of {c.name} (observed as {name})", "> 0")
    return sorted(problems)


def _evaluate(expr: Any, values: Any) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.broadcast_to(np.asarray(expr.evaluate(values.env), dtype=float), (values.size,))


def _listed(rows: np.ndarray, ids: np.ndarray, bad: np.ndarray, computed: np.ndarray, columns: dict[str, np.ndarray],
            usable: np.ndarray, given: list[str], text: str, what: str, allowed: str) -> list[tuple[int, str, str, str]]:
    """The first bad row of each subject (a covariate is usually constant within one), at most :data:`MAX_PER_RULE`."""
    if not given:  # not the covariates' doing: the model's own values (checked when it loads)
        return []
    found, seen = [], set()
    for i in np.flatnonzero(bad):
        if ids[i] in seen:
            continue
        seen.add(ids[i])
        covariates = ", ".join(f"{n}={columns[n][usable][i]:g}" for n in given)
        found.append((int(rows[i]), "/".join(given),
                      (f"found {covariates} (ID {_id(ids[i])}), for which {what} {text} = {computed[i]:.4g} at the model's "
                       "parameter values"), f"covariate values that keep it {allowed}"))
        if len(found) == MAX_PER_RULE:
            break
    return found


def _id(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float | np.number) else str(value)
