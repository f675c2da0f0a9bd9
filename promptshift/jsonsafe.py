"""The one rule for numbers in promptshift's JSON files (summary.json, provenance.json, the
store's attributes): finite numbers as JSON numbers, everything that is not a finite number
(NaN, ±inf, a missing value) as ``null``, numpy scalars as Python ones. JSON has no NaN;
Python's default writer would emit the invalid token ``NaN``, which other readers reject.
"""

from __future__ import annotations

import json
import math
from numbers import Integral, Real
from typing import Any


def number(x: Any) -> int | float | bool | None:
    """JSON value of one number: bools stay bools, integers ints, finite reals floats; NaN,
    ±inf, None and values that are not numbers (``pd.NA``, text) become None (null)."""
    if x is None:
        return None
    if isinstance(x, bool) or (getattr(x, "dtype", None) is not None and x.dtype.kind == "b"):
        return bool(x)
    if isinstance(x, Integral):
        return int(x)
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def is_number(x: Any) -> bool:
    """True for a finite real number that is not a bool (what `number` keeps as a float or int)."""
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def clean(obj: Any) -> Any:
    """A JSON-safe copy of nested dicts, lists and tuples: every number through `number`,
    keys as text, anything else (text, bools, None) as it is."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (str, bytes)) or obj is None:
        return obj
    if isinstance(obj, Real):
        return number(obj)
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # numpy scalars (np.bool_ is no Real)
        return number(obj.item())
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """``json.dumps`` of ``clean(obj)``, refusing NaN (``allow_nan=False``) so a number that
    escaped the rule is an error, not an invalid file."""
    return json.dumps(clean(obj), indent=indent, allow_nan=False,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))


__all__ = ["clean", "dumps", "is_number", "number"]
