"""The CLI is a thin shell: right files, one-line errors with exit 1, fast start-up."""

import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from itpk.cli.main import app

runner = CliRunner()
# it_linear counting PFU: --regimen tvec (amounts in PFU) may dose it, into either lesion
PFU_MODEL = str(Path(__file__).parent / "data" / "it_linear_pfu.toml")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_models_list_shows_every_builtin():
    result = run("models", "list")
    assert result.exit_code == 0
    for name in ("one_cpt_iv", "one_cpt_oral", "two_cpt_iv", "two_cpt_oral", "three_cpt_iv", "one_cpt_mm"):
        assert name in result.output


def test_models_show_lists_parameters_with_units_and_priors():
    result = run("models", "show", "two_cpt_iv")
    assert result.exit_code == 0
    assert "central -> peripheral: Q / V1" in result.output
    assert "L/h" in result.output and "lognormal(median=5, sigma=1)" in result.output


def test_models_show_numbers_compartments_for_dose_rows_and_outputs_for_observation_rows():
    # a numeric CMT means a compartment on a dose row and an output on an observation row
    result = run("models", "show", "it_antibody")
    assert "compartments (CMT number on dose rows):\n  1. tumor" in result.output
    assert "  4. central [mg, volume V]" in result.output
    assert "outputs (CMT number on observation rows):\n  1. plasma = central / V" in result.output


