"""Read RTSTRUCT contours and rasterise them onto a CT grid (even-odd rule within a contour plane: a contour inside a
contour is a hole; each CT slice shows the contour plane nearest to it)."""

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


# Tolerances in fractions of the CT's slice spacing. A contour lies on a slice's plane when it is within _ON_PLANE of
# it (positions are written with a few decimals); contours within _ON_PLANE of each other lie in one plane; a contour
# whose points spread over more than _PLANAR along the slice normal is not parallel to the slices.
_ON_PLANE = 0.01
_PLANAR = 0.25


@dataclass
class _ContourPlane:
    """The contours of one ROI that lie in one plane parallel to the CT's slices.

    Args:
        depth: the plane's continuous slice index (slice centres at integers).
        contours: the contours' continuous voxel indices (x, y, z), each [N, 3].
    """

    depth: float
    contours: list[np.ndarray] = field(default_factory=list)


@dataclass
class _PlaneFill:
    """A contour plane filled on the CT grid with the even-odd rule, and what was odd about its contours.

    Args:
        layer: the plane's mask [y, x].
        empty: how many of its contours enclose no voxel centre.
        partial_overlaps: how many pairs of its contours overlap without one containing the other.
    """

    layer: np.ndarray
    empty: int = 0
    partial_overlaps: int = 0


def _fill_plane(plane: _ContourPlane, shape: tuple[int, int]) -> _PlaneFill:
    """Fill one plane's contours (voxel centres inside the polygon) and combine them by exclusive or (even-odd rule).

    Args:
        plane: the contours of one plane.
        shape: the slice shape (rows, columns).

    Returns:
        the filled plane, with its empty contours and partially overlapping pairs counted.
    """
    layers: list[tuple[np.ndarray, tuple[int, int, int, int]]] = []
    result = _PlaneFill(np.zeros(shape, dtype=bool))
    for index in plane.contours:
        rows, cols = draw_polygon(index[:, 1], index[:, 0], shape=shape)
        if rows.size == 0:
            result.empty += 1
            continue
        layer = np.zeros(shape, dtype=bool)
        layer[rows, cols] = True
        box = (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max()))
        for other, (r0, r1, c0, c1) in layers:
            if box[0] > r1 or box[1] < r0 or box[2] > c1 or box[3] < c0:
                continue
            shared = int((layer & other).sum())
            if 0 < shared < min(rows.size, int(other.sum())):
                result.partial_overlaps += 1
        layers.append((layer, box))
        result.layer ^= layer
    return result


def _group_planes(contours: list[np.ndarray], reference: sitk.Image) -> tuple[list[_ContourPlane], list[float], int]:
    """Sort contours into planes parallel to ``reference``'s slices.

    Args:
        contours: [N, 3] arrays of LPS points in mm.
        reference: the CT grid.

    Returns:
        ``(planes, outside, tilted)``: the planes within half a slice spacing of the slice stack, ordered by depth;
        the continuous slice indices of the contours farther out; the number of contours not parallel to the slices.
    """
    size_z = reference.GetSize()[2]
    accepted: list[tuple[float, np.ndarray]] = []
    outside: list[float] = []
    tilted = 0
    for points in contours:
        index = physical_to_index(points, reference)
        if np.ptp(index[:, 2]) > _PLANAR:
            tilted += 1
            continue
        depth = float(np.mean(index[:, 2]))
        if -0.5 - _ON_PLANE <= depth <= size_z - 0.5 + _ON_PLANE:
            accepted.append((depth, index))
        else:
            outside.append(depth)
    accepted.sort(key=lambda item: item[0])
    planes: list[_ContourPlane] = []
    anchor = -np.inf
    for depth, index in accepted:
        if depth - anchor > _ON_PLANE:
            planes.append(_ContourPlane(depth))
            anchor = depth
        planes[-1].contours.append(index)
    for plane in planes:
        plane.depth = float(np.mean([np.mean(index[:, 2]) for index in plane.contours]))
    return planes, outside, tilted


def _slice_axis(reference: sitk.Image) -> tuple[str, float, float]:
    """How messages name positions along the slice normal of ``reference``.

    Args:
        reference: the CT grid.

    Returns:
        ``(name, position of slice 0, slice spacing)``: the name is ``"z"`` for axial slices; positions in mm.
    """
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    normal = direction[:, 2]
    name = "z" if abs(float(normal[2])) > 0.99 else "position along the slice normal"
    sign = 1.0 if name != "z" or normal[2] > 0 else -1.0
    return name, sign * float(np.asarray(reference.GetOrigin()) @ normal), sign * float(reference.GetSpacing()[2])


