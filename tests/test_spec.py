"""Model files: loading, inheritance, and every ModelSpecError message."""

import copy
from importlib.resources import files
import textwrap

import pytest

from itpk import load_model
from itpk.errors import ModelSpecError
from itpk.spec import ModelSpec, Prior, builtin_models, parse_model

CLASSIC = {
    "one_cpt_iv": ({"CL", "V"}, {"iv"}),
    "one_cpt_oral": ({"ka", "CL", "V", "F"}, {"po", "sc", "iv"}),
    "two_cpt_iv": ({"CL", "V1", "Q", "V2"}, {"iv"}),
    "two_cpt_oral": ({"ka", "CL", "V1", "Q", "V2", "F"}, {"po", "sc", "iv"}),
    "three_cpt_iv": ({"CL", "V1", "Q2", "V2", "Q3", "V3"}, {"iv"}),
    "one_cpt_mm": ({"Vmax", "Km", "V"}, {"iv"}),
}

MINIMAL = {
    "name": "m",
    "time_unit": "h",
    "compartments": {"central": {"amount_unit": "mg", "volume": "V"}},
    "parameters": {"CL": {"value": 2.0, "unit": "L/h"}, "V": {"value": 10.0, "unit": "L"}},
    "flows": {"central -> out": "CL / V"},
    "routes": {"iv": {"into": {"central": 1}}},
    "outputs": {"plasma": {"expr": "central / V", "unit": "mg/L"}},
}


def variant(**changes):
    raw = copy.deepcopy(MINIMAL)
    for path, value in changes.items():
        keys = path.split("__")
        table = raw
        for k in keys[:-1]:
            table = table.setdefault(k, {})
        if value is None:
            table.pop(keys[-1], None)
        else:
            table[keys[-1]] = value
    return raw


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_classic_models_have_spec_names(name):
    spec = load_model(name)
    params, routes = CLASSIC[name]
    assert set(spec.parameters) == params
    assert set(spec.routes) == routes
    assert "plasma" in spec.outputs
    assert spec.is_linear == (name != "one_cpt_mm")
    assert all(p.unit for p in spec.parameters.values())


def test_builtin_list_includes_classics():
    assert set(CLASSIC) <= set(builtin_models())


def test_minimal_model_parses():
    spec = parse_model(MINIMAL, source="mem.toml")
    assert isinstance(spec, ModelSpec)
    assert spec.state_names == ("central",)
    assert spec.is_linear
    assert len(spec.sha256) == 64


def test_load_from_path_and_extends(tmp_path):
    from importlib.resources import files

    (tmp_path / "base.toml").write_text(files("itpk.models").joinpath("one_cpt_iv.toml").read_text())
    (tmp_path / "child.toml").write_text(textwrap.dedent("""
        extends = "base"
        name = "child"
        [parameters]
        CL = { value = 9.0 }
    """))
    spec = load_model(tmp_path / "child.toml")
    assert spec.name == "child"
    assert spec.parameters["CL"].value == 9.0
    assert spec.parameters["CL"].unit == "L/h"  # inherited field by field
    assert spec.parameters["V"].value == 50.0


