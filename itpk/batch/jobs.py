"""One batch job: its identity (a hash of its resolved inputs) and its execution on a worker.

A job's directory is ``OUT/jobs/<kind>-<hash12>``. It is assembled in a hidden
temporary sibling and renamed into place only when complete, with
``manifest.json`` (SHA-256 of every file) written last. A finished directory
is never replaced: a second attempt that finds it complete returns it, so a
job whose worker died after the rename is not written twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itpk import jsontext
from itpk.batch.headline import compare_headline, fit_headline, simulate_headline
from itpk.batch.pipeline import JobSpec, Pipeline
from itpk.errors import ItpkError, PipelineError, problems_error

JOB_FORMAT = 1
MANIFEST = "manifest.json"
RECORD = "job.json"
TMP_SUFFIX = ".tmp"  # every partial directory is ".<name>.<token>.tmp" (hidden, never a job directory)


@dataclass(frozen=True)
class ResolvedJob:
    """A job and its identity: ``digest`` is the SHA-256 of ``identity`` (canonical JSON)."""

    spec: JobSpec
    identity: tuple[tuple[str, Any], ...]
    digest: str

    def __post_init__(self) -> None:
        if len(self.digest) != 64 or self.digest != _sha256_json(dict(self.identity)):
            raise ValueError("digest does not match the job's identity")

    @property
    def name(self) -> str:
        """The job directory's name: ``<kind>-<first 12 hex digits of the digest>``."""
        return f"{self.spec.kind}-{self.digest[:12]}"


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_sha256(model: str) -> str:
    """SHA-256 of the model as resolved (its content with the ``extends`` chain; formatting and
    comments aside, since the model is hashed in canonical form)."""
    from itpk.spec import load_model

    return load_model(model).sha256


def _data_sha256(path: str) -> str:
    """SHA-256 of a dataset and of its units sidecar (which changes what the data mean)."""
    csv = Path(path)
    sidecar = csv.with_suffix(".units.toml")
    parts = [file_sha256(csv)] + ([file_sha256(sidecar)] if sidecar.is_file() else [])
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def _run_sha256(path: str) -> str:
    """SHA-256 of the files of a run directory that a comparison over its posterior reads."""
    from itpk.run import REQUIRED_FILES

    folder = Path(path)
    return hashlib.sha256("".join(file_sha256(folder / f) for f in REQUIRED_FILES if (folder / f).is_file()).encode()).hexdigest()


def identity(spec: JobSpec, digests: dict[tuple[str, str], str] | None = None) -> dict[str, Any]:
    """What a job's result depends on: kind, options (files by content, not by path), itpk version.

    ``digests`` caches file digests within one pipeline (a grid names the same files many times).
    """
    from itpk import __version__

    digests = {} if digests is None else digests
    options = dict(spec.options)
    for key, digest in (("model", _model_sha256), ("data", _data_sha256), ("posterior", _run_sha256)):
        if key in options:
            if (key, options[key]) not in digests:
                digests[key, options[key]] = digest(options[key])
            options[key] = {"sha256": digests[key, options[key]]}  # content, not path: moving files keeps the job
    return {"format": JOB_FORMAT, "itpk": __version__, "kind": spec.kind, "options": options}


def resolve_jobs(pipeline: Pipeline) -> tuple[ResolvedJob, ...]:
    """Every job of ``pipeline`` with its hash (as :func:`check_jobs`; the jobs
    :func:`~itpk.batch.pipeline.load_pipeline` checked already are not checked again).

    Raises
    ------
    PipelineError
        Listing every problem of every job, before any job runs.
    """
    if pipeline.resolved is not None:
        return pipeline.resolved
    jobs, problems = check_jobs([(spec, False) for spec in pipeline.jobs])
    if problems:
        raise problems_error(problems, PipelineError, where=str(pipeline.source))
    return jobs


