"""STOIC2021 chest CT: labels, datalists, validation, lung preprocessing, and 2.5D / 3D datasets.

On-disk layout (as published by STOIC2021)::

    <root>/data/mha/<PatientID>.mha        chest CT, Hounsfield units
    <root>/metadata/reference.csv          PatientID,probCOVID,probSevere  (0/1; empty = unknown)

Tasks: ``covid`` (COVID-19 positive) and ``severe`` (intubation or death within one month), both binary and
image level. An empty label cell is a *missing* label (``<task>_present = 0``), never a negative.

Preprocessing (``preprocess_volume``), our documented choices:

1. resample (linear) onto an axis-aligned grid at ``spacing`` (default 1.5 x 1.5 x 2 mm, x/y/z), so that flipped or
   tilted acquisitions end up in one orientation;
2. body mask: voxels above -500 HU; an in-plane opening (radius ``BODY_OPENING_MM``) detaches the scanner table; the
   largest 3D connected component is the body, and its per-slice convex hull is "inside the patient";
3. lung mask: air (-500 HU or less) enclosed by denser tissue within its own axial slice (un-opened, so thin chest
   walls still enclose) and inside the body hull; of its 3D connected components the two largest are kept when
   each is at least 10 % of the largest (bowel gas and the air under the table drop out), then holes are filled
   slice by slice so that dense lesions inside the lungs count as lung;
4. crop: in-plane to the body's bounding box, axially to the lungs' extent, each with a margin, then padded with air
   to a square in-plane so that a later resize keeps the aspect ratio.

The cache keeps HU (int16) rather than the windowed intensities: the lung window (default -1000..400 HU to [0, 1]) is
applied on load by ``ScaleIntensityRanged``, so that it can be changed without reconverting.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import Dataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Randomizable,
    Resized,
    ScaleIntensityRanged,
    SelectItemsd,
)
from monai.utils import convert_to_tensor
from scipy import ndimage
from skimage import measure
from skimage.morphology import convex_hull_image

from ctan_monai.data.validation import DatasetValidationError, ValidationReport
from ctan_monai.utils.atomic import atomic_path, atomic_write_json

__all__ = [
    "LABEL_COLUMNS",
    "LUNG_WINDOW",
    "DEFAULT_SPACING",
    "PreprocessedCT",
    "find_stoic_root",
    "read_reference",
    "build_datalist",
    "validate_dataset",
    "preprocess_volume",
    "lung_slice_candidates",
    "select_lung_slices",
    "convert_dataset",
    "SampleAxialSlabsd",
    "Stoic25DDataset",
    "Stoic3DDataset",
    "aggregate_patient_probabilities",
]

logger = logging.getLogger(__name__)

# reference.csv column of each task.
LABEL_COLUMNS: dict[str, str] = {"covid": "probCOVID", "severe": "probSevere"}
LUNG_WINDOW: tuple[float, float] = (-1000.0, 400.0)
DEFAULT_SPACING: tuple[float, float, float] = (1.5, 1.5, 2.0)
AIR_HU = -1024

# Plausibility limits of a chest CT; outside them the file is reported, not trained on.
IN_PLANE_SPACING_MM = (0.2, 5.0)
SLICE_SPACING_MM = (0.2, 10.0)
MIN_IN_PLANE_VOXELS = 32
MIN_SLICES = 3  # a 2.5D sample needs slices z-1, z, z+1
AIR_PERCENTILE_MAX_HU = -500.0  # the 1st percentile must be air (lungs, outside the body)
TISSUE_PERCENTILE_MIN_HU = -200.0  # the 99th percentile must be soft tissue or bone
HU_LIMITS = (-4000.0, 40000.0)  # anything beyond is not a Hounsfield unit

BODY_THRESHOLD_HU = -500.0
BODY_OPENING_MM = 4.0
LUNG_COMPONENT_FRACTION = 0.1
CROP_MARGIN_MM = 10.0
CONVERSION_VERSION = 1


# --------------------------------------------------------------------------------------------- labels and datalists
def find_stoic_root(path: str | os.PathLike[str]) -> Path:
    """The STOIC dataset folder (the one with ``metadata/reference.csv``): ``path`` or its only such sub-folder.

    Args:
        path: the dataset folder, or a folder that contains exactly one STOIC dataset folder (as an extracted archive).

    Returns:
        the dataset folder.

    Raises:
        FileNotFoundError: when no (or more than one) dataset folder is found.

    Example:
        >>> find_stoic_root("/data/stoic2021")  # doctest: +SKIP
        PosixPath('/data/stoic2021')
    """
    root = Path(path)
    if (root / "metadata" / "reference.csv").is_file():
        return root
    found = sorted(p.parent.parent for p in root.glob("*/metadata/reference.csv"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{root}: no STOIC dataset here (expected metadata/reference.csv and data/mha/)")
    raise FileNotFoundError(f"{root}: several STOIC datasets found ({[str(f) for f in found]}); name one")


def _parse_label(text: str) -> float | None:
    """0/1 label from a CSV cell; ``None`` for an empty cell; ``ValueError`` otherwise."""
    text = text.strip()
    if text == "" or text.lower() == "nan":
        return None
    value = float(text)  # raises ValueError on non-numbers
    if value not in (0.0, 1.0):
        raise ValueError(text)
    return value


def read_reference(
    csv_path: str | os.PathLike[str], report: ValidationReport | None = None
) -> dict[str, dict[str, float | None]]:
    """Read a STOIC ``reference.csv``: per patient, ``covid`` and ``severe`` as 0.0/1.0, or ``None`` when unknown.

    Every problem of the file is collected (label not 0/1, severe without COVID-19, repeated PatientID, missing
    column); patients with a problem are left out of the result.

    Args:
        csv_path: the CSV (columns PatientID, probCOVID, probSevere; other columns are ignored).
        report: where to record problems; when ``None`` they are raised together.

    Returns:
        ``{patient_id: {"covid": 1.0 | 0.0 | None, "severe": 1.0 | 0.0 | None}}`` in file order.

    Raises:
        DatasetValidationError: when ``report`` is ``None`` and the file has problems.

    Example:
        >>> labels = read_reference("stoic2021/metadata/reference.csv")  # doctest: +SKIP
        >>> labels["1"]  # doctest: +SKIP
        {'covid': 1.0, 'severe': None}
    """
    own_report = report is None
    report = ValidationReport(str(csv_path)) if report is None else report
    labels: dict[str, dict[str, float | None]] = {}
    path = Path(csv_path)
    if not path.is_file():
        report.add(str(path), "reference file not found")
    else:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("PatientID", *LABEL_COLUMNS.values()) if c not in (reader.fieldnames or [])]
            if missing:
                report.add(str(path), f"missing column(s) {missing}; found {reader.fieldnames}")
            else:
                for line, row in enumerate(reader, start=2):
                    _parse_reference_row(row, f"{path}:{line}", labels, report)
    if own_report:
        report.raise_if_problems()
    return labels


def _parse_reference_row(
    row: Mapping[str, str | None], where: str, labels: dict[str, dict[str, float | None]], report: ValidationReport
) -> None:
    """Parse one row of reference.csv into ``labels``, recording its problems in ``report``."""
    case = (row.get("PatientID") or "").strip()
    if not case:
        report.add(where, "empty PatientID")
        return
    if not re.fullmatch(r"[\w.-]+", case):  # the id names files (data/mha/<id>.mha, the cache)
        report.add(where, f"PatientID {case!r} is not a plain file name", case)
        return
    if case in labels:
        report.add(where, f"PatientID {case} appears more than once", case)
        labels.pop(case)
        return
    values: dict[str, float | None] = {}
    ok = True
    for task, column in LABEL_COLUMNS.items():
        cell = row.get(column) or ""
        try:
            values[task] = _parse_label(cell)
        except ValueError:
            report.add(where, f"{column} must be 0, 1 or empty (unknown), got {cell!r}", case)
            ok = False
    # Severe (intubation or death) is defined on COVID-19 patients: a severe negative case is a data error.
    if ok and values["severe"] == 1.0 and values["covid"] == 0.0:
        report.add(where, "probSevere is 1 but probCOVID is 0 (severe implies COVID-19)", case)
        ok = False
    if ok:
        labels[case] = values


def _case_sort_key(case: str) -> tuple[int, int | str]:
    return (0, int(case)) if case.isdigit() else (1, case)


def _datalist_entry(case: str, image: Path, values: Mapping[str, float | None]) -> dict[str, Any]:
    entry: dict[str, Any] = {"case_id": case, "image": str(image)}
    for task in LABEL_COLUMNS:
        value = values.get(task)
        entry[task] = 0.0 if value is None else float(value)
        entry[f"{task}_present"] = 0.0 if value is None else 1.0
    return entry


def build_datalist(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The datalist of a STOIC dataset: one dict per patient of ``reference.csv``.

    Only files are listed here (nothing is opened but the CSV); use ``validate_dataset`` to check the volumes.

    Args:
        root: the dataset folder (see ``find_stoic_root``).

    Returns:
        dicts with ``case_id``, ``image`` (mha path), ``covid`` / ``severe`` (0.0 or 1.0; 0.0 when unknown) and
        ``covid_present`` / ``severe_present`` (1.0 when labelled, 0.0 when missing), sorted by PatientID.

    Raises:
        DatasetValidationError: when reference.csv has problems or a listed patient has no image file.

    Example:
        >>> build_datalist("stoic2021")[0]  # doctest: +SKIP
        {'case_id': '1', 'image': '.../data/mha/1.mha', 'covid': 1.0, 'covid_present': 1.0, 'severe': 0.0,
         'severe_present': 0.0}
    """
    root = find_stoic_root(root)
    report = ValidationReport(str(root))
    labels = read_reference(root / "metadata" / "reference.csv", report)
    datalist = []
    for case in sorted(labels, key=_case_sort_key):
        image = root / "data" / "mha" / f"{case}.mha"
        if not image.is_file():
            report.add(str(image), "image file not found (listed in reference.csv)", case)
            continue
        datalist.append(_datalist_entry(case, image, labels[case]))
    report.raise_if_problems()
    return datalist


