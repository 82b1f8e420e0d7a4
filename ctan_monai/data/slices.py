"""Axial 2D slices of converted CT volumes (image, label map, dose, dose mask) for multi-task training.

Works from any manifest of NIfTI paths: OpenKBP (``ctan_monai.apps.openkbp.conversion.convert_dataset``) and the
prostate DICOM-RT conversion write the same entry schema::

    {"case_id": "pt_1", "image": "...nii.gz", "label": "...nii.gz" | None, "dose": "...nii.gz" | None,
     "dose_mask": "...nii.gz" | None, "label_class_present": [1, 1, 0, 1, 1]}  # optional, background first

Relative paths are resolved against ``base_dir``. Samples follow the package's batch convention: ``image``
``[1, H, W]`` float32; ``<seg>`` ``[1, H, W]`` int64 label map; ``<seg>_class_present`` ``[C]``; ``<seg>_present``;
``<dose>`` ``[1, H, W]`` float32 Gy; ``<dose>_mask`` ``[1, H, W]`` (the region where the dose loss applies);
``<dose>_present``; plus ``case_id`` and ``slice_index`` (the slice's index in the stored volume).

Missing parts of an entry: no ``label``: an all-background map with ``<seg>_present`` 0; no ``dose``: zeros with
``<dose>_present`` 0; no ``dose_mask``: the whole slice; no ``label_class_present``: every class counted as annotated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureTyped,
    Orientation,
    RandAffined,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
    ScaleIntensityRange,
)
from torch.utils.data import Dataset

from ctan_monai.data.validation import ValidationReport

__all__ = [
    "SLICE_RULES",
    "AxialSliceDataset",
    "load_case",
    "slice_augmentation",
    "slices_to_volume",
    "volume_to_slices",
]

logger = logging.getLogger(__name__)

SLICE_RULES = ("dose_mask", "body", "label", "all")
VOLUME_KEYS = ("image", "label", "dose", "dose_mask")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # NIfTI world axes run towards R, A and S
SliceRule = str | Callable[[Mapping[str, np.ndarray | None]], np.ndarray]


def _resolve(path: Any, base_dir: str | os.PathLike[str] | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def _read_volumes(
    entry: Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None,
    axcodes: str | None,
    image_range: tuple[float, float] | None,
    report: ValidationReport,
) -> dict[str, np.ndarray | None] | None:
    """Read an entry's volumes as 3D numpy arrays; problems go to ``report`` (returns None then)."""
    case = str(entry.get("case_id", entry.get("image")))
    # The entries are NIfTI by contract: MONAI's NIfTI reader alone (LoadImage would set up every installed reader).
    reader = NibabelReader()
    orient = Orientation(axcodes=axcodes, labels=_RAS_LABELS) if axcodes else None
    volumes: dict[str, np.ndarray | None] = {}
    paths = {key: _resolve(entry.get(key), base_dir) for key in VOLUME_KEYS}
    first_problem = len(report.problems)
    for key, path in paths.items():
        if path is None:
            if key == "image":
                report.add(str(entry), "entry has no 'image'", case)
            volumes[key] = None
            continue
        if not path.is_file():
            report.add(str(path), f"{key} file does not exist", case)
            continue
        try:
            array, meta = reader.get_data(reader.read(str(path)))
            if orient is not None and array.ndim == 3:
                array = orient(MetaTensor(array[None], affine=meta["affine"])).numpy()[0]
        except Exception as err:  # any reader failure is reported with its file, not raised mid-run
            report.add(str(path), f"{key} cannot be read: {err}", case)
            continue
        if array.ndim != 3:
            report.add(str(path), f"{key} must be a 3D volume, got shape {array.shape}", case)
            continue
        volumes[key] = array
    if len(report.problems) > first_problem:
        return None
    shape = volumes["image"].shape
    for key in VOLUME_KEYS[1:]:
        if volumes[key] is not None and volumes[key].shape != shape:
            report.add(str(paths[key]), f"{key} shape {volumes[key].shape} differs from image shape {shape}", case)
    for key in ("image", "dose"):
        if volumes[key] is not None and not np.all(np.isfinite(volumes[key])):
            report.add(str(paths[key]), f"{key} holds NaN or infinite values", case)
    if volumes["dose"] is not None and volumes["dose"].min() < 0:
        report.add(str(paths["dose"]), f"dose holds negative values (min {volumes['dose'].min():.3g})", case)
    if len(report.problems) > first_problem:
        return None
    volumes["image"] = volumes["image"].astype(np.float32)
    if image_range is not None:
        scale = ScaleIntensityRange(image_range[0], image_range[1], 0.0, 1.0, clip=True)
        volumes["image"] = np.asarray(scale(volumes["image"]), dtype=np.float32)
    return volumes


