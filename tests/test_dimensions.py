"""Units of model expressions (itpk.dimensions): checked, converted, refused — against exact solutions."""

import copy
import tomllib
from importlib.resources import files

import numpy as np
import pytest
from typer.testing import CliRunner

from itpk import load_model
from itpk.cli.main import app
from itpk.dimensions import check_units
from itpk.errors import ModelSpecError
from itpk.events import regimen
from itpk.exposure import auc_nonlinear
from itpk.simulate import simulate
from itpk.spec import _read_resolved, builtin_models, parse_model
from itpk.system import resolve

REL = 1e-12  # exact (matrix-exponential) solutions of the same model in other units
REL_ODE = 1e-8  # the nonlinear kernel (rtol 1e-10) against itself in other units
TIMES = np.array([0.5, 1.0, 4.0, 10.0])


def raw_of(name):
    return tomllib.loads(files("itpk.models").joinpath(f"{name}.toml").read_text())


def one_cpt(**changes):
    """one_cpt_iv (CL 5 L/h, V 50 L) with entries replaced: key 'parameters.CL' -> table, etc."""
    raw = copy.deepcopy(raw_of("one_cpt_iv"))
    for path, value in changes.items():
        *tables, key = path.split(".")
        table = raw
        for t in tables:
            table = table.setdefault(t, {})
        table[key] = value
    return raw


def plasma(raw, times=TIMES, dose=100.0):
    spec = parse_model(raw, source="m.toml")
    return simulate(spec, regimen("iv", dose), None, times).outputs["plasma"][0]


def exact(times, dose=100.0, cl=5.0, v=50.0):
    """mg/L after a bolus of ``dose`` mg, time in h."""
    return dose / v * np.exp(-cl / v * times)


def problems(raw):
    with pytest.raises(ModelSpecError) as info:
        parse_model(raw, source="m.toml")
    return str(info.value)


@pytest.mark.parametrize("name", builtin_models())
def test_builtin_models_need_no_conversion(name):
    # load_model skips the analysis for built-in models (pint costs ~1 s at start-up): it must change nothing there
    raw, source, inherited = _read_resolved(name, ())
    assert inherited == []
    plain = parse_model(raw, source=source, units=False)
    analysis = check_units(plain)
    assert analysis.problems == () and analysis.conversions == ()
    assert analysis.spec == plain and load_model(name).conversions == ()
    assert trees(analysis.spec) == trees(plain)  # Expr equality ignores trees: compare them too


def trees(spec):
    import ast

    exprs = [*(d.expr for d in spec.derived.values()), *(f.rate for f in spec.flows), *spec.odes.values(),
             *(e for r in spec.routes.values() for e in r.into.values()), *(o.expr for o in spec.outputs.values()),
             *(c.initial for c in spec.compartments if c.initial is not None)]
    return [ast.dump(e.tree) for e in exprs]


def test_volumes_and_clearances_in_ml_are_converted_for_an_output_in_mg_per_l():
    raw = one_cpt(**{"parameters.CL": {"value": 5000.0, "unit": "mL/h"}, "parameters.V": {"value": 50000.0, "unit": "mL"}})
    spec = parse_model(raw, source="m.toml")
    assert spec.conversions == ("[outputs] 'plasma': mg/mL -> mg/L (x 1000)",)
    np.testing.assert_allclose(plasma(raw), exact(TIMES), rtol=REL)


def test_a_clearance_per_minute_is_converted_to_the_model_hour():
    raw = one_cpt(**{"parameters.CL": {"value": 5.0 / 60.0, "unit": "L/min"}})
    assert parse_model(raw).conversions == ("[flows] 'central -> out': 1/min -> 1/h (x 60)",)
    np.testing.assert_allclose(plasma(raw), exact(TIMES), rtol=REL)


def test_a_model_timed_in_days_converts_hourly_rates():
    raw = one_cpt(time_unit="d")
    days = TIMES / 24.0
    np.testing.assert_allclose(plasma(raw, days), exact(TIMES), rtol=REL)


def test_an_output_in_ng_per_ml_is_converted():
    raw = one_cpt(**{"outputs.plasma": {"expr": "central / V", "unit": "ng/mL"}})
    np.testing.assert_allclose(plasma(raw), 1000.0 * exact(TIMES), rtol=REL)


