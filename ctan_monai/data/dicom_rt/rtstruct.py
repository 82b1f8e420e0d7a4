"""Read RTSTRUCT contours and rasterise them onto a CT grid (even-odd rule: a contour inside a contour is a hole)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813 (the conventional SimpleITK alias)
from pydicom.dataelem import RawDataElement
from skimage.draw import polygon as draw_polygon

__all__ = ["RTStructROI", "RTStruct", "read_rtstruct", "physical_to_index", "rasterise_contours"]


@dataclass
class RTStructROI:
    """One ROI of a structure set.

    Args:
        number: ROINumber.
        name: ROIName as written.
        frame_of_reference: the ROI's ReferencedFrameOfReferenceUID ("" when absent).
        contours: its closed planar contours, each an [N, 3] array of LPS points in mm.
        skipped: how many contours were not closed planar polygons (points, open lines) and were left out.
    """

    number: int
    name: str
    frame_of_reference: str = ""
    contours: list[np.ndarray] = field(default_factory=list)
    skipped: int = 0


@dataclass
class RTStruct:
    """A structure set: its ROIs and the series / frames of reference it refers to.

    Args:
        path: the file.
        rois: the ROIs by name (the first ROI of a repeated name is kept).
        frames_of_reference: every FrameOfReferenceUID the file refers to.
        referenced_series: the SeriesInstanceUIDs of the images it was drawn on.
        series_images: SeriesInstanceUID -> the SOPInstanceUIDs its RTReferencedSeriesSequence lists
            (ContourImageSequence): the images of the series the structure set was drawn on.
        contour_images: the SOPInstanceUIDs the contours themselves refer to (their ContourImageSequence).
    """

    path: str
    rois: dict[str, RTStructROI]
    frames_of_reference: set[str]
    referenced_series: set[str]
    series_images: dict[str, set[str]] = field(default_factory=dict)
    contour_images: set[str] = field(default_factory=set)


def _contour_values(contour: pydicom.Dataset) -> np.ndarray:
    """ContourData as floats. Raw (not yet converted) values are parsed from their bytes: pydicom's per-value DS
    checks are slow on the hundreds of thousands of values of a clinical structure set."""
    if "ContourData" not in contour:
        return np.zeros(0)
    element = contour.get_item("ContourData")
    if isinstance(element, RawDataElement) and isinstance(element.value, bytes):
        text = element.value.decode("ascii", errors="replace").strip(" \x00")
        return np.asarray([float(v) for v in text.split("\\") if v.strip()], dtype=np.float64)
    return np.atleast_1d(np.asarray(contour.ContourData, dtype=np.float64)).ravel()


def read_rtstruct(path: str | os.PathLike[str]) -> RTStruct:
    """Read the ROIs and closed planar contours of an RTSTRUCT file.

    Args:
        path: the RTSTRUCT file.

    Returns:
        the structure set.

    Raises:
        ValueError: naming the file when it is not an RTSTRUCT, has no StructureSetROISequence, or has a contour
            whose ContourData is not a list of x, y, z triplets.

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> rois = read_rtstruct(get_testdata_file("rtstruct.dcm")).rois
        >>> sorted(rois), len(rois["patient"].contours)
        (['Isocenter 1', 'Isocenter 2', 'patient'], 3)
    """
    # force: older exports omit the 128-byte preamble; the Modality check below rejects non-DICOM files.
    ds = pydicom.dcmread(path, force=True)
    if str(ds.get("Modality", "")).upper() != "RTSTRUCT":
        raise ValueError(f"{path}: Modality is {ds.get('Modality')!r}, not RTSTRUCT")
    if "StructureSetROISequence" not in ds:
        raise ValueError(f"{path}: RTSTRUCT without StructureSetROISequence")
    rois_by_number: dict[int, RTStructROI] = {}
    for item in ds.StructureSetROISequence:
        number = int(item.ROINumber)
        rois_by_number[number] = RTStructROI(
            number, str(item.get("ROIName", f"ROI{number}")), str(item.get("ReferencedFrameOfReferenceUID", ""))
        )
    contour_images: set[str] = set()
    for item in ds.get("ROIContourSequence", []):
        roi = rois_by_number.get(int(item.ReferencedROINumber))
        if roi is None:
            continue  # contours of an ROI the structure set does not declare: nothing names them
        for contour in item.get("ContourSequence", []):
            for image in contour.get("ContourImageSequence", []):
                if image.get("ReferencedSOPInstanceUID"):
                    contour_images.add(str(image.ReferencedSOPInstanceUID))
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
            data = _contour_values(contour)
            if len(data) % 3:
                raise ValueError(f"{path}: ROI {roi.name!r} has ContourData of {len(data)} values, not x,y,z triplets")
            if kind != "CLOSED_PLANAR" or len(data) < 9:
                roi.skipped += 1
                continue
            roi.contours.append(data.reshape(-1, 3))
    frames = {r.frame_of_reference for r in rois_by_number.values() if r.frame_of_reference}
    series: set[str] = set()
    series_images: dict[str, set[str]] = {}
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        if ref.get("FrameOfReferenceUID"):
            frames.add(str(ref.FrameOfReferenceUID))
        for study in ref.get("RTReferencedStudySequence", []):
            for s in study.get("RTReferencedSeriesSequence", []):
                series.add(str(s.SeriesInstanceUID))
                images = series_images.setdefault(str(s.SeriesInstanceUID), set())
                images.update(
                    str(i.ReferencedSOPInstanceUID)
                    for i in s.get("ContourImageSequence", [])
                    if i.get("ReferencedSOPInstanceUID")
                )
    rois: dict[str, RTStructROI] = {}
    for roi in sorted(rois_by_number.values(), key=lambda r: r.number):
        rois.setdefault(roi.name, roi)
    return RTStruct(str(path), rois, frames, series, series_images, contour_images)


def physical_to_index(points: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """Continuous voxel indices (x, y, z order, voxel centres at integers) of LPS points on ``reference``'s grid.

    Args:
        points: [N, 3] physical points in mm.
        reference: the image whose grid is used.

    Returns:
        [N, 3] continuous indices.

    Example:
        >>> ref = sitk.Image(4, 4, 4, sitk.sitkUInt8)
        >>> ref.SetSpacing((2.0, 2.0, 3.0))
        >>> physical_to_index(np.array([[2.0, 4.0, 3.0]]), ref).tolist()
        [[1.0, 2.0, 1.0]]
    """
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    scale = direction * np.asarray(reference.GetSpacing())[None, :]
    offset = np.asarray(points, dtype=np.float64) - np.asarray(reference.GetOrigin())[None, :]
    return np.linalg.solve(scale, offset.T).T


def rasterise_contours(contours: list[np.ndarray], reference: sitk.Image) -> tuple[np.ndarray, list[str]]:
    """Fill closed planar contours on the slices of ``reference`` with the even-odd rule.

    Each contour is filled on the slice nearest to its plane (voxel centres inside the polygon); contours on one
    slice are combined by exclusive or, so that a contour inside another one cuts a hole and disjoint contours add.

    Args:
        contours: [N, 3] arrays of LPS points in mm.
        reference: the CT image whose grid receives the mask.

    Returns:
        ``(mask, notes)``: a bool array [z, y, x] (SimpleITK array order) and notes on contours left out (outside
        the grid's slices or not parallel to them).

    Example:
        >>> ref = sitk.Image(8, 8, 2, sitk.sitkUInt8)
        >>> square = np.array([[1.5, 1.5, 0], [5.5, 1.5, 0], [5.5, 5.5, 0], [1.5, 5.5, 0]])
        >>> int(rasterise_contours([square], ref)[0].sum())
        16
    """
    size_x, size_y, size_z = reference.GetSize()
    mask = np.zeros((size_z, size_y, size_x), dtype=bool)
    outside = off_plane = 0
    for points in contours:
        index = physical_to_index(points, reference)
        k = float(np.mean(index[:, 2]))
        if np.ptp(index[:, 2]) > 0.25:
            off_plane += 1
            continue
        slice_k = int(np.rint(k))
        if not 0 <= slice_k < size_z or abs(k - slice_k) > 0.5:
            outside += 1
            continue
        rows, cols = draw_polygon(index[:, 1], index[:, 0], shape=(size_y, size_x))
        layer = np.zeros((size_y, size_x), dtype=bool)
        layer[rows, cols] = True
        mask[slice_k] ^= layer
    notes = []
    if outside:
        notes.append(f"{outside} contour(s) lie outside the CT's slices")
    if off_plane:
        notes.append(f"{off_plane} contour(s) are not parallel to the CT's slices")
    return mask, notes
