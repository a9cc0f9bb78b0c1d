"""Plain-text description of a model (``itpk models show``)."""

from __future__ import annotations

import ast
from collections.abc import Sequence

from itpk.expr import Expr
from itpk.spec import ModelSpec


def _factor(expr: Expr) -> str:
    """An expression as a factor of a product: bracketed unless it is a name, a number or a call."""
    tree = ast.parse(expr.text.strip(), mode="eval").body if expr.text.strip() else None
    simple = isinstance(tree, (ast.Name, ast.Constant, ast.Call))
    return expr.text.strip() if simple else f"({expr.text.strip()})"


def describe_model(spec: ModelSpec) -> str:
    """Compartments, flows/ODEs, routes, outputs and parameters, as text."""
    kind = "linear (solved exactly)" if spec.is_linear else "nonlinear (ODE solver)"
    lines = [f"{spec.name} — {spec.description}", f"agent: {spec.agent}; time unit: {spec.time_unit}; {kind}; file: {spec.path or spec.source}", ""]
    lines.append("compartments (CMT number on dose rows):")
    for i, c in enumerate(spec.compartments, 1):
        vol = f", volume {c.volume}" if c.volume else ""
        lines.append(f"  {i}. {c.name} [{c.amount_unit}{vol}] {c.description}")
    if spec.flows:
        lines.append("flows (first-order, amount/time = rate × amount):")
        lines.extend(f"  {f.key}: {f.rate}" for f in spec.flows)
    if spec.odes:
        lines.append("ode terms (added to the balance of each compartment, amount/time):")
        lines.extend(f"  d{name}/dt += {expr}" for name, expr in spec.odes.items())
    lines.append("routes (fraction of the dose into each compartment):")
    for r in spec.routes.values():
        into = ", ".join(f"{c} × {_factor(e)}" for c, e in r.into.items())
        lines.append(f"  {r.name}: {into}" + (f" — {r.description}" if r.description else ""))
        if len(r.sites) > 1:
            lines.append(f"    CMT on its dose rows may move {r.site}'s share to: {', '.join(r.sites[1:])}")
    lines.append("outputs (CMT number on observation rows):")
    for i, o in enumerate(spec.outputs.values(), 1):
        lines.append(f"  {i}. {o.name} = {o.expr} [{o.unit}], error {o.error}" + (f" — {o.description}" if o.description else ""))
    if spec.derived:
        lines.append("derived quantities:")
        lines.extend(f"  {d.name} = {d.expr}" + (f" [{d.unit}]" if d.unit else "") for d in spec.derived.values())
    if spec.covariates:
        lines.append("covariates (default):")
        lines.extend(f"  {c.name} = {c.value:g} {c.unit} {c.description}" + (" (time-varying: NOCB)" if c.time_varying else "")
                     for c in spec.covariates.values())
    if spec.conversions:
        lines.append("unit conversions itpk puts into expressions (itpk.dimensions):")
        lines.extend(f"  {c}" for c in spec.conversions)
    lines.append("parameters:")
    rows = [(p.name, f"{p.value:.4g}", p.unit, f"{p.iiv_cv:.0%}" if p.iiv_cv else "-",
             p.prior.describe() if p.prior else ("fixed" if p.fixed else "-"), f"{p.description}; {p.source}")
            for p in spec.parameters.values()]
    lines.extend("  " + line for line in _table(("name", "value", "unit", "IIV CV", "prior", "description; source"), rows, "<><><<"))
    if spec.references:
        lines.append("references:")
        lines.extend(f"  - {r}" for r in spec.references)
    return "\n".join(lines)



def describe_library(specs: Sequence[ModelSpec]) -> str:
    """The model library (``itpk models list``): one row per model, columns as wide as their longest entry."""
    rows = [(s.name, s.agent, ",".join(s.routes), ",".join(s.outputs),
             s.description + ("" if s.is_linear or "nonlinear" in s.description else " [nonlinear]")) for s in specs]
    return "\n".join(_table(("model", "agent", "routes", "outputs", "description"), rows, "<<<<<"))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Lines of a text table: every column but the last padded to its longest entry (``<`` left, ``>`` right)."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header) - 1)]
    out = []
    for row in (header, *rows):
        cells = [f"{cell!s:{a}{w}}" for cell, a, w in zip(row, align, widths, strict=False)]
        out.append("  ".join([*cells, str(row[-1])]).rstrip())
    return out
