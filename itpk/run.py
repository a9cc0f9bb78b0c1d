"""Run directories (SPEC.md §5): everything a fit leaves, written atomically.

The directory is assembled in a temporary sibling and renamed into place, so
an interrupted run leaves the previous result (or nothing), never half a run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from itpk import jsontext
from itpk.errors import ItpkError, problems_error, raise_problems
from itpk.inference import CENSORING_METHOD, FitResult
from itpk.io import RUN_DIRECTORY_FILES

RUN_FORMAT = 1
R_HAT_MAX = 1.01
ESS_BULK_MIN = 400
# Tail ESS: the smaller of the ESS of the 5% and 95% quantiles (Vehtari et al. 2021, Stan, ArviZ 0.x). Given
# explicitly: ArviZ 1.x otherwise takes rcParams["stats.ci_prob"] (0.89, i.e. the 11% and 89% quantiles)
TAIL_PROBS = (0.05, 0.95)
# Bulk ESS of the slowest variable at which max R-hat <= 1.01 becomes likely with 4 chains: AR(1)
# chains, 4 x 500, 24 scalars, give P(max R-hat <= 1.01) = 0.81 with the worst at 700 and the rest
# at 800, 0.14 with the worst at 450 (benchmarks/posterior_geometry.py --ess; benchmarks/README.md,
# session 14). The diagnostics take R-hat over every sampled scalar (population parameters, omegas,
# sigmas and each subject's eta): 24 on the virus example, more on larger trials, where the same
# worst ESS gives a somewhat lower probability. R-hat's noise grows with the number of split chains M roughly as
# sqrt(2/(M - 1))·M/ESS, i.e. the ESS needed as sqrt(chains): scaled from 4 chains.
ESS_FOR_R_HAT = 700
R_HAT_STUCK = 1.05  # at least this far above 1, and beyond sampling noise at the fit's ESS: chains disagree
STUCK_ESS_FRACTION = 0.02  # bulk ESS per draw below which a high R-hat means disagreeing chains, not slow mixing
SUMMARY_COLUMNS = ["parameter", "unit", "median", "mean", "sd", "ci_low", "ci_high", "r_hat", "ess_bulk", "ess_tail",
                   "cv_percent", "shrinkage_percent"]


def summary_table(result: FitResult) -> pd.DataFrame:
    """Population parameters, then ``omega_*`` (with CV% and η-shrinkage), then residual errors.

    Intervals are 95% equal-tailed. ``cv_percent``: the CV of the individual values at ω̂, the
    posterior median of ω (:func:`itpk.population.cv_percent`: 100·sqrt(exp(ω̂²) − 1) for
    log-normal IIV; for a fraction's logit-normal IIV, the CV of its individual values around the
    posterior-median typical value). ``shrinkage_percent`` = 100·(1 − SD(posterior-mean η_i)/ω̂)
    (SD over subjects, ddof 1): NONMEM's η-shrinkage with each subject's posterior mean in place of
    its conditional mode at the population estimates. Methods without MCMC (map, laplace, advi) get
    no ``r_hat``/``ess_*`` (their draws are not a Markov chain; the ESS of independent draws would
    read as mixing quality); ``map`` (one draw) no interval either.
    """
    import arviz as az

    from itpk.population import cv_percent

    data, post = result.data, result.tree["posterior"]
    names = [*data.estimated, *(f"omega_{p}" for p in data.iiv), *(v for v in post.data_vars if str(v).startswith("sigma_"))]
    stats = None
    single = np.asarray(post[names[0]]).reshape(-1).size < 2 if names else True
    if _has_chains(post) and result.method in ("nuts", "pymc"):  # az.summary rounds; computed unrounded here
        stats = pd.DataFrame({
            "r_hat": _per_variable(az.rhat(result.tree, var_names=names), names),
            "ess_bulk": _per_variable(az.ess(result.tree, var_names=names, method="bulk"), names),
            "ess_tail": _per_variable(az.ess(result.tree, var_names=names, method="tail", prob=TAIL_PROBS), names),
        }, index=names)
    rows = []
    for name in names:
        draws = np.asarray(post[name]).reshape(-1)
        row = {
            "parameter": name,
            "unit": _unit(result, name),
            "median": float(np.median(draws)),
            "mean": float(np.mean(draws)),
            "sd": float(np.std(draws, ddof=1)) if draws.size > 1 else float("nan"),
            "ci_low": float(np.quantile(draws, 0.025)) if not single else float("nan"),
            "ci_high": float(np.quantile(draws, 0.975)) if not single else float("nan"),
        }
        for key, col in (("r_hat", "r_hat"), ("ess_bulk", "ess_bulk"), ("ess_tail", "ess_tail")):
            row[key] = float(stats.loc[name, col]) if stats is not None else float("nan")
        if name.startswith("omega_"):
            omega, target = row["median"], data.spec.parameters[name[6:]]
            typical = float(np.median(np.asarray(post[name[6:]]))) if name[6:] in post else None
            row["cv_percent"] = cv_percent(omega, target.iiv_scale, typical)
            eta = np.asarray(post[f"eta_{name[6:]}"]).reshape(-1, len(data.subjects)).mean(axis=0)
            # η-shrinkage needs the spread of two or more subjects' η (one subject: not defined)
            row["shrinkage_percent"] = (100 * (1 - float(np.std(eta, ddof=1)) / omega) if omega > 0 and eta.size > 1
                                        else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _per_variable(dataset: Any, names: list[str]) -> list[float]:
    return [float(np.asarray(dataset[n])) for n in names]


def _has_chains(post: Any) -> bool:
    return post.sizes.get("draw", 1) > 3


def _unit(result: FitResult, name: str) -> str:
    spec = result.data.spec
    if name in spec.parameters:
        return spec.parameters[name].unit
    if name.startswith("sigma_"):
        output = name.removeprefix("sigma_").removeprefix("add_").removeprefix("prop_")
        kind = result.data.errors.get(output, "")
        additive = name.startswith("sigma_add_") or (kind == "additive" and not name.startswith("sigma_prop_"))
        return spec.outputs[output].unit if additive else "1"
    return "1"


def diagnostics(result: FitResult) -> dict[str, Any]:
    """max R-hat, min bulk and tail ESS, divergences and the pass/fail verdict with its reasons.

    Over every sampled quantity (:func:`checked_variables`): population parameters, ``omega_*``,
    ``sigma_*`` and each subject's η, every element counted. A non-finite R-hat or ESS (a variable
    that did not move) fails the verdict and is the one named. Tail ESS is reported, and advised on,
    but not part of the verdict (SPEC §4: R-hat, bulk ESS, divergences).
    """
    import arviz as az

    post = result.tree["posterior"]
    if not _has_chains(post) or result.method not in ("nuts", "pymc"):
        return {"max_r_hat": None, "min_ess_bulk": None, "min_ess_tail": None, "divergences": None, "passed": None,
                "reasons": [f"method {result.method}: no MCMC diagnostics"], "advice": []}
    names = checked_variables(result)
    with warnings.catch_warnings():  # a variable that did not move: 0/0 inside ArviZ, reported below as such
        warnings.simplefilter("ignore", RuntimeWarning)
        max_rhat, worst = _extreme(az.rhat(result.tree, var_names=names), largest=True)
        min_ess, slowest = _extreme(az.ess(result.tree, var_names=names, method="bulk"), largest=False)
        min_tail, _ = _extreme(az.ess(result.tree, var_names=names, method="tail", prob=TAIL_PROBS), largest=False)
    named = slowest if math.isfinite(max_rhat) else worst  # the advice names the variable that did not move
    stats = result.tree["sample_stats"]
    divergences = int(np.asarray(stats["diverging"]).sum()) if "diverging" in stats else 0
    reasons = []
    chains = post.sizes["chain"]
    if chains < 2:  # R-hat compares chains: one chain cannot show it has converged
        reasons.append(f"R-hat needs 2 or more chains; this fit ran {chains}")
    elif not max_rhat <= R_HAT_MAX:
        reasons.append(f"max R-hat {max_rhat:.3f} > {R_HAT_MAX} ({worst})" if math.isfinite(max_rhat)
                       else f"R-hat is not finite for {worst}")
    if not min_ess >= ESS_BULK_MIN:
        reasons.append(f"min bulk ESS {min_ess:.0f} < {ESS_BULK_MIN} ({slowest})")
    if divergences:
        reasons.append(f"{divergences} divergent transitions")
    if chains >= 2:
        notes = advice(max_rhat, min_ess, named, chains, post.sizes["draw"])
    else:  # the ESS advice still holds; R-hat (NaN here) says nothing about a stuck chain
        notes = ["run --chains 4 (the default) to assess convergence",
                 *advice(1.0 if math.isfinite(min_ess) else math.nan, min_ess, slowest, chains, post.sizes["draw"])]
    # only beside the advice for more draws: slow mixing, which a dense metric can cure; not for
    # chains in different modes, nor for a one-chain fit whose ESS is fine
    slow = any(n.startswith("rerun with --draws") for n in notes)
    if slow and result.method == "nuts" and result.settings.get("precondition", {}).get("method") == "none":
        notes.append(WHITEN_ADVICE)
    return {"max_r_hat": max_rhat, "worst_r_hat": worst, "min_ess_bulk": min_ess, "slowest": slowest,
            "min_ess_tail": min_tail, "divergences": divergences, "passed": not reasons, "reasons": reasons,
            "advice": notes, "checked": names}


# Measured on the it_antibody example, 4 x (1000 + 1000) at target_accept 0.95, seeds 1, 2, 7, 8, 9, 10:
# min bulk ESS 478-622 in the model's own coordinates (R-hat above 1.01 for seeds 7 and 10), 806-1 091
# whitened (1.3-2.2x per seed, median ~1.5x; 0-2 divergences); whitened at 0.97, seeds 2, 7, 8: ESS
# 804-1 159, R-hat <= 1.0074, no divergences (benchmarks/README.md, session 21)
WHITEN_ADVICE = ("alternatively rerun with --precondition mode: sampling in coordinates whitened at the posterior mode "
                 "(a dense metric) gave 1.3-2.2x the bulk ESS from the same draws on the it_antibody example; "
                 "add --target-accept 0.97 if it then diverges")



def checked_variables(result: FitResult) -> list[str]:
    """The posterior variables the diagnostics cover: every sampled quantity, on the scale users read.

    Population parameters (not their logs: rank-normalised R-hat and bulk ESS do not change under
    a monotone transform), ``omega_*``, ``sigma_*`` and the subjects' ``eta_*`` (the η of either
    parametrisation, so the checked set does not depend on ``--iiv``).
    """
    post, data = result.tree["posterior"], result.data
    names = [*data.estimated, *(f"omega_{p}" for p in data.iiv),
             *sorted(str(v) for v in post.data_vars if str(v).startswith("sigma_")), *(f"eta_{p}" for p in data.iiv)]
    return [n for n in names if n in post.data_vars]


def _extreme(dataset: Any, *, largest: bool) -> tuple[float, str]:
    """The largest (or smallest) value over every element of every variable, and where it is
    (``name`` or ``name[coordinate]``); NaN and its place when any element is not finite."""
    best, where = (-math.inf if largest else math.inf), ""
    for name, array in dataset.data_vars.items():
        flat = np.asarray(array, dtype=float).reshape(-1)
        labels = _element_labels(str(name), array)
        bad = np.flatnonzero(~np.isfinite(flat))
        if bad.size:
            return math.nan, labels[bad[0]]
        k = int(np.argmax(flat) if largest else np.argmin(flat))
        if (flat[k] > best) if largest else (flat[k] < best):
            best, where = float(flat[k]), labels[k]
    return best, where


def _element_labels(name: str, array: Any) -> list[str]:
    if array.ndim == 0:
        return [name]
    index = array.stack(element=array.dims).indexes["element"] if array.ndim > 1 else array.indexes.get(array.dims[0])
    values = list(index) if index is not None else list(range(array.size))
    return [f"{name}[{v if not isinstance(v, tuple) else ','.join(map(str, v))}]" for v in values]


def rhat_noise(min_ess: float, chains: int) -> float:
    """Standard deviation of split R-hat − 1 from sampling noise alone, at a bulk ESS (dimensionless).

    Split into M = 2·chains halves, the between-half variance over the within-half one is about
    χ²(M − 1)/(M − 1) with each half holding ESS/M effective draws, so R-hat − 1 has an SD of about
    ½·sqrt(2/(M − 1))·M/ESS.
    """
    m = 2 * chains
    return 0.5 * math.sqrt(2.0 / (m - 1)) * m / min_ess


def advice(max_rhat: float, min_ess: float, slowest: str, chains: int, draws: int) -> list[str]:
    """What to change when R-hat or ESS fail (divergences have their remedy in the fit's warnings,
    :func:`itpk.inference.fit`, which name the higher ``--target-accept``).

    Parameters
    ----------
    max_rhat, min_ess
        Max R-hat and min bulk ESS over the checked variables (NaN when a variable did not move).
    slowest
        The variable with the smallest bulk ESS.
    chains, draws
        Chains and draws per chain of the fit.

    Returns
    -------
    list of str
        Empty when nothing failed. Otherwise, in order: a variable that did not move; chains
        that disagree (R-hat above :data:`R_HAT_STUCK`, and over 4 noise SDs at this ESS or an
        ESS under :data:`STUCK_ESS_FRACTION` of the draws: more draws do not fix that); too few
        effective draws (the ``--draws`` at which the slowest variable reaches
        :data:`ESS_FOR_R_HAT`, scaled by sqrt(chains/4)).
    """
    out: list[str] = []
    if not (math.isfinite(max_rhat) and math.isfinite(min_ess)) or min_ess <= 0:
        out.append(f"R-hat or ESS is not finite for {slowest}: a chain did not move (a variable stuck at its start "
                   "or at a bound); check its prior, its data and the chains in the report")
        return out
    target = ESS_FOR_R_HAT * math.sqrt(chains / 4.0)
    beyond_noise = max_rhat - 1.0 > 4.0 * rhat_noise(min_ess, chains)
    # under 2 % of the draws effective: not slow mixing that more draws cure (seen: ESS 10 of 2 000 with
    # one chain stuck, R-hat 1.33), while a short healthy run has a far larger fraction
    pathological = min_ess < STUCK_ESS_FRACTION * chains * draws
    if max_rhat > R_HAT_STUCK and (beyond_noise or pathological):
        out.append(f"max R-hat {max_rhat:.3f}: the chains disagree beyond sampling noise at a bulk ESS of {min_ess:.0f} "
                   "(a chain in another mode, or stuck where it diverged); compare the chains in the report before "
                   "adding draws")
    elif (max_rhat > R_HAT_MAX or min_ess < ESS_BULK_MIN) and min_ess < target:
        needed = math.ceil(draws * target / min_ess / 100.0) * 100
        out.append(f"rerun with --draws {needed}: the slowest-mixing variable ({slowest}) has a bulk ESS of {min_ess:.0f} "
                   f"from {chains} x {draws} draws, and max R-hat <= {R_HAT_MAX} becomes likely from a bulk ESS of about {target:.0f}")
    return out


def predictions_table(result: FitResult) -> pd.DataFrame:
    """``ID,TIME,CMT,DV,BLQ,PRED,IPRED,IRES,PIT,LLOQ`` for every observation.

    PRED: the typical subject (posterior-median population parameters, η = 0,
    the subject's own covariates and doses); IPRED: posterior median of the
    individual prediction; IRES = DV − IPRED (empty for censored values, whose DV is
    not a measurement); PIT: fraction of posterior predictive draws at or below DV, in
    sample (the draws saw DV, which pulls PIT towards 0.5; empty for censored values and
    for single-draw methods); LLOQ: the censoring limit of censored values (beyond SPEC §5,
    which has no column for it).
    """
    obs = result.data.observations
    post = result.tree["posterior"]
    ipred = np.median(np.asarray(post["IPRED"]).reshape(-1, len(obs)), axis=0)
    pit = np.full(len(obs), np.nan)
    if "posterior_predictive" in result.tree.children:
        pp = result.tree["posterior_predictive"]
        for output in result.data.outputs:
            rows = np.flatnonzero((obs["output"] == output).to_numpy())
            draws = np.asarray(pp[f"DV_{output}"]).reshape(-1, rows.size)
            if result.data.errors[output] == "log":
                draws = np.exp(draws)
            pit[rows] = (draws <= obs["DV"].to_numpy()[rows]).mean(axis=0)
    censored = obs["censored"].to_numpy()
    pit[censored] = np.nan
    if np.asarray(post["IPRED"]).reshape(-1, len(obs)).shape[0] < 2:  # map: a fraction of one draw is 0 or 1
        pit[:] = np.nan
    return pd.DataFrame({
        "ID": obs["ID"], "TIME": obs["TIME"], "CMT": obs["output"], "DV": obs["DV"],
        "BLQ": obs["censored"].astype(int), "PRED": typical_predictions(result), "IPRED": ipred,
        "IRES": np.where(censored, np.nan, obs["DV"].to_numpy() - ipred), "PIT": pit,
        "LLOQ": np.where(censored, obs["LLOQ"].to_numpy(dtype=float), np.nan),
    })


def typical_predictions(result: FitResult) -> np.ndarray:
    """Predictions of the typical subject (η = 0) at each observation, with the subject's covariates and doses."""
    from itpk.simulate import simulate

    data, post = result.data, result.tree["posterior"]
    typical = {name: float(np.median(np.asarray(post[name]))) for name in data.estimated}
    obs = data.observations
    out = np.empty(len(obs))
    for i, s in enumerate(data.subjects):
        rows = np.flatnonzero((obs["subject"] == i).to_numpy())
        if rows.size == 0:
            continue
        prof = simulate(data.spec, s.schedule, {**typical, **s.covariates}, obs["TIME"].to_numpy()[rows])
        outputs = obs["output"].to_numpy()[rows]
        for name in set(outputs):
            mask = outputs == name
            out[rows[mask]] = prof.outputs[name][0][mask]
    return out


def check_run_target(out: str | Path, inputs: Mapping[str, str | Path | None] | None = None) -> Path:
    """Refuse, before any work, a run directory that could not be written or must not be replaced.

    A run directory is replaced as a whole, so an earlier one may hold only what itpk writes there
    (:data:`RUN_OUTPUTS`), and none of ``inputs`` (description -> path: the dataset, its units file,
    the model file) may lie inside it.

    Raises
    ------
    ItpkError
        If ``out`` is a file, a folder that is not a run directory, a run directory holding other
        files or an input, or in a folder that cannot be made or written.
    """
    target = Path(out)
    if target.exists() and not (target / "run.json").is_file():
        kind = "a folder that is not a run directory" if target.is_dir() else "a file"
        raise ItpkError(f"--out {target} exists and is {kind}; refusing to replace it (give a new path or an earlier run directory)")
    inside = [f"{what} {path}" for what, path in (inputs or {}).items()
              if path is not None and Path(path).exists() and target.resolve() in Path(path).resolve().parents
              and Path(path).resolve() != (target / "model.toml").resolve()]  # the run's own model: written back
    if inside:
        raise ItpkError(f"--out {target}: holds {' and '.join(inside)}, which replacing the run directory would delete; "
                        "give another --out")
    if target.is_dir():
        # hidden names (a killed write's temporary sibling, .DS_Store) are not the user's work
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir()
                         if p.name not in RUN_OUTPUTS and not p.name.startswith("."))
        if foreign:
            raise ItpkError(f"--out {target}: the run directory also holds {', '.join(foreign)}, which replacing it "
                            "would delete; move them out or give another --out")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ItpkError(f"--out {target}: cannot write in {parent} (not a writable folder)")
    return target


