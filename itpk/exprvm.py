"""A tiny stack machine for model expressions, with symbolic derivatives.

Model files are data: an :class:`~itpk.expr.Expr` is never turned into Python
source. Instead its (already whitelisted) ``ast`` tree is lowered to a small
tuple tree over numbered *variable slots*, differentiated symbolically on that
tree, and compiled to a flat reverse-Polish program — integer opcodes, integer
arguments and a table of float constants — that :func:`run_program`, a
numba-jitted interpreter, evaluates. Many expressions share one
:class:`Program` (concatenated code with start offsets) so a whole ODE system
(right-hand side, its Jacobians, outputs and theirs) is a handful of arrays
that can be passed into a numba kernel as ordinary inputs: one compiled
kernel serves every model, and numba's on-disk cache stays valid.

Variable slots are plain integers; the caller decides their meaning (for the
ODE Op: ``0..n-1`` the amounts x, ``n..n+P-1`` the per-subject inputs p, see
:mod:`itpk.odeop`).

Tree nodes (tuples)::

    ("c", value)        constant
    ("v", slot)         variable
    (op, a, b)          op in + - * / pow min max
    (op, a)             op in neg exp log sqrt abs sign sqr
    ("sel", a, b, x, y) x if a <= b else y   (derivatives of min/max)

Semantics follow numpy on float64: ``log`` of a negative number is NaN,
``log(0)`` is ``-inf``, overflow gives ``inf``; nothing raises inside the
interpreter (a sampler must get NaN, not an exception).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from itpk.expr import CONSTANTS, Expr

__all__ = ["Program", "compile_trees", "derivative", "lower", "run_program", "slots_of"]

Node = tuple[Any, ...]

# Opcodes. CONST/VAR push; binary ops pop two and push one; SEL pops four.
CONST, VAR, ADD, SUB, MUL, DIV, POW, NEG, EXP, LOG, SQRT, ABS, MIN, MAX, SIGN, SEL, SQR = range(17)
_BINARY_CODES = {"+": ADD, "-": SUB, "*": MUL, "/": DIV, "pow": POW, "min": MIN, "max": MAX}
_UNARY_CODES = {"neg": NEG, "exp": EXP, "log": LOG, "sqrt": SQRT, "abs": ABS, "sign": SIGN, "sqr": SQR}
_AST_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "pow"}

ZERO: Node = ("c", 0.0)
ONE: Node = ("c", 1.0)


# --------------------------------------------------------------------------------------
# From ast to tuple trees
# --------------------------------------------------------------------------------------


def lower(expr: Expr, slots: Mapping[str, int]) -> Node:
    """The tuple tree of ``expr`` with every name replaced by its slot.

    Parameters
    ----------
    expr
        A parsed, whitelisted expression.
    slots
        Slot number of every name the expression may use (``pi`` is a constant).

    Raises
    ------
    KeyError
        If the expression uses a name with no slot.
    """
    return _lower(expr.tree, slots)


def _lower(node: ast.expr, slots: Mapping[str, int]) -> Node:
    if isinstance(node, ast.Constant):
        return ("c", float(node.value))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return ("c", float(CONSTANTS[node.id]))
        return ("v", int(slots[node.id]))
    if isinstance(node, ast.BinOp):
        return _make(_AST_BINARY[type(node.op)], _lower(node.left, slots), _lower(node.right, slots))
    if isinstance(node, ast.UnaryOp):
        inner = _lower(node.operand, slots)
        return neg(inner) if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Call):
        name = node.func.id  # type: ignore[union-attr]
        args = [_lower(a, slots) for a in node.args]
        if name in ("min", "max"):  # n-ary min/max fold to binary ones
            out = args[0]
            for a in args[1:]:
                out = _make(name, out, a)
            return out
        return _make(name, args[0])
    raise AssertionError(f"unvalidated node {type(node).__name__}")  # parse_expr refuses these


# --------------------------------------------------------------------------------------
# Smart constructors: constant folding and the identities that keep derivatives small
# --------------------------------------------------------------------------------------


def _is_const(a: Node, value: float | None = None) -> bool:
    return a[0] == "c" and (value is None or a[1] == value)


def _fold(op: str, *args: float) -> float:
    """Evaluate op on constants with the interpreter's (numpy) semantics."""
    with np.errstate(all="ignore"):
        x = [np.float64(a) for a in args]
        result = {
            "+": lambda: x[0] + x[1], "-": lambda: x[0] - x[1], "*": lambda: x[0] * x[1],
            "/": lambda: x[0] / x[1], "pow": lambda: np.power(x[0], x[1]),
            "min": lambda: np.minimum(x[0], x[1]), "max": lambda: np.maximum(x[0], x[1]),
            "neg": lambda: -x[0], "exp": lambda: np.exp(x[0]), "log": lambda: np.log(x[0]),
            "sqrt": lambda: np.sqrt(x[0]), "abs": lambda: np.abs(x[0]), "sign": lambda: np.sign(x[0]),
            "sqr": lambda: x[0] * x[0], "sel": lambda: x[2] if x[0] <= x[1] else x[3],
        }[op]()  # fmt: skip
    return float(result)


