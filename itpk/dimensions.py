"""Units of a model file's expressions: worked out, checked and converted.

Every name a model file declares has a unit (parameters, covariates, derived
quantities, compartment amounts) and the model has a time unit, so every
expression has a unit as well. So has the place it stands in: a flow is a rate
per model time unit, an ODE right-hand side is its compartment's amount per
model time unit, a derived quantity and an output have their declared units,
a route's fraction is dimensionless, an initial amount is its compartment's
amount unit. :func:`check_units` compares the two for every expression.

Numbers need a rule, because ``CL / V`` has one reading but
``pi/6 * DIAM**3 / 1000`` (cm³ to L by hand) and ``TVCL * (WT / 70)**0.75``
(70 kg) do not:

- A number added to a quantity takes that quantity's unit (``1 - f_leak``,
  ``WT + 70``); an exponent is a pure number.
- An expression with no number that multiplies or divides is *definite*. Its
  dimension must be the place's; at another scale it is **converted** (a
  clearance in L/min in a model timed in h is multiplied by 60; ``central / V``
  with V in mL and the output in mg/L by 1000), and the conversion is listed
  (:attr:`UnitAnalysis.conversions`, shown by ``itpk models show``).
- An expression with such numbers is taken as written in the place's unit (its
  numbers may carry units, as 70 kg does), with one check: if reading its
  numbers as pure numbers gives the place's dimension at another scale, one of
  the numbers must be that very factor (``/ 1000`` for cm³ → L, a hand
  conversion); otherwise the expression is refused, since it is then either that
  many times off or relies on numbers that carry units unsaid.
- ``exp`` and ``log`` take dimensionless arguments (a scaled ratio such as
  mL/L is converted inside them) and give dimensionless results.

Conversions are multiplications by a constant put into the expression's tree;
the text stays as written, for messages. Units are parsed by
:mod:`itpk.units` (pint, with PFU, copies and cells as counts of their own).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from itpk.errors import DatasetError
from itpk.expr import CONSTANTS, Expr

if TYPE_CHECKING:
    import pint

    from itpk.spec import ModelSpec

__all__ = ["UnitAnalysis", "check_units", "unit_problems"]

_EXACT = 1e-9  # relative: a scale this close to 1 is 1 (mL^(1/3) = cm gives 1 + 2e-16)


@dataclass(frozen=True)
class UnitAnalysis:
    """The outcome of :func:`check_units`.

    Attributes
    ----------
    spec : ModelSpec
        The model with every conversion put into its expressions.
    problems : tuple of str
        One line per expression whose unit cannot be right (where, what, what is allowed).
    conversions : tuple of str
        One line per converted expression, e.g. ``[outputs] 'plasma': mg/mL -> mg/L (x 1000)``.
    """

    spec: ModelSpec
    problems: tuple[str, ...]
    conversions: tuple[str, ...]


class _Problem(Exception):
    """An expression's units cannot be right; the message says why."""


@dataclass(frozen=True)
class _Reading:
    """A subexpression's unit and its tree with conversions.

    ``unit`` reads every number as a pure number (None: unknown, because a name has no
    usable unit or the numbers make the reading ambiguous); ``free`` says that a number
    multiplies or divides somewhere below, so the numbers may carry units; ``literal``
    marks a bare number; ``value`` is the node's value when it is a constant.
    """

    unit: Any
    tree: ast.expr
    free: bool = False
    literal: bool = False
    value: float | None = None


def unit_problems(spec_units: Mapping[str, str], time_unit: str) -> list[str]:
    """Problems with the unit texts themselves: each must parse; ``time_unit`` must be a time.

    Parameters
    ----------
    spec_units
        Where (e.g. ``[parameters] 'CL' unit``) → unit text.
    time_unit
        The model's time unit.
    """
    problems = []
    for where, text in spec_units.items():
        if _parse(text) is None:
            problems.append(f"{where}: {text!r} is not a unit itpk knows (e.g. h, mg, L, mL/h, ng/mL, 1/h, PFU, copies/mL, cells, 1)")
    unit = _parse(time_unit)
    if unit is None or _dimensionality(unit) != _dimensionality(_parse("h")):
        problems.append(f"key 'time_unit': {time_unit!r} is not a unit of time (e.g. h, min, d)")
    return problems


