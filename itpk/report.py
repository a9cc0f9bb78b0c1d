"""``write_report``: one self-contained HTML file describing a run directory (SPEC.md §4, §5).

Everything a reader needs is inside the file: CSS inline, figures as PNG data URIs,
no scripts, fonts or links to other addresses, so it can be mailed, archived and printed.

Sections, in order: (1) the verdict (diagnostics, what was fitted, provenance),
(2) parameter table, (3) prior vs posterior, (4) goodness of fit, (5) individual fits,
(6) visual predictive checks, (7) intratumoral vs systemic exposure (when the run has
``exposure.csv``), (8) sampler diagnostics.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from itpk.errors import ItpkError
from itpk.io import write_text

TEMPLATE = "templates/report.html.j2"
SUBJECTS_PER_FIGURE = 12
PREDICTION_COLUMNS = ("ID", "TIME", "CMT", "DV", "BLQ", "PRED", "IPRED", "IRES", "PIT")
SUMMARY_REQUIRED = ("parameter", "unit", "median", "ci_low", "ci_high")
DPI = 96
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")

# Plain-language sentences for the headline exposure metrics (SPEC §6).
METRIC_TEXT = {
    "G": "Injecting into the tumour gives {v} the tumour exposure (AUC) of the same {ref} dose",
    "S": "Plasma exposure (AUC) after intratumoral injection is {v} that of the same {ref} dose",
    "S_max": "The plasma peak after intratumoral injection is {v} that of the same {ref} dose",
    "TI": "The tumour-to-plasma exposure ratio is {v} higher with intratumoral injection than with {ref} dosing (targeting index)",
    "DSF": "An {ref} dose would need to be {v} larger to reach the tumour exposure of the intratumoral dose (dose-sparing factor)",
    "systemic_sparing": "At matched tumour exposure, the {ref} regimen gives {v} the plasma exposure of the intratumoral one (systemic sparing)",
    "abscopal": "A non-injected lesion receives {v} the exposure it would receive after the same {ref} dose (abscopal exposure)",
}
METRIC_NAMES = {
    "G": "local gain G", "S": "systemic ratio S", "S_max": "peak ratio S_max", "TI": "targeting index TI",
    "DSF": "dose-sparing factor", "systemic_sparing": "systemic sparing", "abscopal": "abscopal exposure",
}


@dataclass
class RunData:
    """Everything read from a run directory."""

    folder: Path
    spec: Any
    draws: dict[str, np.ndarray]
    record: dict[str, Any]
    tree: Any
    summary: pd.DataFrame
    predictions: pd.DataFrame
    exposure: pd.DataFrame | None
    arms: dict[Any, str] = field(default_factory=dict)  # subject ID -> arm (from the data file when readable)
    doses: dict[Any, list[float]] = field(default_factory=dict)  # subject ID -> dose times
    data_note: str = ""


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``), atomically.

    Raises
    ------
    ItpkError
        When the run directory is missing, incomplete or from an incompatible itpk version.
    """
    run = read_run(run_dir)
    text = render_report(run)
    return write_text(Path(out) if out is not None else run.folder / "report.html", text)