def check_jobs(specs: Sequence[tuple[JobSpec, bool]],
               incomplete: Sequence[tuple[str, Mapping[str, Any], str]] = ()) -> tuple[tuple[ResolvedJob, ...], list[str]]:
    """The jobs with their hashes, and every problem a command would refuse them for (one line per problem,
    prefixed by the jobs that have it): an unreadable model, what :func:`_preflight` finds, duplicates.

    A job marked partial (``True``: some of its keys were unreadable, reported already) is checked for the
    options it has, without the checks that need the missing ones or its hash. So is each of
    ``incomplete`` (kind, options, label): a job that lacks a required key because its value was
    unreadable (a fit's missing data file), so is no :class:`JobSpec`.
    """
    found: dict[str, list[str]] = {}  # problem -> labels of the jobs that have it, in pipeline order
    jobs, seen, digests = [], {}, {}
    checked: dict[Any, Any] = {}
    for kind, options, label in incomplete:
        for p in _preflight(kind, options, checked, required=False):
            found.setdefault(p, []).append(label)
    for spec, partial in specs:
        problems = _preflight(spec.kind, dict(spec.options), checked, required=not partial)
        if partial:
            for p in problems:
                found.setdefault(p, []).append(spec.label)
            continue
        try:
            ident = identity(spec, digests)
        except (ItpkError, OSError) as exc:
            problems = [str(exc), *(p for p in problems if p != str(exc))]
            for p in problems:
                found.setdefault(p, []).append(spec.label)
            continue
        for p in problems:
            found.setdefault(p, []).append(spec.label)
        job = ResolvedJob(spec, tuple(sorted(ident.items())), _sha256_json(ident))
        if job.digest in seen:
            found.setdefault(f"same inputs as {seen[job.digest]} (one output directory); remove one", []).append(spec.label)
            continue
        seen[job.digest] = spec.label
        jobs.append(job)
    return tuple(jobs), [f"{_labels(labels)}: {_as_keys(p)}" for p, labels in found.items()]


