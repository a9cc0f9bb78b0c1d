"""``itpk batch`` on real Dask clusters: a LocalCluster of 2 worker processes, and an existing scheduler.

Jobs are compare jobs (~10 ms of work each) so the tests time the batch layer,
not the numerics; one tiny fit (method=map) runs in-process.
"""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest
from itpk.cli.main import app
from typer.testing import CliRunner

from itpk.batch import load_pipeline, run_batch
from itpk.batch.jobs import execute, resolve_jobs, verify

# The kill hook below is defined here and runs on the workers: ship it by value, not by module name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

runner = CliRunner()
DATA = Path(__file__).resolve().parents[1] / "data"

GRID = """
[defaults]
kind = "compare"
routes = ["it", "iv"]
[grid]
model = ["it_small_molecule", "it_antibody"]
dose = [1, 10, 100]
"""


def write(folder, text, name="pipe.toml"):
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def job_dirs(out):
    return sorted((out / "jobs").iterdir())


def assert_clean_and_verified(out, pipeline_path):
    """Only complete job directories: no hidden partial ones, each matching its manifest."""
    jobs = {j.name: j for j in resolve_jobs(load_pipeline(pipeline_path))}
    for folder in job_dirs(out):
        assert not folder.name.startswith("."), f"partial directory left: {folder.name}"
        assert verify(folder, jobs[folder.name]) is None