def read_run(run_dir: str | Path) -> RunData:
    """Read and check a run directory (``load_run``'s checks plus the tables the report needs)."""
    import xarray as xr

    from itpk.run import load_run

    folder = Path(run_dir)
    spec, draws, record = load_run(folder)
    try:
        tree = xr.open_datatree(folder / "posterior.nc")
    except Exception as exc:  # noqa: BLE001 - any netCDF failure is a broken run directory
        raise ItpkError(f"{folder / 'posterior.nc'}: unreadable ({exc})") from None
    if "posterior" not in tree.children:
        raise ItpkError(f"{folder / 'posterior.nc'}: no posterior group; the run directory is incomplete")
    summary = _read_csv(folder / "summary.csv", SUMMARY_REQUIRED)
    predictions = _read_csv(folder / "predictions.csv", PREDICTION_COLUMNS)
    exposure = _read_csv(folder / "exposure.csv", ("metric", "median")) if (folder / "exposure.csv").is_file() else None
    run = RunData(folder, spec, draws, record, tree, summary, predictions, exposure)
    _read_doses(run)
    return run


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001
        raise ItpkError(f"{path}: unreadable ({exc})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ItpkError(f"{path}: missing column(s) {', '.join(missing)}; the run directory is from an incompatible itpk version")
    return frame


def _read_doses(run: RunData) -> None:
    """Dose times and arms from the fitted data file, when it is still there and unchanged."""
    from itpk.dataset import read_dataset
    from itpk.subjects import subjects

    source = run.record.get("data")
    if not source or not Path(source).is_file():
        run.data_note = f"data file {source!r} not found: dose times are not marked and the VPC is not split by arm"
        return
    sha = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    if run.record.get("data_sha256") and sha != run.record["data_sha256"]:
        run.data_note = f"data file {source} changed since the fit: dose times are not marked and the VPC is not split by arm"
        return
    try:
        for s in subjects(read_dataset(source, run.spec), run.spec):
            run.arms[s.id] = s.arm
            run.doses[s.id] = sorted({float(d.time) for d in s.schedule.doses})
    except ItpkError as exc:
        run.arms, run.doses = {}, {}
        run.data_note = f"data file {source} could not be re-read ({exc}): dose times are not marked"


# --------------------------------------------------------------------------------------------- rendering


def render_report(run: RunData) -> str:
    """The HTML text of the report."""
    from importlib.resources import files

    import jinja2

    _matplotlib()
    template_text = files("itpk").joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    context = {
        "title": f"itpk report — {run.spec.name}",
        "verdict": verdict(run),
        "fitted": fitted_rows(run),
        "provenance": provenance_rows(run),
        "warnings": list(run.record.get("warnings", [])) + ([run.data_note] if run.data_note else []),
        "parameters": parameter_rows(run),
        "prior_figure": prior_posterior_figure(run),
        "gof": gof_figures(run),
        "individual": individual_figures(run),
        "vpc": vpc_figures(run),
        "exposure": exposure_section(run),
        "sampler": sampler_section(run),
        "time_unit": run.spec.time_unit,
    }
    return env.from_string(template_text).render(**context)


def _matplotlib() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> str:
    """The figure as a PNG data URI (and closes it)."""
    plt = _matplotlib()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def log_axis(ax: Any, which: str = "y") -> None:
    """Log scale with plain major labels (1, 10, 0.1) and no minor-tick labels (they overlap)."""
    import matplotlib.ticker

    for name in ("x", "y") if which == "both" else (which,):
        getattr(ax, f"set_{name}scale")("log")
        axis = getattr(ax, f"{name}axis")
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def fmt(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no scientific notation for ordinary magnitudes)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "—"
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return f"{v:.{digits - 1}e}"


# --------------------------------------------------------------------------------------------- 1 verdict


def verdict(run: RunData) -> dict[str, Any]:
    """Pass / fail / not applicable, with the reasons and the numbers behind them."""
    from itpk.run import ESS_BULK_MIN, R_HAT_MAX

    d = run.record.get("diagnostics") or {}
    passed = d.get("passed")
    method = run.record.get("settings", {}).get("method", "?")
    if passed is True:
        status, headline = "pass", "Diagnostics passed"
    elif passed is False:
        status, headline = "fail", "Diagnostics FAILED — do not use these estimates before fixing the fit"
    else:
        status, headline = "na", f"No MCMC diagnostics (method {method}): treat the estimates as a quick look"
    checks = []
    if d.get("max_r_hat") is not None:
        checks.append(("max R-hat", fmt(d["max_r_hat"], 4), f"≤ {R_HAT_MAX}", d["max_r_hat"] <= R_HAT_MAX))
        checks.append(("min bulk ESS", fmt(d["min_ess_bulk"]), f"≥ {ESS_BULK_MIN}", d["min_ess_bulk"] >= ESS_BULK_MIN))
        tail = pd.to_numeric(run.summary.get("ess_tail"), errors="coerce") if "ess_tail" in run.summary else None
        if tail is not None and tail.notna().any():
            checks.append(("min tail ESS", fmt(tail.min()), f"≥ {ESS_BULK_MIN}", bool(tail.min() >= ESS_BULK_MIN)))
        checks.append(("divergent transitions", str(d.get("divergences")), "0", not d.get("divergences")))
    return {"status": status, "headline": headline, "reasons": list(d.get("reasons", [])), "checks": checks}


def fitted_rows(run: RunData) -> list[tuple[str, str]]:
    r, spec = run.record, run.spec
    obs = r.get("observations", {})
    cens = r.get("censored", {})
    per_output = "; ".join(
        f"{o}: {n} ({spec.outputs[o].unit}" + (f", {cens.get(o, 0)} censored = {100 * cens.get(o, 0) / n:.0f}%" if n else "") + ")"
        for o, n in obs.items() if o in spec.outputs
    )
    units = r.get("units")
    if isinstance(units, dict):
        units_text = "; ".join(f"{k}: {v}" for k, v in units.items())
    elif isinstance(units, list | tuple):
        units_text = "; ".join(line.strip() for line in units if line.strip())
    else:
        units_text = str(units or "")
    if r.get("units_assumed"):
        units_text = (units_text + " " if units_text else "") + "(assumed: no units file beside the data)"
    settings = r.get("settings", {})
    sampler = ", ".join(f"{k} {settings[k]}" for k in ("method", "chains", "draws", "tune", "target_accept") if k in settings)
    return [
        ("model", f"{spec.name} — {spec.description}" if spec.description else spec.name),
        ("data file", str(r.get("data", "?"))),
        ("subjects", str(r.get("subjects", "?"))),
        ("arms", ", ".join(map(str, r.get("arms", []))) or "—"),
        ("observations per output", per_output or "—"),
        ("censoring", r.get("censoring_method", "—") if sum(cens.values() or [0]) else "no censored observations"),
        ("units", units_text or "—"),
        ("error models", ", ".join(f"{k}: {v}" for k, v in settings.get("errors", {}).items()) or "—"),
        ("held at their values", ", ".join(f"{k} = {fmt(v)}" for k, v in settings.get("held_fixed", {}).items()
                                           if k in spec.parameters) or "—"),
        ("sampler", sampler or "—"),
        ("seed", str(settings.get("seed", "—"))),
    ]


def provenance_rows(run: RunData) -> list[tuple[str, str]]:
    r = run.record
    versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items() if v != "absent")
    timings = r.get("timings_s", {})
    return [
        ("itpk", str(r.get("itpk_version", "?"))),
        ("libraries", f"Python {r.get('python', '?')}; {versions}"),
        ("platform", str(r.get("platform", "?"))),
        ("command", " ".join(r.get("command", [])) or "—"),
        ("model SHA-256", str(r.get("model_sha256", "—"))),
        ("data SHA-256", str(r.get("data_sha256", "—"))),
        ("wall time", ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items()) or "—"),
        ("run directory", str(run.folder.resolve())),
    ]


