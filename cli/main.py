"""The ``itpk`` command line: a thin shell over the library.

Each command parses options, calls one library verb, prints, and exits.
Heavy libraries (numpy, scipy, pandas, pymc) are imported inside commands so
that ``itpk --help`` is instant. Bad input of any kind (an :class:`ItpkError`)
prints one message and exits 1, never a traceback.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from itpk import jsontext
from itpk.cli.edge import user_errors
from itpk.interrupts import terminate_gently

app = typer.Typer(
    name="itpk",
    help="Intratumoral-immunotherapy dose and pharmacokinetics modeller.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _every_command() -> None:
    # kill, scancel and SLURM's time limit send SIGTERM: clean up as for Ctrl-C (exit 143)
    terminate_gently()


models_app = typer.Typer(help="The model library: list models, show one.", no_args_is_help=True)
app.add_typer(models_app, name="models")

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def silenced(quiet: bool) -> Iterator[None]:
    """With ``--quiet``, no Python warnings from the libraries underneath (numpy, PyMC...): what a
    user must know is in the command's own output files (``run.json`` warnings)."""
    if not quiet:
        yield
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _parse_sets(pairs: list[str], problems: list[str], *, option: str = "--set",
                example: str = "--set CL=2.5") -> dict[str, float]:
    """``NAME=VALUE`` pairs to a dict; every malformed pair is added to ``problems`` (reported with the
    command's other problems)."""
    out: dict[str, float] = {}
    for pair in pairs:
        raw, sep, value = pair.partition("=")
        name = raw.strip()
        try:
            if not sep or not name:
                raise ValueError
            number = float(value)
        except ValueError:
            problems.append(f"{option} {pair!r}: expected NAME=NUMBER (e.g. {example})")
            continue
        if name in out and out[name] != number:  # which one was meant is the user's to say
            problems.append(f"{option} {name}: given twice ({out[name]:g} and {number:g}); give it once")
        out[name] = number
    return out


def _parse_times(text: str | None, problems: list[str]) -> list[float] | None:
    if text is None:
        return None
    try:
        times = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        problems.append(f"--at {text!r}: expected comma-separated numbers, e.g. --at 0,0.5,1,2,4")
        return None
    if not times:
        problems.append(f"--at {text!r}: no times given")
        return None
    return times


def _parse_errors(items: list[str], problems: list[str]) -> dict[str, str]:
    """``OUTPUT=MODEL`` pairs of ``--error``; every malformed one is added to ``problems``."""
    errors = {}
    for item in items:
        raw, sep, text = item.partition("=")
        name, kind = raw.strip(), text.strip()
        if not sep or not name:
            problems.append(f"--error {item!r}: expected OUTPUT=MODEL (e.g. --error plasma=additive)")
        elif name in errors and errors[name] != kind:
            problems.append(f"--error {name}: given twice ({errors[name]} and {kind}); give it once")
        else:
            errors[name] = kind
    return errors


@models_app.command("list")
def models_list() -> None:
    """The model library, one row per model: name, agent, routes, outputs, description."""
    from itpk.spec import builtin_models, load_model

    from itpk.describe import describe_library

    with user_errors():
        rows = [load_model(name) for name in builtin_models()]
    typer.echo(describe_library(rows))


@models_app.command("show")
def models_show(model: Annotated[str, typer.Argument(help="Built-in model name or path to a .toml file.")]) -> None:
    """Compartments, flows/ODEs, routes, outputs and parameters (value, unit, prior, source)."""
    from itpk.describe import describe_model
    from itpk.spec import load_model

    with user_errors():
        typer.echo(describe_model(load_model(model)))


