"""Dataset reader: one test per problem message, aggregation, normal form, fuzzing, CLI."""

from __future__ import annotations

import csv
import io
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from itpk.cli.data import data_app, nca_command
from itpk.dataset import MAX_LISTED, Dataset, read_dataset, read_frame
from itpk.errors import DatasetError
from itpk.spec import load_model

FIXTURES = Path(__file__).parent / "data"
HEADER = ["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV", "WT"]
# File rows 2-8 (the header is row 1).
ROWS = [
    ["1", "0", "1", "100", "iv", "", "", "70"],
    ["1", "0.5", "0", "", "", "plasma", "5.1", "70"],
    ["1", "1", "0", "", "", "plasma", "4.2", "70"],
    ["1", "2", "0", "", "", "plasma", "3.0", "70"],
    ["2", "0", "1", "100", "iv", "", "", "80"],
    ["2", "1", "0", "", "", "plasma", "6.0", "80"],
    ["2", "4", "0", "", "", "plasma", "2.5", "80"],
]


def csv_text(rows: list[list[str]], header: list[str] = HEADER) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def write(folder: Path, rows: list[list[str]] | None = None, header: list[str] = HEADER, name: str = "d.csv") -> Path:
    path = folder / name
    path.write_text(csv_text(ROWS if rows is None else rows, header), encoding="utf-8")
    return path


def edited(*changes: tuple[int, str, str], rows: list[list[str]] | None = None, header: list[str] = HEADER) -> list[list[str]]:
    """A copy of the rows with cells changed: (file row, column, new text)."""
    out = [list(r) for r in (ROWS if rows is None else rows)]
    for row, column, value in changes:
        out[row - 2][header.index(column)] = value
    return out