# --------------------------------------------------------------------------------------------- 2 parameters


def prior_text(p: Any) -> str:
    if p is None or p.prior is None:
        return "—"
    a = p.prior.args
    if p.prior.dist in ("lognormal", "logitnormal"):
        return f"{p.prior.dist}(median {fmt(a['median'])}, σ {fmt(a['sigma'])})"
    return f"{p.prior.dist}(" + ", ".join(f"{k} {fmt(v)}" for k, v in a.items()) + ")"


def parameter_rows(run: RunData) -> dict[str, list[dict[str, str]]]:
    """Population parameters, IIV (CV%, shrinkage) and residual errors, as display strings."""
    spec, s = run.spec, run.summary
    groups: dict[str, list[dict[str, str]]] = {"population": [], "iiv": [], "residual": []}
    for row in s.to_dict("records"):
        name = str(row["parameter"])
        unit = str(row.get("unit", "")) if pd.notna(row.get("unit")) else ""
        base = {"name": name, "unit": unit if unit and unit != "1" else "—", "median": fmt(row["median"]),
                "ci": f"{fmt(row['ci_low'])} – {fmt(row['ci_high'])}", "r_hat": fmt(row.get("r_hat"), 4),
                "ess": fmt(row.get("ess_bulk"), 3)}
        if name.startswith("omega_"):
            target = name.removeprefix("omega_")
            cv = [100 * math.sqrt(math.expm1(float(row[k]) ** 2)) for k in ("median", "ci_low", "ci_high")]
            base.update(name=f"IIV on {target}", cv=f"{cv[0]:.0f}%", cv_ci=f"{cv[1]:.0f}% – {cv[2]:.0f}%",
                        omega=fmt(row["median"]), shrinkage=(f"{float(row['shrinkage_percent']):.0f}%"
                                                             if pd.notna(row.get("shrinkage_percent")) else "—"),
                        prior="ω ~ halfnormal(σ 1)")
            groups["iiv"].append(base)
        elif name.startswith("sigma_"):
            output = name.removeprefix("sigma_").removeprefix("add_").removeprefix("prop_")
            kind = run.record.get("settings", {}).get("errors", {}).get(output, "")
            part = "additive" if name.startswith("sigma_add_") else "proportional" if name.startswith("sigma_prop_") else kind
            desc = {"proportional": "proportional (SD as fraction)", "log": "log-normal (SD on log scale)",
                    "additive": f"additive (SD, {unit})"}.get(part, part)
            base.update(output=output, kind=desc)
            groups["residual"].append(base)
        else:
            p = spec.parameters.get(name)
            base.update(prior=prior_text(p), description=(getattr(p, "source", "") or "") if p is not None else "")
            groups["population"].append(base)
    return groups


