"""Native entry points (itpk.native): called by symbol from numba code, cached, failure visible."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from itpk.native import NativeKernel, as_pointer

_F64, _I64 = as_pointer(numba.types.float64), as_pointer(numba.types.int64)


def _double(block):  # block: x address, y address, n, done flag
    a = numba.carray(_I64(block), (4,))
    x = numba.carray(_F64(a[0]), (a[2],))
    y = numba.carray(_F64(a[1]), (a[2],))
    for i in range(a[2]):
        y[i] = 2.0 * x[i]
    a[3] = 1


def _fails(block):
    a = numba.carray(_I64(block), (4,))
    if a[2] > 0:
        raise ValueError("boom")
    a[3] = 1


DOUBLE = NativeKernel(_double, "itpk_test_native_double_v1")
FAILS = NativeKernel(_fails, "itpk_test_native_fails_v1")
_call_double, _call_fails = DOUBLE.call, FAILS.call


@numba.njit
def _run(x, which):
    y = np.zeros(x.shape[0])
    block = np.array([x.ctypes.data, y.ctypes.data, x.shape[0], 0], dtype=np.int64)
    if which == 0:
        _call_double(block.ctypes.data)
    else:
        _call_fails(block.ctypes.data)
    return y, block[3]


def test_kernel_called_by_symbol_from_numba_code():
    # both symbols _run names must be registered before _run is compiled (else: a crash)
    FAILS.register()
    DOUBLE.register()
    DOUBLE.register()  # idempotent
    x = np.linspace(-1.0, 3.0, 7)
    y, done = _run(x, 0)
    assert done == 1
    np.testing.assert_array_equal(y, 2.0 * x)  # exact


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_exception_inside_the_entry_point_leaves_the_flag_unset():
    # a C entry point cannot raise into its caller: numba reports the exception as unraisable
    # and returns; the caller sees the completion flag still 0 (linop then returns NaN)
    DOUBLE.register()
    FAILS.register()
    _, done = _run(np.ones(3), 1)
    assert done == 0


def test_fresh_processes_find_the_entry_points(tmp_path):
    # twice in fresh processes (the second loads the entry points from numba's disk cache): the
    # symbols must be registered before a graph function calling them is linked (else a crash);
    # one-compartment-with-absorption closed form, rtol 1e-12 (small kernels) and 1e-10 (general)
    script = textwrap.dedent("""
        import json
        import numpy as np, pytensor, pytensor.tensor as pt
        from itpk.linop import Design, linear_predict
        design = Design(np.zeros((1, 1)), np.zeros((1, 1)), np.ones((1, 1), bool), np.zeros(2, np.int64),
                        np.array([1.0, 2.0]), np.zeros(2, np.int64), np.full(2, -np.inf))
        out = []
        for n in (2, 3):  # the small (real) and the general kernels
            K = pt.tensor("K", shape=(1, n, n))
            y = linear_predict(K, np.eye(1, n)[None] * 100.0, np.eye(1, n, 1)[None] / 50.0, design)
            f = pytensor.function([K], [y, pytensor.grad(y.sum(), K)], mode="NUMBA")
            k = np.zeros((1, n, n)); k[0, 0, 0], k[0, 1, 0], k[0, 1, 1] = -1.0, 1.0, -0.1
            out.append(f(k)[0])
        print(json.dumps([v.tolist() for v in out]))
    """)
    runs = [subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout
    first, second = json.loads(runs[1].stdout)
    exact = [100 / 50 * 1.0 / (1.0 - 0.1) * (np.exp(-0.1 * t) - np.exp(-1.0 * t)) for t in (1.0, 2.0)]
    np.testing.assert_allclose(first, exact, rtol=1e-12)
    np.testing.assert_allclose(second, exact, rtol=1e-10)
