"""Units of a model file's expressions: worked out, checked and converted.

Every name a model file declares has a unit (parameters, covariates, derived
quantities, compartment amounts) and the model has a time unit, so every
expression has a unit as well. So has the place it stands in: a flow is a rate
per model time unit, an ODE right-hand side is its compartment's amount per
model time unit, a derived quantity and an output have their declared units,
a route's fraction is dimensionless, an initial amount is its compartment's
amount unit. :func:`check_units` compares the two for every expression.

Numbers need a rule, because ``CL / V`` has one reading but
``pi/6 * DIAM**3 / 1000`` (cm³ to L by hand) and ``TVV * WT / 70`` (70 kg) do not:

- A number added to a quantity takes that quantity's unit (``1 - f_leak``,
  ``WT + 70``); so does one that divides a quantity raised to a fractional power
  (``(WT / 70)**0.75``: a reference weight, the power a pure number); an exponent is
  a pure number, and ``1`` and functions of numbers (``log(2)``) are pure numbers.
- An expression (or a term of a sum, or the argument of ``exp``/``log``) with no
  number that multiplies or divides is *definite*. Its dimension must be the
  place's; at another scale it is **converted** (a clearance in L/min in a model
  timed in h is multiplied by 60; ``central / V`` with V in mL and the output in
  mg/L by 1000), and the conversion is listed (:attr:`UnitAnalysis.conversions`,
  shown by ``itpk models show``).
- One with such numbers (``10**3`` counts as one) is taken as written (its numbers
  may carry units, as 70 kg does) when its pure-number reading has another
  dimension. When that reading has the right dimension at another scale, a number
  multiplying (c) or dividing (1/c) it must be exactly that factor, in that
  direction (``/ 1000`` for cm³ → L, a hand conversion); otherwise it is refused,
  since it is then either that many times off or relies on numbers that carry units
  unsaid.
- A quantity raised to a non-constant power (a Hill term ``C**gam``) has no unit
  to work out: what uses it is not checked.

Conversions are multiplications by a constant put into the expression's tree;
the text stays as written, for messages. Units are parsed by
:mod:`itpk.units` (pint, with PFU, copies, cells, vg, TCID50 and IU as counts of their own).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

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
    usable unit or a power's exponent is not a constant); ``free`` says that a number
    multiplies or divides somewhere below, so the numbers may carry units; ``literal``
    marks a number (or arithmetic on numbers: ``10**3``); ``value`` is the node's value when
    it is a constant; ``factors`` are the numbers that multiply (c) or divide (1/c) the whole
    node, where a hand conversion would stand.
    """

    unit: Any
    tree: ast.expr
    free: bool = False
    literal: bool = False
    value: float | None = None
    factors: tuple[float, ...] = ()


def unit_problems(spec_units: Mapping[str, str], time_unit: str | None) -> list[str]:
    """Problems with the unit texts themselves: each must parse; ``time_unit`` must be a time.

    Parameters
    ----------
    spec_units
        Where (e.g. ``[parameters] 'CL' unit``) → unit text.
    time_unit
        The model's time unit; None when it is missing (reported elsewhere).
    """
    problems = []
    for where, text in spec_units.items():
        if _parse(text) is None:
            problems.append(f"{where}: {text!r} is not a unit itpk knows (e.g. h, mg, L, mL/h, ng/mL, 1/h, PFU, copies/mL, cells, 1)")
    if time_unit is None:
        return problems
    unit = _parse(time_unit)
    if unit is None or _dimensionality(unit) != _dimensionality(_parse("h")):
        problems.append(f"key 'time_unit': {time_unit!r} is not a unit of time (e.g. h, min, d)")
    return problems