@app.command()
def simulate(
    model: Annotated[str, typer.Argument(help="Built-in model name or path to a .toml file.")],
    out: Annotated[Path, typer.Option(help="Output CSV (long: ID,TIME,OUTPUT,VALUE,UNIT).")],
    route: Annotated[str | None, typer.Option(help="Route of the dose (it, ia, iv, sc, po; the model's routes).")] = None,
    dose: Annotated[float | None, typer.Option(help="Amount per dose, in the receiving compartment's amount unit (see `itpk models show`).")] = None,
    cmt: Annotated[str | None, typer.Option(help="The lesion the route injects, one of its sites (e.g. --route it --cmt lesion2; see `itpk models show`). Default: the route's own.")] = None,
    regimen: Annotated[str | None, typer.Option(help="Named regimen instead of --dose/--every: tvec (label volumes by --diam, 1e6 then 1e8 PFU/mL, day 0, 21, then every 14 d).")] = None,
    diam: Annotated[float | None, typer.Option(help="Longest diameter (cm) of the injected lesion for --regimen; also sets its size covariate (DIAM; DIAM2 with --cmt lesion2) unless --set gives it.")] = None,
    every: Annotated[float | None, typer.Option(help="Dosing interval, model time unit (h for the built-in models).")] = None,
    doses: Annotated[int | None, typer.Option(help="Number of doses (visits with --regimen; default 1, or 6 visits).")] = None,
    infusion: Annotated[float | None, typer.Option(help="Infusion duration, model time unit (h for the built-in models); bolus if omitted.")] = None,
    horizon: Annotated[float | None, typer.Option(help="Last output time, model time unit; default: last dose + one interval, at least 24 (h for the built-in models).")] = None,
    step: Annotated[float | None, typer.Option(help="Output grid step, model time unit; default horizon/240.")] = None,
    at: Annotated[str | None, typer.Option(help="Explicit output times, comma-separated, model time unit; replaces --step/--horizon.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a parameter or covariate: NAME=VALUE (repeatable).")] = None,
    subjects: Annotated[int, typer.Option(help="Virtual population size drawn from the model's IIV (1 = typical subject).")] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed of the virtual population draw.")] = None,
    posterior: Annotated[Path | None, typer.Option(help="Run directory of `itpk fit`: parameters from its posterior (with --subjects N: N subjects, each a posterior draw with its own IIV; else the typical subject at up to 500 draws).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also write a figure (linear and log axes); its format by suffix: .png, .pdf, .svg, .jpg, ….")] = None,
    quiet: Annotated[bool, typer.Option(help="Print nothing on success.")] = False,
) -> None:
    """Concentration-time profiles of a regimen (a virtual population with --subjects)."""
    from itpk.workflows import run_simulation

    problems: list[str] = []  # every problem of the options, reported together by run_simulation
    overrides = _parse_sets(set_ or [], problems)
    times = _parse_times(at, problems)
    with user_errors(), silenced(quiet):
        result = run_simulation(
            model,
            route=route,
            dose=dose,
            site=cmt,
            regimen_name=regimen,
            diam=diam,
            every=every,
            doses=doses,
            infusion=infusion,
            horizon=horizon,
            step=step,
            at=times,
            overrides=overrides,
            subjects=subjects,
            seed=seed,
            posterior=posterior,
            out=out,
            plot=plot,
            progress=not quiet,
            problems=problems,
        )
    if not quiet:
        typer.echo(result.message)


@app.command()
def compare(
    model: Annotated[str, typer.Argument(help="Built-in model name or path to a .toml file.")],
    dose: Annotated[float | None, typer.Option(help="Amount per dose, in the receiving compartment's amount unit (see `itpk models show`: mg for the antibody models, PFU for the virus).")] = None,
    routes: Annotated[str, typer.Option(help="Routes to compare, comma-separated; metrics compare it (or ia) with iv (or sc).")] = "it,iv",
    cmt: Annotated[str | None, typer.Option(help="The lesion it (or ia) injects, one of the route's sites (e.g. lesion2): the metrics' tumour. Default: the route's own.")] = None,
    regimen: Annotated[str | None, typer.Option(help="Named regimen instead of --dose/--every: tvec.")] = None,
    diam: Annotated[float | None, typer.Option(help="Longest diameter (cm) of the injected lesion for --regimen; also sets its size covariate (DIAM; DIAM2 with --cmt lesion2) unless --set gives it.")] = None,
    every: Annotated[float | None, typer.Option(help="Dosing interval, model time unit (h for the built-in models).")] = None,
    doses: Annotated[int | None, typer.Option(help="Number of doses (visits with --regimen; default 1, or 6 visits).")] = None,
    infusion: Annotated[float | None, typer.Option(help="IV infusion duration, model time unit (h for the built-in models); other routes are injections.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a parameter or covariate: NAME=VALUE (repeatable).")] = None,
    target: Annotated[list[str] | None, typer.Option(help="OUTPUT=CONC: report the time above this concentration (output unit).")] = None,
    threshold: Annotated[list[float] | None, typer.Option(help="Report P(metric > x) when comparing a population/posterior (repeatable).")] = None,
    horizon: Annotated[float | None, typer.Option(help="Window, model time unit. Linear models: bounds the peak search and time above target (default: peaks within last dose + 10 slowest half-lives; AUC and time above target over [0, inf)). Nonlinear models: AUC, peaks and time above target over [0, horizon] (default: last dose + 30 days).")] = None,
    posterior: Annotated[Path | None, typer.Option(help="Run directory of a fit: metrics over its posterior (median, 95% CrI, P(>x)).")] = None,
    out: Annotated[Path | None, typer.Option(help="CSV: one row per route quantity or metric.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the SPEC §4 JSON document on stdout.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Figure of tumour and plasma profiles for each route; its format by suffix: .png, .pdf, .svg, .jpg, ….")] = None,
    quiet: Annotated[bool, typer.Option(help="Print nothing on success (except --json).")] = False,
) -> None:
    """Intratumoral vs systemic exposure: AUC/Cmax/Tmax per route and the local-gain metrics."""

    from itpk.workflows import run_comparison

    problems: list[str] = []  # every problem of the options, reported together by run_comparison
    overrides = _parse_sets(set_ or [], problems)
    targets = _parse_sets(target or [], problems, option="--target", example="--target tumor=0.5")
    with user_errors(), silenced(quiet):
        result = run_comparison(
            model,
            dose=dose,
            routes=[r.strip() for r in routes.split(",") if r.strip()],
            site=cmt,
            regimen_name=regimen,
            diam=diam,
            every=every,
            doses=doses,
            infusion=infusion,
            overrides=overrides,
            targets=targets,
            thresholds=threshold or (),
            horizon=horizon,
            posterior=posterior,
            out=out,
            plot=plot,
            problems=problems,
        )
    if json_:
        typer.echo(jsontext.dumps(result.report, indent=2))
    elif not quiet:
        typer.echo(result.message)