def check_units(spec: ModelSpec) -> UnitAnalysis:
    """Work out the unit of every expression of ``spec``, check it against its place, convert.

    Names whose unit text does not parse are skipped here (:func:`unit_problems`
    reports them), and so is everything that uses them.

    Returns
    -------
    UnitAnalysis
        The converted model, the problems and the conversions made.
    """
    env = _environment(spec)
    per_time = _parse(f"1/({spec.time_unit})")
    amount = {c.name: _parse(c.amount_unit) for c in spec.compartments}
    problems: list[str] = []
    conversions: list[str] = []

    def place(expr: Expr, target: Any, where: str, why: str) -> Expr:
        try:
            tree, note = _fit(expr, env, target, why)
        except _Problem as exc:
            problems.append(f"{where}: {exc}")
            return expr
        if note:
            conversions.append(f"{where}: {note}")
        return expr if tree is expr.tree else replace(expr, tree=tree)

    derived = {name: replace(d, expr=place(d.expr, _parse(d.unit) if d.unit else None, f"[derived] {name!r}", f"its declared unit {d.unit}"))
               for name, d in spec.derived.items()}
    compartments = []
    for c in spec.compartments:
        initial = c.initial and place(c.initial, amount[c.name], f"[compartments] {c.name!r} initial", f"the amount unit {c.amount_unit}")
        volume = c.volume
        if volume is not None:
            reading = _safe_reading(volume, env, problems, f"[compartments] {c.name!r} volume")
            if reading is not None and not reading.free and reading.unit is not None and \
                    _dimensionality(reading.unit) != _dimensionality(_parse("L")):
                problems.append(f"[compartments] {c.name!r} volume: {volume.text!r} is in {_show(reading.unit)}, not a volume")
        compartments.append(replace(c, initial=initial, volume=volume))
    flows = []
    for f in spec.flows:
        where = f"[flows] {f.key!r}"
        if f.target in amount:
            problems.extend(_same_amounts(where, {f.source: amount[f.source], f.target: amount[f.target]}, spec))
        flows.append(replace(f, rate=place(f.rate, per_time, where, f"a first-order rate constant, per {spec.time_unit}")))
    odes = {}
    for name, rhs in spec.odes.items():
        unit = None if amount.get(name) is None or per_time is None else amount[name] * per_time
        odes[name] = place(rhs, unit, f"[odes] {name!r}", f"its compartment's amount per time, {_show(unit)}")
    routes = {}
    for name, route in spec.routes.items():
        where = f"[routes] {name!r}"
        problems.extend(_same_amounts(where, {c: amount[c] for c in (*route.into, *route.sites) if c in amount}, spec))
        into = {c: place(e, _parse("1"), f"{where} into {c!r}", "a fraction of the dose (dimensionless)") for c, e in route.into.items()}
        routes[name] = replace(route, into=into)
    outputs = {name: replace(o, expr=place(o.expr, _parse(o.unit), f"[outputs] {name!r}", f"its declared unit {o.unit}"))
               for name, o in spec.outputs.items()}
    converted = replace(spec, derived=derived, compartments=tuple(compartments), flows=tuple(flows), odes=odes,
                        routes=routes, outputs=outputs, conversions=tuple(conversions))
    return UnitAnalysis(converted, tuple(problems), tuple(conversions))


# --------------------------------------------------------------------------------------
# Units of names
# --------------------------------------------------------------------------------------


def _parse(text: str) -> Any:
    """The pint unit of ``text``, or None when it does not parse."""
    from itpk.units import parse_unit

    try:
        return parse_unit(text)
    except DatasetError:
        return None


def _dimensionality(unit: Any) -> Any:
    return (1 * unit).dimensionality


def _factor(source: Any, target: Any) -> float:
    """Value in ``target`` of 1 ``source`` (same dimension)."""
    return float((1 * source).to(target).magnitude)


def _show(unit: Any) -> str:
    """A unit as users write it: ``mL/h``, ``1/min``, ``PFU/cells`` (pint writes litres as ``l``)."""
    if unit is None:
        return "?"
    return re.sub(r"\b([munpcd]?)l\b", r"\1L", f"{unit:~C}") or "1"


def _environment(spec: ModelSpec) -> dict[str, Any]:
    """Name → pint unit (None: unknown) of everything an expression may use."""
    env: dict[str, Any] = {c.name: _parse(c.amount_unit) for c in spec.compartments}
    env.update({p.name: _parse(p.unit) for p in spec.parameters.values()})
    env.update({c.name: _parse(c.unit) if c.unit else None for c in spec.covariates.values()})
    env.update({d.name: _parse(d.unit) if d.unit else None for d in spec.derived.values()})
    return env


