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
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from itpk.expr import CONSTANTS, Expr

__all__ = ["Program", "Tape", "compile_tape", "compile_trees", "derivative", "lower", "run_program", "run_tape", "slots_of"]

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


def lower(expr: Expr, slots: Mapping[str, int | Node]) -> Node:
    """The tuple tree of ``expr`` with every name replaced by its slot.

    Parameters
    ----------
    expr
        A parsed, whitelisted expression.
    slots
        Slot number of every name the expression may use (``pi`` is a constant),
        or a tree to put in the name's place (a derived quantity inlined).

    Raises
    ------
    KeyError
        If the expression uses a name with no slot.
    """
    return _lower(expr.tree, slots)


def _lower(node: ast.expr, slots: Mapping[str, int | Node]) -> Node:
    if isinstance(node, ast.Constant):
        return ("c", float(node.value))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return ("c", float(CONSTANTS[node.id]))
        slot = slots[node.id]
        return slot if isinstance(slot, tuple) else ("v", int(slot))
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


# --------------------------------------------------------------------------------------
# Straight-line register code with shared subexpressions (the ODE Op's hot path)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Tape:
    """Groups of expressions compiled to three-address code over one register file.

    Every distinct subtree is computed once (hash-consing; the operands of
    ``+`` and ``*`` are put in a canonical order, which IEEE arithmetic makes
    exact), and the instructions that read no *varying* slot (for the ODE Op:
    only the inputs p, not the amounts x) come first, so a caller evaluates
    them once per subject. Values equal :meth:`Program.evaluate`'s bit for bit
    (same operations on the same operands).

    Registers: ``0..n_slots-1`` the slot values (the caller writes them),
    ``n_slots..n_slots+C-1`` the constants (``consts``, written once by the
    caller), then one register per instruction.

    Attributes
    ----------
    ops : ndarray (L, 6) int64
        Opcode (as :func:`run_program`'s), destination register and up to four
        operand registers (SEL: a, b, x, y; binary: a, b; unary: a; −1 unused).
    consts : ndarray (C,) float64
    out : ndarray (E,) int64
        Register holding expression e's value (groups concatenated in order).
    out_groups : ndarray (G+1,) int64
        Group g is expressions ``out_groups[g]:out_groups[g+1]`` of ``out``.
    sections : ndarray (G+2,) int64
        Instructions ``sections[0]:sections[1]`` read no varying slot; those
        group g needs beyond everything before it are ``sections[g+1]:sections[g+2]``.
    n_slots : int
    """

    ops: np.ndarray
    consts: np.ndarray
    out: np.ndarray
    out_groups: np.ndarray
    sections: np.ndarray
    n_slots: int

    @property
    def n_regs(self) -> int:
        return self.n_slots + self.consts.shape[0] + self.ops.shape[0]

    def registers(self) -> np.ndarray:
        """A register file with the constants in place (slots and results left to fill)."""
        regs = np.zeros(self.n_regs)
        regs[self.n_slots : self.n_slots + self.consts.shape[0]] = self.consts
        return regs

    def evaluate(self, z: np.ndarray) -> np.ndarray:
        """Values (E,) of every expression at slot values ``z`` (for tests and debugging)."""
        regs = self.registers()
        regs[: self.n_slots] = np.asarray(z, dtype=np.float64)
        run_tape(self.ops, regs, 0, self.ops.shape[0])
        return regs[self.out]


_OPCODES = {**_BINARY_CODES, **_UNARY_CODES, "sel": SEL}


