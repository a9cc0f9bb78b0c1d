"""Benchmark: ``itpk.inference.fit`` against hand-written PyMC models of the same hierarchy, on Theoph.

Engines, all on ``data/theoph.csv`` (12 subjects, 132 concentrations including the pre-dose
samples), same seed, 4 chains x (1000 tune + 1000 draws) unless said otherwise:

(a) ``fit(load_model("one_cpt_oral"), read_dataset(theoph), seed=S)`` with its defaults (nutpie,
    the model file's ``combined`` error); also once with ``errors={"plasma": "additive"}``.
(b) The same model written by hand in PyMC with the closed-form one-compartment first-order-
    absorption solution, sampled with nutpie: the expert's best baseline. Same priors (read from
    models/one_cpt_oral.toml), same non-centred log-normal IIV (``log_X ~ Normal(log median,
    sigma)``, ``omega_X ~ HalfNormal(1)``, ``z_X ~ N(0, 1)`` per subject), same residual error model
    and same observations. The script checks that its log-density equals itpk's at a common point.
(c) The same hand-written model sampled with PyMC's own NUTS (``pm.sample(nuts_sampler="pymc")``,
    cores=2). Note: under PyMC 6 a bare ``pm.sample()`` dispatches to nutpie whenever the default
    pytensor mode is numba, so ``nuts_sampler="pymc"`` is needed to get PyMC's sampler.
(d) The same model with ``pymc.ode.DifferentialEquation`` (one 2-state ODE Op per subject, forward
    sensitivities by scipy ``odeint``), PyMC NUTS. Time-boxed: one gradient is timed through
    ``model.compile_dlogp()``. A from-scratch 2 x (50 tune + 50 draws) run needs ~15,000 leapfrog
    steps per chain (counted on the closed form with the same sampler and seed: 50 tuning steps
    leave the adaptation poor), i.e. ~15 min per chain, so the measured run starts both chains
    from (c)'s adaptation (mass matrix, step size, last draws; no tuning, which favours (d)) and
    samples up to 200 draws under a wall-clock cap (``--ode-budget``, default 240 s); the ESS/s of
    what finished is reported, next to a projection of (c)'s whole run at (d)'s gradient cost
    (same sampler, same posterior, only the gradient cost differs).

Plus (a) for ``it_antibody`` on ``data/example_it_vs_iv.csv`` (4 chains x 500 + 500).

Timing conventions (all ``time.perf_counter`` wall-clock, imports excluded):

- cold: a fresh Python process with empty pytensor (``base_compiledir``) and numba
  (``NUMBA_CACHE_DIR``) caches, one run (this script re-invoked with ``--worker``);
- disk-warm: another fresh process reusing the caches the cold run left (what a second
  ``itpk fit`` from the command line costs); ``--disk-warm-runs`` (default 3) interleaved (a), (b)
  pairs, the median pair's ratio reported with every pair's;
- first in process / warm: the first run of the engine in this (main) process, which uses the
  default caches as found, then two more; "warm" is the faster of runs 2 and 3 (same seed, so the
  draws are identical and only the timings differ). Runs 2 and 3 of (a) fit the same model to the
  same data, so itpk reuses the sampler it compiled in run 1 (``itpk.inference._compiled``); "new
  data" runs (a) and (b) once more on Theoph with every DV × 1.0001, where both compile again.
- contention: CPU time used by *other* processes during each timed run (/proc/stat busy time
  minus this process's and its children's CPU), printed so a noisy run can be recognised.
- sampling: time inside the sampler only (itpk: ``timings["sampling_s"]``, which excludes
  nutpie's compilation; PyMC NUTS: the
  ``sampling_time`` PyMC records, which excludes its logp compilation).
- ESS/s = min ESS_bulk over (ka, CL, V, omega_ka, omega_CL, omega_V) / sampling time.

Usage::

    python benchmarks/bench_fit.py              # full run (about 10 min on 2 cores)
    python benchmarks/bench_fit.py --quick      # smoke test (about 2 min)
    python benchmarks/bench_fit.py --json out.json --no-profile

When a target is missed the full run ends with a profile of (a) against (b) (``--no-profile``
skips it, ``--profile`` forces it): per-gradient cost, compile and predictive splits, and one
what-if, the textbook closed form in place of itpk's inside itpk's own graph (monkey-patched in this
process only; library files are not touched).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THEOPH = ROOT / "data" / "theoph.csv"
IT_DATA = ROOT / "data" / "example_it_vs_iv.csv"
VIRUS_DATA = ROOT / "data" / "example_virus.csv"
REFERENCE_B_SAMPLING_S = 1.9  # the issue's figure for baseline (b)'s sampling on its 2-core machine
REFERENCE_VIRUS_GRADIENT_MS = 4.5  # one virus gradient at the initial point, session 14 (where the fit took 601 s)
ORAL_TOML = ROOT / "models" / "one_cpt_oral.toml"
PUBLISHED = {"ka": 1.593, "CL": 2.752, "V": 31.81}  # nlmixr2 FOCEi, additive error (data/README.md)
KEY = ("ka", "CL", "V", "omega_ka", "omega_CL", "omega_V")
TARGETS = {"wall": 1.25, "pymc": 2.0, "ode": 1000.0}
T = time.perf_counter


# --------------------------------------------------------------------------------------
# Data and hand-written models (independent of itpk)
# --------------------------------------------------------------------------------------


def theoph_arrays(dv_scale: float = 1.0) -> dict:
    """Theoph as arrays, read with pandas only: every EVID 0 row is an observation (DV × dv_scale)."""
    import pandas as pd

    df = pd.read_csv(THEOPH)
    doses = df[df["EVID"] == 1]
    obs = df[df["EVID"] == 0]
    ids = list(pd.unique(df["ID"]))
    if doses["ID"].duplicated().any():
        raise SystemExit("theoph.csv: the closed form here assumes one dose per subject")
    amount = doses.set_index("ID")["AMT"].astype(float)
    dose_time = doses.set_index("ID")["TIME"].astype(float)
    index = {sid: i for i, sid in enumerate(ids)}
    tau = obs["TIME"].to_numpy(float) - dose_time.loc[obs["ID"]].to_numpy()
    if np.any(tau < 0):
        raise SystemExit("theoph.csv: an observation before the dose")
    return {
        "ids": ids,
        "subject": obs["ID"].map(index).to_numpy(np.int64),
        "tau": tau,
        "dv": obs["DV"].to_numpy(float) * dv_scale,
        "amount": amount.loc[ids].to_numpy(),
    }


def oral_priors() -> dict:
    with open(ORAL_TOML, "rb") as fh:
        params = tomllib.load(fh)["parameters"]
    return {n: (params[n]["prior"]["median"], params[n]["prior"]["sigma"]) for n in ("ka", "CL", "V")}


def _hierarchy(pm, pt, priors):
    """Typical values, omegas and z in itpk's order and names; returns individual (ka, CL, V)."""
    individual = {}
    for name in ("ka", "CL", "V"):
        median, sigma = priors[name]
        log_typ = pm.Normal(f"log_{name}", mu=math.log(median), sigma=sigma)
        pm.Deterministic(name, pt.exp(log_typ))
        omega = pm.HalfNormal(f"omega_{name}", sigma=1.0)
        z = pm.Normal(f"z_{name}", 0.0, 1.0, dims="subject")
        individual[name] = pt.exp(log_typ + omega * z)
    return individual["ka"], individual["CL"], individual["V"]


