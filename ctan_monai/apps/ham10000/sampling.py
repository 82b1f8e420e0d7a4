"""HAM10000 class counts and class balance: the count table, class weights and a weighted sampler."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from ctan_monai.apps.ham10000.validation import HAM10000_CLASSES

logger = logging.getLogger(__name__)

BALANCE_METHODS = ("inverse_frequency", "inverse_sqrt", "none")


def class_counts(datalist: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Number of entries per diagnosis, every class listed (in the order of ``HAM10000_CLASSES``).

    Args:
        datalist: entries with an integer ``dx``.

    Returns:
        class name to count.

    Example:
        >>> class_counts([{"dx": 5}, {"dx": 5}, {"dx": 4}])["nv"]
        2
    """
    counts = np.bincount([int(e["dx"]) for e in datalist], minlength=len(HAM10000_CLASSES))
    return {name: int(n) for name, n in zip(HAM10000_CLASSES, counts)}


def class_count_table(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """A plain-text table of the images per class and split (count and percentage of the split).

    Args:
        splits: split name to datalist.

    Returns:
        the table, one row per class, plus the totals and the number of lesions.

    Example:
        >>> print(class_count_table({"training": [{"dx": 5, "lesion_id": "a"}]}).splitlines()[6])
        nv               1 (100.0%)
    """
    names = list(splits)
    counts = {name: class_counts(entries) for name, entries in splits.items()}
    lines = ["class   " + "".join(f"{name:>18}" for name in names)]
    for cls in HAM10000_CLASSES:
        cells = []
        for name in names:
            total = max(1, len(splits[name]))
            cells.append(f"{counts[name][cls]:>10} ({100 * counts[name][cls] / total:4.1f}%)")
        lines.append(f"{cls:<8}" + "".join(cells))
    lines.append("images  " + "".join(f"{len(splits[n]):>18}" for n in names))
    lines.append("lesions " + "".join(f"{len({e['lesion_id'] for e in splits[n]}):>18}" for n in names))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Class imbalance
# ----------------------------------------------------------------------------------------------------------------


def class_weights(counts: Mapping[str, int] | Sequence[int], method: str = "inverse_frequency") -> torch.Tensor:
    """Per-class weights against class imbalance, e.g. for ``torch.nn.CrossEntropyLoss(weight=...)``.

    ``inverse_frequency`` gives ``1 / n_c``, ``inverse_sqrt`` ``1 / sqrt(n_c)`` (milder), ``none`` ones. The weights
    are scaled so that ``sum_c n_c w_c = sum_c n_c`` (a sample's mean weight is 1, the loss keeps its scale); a
    class without samples gets 0.

    Args:
        counts: samples per class, as a mapping in class order (e.g. from :func:`class_counts`) or a sequence.
        method: one of ``"inverse_frequency"``, ``"inverse_sqrt"``, ``"none"``.

    Returns:
        float32 tensor of one weight per class.

    Raises:
        ValueError: for an unknown method, a negative count, or no sample at all.

    Example:
        >>> [round(w, 4) for w in class_weights([10, 30]).tolist()]
        [2.0, 0.6667]
    """
    if method not in BALANCE_METHODS:
        raise ValueError(f"unknown class balancing method {method!r}; expected one of {BALANCE_METHODS}")
    n = np.asarray(list(counts.values()) if isinstance(counts, Mapping) else list(counts), dtype=np.float64)
    if (n < 0).any() or n.sum() <= 0:
        raise ValueError(f"class counts must be non-negative with at least one sample, got {n.tolist()}")
    present = n > 0
    raw = np.zeros_like(n)
    power = {"inverse_frequency": 1.0, "inverse_sqrt": 0.5, "none": 0.0}[method]
    raw[present] = n[present] ** -power
    weights = raw * n.sum() / (raw * n).sum()
    return torch.as_tensor(weights, dtype=torch.float32)


def weighted_sampler(
    datalist: Sequence[Mapping[str, Any]],
    method: str = "inverse_frequency",
    num_samples: int | None = None,
    seed: int | None = None,
) -> WeightedRandomSampler | None:
    """A ``WeightedRandomSampler`` that draws the classes more evenly, or None when switched off.

    Each sample is drawn with the weight of its class (:func:`class_weights`), with replacement. Use it as the
    ``sampler`` of the training ``DataLoader`` with ``shuffle=False``; with ``method="none"`` it returns None, so
    the same config can say ``shuffle: "$@sampler is None"``.

    Args:
        datalist: the training entries (integer ``dx``).
        method: one of ``"inverse_frequency"``, ``"inverse_sqrt"``, ``"none"`` (no sampler).
        num_samples: draws per epoch; default ``len(datalist)``.
        seed: seed of the sampler's generator (reproducible draws); None uses torch's global generator.

    Returns:
        the sampler, or None for ``method="none"``.

    Raises:
        ValueError: for an unknown method or an empty datalist.

    Example:
        >>> sampler = weighted_sampler([{"dx": 5}] * 9 + [{"dx": 4}], seed=0)
        >>> len(list(sampler))
        10
    """
    if method not in BALANCE_METHODS:
        raise ValueError(f"unknown class balancing method {method!r}; expected one of {BALANCE_METHODS}")
    if method == "none":
        return None
    if not datalist:
        raise ValueError("cannot build a weighted sampler for an empty datalist")
    per_class = class_weights(class_counts(datalist), method)
    weights = per_class[torch.as_tensor([int(e["dx"]) for e in datalist])]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return WeightedRandomSampler(weights.double(), num_samples or len(datalist), replacement=True, generator=generator)