def test_grid_completes_then_resume_recomputes_nothing(tmp_path):
    path = write(tmp_path, GRID)
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(path), "--out", str(out), "--workers", "2", "--log", str(tmp_path / "log.jsonl")])
    assert result.exit_code == 0, result.output
    assert "batch: 6 done, 0 skipped, 0 failed" in result.output
    record = json.loads((out / "batch.json").read_text())
    assert record["counts"]["done"] == 6 and len(record["jobs"]) == 6
    assert {j["status"] for j in record["jobs"]} == {"done"} and {j["attempts"] for j in record["jobs"]} == {1}
    assert len(job_dirs(out)) == 6
    assert_clean_and_verified(out, path)
    job = record["jobs"][3]
    assert job["inputs"] == {"dose": 1.0, "model": "it_antibody", "routes": ["it", "iv"]}
    assert job["output"] == f"jobs/{job['name']}" and job["name"].startswith("compare-")
    assert {"compare.csv", "compare.json", "job.json", "manifest.json"} <= {p.name for p in (out / job["output"]).iterdir()}
    table = pd.read_csv(out / "batch.csv")
    assert list(table["status"]) == ["done"] * 6
    # the batch computes what `itpk compare` computes: G of it_antibody is the same at every dose (linear model)
    direct = runner.invoke(app, ["compare", "it_antibody", "--dose", "1", "--json"])
    g = json.loads(direct.output)["metrics"]["G"]
    assert table.loc[table["model"] == "it_antibody", "G_it"].tolist() == pytest.approx([g] * 3, rel=1e-12)
    events = [json.loads(line)["event"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "finish" and events.count("done") == 6

    stamps = {p.name: (p / "job.json").stat().st_mtime_ns for p in job_dirs(out)}
    again = runner.invoke(app, ["batch", str(path), "--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert "batch: 0 done, 6 skipped, 0 failed" in again.output
    record = json.loads((out / "batch.json").read_text())
    assert {j["status"] for j in record["jobs"]} == {"skipped"} and {j["attempts"] for j in record["jobs"]} == {0}
    assert {p.name: (p / "job.json").stat().st_mtime_ns for p in job_dirs(out)} == stamps  # nothing rewritten
    assert pd.read_csv(out / "batch.csv")["G_it"].notna().all()  # headline numbers re-read from the job dirs

    refused = runner.invoke(app, ["batch", str(path), "--out", str(out)])
    assert refused.exit_code == 1 and "already holds a batch: pass --resume" in refused.output


def test_resume_runs_only_what_is_missing(tmp_path):
    path = write(tmp_path, GRID)
    out = tmp_path / "out"
    assert runner.invoke(app, ["batch", str(path), "--out", str(out), "--workers", "2", "-q"]).exit_code == 0
    victim = job_dirs(out)[2]
    os.rename(victim, out / "jobs" / f".{victim.name}.crashed.tmp")  # as a crash mid-write leaves it
    result = run_batch(load_pipeline(path), out=out, workers=2, resume=True)
    assert result.counts == {"done": 1, "skipped": 5, "failed": 0, "cancelled": 0}
    assert [r.name for r in result.records if r.status == "done"] == [victim.name]
    assert_clean_and_verified(out, path)


def _stall_first_attempt(flags: str, job) -> None:
    """Kill hook: the first attempt of the dose-10 antibody job records its pid and hangs."""
    if job.spec.option("model") == "it_antibody" and job.spec.option("dose") == 10.0:
        marker = Path(flags) / job.name
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(120)


def _kill_when_stalled(flags: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for marker in flags.iterdir():
            pid = int(marker.read_text() or 0)
            if pid:
                os.kill(pid, signal.SIGKILL)  # the worker process dies mid-job
                killed.append(pid)
                return
        time.sleep(0.05)


def test_worker_killed_mid_job_is_retried_and_every_output_written_once(tmp_path):
    path = write(tmp_path, GRID)
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    killed: list[int] = []
    killer = threading.Thread(target=_kill_when_stalled, args=(flags, killed), daemon=True)
    killer.start()
    result = run_batch(load_pipeline(path), out=out, workers=2, retries=2, log=tmp_path / "log.jsonl",
                       hook=functools.partial(_stall_first_attempt, str(flags)))
    killer.join(timeout=5)
    assert killed, "the stalled worker was never killed"
    assert result.exit_code == 0, result.message
    attempts = {r.name: r.attempts for r in result.records}
    (victim,) = [p.name for p in flags.iterdir()]
    assert attempts[victim] == 2 and all(a == 1 for n, a in attempts.items() if n != victim)
    # every output exactly once: one directory per job, no partial ones, each completed by one attempt
    assert [p.name for p in job_dirs(out)] == sorted(attempts)
    assert_clean_and_verified(out, path)
    assert json.loads((out / "jobs" / victim / "job.json").read_text())["pid"] != killed[0]
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["job"] for e in events if e["event"] == "retry"] == [victim]
    assert sorted(e["job"] for e in events if e["event"] == "done") == sorted(attempts)


def test_bad_job_fails_alone_with_exit_4(tmp_path):
    # a problem only the run finds (a lesion of volume 0); the options' own checks stop a batch before
    # it starts (test_option_values_stop_the_batch_before_any_job)
    path = write(tmp_path, """
        [defaults]
        kind = "compare"
        model = "it_antibody"
        dose = 10
        [grid]
        set.DIAM = [1, 2, 0]
        [[jobs]]
        kind = "simulate"
        model = "it_antibody"
        route = "it"
        dose = 10
        subjects = 5
        seed = 1
    """)
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(path), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 4, result.output
    record = json.loads((out / "batch.json").read_text())
    status = {j["label"]: j["status"] for j in record["jobs"]}
    assert status == {"grid #1": "done", "grid #2": "done", "grid #3": "failed", "jobs #1": "done"}
    errors = {j["label"]: j["error"] for j in record["jobs"] if j["error"]}
    assert "volume V_T = 0 with DIAM=0; a volume must be > 0" in errors["grid #3"]
    assert all(j["attempts"] == 1 for j in record["jobs"])  # bad input is not retried
    assert len(job_dirs(out)) == 3  # failed jobs leave no directory
    assert "failed" in result.output and "DIAM=0" in result.output
    sim = next(j for j in record["jobs"] if j["kind"] == "simulate")
    assert sim["headline"]["subjects"] == 5 and sim["headline"]["Cmax_plasma"] > 0
    assert sim["headline"]["window_end"] == 24.0  # the default window, so that batch.csv says what AUC covers
    assert pd.read_csv(out / "jobs" / sim["name"] / "profiles.csv")["ID"].nunique() == 5


def test_options_the_model_does_not_have_stop_the_batch_before_any_job(tmp_path):
    # found by review (session 19): a bad route, --set name or dataset was found only when its job ran
    # (exit 4 after the whole sweep); now one message lists every problem and nothing runs (exit 1)
    (tmp_path / "bad.csv").write_text("ID,TIME,EVID,AMT,ROUTE,CMT,DV\n1,-1,1,10,iv,,\n")
    path = write(tmp_path, f"""
        [defaults]
        kind = "compare"
        model = "it_antibody"
        dose = 3
        [[jobs]]
        routes = ["it", "im"]
        [[jobs]]
        set = {{NOPE = 1}}
        [[jobs]]
        target = {{liver = 1}}
        [[jobs]]
        kind = "fit"
        model = "one_cpt_iv"
        data = "{tmp_path / 'bad.csv'}"
        [[jobs]]
        model = "one_cpt_iv"
    """)
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(path), "--out", str(out)])
    assert result.exit_code == 1, result.output
    for text in ["jobs #1: model 'it_antibody' has no route(s) im; routes: it, ia, iv, sc",
                 "jobs #2: model 'it_antibody' has no parameter or covariate 'NOPE'; known: ",
                 "jobs #3: target: unknown output(s) liver; outputs: ", "jobs #4: ", "row 2, TIME: found -1",
                 "jobs #5: model 'one_cpt_iv' has no route(s) it; routes: iv"]:  # compare's default routes are it and iv
        assert text in result.output
    assert not (out / "jobs").exists()


def test_option_values_stop_the_batch_before_any_job(tmp_path):
    # found by a user walkthrough: dose = -10, draws = 0, every = -3 with doses = 2 and subjects = 0 were
    # found only when their jobs ran ("1 done, 3 failed", exit 4); now the pre-flight lists them (exit 1)
    path = write(tmp_path, f"""
        [[jobs]]
        kind = "compare"
        model = "it_antibody"
        dose = -10
        [[jobs]]
        kind = "compare"
        model = "it_antibody"
        dose = 1
        every = -3
        doses = 2
        [[jobs]]
        kind = "simulate"
        model = "it_antibody"
        route = "it"
        dose = 1
        subjects = 0
        [[jobs]]
        kind = "fit"
        model = "one_cpt_oral"
        data = "{DATA / 'theoph.csv'}"
        method = "map"
        draws = 0
    """)
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(path), "--out", str(out)])
    assert result.exit_code == 1, result.output
    for text in ["4 problems:", "jobs #1: dose: amount must be a finite number > 0, found -10",
                 "jobs #2: every must be a finite number > 0, found -3", "jobs #3: subjects must be a whole number from 1 to 1000000, found 0",
                 "jobs #4: draws must be a whole number >= 1, found 0"]:
        assert text in result.output, text
    assert not out.exists()