def test_terms_added_in_different_volume_units_are_converted():
    # V = V1 + V2 with V2 in mL: 40 L + 10 000 mL = 50 L
    raw = one_cpt(**{"parameters.V1": {"value": 40.0, "unit": "L"}, "parameters.V2": {"value": 10000.0, "unit": "mL"},
                     "derived.Vd": {"expr": "V1 + V2", "unit": "L"}})
    raw["flows"]["central -> out"] = "CL / Vd"
    raw["outputs"]["plasma"]["expr"] = "central / Vd"
    np.testing.assert_allclose(plasma(raw), exact(TIMES), rtol=REL)


def test_a_dimensionless_ratio_inside_exp_is_converted():
    # CL·exp(V/Vref − 1) with V = 50 L and Vref = 50 000 mL is CL
    raw = one_cpt(**{"parameters.Vref": {"value": 50000.0, "unit": "mL"}, "derived.CLe": {"expr": "CL * exp(V / Vref - 1)", "unit": "L/h"}})
    raw["flows"]["central -> out"] = "CLe / V"
    np.testing.assert_allclose(plasma(raw), exact(TIMES), rtol=REL)


def test_nonlinear_right_hand_sides_and_their_auc_are_converted():
    raw = raw_of("one_cpt_mm")
    raw["parameters"]["Vmax"] = {"value": 10.0 / 60.0, "unit": "mg/min"}
    raw["outputs"]["plasma"]["unit"] = "ng/mL"
    spec, base = parse_model(raw, source="m.toml"), load_model("one_cpt_mm")
    assert spec.conversions == ("[odes] 'central': mg/min -> mg/h (x 60)", "[outputs] 'plasma': mg/L -> ng/mL (x 1000)")
    got = simulate(spec, regimen("iv", 100.0), None, TIMES).outputs["plasma"][0]
    want = simulate(base, regimen("iv", 100.0), None, TIMES).outputs["plasma"][0]
    np.testing.assert_allclose(got, 1000.0 * want, rtol=REL_ODE)
    auc = auc_nonlinear(resolve(spec), regimen("iv", 100.0), ["plasma"], 48.0)["plasma"]
    auc_base = auc_nonlinear(resolve(base), regimen("iv", 100.0), ["plasma"], 48.0)["plasma"]
    np.testing.assert_allclose(auc, 1000.0 * auc_base, rtol=REL_ODE)


@pytest.mark.parametrize("expr, unit", [
    ("TVCL * (WT / 70)**0.75", "L/h"),  # 70 kg: a number that carries a unit
    ("TVCL * WT / (WT + 70)", "L/h"),   # a number added to a weight is a weight
    ("pi / 6 * DIAM**3 / 1000", "L"),   # cm3 -> L by hand: the number is the conversion
    ("1 / (V / TVCL)", "1/h"),          # 1 is a pure number
    ("TVCL * exp(log(WT / 70) * 0.75)", "L/h"),
])
def test_conventional_expressions_are_taken_as_written(expr, unit):
    raw = one_cpt(**{"parameters.TVCL": {"value": 5.0, "unit": "L/h"}, "covariates.WT": {"value": 70.0, "unit": "kg"},
                     "covariates.DIAM": {"value": 2.0, "unit": "cm"}, "derived.X": {"expr": expr, "unit": unit}})
    spec = parse_model(raw, source="m.toml")
    assert spec.conversions == ()
    assert spec.derived["X"].expr.tree is not None and spec.derived["X"].expr.text == expr


def test_every_unit_problem_is_listed_at_once():
    raw = one_cpt(**{
        "parameters.T0": {"value": 1.0, "unit": "h"},
        "parameters.Q": {"value": 1.0, "unit": "litres per fortnight_bogus"},
        "derived.A": {"expr": "CL + V", "unit": "L/h"},
        "derived.B": {"expr": "exp(CL)", "unit": "1"},
        "derived.C": {"expr": "V ** (CL * T0 / V + CL)", "unit": "L"},
        "derived.D": {"expr": "2 * CL", "unit": "mL/h"},
        "derived.E": {"expr": "CL / V", "unit": "L"},
        "outputs.plasma": {"expr": "central / V", "unit": "mg"},
    })
    raw["time_unit"] = "h"
    text = problems(raw)
    assert "[parameters] 'Q' unit: 'litres per fortnight_bogus' is not a unit itpk knows" in text
    # the unit texts are checked first; the expressions once they all parse
    raw["parameters"]["Q"]["unit"] = "L/h"
    text = problems(raw)
    for line in [
        "[derived] 'A': + joins 'CL' in L/h and 'V' in L, which have different dimensions",
        "[derived] 'B': the argument of exp() must be a pure number, found 'CL' in L/h",
        "[derived] 'C': + joins 'CL * T0 / V' in 1 and 'CL' in L/h, which have different dimensions",
        "[derived] 'D': '2 * CL' reads as L/h with its numbers as pure numbers: 1000 times the unit it must have, mL/h",
        "[derived] 'E': 'CL / V' is in 1/h, but must be in L (its declared unit L)",
        "[outputs] 'plasma': 'central / V' is in mg/L, but must be in mg (its declared unit mg)",
    ]:
        assert line in text
    assert text.count("\n  - ") == 6