def _make(op: str, *args: Node) -> Node:
    if all(_is_const(a) for a in args):
        return ("c", _fold(op, *(a[1] for a in args)))
    if op == "+":
        return add(*args)
    if op == "-":
        return sub(*args)
    if op == "*":
        return mul(*args)
    if op == "/":
        return div(*args)
    if op == "pow":
        return power(*args)
    if op == "neg":
        return neg(*args)
    return (op, *args)


def add(a: Node, b: Node) -> Node:
    if _is_const(a, 0.0):
        return b
    if _is_const(b, 0.0):
        return a
    if _is_const(a) and _is_const(b):
        return ("c", _fold("+", a[1], b[1]))
    if b[0] == "neg":
        return sub(a, b[1])
    return ("+", a, b)


def sub(a: Node, b: Node) -> Node:
    if _is_const(b, 0.0):
        return a
    if _is_const(a, 0.0):
        return neg(b)
    if _is_const(a) and _is_const(b):
        return ("c", _fold("-", a[1], b[1]))
    if b[0] == "neg":
        return add(a, b[1])
    return ("-", a, b)


def mul(a: Node, b: Node) -> Node:
    # 0·a = 0 is only wrong for a = inf/NaN; a derivative term that is structurally
    # zero must stay zero (it is what keeps the Jacobians sparse).
    if _is_const(a, 0.0) or _is_const(b, 0.0):
        return ZERO
    if _is_const(a, 1.0):
        return b
    if _is_const(b, 1.0):
        return a
    if _is_const(a, -1.0):
        return neg(b)
    if _is_const(b, -1.0):
        return neg(a)
    if _is_const(a) and _is_const(b):
        return ("c", _fold("*", a[1], b[1]))
    if a[0] == "neg":
        return neg(mul(a[1], b))
    if b[0] == "neg":
        return neg(mul(a, b[1]))
    return ("*", a, b)


def div(a: Node, b: Node) -> Node:
    if _is_const(a, 0.0):
        return ZERO
    if _is_const(b, 1.0):
        return a
    if _is_const(a) and _is_const(b):
        return ("c", _fold("/", a[1], b[1]))
    if a[0] == "neg":
        return neg(div(a[1], b))
    return ("/", a, b)


def neg(a: Node) -> Node:
    if _is_const(a):
        return ("c", -a[1])
    if a[0] == "neg":
        return a[1]
    return ("neg", a)


def power(a: Node, b: Node) -> Node:
    if _is_const(b):
        c = b[1]
        if c == 0.0:
            return ONE
        if c == 1.0:
            return a
        if _is_const(a):
            return ("c", _fold("pow", a[1], c))
        if c == 2.0:
            return ("sqr", a)
        if c == 0.5:
            return ("sqrt", a)
        if c == -1.0:
            return div(ONE, a)
    return ("pow", a, b)


# --------------------------------------------------------------------------------------
# Symbolic differentiation
# --------------------------------------------------------------------------------------


def slots_of(node: Node) -> frozenset[int]:
    """Every variable slot the tree uses."""
    if node[0] == "c":
        return frozenset()
    if node[0] == "v":
        return frozenset((node[1],))
    out: frozenset[int] = frozenset()
    for child in node[1:]:
        out |= slots_of(child)
    return out


