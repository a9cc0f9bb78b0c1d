"""Plain-text description of a model (``itpk models show``)."""

from __future__ import annotations

from itpk.spec import ModelSpec


def describe_model(spec: ModelSpec) -> str:
    """Compartments, flows/ODEs, routes, outputs and parameters, as text."""
    kind = "linear (solved exactly)" if spec.is_linear else "nonlinear (ODE solver)"
    lines = [f"{spec.name} — {spec.description}", f"agent: {spec.agent}; time unit: {spec.time_unit}; {kind}; file: {spec.source}", ""]
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
        into = ", ".join(f"{c} × {e}" for c, e in r.into.items())
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
    lines.append(f"  {'name':<8} {'value':>10} {'unit':<8} {'IIV CV':>7}  {'prior':<36} description; source")
    for p in spec.parameters.values():
        iiv = f"{p.iiv_cv:.0%}" if p.iiv_cv else "-"
        prior = p.prior.describe() if p.prior else ("fixed" if p.fixed else "-")
        lines.append(f"  {p.name:<8} {p.value:>10.4g} {p.unit:<8} {iiv:>7}  {prior:<36} {p.description}; {p.source}")
    if spec.references:
        lines.append("references:")
        lines.extend(f"  - {r}" for r in spec.references)
    return "\n".join(lines)
