"""Lung preprocessing of a chest CT: resampling to a stated spacing, body and lung masks by thresholding, crop, and
the choice of 2.5D centre slices inside the lungs (method in the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage import measure
from skimage.morphology import convex_hull_image

__all__ = [
    "DEFAULT_SPACING",
    "PreprocessedCT",
    "evenly_spaced",
    "lung_slice_candidates",
    "preprocess_volume",
    "preprocess_with_lung_slices",
    "select_lung_slices",
]

DEFAULT_SPACING: tuple[float, float, float] = (1.5, 1.5, 2.0)
AIR_HU = -1024
BODY_THRESHOLD_HU = -500.0
BODY_OPENING_MM = 4.0
LUNG_COMPONENT_FRACTION = 0.1
CROP_MARGIN_MM = 10.0
MIN_LUNG_AREA_FRACTION = 0.25  # a 2.5D centre slice holds at least this fraction of the largest lung slice's area


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


def lung_slice_candidates(
    lung_mask: np.ndarray, min_area_fraction: float = MIN_LUNG_AREA_FRACTION, axis: int = 0
) -> np.ndarray:
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


def evenly_spaced(candidates: Sequence[int], n: int) -> list[int]:
    """``n`` entries of ``candidates`` at evenly spaced quantiles (all of them when there are fewer).

    Args:
        candidates: the candidates, in order.
        n: how many to take.

    Returns:
        the chosen entries, in order.

    Example:
        >>> evenly_spaced(list(range(10)), 2)
        [2, 7]
    """
    if len(candidates) <= n:
        return [int(c) for c in candidates]
    # The centre of each of n equal bins of the candidates: distinct, symmetric, away from the lung ends.
    positions = np.floor((np.arange(n) + 0.5) * len(candidates) / n).astype(int)
    return [int(candidates[p]) for p in positions]


def select_lung_slices(
    lung_mask: np.ndarray, n: int, min_area_fraction: float = MIN_LUNG_AREA_FRACTION, axis: int = 0
) -> list[int]:
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
    return evenly_spaced(candidates.tolist(), n)


def preprocess_with_lung_slices(
    image: sitk.Image,
    spacing: Sequence[float] = DEFAULT_SPACING,
    margin_mm: float = CROP_MARGIN_MM,
    min_area_fraction: float = MIN_LUNG_AREA_FRACTION,
) -> tuple[PreprocessedCT, list[int]]:
    """``preprocess_volume`` followed by the 2.5D centre slices: the one preprocessing of training (the cache) and of
    inference (straight from the .mha), so that both see the same slices.

    Args:
        image: the CT in HU.
        spacing: output voxel size in mm, (x, y, z).
        margin_mm: crop margin.
        min_area_fraction: see ``lung_slice_candidates``.

    Returns:
        the preprocessed CT and its candidate centre slices (indices along z, ascending).

    Raises:
        ValueError: when no lungs are found or no slice holds enough lung.

    Example:
        >>> ct, slices = preprocess_with_lung_slices(sitk.ReadImage("1.mha"))  # doctest: +SKIP
    """
    ct = preprocess_volume(image, spacing, margin_mm)
    lung_slices = lung_slice_candidates(sitk.GetArrayViewFromImage(ct.lung_mask), min_area_fraction)
    if lung_slices.size == 0:
        raise ValueError("no axial slice with enough lung for 2.5D")
    return ct, [int(z) for z in lung_slices]
