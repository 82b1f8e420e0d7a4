"""Relative performance of a multi-task model against single-task learning (paper Eq. 3).

``Delta_task = 100 * (-1)^l * (M_stl - M_mtl) / M_stl`` with ``l = 1`` when the metric is higher-is-better
and ``l = 0`` otherwise, so that a positive Delta always means the multi-task model beats STL; ``Delta_mean``
is the plain mean over tasks. These reproduce the paper's Table 2 (e.g. OpenKBP CTAN: Dice 71.59 vs 71.29
gives +0.42 %).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

# Direction of the metrics this package reports (True: higher is better).
HIGHER_IS_BETTER: dict[str, bool] = {
    "dice": True,
    "mean_dice": True,
    "accuracy": True,
    "balanced_accuracy": True,
    "auc": True,
    "mae": False,
    "dose_score": False,
    "dvh_score": False,
}


def delta_task(m_mtl: float, m_stl: float, higher_is_better: bool) -> float:
    """Relative difference (%) of a multi-task model's metric to the STL baseline's (paper Eq. 3).

    Args:
        m_mtl: the multi-task model's metric value.
        m_stl: the single-task baseline's metric value (the denominator).
        higher_is_better: the metric's direction (Dice, accuracy, AUC: True; MAE in Gy: False).

    Returns:
        Delta in percent, positive when the multi-task model is better; NaN when either value is NaN
        (an undefined metric, e.g. an AUC on one class, stays visibly undefined).

    Raises:
        ValueError: when ``m_stl`` is 0 or infinite (the relative difference is undefined).

    Example:
        >>> round(delta_task(71.59, 71.29, higher_is_better=True), 2)
        0.42
        >>> round(delta_task(0.51, 0.53, higher_is_better=False), 2)
        3.77
    """
    m_mtl, m_stl = float(m_mtl), float(m_stl)
    if math.isnan(m_mtl) or math.isnan(m_stl):
        return float("nan")
    if m_stl == 0 or math.isinf(m_stl):
        raise ValueError(f"the STL metric is {m_stl}: the relative difference to it is undefined")
    sign = -1.0 if higher_is_better else 1.0  # (-1)^l
    return 100.0 * sign * (m_stl - m_mtl) / m_stl


def delta_mean(deltas: Iterable[float] | Mapping[str, float]) -> float:
    """Mean of per-task Deltas (paper: the average relative difference over the tasks).

    Args:
        deltas: per-task Delta values (%), or a mapping task name to Delta.

    Returns:
        the mean in percent; NaN when any task's Delta is NaN (no task is silently dropped).

    Raises:
        ValueError: when there is no Delta.

    Example:
        >>> delta_mean({"seg": 0.42, "dose": 3.56})
        1.99
    """
    values = [float(v) for v in (deltas.values() if isinstance(deltas, Mapping) else deltas)]
    if not values:
        raise ValueError("delta_mean needs at least one task")
    return math.fsum(values) / len(values)


def relative_performance(
    mtl: Mapping[str, float], stl: Mapping[str, float], higher_is_better: Mapping[str, bool]
) -> dict[str, Any]:
    """Per-task Delta and Delta_mean of a multi-task model against STL, as a JSON-ready dict.

    Args:
        mtl: task name to the multi-task model's metric.
        stl: task name to the STL baseline's metric (same tasks).
        higher_is_better: task name to the metric's direction.

    Returns:
        ``{"delta": {task: %}, "delta_mean": %}``.

    Raises:
        ValueError: when the three mappings do not name the same tasks, or an STL metric is 0.

    Example:
        >>> out = relative_performance({"seg": 71.59, "dose": 0.51}, {"seg": 71.29, "dose": 0.53},
        ...                            {"seg": True, "dose": False})
        >>> round(out["delta"]["seg"], 2), round(out["delta_mean"], 2)
        (0.42, 2.1)
    """
    tasks = list(mtl)
    if set(tasks) != set(stl) or set(tasks) != set(higher_is_better):
        raise ValueError(
            f"the MTL metrics ({sorted(mtl)}), STL metrics ({sorted(stl)}) and directions "
            f"({sorted(higher_is_better)}) must name the same tasks"
        )
    deltas = {t: delta_task(mtl[t], stl[t], bool(higher_is_better[t])) for t in tasks}
    return {"delta": deltas, "delta_mean": delta_mean(deltas)}
