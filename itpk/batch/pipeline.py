"""Read a ``PIPELINE.toml`` (SPEC.md §7) into frozen job specifications.

A pipeline has ``[defaults]`` (options every job starts from), ``[grid]`` (a
cartesian product: one job per combination of the listed values) and/or
``[[jobs]]`` (explicit jobs), plus an optional ``[cluster]`` table. Keys are
the CLI's long option names with ``-`` as ``_``. Every problem in the file is
collected and reported at once in one :class:`PipelineError`.
"""

from __future__ import annotations

import difflib
import itertools
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itpk.batch.cluster import ClusterConfig, read_cluster
from itpk.batch.schema import (
    KIND_OPTIONS,
    KINDS,
    OPTIONS,
    PATHS,
    REQUIRED,
    Invalid,
    allowed_keys,
    display,
    merge,
)
from itpk.errors import PipelineError, problems_error

TABLES = ("defaults", "grid", "jobs", "cluster")
MAX_GRID_JOBS = 100_000  # a typo (an extra zero in a range) should not queue millions of jobs


@dataclass(frozen=True)
class JobSpec:
    """One job of a pipeline: its kind and canonical options (paths absolute, values coerced).

    ``label`` says where it came from (``grid #3``, ``jobs #1``) for messages
    and tables; it is not part of the job's identity.
    """

    kind: str
    options: tuple[tuple[str, Any], ...]
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {KINDS}")
        names = [k for k, _ in self.options]
        unknown = sorted(set(names) - KIND_OPTIONS[self.kind])
        missing = [k for k in REQUIRED[self.kind] if k not in names]
        if unknown or missing or names != sorted(names):
            raise ValueError(f"{self.kind} job: unknown {unknown}, missing {missing}, or unsorted options")

    def option(self, name: str, default: Any = None) -> Any:
        """The canonical value of one option (``default`` when not given)."""
        return dict(self.options).get(name, default)

    def display(self) -> dict[str, Any]:
        """Options as a user reads them (tables as objects, lists as lists)."""
        return {k: display(v) for k, v in self.options}


@dataclass(frozen=True)
class Pipeline:
    """A parsed pipeline file: where it is, its jobs in file order, its ``[cluster]`` table."""

    source: Path
    jobs: tuple[JobSpec, ...]
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # the jobs with their hashes, as checked by load_pipeline (None: resolve_jobs checks them)
    resolved: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.jobs:
            raise ValueError("a pipeline needs at least one job")


class _Problems(list[str]):
    """Problems found so far, each one line: where, key, found, allowed.

    ``base`` is the pipeline's folder: relative paths are resolved against it.
    """

    def __init__(self, base: Path) -> None:
        super().__init__()
        self.base = base

    def known(self, where: str, key: str, kinds: tuple[str, ...]) -> bool:
        """Whether jobs of every kind in ``kinds`` accept ``key``; records why not."""
        bad_kinds = [k for k in kinds if key not in KIND_OPTIONS[k]]
        if key in OPTIONS and not bad_kinds:
            return True
        kind = bad_kinds[0] if bad_kinds and key in OPTIONS else None
        allowed = allowed_keys(kind) if kind else ", ".join(["kind", *sorted(OPTIONS)])
        self.append(f"{where} {key}: unknown key{f' for kind {kind!r}' if kind else ''}; allowed: {allowed}")
        return False

    def read(self, where: str, key: str, value: Any) -> Any:
        """The canonical value of ``key`` (paths absolute), or None after recording what is allowed."""
        try:
            value = OPTIONS[key].read(value)
        except Invalid as exc:
            self.append(f"{where} {key}: found {value!r}; allowed: {exc}")
            return None
        if key not in PATHS:
            return value
        resolved, problem = _resolve_path(key, value, self.base)
        if problem:
            self.append(f"{where} {key}: {problem}")
            return None
        return resolved


