"""Reports as strict JSON: NaN becomes null, numpy scalars become Python numbers."""

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
        the same structure with NaN as None, numpy floats and integers as Python ones, mapping keys as strings.

    Example:
        >>> json_safe({"dice": np.float32(0.5), "auc": float("nan"), 1: [np.int64(3)]})
        {'dice': 0.5, 'auc': None, '1': [3]}
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
