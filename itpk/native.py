"""Numba kernels as native entry points: compiled once, called by symbol from graph functions.

A numba kernel that a pytensor Op hands to the numba backend is linked into
every graph function that uses it, and LLVM optimises the linked module —
kernel included — again each time a model is compiled: measured on Theoph,
the linear Op's kernels added ~3.5 s to every fit's compilation, most of a
short fit's wall time. Exported instead as a C entry point (``numba.cfunc``,
cached on disk like any ``cache=True`` kernel) and registered under a
process-wide symbol, the kernel is compiled once per machine; the graph
function only holds a call to that symbol.

Calling convention: an entry point takes one int64, the address of an int64
*block* that holds the addresses of its arrays and their sizes (numba cannot
type a variable number of arguments in the intrinsic that emits the call).
The kernel rebuilds its arrays with ``numba.carray(as_pointer(...)(address), shape)``.
Arrays passed must be C-contiguous and stay alive during the call (the caller's
own arguments and outputs are). An entry point must not raise: validate in
the caller, where an exception propagates normally.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["NativeKernel", "as_pointer", "keep_alive"]

_POINTERS: dict[Any, Any] = {}


@numba.njit(cache=True, nogil=True)
def keep_alive(arrays: Any) -> int:
    """A use of ``arrays`` (a tuple) after a native call: numba frees a variable after its last use,
    and an address in the block is not a use, so a contiguous copy could be freed before the call.
    Building the tuple for this call keeps every array referenced until here."""
    return arrays[0].size


def as_pointer(dtype: Any) -> Any:
    """An intrinsic turning an int64 address into a ``CPointer(dtype)`` inside numba code."""
    if dtype not in _POINTERS:

        @intrinsic
        def cast(typingctx: Any, address: Any) -> Any:
            signature = types.CPointer(dtype)(types.int64)

            def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
                return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

            return signature, codegen

        _POINTERS[dtype] = cast
    return _POINTERS[dtype]


def _caller(symbol: str) -> Any:
    """An intrinsic ``call(block_address)`` emitting a call to the C function ``symbol``."""

    @intrinsic
    def call(typingctx: Any, block: Any) -> Any:
        signature = types.void(types.int64)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64)])
            fn = cgutils.get_or_insert_function(builder.module, fnty, symbol)
            builder.call(fn, args)
            return context.get_dummy_value()

        return signature, codegen

    return call


class NativeKernel:
    """A kernel ``kernel(block_address) -> None`` exported as the C symbol ``symbol``.

    Parameters
    ----------
    kernel
        Python function numba compiles as ``cfunc(void(int64))``; it reads its
        arrays from the block (see the module docstring).
    symbol
        Process-wide name; include a version of the kernel's source so a cached
        caller never binds to a kernel with another block layout.

    Notes
    -----
    ``call`` is an intrinsic for numba code; :meth:`register` must have run in
    this process before a function using it is compiled or loaded from the
    cache (the Ops' numba dispatch and ``perform`` call it).
    """

    def __init__(self, kernel: Callable[..., None], symbol: str) -> None:
        self.kernel = kernel
        self.symbol = symbol
        self.call = _caller(symbol)
        self._cfunc: Any = None
        self._lock = threading.Lock()

    def register(self) -> None:
        """Compile (or load from numba's cache) the entry point and publish its symbol."""
        with self._lock:
            if self._cfunc is None:
                compiled = numba.cfunc(types.void(types.int64), cache=True, nopython=True, boundscheck=False)(self.kernel)
                llvm.add_symbol(self.symbol, compiled.address)
                self._cfunc = compiled
