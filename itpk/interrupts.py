"""Noticing Ctrl-C and SIGTERM even when a library swallows them.

nutpie and PyMC's samplers and ADVI catch ``KeyboardInterrupt`` and return what they
have drawn so far; a numba callback may print it and carry on. A fit that a user
interrupted must not then be written as if it had finished (it would replace the
previous run directory with a truncated posterior): :func:`watch_interrupts`
remembers the signal, the caller refuses to write, and work done in stages calls
:func:`checkpoint` between them so that it stops at once.

SIGTERM is what ``kill``, ``scancel`` and a SLURM time limit send (SIGKILL follows
after the cluster's grace period, 30 s by default). Python's default is to die on
the spot, leaving hidden temporary siblings and, for a batch, no ``batch.json``.
:func:`terminate_gently` makes it raise :class:`Terminated`, a ``KeyboardInterrupt``,
so every clean-up that Ctrl-C runs runs for it too; the exit code says which (130 or
143, as shells report them).
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_seen = threading.Event()  # set by the handler while a watch is active (the main thread's, at most one)
_terminated = threading.Event()  # ... and the signal was SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (after :func:`terminate_gently`): stop as for Ctrl-C."""


def terminate_gently() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (a no-op elsewhere, and
    when SIGTERM is ignored: whoever started the process wanted it to survive one); and an interrupt
    raised inside a C callback, which Python can only print and drop, is redelivered
    (:func:`_redeliver`)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _raise_terminated)
    if sys.unraisablehook is not _redeliver:
        _previous_hook["hook"] = sys.unraisablehook
        sys.unraisablehook = _redeliver


_previous_hook: dict[str, Callable[[Any], None]] = {}  # the unraisable hook that :func:`_redeliver` replaced


def _redeliver(unraisable: Any) -> None:
    """``sys.unraisablehook``: an interrupt raised inside a C callback (numba's compiler, nutpie's
    ctypes callbacks) cannot propagate; Python printed "Exception ignored on calling ctypes callback
    function" with its traceback and carried on, compiling for minutes under load before the signal
    took effect. Now nothing is printed, and unless a :func:`watch_interrupts` block has noted it
    (its caller stops at the next :func:`checkpoint`), the same signal is sent again a moment later
    (:data:`REDELIVERY_DELAY`) from another thread: raised inside the hook it would be dropped too,
    and a callback that runs again only passes it on again, until it reaches Python code that can
    raise it, when the C call returns. Anything else goes to the previous hook."""
    exc = unraisable.exc_value
    if isinstance(exc, KeyboardInterrupt):
        if not _seen.is_set():
            _thread.start_new_thread(_signal_later, (signal_of(exc),))  # does not wait for the thread, unlike Thread.start
        return
    _previous_hook.get("hook", sys.__unraisablehook__)(unraisable)


REDELIVERY_DELAY = 0.05  # s: long enough for the hook and the callback to return


def _signal_later(signum: int) -> None:
    time.sleep(REDELIVERY_DELAY)
    os.kill(os.getpid(), signum)


_received = threading.Event()  # a SIGTERM arrived since terminate_gently (for the console entry point)


def _raise_terminated(signum: int, frame: Any) -> None:
    _received.set()
    raise Terminated


def sigterm_received() -> bool:
    """Whether :class:`Terminated` was raised in this process: an exit code 130 that Typer made of it
    (outside the commands' own handling) is then 143."""
    return _received.is_set()


def interrupt_behind(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The ``KeyboardInterrupt`` that ``exc`` is or was caused by, if any.

    A signal handled while numba-compiled code runs surfaces as a ``SystemError``
    ("returned a result with an exception set") whose causes, a few levels down, hold it.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def signal_of(exc: BaseException | None) -> int:
    """SIGTERM for a :class:`Terminated` (or what it caused), else SIGINT."""
    return signal.SIGTERM if isinstance(interrupt_behind(exc), Terminated) else signal.SIGINT


def exit_code(signum: int) -> int:
    """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def described(signum: int) -> str:
    """"interrupted (Ctrl-C)" or "terminated (SIGTERM)", for messages."""
    return "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"


def checkpoint() -> None:
    """Raise ``KeyboardInterrupt`` (:class:`Terminated` for SIGTERM) if a signal arrived during the
    current watch and a library swallowed it.

    For work in stages (nutpie's pilot run, then its main run): without it, the next stage would
    start after the swallowed interrupt and run to its end before the result was thrown away.
    Outside a watch it does nothing.
    """
    if _seen.is_set():
        raise Terminated if _terminated.is_set() else KeyboardInterrupt


@contextmanager
def watch_interrupts() -> Iterator[Callable[[], int]]:
    """Within the block, SIGINT (and SIGTERM after :func:`terminate_gently`) still raise and are
    also remembered.

    Yields a function that gives the signal that arrived, 0 for none (also after the block).
    Outside the main thread (a Dask worker) signals cannot be handled, and it always answers 0.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    state = {"signal": 0}
    _seen.clear()
    _terminated.clear()
    # an ignored SIGINT (a job started with & from a script) stays ignored
    watched = [signum for signum in (signal.SIGINT, signal.SIGTERM)
               if signal.getsignal(signum) not in (signal.SIG_IGN, None)
               and (signum == signal.SIGINT or signal.getsignal(signum) is _raise_terminated)]
    previous = {signum: signal.getsignal(signum) for signum in watched}

    def handler(signum: int, frame: Any) -> None:
        state["signal"] = signum
        _seen.set()
        if signum == signal.SIGTERM:
            _terminated.set()
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        else:  # SIG_DFL: Python's own SIGINT handler was replaced by the default action
            raise KeyboardInterrupt

    for signum in watched:
        signal.signal(signum, handler)
    try:
        yield lambda: state["signal"]
    finally:
        # blocked while the handlers are put back, so that a signal arriving in between cannot raise out
        # of this block with half of them restored; it is delivered to the restored handler after
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        try:
            for signum, before in previous.items():
                signal.signal(signum, before)
            _seen.clear()
            _terminated.clear()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