def _class_present(
    entry: Mapping[str, Any], num_classes: int, label: np.ndarray | None, report: ValidationReport
) -> np.ndarray:
    """The entry's 0/1 per-class annotation flags (background first), checked against ``num_classes`` and the map."""
    case = str(entry.get("case_id"))
    if label is None:
        present = np.zeros(num_classes, dtype=np.float32)
        present[0] = 1.0
        return present
    flags = entry.get("label_class_present")
    present = np.ones(num_classes, dtype=np.float32) if flags is None else np.asarray(flags, dtype=np.float32)
    if present.shape != (num_classes,) or not np.isin(present, (0.0, 1.0)).all():
        report.add(str(entry.get("label")), f"label_class_present {flags} is not {num_classes} flags of 0/1", case)
    if label.min() < 0 or label.max() >= num_classes:
        report.add(
            str(entry.get("label")),
            f"label values {int(label.min())}..{int(label.max())} outside 0..{num_classes - 1}",
            case,
        )
    return present


def _select_slices(volumes: Mapping[str, np.ndarray | None], rule: SliceRule, body_threshold: float) -> np.ndarray:
    """Bool per slice (volumes have the slice axis first)."""
    if callable(rule):
        return np.asarray(rule(volumes), dtype=bool)
    if rule == "all":
        return np.ones(volumes["image"].shape[0], dtype=bool)
    if rule == "dose_mask" and volumes["dose_mask"] is not None:
        return volumes["dose_mask"].any(axis=(1, 2))
    if rule == "label" and volumes["label"] is not None:
        return (volumes["label"] > 0).any(axis=(1, 2))
    # "body", and the fallback when the volume a rule needs is absent
    return (volumes["image"] > body_threshold).any(axis=(1, 2))


def _resize_stack(stack: np.ndarray, spatial_size: Sequence[int] | None, nearest: bool) -> np.ndarray:
    """Resize every slice of an ``[S, H, W]`` stack in-plane (area averaging when shrinking, for less aliasing)."""
    if spatial_size is None or tuple(stack.shape[1:]) == tuple(spatial_size):
        return stack
    shrink = all(t <= s for t, s in zip(spatial_size, stack.shape[1:]))
    mode = "nearest" if nearest else ("area" if shrink else "bilinear")
    out = Resize(tuple(spatial_size), mode=mode)(torch.as_tensor(np.ascontiguousarray(stack), dtype=torch.float32))
    return np.asarray(out.numpy(), dtype=stack.dtype)


@dataclass
class _CaseSlices:
    case_id: str
    slice_indices: np.ndarray  # the selected slices' indices in the stored volume
    image: np.ndarray  # [S, H, W] float32
    label: np.ndarray | None  # [S, H, W] uint8 / int16
    dose: np.ndarray | None  # [S, H, W] float32
    dose_mask: np.ndarray | None  # [S, H, W] uint8
    class_present: np.ndarray  # [C] float32


def _infer_num_classes(data: Sequence[Mapping[str, Any]], num_classes: int | None) -> int:
    if num_classes is not None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        return int(num_classes)
    for entry in data:
        if entry.get("label_class_present") is not None:
            return len(entry["label_class_present"])
    raise ValueError("num_classes is needed when no entry has 'label_class_present'")


