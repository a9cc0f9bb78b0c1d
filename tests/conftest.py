"""Fixtures every test gets."""

import signal

import pytest


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """The CLI makes SIGTERM an exception (itpk.interrupts.terminate_gently) in the process that runs it:
    under CliRunner that is pytest's own. Each test starts from the handlers the one before it found."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)
