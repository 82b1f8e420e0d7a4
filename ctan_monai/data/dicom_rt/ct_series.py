"""Read a CT series (one file per slice, any order) into a SimpleITK volume in HU with the DICOM geometry."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813 (the conventional SimpleITK alias)

from ctan_monai.data.dicom_rt.pixels import pixel_array

__all__ = ["DicomSeriesError", "slice_geometry", "missing_slice_notes", "read_ct_series"]

# Relative tolerance on slice gaps; scanners write positions with a few decimals.
_GAP_TOLERANCE = 0.01
# A slice gap this many times the SliceThickness or more suggests missing slices (every other one: twice).
_GAP_PER_THICKNESS = 1.5


class DicomSeriesError(ValueError):
    """Raised when the files of a series do not form one regular volume; the message names the files at fault."""


def slice_geometry(ds: pydicom.Dataset, path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The position, orientation and pixel spacing of one image slice, checked for presence.

    Args:
        ds: the slice's dataset.
        path: the file, for messages.

    Returns:
        ``(position [3], orientation [2, 3] (row then column direction cosines), spacing [2] (x then y))``, where
        x is along a row (between columns) and y along a column (between rows), in mm, in DICOM's LPS frame.

    Raises:
        DicomSeriesError: when a tag is missing or malformed.

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> pos, ori, sp = slice_geometry(pydicom.dcmread(get_testdata_file("CT_small.dcm")), "CT_small.dcm")
        >>> ori.shape, sp.tolist()
        ((2, 3), [0.661468, 0.661468])
    """
    missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if t not in ds]
    if missing:
        raise DicomSeriesError(f"{path}: lacks {', '.join(missing)}; its geometry is unknown")
    try:
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64).reshape(2, 3)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    except (TypeError, ValueError) as err:
        raise DicomSeriesError(f"{path}: malformed geometry tags ({err})") from None
    if position.shape != (3,) or min(row_spacing, col_spacing) <= 0:
        raise DicomSeriesError(f"{path}: malformed ImagePositionPatient or PixelSpacing")
    norms = np.linalg.norm(orientation, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3) or abs(float(orientation[0] @ orientation[1])) > 1e-3:
        raise DicomSeriesError(f"{path}: ImageOrientationPatient is not two orthonormal vectors: {orientation.ravel()}")
    # PixelSpacing is (between rows, between columns) = (y, x).
    return position, orientation / norms[:, None], np.asarray([col_spacing, row_spacing])