def derivative(node: Node, slot: int) -> Node:
    """∂node/∂(variable ``slot``) as a simplified tree (``("c", 0.0)`` when it does not depend on it).

    Non-smooth points take one side: ∂|a| uses sign(a) (0 at a = 0), ∂min(a, b)
    follows a when a <= b. A power with a constant exponent is differentiated
    as c·a^(c−1) (valid for negative bases); otherwise a^b·(b′·log a + b·a′/a).
    """
    kind = node[0]
    if kind == "c":
        return ZERO
    if kind == "v":
        return ONE if node[1] == slot else ZERO
    if slot not in slots_of(node):
        return ZERO
    args = node[1:]
    if kind in ("+", "-"):
        da, db = derivative(args[0], slot), derivative(args[1], slot)
        return add(da, db) if kind == "+" else sub(da, db)
    if kind == "*":
        a, b = args
        return add(mul(derivative(a, slot), b), mul(a, derivative(b, slot)))
    if kind == "/":
        a, b = args
        da, db = derivative(a, slot), derivative(b, slot)
        # (a/b)' = a'/b − a·b'/b²
        return sub(div(da, b), div(mul(a, db), _make("sqr", b)))
    if kind == "pow":
        a, b = args
        da, db = derivative(a, slot), derivative(b, slot)
        if _is_const(db, 0.0):  # constant exponent
            return mul(mul(b, power(a, _make("-", b, ONE))), da)
        term = add(mul(db, _make("log", a)), div(mul(b, da), a))
        return mul(node, term)
    if kind == "neg":
        return neg(derivative(args[0], slot))
    if kind == "exp":
        return mul(node, derivative(args[0], slot))
    if kind == "log":
        return div(derivative(args[0], slot), args[0])
    if kind == "sqrt":
        return div(derivative(args[0], slot), mul(("c", 2.0), node))
    if kind == "sqr":
        return mul(mul(("c", 2.0), args[0]), derivative(args[0], slot))
    if kind == "abs":
        return mul(_make("sign", args[0]), derivative(args[0], slot))
    if kind == "sign":
        return ZERO
    if kind in ("min", "max"):
        a, b = args
        da, db = derivative(a, slot), derivative(b, slot)
        if da == db:
            return da
        first, second = (da, db) if kind == "min" else (db, da)
        return ("sel", a, b, first, second)  # min: a <= b → a′; max: a <= b → b′
    if kind == "sel":
        a, b, x, y = args
        dx, dy = derivative(x, slot), derivative(y, slot)
        return dx if dx == dy else ("sel", a, b, dx, dy)
    raise AssertionError(f"unknown node {kind!r}")


# --------------------------------------------------------------------------------------
# Compilation to flat programs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # arrays: compared and hashed by identity
class Program:
    """E expressions compiled to one reverse-Polish program.

    Attributes
    ----------
    code : ndarray (L,) int64
        Opcodes (``CONST``, ``VAR``, ``ADD``… module constants).
    arg : ndarray (L,) int64
        Constant-table index for ``CONST``, slot for ``VAR``, unused otherwise.
    consts : ndarray (C,) float64
        Constant table.
    starts : ndarray (E+1,) int64
        Expression e is ``code[starts[e]:starts[e+1]]``.
    depth : int
        Largest stack depth any expression needs.
    """

    code: np.ndarray
    arg: np.ndarray
    consts: np.ndarray
    starts: np.ndarray
    depth: int

    @property
    def n_exprs(self) -> int:
        return self.starts.shape[0] - 1

    def evaluate(self, z: np.ndarray) -> np.ndarray:
        """Values (E,) of every expression at slot values ``z`` (for tests and debugging)."""
        out = np.empty(self.n_exprs)
        stack = np.empty(max(self.depth, 1))
        run_program(self.code, self.arg, self.consts, self.starts, 0, self.n_exprs, np.asarray(z, dtype=np.float64), out, stack)
        return out