def write_run(result: FitResult, out: str | Path, *, command: Sequence[str] = ()) -> Path:
    """Write the run directory of SPEC §5 atomically and return its path."""
    target = check_run_target(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    from itpk.io import _umask, temporary_sibling

    tmp = temporary_sibling(target, directory=True)
    try:
        _write_files(result, tmp, command)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~_umask())
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_in(tmp: Path, target: Path) -> None:
    from itpk.io import replace_directory

    if target.exists() and not (target / "run.json").is_file():
        raise ItpkError(f"{target} exists and is not a run directory; refusing to replace it")
    replace_directory(tmp, target)


def _write_files(result: FitResult, folder: Path, command: Sequence[str]) -> None:
    start = time.perf_counter()
    result.tree.to_netcdf(folder / "posterior.nc")
    summary_table(result).to_csv(folder / "summary.csv", index=False)
    predictions_table(result).to_csv(folder / "predictions.csv", index=False)
    try:
        exposure = exposure_table(result)
    except ItpkError as exc:  # a finished fit is worth more than its exposure table: keep it, say why
        exposure = None
        result = replace(result, warnings=(*result.warnings, f"exposure.csv not written: {exc}"))
    if exposure is not None:
        exposure.to_csv(folder / "exposure.csv", index=False)
    (folder / "model.toml").write_text(result.data.spec.text_toml, encoding="utf-8")
    timings = {**result.timings, "write_s": time.perf_counter() - start}
    (folder / "run.json").write_text(jsontext.dumps(run_record(result, command, timings), indent=2, default=str), encoding="utf-8")