def load_pipeline(path: str | Path, *, preflight: bool = False) -> Pipeline:
    """Read and check a pipeline file.

    With ``preflight`` (``itpk batch``), also check its jobs as their commands would before any work
    (:func:`itpk.batch.jobs.check_jobs`: numbers and choices, what the model lacks, the dataset of a fit,
    duplicates), reported with the file's problems in one message; without it, :func:`run_batch` does that
    before any job runs. A job with unreadable keys is still checked with the keys it has, so a wrong value
    elsewhere in the file never hides its other problems.

    Raises
    ------
    PipelineError
        With one line per problem (table or job, key, what was found, what is
        allowed) when anything in the file or its jobs is wrong.
    """
    from itpk.batch.jobs import check_jobs

    source = Path(path)
    raw = _read_toml(source)
    problems = _Problems(source.parent)
    for key in raw:
        if key not in TABLES:
            problems.append(f"{key}: unknown top-level key; allowed: [defaults], [grid], [[jobs]], [cluster]")
    defaults = _defaults(raw.get("defaults", {}), problems)
    table = raw.get("defaults", {})
    unread = frozenset(k for k in table if k != "kind" and k not in defaults) if isinstance(table, Mapping) else frozenset()
    jobs = [*_grid_jobs(raw.get("grid"), defaults, problems), *_explicit_jobs(raw.get("jobs"), defaults, problems)]
    cluster, cluster_problems = read_cluster(raw.get("cluster"))
    problems.extend(cluster_problems)
    if "grid" not in raw and "jobs" not in raw:
        problems.append("no jobs: give a [grid] table and/or [[jobs]] entries")
    specs = [(_job_spec(kind, options, label, problems, unread | bad), bool(unread | bad))
             for kind, options, label, bad in jobs]
    if not specs and not problems:  # e.g. `jobs = []`
        problems.append("no jobs: give a [grid] table and/or [[jobs]] entries")
    resolved = None
    if preflight:
        # a job that lacks only keys whose values were unreadable is still checked for its other options
        # (a fit's missing data file used to hide its draws = 0); without its model there is nothing to check
        incomplete = [(kind, options, label) for (spec, _), (kind, options, label, bad) in zip(specs, jobs, strict=True)
                      if spec is None and "model" in options
                      and all(k in (unread | bad) for k in REQUIRED[kind] if k not in options)]
        resolved, job_problems = check_jobs([(s, partial) for s, partial in specs if s is not None], incomplete)
        problems.extend(job_problems)
    if problems:
        raise problems_error(problems, PipelineError, where=str(source))
    return Pipeline(source.resolve(), tuple(s for s, _ in specs if s is not None), cluster, resolved)