@pytest.mark.parametrize(("signum", "code", "said"), [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                                     (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_signal_leaves_no_half_written_job_directory(tmp_path, signum, code, said):
    # SIGTERM is what scancel and a SLURM time limit send: before, the batch died at once without batch.json
    # simulate jobs of ~0.5 s so the batch is mid-way when interrupted
    path = write(tmp_path, """
        [defaults]
        kind = "simulate"
        model = "it_antibody"
        route = "it"
        subjects = 60
        step = 1
        horizon = 600
        [grid]
        dose = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    """)
    out = tmp_path / "out"
    # cwd=tmp_path: `python -c` and `-m` put the working directory first on sys.path, and the checkout's own
    # itpk/ folder (without cli/, models/, data/ mapped into it) would shadow the installed package
    # A test run from a background job inherits SIGINT ignored (as `nohup … &` users want), and Python
    # then installs no KeyboardInterrupt handler: the child restores it before running the CLI.
    child = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from itpk.cli.main import main; sys.argv = ['itpk', *sys.argv[1:]]; main()")
    proc = subprocess.Popen([sys.executable, "-c", child, "batch", str(path), "--out", str(out), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                not p.name.startswith(".") for p in (out / "jobs").glob("*")):
            time.sleep(0.02)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert said in err
    assert_clean_and_verified(out, path)
    record = json.loads((out / "batch.json").read_text())
    finished = {j["name"] for j in record["jobs"] if j["status"] == "done"}
    assert finished == {p.name for p in job_dirs(out)} and 0 < len(finished) < 16
    assert record["counts"]["cancelled"] == 16 - len(finished)  # --resume runs these (test_resume_runs_only...)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_existing_scheduler_over_tcp(tmp_path):
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = open(tmp_path / "dask.log", "w")  # noqa: SIM115 - closed below
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], stdout=logs, stderr=logs, cwd=tmp_path)]
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                       "--no-dashboard"], stdout=logs, stderr=logs, cwd=tmp_path))  # see above
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        path = write(tmp_path, GRID)
        out = tmp_path / "out"
        result = runner.invoke(app, ["batch", str(path), "--out", str(out), "--scheduler", address])
        assert result.exit_code == 0, result.output
        record = json.loads((out / "batch.json").read_text())
        assert record["scheduler"] == address and record["counts"]["done"] == 6
        assert_clean_and_verified(out, path)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        logs.close()


def test_unreachable_scheduler_and_bad_options_are_one_line_errors(tmp_path):
    path = write(tmp_path, GRID)
    bad = runner.invoke(app, ["batch", str(path), "--scheduler", "pbs"])
    assert bad.exit_code == 1 and "--scheduler 'pbs' is unknown; allowed: local, tcp://HOST:PORT, slurm" in bad.output
    broken = write(tmp_path, "[grid]\nkind = 'compare'\nmodel = ['nope']\n", "broken.toml")
    result = runner.invoke(app, ["batch", str(broken)])
    assert result.exit_code == 1 and "[grid] model: found 'nope'" in result.output and "Traceback" not in result.output


