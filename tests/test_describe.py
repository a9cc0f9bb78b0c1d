"""`itpk models show` and the library table (itpk.describe)."""

from pathlib import Path

from itpk import load_model
from itpk.describe import describe_library, describe_model
from itpk.spec import builtin_models, parse_model


def test_route_fractions_that_are_expressions_are_bracketed():
    text = describe_model(load_model("it_linear"))
    assert "  it: tumor × (1 - f_leak), central × f_leak" in text
    assert "  ia: tumor × E, central × (1 - E)" in text
    assert "  iv: central × 1" in text


def test_the_file_shown_is_the_absolute_path_that_was_loaded(tmp_path, monkeypatch):
    line = describe_model(load_model("one_cpt_iv")).splitlines()[1]
    shown = Path(line.split("file: ")[1])
    assert shown.is_absolute() and shown.is_file() and shown.name == "one_cpt_iv.toml"
    (tmp_path / "mine.toml").write_text('extends = "one_cpt_iv"\nname = "mine"\n')
    monkeypatch.chdir(tmp_path)
    assert describe_model(load_model("mine.toml")).splitlines()[1].endswith(f"file: {tmp_path / 'mine.toml'}")


def test_tables_are_aligned_by_their_longest_entry():
    specs = [load_model(n) for n in builtin_models()]
    lines = describe_library(specs).splitlines()
    assert len(lines) == len(specs) + 1
    for column in ("agent", "routes", "outputs", "description"):
        start = lines[0].index(column)
        assert all(line[start - 2:start] == "  " and line[start] != " " for line in lines), column
    raw = {"name": "m", "time_unit": "h", "compartments": {"central": {"amount_unit": "mg", "volume": "V_central_long"}},
           "parameters": {"CL_renal_and_hepatic": {"value": 2.0, "unit": "L/h"}, "V_central_long": {"value": 10.0, "unit": "L"}},
           "flows": {"central -> out": "CL_renal_and_hepatic / V_central_long"}, "routes": {"iv": {"into": {"central": 1}}},
           "outputs": {"plasma": {"expr": "central / V_central_long", "unit": "mg/L"}}}
    text = describe_model(parse_model(raw)).split("parameters:\n")[1].splitlines()
    header, rows = text[0], text[1:3]
    assert [row[header.index("unit")] for row in rows] == ["L", "L"]
    assert [row[header.index("prior")] for row in rows] == ["-", "-"]
