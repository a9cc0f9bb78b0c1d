"""The whitelisted expression language of model files.

Model files are data, never code: an expression is parsed with :mod:`ast`,
every node is checked against a short whitelist, and the tree is evaluated by
walking it with a backend's functions (numpy here, pytensor for fitting). No
user text ever reaches ``eval``, ``exec`` or ``compile``.

Allowed: numbers, names, ``+ - * / **``, unary ``-``/``+``, parentheses and
the calls ``exp log sqrt abs min max`` (``min``/``max`` with two or more
arguments). The constant ``pi`` is predefined.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from itpk.errors import ModelSpecError

FUNCTIONS: tuple[str, ...] = ("exp", "log", "sqrt", "abs", "min", "max")
CONSTANTS: dict[str, float] = {"pi": math.pi}

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_MAX_LENGTH = 2000
_MAX_DEPTH = 200


@dataclass(frozen=True)
class Expr:
    """A parsed, validated expression.

    Attributes
    ----------
    text : str
        The source text as written in the model file.
    names : frozenset of str
        Every free name the expression uses (constants such as ``pi`` excluded).
    """

    text: str
    names: frozenset[str]
    tree: ast.expr = field(repr=False, compare=False)

    def evaluate(self, env: Mapping[str, Any], backend: Mapping[str, Callable[..., Any]] | None = None) -> Any:
        """Evaluate with values for every name (scalars or broadcastable arrays).

        Parameters
        ----------
        env
            Values of the names; missing names raise ``KeyError``.
        backend
            Implementations of ``exp log sqrt abs min max``; numpy's by default.
        """
        return _eval(self.tree, env, backend or numpy_backend())

    def __str__(self) -> str:
        return self.text


def numpy_backend() -> dict[str, Callable[..., Any]]:
    """Numpy implementations of the whitelisted functions."""
    import numpy as np

    return _backend(np)


def _backend(module: Any) -> dict[str, Callable[..., Any]]:
    """The whitelisted functions from an array library with numpy's names (numpy, pytensor.tensor)."""
    return {
        "exp": module.exp,
        "log": module.log,
        "sqrt": module.sqrt,
        "abs": module.abs,
        "min": lambda *a: _fold(module.minimum, a),
        "max": lambda *a: _fold(module.maximum, a),
    }


def _fold(fn: Callable[[Any, Any], Any], args: tuple[Any, ...]) -> Any:
    out = args[0]
    for a in args[1:]:
        out = fn(out, a)
    return out


def parse_expr(text: str | int | float, *, where: str) -> Expr:
    """Parse and validate an expression.

    Parameters
    ----------
    text
        The expression (a number is accepted and kept as its text).
    where
        Where it stands, for error messages (e.g. ``"models/x.toml: [flows] 'central -> out'"``).

    Raises
    ------
    ModelSpecError
        If the text is not a valid expression or uses anything outside the whitelist.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ModelSpecError(f"{where}: expected an expression (text or number), found {text!r}")
    source = str(text).strip()
    if not source:
        raise ModelSpecError(f"{where}: empty expression")
    if len(source) > _MAX_LENGTH:
        raise ModelSpecError(f"{where}: expression longer than {_MAX_LENGTH} characters")
    try:
        module = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise ModelSpecError(f"{where}: cannot parse expression {source!r} ({exc.msg})") from None
    except (RecursionError, MemoryError):
        raise ModelSpecError(f"{where}: expression nested too deeply to parse") from None
    if _depth(module.body) > _MAX_DEPTH:  # every walk of the tree (checks, evaluation, derivatives) recurses
        raise ModelSpecError(f"{where}: expression nested deeper than {_MAX_DEPTH} levels; split it into [derived] quantities")
    names: set[str] = set()
    _check(module.body, source, where, names)
    _check_constants(module.body, source, where)
    return Expr(text=source, names=frozenset(names), tree=module.body)


def _depth(tree: ast.AST) -> int:
    """Nesting depth of a tree, without recursion (a deep tree is what is being guarded against)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _check_constants(node: ast.expr, source: str, where: str) -> float | None:
    """The value of a constant subtree (None if it uses a name); refuse one that is not a finite real number.

    Evaluated as the solvers do (numpy float64): ``1/0`` is inf and ``(-1)**0.5`` NaN, where
    Python floats would raise or turn complex.
    """
    if isinstance(node, ast.Constant):
        value: Any = float(node.value) if abs(node.value) < 1e308 else math.inf  # a 400-digit integer overflows float64
    elif isinstance(node, ast.Name):
        return CONSTANTS.get(node.id)
    else:
        parts = node.args if isinstance(node, ast.Call) else [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)]
        children = [_check_constants(c, source, where) for c in parts]  # once each: nested calls must not multiply the walk
        if any(c is None for c in children):
            return None
        with np.errstate(all="ignore"):
            value = _eval(node, {}, numpy_backend())
    if not np.isfinite(value):
        _refuse(node, source, where, f"constant part {ast.unparse(node)!r} (it is {float(value)}, not a finite number)")
    return float(value)


