"""What a batch job may set: the CLI's long option names (``-`` as ``_``), their types and kinds.

Each option has a coercer that turns a TOML value into one canonical,
JSON-ready value, so ``dose = 10`` and ``dose = 10.0`` (or ``routes = "it,iv"``
and ``routes = ["it", "iv"]``) give the same job and the same hash. A coercer
raises :class:`Invalid` with the allowed form; the pipeline reader turns that
into one line of its aggregated message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("compare", "simulate", "fit")


class Invalid(ValueError):
    """A value has the wrong form; ``str(exc)`` says what is allowed."""


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Invalid("a finite number")
    return float(value)


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("a whole number")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("a non-empty string")
    return value.strip()


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("true or false")
    return value


def _items(value: Any, allowed: str) -> list[Any]:
    """A TOML list, or a comma-separated string as the CLI takes it."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise Invalid(allowed)
    return value


def _text_list(value: Any) -> tuple[str, ...]:
    allowed = 'a non-empty list of names or a comma-separated string (e.g. ["it", "iv"] or "it,iv")'
    items = _items(value, allowed)
    if not all(isinstance(v, str) and v.strip() for v in items):
        raise Invalid(allowed)
    return tuple(v.strip() for v in items)


def _number_list(value: Any) -> tuple[float, ...]:
    allowed = "a number or a non-empty list of numbers (e.g. [0, 0.5, 1] or \"0,0.5,1\")"
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    items = _items(value, allowed)
    try:
        return tuple(_number(float(v) if isinstance(v, str) else v) for v in items)
    except (Invalid, ValueError):
        raise Invalid(allowed) from None


def _pairs(value: Any, convert: Callable[[Any], Any], example: str) -> tuple[tuple[str, Any], ...]:
    """A table ``{NAME = VALUE}`` or the CLI's list of ``"NAME=VALUE"`` strings, sorted by name."""
    allowed = f"a table such as {{{example.replace('=', ' = ')}}} or a list of \"{example}\" strings"
    if isinstance(value, list):
        table = {}
        for item in value:
            name, sep, text = item.partition("=") if isinstance(item, str) else ("", "", "")
            if not sep or not name.strip():
                raise Invalid(allowed)
            table[name.strip()] = text.strip()
        value = table
    if not isinstance(value, Mapping) or not value:
        raise Invalid(allowed)
    try:
        return tuple(sorted((str(k), convert(v)) for k, v in value.items()))
    except (Invalid, ValueError):
        raise Invalid(allowed) from None


def _number_table(value: Any) -> tuple[tuple[str, float], ...]:
    return _pairs(value, lambda v: _number(float(v) if isinstance(v, str) else v), "NAME=NUMBER")


def _text_table(value: Any) -> tuple[tuple[str, str], ...]:
    return _pairs(value, _text, "OUTPUT=MODEL")


@dataclass(frozen=True)
class Option:
    """One pipeline key: how to read it and what it means (for messages)."""

    name: str
    coerce: Callable[[Any], Any]
    allowed: str

    def read(self, value: Any) -> Any:
        """The canonical value, or :class:`Invalid` naming the allowed form."""
        try:
            return self.coerce(value)
        except Invalid as exc:
            raise Invalid(f"{self.allowed or exc}") from None


def _option(name: str, coerce: Callable[[Any], Any], allowed: str = "") -> Option:
    return Option(name, coerce, allowed)


OPTIONS: dict[str, Option] = {o.name: o for o in (
    _option("model", _text, "a built-in model name or a path to a .toml file"),
    _option("data", _text, "a path to a dataset CSV"),
    _option("posterior", _text, "a path to a run directory written by itpk fit"),
    _option("route", _text, "a route name (it, ia, iv, sc, po)"),
    _option("routes", _text_list),
    _option("cmt", _text, "a site of the route (e.g. lesion2)"),
    _option("regimen", _text, "a named regimen (tvec)"),
    _option("method", _text, "nuts, pymc, laplace, map or advi"),
    _option("target_accept", _number, "a NUTS target acceptance rate in [0.5, 1)"),
    _option("mass_matrix", _text, "auto, diag or low-rank"),
    _option("iiv", _text, "auto, centred or non-centred"),
    _option("precondition", _text, "auto, mode or none"),
    _option("dose", _number), _option("diam", _number), _option("every", _number), _option("infusion", _number),
    _option("horizon", _number), _option("step", _number),
    _option("doses", _whole), _option("subjects", _whole), _option("seed", _whole), _option("draws", _whole),
    _option("tune", _whole), _option("chains", _whole),
    _option("at", _number_list), _option("threshold", _number_list),
    _option("set", _number_table), _option("target", _number_table),
    _option("error", _text_table),
    _option("plot", _flag),
)}

# Options per kind: those of the matching CLI command, minus the ones batch owns (--out, --json,
# --quiet: outputs go to the job directory) and --cores (a job gets one core: N workers use N cores).
KIND_OPTIONS: dict[str, frozenset[str]] = {
    "compare": frozenset({"model", "dose", "routes", "cmt", "regimen", "diam", "every", "doses", "infusion", "set", "target",
                          "threshold", "horizon", "posterior", "plot"}),
    "simulate": frozenset({"model", "route", "cmt", "dose", "regimen", "diam", "every", "doses", "infusion", "horizon", "step",
                           "at", "set", "subjects", "seed", "plot"}),
    "fit": frozenset({"data", "model", "method", "draws", "tune", "chains", "seed", "error", "target_accept", "mass_matrix", "iiv",
                      "precondition"}),
}
REQUIRED: dict[str, tuple[str, ...]] = {"compare": ("model",), "simulate": ("model",), "fit": ("data", "model")}
TABLES = frozenset({"set", "target", "error"})  # merged key by key when defaults and a job both give them
PATHS = frozenset({"model", "data", "posterior"})  # resolved relative to the pipeline file


def allowed_keys(kind: str) -> str:
    """The keys a job of ``kind`` accepts, for messages."""
    return ", ".join(["kind", *sorted(KIND_OPTIONS[kind])])


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; tables (``set``, ``target``, ``error``) merge name by name."""
    out = dict(base)
    for key, value in over.items():
        if key in TABLES and key in out:
            out[key] = tuple(sorted({**dict(out[key]), **dict(value)}.items()))
        else:
            out[key] = value
    return out


def display(value: Any) -> Any:
    """A canonical value as a user reads it in ``batch.json``: tables as objects, tuples as lists."""
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return {k: v for k, v in value}
    if isinstance(value, tuple):
        return list(value)
    return value
