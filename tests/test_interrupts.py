"""Ctrl-C during a fit: noticed even when the sampler swallows it, and nothing is written (itpk.interrupts)."""

import json
import signal
import threading
from importlib.resources import files
from pathlib import Path

import pytest
from typer.testing import CliRunner

from itpk import inference
from itpk.cli.main import app
from itpk.errors import Interrupted
from itpk.interrupts import watch_interrupts
from itpk.workflows import run_fit

THEOPH = Path(str(files("itpk.data") / "theoph.csv"))


@pytest.fixture(autouse=True)
def python_default_sigint():
    """Python's own SIGINT handler (an imported library, dask_jobqueue's runner, may have replaced it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_swallowed_interrupt_is_remembered():
    with watch_interrupts() as interrupted:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
    assert interrupted()
    with watch_interrupts() as interrupted:
        pass
    assert not interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored


def test_outside_the_main_thread_nothing_is_installed():
    answers = []

    def worker():
        with watch_interrupts() as interrupted:
            answers.append(interrupted())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert answers == [False]


def test_an_interrupted_fit_keeps_the_previous_run_and_exits_130(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"previous": True}))

    def partial_fit(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return "a truncated posterior"  # what the samplers return: must never be written

    monkeypatch.setattr(inference, "fit", partial_fit)
    with pytest.raises(Interrupted, match=r"interrupted \(Ctrl-C\) before the fit finished: nothing was written; .* is unchanged"):
        run_fit(THEOPH, model="one_cpt_oral", out=out, method="map")
    assert json.loads((out / "run.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left
    result = CliRunner().invoke(app, ["fit", str(THEOPH), "--model", "one_cpt_oral", "--out", str(out), "--method", "map"])
    assert result.exit_code == 130 and "nothing was written" in result.output


def test_a_checkpoint_stops_the_next_stage_after_a_swallowed_interrupt():
    from itpk.interrupts import checkpoint

    checkpoint()  # outside a watch: nothing
    with watch_interrupts() as interrupted:
        checkpoint()  # nothing yet
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # a stage (nutpie's pilot) returned its partial draws
        with pytest.raises(KeyboardInterrupt):
            checkpoint()  # the next stage does not start
    assert interrupted()
    checkpoint()  # the watch is over: nothing


@pytest.fixture
def gentle_sigterm():
    """SIGTERM as the CLI handles it (itpk.interrupts.terminate_gently), restored afterwards."""
    from itpk.interrupts import terminate_gently

    before = signal.getsignal(signal.SIGTERM)
    terminate_gently()
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_is_remembered_as_sigterm_and_stops_the_next_stage(gentle_sigterm):
    from itpk.interrupts import Terminated, checkpoint

    with watch_interrupts() as interrupted:
        try:
            signal.raise_signal(signal.SIGTERM)
        except Terminated:
            pass  # swallowed, as nutpie swallows KeyboardInterrupt
        with pytest.raises(Terminated):
            checkpoint()
    assert interrupted() == signal.SIGTERM


def test_an_ignored_sigint_stays_ignored():
    # a command started with & from a script inherits SIGINT ignored; the watch must not turn it on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with watch_interrupts() as interrupted:
        signal.raise_signal(signal.SIGINT)
    assert interrupted() == 0
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_a_terminated_fit_keeps_the_previous_run_and_exits_143(tmp_path, monkeypatch, gentle_sigterm):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"previous": True}))

    def partial_fit(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:
            pass
        return "a truncated posterior"

    monkeypatch.setattr(inference, "fit", partial_fit)
    with pytest.raises(Interrupted, match=r"terminated \(SIGTERM\) before the fit finished: nothing was written") as caught:
        run_fit(THEOPH, model="one_cpt_oral", out=out, method="map")
    assert caught.value.exit_code == 143
    assert json.loads((out / "run.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_interrupt_behind_numbas_system_errors():
    from itpk.interrupts import Terminated, interrupt_behind, signal_of

    def chained(first: BaseException, levels: int) -> BaseException:
        exc = first
        for _ in range(levels):
            try:
                raise SystemError("returned a result with an exception set") from exc
            except SystemError as wrapped:
                exc = wrapped
        return exc

    assert isinstance(interrupt_behind(chained(KeyboardInterrupt(), 3)), KeyboardInterrupt)
    assert signal_of(chained(Terminated(), 2)) == signal.SIGTERM
    assert signal_of(chained(KeyboardInterrupt(), 2)) == signal.SIGINT
    assert interrupt_behind(chained(ValueError(), 2)) is None


def test_the_console_entry_point_turns_typers_130_after_sigterm_into_143(monkeypatch, capsys, gentle_sigterm):
    # review: a SIGTERM while a command imported its libraries (before its own handling) reached Typer,
    # which exits 130 for any KeyboardInterrupt and says nothing
    import itpk.cli.main as cli
    import itpk.interrupts

    def typer_app():
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:
            raise SystemExit(130) from None

    monkeypatch.setattr(cli, "app", typer_app)
    try:
        with pytest.raises(SystemExit) as caught:
            cli.main()
    finally:
        itpk.interrupts._received.clear()
    assert caught.value.code == 143 and "terminated (SIGTERM)" in capsys.readouterr().err

    def ctrl_c():
        raise SystemExit(130)

    monkeypatch.setattr(cli, "app", ctrl_c)  # Ctrl-C stays 130
    with pytest.raises(SystemExit) as caught:
        cli.main()
    assert caught.value.code == 130


def test_an_ignored_sigterm_stays_ignored():
    from itpk.interrupts import terminate_gently

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    terminate_gently()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def _unraisable(exc: BaseException):
    """What Python hands sys.unraisablehook when a C callback raised ``exc``."""
    from types import SimpleNamespace

    return SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                           err_msg="Exception ignored on calling ctypes callback function", object=None)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_dropped_by_a_c_callback_is_raised_again_silently(signum, capsys, gentle_sigterm):
    # found by two audits: SIGTERM during numba's compile (llvmlite's cache callback) or Ctrl-C in nutpie's
    # ctypes callbacks printed "Exception ignored on calling ctypes callback function" and a traceback, and
    # outside a watch the signal was lost. A real C callback here: libc's qsort calls a Python comparator,
    # and the signal arrives in its 5th call. Now nothing is printed, and the signal is raised once the C
    # call has returned
    import ctypes
    import time

    from itpk.interrupts import Terminated

    libc = ctypes.CDLL(None)
    compare_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    calls = []

    def compare(a, b):
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signum)
        return a[0] - b[0]

    values = (ctypes.c_int * 500)(*range(500, 0, -1))
    with pytest.raises(KeyboardInterrupt) as caught:
        libc.qsort(values, 500, ctypes.sizeof(ctypes.c_int), compare_type(compare))
        sorted_ok = list(values) == list(range(1, 501))  # the C call finished its work
        time.sleep(5)  # the redelivered signal interrupts this (after REDELIVERY_DELAY)
    assert sorted_ok
    assert isinstance(caught.value, Terminated) == (signum == signal.SIGTERM)
    assert "Exception ignored" not in capsys.readouterr().err


def test_under_a_watch_the_dropped_interrupt_is_left_to_the_watch(gentle_sigterm, monkeypatch):
    # a watch that noted the signal stops its caller at the next checkpoint: raising it again would only
    # interrupt the clean-up; other unraisable exceptions still reach the hook before (pytest's here)
    import sys

    from itpk.interrupts import Terminated

    import itpk.interrupts

    seen = []
    monkeypatch.setitem(itpk.interrupts._previous_hook, "hook", lambda u: seen.append(u.exc_value))
    with watch_interrupts() as interrupted:
        try:
            signal.raise_signal(signal.SIGTERM)
        except Terminated:
            pass
        sys.unraisablehook(_unraisable(Terminated()))
        for _ in range(1000):
            pass
        error = ValueError("a real bug")
        sys.unraisablehook(_unraisable(error))
    assert interrupted() == signal.SIGTERM
    assert seen == [error]