# --------------------------------------------------------------------------------------------- 3 prior vs posterior


def prior_density(prior: Any, x: np.ndarray) -> np.ndarray:
    """Density of a model-file prior on the parameter's own scale."""
    from scipy import stats

    a = prior.args
    if prior.dist == "lognormal":
        return stats.lognorm(s=a["sigma"], scale=a["median"]).pdf(x)
    if prior.dist == "logitnormal":
        m = a["median"]
        inside = (x > 0) & (x < 1)
        xs = np.clip(x, 1e-12, 1 - 1e-12)
        dens = stats.norm(math.log(m / (1 - m)), a["sigma"]).pdf(np.log(xs / (1 - xs))) / (xs * (1 - xs))
        return np.where(inside, dens, 0.0)
    if prior.dist == "normal":
        return stats.norm(a["mu"], a["sigma"]).pdf(x)
    if prior.dist == "halfnormal":
        return stats.halfnorm(scale=a["sigma"]).pdf(x)
    if prior.dist == "beta":
        return stats.beta(a["alpha"], a["beta"]).pdf(x)
    return stats.uniform(a["lower"], a["upper"] - a["lower"]).pdf(x)


def prior_posterior_figure(run: RunData) -> str | None:
    from scipy import stats

    names = [n for n in run.summary["parameter"] if n in run.spec.parameters and n in run.draws]
    if not names:
        return None
    plt = _matplotlib()
    ncol = min(4, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False, constrained_layout=True)
    for ax, name in zip(axes.flat, names, strict=False):
        p = run.spec.parameters[name]
        draws = run.draws[name]
        log = p.prior is not None and p.prior.dist == "lognormal"
        q = stats.lognorm(s=p.prior.args["sigma"], scale=p.prior.args["median"]) if log else None
        lo, hi = (q.ppf(0.001), q.ppf(0.999)) if log else _prior_range(p.prior, draws)
        lo, hi = min(lo, draws.min()), max(hi, draws.max())
        x = np.geomspace(lo, hi, 400) if log else np.linspace(lo, hi, 400)
        if p.prior is not None:
            dens = prior_density(p.prior, x)
            # on a log axis show the density of log(x) so that areas read correctly
            ax.plot(x, dens * x if log else dens, color="0.35", lw=1.5, ls="--", label="prior")
        if draws.size > 1 and np.ptp(draws) > 0:
            bins = np.geomspace(draws.min(), draws.max(), 30) if log else 30
            weights = None
            if log:
                h, edges = np.histogram(np.log(draws), bins=np.log(bins), density=True)
                ax.stairs(h, edges=np.exp(edges), fill=True, color=COLORS[0], alpha=0.5, label="posterior")
            else:
                ax.hist(draws, bins=bins, density=True, weights=weights, color=COLORS[0], alpha=0.5, label="posterior")
        else:
            ax.axvline(float(np.median(draws)), color=COLORS[0], lw=2, label="posterior mode")
        if log:
            log_axis(ax, "x")
        unit = p.unit if p.unit and p.unit != "1" else "dimensionless"
        ax.set_xlabel(f"{name} ({unit})")
        ax.set_yticks([])
        ax.set_ylabel("density" + (" of log value" if log else ""), fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8, loc="upper right")
    return png(fig)


def _prior_range(prior: Any, draws: np.ndarray) -> tuple[float, float]:
    if prior is None:
        return float(draws.min()), float(draws.max())
    a = prior.args
    if prior.dist in ("beta", "logitnormal"):
        return 1e-3, 1 - 1e-3
    if prior.dist == "uniform":
        return a["lower"], a["upper"]
    if prior.dist == "halfnormal":
        return 0.0, 3.5 * a["sigma"]
    return a["mu"] - 3.5 * a["sigma"], a["mu"] + 3.5 * a["sigma"]


# --------------------------------------------------------------------------------------------- 4 goodness of fit


def _outputs(run: RunData) -> list[str]:
    present = set(run.predictions["CMT"].astype(str))
    return [o for o in run.spec.outputs if o in present]


