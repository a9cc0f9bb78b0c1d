"""Benchmark: ``itpk batch`` on 1 vs 2 local Dask workers, and the batch layer's cost per job.

Workload: 40 compare jobs of ``one_cpt_mm`` (Michaelis-Menten elimination, so
each job integrates ODEs: about 0.5 s of work), a dose-finding grid of 20
doses x 2 dosing intervals, 10 doses each, route ``iv``::

    [defaults]
    kind = "compare"
    model = "one_cpt_mm"
    routes = ["iv"]
    doses = 10
    [grid]
    every = [12, 24]
    dose = [50, 100, ..., 1000]

Timed, all in this one process (wall clock, ``time.perf_counter``):

- ``direct``: the library verb in a loop, ``run_comparison(...)`` per job
  writing its CSV, after one warm-up call (imports and JIT excluded), with
  one BLAS thread as on a batch worker; each job paired with the batch's own
  ``execute`` of the same job in this process (hash check, the job directory,
  ``job.json``/``compare.json``/``manifest.json``, the rename), so the job
  layer's cost is a paired difference that the drift of other load cancels;
- ``batch 1 job / 1 worker``: ``run_batch`` of the first job alone (cluster
  start-up, worker imports, one job, shut-down: the fixed cost);
- ``batch N jobs / 1 worker`` and ``/ W workers`` (default 2): ``run_batch``
  end to end (LocalCluster of processes, one thread each).

The three batch runs are interleaved ``--repeat`` times and the best of each
is used (other load on a shared machine comes and goes); every run is printed.
Speed-up = T(1 worker) / T(W workers), end to end, and without the fixed
cost. Whole batch layer per job = (T(N jobs, 1 worker) - T(1 job, 1 worker))
/ (N - 1) - direct time per job: the marginal cost of one more job through
Dask and the job layer.

Usage::

    python benchmarks/bench_batch.py [--jobs 40] [--workers 2] [--doses 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def pipeline_text(jobs: int, doses: int) -> str:
    """A grid of ``jobs`` compare jobs (2 intervals x jobs/2 dose levels), ``doses`` doses each."""
    levels = ", ".join(str(50 * (i + 1)) for i in range(jobs // 2))
    return (f"[defaults]\nkind = \"compare\"\nmodel = \"one_cpt_mm\"\nroutes = [\"iv\"]\ndoses = {doses}\n"
            f"[grid]\nevery = [12, 24]\ndose = [{levels}]\n")


def time_direct(pipeline, folder: Path) -> tuple[list[float], list[float], list[float]]:
    """Per job, paired: ``run_comparison`` alone, then the batch's own ``execute`` of the same job.

    Both in this process, with one BLAS thread (as on a batch worker), after a
    warm-up call (imports and JIT excluded). Pairing each job's two timings
    cancels the drift of other load on the machine. Returns the direct wall
    times, the ``execute`` wall times, and the difference of their CPU times.
    """
    from threadpoolctl import threadpool_limits

    from itpk.batch.jobs import execute, resolve_jobs
    from itpk.workflows import run_comparison

    def one(job, out: Path) -> None:
        o = dict(job.options)
        run_comparison(o["model"], dose=o["dose"], routes=o["routes"], every=o["every"], doses=o["doses"], out=out)

    jobs_dir = folder / "paired"
    jobs_dir.mkdir()
    direct, batch_layer, cpu_extra = [], [], []
    with threadpool_limits(limits=1):
        one(pipeline.jobs[0], folder / "warmup.csv")
    for i, job in enumerate(resolve_jobs(pipeline)):
        wall, cpu = time.perf_counter(), time.process_time()
        with threadpool_limits(limits=1):
            one(job.spec, folder / f"direct-{i}.csv")
        direct.append(time.perf_counter() - wall)
        cpu_direct = time.process_time() - cpu
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = execute(job, str(jobs_dir))
        batch_layer.append(time.perf_counter() - wall)
        cpu_extra.append(time.process_time() - cpu - cpu_direct)
        assert outcome["status"] == "done", outcome["error"]
    return direct, batch_layer, cpu_extra


def time_batch(pipeline, out: Path, workers: int) -> tuple[float, list[float]]:
    """End-to-end seconds of ``run_batch`` and the workers' seconds per job."""
    from itpk.batch import run_batch

    start = time.perf_counter()
    result = run_batch(pipeline, out=out, workers=workers, progress=False)
    wall = time.perf_counter() - start
    assert result.exit_code == 0, result.message
    return wall, [r.wall_s for r in result.records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--doses", type=int, default=10, help="doses per job (work per job grows with it)")
    parser.add_argument("--repeat", type=int, default=3, help="batch runs of each kind; the best is reported")
    args = parser.parse_args()
    load_before = os.getloadavg()

    from dataclasses import replace

    from itpk.batch import load_pipeline
    from itpk.batch.cluster import available_cores

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "bench.toml"
        path.write_text(pipeline_text(args.jobs, args.doses), encoding="utf-8")
        pipeline = load_pipeline(path)
        n = len(pipeline.jobs)
        direct, executed, cpu_extra = time_direct(pipeline, folder)
        runs: dict[str, list[tuple[float, list[float]]]] = {"one": [], "serial": [], "parallel": []}
        for r in range(args.repeat):  # interleaved, best of each: other load on the machine comes and goes
            runs["one"].append(time_batch(replace(pipeline, jobs=pipeline.jobs[:1]), folder / f"b1-{r}", 1))
            runs["serial"].append(time_batch(pipeline, folder / f"bs-{r}", 1))
            runs["parallel"].append(time_batch(pipeline, folder / f"bp-{r}", args.workers))
        (one_job, _), (serial, worker_1), (parallel, worker_w) = (min(runs[k]) for k in ("one", "serial", "parallel"))

    direct_total, direct_mean = sum(direct), statistics.mean(direct)
    marginal = (serial - one_job) / (n - 1)
    print(f"machine: {platform.processor() or platform.machine()}, {available_cores()} cores available, "
          f"Python {platform.python_version()}; load average before/after: "
          f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"workload: {n} compare jobs of one_cpt_mm ({args.doses} doses, iv), median {statistics.median(direct):.3f} s each")
    print(f"direct loop (run_comparison)      : {direct_total:7.2f} s  ({direct_mean * 1e3:.0f} ms/job)")
    print(f"batch, 1 job, 1 worker (fixed)    : {one_job:7.2f} s")
    print(f"batch, {n} jobs, 1 worker          : {serial:7.2f} s  (worker-side {statistics.mean(worker_1[1:]) * 1e3:.0f} ms/job)")
    print(f"batch, {n} jobs, {args.workers} workers         : {parallel:7.2f} s  "
          f"(worker-side {statistics.mean(worker_w[2:]) * 1e3:.0f} ms/job)")
    for key, label in (("one", "1 job / 1 worker"), ("serial", "1 worker"), ("parallel", f"{args.workers} workers")):
        print(f"  all runs, {label:<17}: " + ", ".join(f"{t:.2f}" for t, _ in runs[key]) + " s")
    print(f"speed-up {args.workers} vs 1 worker (end to end): {serial / parallel:.2f}x  (target >= 1.7x)")
    print(f"speed-up without the fixed cost          : {(serial - one_job) / (parallel - one_job):.2f}x")
    paired = [e - d for e, d in zip(executed, direct, strict=True)]
    print(f"job layer on the worker (paired, in-process): median {statistics.median(paired) * 1e3:+.1f} ms wall, "
          f"{statistics.median(cpu_extra) * 1e3:+.1f} ms CPU per job (hash check, job.json, compare.json, manifest, rename)")
    print(f"whole batch layer per job (marginal)     : {(marginal - direct_mean) * 1e3:+.1f} ms "
          f"({marginal * 1e3:.0f} ms/job through a 1-worker batch vs {direct_mean * 1e3:.0f} ms direct)")

if __name__ == "__main__":
    main()
