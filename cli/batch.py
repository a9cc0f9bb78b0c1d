"""CLI command ``itpk batch PIPELINE.toml`` (SPEC.md §4, §7).

Thin: read the pipeline (:func:`itpk.batch.load_pipeline`), run it
(:func:`itpk.batch.run_batch`), print, exit 0 / 1 (bad pipeline or options) /
4 (some job failed) / 130 (Ctrl-C) / 143 (SIGTERM). Register with::

    app.command("batch")(batch_command)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

PipelineArg = Annotated[Path, typer.Argument(help="Pipeline file (TOML, SPEC §7): tables defaults, grid, jobs, cluster.",
                                             show_default=False)]
OutOpt = Annotated[Path | None, typer.Option(help="Batch directory (default: the pipeline's name beside it).",
                                             show_default=False)]
SchedulerOpt = Annotated[str | None, typer.Option(help="local (a local cluster of processes), tcp://HOST:PORT (an "
                                                       "existing Dask scheduler) or slurm (dask-jobqueue, the "
                                                       "pipeline's cluster table); default: the cluster table's "
                                                       "scheduler, else local.",
                                                  show_default=False)]
WorkersOpt = Annotated[int | None, typer.Option(help="Workers (one core each); default: the available cores "
                                                            "(local) or one SLURM job's processes.", show_default=False)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Keep jobs whose outputs are complete and verified; run only the rest.")]
RetriesOpt = Annotated[int, typer.Option(help="Further attempts for a job whose worker died.")]
LogOpt = Annotated[Path | None, typer.Option(help="Append a JSON-lines event log (one object per job event).",
                                             show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress line and no summary (errors still print).")]

def batch_command(
    pipeline: PipelineArg,
    out: OutOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    resume: ResumeOpt = False,
    retries: RetriesOpt = 2,
    log: LogOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run many compare/simulate/fit jobs on Dask; one directory per job plus batch.json and batch.csv."""
    from itpk.batch import load_pipeline, run_batch
    from itpk.batch.runner import default_out, option_problems
    from itpk.cli.edge import shortened
    from itpk.errors import ItpkError, problems_error
    from itpk.interrupts import described, exit_code, signal_of

    # every problem at once, before anything is created: the batch's own options, then the pipeline's
    problems = option_problems(out if out is not None else default_out(pipeline), resume=resume, log=log,
                               scheduler=scheduler, workers=workers, retries=retries, pipeline=pipeline)
    try:
        loaded = load_pipeline(pipeline, preflight=True)
    except ItpkError as exc:
        problems.append(str(exc))
    try:
        if problems:
            raise problems_error(problems)
        result = run_batch(loaded, out=out, scheduler=scheduler, workers=workers, resume=resume,
                           retries=retries, log=log, progress=not quiet and sys.stderr.isatty())
    except ItpkError as exc:
        typer.echo(f"error: {shortened(str(exc))}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # the batch directory or --log could not be written after all (a race, a full disk)
        typer.echo(f"error: cannot write {exc.filename or ''}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (scancel, a time limit): batch.json says what finished
        signum = signal_of(exc)
        typer.echo(f"\n{described(signum)}: {exc}" if str(exc) else f"\n{described(signum)}", err=True)
        raise typer.Exit(exit_code(signum)) from None
    failed = result.exit_code != 0
    if failed or not quiet:
        typer.echo(result.message, err=failed)
    raise typer.Exit(result.exit_code)
