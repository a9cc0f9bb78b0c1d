"""Fixtures every test gets."""

import signal
import sys

import pytest


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """The CLI makes SIGTERM an exception (itpk.interrupts.terminate_gently) in the process that runs it:
    under CliRunner that is pytest's own, and it wraps sys.unraisablehook. Each test starts from the
    handlers the one before it found."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)
    sys.unraisablehook = hook