def check_units(spec: ModelSpec) -> UnitAnalysis:
    """Work out the unit of every expression of ``spec``, check it against its place, convert.

    Names whose unit text does not parse are skipped here (:func:`unit_problems`
    reports them), and so is everything that uses them. A derived quantity without a
    declared unit takes the unit of its expression when that has one reading.

    Returns
    -------
    UnitAnalysis
        The converted model, the problems and the conversions made.
    """
    env = _environment(spec)
    time = _parse(spec.time_unit) if spec.time_unit else None
    per_time = None if time is None or _dimensionality(time) != _dimensionality(_parse("h")) else _parse(f"1/({spec.time_unit})")
    amount = {c.name: _parse(c.amount_unit) if c.amount_unit else None for c in spec.compartments}
    problems: list[str] = []
    conversions: list[str] = []

    def place(expr: Expr, target: Any, where: str, why: str) -> Expr:
        reader = _Reader(env)
        try:
            tree, note = reader.fit(expr, target, why)
        except _Problem as exc:
            problems.append(f"{where}: {exc}")
            return expr
        except Exception as exc:  # noqa: BLE001 - pint's own errors (offset units such as degC), overflow: one message
            problems.append(f"{where}: cannot work out the unit of {expr.text!r} ({type(exc).__name__}: {exc})")
            return expr
        conversions.extend(f"{where}: {n}" for n in (*reader.notes, note) if n)
        return expr if tree is expr.tree else replace(expr, tree=tree)

    derived = {}
    for name, d in spec.derived.items():
        where = f"[derived] {name!r}"
        if d.unit:
            derived[name] = replace(d, expr=place(d.expr, _parse(d.unit), where, f"its declared unit {d.unit}"))
            continue
        reading = _safe_reading(d.expr, env, problems, where)
        env[name] = reading.unit if reading is not None and not (reading.free or reading.literal) else None
        derived[name] = d
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
        if f.target in amount and f.source in amount:
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
    """Name → pint unit (None: unknown) of everything an expression may use.

    A name declared twice (reported by the model's reader) has no unit: which one is meant is unknown.
    """
    groups = [
        {c.name: _parse(c.amount_unit) if c.amount_unit else None for c in spec.compartments},
        {p.name: _parse(p.unit) for p in spec.parameters.values()},
        {c.name: _parse(c.unit) if c.unit else None for c in spec.covariates.values()},
        {d.name: _parse(d.unit) if d.unit else None for d in spec.derived.values()},
    ]
    env: dict[str, Any] = {}
    twice: set[str] = set()
    for group in groups:
        twice |= set(group) & set(env)
        env.update(group)
    env.update(dict.fromkeys(twice))
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
        return _Reader(env).read(expr.tree)
    except _Problem as exc:
        problems.append(f"{where}: {exc}")
    except Exception as exc:  # noqa: BLE001 - see check_units
        problems.append(f"{where}: cannot work out the unit of {expr.text!r} ({type(exc).__name__}: {exc})")
    return None