def test_a_time_unit_must_be_a_time_and_must_be_given():
    assert "key 'time_unit': 'mg' is not a unit of time" in problems(one_cpt(time_unit="mg"))
    raw = one_cpt()
    del raw["time_unit"]
    assert "key 'time_unit' (e.g. \"h\"): is required" in problems(raw)


def test_compartments_that_exchange_or_share_doses_count_in_one_unit():
    raw = raw_of("one_cpt_oral")
    raw["compartments"]["depot"]["amount_unit"] = "ug"
    text = problems(raw)
    assert "[flows] 'depot -> central': joins compartments with different amount units (depot in ug, central in mg)" in text
    raw["compartments"]["depot"]["amount_unit"] = "PFU"
    assert "joins compartments with different amount units (depot in PFU, central in mg)" in problems(raw)


def test_an_exponent_must_be_a_pure_number():
    raw = one_cpt(**{"derived.X": {"expr": "V ** CL", "unit": "L"}})
    assert "an exponent must be a pure number, found 'CL' in L/h" in problems(raw)


def test_models_show_lists_the_conversions(tmp_path):
    raw = one_cpt(time_unit="d")
    path = tmp_path / "daily.toml"
    path.write_text(tomllib_dumps(raw))
    result = CliRunner().invoke(app, ["models", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert "[flows] 'central -> out': 1/h -> 1/d (x 24)" in result.output


def tomllib_dumps(raw):
    """A minimal TOML writer for the flat model tables used here."""
    lines = []
    for key, value in raw.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml(value)}")
    for key, value in raw.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{_toml(k)} = {_toml(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def _toml(v):
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml(k)} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace('"', '\\"') + '"'
    return repr(v)


def test_fits_predict_through_the_conversions():
    # the same trial in hours and in days: a model timed in days with CL in L/h (flows x 24) must give the
    # IPRED of the model in hours at the model's initial point; closed form on both sides, rtol 1e-12
    import pandas as pd

    from itpk.dataset import read_frame
    from itpk.inference import build_model

    def ipred(raw, scale):
        spec = parse_model(raw, source="m.toml")
        rows = [(1, 0.0, 1, 100.0, "iv", "", None), (1, 2.0 / scale, 0, None, "", "plasma", 1.5), (1, 8.0 / scale, 0, None, "", "plasma", 0.9)]
        frame = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV"])
        model, _ = build_model(spec, read_frame(frame, spec))
        ipred_of_values = model.replace_rvs_by_values([model["IPRED"]])[0]
        return model.compile_fn(ipred_of_values, inputs=model.value_vars, on_unused_input="ignore")(model.initial_point())

    hours, days = ipred(one_cpt(), 1.0), ipred(one_cpt(time_unit="d"), 24.0)
    np.testing.assert_allclose(days, hours, rtol=REL)
    np.testing.assert_allclose(hours, exact(np.array([2.0, 8.0])), rtol=REL)


# -- found by a review of the first version (session 19) ---------------------------------------------------------------

CLM = {"value": 5.0 / 60.0, "unit": "L/min"}  # CL = 5 L/h given per minute


def flow_of(expr, **extra):
    raw = one_cpt(**{"parameters.CLm": CLM, **extra})
    raw["flows"]["central -> out"] = expr
    return raw


@pytest.mark.parametrize(("raw", "text"), [
    (flow_of("CLm / V / 60"), "reads as 1/min with its numbers as pure numbers: 60 times"),  # a conversion the wrong way
    (one_cpt(**{"covariates.DIAM": {"value": 2.0, "unit": "cm"}, "derived.VT": {"expr": "pi / 6 * DIAM**3 * 1000", "unit": "L"}}),
     "reads as cm**3 with its numbers as pure numbers: 0.001 times"),
    (flow_of("CL / V * exp(-0.3 * Vm / V)", **{"parameters.Vm": {"value": 1000.0, "unit": "mL"}}),
     "the argument of exp() '-0.3 * Vm / V' reads as 0.001"),
    (flow_of("(CLm + 0.5 * CL) / V"), "+ joins 'CLm' in L/min and '0.5 * CL', which reads as 0.0166667 times that"),
])
def test_ambiguous_numbers_are_refused_whichever_way_they_convert(raw, text):
    assert text in problems(raw)


@pytest.mark.parametrize(("raw", "conversions"), [
    (flow_of("CL / V / 10**3", **{"parameters.CL": {"value": 5000.0, "unit": "mL/h"}}), ()),  # 10**3 is the hand conversion
    (flow_of("(CLm + 0.5 * CLm2) / V", **{"parameters.CLm2": {"value": 0.0, "unit": "L/min"}}),
     ("[flows] 'central -> out': 1/min -> 1/h (x 60)",)),
    (flow_of("ke", **{"derived.ke": {"expr": "CLm / V"}}), ("[flows] 'central -> out': 1/min -> 1/h (x 60)",)),  # unit inferred
    (flow_of("TVCLm * (WT / 70)**0.75 / V", **{"parameters.TVCLm": CLM, "covariates.WT": {"value": 70.0, "unit": "kg"}}),
     ("[flows] 'central -> out': 1/min -> 1/h (x 60)",)),  # 70 is a weight: the power is a pure number
    (flow_of("CL / V * exp(Vm / V - 1)", **{"parameters.Vm": {"value": 50000.0, "unit": "mL"}}),
     ("[flows] 'central -> out': term 'Vm / V': mL/L -> 1 (x 0.001)",)),  # inner conversions listed
])
def test_unambiguous_forms_are_converted_once(raw, conversions):
    spec = parse_model(raw, source="m.toml")
    assert spec.conversions == conversions
    np.testing.assert_allclose(plasma(raw), exact(TIMES), rtol=REL)


def test_a_route_fraction_is_checked_after_its_conversion():
    raw = one_cpt(**{"parameters.Vinj": {"value": 500.0, "unit": "mL"}, "parameters.Vt": {"value": 1.0, "unit": "L"}})
    raw["routes"]["iv"]["into"] = {"central": "Vinj / Vt"}  # 0.5, not 500
    np.testing.assert_allclose(plasma(raw), 0.5 * exact(TIMES), rtol=REL)


def test_a_hill_term_has_no_unit_to_check_and_is_accepted():
    raw = one_cpt(**{"parameters.gam": {"value": 1.7, "unit": "1"}, "parameters.EC50": {"value": 1.0, "unit": "mg/L"},
                     "derived.E": {"expr": "(central / V)**gam / (EC50**gam + (central / V)**gam)", "unit": "1"}})
    raw["derived"].pop("E")  # derived quantities may not use amounts: the Hill term lives in an output
    raw["outputs"]["effect"] = {"expr": "(central / V)**gam / (EC50**gam + (central / V)**gam)", "unit": "1"}
    assert parse_model(raw, source="m.toml").conversions == ()


@pytest.mark.parametrize(("extra", "expr"), [
    ({"covariates.TEMP": {"value": 37.0, "unit": "degC"}, "parameters.th": {"value": 0.01, "unit": "1/delta_degC"}},
     "CL / V * exp(th * (TEMP - 37))"),
    ({"parameters.X": {"value": 1.0, "unit": "kg"}, "parameters.Y": {"value": 1.0, "unit": "g"}}, "CL / V + 0 * (X**400 + Y**400)"),
])
def test_units_pint_cannot_handle_are_one_message_not_a_traceback(extra, expr):
    assert "cannot work out the unit of" in problems(flow_of(expr, **extra))


def test_a_huge_literal_and_nested_calls_are_quick_and_clean():
    import time

    from itpk.expr import parse_expr

    with pytest.raises(ModelSpecError, match="not a finite number"):
        parse_expr("CL * " + "9" * 400, where="w")
    start = time.perf_counter()
    parse_expr("abs(" * 150 + "x" + ")" * 150, where="w")  # was 2^n: 18 levels took 1 s, 190 never ended
    assert time.perf_counter() - start < 5.0  # a guard against the exponential walk, not a timing benchmark


def test_biologic_units_parse():
    raw = one_cpt(**{"compartments.central": {"amount_unit": "MIU", "volume": "V"}})
    raw["outputs"]["plasma"]["unit"] = "IU/mL"
    spec = parse_model(raw, source="m.toml")
    assert spec.conversions == ("[outputs] 'plasma': MIU/L -> IU/mL (x 1000)",)
