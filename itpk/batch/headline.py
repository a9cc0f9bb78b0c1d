"""Headline numbers of a job: the few values a sweep is read by, one flat dict per job.

They go to the job's ``job.json`` and to one row of ``batch.csv``, so a grid of
hundreds of jobs can be read at a glance (and re-read from disk on --resume).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _central(value: float | Mapping[str, float]) -> float:
    """A number, or the median of a posterior summary."""
    return float(value["median"]) if isinstance(value, Mapping) else float(value)


def compare_headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """Exposure per route (systemic AUC and Cmax, local AUC) and every metric per local route.

    Columns are ``QUANTITY_ROUTE`` (``AUC_plasma_it``) and ``METRIC_ROUTE``
    (``G_it``: it against the reference route). With a posterior each value is
    the median and the metrics also get ``_ci_low``/``_ci_high``.
    """
    out: dict[str, Any] = {}
    roles = report["exposure_outputs"]
    wanted = [f"AUC_{roles[r]}" for r in ("systemic", "local") if r in roles]
    wanted += [f"Cmax_{roles['systemic']}"] if "systemic" in roles else []
    for route, quantities in report["routes"].items():
        out.update({f"{k}_{route}": _central(quantities[k]) for k in wanted if k in quantities})
    by_route = report.get("metrics_by_route")
    if not by_route and report["metrics"]:
        local = next(r for r in ("it", "ia") if r in report["routes"])
        by_route = {local: report["metrics"]}
    for route, metrics in (by_route or {}).items():
        for name, value in metrics.items():
            out[f"{name}_{route}"] = _central(value)
            if isinstance(value, Mapping):
                out[f"{name}_{route}_ci_low"], out[f"{name}_{route}_ci_high"] = value["ci_low"], value["ci_high"]
    return out


def simulate_headline(profiles: Any) -> dict[str, Any]:
    """Subjects, times and the window's end, and per output Cmax, Tmax and AUC (trapezoids over
    the output grid) of the median profile over subjects."""
    times = np.asarray(profiles.times, dtype=float)
    out: dict[str, Any] = {"subjects": int(profiles.amounts.shape[0]), "times": int(times.size),
                           "window_end": float(times.max()) if times.size else 0.0}
    for name, values in profiles.outputs.items():
        median = np.median(np.asarray(values, dtype=float), axis=0)
        peak = int(np.argmax(median))
        out[f"Cmax_{name}"] = float(median[peak])
        out[f"Tmax_{name}"] = float(times[peak])
        out[f"AUC_{name}"] = float(np.trapezoid(median, times)) if times.size > 1 else 0.0
    return out


def fit_headline(diagnostics: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The sampler verdict and the numbers behind it."""
    passed = diagnostics.get("passed")
    verdict = "not applicable" if passed is None else ("passed" if passed else "failed")
    return {"method": method, "diagnostics": verdict, "max_r_hat": diagnostics.get("max_r_hat"),
            "min_ess_bulk": diagnostics.get("min_ess_bulk"), "divergences": diagnostics.get("divergences")}
