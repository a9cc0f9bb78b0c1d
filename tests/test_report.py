"""``itpk report``: one self-contained HTML file, sections in order, failures first."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from itpk.errors import ItpkError

DATA = Path(__file__).resolve().parents[1] / "data" / "example_it_vs_iv.csv"

SECTIONS = ["1. Verdict", "2. Parameters", "3. Prior vs posterior", "4. Goodness of fit", "5. Individual fits",
            "6. Visual predictive checks", "7. Intratumoral vs systemic exposure", "8. Sampler diagnostics"]


def _dataset(folder: Path) -> Path:
    """Six subjects of the IT-vs-IV example (three per arm): plasma and tumour, some values below the LLOQ."""
    frame = pd.read_csv(DATA)
    frame = frame[frame["ID"].isin([1, 2, 3, 7, 8, 9])]
    path = folder / "data.csv"
    frame.to_csv(path, index=False)
    shutil.copy(DATA.with_suffix(".units.toml"), folder / "data.units.toml")
    return path


def _fit(folder: Path, method: str) -> Path:
    from itpk import load_model
    from itpk.dataset import read_dataset
    from itpk.inference import fit
    from itpk.run import write_run

    spec = load_model("it_antibody")
    data = read_dataset(folder / "data.csv", spec)
    kwargs = {"draws": 40, "tune": 40, "chains": 2} if method == "nuts" else {}
    result = fit(spec, data, method=method, seed=3, **kwargs)
    return write_run(result, folder / f"run_{method}", command=["itpk", "fit", "test"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    _dataset(folder)
    return {"nuts": _fit(folder, "nuts"), "map": _fit(folder, "map"), "folder": folder}


@pytest.fixture(scope="module")
def nuts_html(runs):
    from itpk.report import write_report

    out = write_report(runs["nuts"])
    assert out == runs["nuts"] / "report.html"
    return out.read_text(encoding="utf-8")


def test_every_section_present_in_order(nuts_html):
    positions = [nuts_html.find(title) for title in SECTIONS]
    assert all(p >= 0 for p in positions), [t for t, p in zip(SECTIONS, positions, strict=True) if p < 0]
    assert positions == sorted(positions)


def test_figures_embedded_and_nothing_external(nuts_html):
    # prior/posterior 1, GoF 2 outputs, individual 1 page, VPC 2 outputs, trace pages (6 parameters each), energy 1
    n = nuts_html.count("<td>IIV on ") + nuts_html[nuts_html.find("Population (typical)"):].split("</table>")[0].count("<tr>") - 1
    assert nuts_html.count('src="data:image/png;base64,') == 1 + 2 + 1 + 2 + -(-n // 6) + 1
    assert nuts_html.count("<img ") == nuts_html.count('src="data:image/png;base64,')
    assert "http://" not in nuts_html and "https://" not in nuts_html
    for src in re.findall(r'(?:src|href)="([^"]*)"', nuts_html):
        assert src.startswith(("data:image/png;base64,", "#")), src
    assert "<script" not in nuts_html and "@import" not in nuts_html and "url(" not in nuts_html


def test_parameter_table_has_units_priors_and_iiv(nuts_html):
    params = nuts_html[nuts_html.find("2. Parameters"):nuts_html.find("3. Prior vs posterior")]
    for text in ("<td>CL</td><td>L/h</td>", "<td>V</td><td>L</td>", "<td>k_out</td><td>1/h</td>",
                 "lognormal(median 0.0168, σ 0.3)", "IIV on CL", "shrinkage", "sigma_plasma", "proportional"):
        assert text in params, text


def test_failed_diagnostics_shown_first_in_red(nuts_html, runs):
    record = json.loads((runs["nuts"] / "run.json").read_text())
    assert record["diagnostics"]["passed"] is False  # 40 draws cannot reach a bulk ESS of 400
    body = nuts_html[nuts_html.find("<body>"):]
    first = body.find('class="verdict')
    assert first >= 0 and body.find("<h2") > first
    assert 'class="verdict fail"' in body
    assert "Diagnostics FAILED" in body
    assert "min bulk ESS" in body and "FAIL</td>" in body
    assert body.find("Diagnostics FAILED") < body.find("2. Parameters")


def test_passed_diagnostics_green(runs, tmp_path):
    from itpk.report import write_report

    copy = tmp_path / "run"
    shutil.copytree(runs["nuts"], copy)
    record = json.loads((copy / "run.json").read_text())
    record["diagnostics"].update(passed=True, reasons=[], max_r_hat=1.001, min_ess_bulk=900.0, divergences=0)
    (copy / "run.json").write_text(json.dumps(record))
    text = write_report(copy, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'class="verdict pass"' in text and "Diagnostics passed" in text


def test_exposure_sentences(nuts_html):
    section = nuts_html[nuts_html.find("7. Intratumoral"):nuts_html.find("8. Sampler")]
    assert "Injecting into the tumour gives" in section
    assert re.search(r"gives [0-9.e+]+× \(95% CrI [0-9.e+]+–[0-9.e+]+\) the tumour exposure", section)
    assert "P(&gt;1)" in section


def test_map_run_reports_without_sampler_diagnostics(runs, tmp_path):
    from itpk.report import write_report

    text = write_report(runs["map"], tmp_path / "map.html").read_text(encoding="utf-8")
    assert 'class="verdict na"' in text
    assert "no sampler diagnostics" in text
    assert all(title in text for title in SECTIONS)


def test_individual_fits_paginate(runs, tmp_path, monkeypatch):
    from itpk import report

    monkeypatch.setattr(report, "SUBJECTS_PER_FIGURE", 3)
    text = report.write_report(runs["map"], tmp_path / "map.html").read_text(encoding="utf-8")
    assert "Page 2 of 2" in text


def test_incomplete_and_incompatible_run_directories(runs, tmp_path):
    from itpk.report import write_report

    with pytest.raises(ItpkError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(runs["map"], broken)
    (broken / "predictions.csv").unlink()
    with pytest.raises(ItpkError, match="incomplete: missing predictions.csv"):
        write_report(broken)
    old = tmp_path / "old"
    shutil.copytree(runs["map"], old)
    record = json.loads((old / "run.json").read_text())
    record["format"] = 99
    (old / "run.json").write_text(json.dumps(record))
    with pytest.raises(ItpkError, match="format 99 is not supported"):
        write_report(old)
    cols = tmp_path / "cols"
    shutil.copytree(runs["map"], cols)
    pd.read_csv(cols / "predictions.csv").drop(columns=["PIT"]).to_csv(cols / "predictions.csv", index=False)
    with pytest.raises(ItpkError, match="missing column"):
        write_report(cols)


def _app():
    from itpk.cli.report import report_command

    app = typer.Typer()
    app.command("report")(report_command)
    app.command("noop")(lambda: None)  # two commands: "report" stays a sub-command
    return app


def test_cli_writes_report_and_exits_1_on_bad_run(runs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.html"
    result = runner.invoke(_app(), ["report", str(runs["map"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert str(out) in result.output
    result = runner.invoke(_app(), ["report", str(runs["map"]), "--out", str(tmp_path / "q.html"), "--quiet"])
    assert result.exit_code == 0 and result.output == ""
    result = runner.invoke(_app(), ["report", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "error:" in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(nuts_html, runs, tmp_path):
    """A real fit's report loads without console errors and its screenshot is not blank."""
    import matplotlib.image

    from itpk.report import write_report

    page = write_report(runs["nuts"], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,2000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file(), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    pixels = matplotlib.image.imread(shot)
    assert pixels.std() > 0.05  # a blank page is one flat colour