def _same_amounts(where: str, amounts: Mapping[str, Any], spec: ModelSpec) -> list[str]:
    """Compartments that exchange amounts (a flow) or share a dose (a route) must count them in one unit."""
    known = {c: u for c, u in amounts.items() if u is not None}
    units = {c.name: c.amount_unit for c in spec.compartments if c.name in known}
    first = next(iter(known.values()), None)
    if first is None or all(_dimensionality(u) == _dimensionality(first) and _close(_factor(u, first), 1.0) for u in known.values()):
        return []
    listed = ", ".join(f"{c} in {u}" for c, u in units.items())
    return [f"{where}: joins compartments with different amount units ({listed}); give them one amount unit"]


# --------------------------------------------------------------------------------------
# Units of expressions
# --------------------------------------------------------------------------------------


def _safe_reading(expr: Expr, env: Mapping[str, Any], problems: list[str], where: str) -> _Reading | None:
    try:
        return _read(expr.tree, env)
    except _Problem as exc:
        problems.append(f"{where}: {exc}")
        return None


def _fit(expr: Expr, env: Mapping[str, Any], target: Any, why: str) -> tuple[ast.expr, str]:
    """The tree of ``expr`` converted to ``target`` and a note of the conversion ('' if none)."""
    r = _read(expr.tree, env)
    if target is None or r.unit is None:
        return r.tree, ""
    free = _carries(r)
    if _dimensionality(r.unit) != _dimensionality(target):
        if free:  # its numbers carry the difference (70 kg): taken as written
            return r.tree, ""
        raise _Problem(f"{expr.text!r} is in {_show(r.unit)}, but must be in {_show(target)} ({why})")
    factor = _factor(r.unit, target)
    if _close(factor, 1.0):
        return r.tree, ""
    if not free:
        return _scaled(factor, r.tree), f"{_show(r.unit)} -> {_show(target)} (x {factor:g})"
    if any(_close(c, factor) or _close(c * factor, 1.0) for c in _numbers(expr.tree)):
        return r.tree, ""  # a hand conversion (/ 1000 for cm3 -> L): as written
    raise _Problem(
        f"{expr.text!r} reads as {_show(r.unit)} with its numbers as pure numbers: {factor:g} times the unit it must have, "
        f"{_show(target)} ({why}). itpk converts expressions without numbers itself but cannot tell a number that converts "
        f"or carries a unit from a pure one: remove numbers that convert units by hand, or make a number that carries a unit "
        f"a fixed parameter with that unit"
    )


def _read(node: ast.expr, env: Mapping[str, Any]) -> _Reading:
    if isinstance(node, ast.Constant):
        return _Reading(_one(), node, literal=True, value=float(node.value))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return _Reading(_one(), node, value=CONSTANTS[node.id])
        return _Reading(env.get(node.id), node)
    if isinstance(node, ast.UnaryOp):
        r = _read(node.operand, env)
        value = None if r.value is None else (-r.value if isinstance(node.op, ast.USub) else r.value)
        return replace(r, tree=ast.UnaryOp(op=node.op, operand=r.tree), value=value)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, (ast.Add, ast.Sub)):
            a, b = _read(node.left, env), _read(node.right, env)
            unit, (ta, tb), free = _common([a, b], "+" if isinstance(node.op, ast.Add) else "-")
            value = None if a.value is None or b.value is None else (a.value + b.value if isinstance(node.op, ast.Add) else a.value - b.value)
            return _Reading(unit, ast.BinOp(left=ta, op=node.op, right=tb), free=free, value=value)
        if isinstance(node.op, ast.Pow):
            return _power(node, env)
        a, b = _read(node.left, env), _read(node.right, env)
        free = _carries(a) or _carries(b)
        unit = None if a.unit is None or b.unit is None else (a.unit * b.unit if isinstance(node.op, ast.Mult) else a.unit / b.unit)
        value = None if a.value is None or b.value is None or (isinstance(node.op, ast.Div) and b.value == 0) else \
            (a.value * b.value if isinstance(node.op, ast.Mult) else a.value / b.value)
        return _Reading(unit, ast.BinOp(left=a.tree, op=node.op, right=b.tree), free=free, value=value)
    if isinstance(node, ast.Call):
        return _call(node, env)
    raise AssertionError(f"unvalidated node {type(node).__name__}")  # parse_expr refuses these