def test_simulate_writes_long_csv_matching_closed_form(tmp_path):
    out = tmp_path / "sim.csv"
    result = run("simulate", "one_cpt_iv", "--route", "iv", "--dose", 100, "--at", "0,1,5", "--set", "CL=5", "--set", "V=50", "--out", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["ID", "TIME", "OUTPUT", "VALUE", "UNIT"]
    expected = 100 / 50 * np.exp(-0.1 * np.array([0.0, 1.0, 5.0]))
    np.testing.assert_allclose(frame["VALUE"], expected, rtol=1e-12)  # exact solution: rtol 1e-12
    assert set(frame["UNIT"]) == {"mg/L"}


def test_simulate_population_is_reproducible_and_plots(tmp_path):
    a, b, png = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "p.png"
    common = ["simulate", "two_cpt_iv", "--route", "iv", "--dose", 100, "--every", 12, "--doses", 4, "--infusion", 1,
              "--subjects", 20, "--seed", 7]
    assert run(*common, "--out", a, "--plot", png).exit_code == 0
    assert run(*common, "--out", b).exit_code == 0
    fa, fb = pd.read_csv(a), pd.read_csv(b)
    pd.testing.assert_frame_equal(fa, fb)
    assert fa["ID"].nunique() == 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # subjects differ (IIV applied)
    last = fa[fa["TIME"] == fa["TIME"].max()]["VALUE"]
    assert last.std() > 0


def test_simulate_nonlinear_model(tmp_path):
    out = tmp_path / "mm.csv"
    assert run("simulate", "one_cpt_mm", "--route", "iv", "--dose", 500, "--horizon", 24, "--step", 1, "--out", out).exit_code == 0
    assert len(pd.read_csv(out)) == 25


def test_simulate_cmt_injects_the_second_lesion(tmp_path):
    # --route it --cmt lesion2 is (1 - f_leak) of each dose into lesion2 and f_leak into central,
    # given here as compartment doses to the library (exact linear solutions: rtol 1e-12)
    from itpk import load_model
    from itpk.events import Dose, Schedule, Target
    from itpk.simulate import simulate
    from itpk.system import resolve

    out = tmp_path / "l2.csv"
    result = run("simulate", "it_linear", "--route", "it", "--cmt", "lesion2", "--dose", 10, "--every", 24, "--doses", 2,
                 "--at", "0,1,6,30,60", "--out", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    spec = load_model("it_linear")
    f = float(resolve(spec, {})["f_leak"][0])
    explicit = Schedule(tuple(Dose(0.0, 10.0 * share, Target(c, compartment=True), ii=24.0, addl=1)
                              for c, share in (("lesion2", 1 - f), ("central", f))))
    expected = simulate(spec, explicit, {}, [0, 1, 6, 30, 60])
    for name in ("plasma", "tumor", "lesion2"):
        np.testing.assert_allclose(frame[frame["OUTPUT"] == name]["VALUE"], expected.outputs[name][0], rtol=1e-12)
    # a named regimen into the second lesion: --diam sizes the injection and that lesion (DIAM2, the
    # covariate its volume uses), not the first lesion (DIAM stays at its default, 2 cm)
    tvec = tmp_path / "tvec.csv"
    assert run("simulate", PFU_MODEL, "--regimen", "tvec", "--diam", 4, "--cmt", "lesion2", "--doses", 1,
               "--at", "24", "--out", tvec).exit_code == 0
    assert run("simulate", PFU_MODEL, "--regimen", "tvec", "--diam", 4, "--cmt", "lesion2", "--doses", 1,
               "--at", "24", "--set", "DIAM=2", "--set", "DIAM2=4", "--out", tmp_path / "same.csv").exit_code == 0
    assert run("simulate", PFU_MODEL, "--regimen", "tvec", "--diam", 4, "--cmt", "lesion2", "--doses", 1,
               "--at", "24", "--set", "DIAM2=2", "--out", tmp_path / "small.csv").exit_code == 0
    pd.testing.assert_frame_equal(pd.read_csv(tvec), pd.read_csv(tmp_path / "same.csv"))
    assert not pd.read_csv(tvec)["VALUE"].equals(pd.read_csv(tmp_path / "small.csv")["VALUE"])  # --set wins


BAD = [
    (["simulate", "nope", "--route", "iv", "--dose", 1], "unknown model 'nope'"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--set", "CLX=3"], "no parameter or covariate 'CLX'; known: CL, V1, Q, V2"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--set", "CL"], "--set 'CL': expected NAME=NUMBER"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--set", "CL=abc"], "--set 'CL=abc': expected NAME=NUMBER"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", -5], "--dose: amount must be a finite number > 0, found -5"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--at", "1,x"], "--at '1,x': expected comma-separated numbers"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--at", "-1,2"], "--at: output times must be finite and >= 0, found -1"),
    (["simulate", "two_cpt_iv", "--route", "it", "--dose", 1], "model 'two_cpt_iv' has no route(s) it; routes: iv"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--doses", 3], "--doses 3: several doses need their interval, --every H (none given)"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--step", 0], "--step must be a finite number > 0, found 0"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--every", 12], "--every 12: gives the interval between doses, but --doses"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--set", "CL=1", "--set", "CL=2"], "--set CL: given twice (1 and 2)"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--plot", "p.v2"], "found a .v2 file name; allowed: .avif, .eps,"),
    (["simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--subjects", 0], "--subjects must be a whole number from 1 to 1000000, found 0"),
    (["simulate", "it_linear", "--route", "iv", "--dose", 1, "--cmt", "lesion2"], "--cmt: route 'iv' cannot inject 'lesion2' (sites: central)"),
    (["simulate", "it_linear", "--route", "it", "--dose", 1, "--cmt", "lymph"], "--cmt: route 'it' cannot inject 'lymph' (sites: tumor, lesion2)"),
    (["models", "show", "nope"], "unknown model 'nope'"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_exits_1_with_one_line(args, message, tmp_path):
    if args[0] == "simulate":
        args = [*args, "--out", tmp_path / "x.csv"]
    result = run(*args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    assert not (tmp_path / "x.csv").exists()


def test_failed_run_keeps_previous_output(tmp_path):
    out = tmp_path / "keep.csv"
    out.write_text("previous\n")
    result = run("simulate", "two_cpt_iv", "--route", "iv", "--dose", 1, "--set", "CL=-1", "--out", out)
    assert result.exit_code == 1
    assert "first-order rate(s) central -> out = CL / V1 must be finite and >= 0" in result.output
    assert out.read_text() == "previous\n"


def test_help_does_not_import_pymc(tmp_path):
    # run outside the checkout so the installed package (with itpk.cli) is the one imported
    code = "import sys; from itpk.cli.main import app; assert 'pymc' not in sys.modules and 'pytensor' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


@pytest.mark.skipif(shutil.which("itpk") is None and not (sys.prefix and shutil.which("itpk", path=f"{sys.prefix}/bin")),
                    reason="console script not installed")
def test_console_script_works_from_any_folder(tmp_path):
    exe = shutil.which("itpk", path=f"{sys.prefix}/bin") or shutil.which("itpk")
    result = subprocess.run([exe, "models", "list"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "two_cpt_iv" in result.stdout


def test_quiet_silences_library_warnings(monkeypatch, tmp_path):
    # --quiet: no Python warnings from the libraries underneath (what matters is in run.json);
    # without it they still show
    import warnings
    from types import SimpleNamespace

    import itpk.workflows

    def noisy_fit(*args, **kwargs):
        warnings.warn("overflow encountered in exp", RuntimeWarning, stacklevel=1)
        return SimpleNamespace(message="fitted", diagnostics={"passed": True})

    monkeypatch.setattr(itpk.workflows, "run_fit", noisy_fit)
    args = ("fit", "data.csv", "--model", "one_cpt_oral", "--out", tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet = run(*args, "--quiet")
    assert quiet.exit_code == 0 and quiet.output == "" and not caught
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loud = run(*args)
    assert loud.exit_code == 0 and "fitted" in loud.output
    assert [str(w.message) for w in caught] == ["overflow encountered in exp"]


# -- found by review (session 19): outputs that cannot be written, options checked before the work --------------------


def test_an_output_path_that_cannot_be_written_is_one_message(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run("simulate", "one_cpt_iv", "--route", "iv", "--dose", "10", "--out", tmp_path / "file" / "s.csv")
    assert result.exit_code == 1 and f"error: --out {tmp_path / 'file' / 's.csv'}: {tmp_path / 'file'} is a file, not a folder" in result.output
    assert "Traceback" not in result.output


def test_fit_refuses_an_unusable_out_before_fitting(tmp_path, monkeypatch):
    from itpk import inference

    monkeypatch.setattr(inference, "fit", lambda *a, **k: pytest.fail("fitted before checking --out"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    theoph = str(files("itpk.data") / "theoph.csv")
    result = run("fit", theoph, "--model", "one_cpt_oral", "--out", tmp_path / "folder", "--method", "map")
    assert result.exit_code == 1 and "exists and is a folder that is not a run directory" in result.output
    result = run("fit", theoph, "--model", "one_cpt_oral", "--out", tmp_path / "folder" / "notes.txt", "--method", "map")
    assert result.exit_code == 1 and "exists and is a file" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--horizon", "-5"], "--horizon must be a finite number > 0, found -5"),
    (["--horizon", "nan"], "--horizon must be a finite number > 0, found nan"),
    (["--target", "tumor=-1"], "--target tumor=-1: a concentration must be a finite number > 0"),
    (["--regimen", "tvec", "--diam", "3", "--infusion", "1"], "--regimen tvec sets amounts and times for every route: do not give --infusion"),
])
def test_compare_checks_its_numbers(args, message):
    result = run("compare", "it_linear", "--dose", "10", *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def problem_lines(output):
    return [ln.strip()[2:] for ln in output.splitlines() if ln.strip().startswith("- ")]


def test_compare_reports_every_option_problem_at_once(tmp_path):
    # found by a user walkthrough: one stage at a time (the --target parse error, then 4 on one line, then --every)
    result = run("compare", "it_antibody", "--dose", 1, "--set", "FOO=1", "--set", "DIAMX=2", "--target", "bogus=1",
                 "--target", "tumor=x", "--routes", "it,iv,xx", "--every", -1, "--doses", 2, "--horizon", -3,
                 "--out", tmp_path / "c.csv")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: 6 problems:\n")
    lines = problem_lines(result.output)
    assert len(lines) == 6
    for text in ["--target 'tumor=x': expected NAME=NUMBER", "--every must be a finite number > 0, found -1",
                 "--horizon must be a finite number > 0, found -3", "model 'it_antibody' has no route(s) xx",
                 "no parameter or covariate 'DIAMX', 'FOO'", "--target: unknown output(s) bogus"]:
        assert sum(text in line for line in lines) == 1, text
    assert not (tmp_path / "c.csv").exists()
    both = run("compare", "it_antibody", "--dose", -1, "--set", "FOO=1")
    assert both.exit_code == 1 and len(problem_lines(both.output)) == 2
    assert "--dose: amount must be a finite number > 0, found -1" in both.output and "'FOO'" in both.output


def test_simulate_reports_every_option_problem_at_once(tmp_path):
    # found by a user walkthrough: only "dose ... into xx: amount must be..." (the unknown route taken as valid)
    result = run("simulate", "it_antibody", "--route", "xx", "--dose", -1, "--set", "FOO=1", "--set", "BAR",
                 "--subjects", 0, "--at", "1,-2", "--out", tmp_path / "x.csv")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = problem_lines(result.output)
    assert len(lines) == 6, result.output
    for text in ["--set 'BAR': expected NAME=NUMBER", "--dose: amount must be a finite number > 0, found -1",
                 "--subjects must be a whole number from 1 to 1000000, found 0", "--at: output times must be finite and >= 0, found -2",
                 "model 'it_antibody' has no route(s) xx", "no parameter or covariate 'FOO'"]:
        assert sum(text in line for line in lines) == 1, text
    assert not (tmp_path / "x.csv").exists()


def test_fit_reports_every_option_problem_at_once(tmp_path, monkeypatch):
    # found by a user walkthrough: one problem per run (6 runs), and --error shown as a Python dict
    from itpk import inference

    monkeypatch.setattr(inference, "fit", lambda *a, **k: pytest.fail("fitted with bad options"))
    theoph = str(files("itpk.data") / "theoph.csv")
    result = run("fit", theoph, "--model", "one_cpt_oral", "--out", tmp_path / "run", "--draws", -5, "--tune", -1,
                 "--chains", 0, "--target-accept", 1.5, "--error", "plasma=quad", "--error", "foo=additive",
                 "--error", "lymph", "--iiv", "XX=centred", "--mass-matrix", "weird", "--precondition", "bad")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = problem_lines(result.output)
    for text in ["--error 'lymph': expected OUTPUT=MODEL", "--draws must be a whole number >= 1, found -5",
                 "--tune must be a whole number >= 0, found -1", "--chains must be a whole number >= 1, found 0",
                 "--target-accept must be in [0.5, 1), found 1.5", "--mass-matrix 'weird' is unknown",
                 "--precondition 'bad' is unknown", "--error plasma=quad: error model 'quad' is unknown; error models: additive",
                 "--error foo=additive: model 'one_cpt_oral' has no output 'foo'; outputs: plasma",
                 "--iiv: XX has no estimated IIV; parameters with IIV: "]:
        assert sum(text in line for line in lines) == 1, text
    assert len(lines) == 10 and "{'" not in result.output
    assert not (tmp_path / "run").exists()


def test_fit_library_raises_one_error_listing_every_argument_problem():
    from itpk.dataset import read_dataset
    from itpk.errors import FitError
    from itpk.inference import argument_problems, fit
    from itpk.spec import load_model

    spec = load_model("one_cpt_oral")
    assert argument_problems(spec) == []
    data = read_dataset(files("itpk.data") / "theoph.csv", spec)
    with pytest.raises(FitError) as caught:
        fit(spec, data, draws=0, chains=0, seed=-1, errors={"plasma": "quad"}, iiv="centred,ka=wobbly")
    message = str(caught.value)
    assert message.startswith("6 problems:\n") and "--iiv ka=wobbly: 'wobbly' is unknown" in message
    for text in ["--draws must be a whole number >= 1, found 0", "--chains must be a whole number >= 1, found 0",
                 "--seed must be a whole number from 0 to 9223372036854775807, found -1", "--error plasma=quad: error model 'quad' is unknown",
                 "--iiv 'centred': expected PARAM=centred|non-centred"]:
        assert text in message
    with pytest.raises(FitError, match="^--iiv ka=wobbly: 'wobbly' is unknown"):
        fit(spec, data, iiv="ka=wobbly")
    # found by an audit: --draws 1e10 aborted inside nutpie (an 80 GB allocation), --chains 100000 started
    # thousands of threads; both are refused before any work, with what is allowed
    assert argument_problems(spec, draws=10**10, tune=2_000_000, chains=100_000) == [
        "--draws must be a whole number from 1 to 1000000, found 10000000000",
        "--tune must be a whole number from 0 to 1000000, found 2000000",
        "--chains must be a whole number from 1 to 64, found 100000"]


def test_output_paths_are_checked_before_any_work(tmp_path):
    # found by a user walkthrough: a folder as --out named a hidden temporary file; an unwritable --plot
    # failed after the CSV was written
    (tmp_path / "runs").mkdir()
    (tmp_path / "nca.csv").write_text("x")
    base = ["it_antibody", "--dose", 1]
    for command, extra in (("simulate", ["--route", "it"]), ("compare", [])):
        result = run(command, *base, *extra, "--out", tmp_path / "runs")
        assert result.exit_code == 1, result.output
        assert f"error: --out {tmp_path / 'runs'}: is a folder; give a file name" in result.output
        assert ".tmp" not in result.output
        out, plot = tmp_path / f"{command}.csv", tmp_path / "nca.csv" / "p.png"
        result = run(command, *base, *extra, "--out", out, "--plot", plot)
        assert result.exit_code == 1 and f"--plot {plot}: {tmp_path / 'nca.csv'} is a file, not a folder" in result.output
        assert not out.exists()  # nothing written


def test_compare_prints_every_local_route_targets_and_thresholds():
    # found by a user walkthrough: ia vs iv metrics, T_above_tumor with --cmt lesion2, and P(>x) only in CSV/JSON
    text = run("compare", "it_linear", "--dose", 10, "--routes", "it,ia,iv").output
    assert "metrics (it vs iv): G " in text and "metrics (ia vs iv): G " in text
    text = run("compare", "it_linear", "--dose", 10, "--cmt", "lesion2", "--target", "tumor=1").output
    assert text.count("T_above_tumor ") == 2 and "AUC_lesion2" in text
    text = run("compare", "it_linear", "--dose", 10, "--threshold", 2).output
    assert "note: --threshold 2: one parameter set has no probabilities" in text


def test_compare_over_parameter_sets_labels_intervals_and_prints_probabilities():
    from itpk.workflows import run_comparison

    result = run_comparison("it_linear", dose=10, overrides={"CL": np.array([0.5, 1.0, 2.0, 4.0])}, thresholds=[1000.0],
                            routes=["it", "ia", "iv"])
    lines = result.message.splitlines()
    assert lines[1] == "  numbers: median [95% CrI lo, hi] over 4 parameter sets"
    probability = [ln for ln in lines if ln.startswith("  P(metric > x)")]
    assert len(probability) == 2 and "(it vs iv): G P(>1000) " in probability[0] and "(ia vs iv)" in probability[1]


def test_fit_parameter_lines_have_a_header_naming_the_interval():
    from itpk.workflows import format_parameters

    table = pd.DataFrame({"parameter": ["CL", "omega_CL"], "unit": ["L/h", "1"], "median": [2.0, 0.3],
                          "ci_low": [1.5, 0.2], "ci_high": [2.5, 0.4], "cv_percent": [np.nan, 30.0]})
    lines = format_parameters(table)
    assert lines[0].split() == ["parameter", "median", "unit", "[95%", "CrI", "lo,", "hi]"]
    assert lines[1].split() == ["CL", "2", "L/h", "[1.5,", "2.5]"]
    assert lines[2].split() == ["omega_CL", "0.3", "1", "[0.2,", "0.4],", "CV", "30%"]
    one_draw = format_parameters(table.assign(ci_low=np.nan, ci_high=np.nan))
    assert "CrI" not in one_draw[0]
    assert one_draw[2].split() == ["omega_CL", "0.3", "1", "CV", "30%"]  # no stray comma without an interval
    # a name longer than 16 characters widens the column instead of shifting its own row
    wide = format_parameters(pd.concat([table, table.iloc[[0]].assign(parameter="sigma_prop_plasma", unit="1")]))
    assert len({line.index("[") for line in wide}) == 1 and len({line.index(" L/h") for line in wide if "L/h" in line}) == 1


def test_out_of_range_counts_are_bad_input_not_usage_errors(tmp_path):
    # Typer's min= checks exited 2 with a usage box and hid the other problems; the library lists them all
    theoph = files("itpk.data") / "theoph.csv"
    result = run("simulate", "one_cpt_iv", "--route", "iv", "--dose", 1, "--doses", 0, "--seed", -1, "--out", tmp_path / "s.csv")
    assert result.exit_code == 1 and "--doses must be a whole number from 1 to 100000, found 0" in result.output
    assert "--seed must be a whole number from 0 to 9223372036854775807, found -1" in result.output and not (tmp_path / "s.csv").exists()
    result = run("fit", theoph, "--model", "one_cpt_oral", "--out", tmp_path / "run", "--cores", 0, "--seed", -2)
    assert result.exit_code == 1 and "2 problems:" in result.output and "--cores must be a whole number >= 1, found 0" in result.output


def test_counts_and_seeds_have_an_upper_bound(tmp_path):
    # found by a robustness audit: --subjects 1e20 was numpy's traceback, 1e9 an out-of-memory error, and a
    # 24-digit --seed nutpie's OverflowError after the model had compiled
    result = run("simulate", "one_cpt_iv", "--route", "iv", "--dose", 1, "--subjects", 10**20, "--doses", 10**8,
                 "--every", 1, "--out", tmp_path / "s.csv")
    assert result.exit_code == 1 and "--subjects must be a whole number from 1 to 1000000" in result.output
    assert "--doses must be a whole number from 1 to 100000, found 100000000" in result.output
    result = run("simulate", "one_cpt_iv", "--route", "iv", "--dose", 1, "--subjects", 10**6, "--out", tmp_path / "s.csv")
    assert result.exit_code == 1 and "= 4.82e+08 numbers (3.9 GB), more than the 1e+08 itpk holds at once" in result.output
    theoph = files("itpk.data") / "theoph.csv"
    result = run("fit", theoph, "--model", "one_cpt_oral", "--out", tmp_path / "run", "--seed", 10**23)
    assert result.exit_code == 1 and "--seed must be a whole number from 0 to 9223372036854775807" in result.output


@pytest.mark.parametrize("depth", [1, 2])
def test_ctrl_c_inside_a_compiled_solver_exits_130(monkeypatch, tmp_path, depth):
    # found by a robustness audit: SIGINT inside numba code surfaced as a SystemError traceback (exit 1);
    # then found again with the KeyboardInterrupt two causes down (numba's _numba_unpickle, then _forward)
    import itpk.workflows

    def interrupted(*args, **kwargs):
        exc: BaseException = KeyboardInterrupt()
        for _ in range(depth):
            try:
                raise exc
            except BaseException as caught:  # noqa: BLE001 - rebuilding numba's chain
                try:
                    raise SystemError("CPUDispatcher(<function _forward>) returned a result with an exception set") from caught
                except SystemError as wrapped:
                    exc = wrapped
        raise exc

    monkeypatch.setattr(itpk.workflows, "run_simulation", interrupted)
    result = run("simulate", "one_cpt_mm", "--route", "iv", "--dose", 10, "--out", tmp_path / "s.csv")
    assert result.exit_code == 130 and "interrupted (Ctrl-C)" in result.output and not (tmp_path / "s.csv").exists()


def test_sigterm_exits_143_and_writes_nothing(monkeypatch, tmp_path):
    # kill, scancel and SLURM time limits send SIGTERM; Python's default died on the spot (no clean-up)
    import signal

    import itpk.workflows

    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # the CLI made it an exception; else this kills the test run
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(itpk.workflows, "run_simulation", terminated)
    before = signal.getsignal(signal.SIGTERM)
    try:
        result = run("simulate", "one_cpt_iv", "--route", "iv", "--dose", 10, "--out", tmp_path / "s.csv")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 143 and "terminated (SIGTERM)" in result.output and not (tmp_path / "s.csv").exists()


def test_a_bad_run_directory_does_not_hide_the_other_options_problems(tmp_path):
    # found by a robustness audit: with an unusable --posterior only that was reported
    result = run("compare", "it_antibody", "--dose", 10, "--posterior", tmp_path, "--routes", "xx,iv", "--target", "blood=1")
    assert result.exit_code == 1 and "3 problems:" in result.output, result.output
    for text in ["is incomplete: missing posterior.nc", "has no route(s) xx", "--target: unknown output(s) blood"]:
        assert text in result.output, text


def test_a_named_regimen_must_suit_every_route_compared():
    # from a review: only the first route's unit was checked; the iv route of this model doses copies, not PFU
    mini = str(Path(__file__).parent / "data" / "virus_mini.toml")
    for routes in ("it,iv", "iv,it"):
        result = run("compare", mini, "--regimen", "tvec", "--diam", 3, "--routes", routes)
        assert result.exit_code == 1 and "--regimen tvec doses PFU (a virus), but route iv doses copies" in result.output


def test_compare_with_a_compartment_cut_off_and_without_elimination(tmp_path):
    # found by an audit: --set Q=0 (a legitimate input) died with numpy's "Singular matrix" traceback
    result = run("compare", "it_linear", "--dose", 1, "--set", "Q=0")
    assert result.exit_code == 0, result.output
    result = run("compare", "one_cpt_iv", "--dose", 1, "--routes", "iv", "--set", "CL=0")
    assert result.exit_code == 1 and "the amount reaching central is never eliminated" in result.output



def test_a_huge_cell_is_quoted_in_part(tmp_path):
    # found by an audit: a DV of 100 000 digits (or a quote left open over the rest of the file) was
    # echoed whole, a 100 KB message; each line is cut at 400 characters and says how much is left out
    data = tmp_path / "long.csv"
    data.write_text("ID,TIME,EVID,AMT,ROUTE,CMT,DV\n1,0,1,10,iv,,\n1,1,0,,,plasma," + "9" * 100_000 + "\n")
    result = runner.invoke(app, ["data", "validate", str(data)])
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if "row 3, DV" in line)
    assert "…" in line and line.endswith("more characters)") and len(line) < 450
    assert len(result.output) < 2000


def test_validate_against_a_model_notes_dv_its_log_error_model_refuses(tmp_path):
    # found by an audit: DV 0 and -1 on virus_blood (log error model) validated silently and only the fit
    # refused them; the dataset is valid (an additive error takes them), so it is a note, exit 0
    import shutil

    import pandas as pd

    source = files("itpk.data")
    frame = pd.read_csv(source / "example_virus.csv")
    rows = frame.index[(frame["CMT"] == "virus_blood") & (frame["BLQ"] == 0)][:2]
    frame.loc[rows, "DV"] = [0.0, -1.0]
    frame.to_csv(tmp_path / "v.csv", index=False)
    shutil.copy(source / "example_virus.units.toml", tmp_path / "v.units.toml")
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "v.csv"), "--model", "it_oncolytic_virus"])
    assert result.exit_code == 0, result.output
    assert f"note: virus_blood: DV <= 0 on rows {rows[0] + 2} (0), {rows[1] + 2} (-1); the model file's log error model" in result.output
    assert "--error virus_blood=additive" in result.output
    plain = runner.invoke(app, ["data", "validate", str(source / "example_virus.csv"), "--model", "it_oncolytic_virus"])
    assert "note: virus_blood" not in plain.output