def _check(node: ast.AST, source: str, where: str, names: set[str]) -> None:
    """Walk the tree and refuse any node outside the whitelist."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            _refuse(node, source, where, f"literal {node.value!r} (only numbers are allowed)")
        return
    if isinstance(node, ast.Name):
        if node.id.startswith("_"):
            _refuse(node, source, where, f"name {node.id!r} (names may not start with '_')")
        if node.id not in CONSTANTS:
            names.add(node.id)
        return
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            _refuse(node, source, where, f"operator {type(node.op).__name__}")
        _check(node.left, source, where, names)
        _check(node.right, source, where, names)
        return
    if isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            _refuse(node, source, where, f"operator {type(node.op).__name__}")
        _check(node.operand, source, where, names)
        return
    if isinstance(node, ast.Call):
        _check_call(node, source, where, names)
        return
    _refuse(node, source, where, _describe(node))


def _check_call(node: ast.Call, source: str, where: str, names: set[str]) -> None:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        called = repr(node.func.id) if isinstance(node.func, ast.Name) else f"the result of {_describe(node.func)}"
        _refuse(node, source, where, f"call of {called}")
    if node.keywords:
        _refuse(node, source, where, "keyword arguments")
    fname = node.func.id  # type: ignore[union-attr]
    want_one = fname not in ("min", "max")
    if (want_one and len(node.args) != 1) or (not want_one and len(node.args) < 2):
        need = "exactly one argument" if want_one else "two or more arguments"
        _refuse(node, source, where, f"{fname}() with {len(node.args)} argument(s) ({fname} takes {need})")
    for arg in node.args:
        if isinstance(arg, ast.Starred):
            _refuse(arg, source, where, "starred argument")
        _check(arg, source, where, names)


def _describe(node: ast.AST) -> str:
    kinds = {
        ast.Attribute: "attribute access",
        ast.Subscript: "subscript",
        ast.Lambda: "lambda",
        ast.Compare: "comparison",
        ast.BoolOp: "boolean operator",
        ast.IfExp: "conditional expression",
        ast.List: "list",
        ast.Tuple: "tuple",
        ast.Dict: "dict",
        ast.Set: "set",
        ast.ListComp: "comprehension",
        ast.GeneratorExp: "comprehension",
        ast.NamedExpr: "assignment",
        ast.JoinedStr: "string",
    }
    return kinds.get(type(node), type(node).__name__)


def _refuse(node: ast.AST, source: str, where: str, what: str) -> None:
    col = getattr(node, "col_offset", 0)
    raise ModelSpecError(
        f"{where}: {what} is not allowed in expression {source!r} (at column {col + 1}); "
        f"allowed: numbers, names, + - * / **, unary minus, parentheses, {', '.join(FUNCTIONS)}"
    )


def _eval(node: ast.expr, env: Mapping[str, Any], backend: Mapping[str, Callable[..., Any]]) -> Any:
    if isinstance(node, ast.Constant):
        return np.float64(node.value)  # numpy semantics, as the compiled solvers have: 1/0 is inf, not an exception
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_eval(node.left, env, backend), _eval(node.right, env, backend))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, env, backend))
    if isinstance(node, ast.Call):
        return backend[node.func.id](*(_eval(a, env, backend) for a in node.args))  # type: ignore[union-attr]
    raise AssertionError(f"unvalidated node {type(node).__name__}")  # parse_expr refuses these


def state_degree(expr: Expr, states: frozenset[str]) -> int | None:
    """Polynomial degree of ``expr`` in the state names, or None when not polynomial.

    Used to decide whether a model made of flows and outputs is linear in its
    amounts (degree <= 1), which selects the exact matrix-exponential solver.
    """
    return _degree(expr.tree, states)


def _degree(node: ast.expr, states: frozenset[str]) -> int | None:
    if isinstance(node, ast.Constant):
        return 0
    if isinstance(node, ast.Name):
        return 1 if node.id in states else 0
    if isinstance(node, ast.UnaryOp):
        return _degree(node.operand, states)
    if isinstance(node, ast.BinOp):
        left, right = _degree(node.left, states), _degree(node.right, states)
        if left is None or right is None:
            return None
        if isinstance(node.op, (ast.Add, ast.Sub)):
            return max(left, right)
        if isinstance(node.op, ast.Mult):
            return left + right
        if isinstance(node.op, ast.Div):
            return left if right == 0 else None
        return 0 if left == 0 and right == 0 else None  # Pow
    if isinstance(node, ast.Call):
        degrees = [_degree(a, states) for a in node.args]
        return 0 if all(d == 0 for d in degrees) else None
    return None


def pytensor_backend() -> dict[str, Callable[..., Any]]:
    """Pytensor implementations of the whitelisted functions (for model building)."""
    import pytensor.tensor as pt

    return _backend(pt)
