"""Strict JSON text for files and stdout: non-finite numbers become ``null``.

Python's ``json`` writes NaN and Infinity by default, which other JSON readers (JavaScript's
``JSON.parse``, jq, R's jsonlite in strict mode) reject. A metric that cannot be computed is
``null`` here, and the human-readable output says why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf), at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return finite_or_none(value.item())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` with non-finite numbers as ``null`` (strict JSON: ``allow_nan=False``)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
