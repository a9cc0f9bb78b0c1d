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
from itpk.events import Target
from itpk.io import write_text
from itpk.progress import Progress

TEMPLATE = "templates/report.html.j2"
SUBJECTS_PER_FIGURE = 12
PREDICTION_COLUMNS = ("ID", "TIME", "CMT", "DV", "BLQ", "PRED", "IPRED", "IRES", "PIT")
SUMMARY_REQUIRED = ("parameter", "unit", "median", "ci_low", "ci_high")
TEXT_COLUMNS = ("ID", "parameter", "unit", "metric", "CMT")  # the others of the required columns hold numbers
DPI = 96
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")

# Plain-language sentences for the headline exposure metrics (SPEC §6).
METRIC_TEXT = {
    "G": "Injecting into the tumour gives {v} the tumour exposure (AUC) of the same {ref} dose",
    "S": "Plasma exposure (AUC) after intratumoral injection is {v} that of the same {ref} dose",
    "S_max": "The plasma peak after intratumoral injection is {v} that of the same {ref} dose",
    "TI": "The tumour-to-plasma exposure ratio with intratumoral injection is {v} that with {ref} dosing (targeting index)",
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
    subjects: dict[Any, Any] = field(default_factory=dict)  # subject ID -> itpk.subjects.Subject (data file)
    data_note: str = ""


def write_report(run_dir: str | Path, out: str | Path | None = None, *, progress: bool = True) -> Path:
    """Render the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``), atomically.

    Parameters
    ----------
    run_dir
        Run directory written by ``itpk fit`` (SPEC §5).
    out
        HTML file to write.
    progress
        Show a progress bar on stderr while rendering; it only ever appears when stderr is a
        terminal, so pipes and logs stay clean. ``False`` silences it (``itpk report --quiet``).

    Raises
    ------
    ItpkError
        When the run directory is missing, incomplete or from an incompatible itpk version.
    """
    run = read_run(run_dir)
    target = Path(out) if out is not None else run.folder / "report.html"
    _check_target(target)  # before the minutes of rendering, not after them
    with Progress(len(run.predictions["ID"].unique()) + len(SECTIONS), enabled=progress) as bar:
        text = render_report(run, bar)
    try:
        return write_text(target, text)
    except OSError as exc:
        raise ItpkError(f"--out {target}: cannot write ({exc.strerror or exc})") from None


def _check_target(target: Path) -> None:
    from itpk.io import clash_problems, file_problem

    problem = file_problem("--out", target) or next(iter(clash_problems({"--out": target})), None)
    if problem:
        raise ItpkError(problem + (f", e.g. {target / 'report.html'}" if target.is_dir() else ""))


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
    if "LLOQ" in predictions:  # a censored value is drawn at its limit (its DV may be blank or below it)
        censored = predictions["BLQ"] == 1
        predictions.loc[censored, "DV"] = predictions.loc[censored, "LLOQ"]
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
    for column in (c for c in required if c not in TEXT_COLUMNS):  # a hand-edited cell: say where, not a ValueError later
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise ItpkError(f"{path}: row {row + 2}, {column}: found {frame[column].iat[row]!r}; allowed: a number")
        frame[column] = values
    return frame


def _read_doses(run: RunData) -> None:
    """Subjects (schedules, covariates), dose times and arms from the fitted data file.

    Only when the file is still there and unchanged (SHA-256 of ``run.json``): a changed file
    could hold other doses than the ones the posterior was fitted to.
    """
    from itpk.dataset import read_dataset
    from itpk.subjects import subjects

    source = run.record.get("data")
    lost = ("dose times are not marked, individual fits are drawn at the observation times only "
            "and the VPC is not split by arm")
    if not source or not Path(source).is_file():
        run.data_note = f"data file {source!r} not found: {lost}"
        return
    sha = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    if run.record.get("data_sha256") and sha != run.record["data_sha256"]:
        run.data_note = f"data file {source} changed since the fit: {lost}"
        return
    try:
        for s in subjects(read_dataset(source, run.spec), run.spec):
            run.arms[s.id] = s.arm
            run.doses[s.id] = [float(t) for t in s.schedule.dose_times()]  # ADDL repeats included
            run.subjects[s.id] = s
    except ItpkError as exc:
        run.arms, run.doses, run.subjects = {}, {}, {}
        run.data_note = f"data file {source} could not be re-read ({exc}): {lost}"


# --------------------------------------------------------------------------------------------- rendering


# Sections in the order they are computed, with the label the progress bar shows.
SECTIONS = {
    "parameters": "parameter table", "prior_figure": "prior vs posterior", "gof": "goodness of fit",
    "individual": "individual fits", "vpc": "prediction-corrected VPC", "exposure": "exposure",
    "sampler": "sampler diagnostics",
}


def render_report(run: RunData, progress: Progress | None = None) -> str:
    """The HTML text of the report (``progress`` advances once per subject and once per section)."""
    from importlib.resources import files

    import jinja2

    bar = progress or Progress(0, enabled=False)
    _matplotlib()
    template_text = files("itpk").joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    builders = {
        "parameters": parameter_rows, "prior_figure": prior_posterior_figure, "gof": gof_figures,
        "individual": lambda r: individual_figures(r, bar), "vpc": vpc_figures, "exposure": exposure_section,
        "sampler": sampler_section,
    }
    context: dict[str, Any] = {
        "title": f"itpk report — {run.spec.name}",
        "verdict": verdict(run),
        "fitted": fitted_rows(run),
        "provenance": provenance_rows(run),
        "time_unit": run.spec.time_unit,
        "has_iiv": bool(run.summary["parameter"].astype(str).str.startswith("omega_").any()),
        "method": run.record.get("settings", {}).get("method", "nuts"),
    }
    for key, label in SECTIONS.items():
        bar.step(label)
        context[key] = builders[key](run)
        bar.advance()
    notes = [run.data_note, context["individual"]["note"]]
    context["warnings"] = list(run.record.get("warnings", [])) + [n for n in notes if n]
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
    """Log scale with plain labels (1, 10, 0.1). Minor ticks are labelled only on short axes (at 2
    and 5 below two decades, all of them below a factor of 5), else one lonely label, or none,
    is all a reader gets."""
    import matplotlib.ticker

    for name in ("x", "y") if which == "both" else (which,):
        getattr(ax, f"set_{name}scale")("log")
        axis = getattr(ax, f"{name}axis")
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_minor_label(axis)))