# --------------------------------------------------------------------------------------------------------- validation
def _check_header(path: Path, case: str, report: ValidationReport) -> bool:
    """Check a volume's header (size, spacing, orientation, pixel type) without reading its voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        report.add(str(path), f"unreadable volume ({first_line})", case)
        return False
    problems = []
    if reader.GetDimension() != 3:
        problems.append(f"expected a 3D volume, got {reader.GetDimension()}D")
    elif reader.GetNumberOfComponents() != 1:
        problems.append(f"expected one component per voxel, got {reader.GetNumberOfComponents()}")
    else:
        size, spacing = reader.GetSize(), reader.GetSpacing()
        if min(size[:2]) < MIN_IN_PLANE_VOXELS or size[2] < MIN_SLICES:
            problems.append(f"size {size} too small for a chest CT (>= {MIN_IN_PLANE_VOXELS}^2 x {MIN_SLICES})")
        low, high = IN_PLANE_SPACING_MM
        if not all(low <= s <= high for s in spacing[:2]):
            problems.append(f"implausible in-plane spacing {spacing[:2]} mm (expected {low}..{high})")
        low, high = SLICE_SPACING_MM
        if not low <= spacing[2] <= high:
            problems.append(f"implausible slice spacing {spacing[2]} mm (expected {low}..{high})")
        # The third image axis must run head-foot, or "axial slices" would be something else.
        if abs(reader.GetDirection()[8]) < 0.9:
            problems.append(f"third axis is not the head-foot axis (direction {reader.GetDirection()}): not axial")
    for message in problems:
        report.add(str(path), message, case)
    return not problems


def _intensity_problems(hu: np.ndarray) -> list[str]:
    """What makes an HU array implausible for a chest CT (empty list when plausible)."""
    if hu.size == 0 or not np.isfinite(hu).all():
        return ["voxels are empty or not finite"]
    low, high = float(hu.min()), float(hu.max())
    if low < HU_LIMITS[0] or high > HU_LIMITS[1]:
        return [f"intensities {low:.0f}..{high:.0f} are not Hounsfield units (expected within {HU_LIMITS})"]
    # Percentiles on a strided subsample: cheap and robust to a few outlier voxels.
    p1, p99 = np.percentile(hu.ravel()[:: max(1, hu.size // 200_000)], [1, 99])
    problems = []
    if p1 > AIR_PERCENTILE_MAX_HU:
        problems.append(f"no air: 1st HU percentile is {p1:.0f} (> {AIR_PERCENTILE_MAX_HU:.0f}); not HU, or no lungs?")
    if p99 < TISSUE_PERCENTILE_MIN_HU:
        problems.append(f"no tissue: 99th HU percentile is {p99:.0f} (< {TISSUE_PERCENTILE_MIN_HU:.0f})")
    return problems


def validate_dataset(root: str | os.PathLike[str], check_intensities: bool = True) -> ValidationReport:
    """Check every case of a STOIC dataset and report every problem at once.

    Labels are checked as in ``read_reference``. For each labelled patient: the file exists and its header reads
    (size, spacing, axial orientation, one component; header only, fast); with ``check_intensities`` the voxels are
    read too and must look like a chest CT in Hounsfield units (air and tissue present, values in range), which also
    catches truncated files. Images without a row in reference.csv are ignored (they have no labels).

    Args:
        root: the dataset folder (see ``find_stoic_root``).
        check_intensities: also read the voxels (slower: a full read per case).

    Returns:
        the report; ``valid_cases`` lists the patients without problems.

    Raises:
        FileNotFoundError: when ``root`` holds no STOIC dataset.

    Example:
        >>> report = validate_dataset("stoic2021")  # doctest: +SKIP
        >>> report.raise_if_problems()  # doctest: +SKIP
    """
    root = find_stoic_root(root)
    report = ValidationReport(str(root))
    labels = read_reference(root / "metadata" / "reference.csv", report)
    for case in sorted(labels, key=_case_sort_key):
        if all(value is None for value in labels[case].values()):
            report.add(str(root / "metadata" / "reference.csv"), "no label for any task", case)
            continue
        path = root / "data" / "mha" / f"{case}.mha"
        if not path.is_file():
            report.add(str(path), "image file not found (listed in reference.csv)", case)
            continue
        if not _check_header(path, case, report) or not check_intensities:
            continue
        try:
            volume = sitk.ReadImage(str(path))
        except RuntimeError as err:
            report.add(str(path), f"voxels unreadable ({str(err).strip().splitlines()[-1]})", case)
            continue
        for message in _intensity_problems(sitk.GetArrayViewFromImage(volume)):
            report.add(str(path), message, case)
    bad = set(report.bad_cases())
    report.valid_cases = [c for c in sorted(labels, key=_case_sort_key) if c not in bad]
    return report


# ------------------------------------------------------------------------------------------------------ preprocessing
@dataclass
class PreprocessedCT:
    """A chest CT after ``preprocess_volume``.

    Args:
        image: HU (int16) on the resampled, cropped grid (identity direction).
        lung_mask: 0/1 (uint8) lung mask on the same grid.
        body_box: the crop, ``(start, stop)`` voxel indices (x, y, z) of the resampled grid (start may be negative
            where air was padded to make the slice square).
    """

    image: sitk.Image
    lung_mask: sitk.Image
    body_box: tuple[tuple[int, int, int], tuple[int, int, int]]


def _resample_axis_aligned(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """Resample onto an identity-direction grid at ``spacing`` that covers the image's physical extent."""
    size = np.array(image.GetSize())
    corners = np.array(
        [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner]) for corner in _corners(size - 1)]
    )
    low, high = corners.min(axis=0), corners.max(axis=0)
    out_size = [int(math.floor((h - lo) / s)) + 1 for lo, h, s in zip(low, high, spacing)]
    return sitk.Resample(
        image,
        out_size,
        sitk.Transform(),
        sitk.sitkLinear,
        low.tolist(),
        [float(s) for s in spacing],
        np.eye(3).ravel().tolist(),
        float(AIR_HU),
        sitk.sitkFloat32,
    )


