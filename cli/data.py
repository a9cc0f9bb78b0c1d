"""CLI commands that read datasets: ``itpk data validate`` and ``itpk nca``.

Thin by design: parse options, call one library verb, print, exit. pandas and
the library modules are imported inside the commands so ``itpk --help`` stays fast.
Register them with::

    app.add_typer(data_app, name="data")
    app.command("nca")(nca_command)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from itpk.dataset import Dataset
    from itpk.spec import ModelSpec

data_app = typer.Typer(help="Check datasets (SPEC.md §2) before fitting or NCA.", no_args_is_help=True)

DataArg = Annotated[Path, typer.Argument(help="Dataset CSV (NONMEM-style; a NAME.units.toml beside it gives units).", show_default=False)]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model name or .toml path: also check routes, CMT names and covariates, and convert units."),
]


def _read(data: Path, model: str | None) -> tuple[ModelSpec | None, Dataset]:
    """The model (when given) and the dataset checked against it; on bad input every problem in one error."""
    from itpk.errors import problems_error
    from itpk.workflows import read_data

    problems: list[str] = []
    spec, dataset = read_data(data, model, problems)
    if problems or dataset is None:
        raise problems_error(problems)  # printed by user_errors
    return spec, dataset


@data_app.command("validate")
def validate(data: DataArg, model: ModelOpt = None) -> None:
    """Check a dataset and print a short summary; list every problem and exit 1 if invalid."""
    from itpk.cli.edge import user_errors

    from itpk.dataset import log_error_notes

    with user_errors():
        spec, dataset = _read(data, model)
    notes = log_error_notes(dataset, spec) if spec is not None else []
    for line in summary(dataset) + [f"  note: {note}" for note in notes]:
        typer.echo(line)


def summary(dataset: Dataset) -> list[str]:
    """Lines describing a valid dataset: subjects, arms, doses, observations, censoring, units."""
    frame = dataset.data
    doses = dataset.doses
    observations = dataset.observations
    n = len(dataset.subjects)
    lines = [f"{dataset.source}: valid ({len(frame)} rows, {n} subject{'s' if n != 1 else ''})"]
    if dataset.model:
        lines.append(f"  checked against model {dataset.model}")
    lines.append(f"  arms: {', '.join(map(str, dataset.arms)) if dataset.arms else 'none given'}")
    by_route = doses["ROUTE"].fillna("CMT " + doses["CMT"].fillna("?").astype(str)).value_counts(sort=False)
    lines.append("  doses: " + (", ".join(f"{route} {n}" for route, n in by_route.items()) or "none"))
    counts = observations.groupby("CMT", sort=False).size()
    censored = dataset.censored[observations.index].groupby(observations["CMT"], sort=False).sum()
    lines.append("  observations: " + (", ".join(f"{name} {n}" for name, n in counts.items()) or "none"))
    total = len(observations)
    fraction = f"{100 * censored.sum() / total:.1f}%" if total else "n/a"
    lines.append(f"  censored (BLQ): {int(censored.sum())} of {total} ({fraction})")
    if dataset.covariates:
        lines.append(f"  covariates: {', '.join(dataset.covariates)}")
    if dataset.ignored_rows:
        lines.append(f"  blank rows ignored: {', '.join(map(str, dataset.ignored_rows))}")
    lines += ["  " + line for line in dataset.units.describe()]
    return lines


def nca_command(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output CSV: ID,OUTPUT,Cmax,Tmax,AUClast,AUCinf,lambda_z,half_life,lambda_z_points,adj_r2 (AUC_end with --end), then unit columns.", show_default=False)],
    model: ModelOpt = None,
    end: Annotated[float | None, typer.Option("--end", help="Also report AUC_end: AUClast over samples at or before this time (dataset time unit).", show_default=False)] = None,
) -> None:
    """Non-compartmental analysis per subject and output (linear-up/log-down AUC)."""
    from itpk.cli.edge import user_errors
    from itpk.workflows import run_nca

    with user_errors():
        try:
            result = run_nca(data, out=out, model=model, end=end)
        except OSError as exc:
            typer.echo(f"error: cannot write {out}: {exc.strerror or exc}", err=True)
            raise typer.Exit(1) from None
    table, dataset = result.table, result.dataset
    typer.echo(f"wrote {len(table)} rows to {out}")
    typer.echo(f"  BLQ handling: {table.attrs['blq']}")
    for line in dataset.units.describe():
        typer.echo(f"  {line}")
