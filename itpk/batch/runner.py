"""Run a pipeline's jobs on Dask: skip finished ones, submit the rest, retry, record, summarise.

The only place that talks to the scheduler. Each job runs
:func:`itpk.batch.jobs.execute` on a worker; this module decides what is
submitted, what is retried (a job whose worker died, or that raised something
other than bad input), and what ends up in ``batch.json``/``batch.csv``.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from itpk.batch.cluster import check_scheduler, make_client
from itpk.batch.jobs import (
    TMP_SUFFIX,
    ResolvedJob,
    execute,
    read_record,
    resolve_jobs,
    verify,
)
from itpk.batch.pipeline import Pipeline
from itpk.batch.progress import EventLog, Progress
from itpk.batch.records import JobRecord, counts, write_batch_csv, write_batch_json
from itpk.errors import ItpkError, problems_error
from itpk.io import clash_problems, folder_problem

EXIT_OK, EXIT_FAILED = 0, 4


@dataclass(frozen=True)
class BatchResult:
    """What a finished batch left: its directory, one record per job (pipeline order), its wall time."""

    out: Path
    records: tuple[JobRecord, ...]
    wall_s: float

    @property
    def counts(self) -> dict[str, int]:
        """Jobs per status (done, skipped, failed, cancelled)."""
        return counts(self.records)

    @property
    def exit_code(self) -> int:
        """0 when every job is done or skipped, 4 when any failed (SPEC.md §4)."""
        return EXIT_FAILED if any(r.status != "done" and r.status != "skipped" for r in self.records) else EXIT_OK

    @property
    def message(self) -> str:
        """One summary line, then one line per failed job."""
        c = self.counts
        lines = [(f"batch: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed in {self.wall_s:.1f} s; "
                  f"wrote {self.out / 'batch.json'} and {self.out / 'batch.csv'}")]
        lines += [f"  failed {r.name} ({r.label}): {r.error}" for r in self.records if r.status == "failed"]
        return "\n".join(lines)


def default_out(pipeline_path: Path) -> Path:
    """The batch directory when ``--out`` is not given: a folder named after the pipeline, beside it."""
    return pipeline_path.with_suffix("")


def option_problems(out: Path, *, resume: bool = False, log: str | Path | None = None, scheduler: str | None = None,
                    workers: int | None = None, retries: int = 2, pipeline: str | Path | None = None) -> list[str]:
    """Every problem of ``itpk batch``'s own options, one line each, checked before anything is created:
    the batch directory ``out`` (a file, in a folder that cannot be written, or holding an earlier batch
    without ``resume``), the ``log`` file (a folder, read-only, in a folder that cannot be written, the
    ``pipeline`` file or one the batch writes), the scheduler, the counts."""
    problems = []
    if retries is None or isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        problems.append(f"--retries must be >= 0, found {retries}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        problems.append(f"--workers must be >= 1, found {workers}")
    if scheduler is not None:
        try:
            check_scheduler(scheduler)
        except ItpkError as exc:
            problems.append(str(exc))
    out = Path(out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} is a file; give a directory")
    elif not out.exists():
        problems += [p for p in [folder_problem("--out", out)] if p]
    elif not os.access(out, os.W_OK | os.X_OK):
        problems.append(f"--out {out}: cannot write in it (not a writable folder)")
    elif not resume and ((out / "batch.json").exists() or ((out / "jobs").is_dir() and any((out / "jobs").iterdir()))):
        problems.append(f"{out} already holds a batch: pass --resume to keep its finished jobs and run the rest, "
                        "or choose another --out")
    if log is not None:
        log = Path(log)
        if log.is_dir():
            problems.append(f"--log {log}: is a folder; give a file to append the JSON-lines log to")
        elif log.exists() and not os.access(log, os.W_OK):
            problems.append(f"--log {log}: the file is read-only")
        elif not log.exists():
            problems += [p for p in [folder_problem("--log", log)] if p]
        problems += clash_problems({"--log": log}, {"the pipeline file": pipeline, "the batch's batch.json": out / "batch.json",
                                                    "the batch's batch.csv": out / "batch.csv"})
    return problems


def prepare_out(out: Path, *, resume: bool) -> Path:
    """Create ``OUT/jobs``; refuse to mix with an earlier batch unless resuming; drop partial directories.

    Partial directories (``.<name>.<token>.tmp``) are what an interrupted or
    killed earlier run was writing; they are never job directories.
    """
    jobs_dir = out / "jobs"
    if out.exists() and not out.is_dir():
        raise ItpkError(f"--out {out} is a file; give a directory")
    earlier = (out / "batch.json").exists() or (jobs_dir.is_dir() and any(jobs_dir.iterdir()))
    if earlier and not resume:
        raise ItpkError(f"{out} already holds a batch: pass --resume to keep its finished jobs and run the rest, "
                        "or choose another --out")
    jobs_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(jobs_dir)
    return jobs_dir


def remove_partial(jobs_dir: Path) -> None:
    """Delete half-written job directories (hidden temporary siblings)."""
    for path in jobs_dir.glob(f".*{TMP_SUFFIX}"):
        shutil.rmtree(path, ignore_errors=True)


def run_batch(
    pipeline: Pipeline,
    *,
    out: str | Path | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    retries: int = 2,
    log: str | Path | None = None,
    progress: bool | None = None,
    hook: Callable[[ResolvedJob], None] | None = None,
) -> BatchResult:
    """Run every job of ``pipeline`` and write ``batch.json`` and ``batch.csv`` under ``out``.

    Parameters
    ----------
    out
        Batch directory (default: the pipeline's path without ``.toml``).
    scheduler, workers
        ``local`` (default), ``tcp://HOST:PORT`` or ``slurm``, and the number
        of workers; both default to the pipeline's ``[cluster]`` table.
    resume
        Keep jobs whose directories are complete and verified (``skipped``)
        and run the rest; without it, an ``out`` holding a batch is refused.
    retries
        Further attempts for a job whose worker died or that raised an
        unexpected error; bad input (an :class:`ItpkError`) fails at once.
    log, progress
        A JSON-lines event log; a progress line on stderr (default: when
        stderr is a terminal).
    hook
        Called on the worker with the job before it runs (for tests).

    A ``KeyboardInterrupt`` cancels the remaining jobs, closes the cluster,
    removes partial directories, records unfinished jobs as ``cancelled``
    and is re-raised.
    """
    started = time.monotonic()
    out = Path(out) if out is not None else default_out(pipeline.source)
    scheduler = scheduler or pipeline.cluster.scheduler or "local"
    problems = option_problems(out, resume=resume, log=log, scheduler=scheduler, workers=workers, retries=retries,
                               pipeline=pipeline.source)
    if problems:  # before anything is created
        raise problems_error(problems)
    workers = workers or pipeline.cluster.workers
    jobs = resolve_jobs(pipeline)
    created = not out.exists()
    jobs_dir = prepare_out(out, resume=resume)
    meta = {"pipeline": str(pipeline.source), "out": str(out.resolve()), "scheduler": scheduler, "workers": workers,
            "retries": retries, "resume": resume, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    records = {job.name: _pending(job) for job in jobs}
    events = EventLog(log)
    bar = Progress(len(jobs), enabled=sys.stderr.isatty() if progress is None else progress)
    events.write("start", jobs=len(jobs), **meta)
    try:
        todo = _skip_finished(jobs, jobs_dir, records, bar, events)
        if todo:
            with make_client(scheduler, workers=workers, config=pipeline.cluster) as client:
                _run(client, todo, jobs_dir, records, retries, hook, bar, events)
            remove_partial(jobs_dir)  # what attempts on workers that died were writing
        bar.close()
        return _finish(out, records, meta, started, events, "finish")
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as itpk.interrupts.Terminated (its type is kept)
        remove_partial(jobs_dir)  # the cluster is closed by now: no worker is still writing
        _reconcile(jobs, jobs_dir, records)
        bar.close()
        result = _finish(out, records, meta, started, events, "interrupted")
        raise type(exc)(result.message) from None
    except Exception:
        _remove_if_empty(jobs_dir, out if created else None)  # e.g. no scheduler at that address
        raise
    finally:
        events.close()


def _remove_if_empty(*folders: Path | None) -> None:
    """Remove the folders a batch made, in order, while they are empty (a --log inside keeps them)."""
    for folder in folders:
        if folder is None:
            continue
        try:
            folder.rmdir()
        except OSError:  # not empty: something worth keeping is inside
            return


def _pending(job: ResolvedJob) -> JobRecord:
    return JobRecord(job.name, job.spec.label, job.spec.kind, job.spec.display(), "cancelled")


def _skip_finished(jobs: Sequence[ResolvedJob], jobs_dir: Path, records: dict[str, JobRecord], bar: Progress,
                   events: EventLog) -> list[ResolvedJob]:
    """Record jobs already complete on disk as skipped (a corrupt one as failed); return the rest."""
    todo = []
    for job in jobs:
        folder = jobs_dir / job.name
        if not folder.exists():
            todo.append(job)
            continue
        problem = verify(folder, job)
        if problem is None:
            headline = read_record(folder).get("headline", {})
            records[job.name] = replace(records[job.name], status="skipped", output=_rel(folder, jobs_dir),
                                        headline=headline)
        else:
            records[job.name] = replace(records[job.name], status="failed",
                                        error=f"{folder} exists but is not complete ({problem}); it is never "
                                              "overwritten: remove it to recompute the job")
        events.write(records[job.name].status, job=job.name, label=job.spec.label, error=records[job.name].error)
        bar.count(records[job.name].status, ran=False)
    return todo


def _reconcile(jobs: Sequence[ResolvedJob], jobs_dir: Path, records: dict[str, JobRecord]) -> None:
    """After an interrupt: jobs that finished on a worker before their result arrived are done, not cancelled."""
    for job in jobs:
        folder = jobs_dir / job.name
        if records[job.name].status == "cancelled" and folder.is_dir() and verify(folder, job) is None:
            saved = read_record(folder)
            records[job.name] = replace(records[job.name], status="done", attempts=max(1, records[job.name].attempts),
                                        wall_s=saved.get("wall_s"), output=_rel(folder, jobs_dir),
                                        headline=saved.get("headline", {}))


def _rel(folder: Path, jobs_dir: Path) -> str:
    return str(Path(jobs_dir.name) / folder.name)


def _run(client: Any, todo: Sequence[ResolvedJob], jobs_dir: Path, records: dict[str, JobRecord], retries: int,
         hook: Callable[[ResolvedJob], None] | None, bar: Progress, events: EventLog) -> None:
    """Submit every job, collect results as they finish, resubmit what may succeed on another try."""
    from distributed import as_completed

    def submit(job: ResolvedJob, attempt: int) -> Any:
        future = client.submit(execute, job, str(jobs_dir), hook, key=f"{job.name}-attempt{attempt}", pure=False)
        owner[future.key] = (job, attempt)
        events.write("submit", job=job.name, label=job.spec.label, attempt=attempt)
        return future

    owner: dict[str, tuple[ResolvedJob, int]] = {}
    futures = [submit(job, 1) for job in todo]
    pending = as_completed(futures)
    bar.draw()
    try:
        for future in pending:
            job, attempt = owner.pop(future.key)
            outcome = _outcome(future)
            if outcome.get("retry") and attempt <= retries:
                events.write("retry", job=job.name, label=job.spec.label, attempt=attempt, error=outcome["error"])
                pending.add(submit(job, attempt + 1))
                continue
            records[job.name] = _record(records[job.name], outcome, attempt, jobs_dir)
            rec = records[job.name]
            events.write(rec.status, job=job.name, label=job.spec.label, attempt=attempt, wall_s=rec.wall_s,
                         output=rec.output, error=rec.error, headline=rec.headline)
            bar.count(rec.status)
    except KeyboardInterrupt:
        client.cancel(list(pending.futures), force=True)
        raise


def _outcome(future: Any) -> dict[str, Any]:
    """The worker's outcome, or a retryable failure when the task raised or its worker died."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - KilledWorker (its worker died) or any unexpected error: retryable
        return {"status": "failed", "retry": True, "error": f"{type(exc).__name__}: {exc}", "wall_s": None}


def _record(pending: JobRecord, outcome: dict[str, Any], attempt: int, jobs_dir: Path) -> JobRecord:
    output = outcome.get("output")
    return replace(pending, status=outcome["status"], attempts=attempt, wall_s=outcome.get("wall_s"),
                   output=_rel(Path(output), jobs_dir) if output else None, error=outcome.get("error"),
                   headline=outcome.get("headline") or {})


def _finish(out: Path, records: dict[str, JobRecord], meta: dict[str, Any], started: float, events: EventLog,
            event: str) -> BatchResult:
    result = BatchResult(out, tuple(records.values()), time.monotonic() - started)
    write_batch_json(out, result.records, {**meta, "wall_s": result.wall_s})
    write_batch_csv(out, result.records)
    events.write(event, wall_s=result.wall_s, **result.counts)
    return result