def run_record(result: FitResult, command: Sequence[str], timings: Mapping[str, float]) -> dict[str, Any]:
    """The content of ``run.json``."""
    import hashlib

    from itpk import __version__
    from itpk.units import sidecar_path

    data = result.data
    source = Path(data.dataset.source)
    data_sha = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else None
    sidecar = sidecar_path(source) if source.is_file() else None
    units_sha = hashlib.sha256(sidecar.read_bytes()).hexdigest() if sidecar is not None and sidecar.is_file() else None
    obs = data.observations
    return {
        "format": RUN_FORMAT,
        "itpk_version": __version__,
        "versions": _versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": list(command),
        "model": data.spec.name,
        "model_sha256": data.spec.sha256,
        "data": str(source.resolve()) if source.is_file() else str(source),
        "data_sha256": data_sha,
        "units_sha256": units_sha,  # the units sidecar beside the data (None without one): it changes the numbers too
        "subjects": len(data.subjects),
        "arms": sorted({s.arm for s in data.subjects if s.arm}),
        "observations": {o: int((obs["output"] == o).sum()) for o in data.outputs},
        "censored": {o: int(((obs["output"] == o) & obs["censored"]).sum()) for o in data.outputs},
        "censoring_method": CENSORING_METHOD,
        "units_assumed": bool(data.dataset.units_assumed),
        "typical_covariates": typical_covariates(result),  # exposure.csv's typical subject (model units)
        "units": data.dataset.units.describe(),
        "settings": dict(result.settings),
        "timings_s": dict(timings),
        "diagnostics": diagnostics(result),
        "warnings": list(result.warnings),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("pymc", "pytensor", "arviz", "nutpie", "numpy", "scipy", "pandas", "numba"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def exposure_table(result: FitResult) -> pd.DataFrame | None:
    """SPEC §6 metrics over the posterior of the population (typical) parameters, or None.

    The typical subject (η = 0) at the median covariates of the fitted subjects
    (:func:`typical_covariates`, listed in the ``covariates`` column), at up to
    :data:`EXPOSURE_DRAWS` (nonlinear models: :data:`EXPOSURE_DRAWS_NONLINEAR`) evenly
    thinned draws (``draws`` column); AUCs over ``auc_interval``. Written when the model has an ``it``
    route and a systemic one; the dose is
    the dataset's first dose amount, given once by each route, the ``it`` dose
    into the lesion the dataset's first ``it`` dose injected (``CMT=lesion2``:
    that lesion is the metrics' tumour, :func:`itpk.exposure.roles_at`).
    """
    from itpk.events import Target, regimen
    from itpk.exposure import LOCAL_ROUTES, REFERENCE_ROUTES, compare_routes, summarize
    from itpk.system import resolve

    spec, data = result.data.spec, result.data
    local = next((r for r in LOCAL_ROUTES if r in spec.routes), None)
    ref = next((r for r in REFERENCE_ROUTES if r in spec.routes), None)
    if local != "it" or ref is None or "local" not in spec.exposure:
        return None
    post = result.tree["posterior"]
    draws = {name: np.asarray(post[name]).reshape(-1) for name in data.estimated}
    # ceiling: at most EXPOSURE_DRAWS draws; nonlinear models solve ODEs per draw and search a matching
    # dose for DSF (virus example: 159 s for 1000 draws), so they take fewer
    limit = EXPOSURE_DRAWS if spec.is_linear else EXPOSURE_DRAWS_NONLINEAR
    thin = -(-len(next(iter(draws.values()))) // limit)
    # the typical subject of *this* trial: the model file's covariate defaults may be far from it
    # (a lesion's volume goes with DIAM**3, and G with it)
    covariates = typical_covariates(result)
    values = resolve(spec, {**{k: v[::thin] for k, v in draws.items()}, **covariates})
    dose = float(data.doses.amount[data.doses.valid][0])
    injected = next((t for row in data.doses.target for t in row if t is not None and not t.compartment and t.name == local),
                    Target(local))
    injected = Target(local) if injected.site == spec.routes[local].site else injected
    cmp = compare_routes(spec, values, {local: regimen(injected, dose), ref: regimen(ref, dose)}, dose=dose)
    horizon = next((ex.horizon for ex in cmp.routes.values()), None)
    interval = "[0, inf)" if spec.is_linear or horizon is None else f"[0, {horizon:g}] {spec.time_unit}"
    rows = []
    for name, arr in cmp.metrics[local].items():
        s = summarize(arr, thresholds=(1.0,))
        # one parameter set (map): no interval and no probability, as in summary.csv, not a zero-width one
        s = s if isinstance(s, dict) else {"median": s, "ci_low": math.nan, "ci_high": math.nan, "P(>1)": math.nan}
        rows.append({"metric": name, "route": f"{injected} vs {ref}", "dose": dose, **s, "unit": "1",
                     "covariates": _covariates_used(spec, covariates),
                     "auc_interval": interval, "draws": values.size})
    return pd.DataFrame(rows)


def _covariates_used(spec: Any, trial: Mapping[str, float]) -> str:
    """``DIAM=2.7 cm; DIAM2=2 cm (model file)``: the trial's medians, then the model's defaults."""
    shown = [f"{k}={v:.6g} {spec.covariates[k].unit}" for k, v in trial.items()]
    shown += [f"{k}={c.value:.6g} {c.unit} (model file)" for k, c in spec.covariates.items() if k not in trial]
    return "; ".join(shown)


def recorded_covariates(spec: Any, record: Mapping[str, Any]) -> dict[str, float] | None:
    """A run's ``typical_covariates`` (``run.json``) that ``spec`` declares, or None for a run
    written before session 20, which did not record them."""
    recorded = record.get("typical_covariates")
    if not isinstance(recorded, Mapping):
        return None
    return {name: float(value) for name, value in recorded.items() if name in spec.covariates}


def typical_covariates(result: FitResult) -> dict[str, float]:
    """The median over the fitted subjects (their first-row values, model units) of each model
    covariate the dataset gives; those it lacks keep the model file's value and are left out."""
    data = result.data
    frame = data.dataset.data
    given = [name for name in data.spec.covariates if name in frame.columns and frame[name].notna().any()]
    return {name: float(np.median([s.covariates[name] for s in data.subjects])) for name in given}


EXPOSURE_DRAWS = 1000  # posterior draws (evenly thinned) behind exposure.csv
EXPOSURE_DRAWS_NONLINEAR = 200  # the same for nonlinear models (ODE solves and a dose search per draw)

REQUIRED_FILES = tuple(f for f in RUN_DIRECTORY_FILES if f != "exposure.csv")  # exposure.csv: models with an it route
RUN_OUTPUTS = (*RUN_DIRECTORY_FILES, "report.html")  # what itpk writes in a run directory


def load_run(run_dir: str | Path) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """The model, posterior draws of its population parameters (and omegas), and ``run.json``.

    Raises ItpkError for a missing, incomplete or incompatible run directory.
    """
    import tomllib

    import xarray as xr

    from itpk import __version__
    from itpk.spec import parse_model

    folder = Path(run_dir)
    if folder.exists() and not folder.is_dir():
        raise ItpkError(f"{str(folder)!r} is a file, not a run directory (give the folder `itpk fit --out` wrote)")
    if not folder.is_dir():
        raise ItpkError(f"run directory {str(folder)!r} does not exist")
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise ItpkError(f"run directory {str(folder)!r} is incomplete: missing {', '.join(missing)}")
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ItpkError(f"{folder / 'run.json'}: unreadable ({exc})") from None
    problems = record_problems(record)
    if problems:
        raise problems_error([f"{folder / 'run.json'}: {p}" for p in problems])
    try:
        raw = tomllib.loads((folder / "model.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ItpkError(f"{folder / 'model.toml'}: unreadable ({exc})") from None
    current = "time_unit" in raw
    raw.setdefault("time_unit", "h")  # runs made before time_unit was required (session 19): it defaulted to h then
    spec = parse_model(raw, source=str(folder / "model.toml"))
    # a model.toml swapped or edited after the fit would describe other parameters than the posterior's; the
    # hash is of the parsed model, comparable when this itpk version wrote it
    if current and record.get("itpk_version") == __version__ and record.get("model_sha256") not in (None, spec.sha256):
        raise ItpkError(f"{folder / 'model.toml'}: is not the model this run was fitted with (run.json model_sha256 "
                        "differs): restore it, or fit again")
    try:
        tree = xr.open_datatree(folder / "posterior.nc")
    except Exception as exc:  # noqa: BLE001 - any netCDF/HDF5 failure is a broken run directory
        raise ItpkError(f"{folder / 'posterior.nc'}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    if "posterior" not in tree.children:
        raise ItpkError(f"{folder / 'posterior.nc'}: no posterior group; the run directory is incomplete")
    post = tree["posterior"]
    draws = {name: np.asarray(post[name]).reshape(-1) for name in post.data_vars
             if name in spec.parameters or str(name).startswith("omega_")}
    return spec, draws, record


# the keys of run.json that commands read, and the JSON type each must have
RECORD_TYPES: dict[str, tuple[type, ...]] = {"diagnostics": (dict,), "settings": (dict,), "warnings": (list,),
                                             "typical_covariates": (dict,), "units": (dict, list, str),
                                             "observations": (dict,), "censored": (dict,), "arms": (list,),
                                             "command": (list,), "timings_s": (dict,), "versions": (dict,)}


def record_problems(record: Any) -> list[str]:
    """What makes a parsed run.json unusable (a hand edit, another tool's file), one line each."""
    if not isinstance(record, dict):
        return [f"found a JSON {type(record).__name__}; allowed: an object (the run record itpk fit writes)"]
    problems = []
    if record.get("format") != RUN_FORMAT:
        problems.append(f"format: found {record.get('format')!r}; allowed: {RUN_FORMAT} (the run format this itpk reads)")
    for key, types in RECORD_TYPES.items():
        if key in record and record[key] is not None and not isinstance(record[key], types):
            allowed = " or ".join({dict: "an object", list: "a list", str: "a string"}[t] for t in types)
            problems.append(f"{key}: found {json.dumps(record[key])[:60]}; allowed: {allowed}")
    numbers = {"typical_covariates": record.get("typical_covariates"), "observations": record.get("observations"),
               "censored": record.get("censored")}
    for key, table in numbers.items():
        if isinstance(table, dict):
            problems += [f"{key}.{name}: found {json.dumps(v)[:40]}; allowed: a number" for name, v in table.items()
                         if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)]
    diagnostics = record.get("diagnostics")
    if isinstance(diagnostics, dict):
        problems += [f"diagnostics.{key}: found {json.dumps(diagnostics[key])[:40]}; allowed: a list"
                     for key in ("reasons", "advice") if key in diagnostics and not isinstance(diagnostics[key], list)]
    return problems


def posterior_values(spec: Any, draws: Mapping[str, np.ndarray], *, overrides: Mapping[str, float] | None = None,
                     max_draws: int = 4000) -> dict[str, np.ndarray]:
    """Population-parameter draws (thinned to at most ``max_draws``) for exposure metrics."""
    from itpk.population import estimated_problems

    raise_problems(estimated_problems(spec, draws, overrides or {}))
    typical = {k: v for k, v in draws.items() if k in spec.parameters}
    n = len(next(iter(typical.values())))
    thin = max(1, -(-n // max_draws))
    values = {k: v[::thin] for k, v in typical.items()}
    for name, value in (overrides or {}).items():
        values[name] = np.full(len(next(iter(values.values()))), value)
    return values