def test_fit_job_writes_a_verified_run_directory_with_one_core(tmp_path):
    path = write(tmp_path, f"""
        [[jobs]]
        kind = "fit"
        data = "{DATA / 'theoph.csv'}"
        model = "one_cpt_oral"
        method = "map"
        seed = 1
    """)
    (job,) = resolve_jobs(load_pipeline(path))
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    outcome = execute(job, str(jobs_dir))
    assert outcome["status"] == "done", outcome["error"]
    folder = jobs_dir / job.name
    assert verify(folder, job) is None and [p.name for p in jobs_dir.iterdir()] == [job.name]
    run = json.loads((folder / "run.json").read_text())
    assert run["settings"]["cores"] == 1 and run["settings"]["method"] == "map"
    assert outcome["headline"]["diagnostics"] == "not applicable"
    assert execute(job, str(jobs_dir))["reused"]  # a second attempt finds it complete and writes nothing


def test_slurm_without_sbatch_is_a_clear_error(tmp_path):
    path = write(tmp_path, GRID + '[cluster]\nscheduler = "slurm"\ncores = 2\nmemory = "4GB"\n')
    result = runner.invoke(app, ["batch", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "sbatch is not on PATH" in result.output


def test_batch_records_are_strict_json_when_metrics_are_not_finite(tmp_path):
    # Kp = 0: no tumour uptake from blood, so G, TI, DSF are infinite; job.json, batch.json, the
    # event log and compare.json hold null, not Infinity/NaN (which strict JSON readers reject)
    path = write(tmp_path, """
        [[jobs]]
        kind = "compare"
        model = "it_linear"
        dose = 10
        routes = ["it", "iv"]
        set = { Kp = 0 }
        """)
    out = tmp_path / "out"
    log = tmp_path / "log.jsonl"
    result = runner.invoke(app, ["batch", str(path), "--out", str(out), "--workers", "1", "--log", str(log)])
    assert result.exit_code == 0, result.output

    def strict(text):
        def refuse(token):
            raise AssertionError(f"non-standard JSON constant {token}")

        return json.loads(text, parse_constant=refuse)

    record = strict((out / "batch.json").read_text())
    job = out / record["jobs"][0]["output"]
    headline = strict((job / "job.json").read_text())
    assert strict((job / "compare.json").read_text())["metrics"]["G"] is None
    for line in log.read_text().splitlines():
        strict(line)
    for document in (headline, record["jobs"][0]):
        assert document["headline"]["G_it"] is None and document["headline"]["TI_it"] is None
        assert document["headline"]["S_it"] == pytest.approx(0.9857142857142855, rel=1e-12)  # finite ones kept


def test_cmt_key_injects_the_second_lesion_in_compare_and_simulate_jobs(tmp_path):
    # the batch key is the CLI's --cmt: the same numbers as `itpk compare/simulate --cmt lesion2`
    path = write(tmp_path, """
        [[jobs]]
        kind = "compare"
        model = "it_linear"
        dose = 10.0
        cmt = "lesion2"
        [[jobs]]
        kind = "simulate"
        model = "it_linear"
        route = "it"
        cmt = "lesion2"
        dose = 10.0
        at = [1.0, 6.0]
    """)
    compare_job, simulate_job = resolve_jobs(load_pipeline(path))
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    for job in (compare_job, simulate_job):
        assert execute(job, str(jobs_dir))["status"] == "done"
    doc = json.loads((jobs_dir / compare_job.name / "compare.json").read_text())
    cli = json.loads(runner.invoke(app, ["compare", "it_linear", "--dose", "10", "--cmt", "lesion2", "--json"]).output)
    assert doc["site"] == "lesion2" and doc["metrics"] == cli["metrics"]
    profiles = pd.read_csv(jobs_dir / simulate_job.name / "profiles.csv")
    runner.invoke(app, ["simulate", "it_linear", "--route", "it", "--cmt", "lesion2", "--dose", "10", "--at", "1,6",
                        "--out", str(tmp_path / "cli.csv")])
    pd.testing.assert_frame_equal(profiles, pd.read_csv(tmp_path / "cli.csv"))


def test_leftover_clusters_are_closed_quietly_at_exit():
    # found by a walkthrough: Ctrl-C while the LocalCluster started left it in Status.init, and distributed's
    # exit hook printed a 20-line AssertionError after the batch's own message
    from itpk.batch import cluster

    closed = []

    class Cluster:
        shutdown_on_close = True
        status = "Status.init"

        def __init__(self, fails: bool) -> None:
            self.fails = fails

        def close(self, timeout: float) -> None:
            if self.fails:
                raise AssertionError("Status.init")
            closed.append(self)

    half_started, running = Cluster(True), Cluster(False)
    cluster._close_clusters_quietly([half_started, running])  # no exception, nothing printed
    assert closed == [running]  # the failing one does not keep the next open
    cluster._close_quietly_at_exit()
    cluster._close_quietly_at_exit()
    assert cluster._QUIET_EXIT == [True]  # replaced once per process
