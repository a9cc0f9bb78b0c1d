"""Reading PIPELINE.toml (SPEC §7): grid, defaults, explicit jobs, every problem in one message; job hashes."""

import textwrap

import pytest

from itpk.batch import load_pipeline
from itpk.batch.cluster import read_cluster, slurm_arguments, slurm_job_script
from itpk.batch.jobs import resolve_jobs
from itpk.errors import ItpkError, PipelineError


def write(tmp_path, text, name="pipe.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_spec_example_gives_grid_then_explicit_jobs(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "trial.csv").write_text("ID,TIME,EVID,AMT,DV\n1,0,1,10,\n")
    path = write(tmp_path, """
        [defaults]
        kind = "compare"
        dose = 10
        routes = ["it", "iv"]
        [grid]
        model = ["it_small_molecule", "it_antibody"]
        dose = [1, 10]
        [[jobs]]
        kind = "fit"
        data = "data/trial.csv"
        model = "it_antibody"
    """)
    pipeline = load_pipeline(path)
    kinds = [j.kind for j in pipeline.jobs]
    assert kinds == ["compare"] * 4 + ["fit"]
    grid = [(j.option("model"), j.option("dose")) for j in pipeline.jobs[:4]]
    assert grid == [("it_small_molecule", 1.0), ("it_small_molecule", 10.0), ("it_antibody", 1.0), ("it_antibody", 10.0)]
    assert all(j.option("routes") == ("it", "iv") for j in pipeline.jobs[:4])
    fit = pipeline.jobs[4]
    # defaults that a fit does not take (dose, routes) are not given to it; paths are relative to the file
    assert fit.option("dose") is None and fit.option("routes") is None
    assert fit.option("data") == str((tmp_path / "data" / "trial.csv").resolve())
    assert [j.label for j in pipeline.jobs] == ["grid #1", "grid #2", "grid #3", "grid #4", "jobs #1"]


def test_set_tables_merge_and_sweep_one_name(tmp_path):
    path = write(tmp_path, """
        [defaults]
        kind = "compare"
        model = "it_antibody"
        dose = 10
        set = {k_out = 0.05}
        [grid]
        set.DIAM = [1, 3]
        routes = ["it,iv", ["ia", "iv"]]
    """)
    jobs = load_pipeline(path).jobs
    assert [dict(j.option("set")) for j in jobs] == [{"DIAM": 1.0, "k_out": 0.05}] * 2 + [{"DIAM": 3.0, "k_out": 0.05}] * 2
    assert [j.option("routes") for j in jobs[:2]] == [("it", "iv"), ("ia", "iv")]


def test_cli_spellings_and_toml_spellings_are_one_job(tmp_path):
    a = write(tmp_path, '[[jobs]]\nkind = "compare"\nmodel = "it_antibody"\ndose = 10\nroutes = "it,iv"\n'
                        'set = ["DIAM=3"]\n', "a.toml")
    b = write(tmp_path, '[[jobs]]\nkind = "compare"\nmodel = "it_antibody"\ndose = 10.0\nroutes = ["it", "iv"]\n'
                        "set = {DIAM = 3.0}\n", "b.toml")
    (ja,), (jb,) = resolve_jobs(load_pipeline(a)), resolve_jobs(load_pipeline(b))
    assert ja.name == jb.name and ja.name.startswith("compare-") and len(ja.name) == len("compare-") + 12


def test_fit_jobs_take_the_sampler_options(tmp_path):
    # a valid dataset: the pre-flight validates each fit's data against its model before any job runs
    (tmp_path / "d.csv").write_text("ID,TIME,EVID,AMT,CMT,DV\n1,0,1,100,depot,\n1,1,0,,plasma,1.5\n", encoding="utf-8")
    path = write(tmp_path, '[[jobs]]\nkind = "fit"\nmodel = "one_cpt_oral"\ndata = "d.csv"\n'
                           'target_accept = 0.95\nmass_matrix = "low-rank"\n')
    (job,) = resolve_jobs(load_pipeline(path))
    options = dict(job.spec.options)
    assert options["mass_matrix"] == "low-rank" and options["target_accept"] == 0.95


def test_hash_follows_model_file_content_not_its_path(tmp_path):
    model = (tmp_path / "m.toml")
    model.write_text((__import__("itpk.spec", fromlist=["x"]).load_model("one_cpt_iv")).text_toml)
    path = write(tmp_path, '[[jobs]]\nkind = "compare"\nmodel = "m.toml"\ndose = 1\nroutes = ["iv"]\n')
    first = resolve_jobs(load_pipeline(path))[0].digest
    assert resolve_jobs(load_pipeline(path))[0].digest == first
    model.write_text(model.read_text() + "\n# a comment: same model, same job\n")
    assert resolve_jobs(load_pipeline(path))[0].digest == first
    model.write_text(model.read_text().replace('description = "', 'description = "edited ', 1))
    assert resolve_jobs(load_pipeline(path))[0].digest != first


def test_every_problem_is_listed_once_with_where_key_found_allowed(tmp_path):
    path = write(tmp_path, """
        title = "x"
        [defaults]
        kind = "compare"
        dose = "ten"
        routez = ["it"]
        [grid]
        model = ["it_antibody", "no_such_model"]
        draws = [1]
        [[jobs]]
        kind = "fit"
        data = "missing.csv"
        model = "it_antibody"
        routes = ["it"]
        [[jobs]]
        kind = "simulat"
        [[jobs]]
        model = "it_antibody"
        set = {CL = "x"}
        [cluster]
        cores = "4"
        scheduler = "pbs"
    """)
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    message = str(info.value)
    expected = [
        "title: unknown top-level key",
        "[defaults] dose: found 'ten'; allowed: a finite number",
        "[defaults] routez: unknown key; allowed: kind, at,",
        "[grid] model: found 'no_such_model'; allowed: a built-in model (it_antibody",
        "[grid] draws: unknown key for kind 'compare'; allowed: kind, cmt, diam, dose",
        "[[jobs]] #1 data: found 'missing.csv': no such file",
        "[[jobs]] #1 routes: unknown key for kind 'fit'; allowed: kind, chains, data",
        "[[jobs]] #2 kind: found 'simulat' (did you mean 'simulate'?); allowed: compare, simulate, fit; its other keys are checked "
        "once the kind is known",
        "[[jobs]] #3 set: found {'CL': 'x'}; allowed: a table such as {NAME = NUMBER}",
        "[cluster] cores: found '4'; allowed: a whole number >= 1",
        "[cluster] scheduler: found 'pbs'; allowed: local, tcp://HOST:PORT, slurm",
    ]
    for line in expected:
        assert line in message, line
    assert f"{len(expected)} problems:" in message  # nothing reported twice, no echo of a reported problem


@pytest.mark.parametrize(("text", "match"), [
    ("", "no jobs: give a \\[grid\\] table and/or \\[\\[jobs\\]\\] entries"),
    ("[[jobs]]\nmodel = 'it_antibody'\n", r"\[\[jobs\]\] #1 kind: missing; allowed: compare, simulate, fit"),
    ("[grid]\nkind = 'compare'\ndose = [1]\n", r"\[grid\] job 1 model: missing; a compare job needs model"),
    ("[grid]\nkind = 'compare'\nmodel = []\n", r"\[grid\] model: found \[\]; allowed: a non-empty list"),
    ("[[jobs]\n", "not valid TOML"),
])
def test_single_problems(tmp_path, text, match):
    with pytest.raises(PipelineError, match=match):
        load_pipeline(write(tmp_path, text))


def test_missing_pipeline_file_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_pipeline(tmp_path / "nope.toml")


def test_identical_jobs_are_refused(tmp_path):
    path = write(tmp_path, """
        [grid]
        kind = "compare"
        model = ["it_antibody"]
        dose = [10, 10.0]
    """)
    with pytest.raises(PipelineError, match=r"grid #2: same inputs as grid #1"):
        resolve_jobs(load_pipeline(path))


def test_slurm_job_script_from_cluster_table_without_slurm():
    config, problems = read_cluster({"scheduler": "slurm", "queue": "compute", "account": "pk", "cores": 4,
                                     "memory": "8GB", "walltime": "01:30:00",
                                     "job_extra_directives": ["--exclusive"],
                                     "job_script_prologue": ["module load python/3.12"]})
    assert problems == [] and config.scheduler == "slurm"
    script = slurm_job_script(config)
    for line in ("#SBATCH -p compute", "#SBATCH -A pk", "#SBATCH --cpus-per-task=4", "#SBATCH -t 01:30:00",
                 "#SBATCH --exclusive", "module load python/3.12", "export OMP_NUM_THREADS=1",
                 "export NUMBA_NUM_THREADS=1"):
        assert line in script, line
    # one thread per Dask worker, one worker per core: N workers use N cores
    assert "--nthreads 1" in script and "--nworkers 4" in script and "distributed.cli.dask_worker" in script


def test_slurm_needs_cores_and_memory():
    config, _ = read_cluster({"queue": "compute"})
    with pytest.raises(ItpkError, match="needs cores and memory in the pipeline's \\[cluster\\] table"):
        slurm_arguments(config)


def test_readme_pipeline_examples_parse(tmp_path):
    """The two TOML blocks of README's "Batch pipelines" section: 14 jobs, and a valid SLURM table."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("## Batch pipelines", 1)[1].split("\n## ", 1)[0]
    sweep, cluster = re.findall(r"```toml\n(.*?)```", section, flags=re.DOTALL)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "example_it_vs_iv.csv").write_bytes((root / "data" / "example_it_vs_iv.csv").read_bytes())
    pipeline = load_pipeline(write(tmp_path, sweep, "sweep.toml"))  # as at the top of the repository
    assert [j.kind for j in pipeline.jobs] == ["compare"] * 12 + ["simulate", "fit"]
    assert dict(pipeline.jobs[1].option("set")) == {"DIAM": 3.0}
    config = load_pipeline(write(tmp_path, "[[jobs]]\nkind = 'compare'\nmodel = 'it_antibody'\n" + cluster)).cluster
    assert config.scheduler == "slurm" and config.workers == 16
    assert slurm_arguments(config)["processes"] == 4


def test_progress_line_counts_and_eta():
    import io

    from itpk.batch.progress import Progress

    stream = io.StringIO()
    bar = Progress(10, enabled=True, stream=stream)
    bar.count("skipped", ran=False)
    assert bar.line() == "batch: 0/10 done, 1 skipped, 0 failed, 9 remaining"  # no ETA before a job ran here
    bar.start -= 4.0  # 4 s elapsed
    bar.count("done")
    bar.count("failed")
    assert bar.line().startswith("batch: 1/10 done, 1 skipped, 1 failed, 7 remaining, ETA 0:00:1")  # 2 s a job x 7
    assert stream.getvalue().count("\r") == 3
    quiet = io.StringIO()
    Progress(3, enabled=False, stream=quiet).count("done")
    assert quiet.getvalue() == ""


BAD_VALUES = """
    [defaults]
    kind = "compare"
    model = "it_antibody"
    dose = 10
    bogus = 3
    [grid]
    routes = [["it", "xx"], ["it", "iv"]]
    [[jobs]]
    dose = -10
    set = {FOO = 1}
    every = -3
    doses = 2
    [[jobs]]
    kind = "simulate"
    route = "it"
    dose = "x"
    subjects = 0
    [[jobs]]
    kind = "fit"
    data = "bad.csv"
    draws = 0
    error = {plasma = "quad"}
"""


def test_preflight_reports_form_and_option_problems_together(tmp_path):
    # found by a user walkthrough: form problems hid bad routes, --set names and datasets, and values
    # (dose = -10, draws = 0, every = -3, subjects = 0) were never checked: the batch ran and exited 4
    (tmp_path / "bad.csv").write_text("ID,TIME,EVID,AMT,ROUTE,CMT,DV\n1,-1,1,10,iv,,\n")
    path = write(tmp_path, BAD_VALUES)
    with pytest.raises(PipelineError, match=r"2 problems:"):
        load_pipeline(path)  # without preflight: the file's form only (run_batch checks the jobs)
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, preflight=True)
    message = str(caught.value)
    for text in ["[defaults] bogus: unknown key", "[[jobs]] #2 dose: found 'x'; allowed: a finite number",
                 "grid #1: model 'it_antibody' has no route(s) xx", "jobs #1: dose: amount must be a finite number > 0, found -10",
                 "jobs #1: every must be a finite number > 0, found -3", "jobs #1: model 'it_antibody' has no parameter or covariate 'FOO'",
                 "jobs #2: subjects must be a whole number from 1 to 1000000, found 0", "jobs #3: draws must be a whole number >= 1, found 0",
                 "jobs #3: error plasma=quad: error model 'quad' is unknown", "row 2, TIME: found -1"]:
        assert text in message, text
    assert "jobs #2: dose" not in message  # its unreadable dose is reported once, not replaced by a default
    assert "give --dose" not in message and "missing" not in message
    assert message.startswith(f"{path}: 10 problems:\n")


def test_batch_command_reports_every_problem_and_creates_nothing(tmp_path):
    from itpk.cli.main import app
    from typer.testing import CliRunner

    (tmp_path / "bad.csv").write_text("ID,TIME,EVID,AMT,ROUTE,CMT,DV\n1,-1,1,10,iv,,\n")
    path = write(tmp_path, BAD_VALUES)
    (tmp_path / "runs").mkdir()
    result = CliRunner().invoke(app, ["batch", str(path), "--out", str(tmp_path / "out"), "--log", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"--log {tmp_path / 'runs'}: is a folder; give a file" in result.output
    assert "jobs #2: subjects must be a whole number from 1 to 1000000, found 0" in result.output
    assert not (tmp_path / "out").exists()


def test_a_log_or_out_that_cannot_be_written_is_refused_before_anything_is_created(tmp_path):
    # found by a user walkthrough: "[Errno 21] Is a directory: 'runs'" without naming --log, and jobs/ left behind
    from itpk.cli.main import app
    from typer.testing import CliRunner

    path = write(tmp_path, "[[jobs]]\nkind = 'compare'\nmodel = 'it_antibody'\ndose = 1\n", "okp.toml")
    (tmp_path / "runs").mkdir()
    (tmp_path / "file").write_text("x")
    runner = CliRunner()
    result = runner.invoke(app, ["batch", str(path), "--log", str(tmp_path / "runs")])
    assert result.exit_code == 1 and result.output.startswith(f"error: --log {tmp_path / 'runs'}: is a folder")
    assert not (tmp_path / "okp").exists()
    result = runner.invoke(app, ["batch", str(path), "--out", str(tmp_path / "file" / "b"), "--log", str(tmp_path / "file" / "l")])
    assert result.exit_code == 1 and "2 problems:" in result.output
    assert f"--out {tmp_path / 'file' / 'b'}: {tmp_path / 'file'} is a file, not a folder" in result.output
    assert f"--log {tmp_path / 'file' / 'l'}: {tmp_path / 'file'} is a file, not a folder" in result.output


def test_batch_csv_keeps_whole_numbers_whole(tmp_path):
    # found by a user walkthrough: seed, subjects and times printed as 1.0, 200.0, 241.0
    import pandas as pd

    from itpk.batch.records import JobRecord, write_batch_csv

    records = [JobRecord("simulate-a", "jobs #1", "simulate", {"model": "m", "seed": 1, "subjects": 200, "dose": 10.0},
                         "done", 1, 0.5, "jobs/simulate-a", headline={"times": 241, "Cmax_plasma": 1.5}),
               JobRecord("compare-b", "jobs #2", "compare", {"model": "m", "dose": 10.0}, "done", 1, 0.25, "jobs/compare-b")]
    write_batch_csv(tmp_path, records)
    text = (tmp_path / "batch.csv").read_text()
    row = dict(zip(text.splitlines()[0].split(","), text.splitlines()[1].split(","), strict=True))
    assert (row["seed"], row["subjects"], row["times"], row["dose"], row["Cmax_plasma"]) == ("1", "200", "241", "10.0", "1.5")
    assert pd.read_csv(tmp_path / "batch.csv")["seed"].isna().tolist() == [False, True]


def test_out_of_range_batch_options_come_in_the_one_message(tmp_path):
    # found by a README audit: Typer's own range check answered --workers 0 with a usage error (exit 2)
    # and never reported the pipeline's problems
    from itpk.cli.main import app
    from typer.testing import CliRunner

    path = write(tmp_path, "[[jobs]]\nkind = 'compare'\nmodel = 'it_antibody'\ndose = -1\n", "neg.toml")
    result = CliRunner().invoke(app, ["batch", str(path), "--workers", "0", "--retries", "-1"])
    assert result.exit_code == 1 and "3 problems:" in result.output, result.output
    for text in ["--workers must be >= 1, found 0", "--retries must be >= 0, found -1", "dose: amount must be"]:
        assert text in result.output, text
    assert not (tmp_path / "neg").exists()


def test_readme_lists_every_key_of_each_kind():
    # found by a README audit: the Keys paragraph had fallen behind (cmt, iiv, mass_matrix, precondition)
    import re
    from pathlib import Path

    from itpk.batch.schema import KIND_OPTIONS

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    keys = " ".join(text.split("- **Keys.**", 1)[1].split(". Lists", 1)[0].split())
    for kind, options in KIND_OPTIONS.items():
        listed = re.search(rf"`{kind}`: `([a-z_ ]+)`", keys)
        assert listed is not None, kind
        assert set(listed.group(1).split()) == set(options), kind


def test_a_compare_job_s_run_directory_is_checked_before_any_job_runs(tmp_path):
    # found by a robustness audit: a posterior that is not a run directory failed at run time (exit 4)
    path = write(tmp_path, f"[[jobs]]\nkind = 'compare'\nmodel = 'it_antibody'\ndose = 1\nposterior = '{tmp_path}'\n", "pp.toml")
    with pytest.raises(PipelineError, match=r"jobs #1: run directory .* is incomplete: missing posterior.nc"):
        load_pipeline(path, preflight=True)


def test_a_batch_whose_cluster_cannot_start_leaves_no_empty_folders(tmp_path, monkeypatch):
    # found by a robustness audit: an unreachable tcp:// scheduler left OUT/jobs behind
    from itpk.batch import run_batch, runner

    def unreachable(*args, **kwargs):
        raise ItpkError("--scheduler tcp://127.0.0.1:9: cannot connect")

    monkeypatch.setattr(runner, "make_client", unreachable)
    path = write(tmp_path, "[[jobs]]\nkind = 'compare'\nmodel = 'it_antibody'\ndose = 1\n", "p.toml")
    with pytest.raises(ItpkError, match="cannot connect"):
        run_batch(load_pipeline(path), out=tmp_path / "out", scheduler="tcp://127.0.0.1:9")
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made is left as it was
    with pytest.raises(ItpkError, match="cannot connect"):
        run_batch(load_pipeline(path), out=tmp_path / "kept", scheduler="tcp://127.0.0.1:9")
    assert list((tmp_path / "kept").iterdir()) == []
    with pytest.raises(ItpkError, match="cannot connect"):  # a log asked for inside the new folder is kept, and so is it
        run_batch(load_pipeline(path), out=tmp_path / "b", scheduler="tcp://127.0.0.1:9", log=tmp_path / "b" / "ev.jsonl")
    assert (tmp_path / "b" / "ev.jsonl").is_file() and not (tmp_path / "b" / "jobs").exists()


def test_a_fit_job_without_its_data_file_is_still_checked_for_its_options(tmp_path):
    # found by a walkthrough: the missing file left the job without its required data key, so it was not
    # checked at all and its draws = 0 surfaced only once the file was there
    path = tmp_path / "p.toml"
    path.write_text('[[jobs]]\nkind = "fit"\ndata = "nope.csv"\nmodel = "it_antibody"\ndraws = 0\n')
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, preflight=True)
    message = str(caught.value)
    assert "[[jobs]] #1 data: found 'nope.csv': no such file" in message
    assert "jobs #1: draws must be a whole number >= 1, found 0" in message
    assert message.startswith(f"{path}: 2 problems:\n")