def _minor_label(axis: Any) -> Any:
    def label(v: float, _: Any) -> str:  # evaluated at draw time, when the final limits are known
        lo, hi = sorted(axis.get_view_interval())
        if not (lo > 0 and v > 0 and hi / lo < 100):
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        return f"{v:g}" if hi / lo < 5 or mantissa in (2, 5) else ""

    return label


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


def fmt_interval(lo: Any, hi: Any, digits: int = 3, sep: str = " – ") -> str:
    """"lo – hi" with both ends in one notation: scientific for both when :func:`fmt` needs it for either."""
    ends = [fmt(v, digits) for v in (lo, hi)]
    if any("e" in e for e in ends) and not all("e" in e or e in ("0", "—") for e in ends):
        ends = [e if e in ("0", "—") or "e" in e else f"{float(v):.{digits - 1}e}" for e, v in zip(ends, (lo, hi), strict=True)]
    return f"{ends[0]}{sep}{ends[1]}"


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
    if passed is not None:  # an MCMC run; null numbers in run.json are non-finite ones (a variable that did not move)
        r_hat, ess = (math.nan if d.get(k) is None else float(d[k]) for k in ("max_r_hat", "min_ess_bulk"))
        checks.append(("max R-hat", fmt(r_hat, 4), f"≤ {R_HAT_MAX}", r_hat <= R_HAT_MAX))
        checks.append(("min bulk ESS", fmt(ess), f"≥ {ESS_BULK_MIN}", ess >= ESS_BULK_MIN))
        checks.append(("divergent transitions", str(d.get("divergences")), "0", not d.get("divergences")))
        if "min_ess_tail" in d:  # runs written before session 20 lack it
            tail = math.nan if d.get("min_ess_tail") is None else float(d["min_ess_tail"])
            # advisory (Vehtari et al. 2021 ask for both ESSs); SPEC §4's verdict counts bulk ESS only
            checks.append(("min tail ESS (advisory, not in the verdict)", fmt(tail), f"≥ {ESS_BULK_MIN}",
                           "ok" if tail >= ESS_BULK_MIN else "low"))
    return {"status": status, "headline": headline, "reasons": list(d.get("reasons", [])), "checks": checks,
            "advice": list(d.get("advice", []))}


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
    sampler = ", ".join(f"{k} {settings[k]}" for k in _SAMPLER_KEYS.get(settings.get("method"), ("method",))
                        if k in settings)
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


# The settings that describe each method: run.json records every fit() argument, and a laplace fit's
# chains, tune and target_accept are defaults that did nothing (an audit found them reported as if used).
_SAMPLER_KEYS = {"nuts": ("method", "chains", "draws", "tune", "target_accept"),
                 "pymc": ("method", "chains", "draws", "tune", "target_accept"),
                 "laplace": ("method", "draws"), "advi": ("method", "draws")}


def provenance_rows(run: RunData) -> list[tuple[str, str]]:
    r = run.record
    versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items() if v != "absent")
    timings = r.get("timings_s", {})
    method = r.get("settings", {}).get("method")
    return [
        ("itpk", str(r.get("itpk_version", "?"))),
        ("libraries", f"Python {r.get('python', '?')}; {versions}"),
        ("platform", str(r.get("platform", "?"))),
        ("command", " ".join(r.get("command", [])) or "—"),
        ("model SHA-256", str(r.get("model_sha256", "—"))),
        ("data SHA-256", str(r.get("data_sha256", "—"))),
        ("wall time", ", ".join(f"{_timing_label(k, method)} {v:.1f} s" for k, v in timings.items()) or "—"),
        ("run directory", str(run.folder.resolve())),
    ]