def test_extends_cycle(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b"\nname = "a"\n')
    (tmp_path / "b.toml").write_text('extends = "a"\nname = "b"\n')
    with pytest.raises(ModelSpecError, match="'extends' forms a cycle"):
        load_model(tmp_path / "a.toml")


def test_unknown_model_lists_builtins():
    with pytest.raises(ModelSpecError, match=r"unknown model 'nope'; built-in models: .*two_cpt_iv"):
        load_model("nope")


def test_missing_file():
    with pytest.raises(ModelSpecError, match="cannot read model file"):
        load_model("/nonexistent/x.toml")


def test_invalid_toml(tmp_path):
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(ModelSpecError, match=r"bad.toml: not valid TOML"):
        load_model(tmp_path / "bad.toml")


ERRORS = [
    ({"colour": "red"}, r"key 'colour': unknown top-level key; allowed: name, description"),
    ({"name": None}, r"key 'name': is required"),
    ({"name": 3}, r"key 'name': must be text, found 3"),
    ({"agent": "robot"}, r"key 'agent': 'robot' is unknown; allowed: small_molecule"),
    ({"compartments": "x"}, r"\[compartments\]: must be a table"),
    ({"compartments__central": {"volume": "V"}}, r"\[compartments\] 'central': needs amount_unit"),
    ({"compartments__central__colour": "red"}, r"\[compartments\] 'central': unknown key 'colour'; allowed: amount_unit"),
    ({"parameters__CL": {"value": "two", "unit": "L/h"}}, r"\[parameters\] 'CL' value: must be a number, found 'two'"),
    ({"parameters__CL": {"value": 2.0}}, r"\[parameters\] 'CL': needs a unit"),
    ({"parameters__CL__prior": {"dist": "cauchy", "loc": 1}}, r"prior distribution 'cauchy' is unknown; allowed: lognormal"),
    ({"parameters__CL__prior": {"dist": "lognormal", "mu": 1}}, r"prior 'lognormal' takes median, sigma; found mu"),
    ({"parameters__CL__prior": {"dist": "lognormal", "median": 1, "sigma": -1}}, r"sigma must be > 0"),
    ({"parameters__CL__prior": {"dist": "uniform", "lower": 2, "upper": 1}}, r"lower must be < upper"),
    ({"parameters__CL__prior": "lognormal"}, r"prior: must be a table with 'dist'"),
    ({"parameters__CL__iiv": -0.2}, r"iiv: must be true/false or a CV > 0"),
    ({"parameters__CL__fraction": True}, r"a fraction must be in \[0, 1\], found 2.0"),
    ({"parameters__CL__value": float("nan")}, r"value nan is not a finite number"),
    ({"parameters__exp": {"value": 1.0, "unit": "1"}}, r"parameter 'exp': is reserved"),
    ({"parameters__central": {"value": 1.0, "unit": "1"}}, r"name 'central': declared both as compartment and as parameter"),
    ({"flows": {"central => out": "CL / V"}}, r"\[flows\] 'central => out': key must read 'source -> target'"),
    ({"flows": {"blood -> out": "CL / V"}}, r"source 'blood' is not a compartment; compartments: central"),
    ({"flows": {"central -> kidney": "CL / V"}}, r"target 'kidney' is not a compartment or 'out'"),
    ({"flows": {"central -> out": "CLR / V"}}, r"unknown name\(s\) CLR in 'CLR / V'; known here: CL, V"),
    ({"flows": {"central -> out": "CL / central"}}, r"a first-order rate constant may not use amounts"),
    ({"flows": {"central -> out": "__import__('os')"}}, r"call of '__import__' is not allowed"),
    ({"odes": {"blood": "-1"}}, r"\[odes\] 'blood': is not a compartment"),
    ({"routes__iv": {"into": {"blood": 1}}}, r"receiving compartment 'blood' is unknown"),
    ({"routes__iv": "central"}, r"\[routes\] 'iv': must be a table with 'into"),
    ({"routes__iv__into": {"central": "f_leak"}}, r"unknown name\(s\) f_leak"),
    ({"outputs__plasma": {"expr": "central / V"}}, r"\[outputs\] 'plasma': needs a unit"),
    ({"outputs__plasma__error": "gaussian"}, r"error 'gaussian' is unknown; allowed: additive, proportional, combined, log"),
    ({"outputs__plasma__expr": "central / VV"}, r"\[outputs\] 'plasma': unknown name\(s\) VV"),
    ({"outputs": {}}, r"\[outputs\]: a model needs at least one output"),
    ({"compartments": {}, "flows": {}, "routes": {}, "outputs": {}}, r"a model needs at least one compartment"),
    ({"derived": {"V_T": "pi/6 * DIAM**3"}}, r"\[derived\] 'V_T' .*unknown name\(s\) DIAM"),
    ({"parameters__CL__fixed": "false"}, r"\[parameters\] 'CL' fixed: must be true or false, found 'false'"),
    ({"parameters__CL__fixed": True, "parameters__CL__iiv": 0.3}, r"a fixed parameter has no between-subject variability"),
    ({"parameters__CL__iiv": float("inf")}, r"iiv must be a finite CV > 0, found inf"),
    ({"parameters__F": {"value": 0.5, "unit": "1", "fraction": True, "prior": {"dist": "lognormal", "median": 0.5, "sigma": 1}}},
     r"'F': a fraction needs a prior on \[0, 1\] \(beta, logitnormal, or uniform within \[0, 1\]\), found lognormal"),
    ({"parameters__CL__prior": {"dist": "beta", "alpha": 2, "beta": 2}}, r"a beta prior bounds the parameter to \(0, 1\): mark it fraction"),
    ({"parameters__CL__prior": {"dist": "normal", "mu": 2, "sigma": 1}, "parameters__CL__iiv": 0.3},
     r"between-subject variability is log-normal, so the prior must keep the parameter positive"),
    ({"parameters__lambda": {"value": 1.0, "unit": "1"}}, r"parameter 'lambda': names must be identifiers of ASCII letters"),
    ({"parameters__\ufb01": {"value": 1.0, "unit": "1"}}, r"names must be identifiers of ASCII letters, digits and '_'"),
    ({"covariates__WT": {"value": 70.0, "unit": "kg", "time_varying": "yes"}}, r"\[covariates\] 'WT' time_varying: must be true or false"),
    ({"routes__IM": {"into": {"central": 1}}}, r"\[routes\] 'IM': route names are lower-case ASCII identifiers"),
    ({"routes__iv__into": {"central": 1.5}},
     r"\[routes\] 'iv': at the model's own values: model 'm', route 'iv': the fractions of a dose must be finite, >= 0 and sum to <= 1; found into central: 1.5 = 1.5"),
    ({"references": 7}, r"key 'references': must be a list of texts \(citations\), found 7"),
    ({"flows__central->out": "CL / V"}, r"\[flows\] 'central->out': the same flow as 'central -> out'; write each flow once"),
    ({"parameters__CL__unit": ""}, r"\[parameters\] 'CL': needs a unit \(text; \"1\" for dimensionless\), found ''"),
    ({"time_unit": 24}, r"key 'time_unit' \(e.g. \"h\"\): must be text, found 24"),
    ({"covariates": {"DIAM": 2.0, "TVOL": "pi/6*DIAM**3"}},
     (r"\[covariates\] 'TVOL' value: found 'pi/6\*DIAM\*\*3': a covariate is a number read from the data \(this is its "
      r"default\); an expression belongs in \[derived\], e.g. TVOL = \{ expr = 'pi/6\*DIAM\*\*3' \}")),
]


@pytest.mark.parametrize(("changes", "message"), ERRORS)
def test_model_spec_errors(changes, message):
    raw = variant(**changes)
    with pytest.raises(ModelSpecError, match=message) as info:
        parse_model(raw, source="mem.toml")
    assert str(info.value).startswith("mem.toml: invalid model file")


def test_a_refused_parameter_is_not_reported_again_as_unknown_where_it_is_used():
    raw = variant(parameters__CL__prior={"dist": "normal", "mu": 2, "sigma": 1}, parameters__CL__iiv=0.3)
    with pytest.raises(ModelSpecError) as info:
        parse_model(raw, source="mem.toml")
    assert "between-subject variability is log-normal" in str(info.value)
    assert "unknown name" not in str(info.value)


def test_every_problem_is_reported_at_once():
    raw = variant(agent="robot", flows={"blood -> out": "CLR"}, outputs__plasma__error="gaussian")
    with pytest.raises(ModelSpecError) as info:
        parse_model(raw, source="mem.toml")
    text = str(info.value)
    for part in ("'robot' is unknown", "source 'blood'", "unknown name(s) CLR", "error 'gaussian'"):
        assert part in text


def test_prior_describe():
    assert Prior("lognormal", {"median": 2.0, "sigma": 0.5}).describe() == "lognormal(median=2, sigma=0.5)"


def test_nonlinear_output_makes_model_nonlinear():
    spec = parse_model(variant(outputs__plasma__expr="central**2 / V", outputs__plasma__unit="mg**2/L"))
    assert not spec.is_linear


# -- route sites (ROUTE=it, CMT=lesion2) ---------------------------------------------------------

TWO_LESIONS = {
    **MINIMAL,
    "compartments": {"tumor": {"amount_unit": "mg"}, "lesion2": {"amount_unit": "mg"}, "central": {"amount_unit": "mg", "volume": "V"}},
    "parameters": {**MINIMAL["parameters"], "f": {"value": 0.2, "unit": "1", "fraction": True}},
    "flows": {"central -> out": "CL / V", "tumor -> central": "0.1", "lesion2 -> central": "0.1"},
    "routes": {"it": {"into": {"tumor": "1 - f", "central": "f"}, "sites": ["tumor", "lesion2"]}, "iv": {"into": {"central": 1}}},
}


def test_route_sites_move_the_sites_share_and_keep_the_leak():
    from itpk.events import Target

    spec = parse_model(TWO_LESIONS)
    it = spec.routes["it"]
    assert it.site == "tumor" and it.sites == ("tumor", "lesion2")
    assert spec.routes["iv"].sites == ("central",)  # default: the route's own site only
    moved = spec.dose_into(Target("it", site="lesion2"))
    assert list(moved) == ["lesion2", "central"]
    assert moved["lesion2"] is it.into["tumor"] and moved["central"] is it.into["central"]
    assert spec.dose_into(Target("it")) is it.into
    assert list(spec.dose_into(Target("lesion2", compartment=True))) == ["lesion2"]
    with pytest.raises(ModelSpecError, match=r"route 'iv' cannot send a dose to 'tumor'; allowed: central"):
        spec.dose_into(Target("iv", site="tumor"))
    with pytest.raises(ModelSpecError, match=r"has no route 'ia'"):
        spec.dose_into(Target("ia"))


@pytest.mark.parametrize(("sites", "message"), [
    (["tumor", "liver"], r"\[routes\] 'it': site 'liver' is not a compartment; compartments: tumor, lesion2, central"),
    (["lesion2", "central"], r"\[routes\] 'it': sites central already receive another fraction of the dose \(the route's own "
                              r"site is tumor, the first compartment of 'into'\)"),
    ("lesion2", r"\[routes\] 'it': sites must be a list of compartment names, found 'lesion2'"),
])
def test_bad_route_sites_are_refused(sites, message):
    raw = copy.deepcopy(TWO_LESIONS)
    raw["routes"]["it"]["sites"] = sites
    with pytest.raises(ModelSpecError, match=message):
        parse_model(raw)


def test_it_models_let_the_it_route_inject_the_second_lesion():
    for name in ("it_linear", "it_small_molecule", "it_cytokine", "it_antibody", "it_peptide"):
        assert load_model(name).routes["it"].sites == ("tumor", "lesion2"), name
        assert load_model(name).routes["ia"].sites == ("tumor",), name


def test_every_sites_problem_is_listed_and_repeated_sites_count_once():
    raw = copy.deepcopy(TWO_LESIONS)
    raw["routes"]["it"]["sites"] = ["nowhere", "central"]
    with pytest.raises(ModelSpecError) as err:
        parse_model(raw)
    assert "site 'nowhere' is not a compartment" in str(err.value) and "sites central already receive" in str(err.value)
    raw["routes"]["it"]["sites"] = ["lesion2", "lesion2", "tumor"]
    assert parse_model(raw).routes["it"].sites == ("tumor", "lesion2")


# -- one message for every problem (checks that do not depend on broken parts still run) ---------


def test_units_and_route_fractions_are_checked_even_when_other_parts_are_broken():
    raw = variant(agent="robot", colour="red", flows={"central -> out": "CL / V", "blood -> out": "CL / V"},
                  routes__iv__into={"central": 1.5}, outputs__plasma__unit="mg")
    with pytest.raises(ModelSpecError) as info:
        parse_model(raw, source="mem.toml")
    text = str(info.value)
    for part in ("'robot' is unknown", "key 'colour'", "source 'blood'",
                 "[outputs] 'plasma': 'central / V' is in mg/L, but must be in mg",
                 "[routes] 'iv': at the model's own values: model 'm', route 'iv': the fractions of a dose must be finite, >= 0 and sum to <= 1"):
        assert part in text, part


def test_a_refused_fraction_parameter_does_not_hide_unit_errors():
    raw = variant(parameters__f={"value": 1.5, "unit": "1", "fraction": True}, parameters__CL__unit="L",
                  outputs__plasma__unit="mg", routes__iv__into={"central": "f"})
    with pytest.raises(ModelSpecError) as info:
        parse_model(raw, source="mem.toml")
    text = str(info.value)
    assert "[parameters] 'f': a fraction must be in [0, 1], found 1.5" in text
    assert "[flows] 'central -> out': 'CL / V' is in 1, but must be in 1/h" in text
    assert "[outputs] 'plasma': 'central / V' is in mg/L, but must be in mg" in text
    assert "unknown name" not in text and "route 'iv'" not in text  # f is reported once, where it is declared


def test_the_only_output_with_an_invalid_error_model_is_reported_once():
    with pytest.raises(ModelSpecError) as info:
        parse_model(variant(outputs__plasma__error="gaussian"), source="mem.toml")
    text = str(info.value)
    assert "[outputs] 'plasma': error 'gaussian' is unknown" in text
    assert "at least one output" not in text
    assert len(text.splitlines()) == 2


@pytest.mark.parametrize(("entry", "message"), [
    ({"value": -50.0, "unit": "L", "prior": {"dist": "lognormal", "median": 50, "sigma": 1}},
     r"\[parameters\] 'V': value -50 is outside its prior lognormal\(median=50, sigma=1\), whose values are > 0"),
    ({"value": -1.0, "unit": "L", "prior": {"dist": "halfnormal", "sigma": 10}}, r"whose values are >= 0"),
    ({"value": 80.0, "unit": "L", "prior": {"dist": "uniform", "lower": 1, "upper": 60}}, r"whose values are in \[1, 60\]"),
])
def test_a_value_outside_its_priors_support_is_refused_at_load(entry, message):
    with pytest.raises(ModelSpecError, match=message) as info:
        parse_model(variant(parameters__V=entry), source="mem.toml")
    assert "unknown name" not in str(info.value)


@pytest.mark.parametrize(("value", "prior"), [
    (0.0, {"dist": "beta", "alpha": 2, "beta": 2}), (1.0, {"dist": "logitnormal", "median": 0.5, "sigma": 1}),
])
def test_a_fraction_on_the_edge_of_an_open_prior_is_refused(value, prior):
    raw = variant(parameters__f={"value": value, "unit": "1", "fraction": True, "prior": prior})
    with pytest.raises(ModelSpecError, match=r"\[parameters\] 'f': value .* is outside its prior .*whose values are in \(0, 1\)"):
        parse_model(raw, source="mem.toml")


def test_values_inside_their_priors_support_load():
    raw = variant(parameters__V={"value": 0.0 + 10, "unit": "L", "prior": {"dist": "uniform", "lower": 10, "upper": 60}},
                  parameters__CL__prior={"dist": "halfnormal", "sigma": 3})
    assert parse_model(raw).parameters["V"].value == 10


def test_a_volume_or_rate_constant_must_be_positive_at_load():
    with pytest.raises(ModelSpecError) as info:
        parse_model(variant(parameters__V__value=-50.0), source="mem.toml")
    text = str(info.value)
    assert "[parameters] 'V': value -50 must be > 0: it is the volume of compartment 'central'" in text
    assert "[flows]" not in text  # CL / V is not blamed as well
    raw = variant(parameters__k={"value": -0.1, "unit": "1/h"}, flows={"central -> out": "CL / V", "central -> periph": "k"},
                  compartments__periph={"amount_unit": "mg"})
    with pytest.raises(ModelSpecError, match=r"\[parameters\] 'k': value -0.1 must be >= 0: it is the first-order rate constant "
                                             r"of \[flows\] 'central -> periph'"):
        parse_model(raw, source="mem.toml")
    with pytest.raises(ModelSpecError, match=r"\[flows\] 'central -> out': the rate CL / V = -0.5 at the model's own values "
                                             r"\(CL=-5, V=10\); a first-order rate constant must be finite and >= 0"):
        parse_model(variant(parameters__CL__value=-5.0), source="mem.toml")
    raw["parameters"]["k"]["value"] = 0.0  # a pathway switched off
    assert parse_model(raw).parameters["k"].value == 0


def test_an_unknown_name_in_a_flow_is_not_blamed_on_amounts():
    with pytest.raises(ModelSpecError) as info:
        parse_model(variant(flows={"central -> out": "Q / V"}), source="mem.toml")
    text = str(info.value)
    assert "[flows] 'central -> out': unknown name(s) Q in 'Q / V'; known here: CL, V" in text
    assert "amounts" not in text
    with pytest.raises(ModelSpecError, match=r"may not use amounts \(central in 'Q \* central'\); write such a term in \[odes\]"):
        parse_model(variant(flows={"central -> out": "Q * central"}), source="mem.toml")


CHILD_CL = '''extends = "{parent}"
name = "child"
[parameters]
CL = {{ value = 0.1, unit = "{unit}"{prior} }}
'''


def test_extends_refuses_a_new_unit_with_the_inherited_prior(tmp_path):
    path = tmp_path / "child.toml"
    path.write_text(CHILD_CL.format(parent="one_cpt_iv", unit="mL/min", prior=""))
    with pytest.raises(ModelSpecError) as info:
        load_model(path)
    assert ("[parameters] 'CL': unit changed from 'L/h' (in models/one_cpt_iv.toml, which this file extends) to 'mL/min', "
            "but the inherited prior { dist = \"lognormal\", median = 5, sigma = 1 } is in L/h; give the prior in mL/min") in str(info.value)
    path.write_text(CHILD_CL.format(parent="one_cpt_iv", unit="mL/min", prior=', prior = { dist = "lognormal", median = 0.1, sigma = 1 }'))
    assert load_model(path).parameters["CL"].prior.args["median"] == 0.1
    path.write_text(CHILD_CL.format(parent="one_cpt_iv", unit="L / h", prior=""))  # the same unit, written otherwise
    assert load_model(path).parameters["CL"].prior.args["median"] == 5


def test_a_relative_extends_path_is_relative_to_the_file_that_names_it(tmp_path, monkeypatch):
    # found by an audit: extends = "sibling.toml" was read from the working directory (extends = "sibling",
    # without the suffix, from the file's folder), and the error named neither file nor key
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "base.toml").write_text(files("itpk.models").joinpath("one_cpt_iv.toml").read_text())
    (folder / "child.toml").write_text('extends = "base.toml"\nname = "child"\n')
    (folder / "orphan.toml").write_text('extends = "gone.toml"\nname = "orphan"\n')
    monkeypatch.chdir(tmp_path)  # not the models' folder
    assert load_model(folder / "child.toml").name == "child"
    assert load_model("models/child.toml").name == "child"  # a relative folder named models/ too (not the library's)
    with pytest.raises(ModelSpecError, match=r"orphan.toml: extends 'gone.toml': cannot read model file '.*models/gone.toml'"):
        load_model(folder / "orphan.toml")


def test_a_model_file_saved_with_a_byte_order_mark_loads(tmp_path):
    # Windows editors save UTF-8 with a BOM; tomllib read it as "Invalid statement (at line 1, column 1)"
    path = tmp_path / "bom.toml"
    path.write_text("\ufeff" + files("itpk.models").joinpath("one_cpt_iv.toml").read_text(), encoding="utf-8")
    assert load_model(path).parameters["CL"].value == load_model("one_cpt_iv").parameters["CL"].value
