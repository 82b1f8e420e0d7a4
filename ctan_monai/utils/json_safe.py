"""Reports as strict JSON: NaN and infinities become null, numpy scalars become Python numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["json_safe"]


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps`` writes as strict JSON (an undefined metric stays visibly undefined).

    Args:
        obj: nested mappings, lists and tuples of numbers, strings, numpy scalars.

    Returns:
        the same structure with NaN and infinities as None (``json.dumps`` would write the non-standard ``NaN`` and
        ``Infinity``), numpy floats and integers as Python ones, mapping keys as strings.

    Example:
        >>> json_safe({"dice": np.float32(0.5), "auc": float("nan"), "hd": float("inf"), 1: [np.int64(3)]})
        {'dice': 0.5, 'auc': None, 'hd': None, '1': [3]}
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