@app.command()
def fit(
    data: Annotated[Path, typer.Argument(help="Dataset (NONMEM-style CSV, SPEC §2).")],
    model: Annotated[str, typer.Option(help="Built-in model name or path to a .toml file.")],
    out: Annotated[Path, typer.Option(help="Run directory to write (replaced atomically).")],
    method: Annotated[str, typer.Option(help="nuts (nutpie, default), pymc (PyMC's NUTS), laplace (random effects integrated out; quick), map, advi.")] = "nuts",
    draws: Annotated[int, typer.Option(help="Posterior draws per chain.")] = 1000,
    tune: Annotated[int, typer.Option(help="Tuning draws per chain.")] = 1000,
    chains: Annotated[int, typer.Option(help="Chains.")] = 4,
    cores: Annotated[int | None, typer.Option(help="Threads running the chains (default: one per chain, sharing the CPUs; --method pymc: processes, min(chains, CPUs)).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random step.")] = None,
    error: Annotated[list[str] | None, typer.Option(help="Residual error per output, OUTPUT=MODEL (additive, proportional, combined, log).")] = None,
    target_accept: Annotated[float, typer.Option(help="NUTS target acceptance rate; raise it (e.g. 0.95) when a fit reports divergences.")] = 0.9,
    mass_matrix: Annotated[str, typer.Option(help="NUTS mass matrix adapted during warm-up: auto (diag; low-rank for a nonlinear model with --precondition none), diag, low-rank.")] = "auto",
    iiv: Annotated[str, typer.Option(help="Parametrisation of the between-subject effects: auto (centred where each subject's data pin its value down, see itpk.parametrisation), centred, non-centred, or PARAM=centred|non-centred[,...].")] = "auto",
    precondition: Annotated[str, typer.Option(help="NUTS coordinates: mode (whitened at the posterior mode: a dense initial metric), none, auto (mode for nonlinear models, none for linear).")] = "auto",
    strict: Annotated[bool, typer.Option(help="Exit 3 when the diagnostics fail (R-hat > 1.01, bulk ESS < 400, divergences).")] = False,
    quiet: Annotated[bool, typer.Option(help="Print nothing on success.")] = False,
) -> None:
    """Hierarchical Bayesian fit of a model to trial data; writes the run directory."""
    from itpk.workflows import run_fit

    problems: list[str] = []  # every problem of the options, reported together by run_fit
    errors = _parse_errors(error or [], problems)
    with user_errors(), silenced(quiet):
        result = run_fit(data, model=model, out=out, method=method, draws=draws, tune=tune, chains=chains,
                         cores=cores, seed=seed, errors=errors, target_accept=target_accept,
                         mass_matrix=mass_matrix, iiv=iiv, precondition=precondition, progress=not quiet and sys.stderr.isatty(),
                         command=sys.argv, problems=problems)
    if not quiet:
        typer.echo(result.message)
    if strict and result.diagnostics["passed"] is False:
        raise typer.Exit(code=3)


from itpk.cli.batch import batch_command
from itpk.cli.data import data_app, nca_command
from itpk.cli.report import report_command

app.add_typer(data_app, name="data")
app.command("nca")(nca_command)
app.command("report")(report_command)
app.command("batch")(batch_command)


def main() -> None:
    """The console entry point: the app, with SIGTERM's exit code where Typer made it 130.

    A command handles SIGTERM like Ctrl-C (``terminate_gently``); one that arrives while a command
    imports its libraries, before its own handling, reaches Typer, which exits 130 for any
    ``KeyboardInterrupt`` and says nothing.
    """
    from itpk.cli.edge import stopped_by
    from itpk.interrupts import exit_code, sigterm_received

    try:
        app()
    except SystemExit as exc:
        if exc.code == exit_code(signal.SIGINT) and sigterm_received():
            raise SystemExit(stopped_by(signal.SIGTERM)) from None
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