def _residual(pm, pt, d, conc, error):
    scale = float(np.median(np.abs(d["dv"])))  # itpk: HalfNormal(median |DV|) for the additive SD
    if error == "combined":
        add = pm.HalfNormal("sigma_add_plasma", sigma=scale)
        prop = pm.HalfNormal("sigma_prop_plasma", sigma=0.5)
        sd = pt.sqrt(add**2 + (prop * conc) ** 2)
    elif error == "additive":
        sd = pm.HalfNormal("sigma_plasma", sigma=scale)
    else:
        raise ValueError(error)
    pm.Normal("DV_plasma", mu=conc, sigma=sd, observed=d["dv"])


def hand_model(d: dict, priors: dict, error: str = "combined"):
    """(b)/(c): closed form C = F·D·ka/(V(ka − k))·(e^{−kτ} − e^{−kaτ}), k = CL/V, F = 1."""
    import pymc as pm
    import pytensor.tensor as pt

    s = d["subject"]
    with pm.Model(coords={"subject": d["ids"]}) as model:
        ka, CL, V = _hierarchy(pm, pt, priors)
        ka, V, k = ka[s], V[s], (CL / V)[s]
        conc = d["amount"][s] * ka / (V * (ka - k)) * (pt.exp(-k * d["tau"]) - pt.exp(-ka * d["tau"]))
        _residual(pm, pt, d, conc, error)
    return model


def _oral_rhs(y, t, p):
    return [-p[0] * y[0], p[0] * y[0] - p[1] * y[1]]


def ode_model(d: dict, priors: dict, error: str = "combined"):
    """(d): depot/central amounts by pymc.ode (one Op per subject); C = central / V; 0 at τ = 0."""
    import pymc as pm
    import pytensor.tensor as pt
    from pymc.ode import DifferentialEquation

    s = d["subject"]
    if np.any(np.diff(s) < 0):
        raise SystemExit("ode_model expects observations grouped by subject")
    with pm.Model(coords={"subject": d["ids"]}) as model:
        ka, CL, V = _hierarchy(pm, pt, priors)
        k = CL / V
        parts = []
        for i in range(len(d["ids"])):
            rows = np.flatnonzero(s == i)
            tau = d["tau"][rows]
            after = np.flatnonzero(tau > 0)  # odeint needs times after t0; at τ = 0 the depot dose gives C = 0
            ode = DifferentialEquation(func=_oral_rhs, times=tau[after], n_states=2, n_theta=2, t0=0.0)
            sol = ode(y0=[float(d["amount"][i]), 0.0], theta=pt.stack([ka[i], k[i]]))
            parts.append(pt.set_subtensor(pt.zeros(len(rows))[after], sol[:, 1] / V[i]))
        _residual(pm, pt, d, pt.concatenate(parts), error)
    return model


# --------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------


def diagnostics(tree, free_names=None) -> dict:
    import arviz as az

    post = tree["posterior"]
    n_draws = int(post.sizes["draw"]) * int(post.sizes["chain"])
    out = {"draws_total": n_draws}
    if int(post.sizes["draw"]) < 4:
        return out
    ess = az.ess(tree, var_names=list(KEY), method="bulk")
    rhat = az.rhat(tree, var_names=list(KEY))
    out["ess"] = {k: float(ess[k].min()) for k in KEY}
    out["min_ess"] = min(out["ess"].values())
    out["max_rhat_key"] = max(float(rhat[k].max()) for k in KEY)
    if free_names:
        r_all = az.rhat(tree, var_names=free_names)
        out["max_rhat_all"] = max(float(r_all[k].max()) for k in free_names)
    out["median"] = {k: float(post[k].median()) for k in ("ka", "CL", "V")}
    stats = tree["sample_stats"]
    for name in ("n_steps", "tree_size"):
        if name in stats:
            out["n_steps_mean"] = float(stats[name].mean())
            break
    if "diverging" in stats:
        out["divergences"] = int(stats["diverging"].sum())
    return out


def _free_names(model) -> list[str]:
    return [v.name for v in model.free_RVs]


# --------------------------------------------------------------------------------------
# Engines: each returns a JSON-able dict
# --------------------------------------------------------------------------------------


def run_itpk(model_name: str, data_path: Path, seed: int, draws: int, tune: int, chains: int, errors=None,
             iiv: str = "auto", precondition: str = "auto", save: Path | None = None) -> dict:
    from itpk import load_model
    from itpk.dataset import read_dataset
    from itpk.inference import build_model, fit

    spec = load_model(model_name)
    start = T()
    ds = read_dataset(data_path, spec)
    read_s = T() - start
    start = T()
    result = fit(spec, ds, draws=draws, tune=tune, chains=chains, seed=seed, errors=errors, iiv=iiv,
                 precondition=precondition)
    wall = T() - start
    if save is not None:  # the fit's tree, e.g. for benchmarks/posterior_geometry.py
        result.tree.to_netcdf(save)
    tm = dict(result.timings)
    model, _ = build_model(spec, ds, errors=errors, iiv=result.settings["iiv"])  # only for the free-variable names
    out = {
        "wall": wall,
        "read_s": read_s,
        "build": tm["build_s"],
        "compile": tm["compile_s"],
        "sampling": tm["sampling_s"],  # fit() already excludes compilation
        "sampling_s_reported": tm["sampling_s"],
        "extras": tm["predictive_s"],
        "precondition_s": tm.get("precondition_s", 0.0),  # mode search and Hessian (the pilot is sampling)
        "precondition": result.settings.get("precondition"),
        "mass_matrix": result.settings.get("mass_matrix"),
        "cores": result.settings["cores"],
        "errors": dict(result.settings["errors"]),
    }
    if model_name == "one_cpt_oral":
        out.update(diagnostics(result.tree, _free_names(model)))
    else:
        import arviz as az

        names = _free_names(model)
        rhat = az.rhat(result.tree, var_names=names)
        per = {k: float(rhat[k].max()) for k in names}
        out["max_rhat_all"] = max(per.values())
        out["max_rhat_population"] = max(v for k, v in per.items() if not k.startswith("z_") and not k.endswith("_i"))
        out["rhat_worst"] = max(per, key=per.get)
        ess = az.ess(result.tree, var_names=names, method="bulk")
        out["min_ess_all"] = min(float(ess[k].min()) for k in names)
        out["divergences"] = int(result.tree["sample_stats"]["diverging"].sum())
    return out