class AxialSliceDataset(Dataset):
    """2D axial slices of a list of converted cases, loaded once into memory (only the selected slices are kept).

    Every entry is read and checked at construction: missing files, unreadable volumes, shape mismatches, labels
    outside ``0..num_classes - 1``, NaN / negative dose are all reported together as one ``DatasetValidationError``.

    Which slices: ``slice_rule`` ``"dose_mask"`` (default: the slices that intersect the dose mask, i.e. where the plan
    is; the body when an entry has no mask), ``"body"`` (slices with any image value above ``body_threshold``),
    ``"label"`` (slices with any foreground label; the body when an entry has no label), ``"all"``, or a callable
    ``f(volumes) -> bool[S]`` given ``image`` / ``label`` / ``dose`` / ``dose_mask`` arrays with the slice axis first.

    Args:
        data: the manifest entries (see the module docstring).
        seg_task: the segmentation task's name (batch key).
        dose_task: the dose task's name (batch key).
        num_classes: segmentation classes, background included; default: the length of ``label_class_present``.
        slice_rule: which slices to keep (see above).
        spatial_size: resize every slice in-plane to this ``(H, W)`` at load time (e.g. ``(64, 64)`` for quick CPU
            runs): area averaging for image and dose, nearest for label and mask.
        transform: applied to every sample dict (e.g. ``slice_augmentation(...)`` or any MONAI dictionary transform).
        base_dir: folder that relative paths in ``data`` are relative to.
        axcodes: reorient every volume to these axis codes first (MONAI ``Orientation``), e.g. to give two datasets
            the same in-plane orientation; default: keep the stored array order.
        image_range: ``(a_min, a_max)``: clip the image to this range and scale it to [0, 1] (e.g. ``(-1024, 3071)``
            puts a CT in HU on the OpenKBP scale); default: use the stored values (OpenKBP's cache is in [0, 1]).
        slice_axis: the spatial axis of the stored (or reoriented) volume that indexes axial slices (OpenKBP: 2).
        body_threshold: image value above which a voxel counts as body for the ``"body"`` rule (on the scale after
            ``image_range``; 0.15 ~ 600 on OpenKBP's 0..4095, between air and soft tissue).

    Raises:
        DatasetValidationError: listing every problem of every entry.
        ValueError: for an unknown ``slice_rule``, a bad ``num_classes`` or when no slice is selected at all.

    Example:
        >>> train = load_manifest("cache/openkbp", "train-pats")  # doctest: +SKIP
        >>> ds = AxialSliceDataset(train, spatial_size=(64, 64))  # doctest: +SKIP
        >>> ds[0]["image"].shape, ds[0]["seg"].dtype  # doctest: +SKIP
        (torch.Size([1, 64, 64]), torch.int64)
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        seg_task: str = "seg",
        dose_task: str = "dose",
        num_classes: int | None = None,
        slice_rule: SliceRule = "dose_mask",
        spatial_size: Sequence[int] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        axcodes: str | None = None,
        image_range: tuple[float, float] | None = None,
        slice_axis: int = 2,
        body_threshold: float = 0.15,
    ) -> None:
        if not callable(slice_rule) and slice_rule not in SLICE_RULES:
            raise ValueError(f"slice_rule must be one of {SLICE_RULES} or a callable, got {slice_rule!r}")
        self.seg_task, self.dose_task = seg_task, dose_task
        self.num_classes = _infer_num_classes(data, num_classes)
        self.transform = transform
        report = ValidationReport(dataset="axial slice dataset")
        self.cases: list[_CaseSlices] = []
        for entry in data:
            volumes = _read_volumes(entry, base_dir, axcodes, image_range, report)
            if volumes is None:
                continue
            present = _class_present(entry, self.num_classes, volumes["label"], report)
            stacks = {k: None if v is None else np.moveaxis(v, slice_axis, 0) for k, v in volumes.items()}
            keep = _select_slices(stacks, slice_rule, body_threshold)
            stacks = {k: None if v is None else v[keep] for k, v in stacks.items()}
            label_dtype = np.uint8 if self.num_classes <= 256 else np.int16
            self.cases.append(
                _CaseSlices(
                    case_id=str(entry.get("case_id", Path(str(entry["image"])).name)),
                    slice_indices=np.flatnonzero(keep),
                    image=_resize_stack(stacks["image"].astype(np.float32), spatial_size, nearest=False),
                    label=None
                    if stacks["label"] is None
                    else _resize_stack(stacks["label"].astype(label_dtype), spatial_size, nearest=True),
                    dose=None
                    if stacks["dose"] is None
                    else _resize_stack(stacks["dose"].astype(np.float32), spatial_size, nearest=False),
                    dose_mask=None
                    if stacks["dose_mask"] is None
                    else _resize_stack((stacks["dose_mask"] > 0).astype(np.uint8), spatial_size, nearest=True),
                    class_present=present,
                )
            )
            if not keep.any():
                logger.warning("case %s: no slice selected by rule %r", self.cases[-1].case_id, slice_rule)
        report.raise_if_problems()
        self.index = [(c, s) for c, case in enumerate(self.cases) for s in range(len(case.slice_indices))]
        if not self.index:
            raise ValueError(f"no slice selected by rule {slice_rule!r} in {len(self.cases)} case(s)")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        case_number, position = self.index[item]
        case = self.cases[case_number]
        sample = _slice_sample(case, position, self.seg_task, self.dose_task)
        return self.transform(sample) if self.transform is not None else sample


def _slice_sample(case: _CaseSlices, position: int, seg_task: str, dose_task: str) -> dict[str, Any]:
    """One slice in the batch convention (copies, so that transforms never change the cache)."""
    window = slice(position, position + 1)
    shape = case.image.shape[1:]
    image = torch.from_numpy(case.image[window].copy())
    if case.label is not None:
        seg = torch.from_numpy(case.label[window].astype(np.int64))
    else:
        seg = torch.zeros((1, *shape), dtype=torch.int64)
    dose = torch.from_numpy(case.dose[window].copy()) if case.dose is not None else torch.zeros((1, *shape))
    if case.dose_mask is not None:
        mask = torch.from_numpy(case.dose_mask[window].astype(np.float32))
    else:
        mask = torch.ones((1, *shape)) if case.dose is not None else torch.zeros((1, *shape))
    return {
        "image": image,
        seg_task: seg,
        f"{seg_task}_class_present": torch.from_numpy(case.class_present.copy()),
        f"{seg_task}_present": torch.tensor(float(case.label is not None)),
        dose_task: dose,
        f"{dose_task}_mask": mask,
        f"{dose_task}_present": torch.tensor(float(case.dose is not None)),
        "case_id": case.case_id,
        "slice_index": int(case.slice_indices[position]),
    }


def load_case(
    entry: Mapping[str, Any],
    seg_task: str = "seg",
    dose_task: str = "dose",
    num_classes: int | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    axcodes: str | None = None,
    image_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Load one whole case as tensors ``[1, *spatial]`` in the batch convention, for slice-wise 3D evaluation.

    Args:
        entry: one manifest entry.
        seg_task: the segmentation task's name.
        dose_task: the dose task's name.
        num_classes: segmentation classes; default: the length of ``label_class_present``.
        base_dir: folder that relative paths are relative to.
        axcodes: reorient to these axis codes first (as ``AxialSliceDataset``).
        image_range: clip-and-scale range of the image (as ``AxialSliceDataset``).

    Returns:
        ``image`` float32, ``<seg>`` int64, ``<seg>_class_present``, ``<seg>_present``, ``<dose>`` float32,
        ``<dose>_mask`` float32, ``<dose>_present``, ``case_id``; volumes ``[1, *spatial]`` (use ``volume_to_slices``
        to get a batch of slices).

    Raises:
        DatasetValidationError: listing every problem of the entry.
        ValueError: when ``num_classes`` cannot be known.

    Example:
        >>> case = load_case(load_manifest("cache/openkbp", "validation-pats")[0])  # doctest: +SKIP
        >>> case["image"].shape  # doctest: +SKIP
        torch.Size([1, 128, 128, 128])
    """
    report = ValidationReport(dataset=f"case {entry.get('case_id')}")
    classes = _infer_num_classes([entry], num_classes)
    volumes = _read_volumes(entry, base_dir, axcodes, image_range, report)
    present = _class_present(entry, classes, None if volumes is None else volumes["label"], report)
    report.raise_if_problems()
    stack = _CaseSlices(
        case_id=str(entry.get("case_id")),
        slice_indices=np.zeros(1, dtype=np.int64),
        image=volumes["image"][None],
        label=None if volumes["label"] is None else volumes["label"][None].astype(np.int64),
        dose=None if volumes["dose"] is None else volumes["dose"][None].astype(np.float32),
        dose_mask=None if volumes["dose_mask"] is None else (volumes["dose_mask"][None] > 0).astype(np.uint8),
        class_present=present,
    )
    sample = _slice_sample(stack, 0, seg_task, dose_task)
    sample.pop("slice_index")
    return sample