def _read_toml(source: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(source.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise PipelineError(f"pipeline file {str(source)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read pipeline file {str(source)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{source}: not valid TOML ({exc})") from None


def _kind(value: Any, where: str, problems: _Problems) -> str | None:
    if value in KINDS:
        return value
    close = difflib.get_close_matches(str(value), KINDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    # the job's other keys depend on its kind: they are checked once it is one of these
    problems.append(f"{where} kind: found {value!r}{hint}; allowed: {', '.join(KINDS)}; its other keys are checked "
                    "once the kind is known")
    return None


def _defaults(table: Any, problems: _Problems) -> dict[str, Any]:
    """``[defaults]``: any option of any kind (each job keeps those its kind accepts)."""
    if not isinstance(table, Mapping):
        problems.append(f"[defaults]: found {table!r}; allowed: a table of options")
        return {}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key == "kind":
            out["kind"] = _kind(value, "[defaults]", problems)
            continue
        kinds = tuple(k for k in KINDS if key in KIND_OPTIONS[k])[:1]  # any kind that has the key
        if problems.known("[defaults]", key, kinds) and (coerced := problems.read("[defaults]", key, value)) is not None:
            out[key] = coerced
    return out


def _for_kind(defaults: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The defaults a job of ``kind`` takes: those its command has (a fit ignores ``routes``)."""
    return {k: v for k, v in defaults.items() if k in KIND_OPTIONS[kind]}


def _grid_jobs(table: Any, defaults: Mapping[str, Any], problems: _Problems) -> list[tuple[str, dict, str, frozenset]]:
    """One job per combination of the ``[grid]`` values, in file order (last key fastest), and the keys
    that could not be read (the job is built without them)."""
    if table is None:
        return []
    if not isinstance(table, Mapping) or not table:
        problems.append(f"[grid]: found {table!r}; allowed: a table of key = [values...]")
        return []
    kinds_raw = table.get("kind", [defaults.get("kind")] if defaults.get("kind") else None)
    if kinds_raw is None:
        problems.append("[grid] kind: missing; allowed: kind = \"compare\" (or simulate, fit) here or in [defaults]")
        return []
    kinds_raw = kinds_raw if isinstance(kinds_raw, list) else [kinds_raw]
    before = len(problems)
    kinds = tuple(k for k in (_kind(v, "[grid]", problems) for v in kinds_raw) if k)
    axes = [("kind", list(kinds))]
    for key, values in table.items():
        if key != "kind":
            axes.extend(_grid_axes(key, values, kinds, problems))
    if not kinds:  # already reported
        return []
    # jobs built from the readable axes only (bad: the keys left out) are checked for what they hold
    bad = frozenset(key for key in table if key != "kind") - {key for key, _ in axes} if len(problems) > before else frozenset()
    size = math.prod(len(values) for _, values in axes)
    if size > MAX_GRID_JOBS:
        problems.append(f"[grid]: {size} combinations; allowed: at most {MAX_GRID_JOBS} (split the pipeline)")
        return []
    jobs = []
    for number, combo in enumerate(itertools.product(*(values for _, values in axes)), start=1):
        options: dict[str, Any] = {}
        for (key, _), value in zip(axes[1:], combo[1:], strict=True):
            options = merge(options, {key: value})
        base = {k: v for k, v in _for_kind(defaults, combo[0]).items() if k not in bad}  # not a default in its place
        jobs.append((combo[0], merge(base, options), f"grid #{number}", bad))
    return jobs


def _grid_axes(key: str, values: Any, kinds: tuple[str, ...], problems: _Problems) -> list[tuple[str, list]]:
    """The axes one ``[grid]`` key adds: a list of values, or for a table key one axis per name."""
    if key in ("set", "target") and isinstance(values, Mapping):
        # [grid] set.DIAM = [1, 2, 3]: sweep one name of the table, keep the others.
        return [axis for name, vals in values.items() for axis in _grid_axes(key, _per_name(name, vals), kinds, problems)]
    if not problems.known("[grid]", key, kinds):
        return []
    if not isinstance(values, list) or not values:
        problems.append(f"[grid] {key}: found {values!r}; allowed: a non-empty list of values to sweep")
        return []
    read = [problems.read("[grid]", key, v) for v in values]
    return [(key, read)] if all(v is not None for v in read) else []


def _per_name(name: str, values: Any) -> Any:
    return [{name: v} for v in values] if isinstance(values, list) and values else values


def _explicit_jobs(entries: Any, defaults: Mapping[str, Any], problems: _Problems) -> list[tuple[str, dict, str, frozenset]]:
    """``[[jobs]]``: each entry on top of the defaults its kind accepts, and the keys that could not be
    read (the job is built without them)."""
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        problems.append("jobs: found a value that is not [[jobs]] tables; allowed: [[jobs]] entries (tables)")
        return []
    jobs = []
    for number, entry in enumerate(entries, start=1):
        where = f"[[jobs]] #{number}"
        kind = entry.get("kind", defaults.get("kind"))
        if kind is None:
            problems.append(f"{where} kind: missing; allowed: {', '.join(KINDS)} (here or in [defaults])")
            continue
        if _kind(kind, where, problems) is None:
            continue
        before, options = len(problems), {}
        for key, value in entry.items():
            known = key != "kind" and problems.known(where, key, (kind,))
            if known and (coerced := problems.read(where, key, value)) is not None:
                options[key] = coerced
        bad = frozenset(k for k in entry if k != "kind" and k not in options) if len(problems) > before else frozenset()
        base = {k: v for k, v in _for_kind(defaults, kind).items() if k not in bad}  # not a default in its place
        jobs.append((kind, merge(base, options), f"jobs #{number}", bad))
    return jobs


def _job_spec(kind: str, options: dict[str, Any], label: str, problems: _Problems,
              unread: frozenset[str] = frozenset()) -> JobSpec | None:
    """The job, or None after recording the required keys it lacks (not those given but unreadable:
    ``unread``, already reported)."""
    where = f"[[jobs]] #{label.split('#')[1]}" if label.startswith("jobs") else f"[grid] job {label.split('#')[1]}"
    missing = [key for key in REQUIRED[kind] if key not in options]
    for key in missing:
        if key not in unread:
            problems.append(f"{where} {key}: missing; a {kind} job needs {', '.join(REQUIRED[kind])}")
    return None if missing else JobSpec(kind, tuple(sorted(options.items())), label)


def _resolve_path(key: str, value: str, base: Path) -> tuple[str, str | None]:
    """An absolute path (relative ones are relative to the pipeline file) or a built-in model name,
    and the problem with it (None when it exists)."""
    from itpk.spec import builtin_models

    path = Path(value).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if key == "model":
        if value.endswith(".toml") or "/" in value or path.is_file():
            return str(path), None if path.is_file() else f"found {value!r}: no such model file ({path})"
        names = builtin_models()
        return value, None if value in names else f"found {value!r}; allowed: a built-in model ({', '.join(names)}) or a .toml path"
    if key == "posterior":
        return str(path), None if path.is_dir() else f"found {value!r}: no such run directory ({path})"
    return str(path), None if path.is_file() else f"found {value!r}: no such file ({path})"