def run_hand_nutpie(seed: int, draws: int, tune: int, chains: int, error: str = "combined", extras: bool = False,
                    target_accept: float | None = None, dv_scale: float = 1.0) -> dict:
    import nutpie

    d, priors = theoph_arrays(dv_scale), oral_priors()
    start = T()
    model = hand_model(d, priors, error)
    build = T() - start
    start = T()
    compiled = nutpie.compile_pymc_model(model)
    compile_s = T() - start
    cores = min(chains, _cores())
    start = T()
    kw = {} if target_accept is None else {"target_accept": target_accept}
    tree = nutpie.sample(compiled, draws=draws, tune=tune, chains=chains, cores=cores, seed=seed, progress_bar=False, **kw)
    sampling = T() - start
    out = {"build": build, "compile": compile_s, "sampling": sampling, "cores": cores, "target_accept": target_accept}
    out["wall"] = build + compile_s + sampling
    if extras:  # the groups itpk's fit adds, computed the same way
        out["extras"] = _extras(tree, model, seed)
    out.update(diagnostics(tree, _free_names(model)))
    return out


def _extras(tree, model, seed: int) -> float:
    import pymc as pm

    start = T()
    tree = pm.compute_log_likelihood(tree, model=model, progressbar=False)
    pm.sample_posterior_predictive(tree, model=model, random_seed=seed, progressbar=False)
    pm.sample_prior_predictive(draws=200, model=model, random_seed=seed)
    return T() - start


def run_hand_pymc(seed: int, draws: int, tune: int, chains: int, keep_tree: bool = False) -> dict:
    import pymc as pm

    d, priors = theoph_arrays(), oral_priors()
    start = T()
    model = hand_model(d, priors)
    build = T() - start
    cores = min(chains, _cores())
    start = T()
    tree = pm.sample(draws=draws, tune=tune, chains=chains, cores=cores, random_seed=seed, model=model,
                     nuts_sampler="pymc", progressbar=False, compute_convergence_checks=False,
                     discard_tuned_samples=False)
    call = T() - start
    sampling = float(tree["posterior"].attrs["sampling_time"])
    out = {"build": build, "compile": call - sampling, "sampling": sampling, "cores": cores, "wall": build + call}
    out.update(diagnostics(tree, _free_names(model)))
    out["library"] = tree["posterior"].attrs.get("inference_library")
    steps = [float(tree[g]["n_steps"].sum()) for g in ("warmup_sample_stats", "sample_stats") if g in tree.children]
    out["leapfrogs_total"] = sum(steps)
    if keep_tree:
        out["_tree"] = tree
    return out


class Others:
    """CPU seconds used by *other* processes between start and stop: busy time of the whole machine
    (/proc/stat) minus this process's and its reaped children's CPU time (os.times)."""

    @staticmethod
    def _busy() -> float:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return float("nan")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _mine() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __init__(self):
        self.busy, self.mine, self.wall = self._busy(), self._mine(), T()

    def stop(self) -> dict:
        busy, mine, wall = self._busy() - self.busy, self._mine() - self.mine, T() - self.wall
        return {"others_cpu_s": max(0.0, busy - mine), "own_cpu_s": mine, "span_s": wall}


def timed(fn, *a, **kw) -> dict:
    meter = Others()
    out = fn(*a, **kw)
    out["contention"] = meter.stop()
    return out


def time_call(fn, arg, min_time: float = 1.0, min_calls: int = 3) -> float:
    fn(arg)
    n, start = 0, T()
    while n < min_calls or T() - start < min_time:
        fn(arg)
        n += 1
    return (T() - start) / n


def _leapfrogs_per_chain(tree) -> np.ndarray:
    groups = [g for g in ("warmup_sample_stats", "sample_stats") if g in tree.children]
    return sum(tree[g]["n_steps"].values.sum(axis=1) for g in groups)


def _adaptation(tree, model) -> tuple[np.ndarray, float, list[dict]]:
    """Diagonal mass matrix (posterior variance of the unconstrained values), step size and the
    last draw of each chain, from a PyMC NUTS run of a model with the same variables."""
    post = tree["posterior"]
    var = []
    for value in model.value_vars:
        name = model.values_to_rvs[value].name
        x = post[name].values
        x = np.log(x) if value.name.endswith("_log__") else x
        var.append(x.reshape(x.shape[0] * x.shape[1], -1).var(axis=0))
    step = float(np.mean(tree["sample_stats"]["step_size"].values[:, -1]))
    starts = [{rv.name: post[rv.name].values[c, -1] for rv in model.free_RVs} for c in range(post.sizes["chain"])]
    return np.concatenate(var), step, starts


def run_ode(seed: int, draws: int, chains: int, budget: float, c_tree, scratch: int) -> dict:
    """(d): gradient cost; leapfrogs a from-scratch ``scratch`` + ``scratch`` run would need (counted on
    the closed form, same sampler and seed); then ``draws`` post-warmup draws per chain under a
    wall-clock cap, starting from (c)'s adaptation (mass matrix, step size, last draws): no tuning,
    which favours (d)."""
    import warnings

    import pymc as pm
    from pymc.step_methods.hmc.quadpotential import QuadPotentialDiag

    d, priors = theoph_arrays(), oral_priors()
    start = T()
    model = ode_model(d, priors)
    build = T() - start
    cores = min(chains, _cores())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numba will use object mode")
        start = T()
        dlogp = model.compile_dlogp()
        logp = model.compile_logp()
        compile_s = T() - start
        point = model.initial_point()
        grad_s = time_call(dlogp, point, min_time=2.0)
        closed_model = hand_model(d, priors)
        logp_diff = abs(float(logp(point)) - float(closed_model.compile_logp()(point)))

        probe = pm.sample(draws=scratch, tune=scratch, chains=chains, cores=cores, random_seed=seed, model=closed_model,
                          nuts_sampler="pymc", progressbar=False, compute_convergence_checks=False,
                          discard_tuned_samples=False)
        scratch_leapfrogs = _leapfrogs_per_chain(probe)

        var, step_size, starts = _adaptation(c_tree, model)
        began = T()

        def cap(trace, draw):
            if T() - began > budget:
                raise KeyboardInterrupt

        with model:
            step = pm.NUTS(potential=QuadPotentialDiag(var), step_scale=step_size * var.size**0.25)
        start = T()
        tree = pm.sample(draws=draws, tune=0, chains=chains, cores=cores, random_seed=seed, model=model, step=step,
                         initvals=starts[:chains], nuts_sampler="pymc", progressbar=False,
                         compute_convergence_checks=False, callback=cap)
        call = T() - start
    out = {
        "build": build, "compile": compile_s, "grad_s": grad_s, "logp_abs_diff_vs_closed_form": logp_diff,
        "scratch": scratch, "scratch_leapfrogs_per_chain": [float(x) for x in scratch_leapfrogs],
        "scratch_estimate_s": float(np.max(scratch_leapfrogs)) * grad_s * math.ceil(chains / cores),
        "step_size": step_size, "sample_call": call, "cores": cores, "budget": budget, "capped": call > budget,
        "chains": chains, "draws_asked": draws,
    }
    if "posterior" in tree.children:
        post = tree["posterior"]
        attrs_time = post.attrs.get("sampling_time")
        out["sampling"] = float(attrs_time) if attrs_time is not None else call
        out["draws_done"] = int(post.sizes["draw"])
        out.update(diagnostics(tree))
        out["leapfrogs_per_chain"] = [float(x) for x in _leapfrogs_per_chain(tree)]
    else:
        out["sampling"], out["draws_done"] = call, 0
    out["wall"] = build + compile_s + call
    return out