def volume_to_slices(volume: torch.Tensor, slice_axis: int = 2) -> torch.Tensor:
    """Turn a channel-first volume ``[C, *spatial]`` into a batch of slices ``[S, C, H, W]``.

    Args:
        volume: ``[C, D0, D1, D2]``.
        slice_axis: the spatial axis (0, 1 or 2, negative counts from the end) that indexes the slices.

    Returns:
        ``[S, C, H, W]``, ``H, W`` the other two spatial axes in order.

    Example:
        >>> volume_to_slices(torch.zeros(1, 4, 5, 6)).shape
        torch.Size([6, 1, 4, 5])
    """
    axis = 1 + (slice_axis % 3)
    return volume.movedim(axis, 0).contiguous()


def slices_to_volume(slices: torch.Tensor, slice_axis: int = 2) -> torch.Tensor:
    """Inverse of ``volume_to_slices``: ``[S, C, H, W]`` back to ``[C, *spatial]``.

    Args:
        slices: ``[S, C, H, W]``.
        slice_axis: the spatial axis the slices were taken along.

    Returns:
        ``[C, D0, D1, D2]``.

    Example:
        >>> slices_to_volume(torch.zeros(6, 1, 4, 5)).shape
        torch.Size([1, 4, 5, 6])
    """
    axis = 1 + (slice_axis % 3)
    return slices.movedim(0, axis).contiguous()