def _power(node: ast.BinOp, env: Mapping[str, Any]) -> _Reading:
    base, exponent = _read(node.left, env), _read(node.right, env)
    if exponent.unit is not None and not (exponent.free or exponent.literal) and not _dimensionless(exponent.unit):
        raise _Problem(f"an exponent must be a pure number, found {ast.unparse(node.right)!r} in {_show(exponent.unit)}")
    tree = lambda b: ast.BinOp(left=b, op=ast.Pow(), right=exponent.tree)
    if base.unit is None:
        return _Reading(None, tree(base.tree), free=base.free)
    if _dimensionless(base.unit):
        if base.free or base.literal:
            return _Reading(_one(), tree(base.tree), free=base.free)
        return _Reading(_one(), tree(_to_pure(base)))
    if exponent.value is None:
        if base.free or base.literal:
            return _Reading(None, tree(base.tree), free=True)
        raise _Problem(f"{ast.unparse(node.left)!r} in {_show(base.unit)} is raised to a power that is not a constant "
                       f"({ast.unparse(node.right)!r}); divide it by a parameter in the same unit first")
    return _Reading(base.unit**exponent.value, tree(base.tree), free=base.free or base.literal)


def _call(node: ast.Call, env: Mapping[str, Any]) -> _Reading:
    name = node.func.id  # type: ignore[union-attr]
    args = [_read(a, env) for a in node.args]
    func = ast.Name(id=name, ctx=ast.Load())
    if name in ("exp", "log"):
        (a,) = args
        if a.unit is None or a.free or a.literal:
            return _Reading(_one(), ast.Call(func=func, args=[a.tree], keywords=[]))
        if not _dimensionless(a.unit):
            raise _Problem(f"{name}() needs a dimensionless argument, found {ast.unparse(node.args[0])!r} in {_show(a.unit)}; "
                           f"divide it by a reference value in the same unit")
        return _Reading(_one(), ast.Call(func=func, args=[_to_pure(a)], keywords=[]))
    if name == "sqrt":
        (a,) = args
        return _Reading(None if a.unit is None else a.unit**0.5, ast.Call(func=func, args=[a.tree], keywords=[]), free=a.free or a.literal)
    if name == "abs":
        (a,) = args
        return replace(a, tree=ast.Call(func=func, args=[a.tree], keywords=[]), value=None if a.value is None else abs(a.value))
    unit, trees, free = _common(args, f"{name}()")
    return _Reading(unit, ast.Call(func=func, args=list(trees), keywords=[]), free=free)


def _common(args: list[_Reading], what: str) -> tuple[Any, list[ast.expr], bool]:
    """The shared unit of terms that are added or compared, each term's tree converted to it, and freeness.

    Bare numbers take the unit of the others; terms whose numbers may carry units
    (free) are not converted and leave the unit unknown if they disagree.
    """
    quantities = [r for r in args if not r.literal]
    if not quantities:
        return _one(), [r.tree for r in args], False
    if any(r.unit is None for r in quantities):
        return None, [r.tree for r in args], any(r.free for r in args)
    first = quantities[0]
    if any(r.free for r in quantities):
        same = all(_dimensionality(r.unit) == _dimensionality(first.unit) and _close(_factor(r.unit, first.unit), 1.0) for r in quantities)
        return (first.unit if same else None), [r.tree for r in args], True
    # a ratio such as L/mL is brought to a pure number first, so that an added number (V/Vref - 1) stays a pure number
    unit = _one() if _dimensionless(first.unit) else first.unit
    trees = []
    for r in args:
        if r.literal:
            trees.append(r.tree)
            continue
        if _dimensionality(r.unit) != _dimensionality(unit):
            raise _Problem(f"{what} joins {ast.unparse(first.tree)!r} in {_show(first.unit)} and {ast.unparse(r.tree)!r} "
                           f"in {_show(r.unit)}, which have different dimensions")
        factor = _factor(r.unit, unit)
        trees.append(r.tree if _close(factor, 1.0) else _scaled(factor, r.tree))
    return unit, trees, False


def _carries(r: _Reading) -> bool:
    """Whether a factor may carry a unit: a number other than 1 (``1 / tau`` is a pure reciprocal), or a free term."""
    return r.free or (r.literal and abs(r.value or 0.0) != 1.0)


def _to_pure(r: _Reading) -> ast.expr:
    """The tree of a dimensionless reading as a pure number (mL/L -> x 0.001)."""
    factor = _factor(r.unit, _one())
    return r.tree if _close(factor, 1.0) else _scaled(factor, r.tree)


def _scaled(factor: float, tree: ast.expr) -> ast.expr:
    return ast.BinOp(left=ast.Constant(value=float(factor)), op=ast.Mult(), right=tree)


def _numbers(tree: ast.expr) -> list[float]:
    return [abs(float(n.value)) for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value]


def _dimensionless(unit: Any) -> bool:
    return bool((1 * unit).dimensionless)


def _one() -> pint.Unit:
    from itpk.units import registry

    return registry().dimensionless


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_EXACT)