def grad_seconds_python(model) -> float:
    """One log-density gradient through ``model.compile_dlogp()`` (a Python call, as (d) is timed)."""
    f = model.compile_dlogp()
    return time_call(f, model.initial_point(), min_time=1.0)


def _fit_target_accept() -> float | None:
    """The target acceptance rate ``itpk.inference.fit`` passes to nutpie (None if it has no such option)."""
    from itpk.inference import fit

    p = inspect.signature(fit).parameters.get("target_accept")
    return None if p is None else p.default


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# --------------------------------------------------------------------------------------
# Worker mode (cold / disk-warm runs in a fresh process)
# --------------------------------------------------------------------------------------


def worker(engine: str, args: argparse.Namespace) -> dict:
    start = T()
    import nutpie  # noqa: F401
    import pymc  # noqa: F401


    imports = T() - start
    if engine == "a":
        out = run_itpk("one_cpt_oral", THEOPH, args.seed, args.draws, args.tune, args.chains)
    elif engine == "b":
        out = run_hand_nutpie(args.seed, args.draws, args.tune, args.chains)
    elif engine == "c":
        out = run_hand_pymc(args.seed, args.draws, args.tune, args.chains)
    else:
        raise SystemExit(f"unknown engine {engine}")
    out["imports"] = imports
    return out


def spawn_worker(engine: str, cache: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTENSOR_FLAGS"] = ",".join(filter(None, [env.get("PYTENSOR_FLAGS", ""), f"base_compiledir={cache / 'pytensor'}"]))
    env["NUMBA_CACHE_DIR"] = str(cache / "numba")
    out_json = cache / f"result_{engine}_{time.time_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--json", str(out_json),
           "--seed", str(args.seed), "--draws", str(args.draws), "--tune", str(args.tune), "--chains", str(args.chains)]
    start = T()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {engine} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(out_json.read_text())
    out["process"] = T() - start
    return out


# --------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------


def machine() -> dict:
    import arviz
    import numba
    import nutpie
    import pymc
    import pytensor
    import scipy

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "itpk"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        rev, dirty = "?", ""
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": _cores(), "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__, "pymc": pymc.__version__,
        "pytensor": pytensor.__version__, "nutpie": nutpie.__version__, "numba": numba.__version__,
        "arviz": arviz.__version__, "pytensor_mode": type(pytensor.compile.mode.get_default_mode().linker).__name__,
        "git": rev + (" (itpk/ has uncommitted changes)" if dirty else " (itpk/ clean)"),
        "load_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------------------
# Profile of (a) against (b): measured in this process, library files untouched
# --------------------------------------------------------------------------------------


def _grad_us_numba(compiled, model) -> float:
    """µs per log-density + gradient call of nutpie's compiled function, looped inside numba."""
    import numba

    fn = compiled.logp_func.vm.jit_fn
    point = model.initial_point()
    x = np.concatenate([np.ravel(point[v.name]) for v in model.value_vars]).astype(float)

    @numba.njit
    def loop(f, x, n):
        acc = 0.0
        for _ in range(n):
            acc += np.sum(f(x)[0])
        return acc

    loop(fn, x, 10)
    n = 50_000
    start = T()
    loop(fn, x, n)
    return (T() - start) / n * 1e6


def _closed_form_predict(pt, spec, data, env, backend):
    """The textbook closed form in place of itpk's (no ka = k branch), inside itpk's own graph (what-if 1)."""
    d = data.doses
    if d.time.shape[1] != 1:
        raise SystemExit("closed-form what-if: one dose per subject only")
    obs = data.observations
    s = obs["subject"].to_numpy()
    tau = obs["TIME"].to_numpy(float) - d.time[s, 0]
    amount = d.amount[s, 0]
    ka, V = env["ka"][s], env["V"][s]
    k = env["CL"][s] / V
    return amount * ka / (V * (ka - k)) * (pt.exp(-k * tau) - pt.exp(-ka * tau))


def profile(args: argparse.Namespace) -> dict:
    import nutpie

    import itpk.inference as inf
    from itpk import load_model
    from itpk.dataset import read_dataset

    spec = load_model("one_cpt_oral")
    ds = read_dataset(THEOPH, spec)
    d, priors = theoph_arrays(), oral_priors()
    seed, draws, tune, chains = args.seed, args.draws, args.tune, args.chains
    cores = min(chains, _cores())
    ta = _fit_target_accept()
    kw_a = {} if ta is None else {"target_accept": ta}
    jitter = lambda m: {v for v in m.free_RVs if v.name.startswith(("omega_", "sigma_"))}
    free = lambda m: [v.name for v in m.free_RVs]  # what fit() stores (itpk.deterministics does the rest)
    prof: dict = {}

    def sample(compiled, **kw):
        start = T()
        tree = nutpie.sample(compiled, draws=draws, tune=tune, chains=chains, cores=cores, seed=seed, progress_bar=False, **kw)
        return T() - start, tree

    def compile_fresh(build, itpk_model=True, **kw):
        """nutpie compile of a freshly built model (as every fit() call does): fastest of calls 2 and 3."""
        times = []
        for _ in range(3):
            model = build()
            extra = {"jitter_rvs": jitter(model)} if itpk_model else {}
            start = T()
            compiled = nutpie.compile_pymc_model(model, **extra, **kw)
            times.append(T() - start)
        return min(times[1:]), compiled, model

    build_a = lambda: inf.build_model(spec, ds)[0]
    names = free(build_a())

    # 1. the fit() pipeline of (a), step by step (second pass)
    for _ in range(2):
        row = {}
        start = T()
        model, data = inf.build_model(spec, ds)
        row["build_model"] = T() - start
        start = T()
        inf._check_initial_point(model, data)
        row["check_initial_point"] = T() - start
        start = T()
        compiled = nutpie.compile_pymc_model(model, jitter_rvs=jitter(model), var_names=free(model))
        row["nutpie_compile"] = T() - start
        row["sampling"], tree = sample(compiled, **kw_a)
        start = T()
        inf._complete(tree, model, data, seed)
        row["log_likelihood_and_predictive"] = T() - start
    prof["a_steps"] = row
    prof["a_n_steps"] = float(tree["sample_stats"]["n_steps"].mean())
    prof["a_compile"], a_compiled, a_model = compile_fresh(build_a, var_names=names)
    prof["a_grad_us"] = _grad_us_numba(a_compiled, a_model)
    prof["a_compile_all_deterministics"], _, _ = compile_fresh(build_a)
    prof["b_compile"], b_compiled, b_model = compile_fresh(lambda: hand_model(d, priors), itpk_model=False)
    prof["b_grad_us"] = _grad_us_numba(b_compiled, b_model)
    probe = {k: v + 0.05 for k, v in a_model.initial_point().items()}
    base = float(a_model.compile_logp()(probe))

    # 2. what-if 1: itpk's graph with the textbook closed form (no Taylor branch for ka ~ k, no
    #    eigenvalue ordering) instead of itpk's; then the whole fit() so
    original_predict = inf._predict
    inf._predict = _closed_form_predict
    try:
        prof["cf_compile"], cf_compiled, cf_model = compile_fresh(build_a)
        prof["cf_grad_us"] = _grad_us_numba(cf_compiled, cf_model)
        prof["cf_sampling"], _ = sample(cf_compiled, **kw_a)
        prof["cf_logp_diff"] = abs(float(cf_model.compile_logp()(probe)) - base)
        calls = []
        for _ in range(3):
            start = T()
            cf_fit = inf.fit(spec, ds, draws=draws, tune=tune, chains=chains, seed=seed)
            calls.append((T() - start, dict(cf_fit.timings)))
        prof["cf_fit_wall"], prof["cf_fit_timings"] = min(calls[1:], key=lambda c: c[0])
    finally:
        inf._predict = original_predict

    return prof


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def report_engine(label: str, r: dict) -> None:
    ess = r.get("min_ess")
    sps = ess / r["sampling"] if ess and r["sampling"] > 0 else None
    r["ess_per_s"] = sps
    print(f"  {label}")
    print(f"    build {fmt(r['build'])} s | compile {fmt(r['compile'])} s | sampling {fmt(r['sampling'])} s"
          + (f" | extras (log-lik + post. & prior predictive) {fmt(r['extras'])} s" if "extras" in r else "")
          + f" | wall {fmt(r['wall'])} s")
    if ess is not None:
        print(f"    min ESS_bulk {ess:.0f} (" + ", ".join(f"{k} {v:.0f}" for k, v in r["ess"].items()) + f") | ESS/s {fmt(sps, 1)}"
              + f" | max R-hat {fmt(r['max_rhat_key'], 3)} (key), {fmt(r.get('max_rhat_all'), 3)} (all free)"
              + f" | mean leapfrogs/draw {fmt(r.get('n_steps_mean'), 1)} | divergences {r.get('divergences', '-')}")