def slice_augmentation(
    seg_task: str = "seg",
    dose_task: str = "dose",
    prob: float = 0.3,
    max_rotation: float = 0.15,
    max_scale: float = 0.1,
    max_shift: int = 4,
    intensity: float = 0.05,
) -> Compose:
    """Light, label-consistent augmentation of 2D slice samples (a MONAI ``Compose`` of dictionary transforms).

    One random affine (rotation, scaling, shift) applied alike to image, label map, dose and dose mask (nearest for
    the label and the mask), and a small intensity scale and shift of the image. No flips: a left-right flip would
    put a LeftParotid label on the patient's right, and the dose depends on the side of the target.

    Args:
        seg_task: the segmentation task's name.
        dose_task: the dose task's name.
        prob: probability of each random transform.
        max_rotation: largest rotation in radians.
        max_scale: largest relative zoom in or out.
        max_shift: largest shift in pixels.
        intensity: largest relative intensity scale and absolute shift (image in [0, 1]).

    Returns:
        the transform; it returns plain tensors with the label map as int64.

    Example:
        >>> aug = slice_augmentation(prob=1.0)
        >>> s = {"image": torch.rand(1, 8, 8), "seg": torch.zeros(1, 8, 8, dtype=torch.int64),
        ...      "dose": torch.rand(1, 8, 8), "dose_mask": torch.ones(1, 8, 8)}
        >>> aug(s)["seg"].dtype
        torch.int64
    """
    keys = ["image", seg_task, dose_task, f"{dose_task}_mask"]
    return Compose(
        [
            RandAffined(
                keys=keys,
                prob=prob,
                rotate_range=max_rotation,
                scale_range=(max_scale, max_scale),
                translate_range=(max_shift, max_shift),
                mode=("bilinear", "nearest", "bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=intensity, prob=prob),
            RandShiftIntensityd(keys="image", offsets=intensity, prob=prob),
            CastToTyped(keys=seg_task, dtype=torch.int64),
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )
