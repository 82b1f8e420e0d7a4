"""Dose metrics: masked MAE (Gy), the OpenKBP dose and DVH scores, and cumulative DVH curves.

The DVH metrics follow the OpenKBP challenge's own evaluation (``provided_code/dose_evaluation_class.py``
of the open-kbp repository, read for reference; this is an independent implementation):

- the voxel volume is the product of the voxel dimensions (mm^3); 0.1 cc = 100 mm^3 holds
  ``max(1, round(100 / voxel_volume))`` voxels;
- on targets (PTV56, PTV63, PTV70): D99, D95 and D1, the doses that 99 %, 95 % and 1 % of the structure
  receive at least, taken as the 1st, 5th and 99th percentiles of the structure's voxel doses;
- on OARs (every other structure): D_0.1cc, the dose to the hottest 0.1 cc, taken as the
  ``100 - 100 * n_0.1cc / n_structure`` percentile of the voxel doses, and the mean dose;
- percentiles use numpy's default linear interpolation between order statistics, as the challenge does;
- a structure with no voxel is left out (the challenge scores only the structures a patient has), and the
  structure masks are the reference ones for both doses;
- the DVH score of a set of patients is the mean absolute difference over every (patient, structure, metric)
  entry pooled together (the challenge's ``nanmean`` over its table), not the mean of per-patient scores.

Our one departure: a structure smaller than 0.1 cc has its D_0.1cc percentile clipped at 0 (the minimum
dose), where the challenge's code would raise. The dose score is the MAE inside the possible-dose mask;
the challenge divides the error summed over the whole grid by the mask's voxel count, which is the same
number because its doses are zero outside the mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import NdarrayOrTensor
from monai.utils import convert_to_numpy

OPENKBP_TARGETS: tuple[str, ...] = ("PTV56", "PTV63", "PTV70")
TARGET_METRICS: tuple[str, ...] = ("D_99", "D_95", "D_1")
OAR_METRICS: tuple[str, ...] = ("D_0.1_cc", "mean")
# Percentile of the voxel doses giving each target metric: D_x is the dose x % of the volume receives.
_TARGET_PERCENTILES = {"D_99": 1.0, "D_95": 5.0, "D_1": 99.0}


def _float_array(x: NdarrayOrTensor, name: str) -> np.ndarray:
    """A float64 numpy copy of ``x``, rejecting NaN and infinities."""
    array = np.asarray(convert_to_numpy(x), dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _bool_array(x: NdarrayOrTensor, name: str) -> np.ndarray:
    """A boolean numpy copy of a 0/1 mask (any non-zero value counts as inside)."""
    array = np.asarray(convert_to_numpy(x))
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return array != 0


def _check_shape(array: np.ndarray, shape: tuple[int, ...], name: str, other: str) -> np.ndarray:
    """Return ``array`` in the shape ``shape``; a leading singleton channel axis on either side is tolerated."""
    if array.shape == shape:
        return array
    if array.shape == (1, *shape) or shape == (1, *array.shape):
        return array.reshape(shape)
    raise ValueError(f"{name} shape {array.shape} differs from {other} shape {shape}")


def masked_mae(pred: NdarrayOrTensor, ref: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> float:
    """Mean absolute error between two dose maps, over the voxels of ``mask`` (all voxels when None).

    Args:
        pred: predicted dose (Gy), any shape, e.g. ``[1, *spatial]``.
        ref: reference dose (Gy), same shape as ``pred``.
        mask: optional region (non-zero inside), same shape, e.g. the possible-dose (body) mask.

    Returns:
        the MAE in Gy.

    Raises:
        ValueError: when shapes differ, a value is NaN/infinite, or the mask selects no voxel.

    Example:
        >>> import numpy as np
        >>> masked_mae(np.array([1.0, 5.0, 9.0]), np.array([2.0, 3.0, 0.0]), mask=np.array([1, 1, 0]))
        1.5
    """
    p = _float_array(pred, "predicted dose")
    r = _check_shape(_float_array(ref, "reference dose"), p.shape, "reference dose", "predicted dose")
    error = np.abs(p - r)
    if mask is None:
        if error.size == 0:
            raise ValueError("the dose maps have no voxel")
        return float(error.mean())
    inside = _check_shape(_bool_array(mask, "mask"), p.shape, "mask", "predicted dose")
    if not inside.any():
        raise ValueError("the mask selects no voxel: the masked MAE is undefined")
    return float(error[inside].mean())


def openkbp_dose_score(pred: NdarrayOrTensor, ref: NdarrayOrTensor, possible_dose_mask: NdarrayOrTensor) -> float:
    """The OpenKBP dose score of one patient: mean absolute dose error (Gy) inside the possible-dose mask.

    Args:
        pred: predicted dose (Gy) on the patient's grid.
        ref: reference dose (Gy), same shape.
        possible_dose_mask: the patient's possible-dose mask, same shape.

    Returns:
        the dose score in Gy.

    Raises:
        ValueError: see :func:`masked_mae`.

    Example:
        >>> import numpy as np
        >>> openkbp_dose_score(np.full((2, 2), 60.0), np.full((2, 2), 62.0), np.ones((2, 2)))
        2.0
    """
    return masked_mae(pred, ref, possible_dose_mask)


def voxels_in_volume(volume_cc: float, voxel_spacing_mm: Sequence[float]) -> int:
    """Number of voxels making up ``volume_cc`` cubic centimetres, at least 1 (the challenge's rounding).

    Args:
        volume_cc: the volume in cc (1 cc = 1000 mm^3).
        voxel_spacing_mm: the voxel dimensions in mm (all axes).

    Returns:
        ``max(1, round(1000 * volume_cc / prod(voxel_spacing_mm)))``.

    Raises:
        ValueError: when a spacing is not a positive finite number or the volume is not positive.

    Example:
        >>> voxels_in_volume(0.1, (3.5, 3.5, 2.0))  # 100 / 24.5 = 4.08 voxels
        4
    """
    spacing = np.asarray(voxel_spacing_mm, dtype=np.float64).reshape(-1)
    if spacing.size == 0 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"voxel spacing must be positive finite numbers (mm), got {spacing.tolist()}")
    if not volume_cc > 0:
        raise ValueError(f"volume must be positive, got {volume_cc} cc")
    return max(1, int(np.round(1000.0 * volume_cc / float(np.prod(spacing)))))


def _structure_masks(structures: Mapping[str, NdarrayOrTensor], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Boolean masks of the non-empty structures, each checked against the dose grid."""
    masks = {}
    for name, mask in structures.items():
        inside = _check_shape(_bool_array(mask, f"structure {name!r}"), shape, f"structure {name!r}", "dose")
        if inside.any():
            masks[name] = inside
    return masks


def dvh_metrics(
    dose: NdarrayOrTensor,
    structures: Mapping[str, NdarrayOrTensor],
    voxel_spacing_mm: Sequence[float],
    targets: Sequence[str] = OPENKBP_TARGETS,
) -> dict[str, dict[str, float]]:
    """The OpenKBP DVH metrics of one dose map: D99/D95/D1 on targets, D_0.1cc and mean dose on OARs.

    Args:
        dose: dose map (Gy) of one patient, e.g. ``[D, H, W]`` or ``[1, D, H, W]``.
        structures: structure name to mask (non-zero inside) on the dose grid; structures may overlap.
        voxel_spacing_mm: voxel dimensions in mm, used for the voxel count of 0.1 cc.
        targets: names of the target structures; every other structure is an OAR.

    Returns:
        ``{structure: {metric: Gy}}`` for each structure with at least one voxel; targets carry
        ``"D_99", "D_95", "D_1"``, OARs ``"D_0.1_cc", "mean"``.

    Raises:
        ValueError: when a mask's shape differs from the dose's, a value is NaN/infinite, or the spacing is bad.

    Example:
        >>> import numpy as np
        >>> dose = np.arange(1.0, 101.0)  # one structure, voxel doses 1..100 Gy
        >>> dvh_metrics(dose, {"PTV70": np.ones(100)}, (1.0, 1.0, 1.0))["PTV70"]["D_99"]
        1.99
    """
    d = _float_array(dose, "dose")
    voxels_01cc = voxels_in_volume(0.1, voxel_spacing_mm)
    target_names = set(targets)
    metrics: dict[str, dict[str, float]] = {}
    for name, inside in _structure_masks(structures, d.shape).items():
        roi_dose = d[inside]
        if name in target_names:
            metrics[name] = {m: float(np.percentile(roi_dose, q)) for m, q in _TARGET_PERCENTILES.items()}
        else:
            hottest_pct = max(0.0, 100.0 - 100.0 * voxels_01cc / roi_dose.size)
            metrics[name] = {"D_0.1_cc": float(np.percentile(roi_dose, hottest_pct)), "mean": float(roi_dose.mean())}
    return metrics


def dvh_errors(
    pred_metrics: Mapping[str, Mapping[str, float]], ref_metrics: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """Absolute differences (Gy) between two sets of DVH metrics, for every metric of the reference.

    Args:
        pred_metrics: :func:`dvh_metrics` of the predicted dose.
        ref_metrics: :func:`dvh_metrics` of the reference dose, with the same structure masks.

    Returns:
        ``{structure: {metric: |pred - ref|}}``.

    Raises:
        ValueError: when the prediction lacks a structure or metric of the reference.

    Example:
        >>> dvh_errors({"Cord": {"mean": 30.0}}, {"Cord": {"mean": 32.5}})
        {'Cord': {'mean': 2.5}}
    """
    errors: dict[str, dict[str, float]] = {}
    for name, ref in ref_metrics.items():
        pred = pred_metrics.get(name, {})
        missing = [m for m in ref if m not in pred]
        if missing:
            raise ValueError(f"the predicted DVH metrics lack {missing} of structure {name!r}")
        errors[name] = {m: abs(float(pred[m]) - float(v)) for m, v in ref.items()}
    return errors


def dvh_score(pred_metrics: Mapping[str, Mapping[str, float]], ref_metrics: Mapping[str, Mapping[str, float]]) -> float:
    """The OpenKBP DVH score of one patient: mean absolute difference over all its DVH metrics.

    Args:
        pred_metrics: :func:`dvh_metrics` of the predicted dose.
        ref_metrics: :func:`dvh_metrics` of the reference dose.

    Returns:
        the score in Gy, NaN when the reference has no structure.

    Raises:
        ValueError: see :func:`dvh_errors`.

    Example:
        >>> dvh_score({"Cord": {"D_0.1_cc": 40.0, "mean": 30.0}}, {"Cord": {"D_0.1_cc": 41.0, "mean": 33.0}})
        2.0
    """
    values = [v for per in dvh_errors(pred_metrics, ref_metrics).values() for v in per.values()]
    return float(np.mean(values)) if values else float("nan")


def evaluate_dose(
    pred: NdarrayOrTensor,
    ref: NdarrayOrTensor,
    possible_dose_mask: NdarrayOrTensor,
    structures: Mapping[str, NdarrayOrTensor],
    voxel_spacing_mm: Sequence[float],
    targets: Sequence[str] = OPENKBP_TARGETS,
) -> dict[str, Any]:
    """All OpenKBP dose metrics of one patient, as a JSON-ready dict.

    Args:
        pred: predicted dose (Gy) on the patient's whole 3D grid.
        ref: reference dose (Gy), same shape.
        possible_dose_mask: the possible-dose mask, same shape.
        structures: reference structure masks by name (used for both doses).
        voxel_spacing_mm: voxel dimensions in mm.
        targets: names of the target structures.

    Returns:
        ``{"dose_score": Gy, "dvh_score": Gy, "dvh": {"reference": ..., "prediction": ..., "abs_error": ...}}``,
        the three DVH entries being ``{structure: {metric: Gy}}``.

    Raises:
        ValueError: on mismatched shapes, non-finite values, an empty possible-dose mask or a bad spacing.

    Example:
        >>> import numpy as np
        >>> ref = np.arange(1.0, 101.0); cord = np.ones(100)
        >>> out = evaluate_dose(ref + 1.0, ref, np.ones(100), {"SpinalCord": cord}, (1.0, 1.0, 1.0))
        >>> out["dose_score"], out["dvh_score"]
        (1.0, 1.0)
    """
    ref_metrics = dvh_metrics(ref, structures, voxel_spacing_mm, targets)
    pred_metrics = dvh_metrics(pred, structures, voxel_spacing_mm, targets)
    return {
        "dose_score": openkbp_dose_score(pred, ref, possible_dose_mask),
        "dvh_score": dvh_score(pred_metrics, ref_metrics),
        "dvh": {
            "reference": ref_metrics,
            "prediction": pred_metrics,
            "abs_error": dvh_errors(pred_metrics, ref_metrics),
        },
    }


def aggregate_dose_results(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Dataset OpenKBP scores from per-patient :func:`evaluate_dose` results, pooled as the challenge does.

    Args:
        cases: per-patient outputs of :func:`evaluate_dose`.

    Returns:
        ``{"dose_score": mean over patients, "dvh_score": mean over all (patient, structure, metric) errors,
        "num_cases": int, "num_dvh_metrics": int}`` (Gy).

    Raises:
        ValueError: when ``cases`` is empty.

    Example:
        >>> a = {"dose_score": 2.0, "dvh": {"abs_error": {"PTV70": {"D_99": 1.0, "D_95": 2.0, "D_1": 3.0}}}}
        >>> b = {"dose_score": 4.0, "dvh": {"abs_error": {"Cord": {"D_0.1_cc": 6.0}}}}
        >>> aggregate_dose_results([a, b])["dvh_score"]  # (1 + 2 + 3 + 6) / 4, not (2 + 6) / 2
        3.0
    """
    if not cases:
        raise ValueError("no case to aggregate")
    errors = [v for c in cases for per in c["dvh"]["abs_error"].values() for v in per.values()]
    return {
        "dose_score": float(np.mean([float(c["dose_score"]) for c in cases])),
        "dvh_score": float(np.mean(errors)) if errors else float("nan"),
        "num_cases": len(cases),
        "num_dvh_metrics": len(errors),
    }


def cumulative_dvh(
    dose: NdarrayOrTensor,
    structures: Mapping[str, NdarrayOrTensor],
    bin_width_gy: float = 0.1,
    max_dose_gy: float | None = None,
) -> dict[str, Any]:
    """Cumulative dose-volume histograms: percent of each structure receiving at least each dose, for plots.

    Args:
        dose: dose map (Gy).
        structures: structure name to mask on the dose grid; empty structures are left out.
        bin_width_gy: spacing of the dose axis.
        max_dose_gy: last dose of the axis; by default the highest dose inside any structure, rounded up to a
            bin. Give the same value for a prediction and its reference to plot them on one axis.

    Returns:
        ``{"dose_gy": array [B] (0, w, 2w, ...), "volume_pct": {structure: array [B]}}``, where
        ``volume_pct[s][i]`` is the percent of the voxels of ``s`` with dose >= ``dose_gy[i]`` (non-increasing,
        100 at 0 Gy). Call ``.tolist()`` on the arrays for JSON.

    Raises:
        ValueError: on a non-positive bin width, mismatched shapes or non-finite values.

    Example:
        >>> import numpy as np
        >>> dvh = cumulative_dvh(np.array([0.0, 1.0, 2.0, 3.0]), {"PTV70": np.ones(4)}, bin_width_gy=1.0)
        >>> dvh["dose_gy"].tolist(), dvh["volume_pct"]["PTV70"].tolist()
        ([0.0, 1.0, 2.0, 3.0], [100.0, 75.0, 50.0, 25.0])
    """
    if not bin_width_gy > 0:
        raise ValueError(f"bin width must be positive, got {bin_width_gy} Gy")
    d = _float_array(dose, "dose")
    masks = _structure_masks(structures, d.shape)
    if max_dose_gy is None:
        max_dose_gy = max((float(d[m].max()) for m in masks.values()), default=0.0)
    num_bins = int(np.ceil(max(max_dose_gy, 0.0) / bin_width_gy - 1e-9)) + 1
    dose_axis = np.arange(num_bins, dtype=np.float64) * bin_width_gy
    volume_pct = {}
    for name, inside in masks.items():
        roi_dose = np.sort(d[inside])
        # voxels with dose >= x: those from the first sorted position where x could be inserted
        at_least = roi_dose.size - np.searchsorted(roi_dose, dose_axis, side="left")
        volume_pct[name] = 100.0 * at_least / roi_dose.size
    return {"dose_gy": dose_axis, "volume_pct": volume_pct}
