"""itpk.jsontext: strict JSON (non-finite numbers as null), at any depth and for numpy scalars."""

from __future__ import annotations

import json
import math

import numpy as np

from itpk.jsontext import dumps, finite_or_none


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], "d": (np.float64("nan"), np.float32(2.0)), "e": "NaN"}
    text = dumps(value)
    assert json.loads(text) == {"a": None, "b": [1.5, None, {"c": None}], "d": [None, 2.0], "e": "NaN"}
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text


def test_finite_values_and_other_types_are_kept():
    assert finite_or_none({"n": 3, "x": 0.25, "s": "text", "b": True, "none": None, "i": np.int64(7)}) == {
        "n": 3, "x": 0.25, "s": "text", "b": True, "none": None, "i": 7}