def rasterise_contours(contours: list[np.ndarray], reference: sitk.Image) -> tuple[np.ndarray, list[str]]:
    """Fill closed planar contours on the slices of ``reference``: even-odd rule in a plane, nearest plane per slice.

    Contours are first sorted into planes (contours within 1 % of the slice spacing of each other lie in one plane).
    Within one plane the contours are filled (voxel centres inside the polygon) and combined by exclusive or: a
    contour inside another cuts a hole, a contour inside that hole is an island again, disjoint contours add. Planes
    are never combined by exclusive or with each other (which cut rings into an ROI contoured on several planes per
    slice).

    What an off-plane contour means: a CT slice shows the ROI where it crosses the slice's plane, so each slice takes
    the contour plane nearest to it, provided it lies within half a slice spacing; planes at the same distance
    (within 1 %) are united. A contour plane on the slice (within 1 % of the spacing) is used as it is; a nearest
    plane off the slice's plane is used as if it lay on it (a note gives the counts and the largest distance); further
    planes nearer to no slice (a structure contoured more finely than the CT's slices) are not used (a note counts
    them): their union would thicken the ROI by up to half a slice on each side. Contours farther than half a slice
    spacing from every slice (beyond the stack) and contours not parallel to the slices are left out, with notes.
    A limitation of the nearest-plane rule: parts of one ROI drawn on different planes near one slice (say two nodes
    contoured at different heights) keep only the nearest plane's parts on that slice.

    Args:
        contours: [N, 3] arrays of LPS points in mm.
        reference: the CT image whose grid receives the mask.

    Returns:
        ``(mask, notes)``: a bool array [z, y, x] (SimpleITK array order) and notes, with counts, on contours left
        out, off the slice planes or not used, contours that enclose no voxel centre (when the mask is empty),
        contours of one plane that overlap partially (the even-odd rule leaves their overlap out), and contour planes
        that lie on and halfway between the slices (as when every other slice is missing from the CT series).

    Example:
        >>> ref = sitk.Image(8, 8, 2, sitk.sitkUInt8)
        >>> square = np.array([[1.5, 1.5, 0], [5.5, 1.5, 0], [5.5, 5.5, 0], [1.5, 5.5, 0]])
        >>> int(rasterise_contours([square], ref)[0].sum())
        16
    """
    size_x, size_y, size_z = reference.GetSize()
    mask = np.zeros((size_z, size_y, size_x), dtype=bool)
    planes, outside, tilted = _group_planes(contours, reference)
    fills: dict[int, _PlaneFill] = {}
    used_off_plane: set[int] = set()
    largest_offset = 0.0
    if planes:
        depths = np.asarray([plane.depth for plane in planes])
        for slice_k in range(size_z):
            distance = np.abs(depths - slice_k)
            near = np.flatnonzero(distance <= 0.5 + _ON_PLANE)
            if near.size == 0:
                continue
            for p in near[distance[near] <= distance[near].min() + _ON_PLANE]:
                p = int(p)
                if p not in fills:
                    fills[p] = _fill_plane(planes[p], (size_y, size_x))
                mask[slice_k] |= fills[p].layer
                if distance[p] > _ON_PLANE:
                    used_off_plane.add(p)
                    largest_offset = max(largest_offset, float(distance[p]))
    axis, first, step = _slice_axis(reference)
    half = abs(step) / 2.0
    notes = []
    if outside:
        where = [first + k * step for k in outside]
        span = sorted((first, first + (size_z - 1) * step))
        notes.append(
            f"{len(outside)} contour(s) lie outside the CT's slices ({axis} {min(where):.2f}..{max(where):.2f} mm; the "
            f"slices span {span[0]:.2f}..{span[1]:.2f} mm) and were left out: they are farther than half a slice "
            f"spacing ({half:.2f} mm) from every slice"
        )
    if tilted:
        notes.append(f"{tilted} contour(s) are not parallel to the CT's slices and were left out")
    if used_off_plane:
        count = sum(len(planes[p].contours) for p in used_off_plane)
        notes.append(
            f"{count} contour(s) on {len(used_off_plane)} plane(s) lie off the CT's slice planes (up to "
            f"{largest_offset * abs(step):.2f} mm away): each such plane was drawn on the slice it is nearest to, "
            f"within half a slice spacing ({half:.2f} mm)"
        )
    unused = [p for p in range(len(planes)) if p not in fills]
    if unused:
        count = sum(len(planes[p].contours) for p in unused)
        notes.append(
            f"{count} contour(s) on {len(unused)} further plane(s) between the CT's slices were not used: another "
            "contour plane lies nearer to each slice (the ROI was contoured more finely than the CT's slices)"
        )
    offsets = np.asarray([abs(plane.depth - np.rint(plane.depth)) for plane in planes])
    halfway = int((np.abs(offsets - 0.5) <= _ON_PLANE).sum())
    if halfway >= 2 and halfway + int((offsets <= _ON_PLANE).sum()) == len(planes) and halfway < len(planes):
        notes.append(
            f"{halfway} of the {len(planes)} contour planes lie halfway between two CT slices and the others on "
            "slices: the contours were drawn on twice as many slices as the CT series has (is every other slice "
            "missing?)"
        )
    empty = sum(f.empty for f in fills.values())
    if empty and not mask.any():  # small end contours of a structure are no news; an empty ROI needs a reason
        notes.append(f"{empty} contour(s) enclose no voxel centre (smaller than a voxel or outside the field of view)")
    partial = sum(f.partial_overlaps for f in fills.values())
    if partial:
        notes.append(
            f"{partial} pair(s) of contours in one plane overlap without one containing the other: by the even-odd "
            "rule their overlap is outside the ROI"
        )
    return mask, notes