def run_virus(args: argparse.Namespace) -> None:
    """--virus: wall, ESS, R-hat of the nonlinear (stiff) virus fit, and the cost of one gradient."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from itpk import odeop

    if args.virus_rtol is not None:  # what ode_predict(..., rtol=...) in itpk.inference would do
        odeop.ode_predict.__kwdefaults__["rtol"] = args.virus_rtol
    draws, tune, chains = args.draws or 500, 500 if args.tune is None else args.tune, args.chains or 4
    from itpk import load_model
    from itpk.dataset import read_dataset
    from itpk.inference import build_model

    spec = load_model("it_oncolytic_virus")
    model, _ = build_model(spec, read_dataset(VIRUS_DATA, spec))
    dlogp = model.compile_dlogp()
    point = model.initial_point()
    dlogp(point)
    grad_ms = time_call(dlogp, point) * 1e3
    system = odeop.OdeSystem.from_spec(spec)
    print(f"== it_oncolytic_virus on {VIRUS_DATA.name}: {chains} chains x ({tune} tune + {draws} draws), seed {args.seed}, iiv {args.virus_iiv}")
    print(f"  ODE method {system.method!r} -> rosenbrock if typical rate {system.typical_rate:.2f}/h x horizon > "
          f"{odeop.STIFF_THRESHOLD:g}; rtol {args.virus_rtol or 'default'}; one gradient (compile_dlogp) {grad_ms:.1f} ms")
    # the machine's speed. Baseline (b), the hand-written Theoph model with nutpie (4 x (1000 + 1000)),
    # was timed by the issue at ~1.9 s of sampling; but it measures nutpie's own loop more than compiled
    # numerics (session 20: 1.31 s here, where LSODA loops and this gradient ran ~3x slower than on
    # session 14's machine). The fit's wall scales with the cost of its gradient, so the wall is also
    # printed scaled by this gradient against session 14's (the machine of the 601 s figure).
    calibration = run_hand_nutpie(args.seed, 1000, 1000, 4)["sampling"]
    speed = grad_ms / REFERENCE_VIRUS_GRADIENT_MS
    print(f"  machine: baseline (b) sampled in {calibration:.2f} s (issue: {REFERENCE_B_SAMPLING_S} s); one virus "
          f"gradient {grad_ms:.1f} ms against {REFERENCE_VIRUS_GRADIENT_MS} ms on session 14's machine -> {speed:.2f}x its time")
    r = timed(run_itpk, "it_oncolytic_virus", VIRUS_DATA, args.seed, draws, tune, chains, iiv=args.virus_iiv,
              precondition=args.virus_precondition, save=args.virus_save)
    pre = r["precondition"] or {}
    print(f"  precondition {pre.get('method')} (mode search {pre.get('gradients', 0)} gradients, "
          f"{fmt(r['precondition_s'])} s; pilot {pre.get('pilot_gradients', 0)} gradients); mass matrix {r['mass_matrix']}")
    print(f"  wall {fmt(r['wall'])} s (build {fmt(r['build'])}, compile {fmt(r['compile'])}, precondition "
          f"{fmt(r['precondition_s'])}, sampling {fmt(r['sampling'])}, "
          f"extras {fmt(r['extras'])}); min ESS_bulk {r['min_ess_all']:.0f} -> ESS/s {r['min_ess_all'] / r['sampling']:.2f}; "
          f"max R-hat {fmt(r['max_rhat_population'], 3)} (population), {fmt(r['max_rhat_all'], 3)} (all free, worst "
          f"{r['rhat_worst']}); divergences {r['divergences']}; other processes' CPU {r['contention']['others_cpu_s']:.0f} s")
    print(f"  wall on session 14's machine (scaled by the gradient, {speed:.2f}): ~{r['wall'] / speed:.0f} s against the "
          "target of 600 s")
    if args.json:
        args.json.write_text(json.dumps({"virus": r, "grad_ms": grad_ms, "baseline_b_sampling_s": calibration},
                                        indent=1, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: short chains, no cold runs, short ODE box")
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--draws", type=int, default=None)
    parser.add_argument("--tune", type=int, default=None)
    parser.add_argument("--chains", type=int, default=None)
    parser.add_argument("--ode-budget", type=float, default=None, help="wall-clock cap (s) of the ODE sampling")
    parser.add_argument("--cold", dest="cold", action="store_true", default=None, help="run the cold/disk-warm workers")
    parser.add_argument("--no-cold", dest="cold", action="store_false")
    parser.add_argument("--disk-warm-runs", type=int, default=3,
                        help="disk-warm (a)/(b) pairs of fresh processes (odd, >= 1); the median pair's ratio is reported")
    parser.add_argument("--profile", dest="profile", action="store_true", default=None)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--worker", choices=("a", "b", "c"), help=argparse.SUPPRESS)
    parser.add_argument("--virus", action="store_true",
                        help="only the stiff it_oncolytic_virus fit on data/example_virus.csv (4 x 500 + 500 by default)")
    parser.add_argument("--virus-iiv", default="auto",
                        help="with --virus: fit(iiv=...): auto, centred, non-centred or PARAM=KIND,...")
    parser.add_argument("--virus-save", type=Path, default=None,
                        help="with --virus: write the fit's tree (netCDF) here, for benchmarks/posterior_geometry.py")
    parser.add_argument("--virus-precondition", default="auto", choices=("auto", "mode", "none"),
                        help="with --virus: fit(precondition=...): mode (whitened, the default for ODE models) or none")
    parser.add_argument("--virus-rtol", type=float, default=None,
                        help="with --virus: the ODE Op's rtol (default: ode_predict's own for the chosen method)")
    args = parser.parse_args()
    if args.virus:
        run_virus(args)
        return
    q = args.quick
    args.draws = args.draws or (100 if q else 1000)
    args.tune = args.tune if args.tune is not None else (100 if q else 1000)
    args.chains = args.chains or (2 if q else 4)
    args.ode_budget = args.ode_budget or (30.0 if q else 240.0)
    cold = (not q) if args.cold is None else args.cold

    if args.disk_warm_runs < 1 or args.disk_warm_runs % 2 == 0:
        parser.error(f"--disk-warm-runs must be odd and >= 1 (a median pair), found {args.disk_warm_runs}")
    if args.worker:
        out = worker(args.worker, args)
        args.json.write_text(json.dumps(out))
        return

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    total_start = T()
    overall = Others()
    start = T()
    import nutpie  # noqa: F401
    import pymc  # noqa: F401

    import itpk.inference  # noqa: F401

    imports = T() - start
    logging.getLogger("pymc").setLevel(logging.ERROR)  # after the import: PyMC sets its own level
    info = machine()
    res: dict = {"machine": info, "settings": {"seed": args.seed, "draws": args.draws, "tune": args.tune,
                                              "chains": args.chains, "quick": q}, "imports_s": imports}
    print("== itpk fit benchmark (Theoph, one_cpt_oral)")
    print(f"machine: {info['cpu']}, {info['logical_cores']} logical cores ({info['usable_cores']} usable), {info['os']}")
    print(f"software: Python {info['python']}, numpy {info['numpy']}, scipy {info['scipy']}, pymc {info['pymc']}, "
          f"pytensor {info['pytensor']} (default linker {info['pytensor_mode']}), nutpie {info['nutpie']}, numba {info['numba']}, "
          f"arviz {info['arviz']}; itpk git {info['git']}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in info['load_start'])}; imports {imports:.1f} s (not counted)")
    print(f"settings: seed {args.seed}, {args.chains} chains x ({args.tune} tune + {args.draws} draws), "
          f"cores = min(chains, {_cores()})" + (" [--quick]" if q else ""))

    # same data and same model?
    from itpk import load_model
    from itpk.dataset import read_dataset
    from itpk.inference import build_model, prepare

    d, priors = theoph_arrays(), oral_priors()
    spec = load_model("one_cpt_oral")
    ds = read_dataset(THEOPH, spec)
    fd = prepare(spec, ds)
    same_data = (np.array_equal(fd.observations["DV"].to_numpy(float), d["dv"])
                 and np.array_equal(fd.observations["TIME"].to_numpy(float), d["tau"]))
    itpk_model, _ = build_model(spec, ds)
    point = itpk_model.initial_point()
    point = {k: v + 0.05 for k, v in point.items()}  # off the prior medians
    lp_itpk = float(itpk_model.compile_logp()(point))
    lp_hand = float(hand_model(d, priors).compile_logp()(point))
    print(f"check: same {len(d['dv'])} observations as itpk's FitData (incl. {int(np.sum(d['tau'] == 0))} pre-dose): {same_data}; "
          f"log-density at a common point: itpk {lp_itpk:.9f}, hand-written {lp_hand:.9f} (|diff| {abs(lp_itpk - lp_hand):.1e})")
    res["check"] = {"same_data": bool(same_data), "logp_itpk": lp_itpk, "logp_hand": lp_hand}

    # cold and disk-warm, each in a fresh process
    if cold:
        print("\n-- cold (fresh process, empty pytensor + numba caches) and disk-warm (fresh process, caches from the cold run)")
        root = Path(tempfile.mkdtemp(prefix="bench_fit_"))
        res["cold"], res["disk_warm"] = {}, {}
        for engine in ("a", "b", "c"):
            res["cold"][engine] = timed(spawn_worker, engine, root / engine, args)
        # disk-warm pairs, (a) then (b), repeated: one fresh process moves by ±0.1 in the ratio
        # (page cache, thread start-up), so the ratio of each pair is kept and the median pair reported
        pairs = [{engine: timed(spawn_worker, engine, root / engine, args) for engine in ("a", "b")}
                 for _ in range(args.disk_warm_runs)]
        ratios_dw = [pair["a"]["wall"] / pair["b"]["wall"] for pair in pairs]
        median_pair = pairs[int(np.argsort(ratios_dw)[len(ratios_dw) // 2])]
        res["disk_warm"] = median_pair
        res["disk_warm_ratios"] = ratios_dw
        for engine, label in (("a", "(a) itpk fit"), ("b", "(b) hand + nutpie"), ("c", "(c) hand + PyMC NUTS")):
            r = res["cold"][engine]
            line = (f"  {label:22s} cold: wall {fmt(r['wall'])} s (build {fmt(r['build'])}, compile {fmt(r['compile'])}, "
                    f"sampling {fmt(r['sampling'])}" + (f", extras {fmt(r['extras'])}" if "extras" in r else "") + ")")
            if engine in res["disk_warm"]:
                w = res["disk_warm"][engine]
                line += (f"; disk-warm: wall {fmt(w['wall'])} s (build {fmt(w['build'])}, compile {fmt(w['compile'])}, "
                         f"sampling {fmt(w['sampling'])}" + (f", extras {fmt(w['extras'])}" if "extras" in w else "") + ")")
            others = [x["contention"]["others_cpu_s"] for x in (r, res["disk_warm"].get(engine)) if x]
            print(line + f"; other processes' CPU {', '.join(f'{x:.1f}' for x in others)} s")
        import shutil

        shutil.rmtree(root, ignore_errors=True)

    # side by side in this process: first run, then warm (second) run of each engine
    print("\n-- in this process: run 1 (first in process, default caches as found) then run 2 (warm)")
    runs = {"a": [], "b": [], "c": []}
    n_runs = 2 if q else 3
    for _ in range(n_runs):
        runs["a"].append(timed(run_itpk, "one_cpt_oral", THEOPH, args.seed, args.draws, args.tune, args.chains))
        runs["b"].append(timed(run_hand_nutpie, args.seed, args.draws, args.tune, args.chains, extras=True))
        runs["c"].append(timed(run_hand_pymc, args.seed, args.draws, args.tune, args.chains, keep_tree=True))
    best = {k: min(range(1, n_runs), key=lambda i, k=k: v[i]["wall"]) for k, v in runs.items()}
    c_tree = runs["c"][best["c"]]["_tree"]
    for r in runs["c"]:
        r.pop("_tree")
    res["first"] = {k: v[0] for k, v in runs.items()}
    res["warm"] = {k: v[best[k]] for k, v in runs.items()}
    res["warm_runs"] = {k: [r["wall"] for r in v[1:]] for k, v in runs.items()}
    print(f"   warm = the faster of runs 2..{n_runs} by wall time; ESS and draws are identical across runs (same seed)")
    for key, label in (("a", "(a) itpk fit (nutpie, combined error)"), ("b", "(b) hand-written closed form + nutpie"),
                       ("c", "(c) hand-written closed form + PyMC NUTS")):
        f = res["first"][key]
        print(f"  first run: wall {fmt(f['wall'])} s (compile {fmt(f['compile'])} s); warm runs' walls "
              + ", ".join(fmt(x) for x in res["warm_runs"][key]) + " s; other processes' CPU during the warm run "
              f"{res['warm'][key]['contention']['others_cpu_s']:.1f} s over {res['warm'][key]['contention']['span_s']:.1f} s")
        report_engine(label + " [warm]", res["warm"][key])
    w = res["warm"]
    # runs 2 and 3 of (a) reuse the compiled sampler of run 1 (itpk.inference._compiled: same model, same
    # data); a new dataset in the same process compiles again: Theoph with every DV x 1.0001
    with tempfile.TemporaryDirectory() as tmp:
        import pandas as pd

        frame = pd.read_csv(THEOPH)
        frame["DV"] = pd.to_numeric(frame["DV"], errors="coerce") * 1.0001
        changed = Path(tmp) / "theoph_dv_x1.0001.csv"
        frame.to_csv(changed, index=False)
        for unit_file in THEOPH.parent.glob(THEOPH.stem + ".units.toml"):
            (Path(tmp) / (changed.stem + ".units.toml")).write_text(unit_file.read_text())
        res["warm_new_data"] = timed(run_itpk, "one_cpt_oral", changed, args.seed, args.draws, args.tune, args.chains)
    report_engine("(a) itpk fit, new data (DV x 1.0001: the compiled-sampler cache misses) [warm process]", res["warm_new_data"])
    # (b) on the same new data: its observations are constants of its graph too, so it compiles again
    res["warm_new_data_b"] = timed(run_hand_nutpie, args.seed, args.draws, args.tune, args.chains, dv_scale=1.0001)
    report_engine("(b) hand-written, new data (DV x 1.0001) [warm process]", res["warm_new_data_b"])
    # (b)'s wall is build + compile + sample, as an expert would run it; its extras are timed apart
    w["b"]["wall_with_extras"] = w["b"]["wall"] + w["b"]["extras"]

    a_add = run_itpk("one_cpt_oral", THEOPH, args.seed, args.draws, args.tune, args.chains, errors={"plasma": "additive"})
    b_add = run_hand_nutpie(args.seed, args.draws, args.tune, args.chains, error="additive")
    res["additive"] = {"a": a_add, "b": b_add}
    report_engine("(a) itpk fit, errors={'plasma': 'additive'} [first compile of this graph, warm process]", a_add)
    report_engine("(b) hand-written, additive [first compile of this graph, warm process]", b_add)
    print(f"    (a)/(b) sampling ESS/s, additive: {fmt(b_add['ess_per_s'] and a_add['ess_per_s'] / b_add['ess_per_s'], 2)}")
    ta = _fit_target_accept()
    if ta is not None:
        b_ta = run_hand_nutpie(args.seed, args.draws, args.tune, args.chains, target_accept=ta)
        res["b_target_accept"] = b_ta
        report_engine(f"(b) hand-written, combined, nutpie target_accept={ta} as itpk's fit uses [second compile of this graph]", b_ta)

    # (d) ODE, time-boxed
    print("\n-- (d) pymc.ode.DifferentialEquation + PyMC NUTS (time-boxed)")
    ode_chains, ode_draws, scratch = (1, 10, 10) if q else (2, 200, 50)
    od = timed(run_ode, args.seed, ode_draws, ode_chains, args.ode_budget, c_tree, scratch)
    res["ode"] = od
    grad_b = grad_seconds_python(hand_model(d, priors))
    grad_a = grad_seconds_python(itpk_model)
    res["grad_python_s"] = {"a": grad_a, "b": grad_b, "d": od["grad_s"]}
    print(f"  one gradient via model.compile_dlogp() (Python call): (d) ODE {od['grad_s'] * 1e3:.1f} ms, "
          f"(b)/(c) closed form {grad_b * 1e6:.1f} µs, (a) itpk graph {grad_a * 1e6:.1f} µs "
          f"-> (d) costs {od['grad_s'] / grad_a:,.0f}x (a)'s gradient")
    print(f"  ODE vs closed-form log-density at the initial point: |diff| {od['logp_abs_diff_vs_closed_form']:.1e}")
    lf = od["scratch_leapfrogs_per_chain"]
    print(f"  from scratch, {ode_chains} chain(s) x ({scratch} tune + {scratch} draws) takes {', '.join(f'{x:.0f}' for x in lf)} "
          f"leapfrog steps per chain (counted on the closed form, same sampler and seed) -> about "
          f"{od['scratch_estimate_s'] / 60:.0f} min at (d)'s gradient cost, beyond the {od['budget']:.0f} s cap; so instead:")
    print(f"  measured: {ode_chains} chain(s) started from (c)'s adaptation (diagonal mass matrix = (c)'s posterior variance, "
          f"step size {od['step_size']:.3f}, last draws), no tuning, up to {ode_draws} draws, cap {od['budget']:.0f} s: "
          f"{'stopped by the cap' if od['capped'] else 'finished'} after {fmt(od['sample_call'], 1)} s with "
          f"{od['draws_done']} draws per chain")
    if od.get("min_ess") is not None:
        od["ess_per_s"] = od["min_ess"] / od["sampling"]
        print(f"    min ESS_bulk {od['min_ess']:.1f} over {od['draws_total']} draws in {fmt(od['sampling'], 1)} s of sampling "
              f"-> ESS/s {od['ess_per_s']:.3f} (short chains: ESS is rough; max R-hat {fmt(od['max_rhat_key'], 2)}; "
              f"mean leapfrogs/draw {fmt(od.get('n_steps_mean'), 1)})")
    else:
        od["ess_per_s"] = None
        print("    too few draws finished for an ESS")
    c = w["c"]
    c_workers = c["cores"]
    projected_time = c["leapfrogs_total"] * od["grad_s"] / c_workers + c["sampling"]
    od["projected_sampling_s"] = projected_time
    od["projected_ess_per_s"] = c["min_ess"] / projected_time
    print(f"  projection: (c)'s whole run ({c['leapfrogs_total']:.0f} leapfrog steps incl. tuning, {c_workers} workers) at "
          f"(d)'s gradient cost -> {projected_time / 3600:.1f} h of sampling for ESS {c['min_ess']:.0f} -> ESS/s "
          f"{od['projected_ess_per_s']:.3f}")

    # it_antibody
    print("\n-- (a) it_antibody on data/example_it_vs_iv.csv")
    it_chains, it_n = (2, 50) if q else (4, 500)
    it = timed(run_itpk, "it_antibody", IT_DATA, args.seed, it_n, it_n, it_chains)
    res["it_antibody"] = it
    print(f"  {it_chains} chains x ({it_n} tune + {it_n} draws), first run of this model in the process: wall {fmt(it['wall'])} s "
          f"(build {fmt(it['build'])}, compile {fmt(it['compile'])}, sampling {fmt(it['sampling'])}, extras {fmt(it['extras'])}); "
          f"max R-hat {fmt(it['max_rhat_population'], 3)} (population parameters), {fmt(it['max_rhat_all'], 3)} "
          f"(all free, worst {it['rhat_worst']}); min ESS_bulk {it['min_ess_all']:.0f}; divergences {it['divergences']}")

    # summary
    a, b = w["a"], w["b"]
    ratios = {
        "wall_warm": a["wall"] / b["wall"],
        "wall_warm_no_extras": (a["wall"] - a["extras"]) / b["wall"],
        "wall_warm_new_data": res["warm_new_data"]["wall"] / res["warm_new_data_b"]["wall"],
        "wall_warm_equal_work": a["wall"] / b["wall_with_extras"],
        "pymc_ess_s": a["ess_per_s"] / c["ess_per_s"],
        "ode_ess_s_measured": (a["ess_per_s"] / od["ess_per_s"]) if od["ess_per_s"] else None,
        "ode_ess_s_projected": a["ess_per_s"] / od["projected_ess_per_s"],
        "nutpie_ess_s_a_over_b": a["ess_per_s"] / b["ess_per_s"],
    }
    if cold:
        ratios["wall_cold"] = res["cold"]["a"]["wall"] / res["cold"]["b"]["wall"]
        ratios["wall_disk_warm"] = res["disk_warm"]["a"]["wall"] / res["disk_warm"]["b"]["wall"]  # the median pair
    res["ratios"] = ratios

    def verdict(value, target, higher):
        if value is None:
            return "n/a"
        ok = value >= target if higher else value <= target
        return "met" if ok else "MISSED"

    print("\n== summary")
    print(f"  (a)/(b) wall, warm (second run in process): {ratios['wall_warm']:.2f}  [target <= {TARGETS['wall']}: "
          f"{verdict(ratios['wall_warm'], TARGETS['wall'], False)}]   (a) {a['wall']:.2f} s vs (b) {b['wall']:.2f} s")
    print(f"      a new dataset in the same process (both compile again): {ratios['wall_warm_new_data']:.2f}  "
          f"[{verdict(ratios['wall_warm_new_data'], TARGETS['wall'], False)}]   (a) {res['warm_new_data']['wall']:.2f} s "
          f"vs (b) {res['warm_new_data_b']['wall']:.2f} s")
    print(f"      without itpk's extras (log-lik, predictive): {ratios['wall_warm_no_extras']:.2f}; "
          f"against (b) doing the same extras: {ratios['wall_warm_equal_work']:.2f}")
    if cold:
        print(f"  (a)/(b) wall, cold: {ratios['wall_cold']:.2f}  [{verdict(ratios['wall_cold'], TARGETS['wall'], False)}]   "
              f"(a) {res['cold']['a']['wall']:.1f} s vs (b) {res['cold']['b']['wall']:.1f} s;  disk-warm: "
              f"{ratios['wall_disk_warm']:.2f}  [{verdict(ratios['wall_disk_warm'], TARGETS['wall'], False)}] "
              f"((a) {res['disk_warm']['a']['wall']:.1f} s vs (b) {res['disk_warm']['b']['wall']:.1f} s: the median of "
              f"{len(res['disk_warm_ratios'])} interleaved pairs, ratios {', '.join(f'{x:.2f}' for x in res['disk_warm_ratios'])})")
    print(f"  (a) vs (c) sampling ESS/s: {ratios['pymc_ess_s']:.2f}x  [target >= {TARGETS['pymc']}: "
          f"{verdict(ratios['pymc_ess_s'], TARGETS['pymc'], True)}]   {a['ess_per_s']:.0f} vs {c['ess_per_s']:.0f} ESS/s")
    print(f"  (a) vs (d) ESS/s: measured {fmt(ratios['ode_ess_s_measured'], 0)}x, projected {ratios['ode_ess_s_projected']:,.0f}x  "
          f"[target >= {TARGETS['ode']:.0f}: measured {verdict(ratios['ode_ess_s_measured'], TARGETS['ode'], True)}, "
          f"projected {verdict(ratios['ode_ess_s_projected'], TARGETS['ode'], True)}]")
    print(f"  (a)/(b) sampling ESS/s (both nutpie): {ratios['nutpie_ess_s_a_over_b']:.2f}")
    print("  posterior medians           ka      CL      V")
    print(f"    nlmixr2 FOCEi (additive) {PUBLISHED['ka']:6.3f} {PUBLISHED['CL']:7.3f} {PUBLISHED['V']:7.2f}")
    for label, r in (("(a) itpk, combined", a), ("(b) hand, combined", b), ("(c) PyMC NUTS, comb.", c),
                     ("(a) itpk, additive", a_add), ("(b) hand, additive", b_add)):
        m = r["median"]
        print(f"    {label:24s} {m['ka']:6.3f} {m['CL']:7.3f} {m['V']:7.2f}")
    missed = any(verdict(v, TARGETS[t], h) == "MISSED" for v, t, h in (
        (ratios["wall_warm"], "wall", False), (ratios["pymc_ess_s"], "pymc", True), (ratios["ode_ess_s_projected"], "ode", True)))
    do_profile = args.profile if args.profile is not None else (missed and not q)
    if do_profile:
        print("\n== profile of (a) against (b) (warm, this process; what-ifs monkey-patched here only)")
        prof = profile(args)
        res["profile"] = prof
        s = prof["a_steps"]
        print("  fit() pipeline of (a), second pass, split: " + ", ".join(f"{k} {v:.2f} s" for k, v in s.items()))
        print(f"  log-density + gradient, nutpie's compiled function looped in numba: (a) {prof['a_grad_us']:.1f} µs, "
              f"(b) {prof['b_grad_us']:.1f} µs ({prof['a_grad_us'] / prof['b_grad_us']:.1f}x); mean leapfrogs/draw "
              f"(a) {prof['a_n_steps']:.1f}, (b) {fmt(b.get('n_steps_mean'), 1)}")
        print(f"  nutpie compile of a freshly built model (fastest of 2nd/3rd): (a) {prof['a_compile']:.2f} s; (a) with every "
              f"deterministic in nutpie's expand function (before session 11) {prof['a_compile_all_deterministics']:.2f} s; "
              f"(b) {prof['b_compile']:.2f} s")
        t = prof["cf_fit_timings"]
        print(f"  what-if 1, itpk's graph with the textbook closed form instead of itpk's: compile {prof['cf_compile']:.2f} s, "
              f"gradient {prof['cf_grad_us']:.1f} µs, sampling {prof['cf_sampling']:.2f} s, log-density |diff| {prof['cf_logp_diff']:.1e}")
        print(f"    whole fit() so (fastest of 2nd/3rd call): wall {prof['cf_fit_wall']:.2f} s (build {t['build_s']:.2f}, "
              f"compile {t['compile_s']:.2f}, sampling {t['sampling_s']:.2f}, extras {t['predictive_s']:.2f}) "
              f"-> (a)/(b) wall {prof['cf_fit_wall'] / b['wall']:.2f}")
    res["load_end"] = os.getloadavg()
    res["total_s"] = T() - total_start
    res["contention"] = overall.stop()
    # (d)'s sampler processes, stopped by the cap, are not reaped by PyMC: their CPU shows up as "others"
    others = res["contention"]["others_cpu_s"] - res["ode"]["contention"]["others_cpu_s"]
    span = res["total_s"] - res["ode"]["contention"]["span_s"]
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in res['load_end'])}; total {res['total_s'] / 60:.1f} min; "
          f"CPU used by other processes outside (d): {others:.0f} s ({others / span:.0%} of one core on average)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
