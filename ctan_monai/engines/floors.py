"""Trivial floors from the training split, for the whole-volume evaluation: what a model must beat to have learnt
anything about the patient in front of it.

- **Dose floor (mean map)**: the voxel-wise mean of the training patients' dose maps. Scored like a prediction: times
  the evaluated case's possible-dose mask (OpenKBP's own "mean dose" baseline).
- **Segmentation floor (probabilistic atlas)**: per voxel and structure, the share of the training patients that
  have the structure there, counting only the patients that annotate it (``label_class_present``). The floor label
  map is the structure with a share of at least 0.5 at that voxel, else background; if two structures reach 0.5
  (possible only when they are annotated on different patients), the larger share wins, ties to the lower label.

Both come from the training entries only, are computed once on first use and kept in memory as running sums (never
a stack of patients: OpenKBP's 40 training patients of 128^3 need about 100 MB while the floor is being built).

Where the volumes live (``alignment``):

- ``"grid"`` (OpenKBP): every training and evaluated volume shares one grid (OpenKBP's fixed 128^3 grid around the
  patient); the floor is computed voxel by voxel on it, with no resampling. A volume of another shape is an error.
- ``"centroid"`` (prostate, where CTs differ in shape and spacing): every volume is placed in patient millimetres
  with its origin at the centroid of its possible-dose mask (the body where the dose grid is; the body from the CT,
  image > ``body_threshold``, for a case without a dose mask; the grid's centre for an empty image). Training volumes
  are resampled (dose: linear; label map: nearest) onto one reference grid in those coordinates, whose spacing is
  the per-axis median of the training spacings (coarsened evenly when the grid would exceed ``max_reference_voxels``)
  and whose extent covers every training volume. A reference voxel only averages the patients whose field of view
  covers it. For an evaluated case, the mean dose and the structure shares are resampled linearly back onto the
  case's grid, aligned at the case's own centroid, and the share threshold is applied there; outside the reference
  grid the floor is 0 Gy and background. Training volumes are read through the evaluation's own ``loader`` (e.g. the
  validation dataset's transform), so they are on the same kind of grid (orientation, in-plane size) as the cases.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ctan_monai.data.slices import load_case

__all__ = ["ALIGNMENTS", "FloorLoader", "VolumeFloor", "anchor_mm"]

logger = logging.getLogger("ctan_monai.floors")

ALIGNMENTS = ("grid", "centroid")
# manifest entry -> a case in the batch convention of ``load_case`` (volumes ``[1, *spatial]``), plus ``spacing`` (mm)
FloorLoader = Callable[[Mapping[str, Any]], Mapping[str, Any]]
_FREQUENCY_THRESHOLD = 0.5
_EDGE = 1e-6  # tolerance, in voxels, of the field-of-view test at a grid's edge


def _numpy(value: Any) -> np.ndarray:
    """A numpy copy of a tensor or array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _volume(value: Any, name: str) -> np.ndarray:
    """A 3D numpy volume from ``[*spatial]`` or ``[1, *spatial]``."""
    array = _numpy(value)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 3D volume [D0, D1, D2] or [1, D0, D1, D2], got shape {array.shape}")
    return array


def _flag(value: Any) -> bool:
    """A ``<task>_present`` flag (tensor, number or bool) as a bool."""
    return bool(np.asarray(_numpy(value)).reshape(-1)[0]) if value is not None else False