class _Reader:
    """Reads the unit of an expression tree, building its tree with conversions; ``notes`` lists the inner ones."""

    def __init__(self, env: Mapping[str, Any]) -> None:
        self.env = env
        self.notes: list[str] = []

    # -- the whole expression ------------------------------------------------------------
    def fit(self, expr: Expr, target: Any, why: str) -> tuple[ast.expr, str]:
        """The tree of ``expr`` converted to ``target`` and a note of the conversion ('' if none)."""
        r = self.read(expr.tree)
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
        if _explained(r, factor):
            return r.tree, ""  # a hand conversion (/ 1000 for cm3 -> L): as written
        raise _Problem(
            f"{expr.text!r} reads as {_show(r.unit)} with its numbers as pure numbers: {factor:g} times the unit it must have, "
            f"{_show(target)} ({why}). itpk converts expressions without numbers itself but cannot tell a number that converts "
            f"or carries a unit from a pure one: remove numbers that convert units by hand, or make a number that carries a unit "
            f"a fixed parameter with that unit"
        )

    # -- nodes --------------------------------------------------------------------------
    def read(self, node: ast.expr) -> _Reading:
        if isinstance(node, ast.Constant):
            value = float(node.value)
            return _Reading(_one(), node, literal=True, value=value, factors=(abs(value),))
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return _Reading(_one(), node, value=CONSTANTS[node.id])
            return _Reading(self.env.get(node.id), node)
        if isinstance(node, ast.UnaryOp):
            r = self.read(node.operand)
            value = None if r.value is None else (-r.value if isinstance(node.op, ast.USub) else r.value)
            return replace(r, tree=ast.UnaryOp(op=node.op, operand=r.tree), value=value)
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, (ast.Add, ast.Sub)):
                return self._sum(node)
            if isinstance(node.op, ast.Pow):
                return self._power(node)
            return self._product(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise AssertionError(f"unvalidated node {type(node).__name__}")  # parse_expr refuses these

    def _sum(self, node: ast.BinOp) -> _Reading:
        a, b = self.read(node.left), self.read(node.right)
        add = isinstance(node.op, ast.Add)
        unit, (ta, tb), free = self._common([a, b], "+" if add else "-")
        value = None if a.value is None or b.value is None else (a.value + b.value if add else a.value - b.value)
        literal = a.literal and b.literal
        return _Reading(unit, ast.BinOp(left=ta, op=node.op, right=tb), free=free, literal=literal, value=value,
                        factors=(abs(value),) if literal and value else ())

    def _product(self, node: ast.BinOp) -> _Reading:
        a, b = self.read(node.left), self.read(node.right)
        mult = isinstance(node.op, ast.Mult)
        unit = None if a.unit is None or b.unit is None else (a.unit * b.unit if mult else a.unit / b.unit)
        value = None
        if a.value is not None and b.value is not None and (mult or b.value != 0):
            value = a.value * b.value if mult else a.value / b.value
        factors = a.factors + (b.factors if mult else tuple(1.0 / f for f in b.factors if f))
        return _Reading(unit, ast.BinOp(left=a.tree, op=node.op, right=b.tree), free=_carries(a) or _carries(b),
                        literal=a.literal and b.literal, value=value, factors=factors)

    def _power(self, node: ast.BinOp) -> _Reading:
        base, exponent = self.read(node.left), self.read(node.right)
        e_tree = self._pure(exponent, node.right, "an exponent")
        tree = lambda b: ast.BinOp(left=b, op=ast.Pow(), right=e_tree)
        literal = base.literal and exponent.value is not None
        value = None
        if base.value is not None and exponent.value is not None:
            with np.errstate(all="ignore"):
                value = float(np.power(base.value, exponent.value))
        constant = {"literal": literal, "value": value, "factors": (abs(value),) if literal and value else ()}
        if base.unit is None:
            return _Reading(None, tree(base.tree), free=base.free, **constant)
        whole = exponent.value is not None and float(exponent.value).is_integer()
        if not whole and not _dimensionless(base.unit) and _reference(node.left, base):  # (WT / 70)**0.75: 70 is a weight
            return _Reading(_one(), tree(base.tree), **constant)
        if _dimensionless(base.unit):
            return _Reading(_one(), tree(self._pure(base, node.left, "the base of a power")), free=base.free, **constant)
        if exponent.value is None:  # a Hill term C**gam: no unit to work out, nothing to check
            return _Reading(None, tree(base.tree), free=True)
        return _Reading(base.unit**exponent.value, tree(base.tree), free=_carries(base), **constant)

    def _call(self, node: ast.Call) -> _Reading:
        name = node.func.id  # type: ignore[union-attr]
        args = [self.read(a) for a in node.args]
        func = ast.Name(id=name, ctx=ast.Load())
        call = lambda trees: ast.Call(func=func, args=list(trees), keywords=[])
        if name in ("exp", "log", "sqrt", "abs") and args[0].value is not None:
            with np.errstate(all="ignore"):
                value = float({"exp": np.exp, "log": np.log, "sqrt": np.sqrt, "abs": np.abs}[name](args[0].value))
        else:
            value = None
        if name in ("exp", "log"):
            return _Reading(_one(), call([self._pure(args[0], node.args[0], f"the argument of {name}()")]), value=value)
        a = args[0]
        if name == "sqrt":
            return _Reading(None if a.unit is None else a.unit**0.5, call([a.tree]), free=_carries(a), value=value)
        if name == "abs":
            return replace(a, tree=call([a.tree]), value=value)
        unit, trees, free = self._common(args, f"{name}()")
        return _Reading(unit, call(trees), free=free)

    # -- rules ----------------------------------------------------------------------------
    def _common(self, args: list[_Reading], what: str) -> tuple[Any, list[ast.expr], bool]:
        """The unit of terms that are added or compared, each term's tree converted to it, and freeness.

        Numbers take the unit of the others. Terms without multiplying numbers fix the unit and are
        converted to it; terms with them are taken as written, unless their pure-number reading has
        that dimension at another scale that none of their numbers explains.
        """
        quantities = [r for r in args if not r.literal]
        if not quantities:
            return _one(), [r.tree for r in args], False
        if any(r.unit is None for r in quantities):
            return None, [r.tree for r in args], any(r.free for r in args)
        definite = [r for r in quantities if not r.free]
        if not definite:  # every term may carry units: one unit if they agree, else unknown
            first = quantities[0].unit
            same = all(_dimensionality(r.unit) == _dimensionality(first) and _close(_factor(r.unit, first), 1.0) for r in quantities)
            return (first if same else None), [r.tree for r in args], True
        # a ratio such as L/mL is brought to a pure number first, so that an added number (V/Vref - 1) stays pure
        unit = _one() if _dimensionless(definite[0].unit) else definite[0].unit
        trees = []
        for r in args:
            if r.literal or _dimensionality(r.unit) != _dimensionality(unit):
                if not (r.literal or r.free):
                    raise _Problem(f"{what} joins {ast.unparse(definite[0].tree)!r} in {_show(definite[0].unit)} and "
                                   f"{ast.unparse(r.tree)!r} in {_show(r.unit)}, which have different dimensions")
                trees.append(r.tree)  # a number, or a term whose numbers carry the difference
                continue
            factor = _factor(r.unit, unit)
            if r.free and not _close(factor, 1.0) and not _explained(r, factor):
                raise _Problem(f"{what} joins {ast.unparse(definite[0].tree)!r} in {_show(definite[0].unit)} and "
                               f"{ast.unparse(r.tree)!r}, which reads as {factor:g} times that with its numbers as pure numbers; "
                               f"make a number that carries a unit a fixed parameter with that unit")
            if r.free or _close(factor, 1.0):
                trees.append(r.tree)
            else:
                trees.append(_scaled(factor, r.tree))
                self.notes.append(f"term {ast.unparse(r.tree)!r}: {_show(r.unit)} -> {_show(unit)} (x {factor:g})")
        return unit, trees, False

    def _pure(self, r: _Reading, node: ast.expr, what: str) -> ast.expr:
        """The tree of ``r`` where a pure number is needed (exp, log, exponents, bases of fractional powers)."""
        if r.unit is None or r.literal:
            return r.tree
        if not _dimensionless(r.unit):
            if r.free and _reference(node, r):  # WT / 70: 70 is a weight, the ratio a pure number
                return r.tree
            if r.free:
                return r.tree  # its numbers may carry the unit (exp(-0.1*WT), 0.1 per kg): taken as written
            raise _Problem(f"{what} must be a pure number, found {ast.unparse(node)!r} in {_show(r.unit)}; "
                           f"divide it by a reference value in the same unit")
        factor = _factor(r.unit, _one())
        if _close(factor, 1.0):
            return r.tree
        if not r.free:
            self.notes.append(f"{what} {ast.unparse(node)!r}: {_show(r.unit)} -> 1 (x {factor:g})")
            return _scaled(factor, r.tree)
        if _explained(r, factor):
            return r.tree
        raise _Problem(f"{what} {ast.unparse(node)!r} reads as {factor:g} (a ratio in {_show(r.unit)}) times a pure number with "
                       f"its numbers as pure numbers; make a number that carries a unit a fixed parameter with that unit")


def _reference(node: ast.expr, r: _Reading) -> bool:
    """``X / c`` with X a quantity and c a number: c is a reference value in X's unit (WT / 70 kg)."""
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) and r.unit is not None


def _explained(r: _Reading, factor: float) -> bool:
    """Whether a number that multiplies (c) or divides (1/c) the expression is the conversion ``factor`` itself."""
    product = math.prod(r.factors) if r.factors else None
    return any(_close(f, factor) for f in r.factors) or (product is not None and _close(product, factor))


def _carries(r: _Reading) -> bool:
    """Whether a factor may carry a unit: a number other than 1 (``1 / tau`` is a pure reciprocal), or a free term."""
    return r.free or (r.literal and abs(r.value or 0.0) != 1.0)


def _scaled(factor: float, tree: ast.expr) -> ast.expr:
    return ast.BinOp(left=ast.Constant(value=float(factor)), op=ast.Mult(), right=tree)


def _dimensionless(unit: Any) -> bool:
    return bool((1 * unit).dimensionless)


def _one() -> pint.Unit:
    from itpk.units import registry

    return registry().dimensionless


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_EXACT)
