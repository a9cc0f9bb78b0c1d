"""Where the command line meets the library: errors become one message and an exit code.

Bad input of any kind (an :class:`~itpk.errors.ItpkError`) prints one message and exits 1
(or the error's own code), never a traceback; Ctrl-C and SIGTERM exit 130 and 143.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from itpk.errors import ItpkError
from itpk.interrupts import described, exit_code, interrupt_behind, signal_of

STOPPED = "outputs are written whole or not at all"


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn domain errors into one message on stderr and exit code 1; signals into 130 or 143."""
    try:
        yield
    except ItpkError as exc:
        typer.echo(f"error: {shortened(str(exc))}", err=True)
        raise typer.Exit(code=getattr(exc, "exit_code", 1)) from None
    except OSError as exc:  # an output path that cannot be written (a folder, a file as parent, no permission)
        where = f" {exc.filename}" if exc.filename else ""
        typer.echo(f"error: cannot write or read{where}: {exc.strerror or exc}", err=True)
        raise typer.Exit(code=1) from None
    except (KeyboardInterrupt, SystemError) as exc:
        # a signal handled inside numba-compiled code surfaces as SystemError ("returned a result
        # with an exception set") with the KeyboardInterrupt a few causes down
        if interrupt_behind(exc) is None:
            raise
        raise typer.Exit(code=stopped_by(signal_of(exc))) from None


LINE_LIMIT = 400  # characters of one line of an error message


def shortened(message: str) -> str:
    """Each line cut to :data:`LINE_LIMIT` characters: a message quotes what it found, and a cell of
    100 000 digits, a quote left open over the rest of a file or a huge expression made one problem
    fill many screens."""
    lines = []
    for line in message.splitlines() or [message]:
        cut = len(line) - LINE_LIMIT
        lines.append(line if cut <= 0 else f"{line[:LINE_LIMIT]}… ({cut} more characters)")
    return "\n".join(lines)


def stopped_by(signum: int) -> int:
    """Say which signal stopped the command (on stderr); its exit code (130 or 143)."""
    typer.echo(f"\n{described(signum)}: {STOPPED}", err=True)
    return exit_code(signum)
