"""The batch's own outputs: ``batch.json`` (every job, its inputs and outcome) and ``batch.csv``.

Both are written atomically at the end of a batch (and when it is
interrupted), so a reader never sees half a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from itpk import jsontext
from itpk.io import atomic_write, write_text

BATCH_FORMAT = 1
STATUSES = ("done", "skipped", "failed", "cancelled")


@dataclass(frozen=True)
class JobRecord:
    """The outcome of one job.

    ``output`` is relative to the batch directory; ``attempts`` counts
    submissions (0 for a job skipped on --resume); ``wall_s`` is the time of
    the last attempt on its worker.
    """

    name: str
    label: str
    kind: str
    inputs: Mapping[str, Any]
    status: str
    attempts: int = 0
    wall_s: float | None = None
    output: str | None = None
    error: str | None = None
    headline: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
        if self.status == "failed" and not self.error:
            raise ValueError("a failed job needs its error")


def counts(records: Sequence[JobRecord]) -> dict[str, int]:
    """Jobs per status."""
    return {s: sum(r.status == s for r in records) for s in STATUSES}


def write_batch_json(out: Path, records: Sequence[JobRecord], meta: Mapping[str, Any]) -> Path:
    """``OUT/batch.json``: the run's settings, counts per status, then every job in pipeline order."""
    document = {"format": BATCH_FORMAT, **meta, "counts": counts(records), "jobs": [asdict(r) for r in records]}
    return write_text(out / "batch.json", jsontext.dumps(document, indent=2, default=str))


def _cell(value: Any) -> Any:
    """A table cell: lists joined by commas, tables as ``NAME=VALUE;…``."""
    if isinstance(value, Mapping):
        return ";".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return value


def batch_table(records: Sequence[JobRecord]) -> Any:
    """One row per job: identity and outcome, then its inputs, then its headline numbers."""
    import pandas as pd

    rows, inputs, numbers = [], {}, {}
    for r in records:
        row = {"name": r.name, "label": r.label, "kind": r.kind, "status": r.status, "attempts": r.attempts,
               "wall_s": r.wall_s, "output": r.output, "error": r.error}
        inputs.update(dict.fromkeys(k for k in r.inputs if k not in row))
        numbers.update(dict.fromkeys(k for k in r.headline if k not in row and k not in inputs))
        rows.append({**{k: _cell(v) for k, v in r.inputs.items()}, **r.headline, **row})
    head = ["name", "label", "kind", "status", "attempts", "wall_s"]
    table = pd.DataFrame(rows, columns=[*head, *inputs, *numbers, "output", "error"])
    for column in table.columns:  # whole-number options (seed, subjects, doses...) stay whole where some jobs lack them
        given = [row[column] for row in rows if row.get(column) is not None]
        if given and all(isinstance(v, int) and not isinstance(v, bool) for v in given):
            table[column] = table[column].astype("Int64")
    return table


def write_batch_csv(out: Path, records: Sequence[JobRecord]) -> Path:
    """``OUT/batch.csv``: the sweep at a glance."""
    table = batch_table(records)
    return atomic_write(out / "batch.csv", lambda tmp: table.to_csv(tmp, index=False))