def _float_tag(ds: pydicom.Dataset, keyword: str) -> float | None:
    """A positive numeric tag of ``ds``, or None when it is absent, empty, malformed or not positive."""
    try:
        value = float(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def missing_slice_notes(datasets: Sequence[pydicom.Dataset], step: float) -> list[str]:
    """Signs that slices are missing from an evenly spaced CT series (every other one, say), which the even gaps hide.

    Three signs are looked for: slice gaps of at least 1.5 times the SliceThickness (twice it when every other slice
    is missing); a SpacingBetweenSlices that differs from the measured gap; InstanceNumbers that run along the slice
    position but skip numbers. None of them proves a loss (a scan may be taken with gaps), so they are notes, not
    errors. Uneven gaps are errors of :func:`read_ct_series` itself; images that the RTSTRUCT refers to but the series
    lacks are errors of the conversion.

    Args:
        datasets: the slices' headers, ordered along the slice normal.
        step: the measured gap between neighbouring slices, mm.

    Returns:
        one note per sign found, naming the series (SeriesInstanceUID) and the values.

    Example:
        >>> a, b = pydicom.Dataset(), pydicom.Dataset()
        >>> a.SeriesInstanceUID = b.SeriesInstanceUID = "1.2.3"
        >>> a.SliceThickness = b.SliceThickness = "2.0"
        >>> missing_slice_notes([a, b], 4.0)[0][:60]
        'CT series 1.2.3: its slices are 4.000 mm apart but 2.000 mm '
    """
    if len(datasets) < 2:
        return []
    series = f"CT series {datasets[0].get('SeriesInstanceUID', '(no SeriesInstanceUID)')}"
    notes = []
    thickness = [_float_tag(ds, "SliceThickness") for ds in datasets]
    if all(t is not None for t in thickness):
        typical = float(np.median(np.asarray(thickness, dtype=np.float64)))
        if step >= _GAP_PER_THICKNESS * typical * (1 - _GAP_TOLERANCE):
            notes.append(
                f"{series}: its slices are {step:.3f} mm apart but {typical:.3f} mm thick (SliceThickness), "
                f"{step / typical:.2g} times: slices may be missing (every other one?), or the scan was taken with "
                "gaps between slices"
            )
    nominal = _float_tag(datasets[0], "SpacingBetweenSlices")
    if nominal is not None and abs(step - nominal) > _GAP_TOLERANCE * nominal:
        notes.append(
            f"{series}: its slices are {step:.3f} mm apart, not the {nominal:.3f} mm of its SpacingBetweenSlices: "
            "slices may be missing"
        )
    try:
        numbers = np.asarray([int(ds.InstanceNumber) for ds in datasets])
    except (AttributeError, TypeError, ValueError):
        return notes
    steps = np.diff(numbers)
    if ((steps > 0).all() or (steps < 0).all()) and (np.abs(steps) > 1).any():
        lacking = int(abs(numbers[-1] - numbers[0]) + 1 - len(numbers))
        notes.append(
            f"{series}: its InstanceNumbers run along the slice position from {numbers[0]} to {numbers[-1]} but "
            f"{lacking} of them are absent: slices may be missing"
        )
    return notes


def read_ct_series(paths: Sequence[str | os.PathLike[str]], notes: list[str] | None = None) -> sitk.Image:
    """Read the slices of one CT series into a volume in Hounsfield units.

    Slices are ordered by their position along the slice normal (not by file name or InstanceNumber); the volume's
    origin, spacing and direction come from ImagePositionPatient, PixelSpacing, ImageOrientationPatient and the
    measured slice gap (not SliceThickness), in DICOM's LPS patient frame as SimpleITK expects.

    Evenly spaced slices read without error even when some are missing at regular intervals (every other slice, say):
    :func:`missing_slice_notes` then appends its signs of a loss to ``notes``.

    Args:
        paths: the files of the series, in any order.
        notes: a list that receives notes on the series that do not stop the reading (signs of missing slices).

    Returns:
        a 3D image, int16 when RescaleSlope/RescaleIntercept keep the values integral, float32 otherwise.

    Raises:
        DicomSeriesError: for an empty series, inconsistent slice sizes/orientations/spacings, two slices at one
            position, uneven slice gaps, sheared stacks (gantry tilt), with the files named.
        DicomDecodeError: when a slice's compressed pixel data cannot be decoded (the missing plugin is named).

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> read_ct_series([get_testdata_file("CT_small.dcm")]).GetSize()
        (128, 128, 1)
    """
    if not paths:
        raise DicomSeriesError("empty CT series: no files")
    slices = []
    for path in paths:
        ds = pydicom.dcmread(path)
        position, orientation, spacing = slice_geometry(ds, path)
        slices.append((path, ds, position, orientation, spacing))
    path0, ds0, _, orientation0, spacing0 = slices[0]
    size0 = (int(ds0.Rows), int(ds0.Columns))
    for path, ds, _, orientation, spacing in slices[1:]:
        if (int(ds.Rows), int(ds.Columns)) != size0:
            raise DicomSeriesError(f"{path}: slice size {ds.Rows}x{ds.Columns} differs from {path0}'s {size0}")
        if not np.allclose(orientation, orientation0, atol=1e-4):
            raise DicomSeriesError(f"{path}: ImageOrientationPatient differs from {path0}'s")
        if not np.allclose(spacing, spacing0, rtol=1e-4):
            raise DicomSeriesError(f"{path}: PixelSpacing {spacing[::-1]} differs from {path0}'s {spacing0[::-1]}")
    normal = np.cross(orientation0[0], orientation0[1])
    slices.sort(key=lambda s: float(s[2] @ normal))
    depths = np.asarray([float(s[2] @ normal) for s in slices])
    origin = slices[0][2]
    if len(slices) > 1:
        gaps = np.diff(depths)
        k = int(np.argmin(gaps))
        if gaps[k] < 1e-3:
            raise DicomSeriesError(f"{slices[k][0]} and {slices[k + 1][0]}: two slices at the same position")
        step = float(np.median(gaps))
        uneven = np.flatnonzero(np.abs(gaps - step) > _GAP_TOLERANCE * step)
        if uneven.size:
            i = int(uneven[0])
            raise DicomSeriesError(
                f"{slices[i][0]} -> {slices[i + 1][0]}: slice gap {gaps[i]:.3f} mm differs from the series' "
                f"{step:.3f} mm (missing slice or uneven spacing); gaps found: {sorted(set(np.round(gaps, 3)))}"
            )
        shear = [s[2] - origin - (d - depths[0]) * normal for s, d in zip(slices, depths)]
        worst = int(np.argmax([np.linalg.norm(v) for v in shear]))
        if np.linalg.norm(shear[worst]) > 0.01 * max(step, float(spacing0.min())) + 1e-3:
            raise DicomSeriesError(
                f"{slices[worst][0]}: slice positions are not along the slice normal (gantry tilt / sheared "
                "stack), which a regular volume cannot represent"
            )
        if notes is not None:
            notes.extend(missing_slice_notes([s[1] for s in slices], step))
    else:
        step = float(ds0.get("SliceThickness", 0) or 0) or 1.0
    volume = []
    integral = True
    for path, ds, *_ in slices:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        integral &= slope.is_integer() and intercept.is_integer()
        pixels = pixel_array(ds, path)
        if pixels.shape != size0:
            raise DicomSeriesError(f"{path}: pixel data of shape {pixels.shape}, expected one {size0} slice")
        volume.append(pixels.astype(np.float32) * slope + intercept)
    array = np.stack(volume)
    if integral and array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max:
        array = array.astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing((float(spacing0[0]), float(spacing0[1]), step))
    image.SetDirection(tuple(float(v) for v in np.column_stack([orientation0[0], orientation0[1], normal]).ravel()))
    return image
