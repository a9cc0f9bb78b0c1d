"""The Dask client a batch runs on: a local cluster of processes, an existing scheduler, or SLURM.

Dask is imported inside the functions so reading a pipeline (and ``itpk
--help``) does not pay for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from itpk.errors import ItpkError

SCHEDULERS = ("local", "tcp://HOST:PORT", "slurm")
# Worker processes get one thread each; these keep BLAS/OpenMP/numba from starting more.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# [cluster] keys: two defaults for the command line, and dask-jobqueue SLURMCluster arguments.
CLUSTER_KEYS: dict[str, tuple[Any, str]] = {
    "scheduler": (lambda v: isinstance(v, str) and bool(v), "local, slurm or tcp://HOST:PORT"),
    "workers": (_whole, "a whole number >= 1"),
    "queue": (lambda v: isinstance(v, str), "a SLURM partition name"),
    "account": (lambda v: isinstance(v, str), "a SLURM account"),
    "cores": (_whole, "a whole number >= 1 (cores per SLURM job)"),
    "processes": (_whole, "a whole number >= 1 (Dask workers per SLURM job; default: cores)"),
    "memory": (lambda v: isinstance(v, str), 'a size such as "8GB" (per SLURM job)'),
    "walltime": (lambda v: isinstance(v, str), 'a SLURM time such as "02:00:00"'),
    "job_name": (lambda v: isinstance(v, str), "a string"),
    "interface": (lambda v: isinstance(v, str), 'a network interface such as "ib0"'),
    "local_directory": (lambda v: isinstance(v, str), "a path on the compute nodes"),
    "log_directory": (lambda v: isinstance(v, str), "a path"),
    "python": (lambda v: isinstance(v, str), "the Python executable on the compute nodes"),
    "job_extra_directives": (_strings, 'a list of strings such as ["--gres=gpu:0"]'),
    "job_script_prologue": (_strings, 'a list of shell lines such as ["module load python"]'),
    "worker_extra_args": (_strings, "a list of strings"),
}


@dataclass(frozen=True)
class ClusterConfig:
    """The ``[cluster]`` table of a pipeline: defaults for ``--scheduler``/``--workers`` and SLURM settings."""

    scheduler: str | None = None
    workers: int | None = None
    slurm: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(dict(self.slurm)) - set(CLUSTER_KEYS))
        if unknown:
            raise ValueError(f"unknown [cluster] keys {unknown}")


def read_cluster(table: Any) -> tuple[ClusterConfig, list[str]]:
    """The ``[cluster]`` table and the problems found in it (key, found, allowed)."""
    if table is None:
        return ClusterConfig(), []
    if not isinstance(table, Mapping):
        return ClusterConfig(), [f"[cluster]: found {table!r}; allowed: a table of {', '.join(CLUSTER_KEYS)}"]
    problems, good = [], {}
    for key, value in table.items():
        if key not in CLUSTER_KEYS:
            problems.append(f"[cluster] {key}: unknown key; allowed: {', '.join(CLUSTER_KEYS)}")
            continue
        check, allowed = CLUSTER_KEYS[key]
        if not check(value):
            problems.append(f"[cluster] {key}: found {value!r}; allowed: {allowed}")
            continue
        good[key] = tuple(value) if isinstance(value, list) else value
    scheduler, workers = good.pop("scheduler", None), good.pop("workers", None)
    if scheduler is not None and not _known_scheduler(scheduler):
        problems.append(f"[cluster] scheduler: found {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    return ClusterConfig(scheduler, workers, tuple(sorted(good.items()))), problems


def _known_scheduler(text: str) -> bool:
    return text in ("local", "slurm") or "://" in text


def check_scheduler(scheduler: str) -> str:
    """``scheduler`` if it is one itpk can connect to, else an :class:`ItpkError` listing the choices."""
    if not _known_scheduler(scheduler):
        raise ItpkError(f"--scheduler {scheduler!r} is unknown; allowed: {', '.join(SCHEDULERS)}")
    return scheduler


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def slurm_arguments(config: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for a ``[cluster]`` table.

    ``cores`` and ``memory`` are required (per SLURM job); ``processes``
    defaults to ``cores`` so every Dask worker has one thread, and the job
    script exports one-thread settings for BLAS, OpenMP and numba.
    """
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in config.slurm}
    missing = [k for k in ("cores", "memory") if k not in kwargs]
    if missing:
        raise ItpkError(f"--scheduler slurm needs {' and '.join(missing)} in the pipeline's [cluster] table "
                        '(e.g. cores = 4, memory = "8GB")')
    kwargs.setdefault("processes", kwargs["cores"])
    exports = [f"export {k}={v}" for k, v in THREAD_ENV.items()]
    kwargs["job_script_prologue"] = [*kwargs.get("job_script_prologue", []), *exports]
    return kwargs