def _spacing(value: Any) -> tuple[float, float, float]:
    """Three positive spacings (mm) from a list, array or tensor; (1, 1, 1) when None."""
    if value is None:
        return (1.0, 1.0, 1.0)
    spacing = np.asarray(_numpy(value) if not isinstance(value, (list, tuple)) else [float(v) for v in value])
    spacing = spacing.astype(np.float64).reshape(-1)
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive finite numbers (mm), got {spacing.tolist()}")
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def anchor_mm(
    shape: Sequence[int],
    spacing: Sequence[float],
    dose_mask: np.ndarray | None = None,
    image: np.ndarray | None = None,
    body_threshold: float = 0.15,
) -> np.ndarray:
    """The alignment anchor of a volume in mm from its first voxel's centre: the centroid of the possible-dose mask,
    else of the body (``image > body_threshold``), else the grid's centre.

    Args:
        shape: the volume's grid.
        spacing: voxel size (mm) per axis.
        dose_mask: the possible-dose mask (non-zero inside), or None.
        image: the image on the bundle's intensity scale, or None.
        body_threshold: image value above which a voxel is body.

    Returns:
        float64 ``[3]`` (mm).

    Example:
        >>> mask = np.zeros((4, 4, 4)); mask[2:4, 0:2, 1] = 1
        >>> anchor_mm(mask.shape, (2.0, 1.0, 3.0), mask).tolist()
        [5.0, 0.5, 3.0]
    """
    size = np.asarray(spacing, dtype=np.float64)
    for region in (dose_mask, None if image is None else image > body_threshold):
        if region is not None and np.any(region):
            return np.array([float(i.mean()) for i in np.nonzero(region)]) * size
    return (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * size


def _add(total: np.ndarray | float, value: np.ndarray | float) -> np.ndarray | float:
    """``total + value``, in place once ``total`` is an array (running sums without a new array per patient)."""
    if isinstance(total, np.ndarray):
        total += value
        return total
    return np.array(value, copy=True) + total if isinstance(value, np.ndarray) else total + value


@dataclass
class _Layout:
    """A training volume's place in the anchored coordinates: shape, spacing (mm) and anchor (mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    anchor: np.ndarray


@dataclass
class _Reference:
    """The reference grid of the centroid alignment: voxel ``j`` is at ``origin + j * spacing`` mm from the anchor."""

    shape: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray


class VolumeFloor:
    """The trivial floors of a whole-volume evaluation, from training manifest entries: the mean training dose map
    and the probabilistic-atlas label map (see the module docstring for the definitions and the alignments).

    Nothing is read at construction: the floor is computed on first use (:meth:`build`, :meth:`predict`) and cached.

    Args:
        entries: the training manifest entries (``image``, ``label``, ``dose``, ``dose_mask``,
            ``label_class_present``, optionally ``spacing``); never the evaluated split.
        seg_task: the segmentation task's name (batch key of the loaded cases).
        dose_task: the dose task's name.
        num_classes: segmentation classes, background included; default: the length of ``label_class_present``.
        loader: reads one entry as a case in the batch convention (e.g. the validation dataset's transform, so that
            training volumes are on the evaluation's grid); default: ``load_case`` with the entry's ``spacing``.
        alignment: ``"grid"`` (all volumes on one grid) or ``"centroid"`` (anchored at the possible-dose mask's
            centroid, resampled).
        reference_spacing: spacing (mm) of the centroid alignment's reference grid; default: the per-axis median of
            the training spacings.
        max_reference_voxels: cap on the reference grid's size (centroid alignment); its spacing is coarsened evenly
            to stay under it.
        body_threshold: image value above which a voxel is body, for the anchor of a case without a dose mask.

    Raises:
        ValueError: for an unknown alignment, no entry, or a non-positive cap.

    Example:
        >>> floor = VolumeFloor(splits["train-pats"], num_classes=5)  # doctest: +SKIP
        >>> dose, labels = floor.predict((128, 128, 128))  # doctest: +SKIP
        >>> floor.describe()["num_training_patients"]  # doctest: +SKIP
        40
    """

    def __init__(
        self,
        entries: Sequence[Mapping[str, Any]],
        seg_task: str = "seg",
        dose_task: str = "dose",
        num_classes: int | None = None,
        loader: FloorLoader | None = None,
        alignment: str = "grid",
        reference_spacing: Sequence[float] | None = None,
        max_reference_voxels: int = 128**3,
        body_threshold: float = 0.15,
    ) -> None:
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if not entries:
            raise ValueError("the floor needs at least one training entry")
        if max_reference_voxels < 1:
            raise ValueError(f"max_reference_voxels must be positive, got {max_reference_voxels}")
        self.entries = [dict(e) for e in entries]
        self.seg_task, self.dose_task = seg_task, dose_task
        self.num_classes = num_classes
        self.loader = loader
        self.alignment = alignment
        self.reference_spacing = None if reference_spacing is None else _spacing(reference_spacing)
        self.max_reference_voxels = int(max_reference_voxels)
        self.body_threshold = float(body_threshold)
        self.training_case_ids = [str(e.get("case_id", e.get("image"))) for e in self.entries]
        self._built = False
        self._mean_dose: np.ndarray | None = None
        self._frequency: np.ndarray | None = None
        self._label_map: np.ndarray | None = None
        self._reference: _Reference | None = None
        self.num_dose_patients = 0
        self.num_label_patients = 0
        self.annotated_patients: list[int] = []

    # --- reading -------------------------------------------------------------------------------------------------

    def _load(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """One training case as numpy: ``dose`` / ``labels`` (None when absent), ``mask``, ``image``, ``present``
        (per-class 0/1, background first), ``spacing``."""
        if self.loader is not None:
            case = self.loader(entry)
        else:
            case = load_case(entry, self.seg_task, self.dose_task, self.num_classes)
            case["spacing"] = entry.get("spacing")
        has_dose = _flag(case.get(f"{self.dose_task}_present"))
        has_labels = _flag(case.get(f"{self.seg_task}_present"))
        mask = case.get(f"{self.dose_task}_mask")
        return {
            "case_id": str(entry.get("case_id", entry.get("image"))),
            "dose": _volume(case[self.dose_task], "dose").astype(np.float64) if has_dose else None,
            "labels": _volume(case[self.seg_task], "label map") if has_labels else None,
            "mask": None if mask is None else _volume(mask, "dose mask") > 0,
            "image": _volume(case["image"], "image"),
            "present": _numpy(case[f"{self.seg_task}_class_present"]).reshape(-1) if has_labels else None,
            "spacing": _spacing(case.get("spacing")),
        }

    def _anchor(self, case: Mapping[str, Any]) -> np.ndarray:
        return anchor_mm(case["image"].shape, case["spacing"], case["mask"], case["image"], self.body_threshold)

    # --- building ------------------------------------------------------------------------------------------------

    def build(self) -> VolumeFloor:
        """Compute the floor from the training entries (once; later calls return at once).

        Returns:
            self.

        Raises:
            ValueError: when training volumes differ in shape under ``alignment="grid"``, or a label map holds labels
                outside ``0..num_classes - 1``.
            DatasetValidationError: from the loader, for unreadable entries.
        """
        if self._built:
            return self
        self._reference = self._reference_grid() if self.alignment == "centroid" else None
        sums: dict[str, Any] = {}
        for number, entry in enumerate(self.entries):
            case = self._load(entry)
            if self._reference is None:
                self._check_grid(case, sums)
                coverage: np.ndarray | float = 1.0
                dose, labels = case["dose"], case["labels"]
            else:
                dose, labels, coverage = self._to_reference(case)
            self._accumulate(sums, dose, labels, case["present"], coverage, case["case_id"])
            logger.debug("floor: read training case %d/%d (%s)", number + 1, len(self.entries), case["case_id"])
        self._finish(sums)
        self._built = True
        logger.info("floor: %s", self.definition())
        return self

    def _check_grid(self, case: Mapping[str, Any], sums: dict[str, Any]) -> None:
        shape = tuple(case["image"].shape)
        first = sums.setdefault("grid", (shape, case["case_id"]))
        if first[0] != shape:
            raise ValueError(
                f"floor with alignment='grid': training case {case['case_id']} has shape {shape}, "
                f"{first[1]} has {first[0]}; all volumes must share one grid (use alignment='centroid')"
            )

    def _reference_grid(self) -> _Reference:
        """First pass of the centroid alignment: every training volume's layout, then a grid that covers them all."""
        layouts = []
        for entry in self.entries:
            case = self._load(entry)
            layouts.append(_Layout(tuple(case["image"].shape), case["spacing"], self._anchor(case)))
        spacing = np.asarray(
            self.reference_spacing or np.median([layout.spacing for layout in layouts], axis=0), dtype=np.float64
        )
        low = np.min([-layout.anchor for layout in layouts], axis=0)
        high = np.max([(np.asarray(lay.shape) - 1) * np.asarray(lay.spacing) - lay.anchor for lay in layouts], axis=0)
        while True:
            shape = tuple(int(math.ceil((h - lo) / s - _EDGE)) + 1 for lo, h, s in zip(low, high, spacing))
            voxels = int(np.prod(shape))
            if voxels <= self.max_reference_voxels:
                break
            spacing = spacing * max((voxels / self.max_reference_voxels) ** (1.0 / 3.0), 1.0 + 1e-3)
        return _Reference(shape=shape, spacing=spacing, origin=low)

    def _to_reference(self, case: Mapping[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
        """A training case resampled onto the reference grid: dose (linear), label map (nearest), field of view."""
        ref = self._reference
        spacing = np.asarray(case["spacing"])
        matrix = ref.spacing / spacing  # reference voxel j -> case voxel (anchor + origin + j * r) / s
        offset = (self._anchor(case) + ref.origin) / spacing
        axes = []
        for axis in range(3):
            k = offset[axis] + matrix[axis] * np.arange(ref.shape[axis])
            axes.append((k >= -_EDGE) & (k <= case["image"].shape[axis] - 1 + _EDGE))
        coverage = (axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]).astype(np.float32)

        def resample(volume: np.ndarray, order: int) -> np.ndarray:
            return ndimage.affine_transform(
                volume, matrix, offset=offset, output_shape=ref.shape, order=order, mode="constant", cval=0.0
            )

        dose = None if case["dose"] is None else resample(case["dose"], 1)
        labels = None if case["labels"] is None else resample(case["labels"].astype(np.int16), 0)
        return dose, labels, coverage

    def _accumulate(
        self,
        sums: dict[str, Any],
        dose: np.ndarray | None,
        labels: np.ndarray | None,
        present: np.ndarray | None,
        coverage: np.ndarray | float,
        case_id: str,
    ) -> None:
        """Add one patient to the running sums (dose, per-class counts and the patients each voxel averages)."""
        if dose is not None:
            sums["dose"] = _add(sums.get("dose", 0.0), dose)
            sums["dose_cover"] = _add(sums.get("dose_cover", 0.0), coverage)
            self.num_dose_patients += 1
        if labels is None:
            return
        classes = self.num_classes or len(present)
        self.num_classes = classes
        if present is None or present.shape != (classes,):
            raise ValueError(f"floor: training case {case_id} has class flags {present}, not {classes} values")
        if labels.min() < 0 or labels.max() >= classes:
            raise ValueError(f"floor: training case {case_id} has labels outside 0..{classes - 1}")
        if "count" not in sums:
            sums["count"] = np.zeros((classes - 1, *labels.shape), dtype=np.float32)
            sums["label_cover"] = [0.0] * (classes - 1)
            self.annotated_patients = [0] * (classes - 1)
        for c in range(1, classes):
            if present[c] == 0:
                continue
            sums["count"][c - 1] += labels == c
            sums["label_cover"][c - 1] = _add(sums["label_cover"][c - 1], coverage)
            self.annotated_patients[c - 1] += 1
        self.num_label_patients += 1

    def _finish(self, sums: Mapping[str, Any]) -> None:
        """Turn the sums into the mean dose, the structure shares and the atlas label map."""
        if "dose" not in sums and "count" not in sums:
            raise ValueError(f"floor: none of the {len(self.entries)} training entries has a dose or a label map")
        if "dose" in sums:
            cover = np.asarray(sums["dose_cover"], dtype=np.float64)
            self._mean_dose = np.divide(
                sums["dose"], cover, out=np.zeros(np.shape(sums["dose"]), dtype=np.float64), where=cover > 0
            ).astype(np.float32)
        if "count" in sums:
            count = sums["count"]
            frequency = np.zeros(count.shape, dtype=np.float32)
            for c, cover in enumerate(sums["label_cover"]):
                cover = np.broadcast_to(np.asarray(cover, dtype=np.float32), count.shape[1:])
                np.divide(count[c], cover, out=frequency[c], where=cover > 0)
            self._frequency = frequency
            self._label_map = _atlas_labels(frequency)

    # --- using ---------------------------------------------------------------------------------------------------

    @property
    def mean_dose(self) -> np.ndarray | None:
        """The mean training dose (Gy, float32) on the floor's own grid (the reference grid when centroid-aligned),
        None when no training patient has a dose."""
        return self.build()._mean_dose

    @property
    def class_frequency(self) -> np.ndarray | None:
        """Per foreground class, the share of annotating training patients with the class at each voxel
        (``[C - 1, *grid]`` float32, class 1 first), None when no training patient has a label map."""
        return self.build()._frequency

    @property
    def label_map(self) -> np.ndarray | None:
        """The atlas label map (int64) on the floor's own grid, None when no training patient has a label map."""
        return self.build()._label_map

    def predict(
        self,
        shape: Sequence[int],
        spacing: Sequence[float] | None = None,
        dose_mask: np.ndarray | torch.Tensor | None = None,
        image: np.ndarray | torch.Tensor | None = None,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The floor on an evaluated case's grid: the mean dose (not yet multiplied by the case's possible-dose mask;
        the evaluation does that, as for a model) and the atlas label map.

        Args:
            shape: the case's grid ``(D0, D1, D2)``.
            spacing: the case's voxel size (mm); used by the centroid alignment only (default (1, 1, 1)).
            dose_mask: the case's possible-dose mask; the centroid alignment's anchor.
            image: the case's image; the anchor when the case has no dose mask.

        Returns:
            ``(dose float32 [*shape] or None, labels int64 [*shape] or None)``: None for a part that no training
            patient has.

        Raises:
            ValueError: under ``alignment="grid"`` when ``shape`` is not the training grid's.

        Example:
            >>> dose, labels = floor.predict((128, 128, 128))  # doctest: +SKIP
        """
        self.build()
        shape = tuple(int(s) for s in shape)
        if self._reference is None:
            grid = next(a.shape for a in (self._mean_dose, self._label_map) if a is not None)
            if shape != tuple(grid):
                raise ValueError(f"floor with alignment='grid' was built on grid {tuple(grid)}, not {shape}")
            dose = None if self._mean_dose is None else self._mean_dose.copy()
            labels = None if self._label_map is None else self._label_map.copy()
            return dose, labels
        mask = None if dose_mask is None else _volume(dose_mask, "dose mask") > 0
        image_array = None if image is None else _volume(image, "image")
        for name, array in (("dose mask", mask), ("image", image_array)):
            if array is not None and array.shape != shape:
                raise ValueError(f"floor: the case's {name} has shape {array.shape}, not {shape}")
        case_spacing = np.asarray(_spacing(spacing))
        ref = self._reference
        matrix = case_spacing / ref.spacing  # case voxel k -> reference voxel (k * s - anchor - origin) / r
        anchor = anchor_mm(shape, case_spacing, mask, image_array, self.body_threshold)
        offset = (-anchor - ref.origin) / ref.spacing

        def resample(volume: np.ndarray) -> np.ndarray:
            return ndimage.affine_transform(
                volume, matrix, offset=offset, output_shape=shape, order=1, mode="constant", cval=0.0
            )

        dose = None if self._mean_dose is None else resample(self._mean_dose).astype(np.float32)
        labels = None
        if self._frequency is not None:
            labels = _atlas_labels(np.stack([resample(f) for f in self._frequency]))
        return dose, labels

    def definition(self) -> str:
        """The floor in words (for reports).

        Returns:
            one paragraph naming the patients and the alignment.
        """
        self.build()
        parts = [
            f"dose floor: the voxel-wise mean dose of {self.num_dose_patients} training patients, times each "
            "evaluated case's possible-dose mask",
            f"segmentation floor: per voxel, the structure present in at least {_FREQUENCY_THRESHOLD:.0%} of the "
            f"training patients that annotate it ({self.num_label_patients} training label maps), else background",
        ]
        if self._reference is None:
            where = "all volumes on one shared grid, voxel by voxel"
        else:
            ref = self._reference
            where = (
                "volumes aligned at the centroid of their possible-dose mask (the body from the CT without one), "
                f"training volumes resampled onto a reference grid of {list(ref.shape)} voxels of "
                f"{[round(float(s), 3) for s in ref.spacing]} mm and back onto each case's grid (linear)"
            )
        return "; ".join(parts) + f"; {where}; computed from the training split only"

    def describe(self) -> dict[str, Any]:
        """The floor's definition and provenance, JSON-ready (the ``floor`` block of a report).

        Returns:
            ``definition``, ``alignment``, ``num_training_patients``, ``num_dose_patients``, ``num_label_patients``,
            ``annotated_patients`` (per foreground class) and, when centroid-aligned, the ``reference_grid``.

        Example:
            >>> floor.describe()["alignment"]  # doctest: +SKIP
            'grid'
        """
        self.build()
        info: dict[str, Any] = {
            "definition": self.definition(),
            "alignment": self.alignment,
            "num_training_patients": len(self.entries),
            "num_dose_patients": self.num_dose_patients,
            "num_label_patients": self.num_label_patients,
            "annotated_patients": list(self.annotated_patients),
        }
        if self._reference is not None:
            info["reference_grid"] = {
                "shape": list(self._reference.shape),
                "spacing_mm": [float(s) for s in self._reference.spacing],
            }
        return info


def _atlas_labels(frequency: np.ndarray) -> np.ndarray:
    """Label map from per-class shares ``[C - 1, *grid]``: the most frequent class where its share is >= 0.5
    (ties to the lower label), else background."""
    best = np.argmax(frequency, axis=0)
    share = np.take_along_axis(frequency, best[None], axis=0)[0]
    return np.where(share >= _FREQUENCY_THRESHOLD, best + 1, 0).astype(np.int64)
