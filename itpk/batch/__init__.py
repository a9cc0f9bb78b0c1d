"""Batch pipelines on Dask (SPEC.md §7): many compare/simulate/fit jobs from one PIPELINE.toml.

One job per module: :mod:`~itpk.batch.schema` (the options a job may set),
:mod:`~itpk.batch.pipeline` (read and check the file), :mod:`~itpk.batch.jobs`
(a job's hash and its atomic execution on a worker), :mod:`~itpk.batch.cluster`
(the Dask client), :mod:`~itpk.batch.runner` (submit, retry, record),
:mod:`~itpk.batch.records` (``batch.json``/``batch.csv``),
:mod:`~itpk.batch.progress` (terminal line, JSON-lines log).
"""

from itpk.batch.pipeline import JobSpec, Pipeline, load_pipeline
from itpk.batch.runner import BatchResult, run_batch

__all__ = ["BatchResult", "JobSpec", "Pipeline", "load_pipeline", "run_batch"]