def slurm_job_script(config: ClusterConfig) -> str:
    """The ``sbatch`` script dask-jobqueue would submit for this configuration (needs no SLURM)."""
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(**slurm_arguments(config), scheduler_options={"dashboard_address": None})
    try:
        return cluster.job_script()
    finally:
        cluster.close()


@contextmanager
def make_client(scheduler: str, *, workers: int | None, config: ClusterConfig) -> Iterator[Any]:
    """A connected ``distributed.Client``; the cluster it started (if any) is closed on exit.

    ``local``: a ``LocalCluster`` of ``workers`` processes (default: the
    available cores) with one thread each. ``tcp://HOST:PORT``: an existing
    scheduler. ``slurm``: ``SLURMCluster`` from the ``[cluster]`` table, scaled
    to ``workers`` workers (default: one job's ``processes``).
    """
    import dask
    from distributed import Client

    check_scheduler(scheduler)
    if workers is not None and workers < 1:
        raise ItpkError(f"--workers must be >= 1, found {workers}")
    # Dead workers and their tasks are reported per job (batch.json, --log); Dask's own log lines
    # would break the progress line. Restored on exit: the caller's logging is theirs.
    dask_log = logging.getLogger("distributed")
    level, dask_log.level = dask_log.level, logging.CRITICAL
    # allowed-failures 0: a task whose worker dies comes back to us at once, so itpk counts attempts
    # and applies --retries; worker-saturation 1: a worker holds only the task it runs, so a dying
    # worker takes no innocent queued task with it.
    settings = {"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 1.0}
    try:
        with dask.config.set(settings):
            if scheduler == "local":
                yield from _local(Client, workers)
            elif scheduler == "slurm":
                yield from _slurm(Client, workers, config)
            else:
                yield from _remote(Client, scheduler)
    finally:
        dask_log.setLevel(level)


def _local(client_type: Any, workers: int | None) -> Iterator[Any]:
    from distributed import LocalCluster

    _close_quietly_at_exit()
    cluster = LocalCluster(n_workers=workers or available_cores(), threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR, env=dict(THREAD_ENV))
    try:
        with client_type(cluster) as client:
            yield client
    finally:
        cluster.close()


def _close_quietly_at_exit() -> None:
    """Replace distributed's exit hook, which closes the clusters left open, by one that does it quietly.

    A Ctrl-C while a ``LocalCluster`` starts leaves it half made (status ``init``), and closing it at
    exit raised an ``AssertionError`` whose 20-line traceback followed the batch's own message.
    """
    import atexit

    from distributed.deploy import spec

    if not _QUIET_EXIT:
        atexit.unregister(spec.close_clusters)
        atexit.register(_close_clusters_quietly, spec.SpecCluster._instances)
        _QUIET_EXIT.append(True)


_QUIET_EXIT: list[bool] = []  # the hook is replaced once per process


def _close_clusters_quietly(clusters: Any) -> None:
    """distributed's ``close_clusters``, each cluster on its own: one that fails to close (a half-started
    one) no longer keeps the others open or prints its traceback."""
    import contextlib

    for cluster in list(clusters):
        if getattr(cluster, "shutdown_on_close", False) and str(getattr(cluster, "status", "closed")) != "Status.closed":
            with contextlib.suppress(Exception):  # at exit, after the batch has reported: nothing left to tell the user
                cluster.close(timeout=10)


def _slurm(client_type: Any, workers: int | None, config: ClusterConfig) -> Iterator[Any]:
    import shutil

    from dask_jobqueue import SLURMCluster

    kwargs = slurm_arguments(config)
    if shutil.which("sbatch") is None:  # else the batch would wait forever for workers that are never submitted
        raise ItpkError("--scheduler slurm: sbatch is not on PATH; run itpk batch where SLURM jobs can be submitted "
                        "(a login node), or use --scheduler local or tcp://HOST:PORT")
    cluster = SLURMCluster(**kwargs, scheduler_options={"dashboard_address": None})
    try:
        cluster.scale(n=workers or kwargs["processes"])
        with client_type(cluster) as client:
            yield client
    finally:
        cluster.close()


def _remote(client_type: Any, address: str) -> Iterator[Any]:
    try:
        client = client_type(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise ItpkError(f"--scheduler {address}: cannot connect ({exc})") from None
    try:
        yield client
    finally:
        client.close()
