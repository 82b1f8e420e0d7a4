"""Timing primitives: interleaved round-robin orders, paired ratios, synchronised timing."""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


# ------------------------------------------------------------------------------------------------ timing primitives
def round_robin_orders(archs: Sequence[str], repeats: int) -> list[list[str]]:
    """The order of the architectures in each repeat: every one once, the start moving one further each time.

    Args:
        archs: the architectures.
        repeats: number of repeats.

    Returns:
        one list per repeat.

    Example:
        >>> round_robin_orders(["hps", "mtan", "ctan"], 4)
        [['hps', 'mtan', 'ctan'], ['mtan', 'ctan', 'hps'], ['ctan', 'hps', 'mtan'], ['hps', 'mtan', 'ctan']]
    """
    n = len(archs)
    return [[archs[(r + k) % n] for k in range(n)] for r in range(repeats)] if n else []


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median of the per-repeat ratios ``times[r] / reference[r]`` (both measured in the same round-robin repeat,
    so a load change between repeats cancels).

    Args:
        times: one architecture's times.
        reference: the reference architecture's times, same length.

    Returns:
        the median ratio.

    Raises:
        ValueError: for empty or unequal sequences or a non-positive reference time.

    Example:
        >>> paired_ratio([2.0, 3.0, 10.0], [1.0, 2.0, 4.0])
        2.0
    """
    if not times or len(times) != len(reference):
        raise ValueError(f"need two equally long, non-empty series, got {len(times)} and {len(reference)}")
    if min(reference) <= 0:
        raise ValueError("reference times must be positive")
    return statistics.median(t / r for t, r in zip(times, reference))


def _summary(times: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(times)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "q1": quartiles[0],
        "q3": quartiles[2],
        "times": list(times),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)
