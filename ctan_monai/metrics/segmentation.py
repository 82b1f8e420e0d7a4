"""Dice (%) per structure and mean over structures, background excluded, on whole 2D images or 3D patients.

Conventions (ours, fixed here so that every report reads the same way):

- background (label 0, or channel 0 of a one-hot map) is never scored;
- a structure absent from both the prediction and the reference scores NaN (nothing to delineate:
  the Dice is undefined, and counting it as 100 would inflate the mean on slices or patients where
  the structure does not appear); absent from only one of them it scores 0;
- a structure that is not annotated for the case (``class_present`` 0, e.g. an OpenKBP patient without
  that structure's file) scores NaN, whatever the prediction, because there is no reference to compare with;
- NaN entries are left out of every mean; a mean with nothing left is NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.metrics import compute_dice
from monai.utils import convert_to_numpy, convert_to_tensor


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of the finite entries; NaN (without numpy's empty-slice warning) when there is none."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[~np.isnan(array)]
    return float(finite.mean()) if finite.size else float("nan")


def _as_class_channels(x: NdarrayOrTensor, num_classes: int, one_hot: bool, name: str) -> torch.Tensor:
    """Flatten a label map or a one-hot map to MONAI's ``[1, C', N]`` layout (C' = 1 for label maps).

    Dice does not depend on where voxels are, so flattening the spatial axes lets the same code serve
    2D slices and 3D patients, with or without a leading channel axis.
    """
    t = convert_to_tensor(x, track_meta=False)
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    if one_hot:
        if t.ndim < 2 or t.shape[0] != num_classes:
            raise ValueError(
                f"{name}: a one-hot map must be [C, *spatial] with C = num_classes = {num_classes}, "
                f"got shape {tuple(t.shape)}"
            )
        if not torch.all((t == 0) | (t == 1)):
            raise ValueError(f"{name}: a one-hot map must hold 0/1 values only; take the argmax or threshold first")
        return t.reshape(1, num_classes, -1).float()
    if t.is_floating_point() and not torch.all(t == torch.round(t)):
        raise ValueError(f"{name}: a label map must hold integer labels; got non-integer values (pass one_hot=True?)")
    labels = t.reshape(1, 1, -1).long()
    bad = torch.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.numel():
        raise ValueError(f"{name}: labels {bad.tolist()} outside 0..{num_classes - 1} (num_classes={num_classes})")
    return labels


def dice_per_structure(
    pred: NdarrayOrTensor,
    ref: NdarrayOrTensor,
    num_classes: int,
    one_hot: bool = False,
    class_present: NdarrayOrTensor | Sequence[float] | None = None,
) -> np.ndarray:
    """Dice (%) of each foreground structure of one case (a 2D image or a whole 3D patient).

    Args:
        pred: predicted segmentation: an integer label map ``[*spatial]`` or ``[1, *spatial]``, or with
            ``one_hot=True`` a 0/1 map ``[num_classes, *spatial]``.
        ref: reference segmentation in the same form and shape as ``pred`` (label maps may differ by a
            leading channel axis).
        num_classes: number of classes, background included.
        one_hot: whether ``pred`` and ``ref`` are one-hot maps rather than label maps.
        class_present: optional 0/1 per class ``[num_classes]`` (background first): 0 marks a structure
            that is not annotated for this case; it scores NaN.

    Returns:
        float64 array ``[num_classes - 1]``: Dice in percent per foreground structure, NaN where undefined
        (absent from both maps, or not annotated).

    Raises:
        ValueError: when the shapes differ, labels fall outside ``0..num_classes-1``, a one-hot map is not 0/1,
            or ``class_present`` is malformed.

    Example:
        >>> import numpy as np
        >>> ref = np.array([[0, 1, 1], [2, 2, 0]])
        >>> pred = np.array([[3, 1, 1], [2, 0, 0]])  # background wrong, structure 3 a false positive
        >>> dice_per_structure(pred, ref, num_classes=4).round(2).tolist()
        [100.0, 66.67, 0.0]
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    p_shape, r_shape = tuple(np.shape(pred)), tuple(np.shape(ref))
    # label maps may differ by a leading channel axis only ([1, *spatial] against [*spatial])
    same_voxels = not one_hot and (p_shape == (1, *r_shape) or r_shape == (1, *p_shape))
    if p_shape != r_shape and not same_voxels:
        raise ValueError(f"prediction shape {p_shape} differs from reference shape {r_shape}")
    y_pred = _as_class_channels(pred, num_classes, one_hot, "prediction")
    y = _as_class_channels(ref, num_classes, one_hot, "reference")
    # ignore_empty=False scores "absent from the reference, predicted anyway" as 0; the both-empty
    # case (which MONAI scores 1) is set to NaN below.
    dice = compute_dice(y_pred, y, include_background=False, ignore_empty=False, num_classes=num_classes)
    dice = convert_to_numpy(dice, dtype=np.float64)[0] * 100.0
    if one_hot:
        in_pred = convert_to_numpy(y_pred[0, 1:].sum(dim=-1) > 0)
        in_ref = convert_to_numpy(y[0, 1:].sum(dim=-1) > 0)
    else:
        classes = np.arange(1, num_classes)
        in_pred = np.isin(classes, convert_to_numpy(torch.unique(y_pred)))
        in_ref = np.isin(classes, convert_to_numpy(torch.unique(y)))
    dice[~in_pred & ~in_ref] = np.nan
    if class_present is not None:
        present = np.asarray(convert_to_numpy(class_present), dtype=np.float64).reshape(-1)
        if present.shape != (num_classes,) or not np.all((present == 0) | (present == 1)):
            raise ValueError(
                f"class_present must be 0/1 values of length num_classes={num_classes} (background first), "
                f"got {present.tolist()}"
            )
        dice[present[1:] == 0] = np.nan
    return dice


def mean_dice(per_structure: NdarrayOrTensor | Sequence[float]) -> float:
    """Mean Dice over structures, NaN (undefined) entries left out.

    Args:
        per_structure: Dice values, e.g. the output of :func:`dice_per_structure`.

    Returns:
        the mean of the defined values, or NaN when none is defined.

    Example:
        >>> mean_dice([80.0, float("nan"), 60.0])
        70.0
    """
    return _nanmean(np.asarray(convert_to_numpy(per_structure), dtype=np.float64).reshape(-1))


def dice_report(
    pred: NdarrayOrTensor,
    ref: NdarrayOrTensor,
    structure_names: Sequence[str],
    one_hot: bool = False,
    class_present: NdarrayOrTensor | Sequence[float] | None = None,
) -> dict[str, Any]:
    """Dice (%) of one case per named structure and their mean, as a JSON-ready dict.

    Args:
        pred: predicted segmentation (see :func:`dice_per_structure`).
        ref: reference segmentation.
        structure_names: names of the foreground classes, in label order (label 1 first); the number of
            classes is ``len(structure_names) + 1``.
        one_hot: whether the maps are one-hot ``[C, *spatial]``.
        class_present: optional 0/1 per class, background first.

    Returns:
        ``{"dice": {name: percent or NaN}, "mean_dice": percent or NaN}``.

    Raises:
        ValueError: on malformed input (see :func:`dice_per_structure`) or repeated structure names.

    Example:
        >>> import numpy as np
        >>> dice_report(np.array([0, 1, 2]), np.array([1, 1, 2]), ["Bladder", "Rectum"])["dice"]["Rectum"]
        100.0
    """
    names = list(structure_names)
    if len(set(names)) != len(names):
        raise ValueError(f"structure names must be unique, got {names}")
    dice = dice_per_structure(pred, ref, len(names) + 1, one_hot=one_hot, class_present=class_present)
    return {"dice": {n: float(d) for n, d in zip(names, dice)}, "mean_dice": mean_dice(dice)}


def aggregate_dice(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine per-case :func:`dice_report` results into dataset figures.

    Each structure's Dice is averaged over the cases where it is defined; the dataset mean Dice is the mean
    of those per-structure averages, so every structure weighs the same whatever its number of cases.

    Args:
        reports: per-case outputs of :func:`dice_report` (same structure names in each).

    Returns:
        ``{"dice": {name: mean percent}, "mean_dice": percent, "num_cases": {name: cases with a defined Dice}}``.

    Raises:
        ValueError: when ``reports`` is empty or the cases name different structures.

    Example:
        >>> a = {"dice": {"Rectum": 80.0, "Bladder": float("nan")}, "mean_dice": 80.0}
        >>> b = {"dice": {"Rectum": 60.0, "Bladder": 90.0}, "mean_dice": 75.0}
        >>> aggregate_dice([a, b])["dice"]
        {'Rectum': 70.0, 'Bladder': 90.0}
    """
    if not reports:
        raise ValueError("no case to aggregate")
    names = list(reports[0]["dice"])
    for i, report in enumerate(reports):
        if list(report["dice"]) != names:
            raise ValueError(f"case {i} names structures {list(report['dice'])}, case 0 names {names}")
    per_name = {n: np.array([float(r["dice"][n]) for r in reports]) for n in names}
    dice = {n: _nanmean(v) for n, v in per_name.items()}
    return {
        "dice": dice,
        "mean_dice": _nanmean(list(dice.values())),
        "num_cases": {n: int(np.sum(~np.isnan(v))) for n, v in per_name.items()},
    }
