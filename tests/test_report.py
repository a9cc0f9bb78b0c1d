"""``itpk report``: one self-contained HTML file, sections in order, failures first."""

import html
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    # prior/posterior 1, GoF 2 outputs, individual 1 page, pcVPC 2 outputs, route profiles 1,
    # trace pages (6 parameters each), energy 1
    n = nuts_html.count("<td>IIV on ") + nuts_html[nuts_html.find("Population (typical)"):].split("</table>")[0].count("<tr>") - 1
    assert nuts_html.count('src="data:image/png;base64,') == 1 + 2 + 1 + 2 + 1 + -(-n // 6) + 1
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
    # and what to change, from run.json's advice (more draws, or a look at the chains first)
    assert record["diagnostics"]["advice"]
    assert "What to change" in body
    assert all(html.escape(a) in body for a in record["diagnostics"]["advice"])
    settings = record["settings"]
    for a in record["diagnostics"]["advice"]:
        if a.startswith("rerun with --draws"):  # the fit's own chains and draws, in that order
            assert f"{settings['chains']} x {settings['draws']} draws" in a


def test_passed_diagnostics_green(runs, tmp_path):
    from itpk.report import write_report

    copy = tmp_path / "run"
    shutil.copytree(runs["nuts"], copy)
    record = json.loads((copy / "run.json").read_text())
    record["diagnostics"].update(passed=True, reasons=[], max_r_hat=1.001, min_ess_bulk=900.0, divergences=0)
    (copy / "run.json").write_text(json.dumps(record))
    text = write_report(copy, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'class="verdict pass"' in text and "Diagnostics passed" in text


def test_non_finite_diagnostics_are_failed_checks(runs):
    # run.json is strict JSON: a non-finite R-hat (a variable that did not move) is written as null,
    # and the report shows it as a failed check, not as a missing one
    from itpk import jsontext
    from itpk.report import read_run, verdict

    run = read_run(runs["nuts"])
    run.record["diagnostics"].update(passed=False, max_r_hat=float("nan"), min_ess_bulk=float("nan"))
    run.record.update(json.loads(jsontext.dumps(run.record, default=str)))
    assert run.record["diagnostics"]["max_r_hat"] is None
    checks = {name: (shown, ok) for name, shown, _, ok in verdict(run)["checks"]}
    assert checks["max R-hat"] == ("—", False) and checks["min bulk ESS"] == ("—", False)


def test_exposure_sentences(nuts_html):
    section = nuts_html[nuts_html.find("7. Intratumoral"):nuts_html.find("8. Sampler")]
    assert "Injecting into the tumour gives" in section
    assert re.search(r"gives [0-9.e+]+× \(95% CrI [0-9.e+]+–[0-9.e+]+\) the tumour exposure", section)
    assert "P(&gt;1)" in section
    assert 'alt="tumour and plasma profiles by route" src="data:image/png;base64,' in section
    assert "Same dose (10 mg, once)" in section


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
    with pytest.raises(ItpkError, match="format: found 99; allowed: 1 "):
        write_report(old)
    # hand edits (found by a robustness audit: each was an AttributeError or ValueError traceback)
    for edit, message in [(lambda r: [r], "found a JSON list; allowed: an object"),
                          (lambda r: {**r, "diagnostics": "bad"}, 'diagnostics: found "bad"; allowed: an object')]:
        (old / "run.json").write_text(json.dumps(edit({**record, "format": 1})))
        with pytest.raises(ItpkError, match=re.escape(message)):
            write_report(old)
    edited = tmp_path / "edited"
    shutil.copytree(runs["map"], edited)
    summary = pd.read_csv(edited / "summary.csv")
    summary["median"] = summary["median"].astype(object)
    summary.loc[1, "median"] = "abc"
    summary.to_csv(edited / "summary.csv", index=False)
    with pytest.raises(ItpkError, match=r"summary.csv: row 3, median: found 'abc'; allowed: a number"):
        write_report(edited)
    cols = tmp_path / "cols"
    shutil.copytree(runs["map"], cols)
    pd.read_csv(cols / "predictions.csv").drop(columns=["PIT"]).to_csv(cols / "predictions.csv", index=False)
    with pytest.raises(ItpkError, match="missing column"):
        write_report(cols)
    # a truncated posterior.nc and a garbled model.toml: one message each, for report and compare
    from itpk.run import load_run

    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs["map"], corrupt)
    (corrupt / "posterior.nc").write_bytes((corrupt / "posterior.nc").read_bytes()[:2000])
    for read in (write_report, load_run):
        with pytest.raises(ItpkError, match=r"posterior.nc: unreadable \("):
            read(corrupt)
    # a model.toml edited after the fit (another k_out, say) would describe other parameters than the posterior's
    swapped = tmp_path / "swapped"
    shutil.copytree(runs["map"], swapped)
    text = (swapped / "model.toml").read_text(encoding="utf-8")
    (swapped / "model.toml").write_text(text + "\n# a comment changes nothing\n", encoding="utf-8")
    load_run(swapped)
    edited_model = re.sub(r"(?m)^(CL = \{ value = )[0-9.e+-]+", r"\g<1>9.75", text)
    assert edited_model != text
    (swapped / "model.toml").write_text(edited_model, encoding="utf-8")
    with pytest.raises(ItpkError, match=r"model.toml: is not the model this run was fitted with"):
        load_run(swapped)
    garbled = tmp_path / "garbled"
    shutil.copytree(runs["map"], garbled)
    (garbled / "model.toml").write_text("name = [unclosed", encoding="utf-8")
    with pytest.raises(ItpkError, match=r"model.toml: unreadable \("):
        load_run(garbled)


def _ipred_median(run) -> np.ndarray:
    ipred = np.asarray(run.tree["posterior"]["IPRED"])
    return np.median(ipred.reshape(-1, ipred.shape[-1]), axis=0)


def test_individual_fits_are_smooth_and_reproduce_the_fitted_ipred(runs):
    """Curves on a grid far denser than the data, whose median at the observation times is the
    posterior median of IPRED: the re-simulation (itpk.simulate, each subject's own draws, doses
    and covariates from the data file) matches the fit. All 80 draws are used (fewer than
    CURVE_DRAWS_LINEAR), so the two medians agree to rounding: rtol 1e-8."""
    from itpk.report import CURVE_DRAWS_LINEAR, individual_curves, read_run

    run = read_run(runs["nuts"])
    curves, note = individual_curves(run)
    assert note == ""
    assert set(curves) == set(run.predictions["ID"])
    median = _ipred_median(run)
    pred = run.predictions
    for sid, c in curves.items():
        rows = np.flatnonzero((pred["ID"] == sid).to_numpy())
        assert c.draws == min(80, CURVE_DRAWS_LINEAR)
        assert c.times.size >= 10 * rows.size and np.all(np.diff(c.times) > 0)
        assert c.times[0] == 0.0 and c.times[-1] > pred["TIME"].to_numpy()[rows].max()
        for output in set(pred["CMT"].to_numpy()[rows]):
            r = rows[pred["CMT"].to_numpy()[rows] == output]
            at = np.searchsorted(c.times, pred["TIME"].to_numpy()[r])
            np.testing.assert_allclose(c.bands[output][1, at], median[r], rtol=1e-8)
            lo, med, hi = c.bands[output]
            assert np.all(lo <= med + 1e-12) and np.all(med <= hi + 1e-12)


def test_a_wrong_subject_mapping_is_caught_not_drawn(runs):
    """Posterior subjects relabelled in reverse: every re-simulation misses the fitted IPRED
    (by far more than CURVE_RTOL), so no subject gets a smooth curve and the page says why."""
    from itpk.report import individual_curves, read_run

    run = read_run(runs["nuts"])
    post = run.tree["posterior"].to_dataset()
    run.tree["posterior"] = post.assign_coords(subject=list(post.coords["subject"].values)[::-1])
    curves, note = individual_curves(run)
    assert curves == {}
    assert note.startswith("individual fits of 6 subject(s) drawn at the observation times only")
    assert "differ from the fitted IPRED" in note


def test_curve_grid_catches_doses_and_infusion_ends():
    from itpk.events import Dose, Schedule, Target
    from itpk.report import curve_grid

    schedule = Schedule((Dose(0.0, 10.0, Target("iv"), rate=10.0), Dose(100.0, 10.0, Target("it"), ii=24.0, addl=1)))
    grid = curve_grid(schedule, np.array([0.5, 300.0]))
    for t in (0.0, 0.5, 1.0, 100.0, 124.0, 300.0):  # doses, the infusion end, observations
        assert np.any(grid == t), t
    assert np.any((grid < 124.0) & (grid > 124.0 - 1e-3))  # just before a later dose: the jump is vertical
    assert grid[-1] == pytest.approx(315.0) and grid.size > 200


def test_draw_thinning_is_seeded_and_deterministic():
    from itpk.report import draw_index

    a, b = draw_index(4000, 200, seed=1), draw_index(4000, 200, seed=1)
    assert np.array_equal(a, b) and a.size == 200 and np.all(np.diff(a) > 0)
    assert np.array_equal(draw_index(80, 200, seed=1), np.arange(80))


def test_individual_fits_fall_back_when_the_data_file_is_gone_or_changed(runs, tmp_path):
    from itpk.report import individual_curves, read_run, write_report

    gone = tmp_path / "gone"
    shutil.copytree(runs["map"], gone)
    record = json.loads((gone / "run.json").read_text())
    record["data"] = str(tmp_path / "moved.csv")
    (gone / "run.json").write_text(json.dumps(record))
    text = write_report(gone, tmp_path / "gone.html", progress=False).read_text(encoding="utf-8")
    assert "moved.csv&#39; not found" in text
    assert "individual fits are drawn at the observation times only" in text
    assert "at the observation times only (the data file could not be re-read" in text
    assert text.count('alt="individual fits, page') == 1

    changed = tmp_path / "changed"
    shutil.copytree(runs["map"], changed)
    data = tmp_path / "data.csv"
    data.write_text((runs["folder"] / "data.csv").read_text() + "\n")
    shutil.copy(runs["folder"] / "data.units.toml", tmp_path / "data.units.toml")
    record = json.loads((changed / "run.json").read_text())
    record["data"] = str(data)
    (changed / "run.json").write_text(json.dumps(record))
    run = read_run(changed)
    assert "changed since the fit" in run.data_note
    assert individual_curves(run) == ({}, "")


def test_prediction_correction_by_hand():
    """pcDV = DV · median(PRED in bin) / PRED (Bergstrand 2011); log scale: additive, same ratio."""
    from itpk.report import prediction_correct

    dv = np.array([1.0, 3.0, 2.0, 4.0, 10.0])
    pred = np.array([1.0, 2.0, 4.0, 8.0, 2.0])
    bins = np.array([0, 0, 1, 1, 1])  # bin medians of PRED: 1.5 and 4
    expected = np.array([1.0 * 1.5 / 1, 3.0 * 1.5 / 2, 2.0 * 4 / 4, 4.0 * 4 / 8, 10.0 * 4 / 2])
    np.testing.assert_allclose(prediction_correct(dv, pred, bins), expected, rtol=1e-14)
    sims = np.stack([dv, 2 * dv])  # replicates (draws, n) get the same per-observation factor
    np.testing.assert_allclose(prediction_correct(sims, pred, bins), np.stack([expected, 2 * expected]), rtol=1e-14)
    # log-normal error: log pcDV = log DV + median(log PRED in bin) - log PRED
    log_pc = prediction_correct(dv, pred, bins, log=True)
    medlog = np.array([np.median(np.log(pred[bins == b])) for b in bins])
    np.testing.assert_allclose(np.log(log_pc), np.log(dv) + medlog - np.log(pred), rtol=1e-14, atol=1e-14)
    # data exactly proportional to PRED become flat within a bin: what lets doses and arms be pooled
    flat = prediction_correct(3 * pred, pred, bins)
    assert np.ptp(flat[bins == 0]) == 0 and np.ptp(flat[bins == 1]) == 0


def test_vpc_is_prediction_corrected_with_blq_panel(nuts_html):
    section = nuts_html[nuts_html.find("6. Visual predictive checks"):nuts_html.find("7. Intratumoral")]
    assert section.count('alt="prediction-corrected VPC, ') == 2
    assert "Prediction-corrected VPC (Bergstrand et al. 2011" in section
    assert "pcDV = DV × median(PRED in bin) / PRED" in section
    assert "fraction-censored panel" in section


def test_progress_only_on_a_terminal_and_never_when_quiet(monkeypatch):
    from itpk.report import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, enabled, shown in ((Terminal(), True, True), (Terminal(), False, False), (io.StringIO(), True, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        with Progress(2, enabled=enabled) as bar:
            bar.step("individual fits: subject 1")
            bar.advance()
        assert ("individual fits" in stream.getvalue()) is shown


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
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file(), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    pixels = matplotlib.image.imread(shot)
    assert pixels.std() > 0.05  # a blank page is one flat colour


def test_exposure_profiles_follow_the_lesion_the_trial_injected(runs, tmp_path, monkeypatch):
    # exposure.csv says "it@lesion2 vs iv" when the trial's first it dose injected the second lesion:
    # the report's profiles then dose lesion2 through the it route and draw lesion2 as the injected
    # lesion (the roles of itpk.exposure.roles_at), not the first lesion
    import itpk.simulate
    from itpk import report
    from itpk.events import Target

    folder = tmp_path / "run"
    shutil.copytree(runs["map"], folder)
    table = pd.read_csv(folder / "exposure.csv")
    table["route"] = "it@lesion2 vs iv"
    table.to_csv(folder / "exposure.csv", index=False)
    calls = []
    real = itpk.simulate.simulate

    def spy(spec, schedule, values, times, outputs=None):
        calls.append((schedule.doses[0].target, list(outputs)))
        return real(spec, schedule, values, times, outputs=outputs)

    monkeypatch.setattr(itpk.simulate, "simulate", spy)
    section = report.exposure_section(report.read_run(folder))
    assert section["route"] == "it@lesion2 vs iv" and section["dose"] == "10 mg" and section["profiles"]
    assert calls == [(Target("it", site="lesion2"), ["lesion2", "plasma"]), (Target("iv"), ["lesion2", "plasma"])]


def test_an_output_path_that_cannot_be_written_is_refused_before_rendering(runs, tmp_path, monkeypatch):
    # review (session 20): --out an existing folder gave a traceback (IsADirectoryError naming the
    # hidden temporary file) after the whole report had been rendered
    import itpk.report
    from itpk.report import write_report

    rendered = []
    monkeypatch.setattr(itpk.report, "render_report", lambda run, bar=None: rendered.append(1) or "<html></html>")
    with pytest.raises(ItpkError, match=r"--out .*: is a folder; give a file name, e\.g\. .*report\.html"):
        write_report(runs["nuts"], tmp_path, progress=False)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ItpkError, match=r"a_file is a file, not a folder"):
        write_report(runs["nuts"], tmp_path / "a_file" / "r.html", progress=False)
    assert rendered == []
    with pytest.raises(ItpkError, match=r"is a file, not a run directory"):
        write_report(tmp_path / "a_file", progress=False)


def test_exposure_csv_states_its_window_draws_and_the_report_says_them(runs, nuts_html):
    exposure = pd.read_csv(runs["nuts"] / "exposure.csv")
    assert set(exposure["auc_interval"]) == {"[0, inf)"} and set(exposure["draws"]) == {80}  # 2 chains x 40
    section = nuts_html[nuts_html.find("7. Intratumoral"):nuts_html.find("8. Sampler")]
    assert "(80 evenly thinned draws); AUC over [0, inf)" in section
    # a targeting index below 1 is not called "higher" (review, session 20)
    assert "higher with intratumoral" not in section
    assert "The tumour-to-plasma exposure ratio with intratumoral injection is " in section


def test_map_report_says_point_estimate_and_shows_no_sampler_traces(runs, tmp_path):
    from itpk.report import write_report

    text = write_report(runs["map"], tmp_path / "m.html", progress=False).read_text(encoding="utf-8")
    assert "Joint posterior mode (a point estimate: no interval)" in text


def test_exposure_profiles_use_the_covariates_of_exposure_csv(runs, monkeypatch):
    # review (session 20): the table took the trial's median covariates and the profiles beside it the
    # model file's defaults, i.e. another lesion size
    import xarray as xr

    import itpk.run
    from itpk.report import exposure_profiles, read_run

    run = read_run(runs["nuts"])
    const = xr.open_datatree(runs["nuts"] / "posterior.nc")["constant_data"].to_dataset()
    # DIAM2 is not in the example's file: it keeps the model file's 2 cm and is not called the trial's
    expected = {"DIAM": float(np.median(const["covariate_DIAM"].values))}
    assert run.record["typical_covariates"] == pytest.approx(expected, rel=1e-12)
    exposure = pd.read_csv(runs["nuts"] / "exposure.csv")
    assert set(exposure["covariates"]) == {f"DIAM={expected['DIAM']:.6g} cm; DIAM2=2 cm (model file)"}
    seen = []
    real = itpk.run.posterior_values
    monkeypatch.setattr(itpk.run, "posterior_values", lambda *a, **k: seen.append(k.get("overrides")) or real(*a, **k))
    exposure_profiles(run, "it", "iv", 10.0)
    assert seen == [pytest.approx(expected, rel=1e-12)]
    # and the figure's caption names them (it said "the model's defaults" until session 21)
    from itpk.report import exposure_section

    assert exposure_section(run)["covariates"] == exposure["covariates"].iloc[0]


def test_text_subject_ids_are_not_a_hand_edit(tmp_path):
    # from a review: the numeric check of the run's tables refused predictions.csv with IDs such as P01
    from itpk.report import PREDICTION_COLUMNS, _read_csv

    path = tmp_path / "predictions.csv"
    pd.DataFrame({c: [1.0] for c in PREDICTION_COLUMNS}).assign(ID=["P01"], CMT=["plasma"]).to_csv(path, index=False)
    assert _read_csv(path, PREDICTION_COLUMNS)["ID"].tolist() == ["P01"]
    pd.DataFrame({c: [1.0] for c in PREDICTION_COLUMNS}).assign(ID=["P01"], CMT=["plasma"], IPRED=["x"]).to_csv(path, index=False)
    with pytest.raises(ItpkError, match=r"row 2, IPRED: found 'x'; allowed: a number"):
        _read_csv(path, PREDICTION_COLUMNS)


def test_run_records_with_wrong_types_inside_are_listed():
    from itpk.run import record_problems

    record = {"format": 1, "typical_covariates": {"DIAM": "abc"}, "observations": [1], "diagnostics": {"reasons": 5}}
    assert record_problems(record) == ['observations: found [1]; allowed: an object', 'typical_covariates.DIAM: found "abc"; allowed: a number',
                                       "diagnostics.reasons: found 5; allowed: a list"]


def test_sampler_row_shows_only_what_the_method_used(runs, tmp_path):
    # found by an audit: a laplace report listed chains 4, tune 1000, target_accept 0.9 (defaults that did
    # nothing) and "sampling" time
    from itpk.report import fitted_rows, provenance_rows, read_run

    run = read_run(runs["map"])
    rows = dict(fitted_rows(run))
    assert rows["sampler"] == "method map"
    assert "sampling" not in dict(provenance_rows(run))["wall time"]
    rows = dict(fitted_rows(read_run(runs["nuts"])))
    assert rows["sampler"].startswith("method nuts, chains 2, draws 40, tune 40, target_accept")


def test_intervals_use_one_notation():
    from itpk.report import fmt_interval

    assert fmt_interval(7.67e-4, 0.00773) == "7.67e-04 – 7.73e-03"
    assert fmt_interval(0.5, 2.0) == "0.5 – 2"
    assert fmt_interval(0.0, 3e-4) == "0 – 3.00e-04"


def test_vpc_says_when_a_simulated_percentile_interval_reaches_zero(runs):
    # found by an audit: with an additive error term the 5th percentile's band went below 0 in one bin and
    # its edge vanished from the log axis for the bins before it, unexplained
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from itpk.report import _pc_panel, read_run

    run = read_run(runs["nuts"])
    d = run.predictions[run.predictions["CMT"].astype(str) == "plasma"]
    d = d[d["BLQ"] != 1]
    rng = np.random.default_rng(1)
    pred = d["PRED"].to_numpy(dtype=float)
    sim = pred + rng.normal(0.0, 3 * np.nanmedian(pred), size=(200, pred.size))  # many values <= 0
    fig, ax = plt.subplots()
    _pc_panel(ax, run, "plasma", d.assign(LLOQ=np.nan) if "LLOQ" in d else d, sim, "all")
    notes = [t.get_text() for t in ax.texts]
    bottom = ax.get_ylim()[0]
    drawn = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()])
    plt.close(fig)
    assert 0 < bottom <= drawn[np.isfinite(drawn) & (drawn > 0)].min()  # the clipped edges sit at the bottom
    assert any("simulated percentile interval reaching <= 0" in note and "5th:" in note for note in notes), notes
