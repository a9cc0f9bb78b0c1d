"""Noticing Ctrl-C even when a library swallows it.

nutpie and PyMC's samplers and ADVI catch ``KeyboardInterrupt`` and return what they
have drawn so far; a numba callback may print it and carry on. A fit that a user
interrupted must not then be written as if it had finished (it would replace the
previous run directory with a truncated posterior): :func:`watch_interrupts`
remembers the signal, and the caller refuses to write.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def watch_interrupts() -> Iterator[Callable[[], bool]]:
    """Within the block, SIGINT still raises ``KeyboardInterrupt`` and is also remembered.

    Yields a function that tells whether SIGINT arrived. Outside the main thread
    (a Dask worker) signals cannot be handled, and it always answers False.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    seen = False
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        nonlocal seen
        seen = True
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: seen
    finally:
        signal.signal(signal.SIGINT, previous)
