"""Noticing Ctrl-C even when a library swallows it.

nutpie and PyMC's samplers and ADVI catch ``KeyboardInterrupt`` and return what they
have drawn so far; a numba callback may print it and carry on. A fit that a user
interrupted must not then be written as if it had finished (it would replace the
previous run directory with a truncated posterior): :func:`watch_interrupts`
remembers the signal, the caller refuses to write, and work done in stages calls
:func:`checkpoint` between them so that it stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_seen = threading.Event()  # set by the handler while a watch is active (the main thread's, at most one)


def checkpoint() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C arrived during the current watch and a library swallowed it.

    For work in stages (nutpie's pilot run, then its main run): without it, the next stage would
    start after the swallowed interrupt and run to its end before the result was thrown away.
    Outside a watch it does nothing.
    """
    if _seen.is_set():
        raise KeyboardInterrupt


@contextmanager
def watch_interrupts() -> Iterator[Callable[[], bool]]:
    """Within the block, SIGINT still raises ``KeyboardInterrupt`` and is also remembered.

    Yields a function that tells whether SIGINT arrived (also after the block). Outside the
    main thread (a Dask worker) signals cannot be handled, and it always answers False.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    state = {"seen": False}
    _seen.clear()
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        state["seen"] = True
        _seen.set()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: state["seen"]
    finally:
        signal.signal(signal.SIGINT, previous)
        _seen.clear()