def _corners(last: np.ndarray) -> list[np.ndarray]:
    return [np.array([x, y, z]) for x in (0, last[0]) for y in (0, last[1]) for z in (0, last[2])]


def _largest_components(mask: np.ndarray, count: int, min_fraction: float) -> np.ndarray:
    """The ``count`` largest 3D connected components of ``mask`` that reach ``min_fraction`` of the largest one."""
    components = measure.label(mask, connectivity=1)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = [label for label in np.argsort(sizes)[::-1][:count] if sizes[label] > 0]
    keep = [label for label in keep if sizes[label] >= min_fraction * sizes[keep[0]]]
    return np.isin(components, keep)


def _coarse_convex_hull(mask: np.ndarray, step: int = 4) -> np.ndarray:
    """Convex hull of a 2D mask computed on a ``step``-times coarser grid (16x faster; a few voxels of slack)."""
    if not mask.any():
        return mask.copy()
    coarse = ndimage.maximum_filter(mask, size=step)[::step, ::step]
    hull = convex_hull_image(coarse)
    return np.kron(hull, np.ones((step, step), bool))[: mask.shape[0], : mask.shape[1]]


def _body_and_lung_masks(hu: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Body and lung masks of an HU array ``[z, y, x]`` (threshold, opening, largest components; see module doc)."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)  # in-plane connectivity only: slice-wise operations
    radius = max(1, int(round(BODY_OPENING_MM / min(spacing[:2]))))
    dense = hu > BODY_THRESHOLD_HU
    body = _largest_components(ndimage.binary_opening(dense, structure=in_plane, iterations=radius), 1, 0.0)
    # The hull stands for "inside the patient" even where the opening broke a thin chest wall.
    hull = np.stack([_coarse_convex_hull(s) for s in body])
    # Air enclosed by tissue in its own slice (no opening here, so thin walls still enclose).
    enclosed_air = ndimage.binary_fill_holes(dense, structure=in_plane) & ~dense & hull
    lungs = _largest_components(enclosed_air, 2, LUNG_COMPONENT_FRACTION)
    # Dense lesions surrounded by aerated lung belong to the lung.
    return hull, ndimage.binary_fill_holes(lungs, structure=in_plane)


def _bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(start, stop)`` of a non-empty mask, per array axis."""
    nonzero = np.nonzero(mask)
    return np.array([a.min() for a in nonzero]), np.array([a.max() + 1 for a in nonzero])


def preprocess_volume(
    image: sitk.Image, spacing: Sequence[float] = DEFAULT_SPACING, margin_mm: float = CROP_MARGIN_MM
) -> PreprocessedCT:
    """Resample a chest CT, find body and lungs by thresholding, and crop to them (method in the module doc).

    Args:
        image: the CT in HU (any pixel type, any orientation).
        spacing: output voxel size in mm, (x, y, z).
        margin_mm: margin kept around the body (in-plane) and the lungs (axially).

    Returns:
        the cropped HU volume (int16) and its lung mask, axis-aligned, at ``spacing``.

    Raises:
        ValueError: when the image is not 3D or no lungs are found (not a chest CT, or not in HU).

    Example:
        >>> ct = preprocess_volume(sitk.ReadImage("1.mha"), spacing=(1.5, 1.5, 2.0))  # doctest: +SKIP
        >>> ct.image.GetSpacing()  # doctest: +SKIP
        (1.5, 1.5, 2.0)
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D CT, got a {image.GetDimension()}D image")
    resampled = _resample_axis_aligned(sitk.Cast(image, sitk.sitkFloat32), spacing)
    hu = sitk.GetArrayFromImage(resampled)  # [z, y, x]
    body, lungs = _body_and_lung_masks(hu, spacing)
    if not lungs.any():
        raise ValueError("no lungs found (no air enclosed by the body below -500 HU): not a chest CT in HU?")
    zyx_spacing = np.array(spacing[::-1], float)
    margin = np.ceil(margin_mm / zyx_spacing).astype(int)
    lung_start, lung_stop = _bounding_box(lungs)
    z0, z1 = max(0, lung_start[0] - margin[0]), min(hu.shape[0], lung_stop[0] + margin[0])
    body_start, body_stop = _bounding_box(body[z0:z1])
    start = np.array([z0, *(body_start[1:] - margin[1:])])
    stop = np.array([z1, *(body_stop[1:] + margin[1:])])
    # Square in-plane extent (air-padded as needed) so that resizing slices keeps the aspect ratio.
    side = int((stop[1:] - start[1:]).max())
    start[1:] -= (side - (stop[1:] - start[1:])) // 2
    stop[1:] = start[1:] + side
    cropped_hu = _crop_padded(np.clip(np.rint(hu), -32768, 32767).astype(np.int16), start, stop, AIR_HU)
    cropped_lungs = _crop_padded(lungs.astype(np.uint8), start, stop, 0)
    origin = resampled.TransformIndexToPhysicalPoint([int(i) for i in start[::-1]])
    out = []
    for array in (cropped_hu, cropped_lungs):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing([float(s) for s in spacing])
        volume.SetOrigin(origin)
        out.append(volume)
    box = (tuple(int(i) for i in start[::-1]), tuple(int(i) for i in stop[::-1]))
    return PreprocessedCT(out[0], out[1], box)  # type: ignore[arg-type]


def _crop_padded(array: np.ndarray, start: np.ndarray, stop: np.ndarray, fill: float) -> np.ndarray:
    """``array[start:stop]`` where the box may reach outside the array (filled with ``fill``)."""
    out = np.full(tuple(stop - start), fill, dtype=array.dtype)
    src_lo, src_hi = np.maximum(start, 0), np.minimum(stop, array.shape)
    dst = tuple(slice(lo - s, hi - s) for lo, hi, s in zip(src_lo, src_hi, start))
    out[dst] = array[tuple(slice(lo, hi) for lo, hi in zip(src_lo, src_hi))]
    return out


def lung_slice_candidates(lung_mask: np.ndarray, min_area_fraction: float = 0.25, axis: int = 0) -> np.ndarray:
    """The axial slices usable as 2.5D centres: lung area >= ``min_area_fraction`` of the largest slice's, neighbours
    on both sides.

    Args:
        lung_mask: 0/1 lung mask, 3D.
        min_area_fraction: the fraction of the largest per-slice lung area a slice must reach.
        axis: the slice axis (0 for a SimpleITK array ``[z, y, x]``, -1 for MONAI's ``[x, y, z]``).

    Returns:
        slice indices, ascending (empty when there is no lung).

    Example:
        >>> mask = np.zeros((10, 4, 4)); mask[3:8, 1:3, 1:3] = 1
        >>> lung_slice_candidates(mask).tolist()
        [3, 4, 5, 6, 7]
    """
    mask = np.moveaxis(np.asarray(lung_mask) > 0, axis, 0)
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if area.max(initial=0) == 0:
        return np.zeros(0, dtype=int)
    keep = area >= min_area_fraction * area.max()
    keep[0] = keep[-1] = False  # z-1 and z+1 must exist
    return np.flatnonzero(keep)


def _evenly_spaced(candidates: Sequence[int], n: int) -> list[int]:
    """``n`` entries of ``candidates`` at evenly spaced quantiles (all of them when there are fewer)."""
    if len(candidates) <= n:
        return [int(c) for c in candidates]
    # The centre of each of n equal bins of the candidates: distinct, symmetric, away from the lung ends.
    positions = np.floor((np.arange(n) + 0.5) * len(candidates) / n).astype(int)
    return [int(candidates[p]) for p in positions]


def select_lung_slices(lung_mask: np.ndarray, n: int, min_area_fraction: float = 0.25, axis: int = 0) -> list[int]:
    """A fixed set of ``n`` axial slices spread evenly over the lungs (the evaluation slices of 2.5D).

    Args:
        lung_mask: 0/1 lung mask, 3D.
        n: the number of slices wanted.
        min_area_fraction: see ``lung_slice_candidates``.
        axis: the slice axis (0 for ``[z, y, x]``).

    Returns:
        up to ``n`` distinct slice indices, ascending, each with enough lung (see ``lung_slice_candidates``).

    Raises:
        ValueError: when the mask holds no lung or ``n`` < 1.

    Example:
        >>> mask = np.zeros((20, 4, 4)); mask[4:16, 1:3, 1:3] = 1
        >>> select_lung_slices(mask, 3)
        [6, 10, 14]
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    candidates = lung_slice_candidates(lung_mask, min_area_fraction, axis)
    if candidates.size == 0:
        raise ValueError("the lung mask is empty: no slice to select")
    return _evenly_spaced(candidates.tolist(), n)


# --------------------------------------------------------------------------------------------------------- conversion
def _source_fingerprint(path: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    stat = path.stat()
    return {"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **settings}


def _convert_case(entry: Mapping[str, Any], cache_dir: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Convert one case to the cache (or reuse it) and return its cache record. Raises ``ValueError`` on bad data."""
    source = Path(entry["image"])
    case = entry["case_id"]
    record_path = cache_dir / f"{case}.json"
    fingerprint = _source_fingerprint(source, settings)
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("fingerprint") == fingerprint and all(Path(record[k]).is_file() for k in ("image", "lung_mask")):
            return record
    image = sitk.ReadImage(str(source))
    problems = _intensity_problems(sitk.GetArrayViewFromImage(image))
    if problems:
        raise ValueError("; ".join(problems))
    ct = preprocess_volume(image, settings["spacing"], settings["margin_mm"])
    lung_slices = lung_slice_candidates(sitk.GetArrayViewFromImage(ct.lung_mask), settings["min_area_fraction"])
    if lung_slices.size == 0:
        raise ValueError("no axial slice with enough lung for 2.5D")
    record = {
        "image": str(cache_dir / f"{case}_ct.nii.gz"),
        "lung_mask": str(cache_dir / f"{case}_lung.nii.gz"),
        "lung_slices": lung_slices.tolist(),
        "spacing": list(ct.image.GetSpacing()),
        "size": list(ct.image.GetSize()),
        "body_box": [list(ct.body_box[0]), list(ct.body_box[1])],
        "fingerprint": fingerprint,
    }
    for key, volume in (("image", ct.image), ("lung_mask", ct.lung_mask)):
        with atomic_path(record[key]) as tmp:
            sitk.WriteImage(volume, str(tmp), True)
    atomic_write_json(record_path, record)  # written last: its presence means the case is complete
    return record


def convert_dataset(
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    spacing: Sequence[float] = DEFAULT_SPACING,
    margin_mm: float = CROP_MARGIN_MM,
    min_area_fraction: float = 0.25,
    skip_bad_cases: bool = False,
) -> dict[str, Any]:
    """Validate a STOIC dataset, preprocess every case once into ``cache_dir`` (NIfTI), and write ``manifest.json``.

    Headers and labels are validated before any conversion. A case already converted with the same settings from
    the same (unchanged) file is reused, not redone. Every file is written atomically; a case's record JSON is
    written last, so an interrupted conversion is redone, never trusted. Labels are always taken from the current
    reference.csv (a label fix needs no reconversion).

    Args:
        root: the dataset folder (see ``find_stoic_root``).
        cache_dir: where the NIfTI volumes, per-case records and ``manifest.json`` go.
        spacing: resampling voxel size in mm, (x, y, z).
        margin_mm: crop margin (see ``preprocess_volume``).
        min_area_fraction: lung-area fraction that makes a slice a 2.5D centre (see ``lung_slice_candidates``).
        skip_bad_cases: leave bad cases out (listed under ``"skipped"`` and logged) instead of raising.

    Returns:
        the manifest: ``{"settings": ..., "cases": [datalist entries with "image" (cached CT), "lung_mask",
        "lung_slices", "source" (the mha), labels and presence flags], "skipped": [problem strings]}``.

    Raises:
        DatasetValidationError: listing every problem, unless ``skip_bad_cases``.

    Example:
        >>> manifest = convert_dataset("stoic2021", "cache/stoic", spacing=(1.5, 1.5, 2.0))  # doctest: +SKIP
        >>> train_ds = Stoic25DDataset(manifest["cases"], training=True)  # doctest: +SKIP
    """
    root = find_stoic_root(root)
    cache_dir = Path(cache_dir)
    settings = {
        "spacing": [float(s) for s in spacing],
        "margin_mm": float(margin_mm),
        "min_area_fraction": float(min_area_fraction),
        "version": CONVERSION_VERSION,
    }
    report = validate_dataset(root, check_intensities=False)
    if report.problems and not skip_bad_cases:
        report.raise_if_problems()
    labels = read_reference(root / "metadata" / "reference.csv", ValidationReport(str(root)))
    cases = []
    for case in report.valid_cases:
        entry = _datalist_entry(case, root / "data" / "mha" / f"{case}.mha", labels[case])
        try:
            record = _convert_case(entry, cache_dir, settings)
        except (ValueError, RuntimeError) as err:
            report.add(entry["image"], str(err).strip().splitlines()[-1], case)
            continue
        cases.append(
            {
                **entry,
                "source": entry["image"],
                "image": record["image"],
                "lung_mask": record["lung_mask"],
                "lung_slices": record["lung_slices"],
            }
        )
    if report.problems and not skip_bad_cases:
        raise DatasetValidationError(report.problems, str(root))
    for problem in report.problems:
        logger.warning("STOIC case skipped: %s", problem)
    manifest = {"settings": settings, "cases": cases, "skipped": [str(p) for p in report.problems]}
    atomic_write_json(cache_dir / "manifest.json", manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ transforms, datasets
class SampleAxialSlabsd(Randomizable, MapTransform):
    """Cut 2.5D samples from a volume: axial slices ``z-1, z, z+1`` as three channels, for several ``z``.

    Training draws ``num_samples`` centres at random among the lung slices (without repetition while there are
    enough); evaluation takes ``num_samples`` fixed centres spread evenly over them (all candidates, each once,
    when there are fewer). Each sample is a copy of the input dict with the 2D image and ``slice_index``; the output
    is a list (``monai.data.list_data_collate``, the default of ``monai.data.DataLoader``, flattens it into the
    batch).

    Args:
        keys: the volume key(s), each ``[1, X, Y, Z]`` (channel first, axial axis last, as ``LoadImaged`` gives).
        slices_key: the key holding the candidate centre slices (indices along the last axis).
        num_samples: samples per volume.
        random: draw the centres at random (training) or take fixed, evenly spread ones (evaluation).
        index_key: where the chosen centre goes.
        allow_missing_keys: do not raise when a key is absent.

    Example:
        >>> sampler = SampleAxialSlabsd("image", num_samples=2, random=False)
        >>> out = sampler({"image": torch.zeros(1, 8, 8, 10), "lung_slices": [2, 5, 7]})
        >>> [s["image"].shape for s in out], [s["slice_index"] for s in out]
        ([torch.Size([3, 8, 8]), torch.Size([3, 8, 8])], [2, 7])
    """

    def __init__(
        self,
        keys: KeysCollection,
        slices_key: str = "lung_slices",
        num_samples: int = 4,
        random: bool = True,
        index_key: str = "slice_index",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.slices_key = slices_key
        self.num_samples = num_samples
        self.random = random
        self.index_key = index_key
        self._centres: list[int] = []

    def randomize(self, candidates: Sequence[int]) -> None:
        """Choose the centre slices among ``candidates``."""
        if not self.random:
            self._centres = _evenly_spaced(list(candidates), self.num_samples)
            return
        replace = len(candidates) < self.num_samples
        self._centres = [int(c) for c in self.R.choice(candidates, size=self.num_samples, replace=replace)]

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        candidates = [int(c) for c in data[self.slices_key]]
        if not candidates:
            raise ValueError(f"case {data.get('case_id', '?')}: no candidate slice in {self.slices_key!r}")
        self.randomize(candidates)
        samples = []
        for centre in self._centres:
            sample = dict(data)
            for key in self.key_iterator(sample):
                volume = sample[key]
                if not 1 <= centre <= volume.shape[-1] - 2:
                    raise ValueError(f"case {data.get('case_id', '?')}: slice {centre} has no neighbour in {key}")
                slab = volume[0, ..., centre - 1 : centre + 2]  # [X, Y, 3]
                sample[key] = convert_to_tensor(slab, track_meta=False).movedim(-1, 0).contiguous()
            sample[self.index_key] = centre
            samples.append(sample)
        return samples


_LABEL_KEYS = tuple(k for task in LABEL_COLUMNS for k in (task, f"{task}_present"))


def _load_window_transforms(window: Sequence[float]) -> list[Any]:
    return [
        LoadImaged(keys="image", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        ScaleIntensityRanged(keys="image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
    ]


def _label_transforms(extra_keys: Sequence[str]) -> list[Any]:
    return [
        EnsureTyped(keys=_LABEL_KEYS, data_type="tensor", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="image", data_type="tensor", dtype=torch.float32, track_meta=False),
        SelectItemsd(keys=("image", *_LABEL_KEYS, "case_id", *extra_keys)),
    ]


class Stoic25DDataset(Dataset):
    """2.5D STOIC dataset: per patient, a list of samples with ``image`` [3, H, W] (slices z-1, z, z+1 in the lung
    window, resized to ``image_size``), labels with presence flags, ``case_id`` and ``slice_index``.

    Training yields ``slices_per_patient`` random lung slices per patient and per epoch; evaluation yields
    ``eval_slices`` fixed ones, whose probabilities ``aggregate_patient_probabilities`` averages per patient.
    Use ``monai.data.DataLoader`` (its collate flattens the per-patient lists: a batch of B patients holds B x k
    slices).

    Args:
        data: manifest entries (``convert_dataset(...)["cases"]``).
        training: random (training) or fixed (evaluation) slices.
        image_size: side of the square output slices.
        slices_per_patient: samples per patient per epoch in training.
        eval_slices: samples per patient at evaluation.
        window: HU window mapped to [0, 1].
        seed: seed of the slice draws (workers of ``monai.data.DataLoader`` are reseeded from it).

    Example:
        >>> ds = Stoic25DDataset(manifest["cases"], training=True, image_size=224)  # doctest: +SKIP
        >>> [s["image"].shape for s in ds[0]]  # doctest: +SKIP
        [torch.Size([3, 224, 224]), ...]
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        training: bool = True,
        image_size: int = 224,
        slices_per_patient: int = 4,
        eval_slices: int = 8,
        window: Sequence[float] = LUNG_WINDOW,
        seed: int = 0,
    ) -> None:
        num_samples = slices_per_patient if training else eval_slices
        sampler = SampleAxialSlabsd("image", num_samples=num_samples, random=training)
        transform = Compose(
            [
                *_load_window_transforms(window),
                sampler,
                Resized(keys="image", spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True),
                *_label_transforms(("slice_index",)),
            ]
        )
        transform.set_random_state(seed=seed)  # after Compose, which reseeds its members from MONAI's global seed
        super().__init__(data=list(data), transform=transform)


class Stoic3DDataset(Dataset):
    """3D STOIC dataset: the resampled, cropped volume in the lung window, resized to a cube, ``image`` [1, D, H, W].

    Args:
        data: manifest entries (``convert_dataset(...)["cases"]``).
        volume_size: side of the output cube (the crop is resized anisotropically to it).
        window: HU window mapped to [0, 1].

    Example:
        >>> ds = Stoic3DDataset(manifest["cases"], volume_size=64)  # doctest: +SKIP
        >>> ds[0]["image"].shape  # doctest: +SKIP
        torch.Size([1, 64, 64, 64])
    """

    def __init__(
        self, data: Sequence[Mapping[str, Any]], volume_size: int = 64, window: Sequence[float] = LUNG_WINDOW
    ) -> None:
        transform = Compose(
            [
                *_load_window_transforms(window),
                Resized(keys="image", spatial_size=(volume_size,) * 3, mode="trilinear", anti_aliasing=True),
                *_label_transforms(()),
            ]
        )
        super().__init__(data=list(data), transform=transform)


def aggregate_patient_probabilities(
    case_ids: Iterable[str], probs: Iterable[float] | torch.Tensor | np.ndarray
) -> dict[str, float]:
    """Per-patient mean of slice-level values (probabilities; also labels or presence flags, constant per patient).

    Args:
        case_ids: the patient of each slice.
        probs: one value per slice (any shape that flattens to one per slice).

    Returns:
        ``{case_id: mean}`` in order of first appearance.

    Raises:
        ValueError: when the two lengths differ.

    Example:
        >>> aggregate_patient_probabilities(["1", "1", "2"], [0.2, 0.4, 0.9])
        {'1': 0.30000000000000004, '2': 0.9}
    """
    ids = [str(c) for c in case_ids]
    values = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=float).ravel()
    if len(ids) != values.size:
        raise ValueError(f"{len(ids)} case ids but {values.size} values")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for case, value in zip(ids, values):
        sums[case] = sums.get(case, 0.0) + float(value)
        counts[case] = counts.get(case, 0) + 1
    return {case: sums[case] / counts[case] for case in sums}