def compile_trees(trees: Sequence[Node]) -> Program:
    """Compile trees (in order) into one :class:`Program`."""
    code: list[int] = []
    arg: list[int] = []
    consts: list[float] = []
    const_index: dict[float, int] = {}
    starts = [0]
    depth = 1

    def constant(value: float) -> int:
        key = float(value)
        if math.isnan(key):  # NaN is never equal to itself: give each its own entry
            consts.append(key)
            return len(consts) - 1
        if key not in const_index:
            const_index[key] = len(consts)
            consts.append(key)
        return const_index[key]

    def emit(node: Node) -> int:
        """Post-order emission; returns the stack depth the subtree needs."""
        kind = node[0]
        if kind == "c":
            code.append(CONST)
            arg.append(constant(node[1]))
            return 1
        if kind == "v":
            code.append(VAR)
            arg.append(int(node[1]))
            return 1
        need = 0
        for position, child in enumerate(node[1:]):
            need = max(need, position + emit(child))
        if kind in _BINARY_CODES:
            code.append(_BINARY_CODES[kind])
        elif kind in _UNARY_CODES:
            code.append(_UNARY_CODES[kind])
        elif kind == "sel":
            code.append(SEL)
        else:
            raise AssertionError(f"unknown node {kind!r}")
        arg.append(0)
        return need

    for tree in trees:
        depth = max(depth, emit(tree))
        starts.append(len(code))
    return Program(
        code=np.array(code, dtype=np.int64),
        arg=np.array(arg, dtype=np.int64),
        consts=np.array(consts or [0.0], dtype=np.float64),
        starts=np.array(starts, dtype=np.int64),
        depth=depth,
    )


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")  # see itpk.odeop: call overhead
def run_program(
    code: np.ndarray, arg: np.ndarray, consts: np.ndarray, starts: np.ndarray,
    first: int, stop: int, z: np.ndarray, out: np.ndarray, stack: np.ndarray,
) -> None:  # fmt: skip
    """Evaluate expressions ``first..stop-1`` at slot values ``z`` into ``out[0..stop-first-1]``.

    ``stack`` must hold at least ``Program.depth`` floats. Domain errors give
    NaN/inf as numpy does; nothing raises.
    """
    for e in range(first, stop):
        sp = 0
        for k in range(starts[e], starts[e + 1]):
            op = code[k]
            if op == 0:  # CONST
                stack[sp] = consts[arg[k]]
                sp += 1
            elif op == 1:  # VAR
                stack[sp] = z[arg[k]]
                sp += 1
            elif op == 2:  # ADD
                sp -= 1
                stack[sp - 1] = stack[sp - 1] + stack[sp]
            elif op == 3:  # SUB
                sp -= 1
                stack[sp - 1] = stack[sp - 1] - stack[sp]
            elif op == 4:  # MUL
                sp -= 1
                stack[sp - 1] = stack[sp - 1] * stack[sp]
            elif op == 5:  # DIV
                sp -= 1
                b = stack[sp]
                a = stack[sp - 1]
                if b == 0.0:  # numpy semantics, not ZeroDivisionError
                    stack[sp - 1] = np.nan if (a == 0.0 or np.isnan(a)) else math.copysign(np.inf, a) * math.copysign(1.0, b)
                else:
                    stack[sp - 1] = a / b
            elif op == 6:  # POW
                sp -= 1
                stack[sp - 1] = np.power(stack[sp - 1], stack[sp])
            elif op == 7:  # NEG
                stack[sp - 1] = -stack[sp - 1]
            elif op == 8:  # EXP
                stack[sp - 1] = np.exp(stack[sp - 1])
            elif op == 9:  # LOG
                a = stack[sp - 1]
                stack[sp - 1] = np.log(a) if a > 0.0 else (-np.inf if a == 0.0 else np.nan)
            elif op == 10:  # SQRT
                a = stack[sp - 1]
                stack[sp - 1] = np.sqrt(a) if a >= 0.0 else np.nan
            elif op == 11:  # ABS
                stack[sp - 1] = abs(stack[sp - 1])
            elif op == 12:  # MIN
                sp -= 1
                stack[sp - 1] = min(stack[sp - 1], stack[sp])
            elif op == 13:  # MAX
                sp -= 1
                stack[sp - 1] = max(stack[sp - 1], stack[sp])
            elif op == 14:  # SIGN
                a = stack[sp - 1]
                stack[sp - 1] = 1.0 if a > 0.0 else (-1.0 if a < 0.0 else (0.0 if a == 0.0 else np.nan))
            elif op == 15:  # SEL: x if a <= b else y
                sp -= 3
                stack[sp - 1] = stack[sp + 1] if stack[sp - 1] <= stack[sp] else stack[sp + 2]
            else:  # SQR
                a = stack[sp - 1]
                stack[sp - 1] = a * a
        out[e - first] = stack[0]