def compile_tape(groups: Sequence[Sequence[Node]], n_slots: int, varying: Sequence[int]) -> Tape:
    """Compile groups of trees into one :class:`Tape` over slots ``0..n_slots-1``.

    ``varying`` are the slots that change between evaluations (the others are
    constant for a caller's run of many evaluations): instructions reading
    none of them, directly or not, go into the first section.
    """
    varies = set(varying)
    consts: list[float] = []
    const_reg: dict[bytes, int] = {}
    keys: dict[tuple[Any, ...], int] = {}
    invariant: list[int] = []
    grouped: list[list[int]] = [[] for _ in groups]
    pending: list[tuple[tuple[Any, ...], bool]] = []  # (key, varies) in creation order; registers assigned later

    def visit(node: Node, g: int) -> tuple[str, int]:
        """A reference to node's value: ("s", slot), ("c", constant index) or ("i", instruction index)."""
        kind = node[0]
        if kind == "v":
            if not 0 <= node[1] < n_slots:
                raise ValueError(f"slot {node[1]} outside 0..{n_slots - 1}")
            return ("s", int(node[1]))
        if kind == "c":
            bits = struct.pack("<d", float(node[1]))  # -0.0 and 0.0 stay apart
            if bits not in const_reg:
                const_reg[bits] = len(consts)
                consts.append(float(node[1]))
            return ("c", const_reg[bits])
        if kind not in _OPCODES:
            raise AssertionError(f"unknown node {kind!r}")
        args = [visit(child, g) for child in node[1:]]
        if kind in ("+", "*"):
            args.sort()
        key = (kind, *args)
        if key not in keys:
            var = any(a[0] == "s" and a[1] in varies or a[0] == "i" and pending[a[1]][1] for a in args)
            keys[key] = len(pending)
            pending.append((key, var))
            (grouped[g] if var else invariant).append(len(pending) - 1)
        return ("i", keys[key])

    outs: list[tuple[str, int]] = []
    out_groups = [0]
    for g, trees in enumerate(groups):
        for tree in trees:
            outs.append(visit(tree, g))
        out_groups.append(len(outs))
    # order: invariant instructions, then each group's own (creation order is a topological order in each)
    order = invariant + [k for group in grouped for k in group]
    base = n_slots + len(consts)
    reg_of = {k: base + position for position, k in enumerate(order)}

    def register(ref: tuple[str, int]) -> int:
        kind, index = ref
        return index if kind == "s" else (n_slots + index if kind == "c" else reg_of[index])

    ops = np.full((len(order), 6), -1, dtype=np.int64)  # unused operands: -1 (never read)
    for position, k in enumerate(order):
        key = pending[k][0]
        ops[position, 0] = _OPCODES[key[0]]
        ops[position, 1] = base + position
        for j, ref in enumerate(key[1:]):
            ops[position, 2 + j] = register(ref)
    sections = np.cumsum([0, len(invariant)] + [len(group) for group in grouped]).astype(np.int64)
    return Tape(
        ops=ops,
        consts=np.array(consts, dtype=np.float64),
        out=np.array([register(r) for r in outs], dtype=np.int64),
        out_groups=np.array(out_groups, dtype=np.int64),
        sections=sections,
        n_slots=int(n_slots),
    )


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def run_tape(ops: np.ndarray, regs: np.ndarray, first: int, stop: int) -> None:
    """Run instructions ``first..stop-1`` of a :class:`Tape` on the register file ``regs``.

    Same operations and NaN/inf semantics as :func:`run_program`; the most
    frequent opcodes are tested first.
    """
    for k in range(first, stop):
        op = ops[k, 0]
        a = regs[ops[k, 2]]
        if op == 4:  # MUL
            r = a * regs[ops[k, 3]]
        elif op == 2:  # ADD
            r = a + regs[ops[k, 3]]
        elif op == 3:  # SUB
            r = a - regs[ops[k, 3]]
        elif op == 5:  # DIV
            b = regs[ops[k, 3]]
            if b == 0.0:
                r = np.nan if (a == 0.0 or np.isnan(a)) else math.copysign(np.inf, a) * math.copysign(1.0, b)
            else:
                r = a / b
        elif op == 7:  # NEG
            r = -a
        elif op == 16:  # SQR
            r = a * a
        elif op == 6:  # POW
            r = np.power(a, regs[ops[k, 3]])
        elif op == 8:  # EXP
            r = np.exp(a)
        elif op == 9:  # LOG
            r = np.log(a) if a > 0.0 else (-np.inf if a == 0.0 else np.nan)
        elif op == 10:  # SQRT
            r = np.sqrt(a) if a >= 0.0 else np.nan
        elif op == 11:  # ABS
            r = abs(a)
        elif op == 12:  # MIN
            r = min(a, regs[ops[k, 3]])
        elif op == 13:  # MAX
            r = max(a, regs[ops[k, 3]])
        elif op == 14:  # SIGN
            r = 1.0 if a > 0.0 else (-1.0 if a < 0.0 else (0.0 if a == 0.0 else np.nan))
        else:  # SEL: x if a <= b else y
            r = regs[ops[k, 4]] if a <= regs[ops[k, 3]] else regs[ops[k, 5]]
        regs[ops[k, 1]] = r