def with_column(name: str, values: dict[int, str], rows: list[list[str]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows with one more column (values by file row, blank elsewhere)."""
    base = ROWS if rows is None else rows
    return [*HEADER, name], [[*r, values.get(i + 2, "")] for i, r in enumerate(base)]


def problem(folder: Path, rows: list[list[str]], header: list[str] = HEADER, spec=None) -> str:
    with pytest.raises(DatasetError) as info:
        read_dataset(write(folder, rows, header), spec)
    return str(info.value)


@pytest.fixture(scope="module")
def it_mini():
    return load_model(FIXTURES / "it_mini.toml")


@pytest.fixture(scope="module")
def one_cpt():
    return load_model("one_cpt_iv")


# -- a valid file and its normal form ------------------------------------------------------


def test_valid_file_normal_form(tmp_path):
    ds = read_dataset(write(tmp_path))
    frame = ds.data
    assert list(frame["ROW"]) == list(range(2, 9))  # file rows, in file order, none dropped
    assert ds.subjects == (1, 2)
    assert ds.outputs == ("plasma",)
    assert ds.arms == ()
    assert ds.covariates == ("WT",)
    assert len(ds.doses) == 2 and len(ds.observations) == 5
    assert list(frame.loc[frame["EVID"] == 1, "MDV"]) == [1, 1]  # MDV defaults from EVID
    assert frame["AMT"].tolist() == [100, 0, 0, 0, 100, 0, 0]
    assert frame[["RATE", "DUR", "II", "ADDL", "SS", "BLQ"]].eq(0).all().all()
    assert ds.units_assumed and ds.source.endswith("d.csv") and ds.model is None


def test_theoph_bundled_reads_with_model():
    spec = load_model("one_cpt_oral")
    ds = read_dataset(files("itpk.data") / "theoph.csv", spec)
    assert len(ds.subjects) == 12
    assert len(ds.observations) == 132
    assert set(ds.doses["ROUTE"]) == {"po"}
    assert ds.model == "one_cpt_oral" and ds.units_assumed


def test_headers_case_insensitive_and_cens_alias(tmp_path):
    header = [h.lower() for h in HEADER[:-1]] + ["Wt", "cens"]
    rows = [[*r, "0"] for r in ROWS]
    ds = read_dataset(write(tmp_path, rows, header))
    assert "WT" in ds.data.columns and "BLQ" in ds.data.columns and "CENS" not in ds.data.columns


def test_nonmem_dot_and_na_are_missing(tmp_path):
    rows = edited((3, "AMT", "."), (4, "AMT", "NA"), (2, "DV", "."))
    assert read_dataset(write(tmp_path, rows)).data.loc[1, "AMT"] == 0


def test_route_is_lower_cased(tmp_path):
    ds = read_dataset(write(tmp_path, edited((2, "ROUTE", "IV"))))
    assert ds.doses["ROUTE"].tolist() == ["iv", "iv"]


def test_ids_stay_text_when_numbers_would_merge_them(tmp_path):
    rows = edited(*((r, "ID", "01") for r in (2, 3, 4, 5)))
    assert read_dataset(write(tmp_path, rows)).subjects == ("01", "2")


def test_blank_rows_are_skipped_and_listed_with_file_row_numbers(tmp_path):
    text = csv_text(ROWS).splitlines()
    text.insert(3, "")  # a blank line becomes file row 4
    text.insert(5, ",,,,,,,")  # an Excel-style empty row, file row 6
    path = tmp_path / "d.csv"
    path.write_text("\n".join(text) + "\n")
    ds = read_dataset(path)
    assert ds.ignored_rows == (4, 6)
    assert list(ds.data["ROW"]) == [2, 3, 5, 7, 8, 9, 10]


def test_row_numbers_count_quoted_newlines_as_one_row(tmp_path):
    # A spreadsheet shows a quoted cell with a line break as one row.
    header, rows = with_column("NOTE", {2: "two\nlines"})
    message = problem(tmp_path, edited((4, "TIME", "0.1"), rows=rows, header=header), header)
    assert "row 4, TIME: found 0.1, earlier than 0.5" in message


def test_censoring_from_blq_and_lloq(tmp_path):
    header, rows = with_column("LLOQ", {3: "0.5", 4: "0.5", 8: "3"})
    header, rows = [*header, "BLQ"], [[*r, "1" if i + 2 == 5 else ""] for i, r in enumerate(rows)]
    rows = edited((3, "DV", "0.2"), rows=rows, header=header)  # DV < LLOQ on rows 3 and 8
    ds = read_dataset(write(tmp_path, rows, header))
    assert ds.data.loc[ds.censored, "ROW"].tolist() == [3, 5, 8]
    assert ds.data.loc[ds.censored, "LLOQ"].tolist() == [0.5, 3.0, 3.0]  # row 5: BLQ=1 without LLOQ, DV holds the limit
    assert ds.data["BLQ"].tolist() == [0, 1, 0, 1, 0, 0, 1]


def test_blq_with_lloq_may_have_blank_dv(tmp_path):
    header, rows = with_column("LLOQ", {4: "0.5"})
    header, rows = [*header, "BLQ"], [[*r, "1" if i + 2 == 4 else ""] for i, r in enumerate(rows)]
    ds = read_dataset(write(tmp_path, edited((4, "DV", ""), rows=rows, header=header), header))
    assert ds.censored.sum() == 1


def test_mdv_one_allows_blank_dv(tmp_path):
    header, rows = with_column("MDV", {3: "1"})
    ds = read_dataset(write(tmp_path, edited((3, "DV", ""), rows=rows, header=header), header))
    assert len(ds.observations) == 4


def test_steady_state_constant_infusion_needs_no_amount_or_interval(tmp_path):
    header = [*HEADER, "RATE", "SS"]
    rows = [[*r, "", ""] for r in ROWS]
    rows = edited((2, "AMT", "0"), (2, "RATE", "10"), (2, "SS", "1"), rows=rows, header=header)
    ds = read_dataset(write(tmp_path, rows, header))
    assert ds.doses.iloc[0][["AMT", "RATE", "SS"]].tolist() == [0, 10, 1]


def test_time_varying_covariate_declared_by_model(tmp_path, it_mini):
    # CMT numbers on observation rows name outputs; a declared time-varying covariate may change
    # between times (NOCB), but two rows at one time must agree: the change would hold nowhere
    header = ["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV", "DIAM", "tvol"]
    rows = [
        ["1", "0", "1", "10", "it", "", "", "2", "4"],
        ["1", "1", "0", "", "", "tumor", "3", "2", "4"],
        ["1", "2", "0", "", "", "2", "1", "2", "5"],  # CMT number: the 2nd output
    ]
    ds = read_dataset(write(tmp_path, rows, header), it_mini)
    assert ds.data["TVOL"].tolist() == [4, 4, 5]
    assert ds.data["CMT"].tolist()[1:] == ["tumor", "tumor"]
    rows.append(["1", "2", "2", "", "", "", "", "2", "6"])
    with pytest.raises(DatasetError) as err:
        read_dataset(write(tmp_path, rows, header), it_mini)
    assert ("row 5, TVOL: found 6, but ID 1 has 5 at the same TIME 2 on row 4; allowed: one value per time within a "
            "subject (TVOL is time-varying: NOCB, a row's value holds from the subject's previous row to its own)") in str(err.value)
    rows[3][-2] = "3"  # DIAM is not time-varying: still one value per subject
    with pytest.raises(DatasetError, match=r"row 5, DIAM: found 3, but ID 1 has 2 on row 2; allowed: one value per subject"):
        read_dataset(write(tmp_path, rows, header), it_mini)


def test_route_dose_into_a_compartment_the_route_does_not_reach_is_refused(tmp_path, it_mini):
    header = ["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV", "DIAM"]
    rows = [
        ["1", "0", "1", "10", "it", "A_T", "", "2"],  # consistent: the it route doses A_T
        ["1", "1", "1", "10", "iv", "A_T", "", "2"],  # iv reaches only A_P
        ["1", "1.5", "1", "10", "it", "A_P", "", "2"],  # it leaks into A_P, but its site is A_T
        ["1", "2", "0", "", "", "tumor", "3", "2"],
    ]
    with pytest.raises(DatasetError) as err:
        read_dataset(write(tmp_path, rows, header), it_mini)
    message = str(err.value)
    assert "row 3, CMT: found 'A_T' with ROUTE=iv, whose doses go into A_P; allowed: blank or A_P (route iv's sites in model" in message
    assert "row 4, CMT: found 'A_P' with ROUTE=it, whose doses go into A_T, A_P; allowed: blank or A_T" in message
    assert "to dose A_T itself give CMT=A_T with ROUTE blank" in message
    assert "row 2," not in message


def test_it_dose_into_the_second_lesion_is_a_site_of_the_route(tmp_path):
    # SPEC §2: with ROUTE=it, CMT says which lesion. it_antibody lists tumor and lesion2 as the
    # it route's sites; ia lists only its own, and iv cannot be moved
    from itpk.events import Target
    from itpk.subjects import subjects

    spec = load_model("it_antibody")
    header = ["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV"]
    rows = [
        ["1", "0", "1", "10", "it", "lesion2", ""],
        ["1", "1", "1", "10", "it", "tumor", ""],
        ["1", "2", "1", "10", "it", "", ""],
        ["1", "3", "1", "10", "it", "2", ""],  # lesion2 by its number
        ["1", "4", "0", "", "", "lesion2", "3"],
    ]
    ds = read_dataset(write(tmp_path, rows, header), spec)
    targets = [d.target for d in subjects(ds, spec)[0].schedule.doses]
    assert targets == [Target("it", site="lesion2"), Target("it"), Target("it"), Target("it", site="lesion2")]
    bad = rows[:1] + [["1", "1", "1", "10", "ia", "lesion2", ""], ["1", "2", "1", "10", "it", "central", ""],
                      ["1", "3", "1", "10", "it", "5", ""]] + rows[4:]
    with pytest.raises(DatasetError) as err:
        read_dataset(write(tmp_path, bad, header), spec)
    message = str(err.value)
    assert ("row 3, CMT: found 'lesion2' with ROUTE=ia, whose doses go into tumor, central; allowed: blank or tumor "
            "(route ia's sites in model it_antibody); to dose lesion2 itself give CMT=lesion2 with ROUTE blank") in message
    assert ("row 4, CMT: found 'central' with ROUTE=it, whose doses go into tumor, central; allowed: blank or tumor or "
            "lesion2 (route it's sites in model it_antibody; a site other than tumor takes tumor's share)") in message
    assert "row 5, CMT: found '5' (peripheral) with ROUTE=it" in message  # a number, quoted as typed
    assert "row 2," not in message


def test_a_dataset_read_without_the_model_is_checked_against_it_before_a_fit(tmp_path):
    # read_frame without a model cannot know the routes, sites, compartments and outputs; a fit
    # checks them (all at once) instead of failing on the first unknown name
    from itpk.dataset import check_against
    from itpk.inference import build_model

    header = ["ID", "TIME", "EVID", "AMT", "ROUTE", "CMT", "DV"]
    rows = [["1", "0", "1", "10", "it", "", ""], ["1", "0.5", "1", "10", "it", "lymph", ""], ["1", "1", "0", "", "", "plasma", "1"],
            ["1", "2", "0", "", "", "tumor", "1"], ["1", "3", "1", "5", "", "lymph", ""]]
    ds = read_dataset(write(tmp_path, rows, header))
    with pytest.raises(DatasetError) as err:
        build_model(load_model("one_cpt_iv"), ds)
    message = str(err.value)
    assert "d.csv (read without a model, fitted with one_cpt_iv): invalid dataset, 4 problems:" in message
    for line in ("row 2, ROUTE: found 'it'; allowed: a route of model one_cpt_iv: iv",
                 "row 3, ROUTE: found 'it'",
                 "row 5, CMT: found 'tumor' on an observation row; allowed: an output of model one_cpt_iv: plasma",
                 "row 6, CMT: found 'lymph' on a dose row; allowed: a compartment of model one_cpt_iv: central"):
        assert line in message
    with pytest.raises(DatasetError, match=r"row 3, CMT: found 'lymph' with ROUTE=it; allowed: blank or tumor or lesion2"):
        check_against(ds, load_model("it_antibody"))
    check_against(read_dataset(write(tmp_path, rows[:1] + rows[2:4], header), load_model("it_antibody")), load_model("it_antibody"))


def test_dose_cmt_number_resolves_to_compartment(tmp_path, it_mini):
    rows = edited((2, "CMT", "1"), (2, "ROUTE", ""), (6, "CMT", "A_P"), (6, "ROUTE", ""))
    ds = read_dataset(write(tmp_path, rows), it_mini)
    assert ds.doses["CMT"].tolist() == ["A_T", "A_P"]


def test_single_output_model_fills_blank_cmt(tmp_path, one_cpt):
    ds = read_dataset(write(tmp_path, edited((3, "CMT", ""))), one_cpt)
    assert ds.observations["CMT"].tolist() == ["plasma"] * 5


def test_read_frame_checks_like_a_file():
    frame = pd.read_csv(io.StringIO(csv_text(ROWS)))
    assert read_frame(frame).subjects == (1, 2)
    with pytest.raises(DatasetError, match=r"row 3, EVID: found '7'"):
        read_frame(frame.assign(EVID=[1, 7, 0, 0, 1, 0, 0]))


def test_dataset_validates_itself():
    with pytest.raises(DatasetError, match="needs the columns"):
        Dataset(pd.DataFrame({"ID": [1]}), "x")


# -- whole-file problems ------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=r"file: does not exist; allowed: a path to a CSV file"):
        read_dataset(tmp_path / "nope.csv")


def test_directory(tmp_path):
    with pytest.raises(DatasetError, match=r"file: is a directory"):
        read_dataset(tmp_path)


def test_binary_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DatasetError, match=r"file: contains binary data \(NUL bytes\), not text"):
        read_dataset(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(csv_text(ROWS).replace("plasma", "plasm\xe4").encode("latin-1"))
    with pytest.raises(DatasetError, match=r"file: is not UTF-8 text \(byte 0xe4 at offset \d+\); allowed: CSV saved as UTF-8"):
        read_dataset(path)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbf" + csv_text(ROWS).encode())
    assert read_dataset(path).subjects == (1, 2)


def test_empty_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("  \n\n")
    with pytest.raises(DatasetError, match=r"file: is empty"):
        read_dataset(path)


def test_header_only(tmp_path):
    with pytest.raises(DatasetError, match=r"file: has a header but no data rows"):
        read_dataset(write(tmp_path, []))


def test_blank_header_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\n" + csv_text(ROWS))
    with pytest.raises(DatasetError, match=r"file: row 1 is blank; allowed: a header row"):
        read_dataset(path)


def test_unparseable_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(csv_text(ROWS) + "1," + "x" * 200_000 + "\n")
    with pytest.raises(DatasetError, match=r"file: row 9 cannot be parsed as CSV"):
        read_dataset(path)


def test_not_a_dataset_reports_header_only(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('name = "one_cpt"\n[parameters]\nCL = 1\n')
    message = str(pytest.raises(DatasetError, read_dataset, path).value)
    assert "column ID: missing; allowed: a header with the required columns ID, TIME, EVID" in message
    assert "row 2" not in message  # no per-row noise when the columns are not there


def test_other_separator_hint(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(csv_text(ROWS).replace(",", ";"))
    with pytest.raises(DatasetError, match=r"row 1 \(header\): one column named 'ID;TIME.*allowed: commas between columns"):
        read_dataset(path)


# -- header problems ------------------------------------------------------------------------


def test_duplicated_column_names(tmp_path):
    header, rows = with_column("id", {})
    with pytest.raises(DatasetError, match=r"row 1 \(header\), ID: appears 2 times \(columns 1, 9\); allowed: each column once"):
        read_dataset(write(tmp_path, rows, header))


def test_blq_and_cens_are_the_same_column(tmp_path):
    header, rows = [*HEADER, "BLQ", "CENS"], [[*r, "0", "0"] for r in ROWS]
    with pytest.raises(DatasetError, match=r"BLQ: appears 2 times .*CENS is BLQ"):
        read_dataset(write(tmp_path, rows, header))


def test_row_is_a_reserved_column_name(tmp_path):
    header, rows = with_column("row", {})
    with pytest.raises(DatasetError, match=r"row 1 \(header\), ROW: a column named ROW; allowed: another name \(itpk adds ROW"):
        read_dataset(write(tmp_path, rows, header))


def test_blank_column_name_above_values(tmp_path):
    header, rows = with_column("", {3: "x"})
    with pytest.raises(DatasetError, match=r"row 1 \(header\), column 9: blank name above values; allowed: a column name"):
        read_dataset(write(tmp_path, rows, header))


def test_trailing_blank_column_is_ignored(tmp_path):
    header, rows = with_column("", {})
    assert "" not in read_dataset(write(tmp_path, rows, header)).data.columns


@pytest.mark.parametrize("column", ["ID", "TIME", "EVID"])
def test_required_column_missing(tmp_path, column):
    j = HEADER.index(column)
    header = HEADER[:j] + HEADER[j + 1 :]
    rows = [r[:j] + r[j + 1 :] for r in ROWS]
    with pytest.raises(DatasetError, match=rf"column {column}: missing; allowed: a header with the required columns"):
        read_dataset(write(tmp_path, rows, header))


def test_a_missing_column_does_not_hide_the_rows_problems(tmp_path):
    # found by a robustness audit: without EVID only the header's problem was reported
    j = HEADER.index("EVID")
    header = HEADER[:j] + HEADER[j + 1 :]
    rows = [r[:j] + r[j + 1 :] for r in ROWS]
    rows[2][header.index("TIME")] = "abc"
    rows[0][header.index("ROUTE")] = "xx"
    message = str(pytest.raises(DatasetError, read_dataset, write(tmp_path, rows, header)).value)
    assert "column EVID: missing; allowed: a header with the required columns" in message
    assert "row 4, TIME: found 'abc', not a number" in message
    assert "row 2, ROUTE: found 'xx'" in message
    assert "3 problems" in message  # nothing that needs EVID (doses, observations) is guessed at


def test_too_many_cells(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[1] += ["", "9"]
    with pytest.raises(DatasetError, match=r"row 3: 10 cells, the last non-blank ones beyond the header; allowed: at most 8 cells"):
        read_dataset(write(tmp_path, rows))


def test_short_rows_are_padded(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[1] = rows[1][:-1]  # trailing WT cell left out
    assert np.isnan(read_dataset(write(tmp_path, rows)).data.loc[1, "WT"])


# -- cell types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "column", "value", "match"),
    [
        (2, "ID", "", r"row 2, ID: blank; allowed: a subject identifier"),
        (3, "TIME", "", r"row 3, TIME: blank; allowed: a finite number"),
        (3, "EVID", "", r"row 3, EVID: blank; allowed: 0 \(observation\), 1 \(dose\), 2 \(other\), 3 \(reset\), 4 \(reset and dose\)"),
        (3, "TIME", "abc", r"row 3, TIME: found 'abc', not a number; allowed: a finite number \(with a decimal point, e.g. 1.5\)"),
        (3, "DV", "1,5", r"row 3, DV: found '1,5', not a number"),
        (3, "DV", "inf", r"row 3, DV: found 'inf': not a finite number; allowed: a finite number"),
        (3, "EVID", "5", r"row 3, EVID: found '5'; allowed: 0 \(observation\), 1 \(dose\)"),
        (3, "EVID", "0.5", r"row 3, EVID: found '0.5'; allowed: 0 \(observation\)"),
        (3, "EVID", "x", r"row 3, EVID: found 'x', not a number; allowed: 0 \(observation\)"),
    ],
)
def test_cell_types(tmp_path, row, column, value, match):
    with pytest.raises(DatasetError, match=match):
        read_dataset(write(tmp_path, edited((row, column, value))))


@pytest.mark.parametrize("value", ["nan", "NaN", "NA", "."])
def test_missing_value_marker_where_a_value_is_needed_says_what_was_found(tmp_path, value):
    # found by a user walkthrough: a DV of 'nan' was reported as "blank"
    message = problem(tmp_path, edited((3, "DV", value), (4, "TIME", value)))
    assert (f"row 3, DV: found {value!r} (read as a missing value) on an observation row (EVID=0); "
            "allowed: a measured value (a finite number), MDV=1 to ignore the row, or with BLQ=1 the limit in LLOQ") in message
    assert f"row 4, TIME: found {value!r} (read as a missing value); allowed: a finite number" in message
    assert "blank" not in message


def test_missing_value_marker_is_still_missing_where_blank_is_allowed(tmp_path):
    header, rows = with_column("MDV", {})
    ds = read_dataset(write(tmp_path, edited((2, "DV", "nan"), (5, "DV", "NaN"), (5, "MDV", "1"), rows=rows, header=header), header))
    assert np.isnan(ds.data.loc[0, "DV"]) and np.isnan(ds.data.loc[3, "DV"])  # a dose row, an observation with MDV=1


@pytest.mark.parametrize("column", ["TIME", "DV", "AMT", "LLOQ", "RATE", "DUR", "II"])
@pytest.mark.parametrize("value", ["1e400", "-1e400", "inf", "-Infinity"])
def test_overflowing_numbers_are_not_finite_not_non_numbers(tmp_path, column, value):
    # found by a user walkthrough: 1e400 (beyond the largest float) was reported as "not a number"
    header, rows = with_column(column, {2: value}) if column not in HEADER else (HEADER, edited((2, column, value)))
    message = problem(tmp_path, rows, header)
    assert f"row 2, {column}: found {value!r}: not a finite number; allowed: a finite number" in message
    assert "not a number" not in message


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("SS", "3", r"row 2, SS: found '3'; allowed: 0 or 1 or 2"),
        ("MDV", "2", r"row 2, MDV: found '2'; allowed: 0 or 1"),
        ("BLQ", "-1", r"row 2, BLQ: found '-1'; allowed: 0 or 1"),
        ("ADDL", "1.5", r"row 2, ADDL: found '1.5'; allowed: a whole number >= 0"),
        ("ADDL", "-2", r"row 2, ADDL: found '-2'; allowed: a whole number >= 0"),
        ("LLOQ", "0", r"row 2, LLOQ: found 0; allowed: a limit > 0 or blank"),
        ("RATE", "-1", r"row 2, RATE: found -1; allowed: a value >= 0 or blank \(modelled rates, RATE=-1/-2, are not supported\)"),
        ("DUR", "-3", r"row 2, DUR: found -3; allowed: a value >= 0 or blank$"),
        ("II", "-24", r"row 2, II: found -24; allowed: a value >= 0 or blank"),
    ],
)
def test_optional_column_values(tmp_path, column, value, match):
    header, rows = with_column(column, {2: value})
    with pytest.raises(DatasetError, match=re.compile(match, re.M)):
        read_dataset(write(tmp_path, rows, header))


# -- subjects and time -----------------------------------------------------------------------------


def test_subject_rows_not_together(tmp_path):
    rows = [*ROWS, ["1", "5", "0", "", "", "plasma", "1.0", "70"]]
    with pytest.raises(DatasetError, match=r"row 9, ID: found 1 again after other subjects \(its rows start at row 2\); allowed: each subject's rows together"):
        read_dataset(write(tmp_path, rows))


def test_time_decreasing_within_subject(tmp_path):
    with pytest.raises(DatasetError, match=r"row 5, TIME: found 0.25, earlier than 1 on an earlier row of ID 1; allowed: times non-decreasing within a subject"):
        read_dataset(write(tmp_path, edited((5, "TIME", "0.25"))))


def test_time_restarts_with_a_new_subject(tmp_path):
    assert read_dataset(write(tmp_path)).data["TIME"].iloc[4] == 0


# -- EVID, doses, observations -------------------------------------------------------------------------


def test_mdv_zero_on_dose_row(tmp_path):
    header, rows = with_column("MDV", {2: "0"})
    with pytest.raises(DatasetError, match=r"row 2, MDV: found 0 on an EVID=1 row; allowed: 1 or blank \(only observations, EVID=0, have MDV=0\)"):
        read_dataset(write(tmp_path, rows, header))


@pytest.mark.parametrize(("value", "found"), [("0", "found 0"), ("-5", "found -5")])
def test_amount_not_positive_on_dose_row(tmp_path, value, found):
    with pytest.raises(DatasetError, match=rf"row 2, AMT: {found} on a dose row \(EVID=1\); allowed: an amount > 0"):
        read_dataset(write(tmp_path, edited((2, "AMT", value))))


def test_amount_blank_on_dose_row(tmp_path):
    with pytest.raises(DatasetError, match=r"row 6, AMT: blank on a dose row; allowed: an amount > 0"):
        read_dataset(write(tmp_path, edited((6, "AMT", ""))))


def test_amount_column_missing(tmp_path):
    j = HEADER.index("AMT")
    rows = [r[:j] + r[j + 1 :] for r in ROWS]
    with pytest.raises(DatasetError, match=r"column AMT: missing, needed on 2 rows \(2, 6\); allowed: an amount > 0"):
        read_dataset(write(tmp_path, rows, HEADER[:j] + HEADER[j + 1 :]))


def test_negative_amount_at_steady_state_infusion(tmp_path):
    header = [*HEADER, "RATE", "SS"]
    rows = edited((2, "AMT", "-1"), (2, "RATE", "10"), (2, "SS", "1"), rows=[[*r, "", ""] for r in ROWS], header=header)
    with pytest.raises(DatasetError, match=r"row 2, AMT: found -1; allowed: 0 or blank for a constant infusion at steady state"):
        read_dataset(write(tmp_path, rows, header))


def test_dv_on_dose_row(tmp_path):
    with pytest.raises(DatasetError, match=r"row 2, DV: found 3.5 on an EVID=1 row, where it would be ignored; allowed: blank or 0 \(put the sample on its own row with EVID=0\)"):
        read_dataset(write(tmp_path, edited((2, "DV", "3.5"))))


def test_dv_zero_on_dose_row_is_the_nonmem_convention(tmp_path):
    assert read_dataset(write(tmp_path, edited((2, "DV", "0")))).subjects == (1, 2)


def test_rate_and_duration_both_given(tmp_path):
    header = [*HEADER, "RATE", "DUR"]
    rows = edited((2, "RATE", "10"), (2, "DUR", "2"), rows=[[*r, "", ""] for r in ROWS], header=header)
    with pytest.raises(DatasetError, match=r"row 2, RATE/DUR: found RATE=10 and DUR=2; allowed: one of them \(the other blank or 0\)"):
        read_dataset(write(tmp_path, rows, header))


def test_addl_without_interval(tmp_path):
    header, rows = with_column("ADDL", {2: "3"})
    with pytest.raises(DatasetError, match=r"row 2, II: found 0 with ADDL=3; allowed: II > 0 when ADDL > 0"):
        read_dataset(write(tmp_path, rows, header))


def test_steady_state_without_interval(tmp_path):
    header, rows = with_column("SS", {2: "1"})
    with pytest.raises(DatasetError, match=r"row 2, II: found 0 with SS=1; allowed: II > 0 at steady state \(or RATE > 0 with II=0 for a constant infusion\)"):
        read_dataset(write(tmp_path, rows, header))


@pytest.mark.parametrize("column", ["ADDL", "SS", "II", "RATE", "DUR"])
def test_dosing_column_on_observation_row(tmp_path, column):
    header, rows = with_column(column, {3: "1"})
    with pytest.raises(DatasetError, match=rf"row 3, {column}: found 1 on an EVID=0 row, where it would be ignored; allowed: blank or 0 \(dosing columns apply to dose rows"):
        read_dataset(write(tmp_path, rows, header))


def test_amount_on_observation_row(tmp_path):
    with pytest.raises(DatasetError, match=r"row 3, AMT: found 50 on an EVID=0 row, where it would be ignored"):
        read_dataset(write(tmp_path, edited((3, "AMT", "50"))))


def test_dv_blank_on_observation_row(tmp_path):
    with pytest.raises(DatasetError, match=r"row 3, DV: blank on an observation row \(EVID=0\); allowed: a measured value \(a finite number\), MDV=1 to ignore the row, or with BLQ=1 the limit in LLOQ"):
        read_dataset(write(tmp_path, edited((3, "DV", ""))))


def test_dv_column_missing(tmp_path):
    j = HEADER.index("DV")
    rows = [r[:j] + r[j + 1 :] for r in ROWS]
    with pytest.raises(DatasetError, match=r"column DV: missing, needed on 5 rows \(3, 4, 5, 7, 8\)"):
        read_dataset(write(tmp_path, rows, HEADER[:j] + HEADER[j + 1 :]))


def test_blq_without_dv_or_lloq(tmp_path):
    header, rows = with_column("BLQ", {3: "1"})
    with pytest.raises(DatasetError, match=r"row 3, DV: blank on an observation row"):
        read_dataset(write(tmp_path, edited((3, "DV", ""), rows=rows, header=header), header))


# -- ROUTE and CMT ------------------------------------------------------------------------------------------


def test_route_vocabulary(tmp_path):
    with pytest.raises(DatasetError, match=r"row 2, ROUTE: found 'oral'; allowed: one of it, ia, iv, sc, po$"):
        read_dataset(write(tmp_path, edited((2, "ROUTE", "oral"))))


def test_route_not_in_model(tmp_path, one_cpt):
    with pytest.raises(DatasetError, match=r"row 2, ROUTE: found 'it'; allowed: one of iv \(model one_cpt_iv\)"):
        read_dataset(write(tmp_path, edited((2, "ROUTE", "it"))), one_cpt)


def test_dose_row_without_route_or_cmt(tmp_path):
    with pytest.raises(DatasetError, match=r"row 6, ROUTE/CMT: both blank on a dose row; allowed: a route \(it, ia, iv, sc, po\) or a receiving compartment in CMT"):
        read_dataset(write(tmp_path, edited((6, "ROUTE", ""))))


def test_route_and_cmt_columns_missing(tmp_path):
    keep = [j for j, h in enumerate(HEADER) if h not in ("ROUTE", "CMT")]
    rows = [[r[j] for j in keep] for r in ROWS]
    with pytest.raises(DatasetError, match=r"column ROUTE: missing \(and no CMT column\); allowed: ROUTE on dose rows"):
        read_dataset(write(tmp_path, rows, [HEADER[j] for j in keep]))


def test_cmt_blank_on_observation_without_model(tmp_path):
    with pytest.raises(DatasetError, match=r"row 3, CMT: blank on an observation row; allowed: the name of the output measured"):
        read_dataset(write(tmp_path, edited((3, "CMT", ""))))


def test_cmt_blank_on_observation_with_two_output_model(tmp_path, it_mini):
    with pytest.raises(DatasetError, match=r"row 3, CMT: blank on an observation row; allowed: an output of model it_mini: plasma, tumor"):
        read_dataset(write(tmp_path, edited((3, "CMT", ""))), it_mini)


def test_cmt_on_observation_must_be_an_output(tmp_path, it_mini):
    with pytest.raises(DatasetError, match=r"row 3, CMT: found 'A_P' on an observation row; allowed: an output of model it_mini: plasma, tumor \(or its number 1-2\)"):
        read_dataset(write(tmp_path, edited((3, "CMT", "A_P"))), it_mini)


@pytest.mark.parametrize("value", ["plasma", "3", "0"])
def test_cmt_on_dose_must_be_a_compartment(tmp_path, it_mini, value):
    with pytest.raises(DatasetError, match=rf"row 2, CMT: found '{value}' on a dose row; allowed: a compartment of model it_mini: A_T, A_P \(or its number 1-2\)"):
        read_dataset(write(tmp_path, edited((2, "CMT", value))), it_mini)


# -- covariates, arms, duplicates ----------------------------------------------------------------------------


def test_covariate_not_constant(tmp_path):
    with pytest.raises(DatasetError, match=r"row 4, WT: found 71, but ID 1 has 70 on row 2; allowed: one value per subject \(without a model, covariates are constant"):
        read_dataset(write(tmp_path, edited((4, "WT", "71"))))


def test_covariate_not_constant_and_not_time_varying_in_model(tmp_path, it_mini):
    header, rows = with_column("DIAM", {2: "2", 3: "2", 4: "2.5", 5: "2", 6: "3", 7: "3", 8: "3"})
    with pytest.raises(DatasetError, match=r"row 4, DIAM: found 2.5, but ID 1 has 2 on row 2; allowed: one value per subject \(DIAM is not time-varying in model it_mini\)"):
        read_dataset(write(tmp_path, rows, header), it_mini)


def test_model_covariate_must_be_a_number(tmp_path, it_mini):
    header, rows = with_column("diam", {2: "2", 3: "big", 4: "2", 5: "2", 6: "3", 7: "3", 8: ""})
    message = problem(tmp_path, rows, header, it_mini)
    assert "row 3, DIAM: found 'big', not a number; allowed: a finite number (covariate DIAM of model it_mini, cm; drop the column to use the default 2)" in message
    assert "row 8, DIAM: blank; allowed: a finite number (covariate DIAM" in message


def test_model_covariate_overflow_and_nan_say_what_was_found(tmp_path, it_mini):
    # found by a user walkthrough: 'nan' was reported as "blank", 1e400 as "not a number"
    header, rows = with_column("DIAM", {2: "2", 3: "2", 4: "2", 5: "2", 6: "1e400", 7: "NaN", 8: "3"})
    message = problem(tmp_path, rows, header, it_mini)
    assert "row 6, DIAM: found '1e400': not a finite number; allowed: a finite number (covariate DIAM" in message
    assert "row 7, DIAM: found 'NaN' (read as a missing value); allowed: a finite number (covariate DIAM" in message


def test_text_covariate_without_model_is_kept(tmp_path):
    header, rows = with_column("SITE", {i: ("A" if i < 6 else "B") for i in range(2, 9)})
    assert read_dataset(write(tmp_path, rows, header)).data["SITE"].tolist() == ["A"] * 4 + ["B"] * 3


def test_arm_not_constant(tmp_path):
    header, rows = with_column("ARM", {2: "IT", 3: "IV"})
    with pytest.raises(DatasetError, match=r"row 3, ARM: found IV, but ID 1 has IT on row 2; allowed: one arm per subject"):
        read_dataset(write(tmp_path, rows, header))


def test_arms_listed(tmp_path):
    header, rows = with_column("ARM", {2: "IT", 6: "IV"})
    assert read_dataset(write(tmp_path, rows, header)).arms == ("IT", "IV")


def test_duplicated_row(tmp_path):
    rows = [*ROWS[:3], ROWS[2], *ROWS[3:]]
    with pytest.raises(DatasetError, match=r"row 5: a copy of row 4; allowed: each event once"):
        read_dataset(write(tmp_path, rows))


# -- aggregation ---------------------------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once(tmp_path):
    rows = edited((2, "AMT", "0"), (3, "TIME", "abc"), (5, "EVID", "9"), (6, "ROUTE", "oral"), (8, "DV", ""))
    message = problem(tmp_path, rows)
    assert message.startswith(f"{tmp_path / 'd.csv'}: invalid dataset, 5 problems:")
    for expected in ("row 2, AMT", "row 3, TIME", "row 5, EVID", "row 6, ROUTE", "row 8, DV"):
        assert expected in message
    # Listed in file order.
    assert [int(m) for m in re.findall(r"- row (\d+)", message)] == [2, 3, 5, 6, 8]


def test_problem_list_is_capped(tmp_path):
    rows = [["1", str(t), "0", "", "", "plasma", "x", "70"] for t in range(MAX_LISTED + 20)]
    message = problem(tmp_path, rows)
    assert f"invalid dataset, {MAX_LISTED + 20} problems:" in message
    assert message.count("\n  - ") == MAX_LISTED
    assert message.endswith("... and 20 more")


# -- fuzzing: corruptions of a valid file raise DatasetError and nothing else ---------------------------------------


def _theoph_rows() -> tuple[list[str], list[list[str]]]:
    text = (files("itpk.data") / "theoph.csv").read_text()
    records = list(csv.reader(io.StringIO(text)))
    header, rows = records[0], records[1:]
    return header, [r for r in rows if r[0] in ("1", "2", "3")]


THEOPH_HEADER, THEOPH_ROWS = _theoph_rows()
ONE_CPT_ORAL = load_model("one_cpt_oral")
JUNK = st.sampled_from(["abc", "1,5", "--", "1e", "x1", "inf", "0x10", "1 2", "#"])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    # Module scope: Hypothesis runs many examples per test call, so no function-scoped tmp_path.
    return tmp_path_factory.mktemp("fuzz")


@st.composite
def corrupted(draw):
    """A theoph subset with 1-3 corruptions, each of which alone makes it invalid; and the rows hit."""
    rows = [list(r) for r in THEOPH_ROWS]
    col = {name: j for j, name in enumerate(THEOPH_HEADER)}
    hit: list[int] = []
    if draw(st.booleans()):  # shuffle one subject's times so that some decrease
        subject = draw(st.sampled_from(["1", "2", "3"]))
        index = [i for i, r in enumerate(rows) if r[0] == subject]
        times = [rows[i][col["TIME"]] for i in index]
        shuffled = draw(st.permutations(times))
        assume(any(float(b) < float(a) for a, b in zip(shuffled, shuffled[1:])))
        for i, t in zip(index, shuffled):
            rows[i][col["TIME"]] = t
        hit += [i + 2 for i in index]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(rows) - 1))
        dose = rows[i][col["EVID"]] == "1"
        kind = draw(st.sampled_from(["junk", "delete", "evid"]))
        if kind == "junk":
            column = draw(st.sampled_from(["TIME", "EVID", "AMT" if dose else "DV"]))
            rows[i][col[column]] = draw(JUNK)
        elif kind == "delete":
            column = draw(st.sampled_from(["ID", "TIME", "EVID", "AMT" if dose else "DV"] + ([] if dose else ["CMT"])))
            rows[i][col[column]] = draw(st.sampled_from(["", ".", "NA"]))
        else:
            rows[i][col["EVID"]] = draw(st.sampled_from(["5", "-1", "1.5", "9", "x"]))
        hit.append(i + 2)
    return rows, hit


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(corrupted())
def test_fuzz_corruptions_raise_dataset_error(fuzz_dir, case):
    rows, hit = case
    path = write(fuzz_dir, rows, THEOPH_HEADER, name="corrupt.csv")
    with pytest.raises(DatasetError) as info:
        read_dataset(path)
    assert any(f"row {r}" in str(info.value) for r in hit)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, len(THEOPH_ROWS) - 1),
    st.integers(0, len(THEOPH_HEADER) - 1),
    st.text(max_size=12),
    st.booleans(),
)
def test_fuzz_any_cell_text_gives_dataset_or_dataset_error(fuzz_dir, i, j, text, with_model):
    rows = [list(r) for r in THEOPH_ROWS]
    rows[i][j] = text
    path = write(fuzz_dir, rows, THEOPH_HEADER, name="any.csv")
    try:
        ds = read_dataset(path, ONE_CPT_ORAL if with_model else None)
    except DatasetError:
        return
    assert len(ds.data) == len(rows)  # never drops a row silently


# -- CLI: itpk data validate -----------------------------------------------------------------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    app.command("nca")(nca_command)
    return app


def test_cli_validate_prints_summary():
    path = files("itpk.data") / "theoph.csv"
    result = CliRunner().invoke(cli(), ["data", "validate", str(path), "--model", "one_cpt_oral"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "valid (144 rows, 12 subjects)" in out
    assert "doses: po 12" in out and "observations: plasma 132" in out
    assert "censored (BLQ): 0 of 132 (0.0%)" in out
    assert "values taken to be in the model's units" in out


def test_cli_validate_reports_problems_and_exits_1(tmp_path):
    path = write(tmp_path, edited((3, "TIME", "abc"), (6, "ROUTE", "oral")))
    result = CliRunner().invoke(cli(), ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert "row 3, TIME: found 'abc'" in result.stderr and "row 6, ROUTE: found 'oral'" in result.stderr
    assert "Traceback" not in result.output


def test_cli_validate_unknown_model_exits_1(tmp_path):
    result = CliRunner().invoke(cli(), ["data", "validate", str(write(tmp_path)), "--model", "nope"])
    assert result.exit_code == 1 and "unknown model 'nope'" in result.stderr


def test_cli_validate_missing_file_exits_1(tmp_path):
    result = CliRunner().invoke(cli(), ["data", "validate", str(tmp_path / "nope.csv")])
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_a_negative_time_is_refused_with_its_row():
    # found by review (session 19): it passed validation and failed after the whole fit
    frame = pd.DataFrame({"ID": [1, 1], "TIME": [-1.0, 0.0], "EVID": [0, 1], "AMT": [None, 100.0], "DV": [0.5, None],
                          "ROUTE": ["", "iv"], "CMT": ["plasma", ""]})
    with pytest.raises(DatasetError, match=r"row 2, TIME: found -1; allowed: a time >= 0"):
        read_frame(frame, load_model("one_cpt_iv"))


def test_a_model_with_one_output_offers_number_1_not_a_range():
    # walkthrough (session 20): "(or its number 1-1)"
    frame = pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 1.0], "EVID": [1, 0], "AMT": [10.0, None], "ROUTE": ["iv", ""],
                          "CMT": ["", "blood"], "DV": [None, 1.0]})
    with pytest.raises(DatasetError, match=r"an output of model one_cpt_iv: plasma \(or its number 1\)"):
        read_frame(frame, load_model("one_cpt_iv"))


# -- covariates the model cannot use, and contradictory BLQ flags (found by a robustness audit) ----------------


def test_covariates_that_make_a_rate_or_volume_invalid_are_data_errors(tmp_path):
    # DIAM=-2 validated, and the fit stopped 56 s later naming a rate but no row
    frame = pd.read_csv(files("itpk.data") / "example_it_vs_iv.csv")
    frame.loc[frame["ID"] == 2, "DIAM"] = -3.0  # an IV subject: plasma only, so the uptake rate
    frame.loc[frame["ID"] == 7, "DIAM"] = -2.0  # an IT subject: the rate, and the lesion volume it observes
    path = tmp_path / "trial.csv"
    frame.to_csv(path, index=False)
    (tmp_path / "trial.units.toml").write_bytes((files("itpk.data") / "example_it_vs_iv.units.toml").read_bytes())
    with pytest.raises(DatasetError) as info:
        read_dataset(path, load_model("it_antibody"))
    message = str(info.value)
    assert "invalid dataset, 3 problems:" in message, message
    # CL_in = k_out*Kp*V_T, V_T = pi/6*DIAM**3/1000 L: -2 cm gives V_T = -0.004189 L (rel 1e-4 as printed)
    v_t = np.pi / 6 * (-2.0) ** 3 / 1000
    assert f"row 73, DIAM: found DIAM=-2 cm (ID 7), for which the volume of tumor (observed as tumor) V_T = {v_t:.4g}" in message
    assert "row 13, DIAM: found DIAM=-3 cm (ID 2), for which the rate of central -> tumor CL_in / V = " in message
    frame.loc[frame["ID"].isin([2, 7]), "DIAM"] = 2.5
    frame.to_csv(path, index=False)
    assert read_dataset(path, load_model("it_antibody")).data["DIAM"].min() > 0  # valid again


def test_blq_flags_that_contradict_the_row_are_data_errors(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("ID,TIME,EVID,AMT,ROUTE,CMT,DV,BLQ,LLOQ,II,ADDL\n1,0,1,10,iv,,,1,,1,1000000\n"
                    "1,1,0,,,plasma,5,1,0.5,,\n1,3,0,,,plasma,0.2,1,0.5,,\n")
    with pytest.raises(DatasetError) as info:
        read_dataset(path, load_model("one_cpt_iv"))
    message = str(info.value)
    for text in ["row 2, ADDL: found 1000000; allowed: at most 100000 additional doses on one row",
                 "row 2, BLQ: found 1 on an EVID=1 row; allowed: blank or 0 (BLQ marks observations, EVID=0)",
                 "row 3, DV: found 5 mg/L above LLOQ 0.5 mg/L on a row flagged BLQ=1 (plasma in the model's unit)"]:
        assert text in message, text
    assert "row 4" not in message  # 0.2 below a limit of 0.5 is what BLQ=1 means
    # DV holding the limit, in other units than LLOQ: equal up to the round-off of two conversion factors
    path.write_text("ID,TIME,EVID,AMT,ROUTE,CMT,DV,BLQ,LLOQ\n1,0,1,10,iv,,,,\n1,1,0,,,plasma,700,1,0.7\n")
    (tmp_path / "b.units.toml").write_text('DV = "ng/mL"\nLLOQ = "ug/mL"\n')
    assert read_dataset(path, load_model("one_cpt_iv")).censored.sum() == 1


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "u16.csv"
    path.write_text("ID,TIME,EVID,AMT,ROUTE,CMT,DV\n1,0,1,10,iv,,\n", encoding="utf-16")  # with its byte-order mark
    with pytest.raises(DatasetError, match=r"file: is UTF-16 text; allowed: CSV saved as UTF-8"):
        read_dataset(path)
