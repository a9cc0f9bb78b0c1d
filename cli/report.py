"""CLI command ``itpk report RUN_DIR [--out FILE.html]`` (SPEC.md §4).

Thin: one library verb (:func:`itpk.report.write_report`). Register with::

    app.command("report")(report_command)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunDirArg = Annotated[Path, typer.Argument(help="Run directory written by `itpk fit`.", show_default=False)]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="HTML file to write (default: RUN_DIR/report.html).", show_default=False),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success and show no progress bar.")]


def report_command(run_dir: RunDirArg, out: OutOpt = None, quiet: QuietOpt = False) -> None:
    """Write the posterior report of a fit: one self-contained HTML file (figures embedded, printable)."""
    from itpk.cli.edge import user_errors
    from itpk.report import write_report

    with user_errors():
        path = write_report(run_dir, out, progress=not quiet)
    if not quiet:
        typer.echo(f"wrote {path}")
