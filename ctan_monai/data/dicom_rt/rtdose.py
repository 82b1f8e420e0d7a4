"""Read an RTDOSE grid in Gy and resample it onto a CT grid."""

from __future__ import annotations

import math
import os

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813 (the conventional SimpleITK alias)

from ctan_monai.data.dicom_rt.ct_series import slice_geometry
from ctan_monai.data.dicom_rt.pixels import pixel_array
from ctan_monai.data.validation import MAX_PLAUSIBLE_DOSE_GY, implausible_dose_problem

__all__ = ["DoseUnitsError", "read_rtdose", "resample_dose", "dose_support"]


class DoseUnitsError(ValueError):
    """Raised when an RTDOSE's DoseUnits are not GY (e.g. RELATIVE) and the caller asked for Gy."""


def _frame_depths(ds: pydicom.Dataset, path: str | os.PathLike[str], n_frames: int, depth0: float) -> np.ndarray:
    """Depth of each frame along the slice normal, from GridFrameOffsetVector (relative or absolute form)."""
    if n_frames == 1 and "GridFrameOffsetVector" not in ds:
        return np.asarray([depth0])
    if "GridFrameOffsetVector" not in ds:
        raise ValueError(f"{path}: multi-frame RTDOSE without GridFrameOffsetVector")
    offsets = np.asarray([float(v) for v in ds.GridFrameOffsetVector], dtype=np.float64)
    if offsets.size != n_frames:
        raise ValueError(f"{path}: GridFrameOffsetVector has {offsets.size} values for {n_frames} frames")
    # PS3.3 C.8.8.3.2: offsets starting at 0 are relative to ImagePositionPatient; otherwise (an older form) they
    # are absolute positions along the normal, the first equal to the position's.
    return offsets + depth0 if offsets[0] == 0 else offsets


def _dose_value_problems(values: np.ndarray, scaling: float, units: str, max_dose_gy: float | None) -> list[str]:
    """What is wrong with the scaled dose values: non-finite, negative, or (in Gy) implausibly high."""
    problems = []
    finite = np.isfinite(values)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} dose value(s) are NaN or infinite")
    negative = finite & (values < 0)
    if negative.any():
        problems.append(f"{int(negative.sum())} negative dose value(s) (min {float(values[negative].min()):.6g})")
    if units == "GY" and max_dose_gy is not None and finite.any():
        highest = float(values[finite].max())
        problem = implausible_dose_problem(highest, max_dose_gy)
        if problem:
            problems.append(f"{problem} (stored maximum {highest / scaling:.6g} x DoseGridScaling {scaling:g})")
    return problems