def _as_keys(problem: str) -> str:
    """The commands' messages name CLI options (``--dose``, ``--target-accept``); a pipeline names keys."""
    return re.sub(r"(?<![\w-])--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), problem)


def _labels(labels: Sequence[str]) -> str:
    """``grid #1``, ``grid #1, grid #2``, or ``grid #1, grid #2, … (12 jobs)``."""
    shown = ", ".join(labels[:3])
    return shown if len(labels) <= 3 else f"{shown}, … ({len(labels)} jobs)"


def _preflight(kind: str, o: Mapping[str, Any], checked: dict[Any, Any], *, required: bool = True) -> list[str]:
    """What the job's command would refuse before any work: the same checks as ``itpk compare``,
    ``itpk simulate`` and ``itpk fit`` (:func:`itpk.workflows.comparison_problems`,
    :func:`itpk.workflows.simulation_problems`, :func:`itpk.inference.argument_problems`: numbers, choices,
    routes, --set names, target outputs), and the dataset of a fit.

    ``checked`` caches each model and each (data, model) validation for one pre-flight, so a sweep
    over one trial loads and reads them once. ``required=False``: only the options the job has.
    """
    from itpk.dataset import read_dataset
    from itpk.inference import argument_problems
    from itpk.population import estimated_problems
    from itpk.spec import load_model
    from itpk.workflows import comparison_problems, fitted_model, simulation_problems

    if ("model", o["model"]) not in checked:
        try:
            checked["model", o["model"]] = load_model(o["model"])
        except (ItpkError, OSError) as exc:
            checked["model", o["model"]] = str(exc)
    model = checked["model", o["model"]]
    if isinstance(model, str):
        return [model]
    common = {"dose": o.get("dose"), "site": o.get("cmt"), "regimen_name": o.get("regimen"), "diam": o.get("diam"),
              "every": o.get("every"), "doses": o.get("doses"), "infusion": o.get("infusion"), "horizon": o.get("horizon"),
              "overrides": dict(o.get("set", ())), "required": required}
    if kind == "compare":
        problems = comparison_problems(model, routes=o.get("routes", ("it", "iv")), targets=dict(o.get("target", ())),
                                       thresholds=o.get("threshold", ()), **common)
        if o.get("posterior") is not None:  # the run directory, as the job would read it (once per pre-flight)
            key = ("posterior", str(o["posterior"]), str(o["model"]))
            if key not in checked:
                try:
                    checked[key] = fitted_model(model, o["posterior"])[1]  # the draws
                except (ItpkError, OSError) as exc:
                    checked[key] = str(exc)
            found = checked[key]
            problems += [found] if isinstance(found, str) else estimated_problems(model, found, dict(o.get("set", ())))
        return problems
    if kind == "simulate":
        return simulation_problems(model, route=o.get("route"), step=o.get("step"), at=o.get("at"),
                                   subjects=o.get("subjects", 1), seed=o.get("seed"), **common)
    problems = argument_problems(model, method=o.get("method", "nuts"), draws=o.get("draws", 1000),
                                 tune=o.get("tune", 1000), chains=o.get("chains", 4), cores=1, seed=o.get("seed"),
                                 errors=dict(o.get("error", ())), target_accept=o.get("target_accept", 0.9),
                                 mass_matrix=o.get("mass_matrix", "auto"), iiv=o.get("iiv", "auto"),
                                 precondition=o.get("precondition", "auto"))
    if "data" in o:
        key = (str(o["data"]), str(o["model"]))
        if key not in checked:
            try:
                read_dataset(o["data"], model)
                checked[key] = ""
            except (ItpkError, OSError) as exc:
                checked[key] = str(exc)
        problems += [checked[key]] if checked[key] else []
    return problems


# ---------------------------------------------------------------- verification


def write_manifest(folder: Path, job: ResolvedJob) -> None:
    """Record the SHA-256 and size of every file in ``folder``: the completion marker, written last."""
    files = {str(p.relative_to(folder)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": JOB_FORMAT, "job": job.name, "digest": job.digest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def verify(folder: Path, job: ResolvedJob) -> str | None:
    """None when ``folder`` holds this job's complete outputs, else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{MANIFEST} is missing or unreadable"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"bytes", "sha256"} <= set(e) for e in files.values()):
        return f"{MANIFEST} is not a manifest itpk wrote"
    if manifest.get("digest") != job.digest:
        return f"{MANIFEST} belongs to another job"
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            return f"{rel} is missing or changed since the job finished"
    return None


def read_record(folder: Path) -> dict[str, Any]:
    """The ``job.json`` of a finished job (empty when unreadable or not an object)."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


# ---------------------------------------------------------------- execution (on a worker)


@contextmanager
def worker_settings() -> Iterator[None]:
    """While a job runs: one BLAS/OpenMP and one numba thread (N workers use N cores), and
    libraries' INFO chatter (PyMC's "Sampling: [...]") kept off the terminal the batch reports on."""
    import logging

    from threadpoolctl import threadpool_limits

    try:
        import numba

        numba.set_num_threads(1)
    except (ImportError, ValueError):  # numba absent, or its pool already smaller
        pass
    loggers = [logging.getLogger(name) for name in ("pymc", "pytensor", "nutpie")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _compare(job: JobSpec, folder: Path) -> dict[str, Any]:
    from itpk.workflows import run_comparison

    o = dict(job.options)
    result = run_comparison(
        o["model"], dose=o.get("dose"), routes=o.get("routes", ("it", "iv")), site=o.get("cmt"), regimen_name=o.get("regimen"),
        diam=o.get("diam"), every=o.get("every"), doses=o.get("doses"), infusion=o.get("infusion"),
        overrides=dict(o.get("set", ())), targets=dict(o.get("target", ())), thresholds=o.get("threshold", ()),
        horizon=o.get("horizon"), posterior=o.get("posterior"), out=folder / "compare.csv",
        plot=folder / "compare.png" if o.get("plot") else None,
    )
    (folder / "compare.json").write_text(jsontext.dumps(result.report, indent=2), encoding="utf-8")
    return compare_headline(result.report)


def _simulate(job: JobSpec, folder: Path) -> dict[str, Any]:
    from itpk.workflows import run_simulation

    o = dict(job.options)
    result = run_simulation(
        o["model"], route=o.get("route"), dose=o.get("dose"), site=o.get("cmt"), regimen_name=o.get("regimen"), diam=o.get("diam"),
        every=o.get("every"), doses=o.get("doses"), infusion=o.get("infusion"), horizon=o.get("horizon"),
        step=o.get("step"), at=o.get("at"), overrides=dict(o.get("set", ())), subjects=o.get("subjects", 1),
        seed=o.get("seed"), out=folder / "profiles.csv", plot=folder / "profiles.png" if o.get("plot") else None,
    )
    return simulate_headline(result.profiles)


def _fit(job: JobSpec, folder: Path) -> dict[str, Any]:
    import logging

    import pymc  # noqa: F401 - imported before quieting its logger: importing PyMC sets that logger to INFO

    from itpk.workflows import run_fit

    logging.getLogger("pymc").setLevel(logging.WARNING)  # restored by worker_settings
    o = dict(job.options)
    method = o.get("method", "nuts")
    # cores=1: the chains share this worker's single core instead of each taking one.
    result = run_fit(o["data"], model=o["model"], out=folder, method=method, draws=o.get("draws", 1000),
                     tune=o.get("tune", 1000), chains=o.get("chains", 4), cores=1, seed=o.get("seed"),
                     errors=dict(o.get("error", ())), target_accept=o.get("target_accept", 0.9),
                     mass_matrix=o.get("mass_matrix", "auto"), iiv=o.get("iiv", "auto"),
                     precondition=o.get("precondition", "auto"), command=("itpk", "batch", job.label))
    return fit_headline(result.diagnostics, method)


RUNNERS: dict[str, Callable[[JobSpec, Path], dict[str, Any]]] = {
    "compare": _compare, "simulate": _simulate, "fit": _fit,
}
# fit writes its own run directory (itself atomic) at the path it is given; the others write files.
_MAKES_OWN_FOLDER = frozenset({"fit"})


def execute(job: ResolvedJob, jobs_dir: str, hook: Callable[[ResolvedJob], None] | None = None) -> dict[str, Any]:
    """Run one job on this process and return its outcome (a small dict for the scheduler).

    ``status`` is ``done`` (written now, or found complete from an earlier
    attempt: ``reused``) or ``failed`` with ``error`` for bad input (an
    :class:`ItpkError`: retrying cannot help). Anything else (a bug, a full
    disk) is raised so the batch may retry it. ``hook(job)`` runs first, on
    the worker (tests use it to stop a job mid-way).
    """
    start = time.perf_counter()
    final = Path(jobs_dir) / job.name
    if final.exists():
        return _existing(final, job, start)
    tmp = Path(jobs_dir) / f".{job.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        if job.spec.kind not in _MAKES_OWN_FOLDER:
            tmp.mkdir(parents=True)
        with worker_settings():
            if hook is not None:
                hook(job)
            headline = RUNNERS[job.spec.kind](job.spec, tmp)
        wall = time.perf_counter() - start
        (tmp / RECORD).write_text(jsontext.dumps(_record(job, headline, wall), indent=2), encoding="utf-8")
        write_manifest(tmp, job)
        _publish(tmp, final, job)
    except ItpkError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return _outcome("failed", start, error=str(exc))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _outcome("done", start, output=final, headline=headline)


def _existing(final: Path, job: ResolvedJob, start: float) -> dict[str, Any]:
    problem = verify(final, job)
    if problem:
        return _outcome("failed", start, error=f"{final} exists but is not a complete job directory ({problem}); "
                                               "it is never overwritten: remove it to recompute the job")
    return _outcome("done", start, output=final, headline=read_record(final).get("headline", {}), reused=True)


def _publish(tmp: Path, final: Path, job: ResolvedJob) -> None:
    """Rename the complete ``tmp`` to ``final``; if another attempt got there first, keep its directory."""
    from itpk.io import _umask

    for path in (tmp, *tmp.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())  # mkdtemp/mkstemp modes are 0700/0600
    try:
        os.rename(tmp, final)  # fails on an existing non-empty directory: a finished job is never replaced
    except OSError:
        if verify(final, job) is not None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _record(job: ResolvedJob, headline: Mapping[str, Any], wall: float) -> dict[str, Any]:
    return {"format": JOB_FORMAT, "name": job.name, "label": job.spec.label, "kind": job.spec.kind,
            "digest": job.digest, "inputs": job.spec.display(), "identity": dict(job.identity),
            "headline": dict(headline), "wall_s": wall, "host": socket.gethostname(), "pid": os.getpid()}


def _outcome(status: str, start: float, *, output: Path | None = None, headline: Mapping[str, Any] | None = None,
             error: str | None = None, reused: bool = False) -> dict[str, Any]:
    return {"status": status, "wall_s": time.perf_counter() - start, "output": str(output) if output else None,
            "headline": dict(headline or {}), "error": error, "reused": reused, "host": socket.gethostname()}