def _timing_label(key: str, method: str | None) -> str:
    """A timing's name; "sampling" only for the MCMC methods (the others fit an approximation, then draw)."""
    label = key.removesuffix("_s")
    return f"fitting ({method})" if label == "sampling" and method not in (None, "nuts", "pymc") else label


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
    from itpk.population import cv_percent

    spec, s = run.spec, run.summary
    groups: dict[str, list[dict[str, str]]] = {"population": [], "iiv": [], "residual": []}
    for row in s.to_dict("records"):
        name = str(row["parameter"])
        unit = str(row.get("unit", "")) if pd.notna(row.get("unit")) else ""
        base = {"name": name, "unit": unit if unit and unit != "1" else "—", "median": fmt(row["median"]),
                "ci": fmt_interval(row["ci_low"], row["ci_high"]), "r_hat": fmt(row.get("r_hat"), 4),
                "ess": fmt(row.get("ess_bulk"), 3)}
        if name.startswith("omega_"):
            target = name.removeprefix("omega_")
            scale = spec.parameters[target].iiv_scale if target in spec.parameters else "log"
            typical = s.loc[s["parameter"] == target, "median"]
            typical_value = float(typical.iloc[0]) if len(typical) else None
            # CV of the individual values at each ω quantile (monotone in ω; a fraction's at its typical value)
            cv = [cv_percent(float(row[k]), scale, typical_value) for k in ("median", "ci_low", "ci_high")]
            base.update(name=f"IIV on {target}" + (" (logit scale)" if scale == "logit" else ""),
                        cv=f"{cv[0]:.0f}%" if math.isfinite(cv[0]) else "—",
                        cv_ci=f"{cv[1]:.0f}% – {cv[2]:.0f}%" if math.isfinite(cv[1]) and math.isfinite(cv[2]) else "—",
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
        ax.tick_params(which="both", labelsize=8)
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
        # e.g. samples at a dose time, before any drug arrives: a log axis cannot show them
        off_log = int(((d["PRED"] <= 0) | (d["IPRED"] <= 0) | (d["DV"] <= 0)).sum())
        fig.suptitle(f"{output} ({unit}) — {int((~cens).sum())} observed, {int(cens.sum())} censored"
                     + (f"; {off_log} with DV, PRED or IPRED <= 0 are missing from the log-axis panels that use it"
                        if off_log else ""), fontsize=11)
        figures.append({"output": output, "unit": unit, "image": png(fig), "pit": pit_ok})
    return figures


def _scatter_obs(ax: Any, x: np.ndarray, y: np.ndarray, cens: np.ndarray, censored_at: float | None = None) -> None:
    ax.scatter(x[~cens], y[~cens], s=12, color=COLORS[0], alpha=0.7, edgecolor="none", label="observed")
    if cens.any():
        yc = y[cens] if censored_at is None else np.full(int(cens.sum()), censored_at)
        yc = np.where(np.isfinite(yc), yc, np.nan)
        ax.scatter(x[cens], yc, s=22, marker="v", facecolor="none", edgecolor=COLORS[1], label="censored (BLQ, at LLOQ)")
    ax.grid(alpha=0.3)
    ax.tick_params(which="both", labelsize=8)


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

CURVE_POINTS = 200  # evenly spaced times per subject, before dose, infusion-end and observation times are added
CURVE_DRAWS_LINEAR = 200  # exact and batched over draws: ~20 ms per subject
# Nonlinear models go through scipy's stiff solver one draw at a time (~1 s per draw for the
# oncolytic-virus model, whatever the number of times), so fewer draws and times.
CURVE_POINTS_NONLINEAR = 60
CURVE_DRAWS_NONLINEAR = 20
# Re-simulated vs fitted IPRED at the observation times, same draws: loose enough for the fit's
# ODE solver tolerance, tight enough to catch a wrong subject, dose or parameter (O(1) errors).
CURVE_RTOL = 1e-2
BAND = (0.05, 0.5, 0.95)


@dataclass(frozen=True)
class SubjectCurves:
    """Posterior percentiles of one subject's outputs on a fine time grid.

    Attributes
    ----------
    times : ndarray (T,)
        Model time unit; includes every observation and dose time of the subject.
    bands : dict of output -> ndarray (3, T)
        5th, 50th and 95th posterior percentiles of the individual prediction, output unit.
    draws : int
        Posterior draws simulated.
    """

    times: np.ndarray
    bands: dict[str, np.ndarray]
    draws: int


def curve_grid(schedule: Any, obs_times: np.ndarray, points: int = CURVE_POINTS) -> np.ndarray:
    """Times (model time unit) at which to draw a subject's curves.

    ``points`` evenly spaced times from 0 to 5% past the last observation or dose, plus the
    observation times, dose times, infusion ends and a few log-spaced times after each dose
    (so peaks and early rises are not stepped over), a time just before each later dose
    (so a bolus shows as a jump rather than a slanted line), and each covariate change's time
    and a time just after it (the new value holds after the change: NOCB).
    """
    doses = np.asarray(schedule.dose_times(), dtype=float)
    changes = np.array([c.time for c in schedule.changes], dtype=float)
    ends = np.array([t + d.infusion_duration for d in schedule.doses if d.is_infusion
                     and math.isfinite(d.infusion_duration) for t in d.times()], dtype=float)
    end = 1.05 * max([0.0, *np.asarray(obs_times, dtype=float), *doses, *ends]) or 1.0
    early = (doses[:, None] + end * np.geomspace(1e-4, 0.02, 10)[None, :]).ravel()
    before = doses[doses > 0] - 1e-6 * end
    grid = np.concatenate([np.linspace(0.0, end, points), obs_times, doses, ends, early, before,
                           changes, changes + 1e-6 * end])
    return np.unique(np.clip(grid, 0.0, end))


def draw_index(total: int, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``limit`` of ``total`` flattened draws, chosen with ``seed``."""
    if total <= limit:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def subject_parameters(run: RunData, position: int | None, index: np.ndarray) -> dict[str, np.ndarray]:
    """Draws ``index`` of one subject's parameters, by the model file's names.

    IIV parameters from ``NAME_i[..., position]`` (``position``: the subject's place on the
    posterior's ``subject`` axis), other estimated ones from the population ``NAME``; parameters
    absent from the posterior are held at the model file's values by :func:`itpk.system.resolve`.
    """
    post = run.tree["posterior"]
    values = {}
    for name in run.spec.parameters:
        if f"{name}_i" in post and position is not None:
            arr = np.asarray(post[f"{name}_i"])
            values[name] = arr.reshape(-1, arr.shape[-1])[index, position]
        elif name in post:
            values[name] = np.asarray(post[name]).reshape(-1)[index]
    return values


def subject_curves(run: RunData, sid: Any, index: np.ndarray) -> SubjectCurves:
    """Simulate one subject for posterior draws ``index`` on :func:`curve_grid` (one batched call).

    Raises
    ------
    ItpkError
        When the data file's subject is unknown to the posterior, or the re-simulation disagrees
        with the fit's IPRED at the observation times (relative tolerance ``CURVE_RTOL``).
    """
    from itpk.simulate import simulate

    post, pred = run.tree["posterior"], run.predictions
    subject = run.subjects[sid]
    position = None
    if "subject" in post.coords:
        ids = [str(v) for v in np.asarray(post.coords["subject"])]
        if str(sid) not in ids:
            raise ItpkError(f"subject {sid} of the data file is not in the posterior")
        position = ids.index(str(sid))
    rows = np.flatnonzero((pred["ID"].astype(str) == str(sid)).to_numpy())
    obs_t = pred["TIME"].to_numpy(dtype=float)[rows]
    outputs = [o for o in _outputs(run) if o in set(pred["CMT"].astype(str).to_numpy()[rows])]
    times = curve_grid(subject.schedule, obs_t, CURVE_POINTS if run.spec.is_linear else CURVE_POINTS_NONLINEAR)
    params = {**subject_parameters(run, position, index), **subject.covariates}
    prof = simulate(run.spec, subject.schedule, params, times, outputs=outputs)
    _check_against_ipred(run, sid, rows, index, times, prof.outputs)
    bands = {o: np.quantile(prof.outputs[o], BAND, axis=0) for o in outputs}
    return SubjectCurves(times, bands, int(index.size))


def _check_against_ipred(run: RunData, sid: Any, rows: np.ndarray, index: np.ndarray, times: np.ndarray,
                         outputs: dict[str, np.ndarray]) -> None:
    """The curves must reproduce the fitted IPRED draw by draw: a wrong subject, parameter or
    dose mapping would otherwise draw a plausible but false curve."""
    post = run.tree["posterior"]
    if "IPRED" not in post or rows.size == 0:
        return
    ipred = np.asarray(post["IPRED"])
    if ipred.shape[-1] != len(run.predictions):
        raise ItpkError(f"subject {sid}: posterior IPRED and predictions.csv disagree on the observations")
    ipred = ipred.reshape(-1, ipred.shape[-1])[index][:, rows]
    cmt = run.predictions["CMT"].astype(str).to_numpy()[rows]
    at = np.searchsorted(times, run.predictions["TIME"].to_numpy(dtype=float)[rows])
    sim = np.stack([outputs[c][:, j] for c, j in zip(cmt, at, strict=True)], axis=1)
    scale = np.abs(ipred).max()
    if not np.allclose(sim, ipred, rtol=CURVE_RTOL, atol=CURVE_RTOL * scale):
        worst = float(np.max(np.abs(sim - ipred) / (np.abs(ipred) + CURVE_RTOL * scale)))
        raise ItpkError(f"subject {sid}: re-simulated predictions differ from the fitted IPRED (relative {worst:.2g})")


def individual_curves(run: RunData, progress: Progress | None = None) -> tuple[dict[Any, SubjectCurves], str]:
    """Smooth posterior curves of every subject, and a note on any subject drawn without them.

    Empty (with the reason) when the data file could not be re-read; a subject whose
    re-simulation fails falls back to its observation times, named in the note.
    """
    ids = list(dict.fromkeys(run.predictions["ID"].tolist()))
    if not run.subjects:  # no data file: the caller draws at the observation times and run.data_note says why
        for _ in ids:
            if progress:
                progress.advance()
        return {}, ""
    linear = run.spec.is_linear
    post = run.tree["posterior"]
    total = int(post.sizes.get("chain", 1) * post.sizes.get("draw", 1))
    seed = int(run.record.get("settings", {}).get("seed") or 0)
    index = draw_index(total, CURVE_DRAWS_LINEAR if linear else CURVE_DRAWS_NONLINEAR, seed)
    by_str = {str(k): k for k in run.subjects}
    curves, failed = {}, []
    for sid in ids:
        if progress:
            progress.step(f"individual fits: subject {sid}")
        try:
            if str(sid) not in by_str:
                raise ItpkError(f"subject {sid} is not in the data file")
            curves[sid] = subject_curves(run, by_str[str(sid)], index)
        except ItpkError as exc:
            failed.append(str(exc))
        if progress:
            progress.advance()
    note = ""
    if failed:
        note = (f"individual fits of {len(failed)} subject(s) drawn at the observation times only: "
                + "; ".join(failed[:5]) + (" …" if len(failed) > 5 else ""))
    return curves, note


def ipred_quantiles(run: RunData, q: tuple[float, ...] = BAND) -> np.ndarray | None:
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


def individual_figures(run: RunData, progress: Progress | None = None) -> dict[str, Any]:
    """Pages of individual fits: smooth posterior curves when the data file could be re-read.

    Returns
    -------
    dict
        ``pages`` (PNG data URIs), ``smooth`` (subjects drawn with smooth curves), ``total``
        (subjects), ``draws`` (posterior draws per curve) and ``note`` (why some are not smooth).
    """
    plt = _matplotlib()
    curves, note = individual_curves(run, progress)
    band = ipred_quantiles(run)
    outputs = _outputs(run)
    ids = list(dict.fromkeys(run.predictions["ID"].tolist()))
    units = {run.spec.outputs[o].unit for o in outputs}
    ylabel = f"concentration ({units.pop()})" if len(units) == 1 else "concentration (unit: see legend)"
    pages = []
    for start in range(0, len(ids), SUBJECTS_PER_FIGURE):
        page = ids[start:start + SUBJECTS_PER_FIGURE]
        ncol = min(4, len(page))
        nrow = -(-len(page) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.7 * nrow + 0.7), squeeze=False,
                                 constrained_layout=True)
        for ax, sid in zip(axes.flat, page, strict=False):
            _subject_panel(ax, run, sid, outputs, curves.get(sid), band)
            ax.set_ylabel(ylabel, fontsize=8)
        for ax in list(axes.flat)[len(page):]:
            ax.set_visible(False)
        fig.legend(*_individual_legend(run, outputs), loc="outside lower center", fontsize=8,
                   ncol=len(outputs) + 3, frameon=False)
        pages.append(png(fig))
    draws = next(iter(curves.values())).draws if curves else 0
    return {"pages": pages, "smooth": len(curves), "total": len(ids), "draws": draws, "note": note}


def _subject_panel(ax: Any, run: RunData, sid: Any, outputs: list[str], curve: SubjectCurves | None,
                   band: np.ndarray | None) -> None:
    """One subject: median and 90% band per output (smooth, or at the observation times), data, doses."""
    pred = run.predictions
    observed, drawn = [], []
    for k, output in enumerate(outputs):
        rows = np.flatnonzero(((pred["ID"] == sid) & (pred["CMT"].astype(str) == output)).to_numpy())
        if rows.size == 0:
            continue
        color = COLORS[k % len(COLORS)]
        t = pred["TIME"].to_numpy()[rows]
        order = np.argsort(t, kind="stable")
        rows, t = rows[order], t[order]
        if curve is not None and output in curve.bands:
            x, (lo, med, hi) = curve.times, curve.bands[output]
        elif band is not None:
            x, (lo, med, hi) = t, band[:, rows]
        else:
            x = lo = med = hi = None
        if x is not None:
            drawn.append((x, lo, med, hi, color))
        dv = pred["DV"].to_numpy()[rows]
        cens = pred["BLQ"].to_numpy()[rows] == 1
        observed.append(dv)
        ax.plot(t[~cens], dv[~cens], "o", ms=3.5, color=color, mec="white", mew=0.4, zorder=3)
        if cens.any():
            ax.plot(t[cens], dv[cens], "v", ms=5, mfc="none", color=color, zorder=3)
    values = np.concatenate(observed) if observed else np.array([])
    floor = _log_floor(values, [m for _, _, m, _, _ in drawn])
    for x, lo, med, hi, color in drawn:
        if floor is not None:  # a log axis cannot show the zero before a dose reaches a compartment
            lo, med, hi = (np.maximum(v, floor) for v in (lo, med, hi))
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        ax.plot(x, med, color=color, lw=1.3)
    for dt in run.doses.get(sid, []):
        ax.axvline(dt, color="0.35", lw=0.9, ls=":", zorder=0)
        # a triangle on the time axis, visible even for a dose at time 0 (where the line hides in the frame)
        ax.plot(dt, 0, marker="^", ms=6, color="0.2", transform=ax.get_xaxis_transform(), clip_on=False, zorder=4)
    if floor is not None:
        log_axis(ax, "y")
        top = max([float(np.nanmax(values)) if values.size else 0.0, *(float(np.nanmax(h)) for *_, h, _ in drawn)])
        ax.set_ylim(floor, top * 2 if top > floor else floor * 10)
    if curve is not None:
        ax.set_xlim(0, curve.times[-1])
    arm = run.arms.get(sid, "")
    ax.set_title(f"ID {sid}" + (f" — arm {arm}" if arm else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(which="both", labelsize=7)
    ax.set_xlabel(f"time ({run.spec.time_unit})", fontsize=8)


def _log_floor(observed: np.ndarray, medians: list[np.ndarray]) -> float | None:
    """Bottom of a log axis: a decade below the lowest observation (or the lowest positive median),
    and at most 6 decades below the top, so near-zero predictions do not squash the data."""
    pos = observed[np.isfinite(observed) & (observed > 0)]
    meds = np.concatenate(medians) if medians else np.array([])
    meds = meds[np.isfinite(meds) & (meds > 0)]
    if pos.size == 0 and meds.size == 0:
        return None
    low = pos.min() / 10 if pos.size else meds.min()
    top = max(pos.max() if pos.size else 0.0, meds.max() if meds.size else 0.0)
    return float(max(low, top * 1e-6))


def _individual_legend(run: RunData, outputs: list[str]) -> tuple[list[Any], list[str]]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    labels = []
    for k, output in enumerate(outputs):
        color = COLORS[k % len(COLORS)]
        handles.append((Patch(color=color, alpha=0.2, lw=0), Line2D([], [], color=color, lw=1.3)))
        labels.append(f"{output} ({run.spec.outputs[output].unit}): posterior median, 90% band")
    handles.append(Line2D([], [], ls="", marker="o", color="0.3", ms=4))
    labels.append("observed")
    if (run.predictions["BLQ"] == 1).any():
        handles.append(Line2D([], [], ls="", marker="v", mfc="none", color="0.3", ms=5))
        labels.append("censored (BLQ, drawn at the LLOQ)")
    if run.doses:  # unknown without the data file
        handles.append(Line2D([], [], color="0.35", lw=0.9, ls=":", marker="^", ms=6, mfc="0.2", mec="0.2"))
        labels.append("dose")
    return handles, labels


# --------------------------------------------------------------------------------------------- 6 VPC

VPC_REPLICATES = 500  # posterior predictive replicates of the dataset used per VPC (evenly thinned)
PERCENTILES = (5, 50, 95)


def _predictive(run: RunData, output: str, rows: np.ndarray, group: str = "posterior_predictive") -> np.ndarray | None:
    """(draws, n) predictive values of ``output`` on the observation scale from ``group``, or None.

    ``posterior_predictive``: the fitted subjects (their own η); ``predictions``: new subjects
    (fresh η ~ N(0, Ω)), what a VPC simulates.
    """
    if group not in run.tree.children or f"DV_{output}" not in run.tree[group]:
        return None
    arr = np.asarray(run.tree[group][f"DV_{output}"])
    arr = arr.reshape(-1, arr.shape[-1])
    if arr.shape[1] != rows.size:
        return None
    if _log_error(run, output):
        arr = np.exp(arr)
    return arr


def _log_error(run: RunData, output: str) -> bool:
    return run.record.get("settings", {}).get("errors", {}).get(output) == "log"


def time_bins(times: np.ndarray, max_bins: int = 10) -> np.ndarray:
    """Bin index per time (0, 1, … with no empty bin): one bin per distinct time when few, else quantile bins."""
    unique = np.unique(times)
    if unique.size <= max_bins:
        return np.searchsorted(unique, times)
    edges = np.unique(np.quantile(times, np.linspace(0, 1, max_bins + 1)))
    raw = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, edges.size - 2)
    return np.unique(raw, return_inverse=True)[1]


def prediction_correct(values: np.ndarray, pred: np.ndarray, bins: np.ndarray, *, log: bool = False) -> np.ndarray:
    """Prediction-corrected values (Bergstrand et al. 2011, AAPS J 13:143, lower bound 0).

    ``pcY_ij = Y_ij · PRED_bin / PRED_ij`` with ``PRED_bin`` the median PRED of the bin of
    observation ij. With ``log`` (log-normal residual error) the correction is additive on the
    log scale, ``log pcY = log Y + median(log PRED_bin) − log PRED``, i.e. the same ratio with
    the bin's median taken on the log scale.

    Parameters
    ----------
    values : ndarray (..., n)
        Observed or simulated values, output unit; the last axis runs over observations.
    pred : ndarray (n,)
        Population predictions (PRED) of the same observations, output unit, > 0.
    bins : ndarray (n,) of int
        Bin of each observation (0, 1, …).

    Returns
    -------
    ndarray (..., n)
        Corrected values, output unit.

    Examples
    --------
    >>> prediction_correct(np.array([1.0, 1.0, 1.0, 1.0]), np.array([1.0, 2.0, 4.0, 8.0]), np.array([0, 0, 1, 1]))
    array([1.5 , 0.75, 1.5 , 0.75])
    """
    pred = np.asarray(pred, dtype=float)
    bins = np.asarray(bins)
    typical = np.empty_like(pred)
    for b in np.unique(bins):
        m = bins == b
        typical[m] = np.exp(np.median(np.log(pred[m]))) if log else np.median(pred[m])
    return np.asarray(values, dtype=float) * (typical / pred)


def vpc_figures(run: RunData) -> list[dict[str, Any]]:
    """One prediction-corrected VPC per output (all subjects, then per arm), with a BLQ-fraction panel."""
    plt = _matplotlib()
    pred = run.predictions
    figures = []
    for output in _outputs(run):
        rows = np.flatnonzero((pred["CMT"].astype(str) == output).to_numpy())
        sim, new = _predictive(run, output, rows, "predictions"), True
        if sim is None:  # a model without IIV, or a run written before the group existed
            sim, new = _predictive(run, output, rows), False
        if sim is None:
            continue
        sim = sim[:: max(1, -(-sim.shape[0] // VPC_REPLICATES))]
        d = pred.iloc[rows]
        cens = d["BLQ"].to_numpy() == 1
        strata = _strata(run, d["ID"])
        ncol = 2 if cens.any() else 1
        fig, axes = plt.subplots(len(strata), ncol, figsize=(6.3 * ncol, 3.3 * len(strata) + 0.6), squeeze=False,
                                 constrained_layout=True)
        dropped = 0
        for r, (stratum, m) in enumerate(strata.items()):
            dropped = max(dropped, _pc_panel(axes[r, 0], run, output, d[m], sim[:, m], stratum))
            if ncol == 2:
                _blq_panel(axes[r, 1], run, output, d[m], sim[:, m], stratum)
        fig.legend(*_vpc_legend(cens.any()), loc="outside lower center", fontsize=8, ncol=2 * ncol, frameon=False)
        figures.append({"output": output, "unit": run.spec.outputs[output].unit, "image": png(fig),
                        "draws": sim.shape[0], "new_subjects": new, "dropped": dropped, "log": _log_error(run, output),
                        "strata": len(strata), "blq": bool(cens.any())})
    return figures


def _strata(run: RunData, ids: pd.Series) -> dict[str, np.ndarray]:
    """All subjects pooled (what the prediction correction is for), then each arm when there are several."""
    out = {"all subjects": np.ones(len(ids), dtype=bool)}
    arms = ids.map(run.arms).fillna("").astype(str).to_numpy() if run.arms else np.full(len(ids), "")
    names = [a for a in dict.fromkeys(arms) if a]
    if len(names) > 1:
        out.update({f"arm {a}": arms == a for a in names})
    return out


def _lloq(d: pd.DataFrame) -> np.ndarray | None:
    """Each row's censoring limit, or None when no row is censored.

    Censored rows have their own (``LLOQ`` in predictions.csv; runs written before it was
    there: DV, which then held the limit); uncensored rows, whose assay had a limit too, get the
    output's median limit.
    """
    cens = d["BLQ"].to_numpy() == 1
    if not cens.any():
        return None
    limits = (d["LLOQ"] if "LLOQ" in d else d["DV"]).to_numpy(dtype=float)
    known = limits[cens & np.isfinite(limits)]
    if known.size == 0:
        return None
    return np.where(cens & np.isfinite(limits), limits, float(np.median(known)))


def _pc_panel(ax: Any, run: RunData, output: str, d: pd.DataFrame, sim: np.ndarray, stratum: str) -> int:
    """Observed percentiles of pcDV against 90% intervals of the simulated ones; returns observations dropped."""
    unit, tu = run.spec.outputs[output].unit, run.spec.time_unit
    p = d["PRED"].to_numpy(dtype=float)
    keep = np.isfinite(p) & (p > 0)  # the ratio needs PRED > 0 (e.g. not before any drug arrives)
    t, dv, cens, p, sim = d["TIME"].to_numpy()[keep], d["DV"].to_numpy()[keep], (d["BLQ"].to_numpy() == 1)[keep], \
        p[keep], sim[:, keep]
    if t.size == 0:
        ax.text(0.5, 0.5, "no observation with PRED > 0", ha="center", va="center", transform=ax.transAxes)
        return int((~keep).sum())
    lloq = _lloq(d)
    if lloq is not None:  # a replicate below the LLOQ would have been reported as censored, like the data
        lloq = lloq[keep]
        sim = np.maximum(sim, lloq)
        dv = np.where(cens, lloq, dv)  # censored values count at their limit, as the replicates do
    b = time_bins(t)
    nb = int(b.max()) + 1
    mid = np.array([np.median(t[b == i]) for i in range(nb)])
    log = _log_error(run, output)
    pc_dv, pc_sim = prediction_correct(dv, p, b, log=log), prediction_correct(sim, p, b, log=log)
    ax.plot(t[~cens], pc_dv[~cens], ".", color="0.6", ms=3, zorder=0)
    if cens.any():
        ax.plot(t[cens], pc_dv[cens], "v", color=COLORS[1], mfc="none", ms=4, zorder=0)
    bands = []
    for q in PERCENTILES:
        sim_q = np.stack([np.percentile(pc_sim[:, b == i], q, axis=1) for i in range(nb)])  # (bins, replicates)
        bands.append((q, *np.percentile(sim_q, [5, 95], axis=1), np.array([np.percentile(pc_dv[b == i], q) for i in range(nb)])))
    log_y = bool((pc_dv > 0).any())
    clipped = []
    floor = np.nan
    if log_y:  # an additive error term simulates values <= 0, which a log axis cannot show: drawn at its bottom, and said
        shown = np.concatenate([pc_dv, *[np.concatenate(band[1:]) for band in bands]])
        floor = float(shown[np.isfinite(shown) & (shown > 0)].min()) / 3
        for k, (q, lo, hi, obs_q) in enumerate(bands):
            if (lo <= 0).any():
                clipped.append(f"{q}th: {int((lo <= 0).sum())} of {nb} bins")
                bands[k] = (q, np.where(lo > 0, lo, floor), hi, obs_q)
    for q, lo, hi, obs_q in bands:
        ax.fill_between(mid, lo, hi, color=COLORS[0] if q == 50 else COLORS[1], alpha=0.2, lw=0)
        ax.plot(mid, obs_q, color="k", ls="-" if q == 50 else "--", lw=1.3, marker="o" if q == 50 else None, ms=3)
    if log_y:
        log_axis(ax, "y")
    if clipped:
        ax.set_ylim(bottom=floor)  # the clipped edges sit on the axis' bottom, below every value shown
        ax.text(0.01, 0.01, "simulated percentile interval reaching <= 0 (drawn at the axis bottom): " + "; ".join(clipped),
                transform=ax.transAxes, fontsize=7, color="0.3", va="bottom")
    ax.set_xlabel(f"time ({tu})", fontsize=9)
    ax.set_ylabel(f"prediction-corrected {output} ({unit})", fontsize=9)
    ax.set_title(f"prediction-corrected VPC — {output}, {stratum}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.tick_params(which="both", labelsize=8)
    return int((~keep).sum())


def _blq_panel(ax: Any, run: RunData, output: str, d: pd.DataFrame, sim: np.ndarray, stratum: str) -> None:
    """Observed fraction below the LLOQ per time bin against the simulated 90% interval (not corrected)."""
    cens = d["BLQ"].to_numpy() == 1
    t = d["TIME"].to_numpy()
    lloq = _lloq(d)
    b = time_bins(t)
    nb = int(b.max()) + 1
    mid = np.array([np.median(t[b == i]) for i in range(nb)])
    obs = np.array([cens[b == i].mean() for i in range(nb)])
    if lloq is None:
        simulated = np.zeros((nb, sim.shape[0]))
    else:
        simulated = np.stack([(sim[:, b == i] <= lloq[b == i] * (1 + 1e-9)).mean(axis=1) for i in range(nb)])
    lo, hi = np.percentile(simulated, [5, 95], axis=1)
    ax.fill_between(mid, lo, hi, color=COLORS[1], alpha=0.2, lw=0)
    ax.plot(mid, obs, "k-o", ms=3, lw=1.2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"time ({run.spec.time_unit})", fontsize=9)
    ax.set_ylabel("fraction below LLOQ (dimensionless)", fontsize=9)
    unit = run.spec.outputs[output].unit
    if lloq is None:
        where = "none censored"
    elif np.ptp(lloq) > 0:
        where = f"LLOQ {fmt(float(lloq.min()))}–{fmt(float(lloq.max()))} {unit}"
    else:
        where = f"LLOQ {fmt(float(lloq[0]))} {unit}"
    ax.set_title(f"{output}: fraction censored, {stratum} ({where})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.tick_params(which="both", labelsize=8)


def _vpc_legend(censored: bool) -> tuple[list[Any], list[str]]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Line2D([], [], color="k", marker="o", ms=3, lw=1.3), Line2D([], [], color="k", ls="--", lw=1.3),
                          Patch(color=COLORS[0], alpha=0.3, lw=0), Patch(color=COLORS[1], alpha=0.3, lw=0),
                          Line2D([], [], ls="", marker=".", color="0.6")]
    labels = ["observed median (pcDV)", "observed 5th and 95th percentiles (pcDV)",
              "simulated median: 90% interval", "simulated 5th and 95th percentiles: 90% intervals",
              "observations (pcDV)"]
    if censored:
        handles += [Line2D([], [], ls="", marker="v", mfc="none", color=COLORS[1]),
                    Line2D([], [], color="k", marker="o", ms=3, lw=1.2)]
        labels += ["censored (at the LLOQ, corrected)", "observed fraction below LLOQ (right)"]
    return handles, labels


# --------------------------------------------------------------------------------------------- 7 exposure


ROUTE_COLORS = ("#9467bd", "#2ca02c")  # local route, systemic route (not the output colours used elsewhere)


def exposure_profiles(run: RunData, local: str, ref: str, dose: float) -> str | None:
    """Tumour and plasma profiles of the typical subject after the same single dose by each route.

    The population parameters' posterior (thinned, covariates at the fitted trial's medians as in
    ``exposure.csv`` — ``run.json`` ``typical_covariates``; runs written before session 20: the
    model's defaults —, the same bolus regimens; ``local`` may name a site, ``it@lesion2``) is simulated to
    5% past the last observation; lines are posterior medians and bands 90% credible bands. None
    when the model names no local and systemic outputs.
    """
    from itpk.events import regimen
    from itpk.exposure import ROLE_TITLES, roles_at
    from itpk.run import posterior_values, recorded_covariates
    from itpk.simulate import simulate

    injected = Target.parse(local)
    roles = roles_at(run.spec, injected.site)
    outputs = [roles[r] for r in ("local", "systemic") if r in roles and roles[r] in run.spec.outputs]
    if not outputs or not any(k in run.spec.parameters for k in run.draws):
        return None
    limit = CURVE_DRAWS_LINEAR if run.spec.is_linear else CURVE_DRAWS_NONLINEAR
    covariates = recorded_covariates(run.spec, run.record) or {}
    values = posterior_values(run.spec, run.draws, max_draws=limit, overrides=covariates)
    last = float(run.predictions["TIME"].max())
    times = curve_grid(regimen(injected, dose), np.array([last]), CURVE_POINTS if run.spec.is_linear else CURVE_POINTS_NONLINEAR)
    bands = {route: {o: np.quantile(v, BAND, axis=0) for o, v in
                     simulate(run.spec, regimen(target, dose), values, times, outputs=outputs).outputs.items()}
             for route, target in ((local, injected), (ref, Target(ref)))}
    plt = _matplotlib()
    fig, axes = plt.subplots(1, len(outputs), figsize=(5.6 * len(outputs), 3.6), squeeze=False, constrained_layout=True)
    for ax, output in zip(axes.flat, outputs, strict=True):
        medians = [bands[r][output][1] for r in bands]
        floor = _log_floor(np.array([]), medians)
        for color, (route, b) in zip(ROUTE_COLORS, bands.items(), strict=True):
            lo, med, hi = (np.maximum(v, floor) if floor is not None else v for v in b[output])
            ax.fill_between(times, lo, hi, color=color, alpha=0.2, lw=0)
            ax.plot(times, med, color=color, lw=1.5, label=f"{route.upper()} {fmt(dose)} {_dose_unit(run, route)}".rstrip())
        if floor is not None:
            log_axis(ax, "y")
        unit = run.spec.outputs[output].unit
        role = ROLE_TITLES["local" if output == roles.get("local") else "systemic"]
        ax.set_title(f"{output} ({role})", fontsize=10)
        ax.set_xlabel(f"time after the dose ({run.spec.time_unit})", fontsize=9)
        ax.set_ylabel(f"{output} ({unit})", fontsize=9)
        ax.set_xlim(0, times[-1])
        ax.grid(alpha=0.3)
        ax.tick_params(which="both", labelsize=8)
        ax.legend(fontsize=8, title="route, dose (median, 90% band)", title_fontsize=8)
    return png(fig)


def _dose_unit(run: RunData, route: str) -> str:
    """Amount unit of the compartments a route (a target label: ``it@lesion2``) doses into (the
    dose's unit), or "" when unknown."""
    spec = run.spec
    into = getattr(spec.routes.get(Target.parse(route).name), "into", {})
    units = {c.amount_unit for c in spec.compartments if c.name in into}
    return units.pop() if len(units) == 1 else ""


def exposure_section(run: RunData) -> dict[str, Any] | None:
    e = run.exposure
    if e is None or e.empty:
        return None
    route = str(e["route"].iloc[0]) if "route" in e else "it vs iv"
    ref = route.split(" vs ")[-1].upper() if " vs " in route else "systemic"
    dose = f"{fmt(e['dose'].iloc[0])} {_dose_unit(run, route.split(' vs ')[0])}".strip() if "dose" in e else "?"
    pcol = next((c for c in e.columns if c.startswith("P(>")), None)
    rows, sentences = [], []
    for row in e.to_dict("records"):
        name = str(row["metric"])
        med, lo, hi = row["median"], row.get("ci_low", np.nan), row.get("ci_high", np.nan)
        p = row.get(pcol) if pcol else None
        interval = pd.notna(lo) and pd.notna(hi)  # none from a single parameter set (map)
        rows.append({"metric": METRIC_NAMES.get(name, name), "key": name, "median": fmt(med),
                     "ci": fmt_interval(lo, hi) if interval else "—",
                     "p": f"{float(p):.2f}" if p is not None and pd.notna(p) else "—"})
        if name in METRIC_TEXT and pd.notna(med):
            value = f"{fmt(med, 2)}× (95% CrI {fmt_interval(lo, hi, 2, sep='–')})" if interval else f"{fmt(med, 2)}× (a point estimate)"
            text = METRIC_TEXT[name].format(v=value, ref=ref)
            if p is not None and pd.notna(p):
                text += f"; P(>1) = {float(p):.2f}"
            sentences.append(text + ".")
    profiles = None
    if " vs " in route and "dose" in e:
        local, reference = route.split(" vs ")[:2]
        profiles = exposure_profiles(run, local, reference, float(e["dose"].iloc[0]))
    window = str(e["auc_interval"].iloc[0]) if "auc_interval" in e else None
    draws = int(e["draws"].iloc[0]) if "draws" in e and pd.notna(e["draws"].iloc[0]) else None
    covariates = str(e["covariates"].iloc[0]) if "covariates" in e and pd.notna(e["covariates"].iloc[0]) else None
    return {"rows": rows, "sentences": sentences, "route": route, "dose": dose, "pcol": pcol or "P(>1)",
            "profiles": profiles, "auc_interval": window, "draws": draws, "covariates": covariates}


# --------------------------------------------------------------------------------------------- 8 sampler


def sampler_section(run: RunData) -> dict[str, Any]:
    post = run.tree["posterior"]
    method = run.record.get("settings", {}).get("method", "?")
    names = [n for n in run.summary["parameter"] if n in post and (n in run.spec.parameters or n.startswith("omega_"))]
    if post.sizes.get("draw", 1) < 4 or not names:
        return {"note": f"method {method}: a single point estimate, no sampler diagnostics", "trace": [], "energy": None,
                "bfmi": None}
    if method not in ("nuts", "pymc"):  # independent draws from an approximation: traces and ranks say nothing
        return {"note": f"method {method}: independent draws from an approximation, not a Markov chain: no sampler "
                        "diagnostics", "trace": [], "energy": None, "bfmi": None}
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
                ax.tick_params(which="both", labelsize=7)
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