def read_rtdose(
    path: str | os.PathLike[str], require_gy: bool = True, max_dose_gy: float | None = MAX_PLAUSIBLE_DOSE_GY
) -> sitk.Image:
    """Read an RTDOSE file into a float32 volume, pixel values times DoseGridScaling.

    Frames are placed from ImagePositionPatient and GridFrameOffsetVector (relative offsets, the first being 0, or
    the older absolute form), in any order; an uneven frame spacing is resampled linearly onto an even one (the
    smallest gap), since a SimpleITK image has one spacing per axis. The scaled values are checked before anything
    is built from them: finite, not negative and, in Gy, at most ``max_dose_gy`` (a grid in cGy or mGy, or a wrong
    DoseGridScaling, would otherwise train a network 100 or 1000 times off).

    Args:
        path: the RTDOSE file.
        require_gy: raise unless DoseUnits is GY; with False a RELATIVE dose is read as scaled values.
        max_dose_gy: the highest plausible dose in Gy (see ``MAX_PLAUSIBLE_DOSE_GY``); None skips that check.

    Returns:
        the dose volume in the LPS frame; its DoseUnits are in the image's metadata key ``"DoseUnits"``.

    Raises:
        ValueError: naming the file for a missing or malformed tag (not an RTDOSE, no DoseGridScaling or one that is
            not a positive finite number, frame offsets not matching the frames), and for NaN, infinite or negative
            dose values or a maximum above ``max_dose_gy`` Gy (the value and the likely cGy / mGy error named).
        DoseUnitsError: when ``require_gy`` and DoseUnits is not GY.
        DicomDecodeError: when compressed pixel data cannot be decoded.

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> dose = read_rtdose(get_testdata_file("rtdose.dcm"), require_gy=False)
        >>> dose.GetSize(), dose.GetSpacing(), dose.GetMetaData("DoseUnits")
        ((10, 10, 15), (10.0, 10.0, 5.0), 'RELATIVE')
    """
    ds = pydicom.dcmread(path, force=True)
    if str(ds.get("Modality", "")).upper() != "RTDOSE":
        raise ValueError(f"{path}: Modality is {ds.get('Modality')!r}, not RTDOSE")
    units = str(ds.get("DoseUnits", "")).upper()
    if require_gy and units != "GY":
        raise DoseUnitsError(f"{path}: DoseUnits is {units or 'absent'!r}, not GY; the dose cannot be read in Gy")
    if ds.get("DoseGridScaling") in (None, ""):
        raise ValueError(f"{path}: RTDOSE without DoseGridScaling")
    try:
        scaling = float(ds.DoseGridScaling)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: DoseGridScaling {ds.DoseGridScaling!r} is not a number") from None
    if not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"{path}: DoseGridScaling {scaling} is not a positive finite number")
    position, orientation, spacing = slice_geometry(ds, path)
    values = pixel_array(ds, path).astype(np.float64) * scaling
    problems = _dose_value_problems(values, scaling, units, max_dose_gy)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    if values.ndim == 2:
        values = values[None]
    normal = np.cross(orientation[0], orientation[1])
    depths = _frame_depths(ds, path, values.shape[0], float(position @ normal))
    order = np.argsort(depths)
    depths, values = depths[order], values[order]
    origin = position + (depths[0] - float(position @ normal)) * normal
    step = 1.0
    if depths.size > 1:
        gaps = np.diff(depths)
        if gaps.min() <= 1e-6:
            raise ValueError(f"{path}: two dose frames at the same offset")
        step = float(gaps.min())
        if np.ptp(gaps) > 1e-3 * step:
            even = depths[0] + step * np.arange(int(np.floor((depths[-1] - depths[0]) / step + 1e-6)) + 1)
            upper = np.clip(np.searchsorted(depths, even, side="right"), 1, depths.size - 1)
            w = np.clip((even - depths[upper - 1]) / (depths[upper] - depths[upper - 1]), 0.0, 1.0)[:, None, None]
            values = (1 - w) * values[upper - 1] + w * values[upper]
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing((float(spacing[0]), float(spacing[1]), step))
    image.SetDirection(tuple(float(v) for v in np.column_stack([orientation[0], orientation[1], normal]).ravel()))
    image.SetMetaData("DoseUnits", units)
    return image


def resample_dose(dose: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Linearly resample a dose volume onto ``reference``'s grid; 0 Gy outside the dose grid.

    Args:
        dose: the dose volume (e.g. from :func:`read_rtdose`).
        reference: the CT volume.

    Returns:
        a float32 image on the reference grid.

    Example:
        >>> dose = sitk.Image(4, 4, 4, sitk.sitkFloat32) + 2.0
        >>> ct = sitk.Image(8, 8, 8, sitk.sitkInt16)
        >>> ct.SetSpacing((0.5, 0.5, 0.5))
        >>> float(sitk.GetArrayFromImage(resample_dose(dose, ct))[0, 0, 0])
        2.0
    """
    return sitk.Resample(dose, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def dose_support(dose: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Where on ``reference``'s grid the dose grid is defined (voxel centres within the dose grid's voxels).

    Args:
        dose: the dose volume.
        reference: the CT volume.

    Returns:
        a bool array [z, y, x] in SimpleITK array order.

    Example:
        >>> dose = sitk.Image(2, 2, 2, sitk.sitkFloat32)
        >>> int(dose_support(dose, sitk.Image(4, 4, 4, sitk.sitkInt16)).sum())
        8
    """
    ones = sitk.Image(dose.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(dose)
    covered = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(covered).astype(bool)