def gof_figures(run: RunData) -> list[dict[str, str]]:
    plt = _matplotlib()
    tu = run.spec.time_unit
    figures = []
    for output in _outputs(run):
        unit = run.spec.outputs[output].unit
        d = run.predictions[run.predictions["CMT"].astype(str) == output]
        cens = d["BLQ"].to_numpy() == 1
        fig, axes = plt.subplots(2, 4, figsize=(14, 6.6), constrained_layout=True)
        for col, (pred, label) in enumerate((("PRED", "PRED (typical subject)"), ("IPRED", "IPRED (individual)"))):
            for k, scale in enumerate(("linear", "log")):
                ax = axes[0, 2 * col + k]
                _scatter_obs(ax, d[pred].to_numpy(), d["DV"].to_numpy(), cens)
                _identity(ax, d[pred].to_numpy(), d["DV"].to_numpy(), log=scale == "log")
                ax.set_xlabel(f"{label} ({unit})", fontsize=9)
                ax.set_ylabel(f"observed {output} ({unit})", fontsize=9)
                ax.set_title(f"DV vs {pred} — {scale}", fontsize=10)
        pit_ok = d["PIT"].notna().any()
        resid, rlabel, ref = (("PIT", "PIT (fraction of predictive draws ≤ DV)", (0.05, 0.5, 0.95)) if pit_ok
                              else ("IRES", f"IRES = DV − IPRED ({unit})", (0.0,)))
        for k, (x, xlabel, log) in enumerate(((d["TIME"], f"time ({tu})", False), (d["IPRED"], f"IPRED ({unit})", True))):
            ax = axes[1, k]
            _scatter_obs(ax, x.to_numpy(), d[resid].to_numpy(), cens, censored_at=0.0 if resid == "IRES" else None)
            for r in ref:
                ax.axhline(r, color="0.4", lw=0.8, ls="--" if r != ref[len(ref) // 2] else "-")
            if log and (x > 0).any():
                log_axis(ax, "x")
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel(rlabel, fontsize=9)
            ax.set_title(f"{resid} vs {'time' if k == 0 else 'IPRED'}", fontsize=10)
        for k, (x, xlabel, log) in enumerate(((d["TIME"], f"time ({tu})", False), (d["IPRED"], f"IPRED ({unit})", True))):
            ax = axes[1, 2 + k]
            _scatter_obs(ax, x.to_numpy(), d["IRES"].to_numpy(), cens, censored_at=None)
            ax.axhline(0, color="0.4", lw=0.8)
            if log and (x > 0).any():
                log_axis(ax, "x")
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel(f"IRES = DV − IPRED ({unit})", fontsize=9)
            ax.set_title(f"IRES vs {'time' if k == 0 else 'IPRED'}", fontsize=10)
        if cens.any():
            axes[0, 0].legend(fontsize=8, loc="upper left")
        fig.suptitle(f"{output} ({unit}) — {int((~cens).sum())} observed, {int(cens.sum())} censored", fontsize=11)
        figures.append({"output": output, "unit": unit, "image": png(fig), "pit": pit_ok})
    return figures


def _scatter_obs(ax: Any, x: np.ndarray, y: np.ndarray, cens: np.ndarray, censored_at: float | None = None) -> None:
    ax.scatter(x[~cens], y[~cens], s=12, color=COLORS[0], alpha=0.7, edgecolor="none", label="observed")
    if cens.any():
        yc = y[cens] if censored_at is None else np.full(int(cens.sum()), censored_at)
        yc = np.where(np.isfinite(yc), yc, np.nan)
        ax.scatter(x[cens], yc, s=22, marker="v", facecolor="none", edgecolor=COLORS[1], label="censored (BLQ, at LLOQ)")
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


def _identity(ax: Any, x: np.ndarray, y: np.ndarray, *, log: bool) -> None:
    v = np.concatenate([x, y])
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if v.size == 0:
        return
    lo, hi = v.min(), v.max()
    if log:
        log_axis(ax, "both")
        lo, hi = lo / 1.5, hi * 1.5
    else:
        pad = 0.05 * (hi - lo or 1)
        lo, hi = min(0.0, lo) - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="0.3", lw=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)


# --------------------------------------------------------------------------------------------- 5 individual fits


def ipred_quantiles(run: RunData, q: tuple[float, ...] = (0.05, 0.5, 0.95)) -> np.ndarray | None:
    """(len(q), n_obs) posterior quantiles of IPRED at every observation, or None."""
    post = run.tree["posterior"]
    if "IPRED" not in post:
        return None
    arr = np.asarray(post["IPRED"])
    arr = arr.reshape(-1, arr.shape[-1])
    if arr.shape[1] != len(run.predictions):
        raise ItpkError(f"{run.folder}: posterior IPRED has {arr.shape[1]} observations but predictions.csv "
                        f"has {len(run.predictions)}; the run directory is inconsistent")
    return np.quantile(arr, q, axis=0)


def individual_figures(run: RunData) -> list[str]:
    plt = _matplotlib()
    pred = run.predictions
    band = ipred_quantiles(run)
    outputs = _outputs(run)
    ids = list(dict.fromkeys(pred["ID"].tolist()))
    tu = run.spec.time_unit
    units = {run.spec.outputs[o].unit for o in outputs}
    ylabel = f"concentration ({units.pop()})" if len(units) == 1 else "concentration (unit per output, see legend)"
    figures = []
    for start in range(0, len(ids), SUBJECTS_PER_FIGURE):
        page = ids[start:start + SUBJECTS_PER_FIGURE]
        ncol = min(4, len(page))
        nrow = -(-len(page) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.7 * nrow + 0.6), squeeze=False,
                                 constrained_layout=True)
        for ax, sid in zip(axes.flat, page, strict=False):
            for k, output in enumerate(outputs):
                rows = np.flatnonzero(((pred["ID"] == sid) & (pred["CMT"].astype(str) == output)).to_numpy())
                if rows.size == 0:
                    continue
                color = COLORS[k % len(COLORS)]
                t = pred["TIME"].to_numpy()[rows]
                order = np.argsort(t, kind="stable")
                rows, t = rows[order], t[order]
                label = f"{output} ({run.spec.outputs[output].unit})"
                if band is not None:
                    lo, med, hi = band[:, rows]
                    ax.fill_between(t, lo, hi, color=color, alpha=0.2, lw=0)
                    ax.plot(t, med, color=color, lw=1.4, label=label)
                dv = pred["DV"].to_numpy()[rows]
                cens = pred["BLQ"].to_numpy()[rows] == 1
                ax.plot(t[~cens], dv[~cens], "o", ms=3.5, color=color)
                if cens.any():
                    ax.plot(t[cens], dv[cens], "v", ms=5, mfc="none", color=color)
            for dt in run.doses.get(sid, []):
                ax.axvline(dt, color="0.5", lw=0.8, ls=":", zorder=0)
            positive = ax.get_lines() and any((np.asarray(line.get_ydata()) > 0).any() for line in ax.get_lines())
            if positive:
                log_axis(ax, "y")
            arm = run.arms.get(sid, "")
            ax.set_title(f"ID {sid}" + (f" — {arm}" if arm else ""), fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.set_xlabel(f"time ({tu})", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
        for ax in list(axes.flat)[len(page):]:
            ax.set_visible(False)
        handles, labels = [], []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, [f"{lab}: median IPRED, 90% band; points observed, ▽ censored" for lab in labels],
                   loc="outside lower center", fontsize=8, ncol=max(1, len(labels)), frameon=False)
        figures.append(png(fig))
    return figures


# --------------------------------------------------------------------------------------------- 6 VPC


def _predictive(run: RunData, output: str, rows: np.ndarray) -> np.ndarray | None:
    """(draws, n) posterior predictive values of ``output`` on the observation scale, or None."""
    if "posterior_predictive" not in run.tree.children or f"DV_{output}" not in run.tree["posterior_predictive"]:
        return None
    arr = np.asarray(run.tree["posterior_predictive"][f"DV_{output}"])
    arr = arr.reshape(-1, arr.shape[-1])
    if arr.shape[1] != rows.size:
        return None
    if run.record.get("settings", {}).get("errors", {}).get(output) == "log":
        arr = np.exp(arr)
    return arr


def time_bins(times: np.ndarray, max_bins: int = 10) -> np.ndarray:
    """Bin index per time: one bin per distinct nominal time when few, else quantile bins."""
    unique = np.unique(times)
    if unique.size <= max_bins:
        return np.searchsorted(unique, times)
    edges = np.unique(np.quantile(times, np.linspace(0, 1, max_bins + 1)))
    return np.clip(np.searchsorted(edges, times, side="right") - 1, 0, edges.size - 2)


def vpc_figures(run: RunData) -> list[dict[str, Any]]:
    plt = _matplotlib()
    pred = run.predictions
    tu = run.spec.time_unit
    figures = []
    for output in _outputs(run):
        unit = run.spec.outputs[output].unit
        rows = np.flatnonzero((pred["CMT"].astype(str) == output).to_numpy())
        sim = _predictive(run, output, rows)
        if sim is None:
            continue
        sim = sim[:: max(1, sim.shape[0] // 500)]
        d = pred.iloc[rows]
        cens = d["BLQ"].to_numpy() == 1
        lloq = float(np.median(d["DV"].to_numpy()[cens])) if cens.any() else None
        strata = d["ID"].map(run.arms).fillna("all").astype(str).to_numpy() if run.arms else np.full(len(d), "all")
        names = list(dict.fromkeys(strata))
        ncol = 2 if cens.any() else 1
        fig, axes = plt.subplots(len(names), ncol, figsize=(6.5 * ncol, 3.4 * len(names)), squeeze=False,
                                 constrained_layout=True)
        for r, stratum in enumerate(names):
            m = strata == stratum
            t, dv, s, c = d["TIME"].to_numpy()[m], d["DV"].to_numpy()[m], sim[:, m], cens[m]
            b = time_bins(t)
            nb = int(b.max()) + 1
            mid = np.array([np.median(t[b == i]) for i in range(nb)])
            ax = axes[r, 0]
            for q, ls in ((5, "--"), (50, "-"), (95, "--")):
                sim_q = np.array([np.percentile(s[:, b == i], q, axis=1) for i in range(nb)])  # (nb, draws)
                lo, hi = np.percentile(sim_q, [5, 95], axis=1)
                ax.fill_between(mid, lo, hi, color=COLORS[0] if q == 50 else COLORS[1], alpha=0.18, lw=0, step=None)
                obs_q = np.array([np.percentile(dv[b == i], q) for i in range(nb)])
                ax.plot(mid, obs_q, color="k", ls=ls, lw=1.3, label=f"observed {q}th percentile" if q != 95 else None)
            ax.plot(t[~c], dv[~c], ".", color="0.55", ms=3, zorder=0)
            if c.any():
                ax.plot(t[c], dv[c], "v", color=COLORS[1], mfc="none", ms=4, zorder=0)
            if lloq is not None:
                ax.axhline(lloq, color=COLORS[1], lw=0.8, ls=":", label=f"LLOQ {fmt(lloq)} {unit}")
            if (dv > 0).any():
                log_axis(ax, "y")
            ax.set_xlabel(f"time ({tu})", fontsize=9)
            ax.set_ylabel(f"{output} ({unit})", fontsize=9)
            ax.set_title(f"{output}, arm {stratum}" if stratum != "all" else output, fontsize=10)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.legend(fontsize=7, loc="best")
            if ncol == 2:
                ax = axes[r, 1]
                obs_frac = np.array([c[b == i].mean() for i in range(nb)])
                sim_frac = np.array([(s[:, b == i] <= lloq * (1 + 1e-9)).mean(axis=1) for i in range(nb)])
                lo, hi = np.percentile(sim_frac, [5, 95], axis=1)
                ax.fill_between(mid, lo, hi, color=COLORS[1], alpha=0.2, lw=0, label="simulated 90% interval")
                ax.plot(mid, obs_frac, "k-o", ms=3, lw=1.2, label="observed")
                ax.set_ylim(-0.02, 1.02)
                ax.set_xlabel(f"time ({tu})", fontsize=9)
                ax.set_ylabel("fraction below LLOQ", fontsize=9)
                ax.set_title(f"{output}: fraction censored" + (f", arm {stratum}" if stratum != "all" else ""), fontsize=10)
                ax.grid(alpha=0.3)
                if r == 0:
                    ax.legend(fontsize=7, loc="best")
        figures.append({"output": output, "image": png(fig), "draws": sim.shape[0]})
    return figures


# --------------------------------------------------------------------------------------------- 7 exposure


def exposure_section(run: RunData) -> dict[str, Any] | None:
    e = run.exposure
    if e is None or e.empty:
        return None
    route = str(e["route"].iloc[0]) if "route" in e else "it vs iv"
    ref = route.split(" vs ")[-1].upper() if " vs " in route else "systemic"
    dose = f"{fmt(e['dose'].iloc[0])}" if "dose" in e else "?"
    pcol = next((c for c in e.columns if c.startswith("P(>")), None)
    rows, sentences = [], []
    for row in e.to_dict("records"):
        name = str(row["metric"])
        med, lo, hi = row["median"], row.get("ci_low", np.nan), row.get("ci_high", np.nan)
        p = row.get(pcol) if pcol else None
        rows.append({"metric": METRIC_NAMES.get(name, name), "key": name, "median": fmt(med),
                     "ci": f"{fmt(lo)} – {fmt(hi)}", "p": f"{float(p):.2f}" if p is not None and pd.notna(p) else "—"})
        if name in METRIC_TEXT and pd.notna(med):
            value = f"{fmt(med, 2)}× (95% CrI {fmt(lo, 2)}–{fmt(hi, 2)})"
            text = METRIC_TEXT[name].format(v=value, ref=ref)
            if p is not None and pd.notna(p):
                text += f"; P(>1) = {float(p):.2f}"
            sentences.append(text + ".")
    return {"rows": rows, "sentences": sentences, "route": route, "dose": dose, "pcol": pcol or "P(>1)"}


# --------------------------------------------------------------------------------------------- 8 sampler


def sampler_section(run: RunData) -> dict[str, Any]:
    post = run.tree["posterior"]
    method = run.record.get("settings", {}).get("method", "?")
    names = [n for n in run.summary["parameter"] if n in post and (n in run.spec.parameters or n.startswith("omega_"))]
    if post.sizes.get("draw", 1) < 4 or not names:
        return {"note": f"method {method}: a single point estimate, no sampler diagnostics", "trace": [], "energy": None,
                "bfmi": None}
    plt = _matplotlib()
    traces = []
    pages = -(-len(names) // 6)
    per_fig = -(-len(names) // pages)  # at most 6 per figure, pages balanced
    for start in range(0, len(names), per_fig):
        chunk = names[start:start + per_fig]
        fig, axes = plt.subplots(len(chunk), 2, figsize=(12, 1.7 * len(chunk) + 0.4), squeeze=False,
                                 constrained_layout=True, gridspec_kw={"width_ratios": [2.2, 1]})
        for r, name in enumerate(chunk):
            x = np.asarray(post[name])  # (chain, draw)
            x = x.reshape(x.shape[0], x.shape[1])
            ranks = _ranks(x)
            nbins = 20
            for c in range(x.shape[0]):
                axes[r, 0].plot(x[c], lw=0.5, alpha=0.8, color=COLORS[c % len(COLORS)])
                h, edges = np.histogram(ranks[c], bins=nbins, range=(0, x.size))
                axes[r, 1].stairs(h, edges, color=COLORS[c % len(COLORS)], lw=1)
            axes[r, 1].axhline(x.shape[1] / nbins, color="0.3", lw=0.8, ls="--")
            p = run.spec.parameters.get(name)
            unit = p.unit if p is not None and p.unit and p.unit != "1" else "dimensionless"
            axes[r, 0].set_ylabel(f"{name}\n({unit})", fontsize=8)
            if p is not None and p.prior is not None and p.prior.dist == "lognormal":
                log_axis(axes[r, 0], "y")
            axes[r, 1].set_yticks([])
            for ax in axes[r]:
                ax.tick_params(labelsize=7)
        axes[0, 0].set_title("trace (one colour per chain)", fontsize=9)
        axes[0, 1].set_title("rank histogram (flat = chains agree)", fontsize=9)
        axes[-1, 0].set_xlabel("draw (after tuning)", fontsize=8)
        axes[-1, 1].set_xlabel("rank of draw across all chains", fontsize=8)
        traces.append(png(fig))
    energy_fig, bfmi = None, None
    stats = run.tree["sample_stats"] if "sample_stats" in run.tree.children else None
    if stats is not None and "energy" in stats:
        energy = np.asarray(stats["energy"])
        energy = energy.reshape(energy.shape[0], -1)
        de = np.diff(energy, axis=1)
        bfmi = [float(np.mean(d**2) / np.var(e)) if np.var(e) > 0 else float("nan") for d, e in zip(de, energy, strict=True)]
        fig, ax = plt.subplots(figsize=(6.5, 3.2), constrained_layout=True)
        centred = (energy - energy.mean(axis=1, keepdims=True)).ravel()
        ax.hist(centred, bins=40, density=True, alpha=0.5, color=COLORS[0], label="marginal energy (centred)")
        ax.hist(de.ravel(), bins=40, density=True, alpha=0.5, color=COLORS[1], label="energy transition")
        ax.set_xlabel("energy (dimensionless, log-density units)", fontsize=9)
        ax.set_yticks([])
        ax.legend(fontsize=8)
        ax.set_title("energy: the two histograms should overlap (BFMI " +
                     ", ".join(f"{b:.2f}" for b in bfmi) + ")", fontsize=9)
        energy_fig = png(fig)
    return {"note": "" if energy_fig else "no energy statistics in sample_stats", "trace": traces,
            "energy": energy_fig, "bfmi": bfmi and ", ".join(f"{b:.2f}" for b in bfmi)}


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x.ravel()).reshape(x.shape)

