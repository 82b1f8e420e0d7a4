"""Reliability: DICOM-RT contours end up exactly where they were drawn (issue 16, "DICOM-RT: contours exactly where
they were drawn").

One test per item: contours off the CT's slice planes (a sphere contoured every 0.2 mm on 3 mm slices), holes and
nested contours in one plane with further planes between the slices, overlapping ROIs and a class emptied by the
overlap rule, a CT series with every other slice missing, RTSTRUCT / RTDOSE stored in another study, two CT series in
one study, and empty ROIs with their reasons plus the ``--skip-bad`` hint. The expected masks come from the test's
own rasterisation (analytic shapes and a crossing-number point-in-polygon test on the voxel centres in numpy), never
from the converter's code. Inputs are the tiny synthetic patients of :mod:`ctan_monai.apps.prostate.demo`, edited
with pydicom.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813 (the conventional SimpleITK alias)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from ctan_monai.apps.prostate.demo import SyntheticPatient, write_prostate_demo
from ctan_monai.data.dicom_rt import convert_dicom_rt
from ctan_monai.data.dicom_rt.__main__ import main
from ctan_monai.data.validation import DatasetValidationError

SHAPE = (24, 24, 8)  # CT size (x, y, z) of the synthetic patients unless a test needs more


def _modality(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).Modality)


def _of_modality(patient: SyntheticPatient, modality: str) -> list[Path]:
    return [p for p in patient.files if _modality(p) == modality]


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _axes(patient: SyntheticPatient) -> list[np.ndarray]:
    """Voxel-centre coordinates (mm) along x, y and z of the patient's CT."""
    size = patient.ct.shape[::-1]
    return [patient.origin[i] + patient.spacing[i] * np.arange(size[i]) for i in range(3)]


def _circle(cx: float, cy: float, radius: float, z: float, n: int = 180) -> np.ndarray:
    angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles), np.full(n, z)], axis=1)


def _square(x0: float, x1: float, y0: float, y1: float, z: float) -> np.ndarray:
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=np.float64)


def _even_odd(polygons: list[np.ndarray], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The test's own rasterisation: voxel centres ([y, x]) inside an odd number of ``polygons`` (crossing number)."""
    px, py = np.meshgrid(xs, ys)
    inside = np.zeros(px.shape, dtype=bool)
    for polygon in polygons:
        x1, y1 = polygon[:, 0], polygon[:, 1]
        for a, b, c, d in zip(x1, y1, np.roll(x1, -1), np.roll(y1, -1)):
            if b == d:
                continue  # a horizontal edge crosses no horizontal ray
            straddles = (b > py) != (d > py)
            inside ^= straddles & (px < a + (py - b) * (c - a) / (d - b))
    return inside


def _set_contours(struct_path: Path, contours: dict[str, list[np.ndarray]]) -> None:
    """Replace the contours of the named ROIs (closed planar, without image references)."""
    ds = pydicom.dcmread(struct_path)
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in ds.StructureSetROISequence}
    for item in ds.ROIContourSequence:
        polygons = contours.get(names[int(item.ReferencedROINumber)])
        if polygons is None:
            continue
        item.ContourSequence = DicomSequence()
        for polygon in polygons:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(polygon)
            contour.ContourData = [f"{v:.4f}" for v in polygon.ravel()]
            item.ContourSequence.append(contour)
    ds.save_as(struct_path)


def _strip_image_references(
    struct_path: Path, listed: bool = True, series: bool = False, contours: bool = True
) -> None:
    """Remove references from an RTSTRUCT: the CT images its RTReferencedSeriesSequence lists (``listed``), the
    series it names (``series``), the CT image each contour names (``contours``)."""
    ds = pydicom.dcmread(struct_path)
    for frame in ds.ReferencedFrameOfReferenceSequence:
        if series and "RTReferencedStudySequence" in frame:
            del frame.RTReferencedStudySequence
        elif listed and not series:
            for study in frame.RTReferencedStudySequence:
                for item in study.RTReferencedSeriesSequence:
                    del item.ContourImageSequence
    if contours:
        for item in ds.ROIContourSequence:
            for contour in item.get("ContourSequence", []):
                if "ContourImageSequence" in contour:
                    del contour.ContourImageSequence
    ds.save_as(struct_path)


def _messages(result_or_error: object) -> list[str]:
    problems = getattr(result_or_error, "warnings", None) or getattr(result_or_error, "problems", [])
    return [p.message for p in problems]


# ------------------------------------------------------------------------------------ contours off the slice planes
def test_reliability_dicom_rt_sphere_contoured_off_plane_matches_the_analytic_sphere(tmp_path: Path) -> None:
    patient = write_prostate_demo(tmp_path / "dicom", 1, shape=(28, 28, 14), spacing=(2.5, 2.5, 3.0))[0]
    xs, ys, zs = _axes(patient)
    centre = np.array([xs.mean() + 0.31, ys.mean() - 0.47, zs.mean() + 0.05])
    radius = 13.0
    # Contoured every 0.2 mm, as on a fine MR or a 0.2 mm CT: 15 planes per 3 mm CT slice, none on a slice's plane.
    heights = np.arange(-radius + 0.11, radius, 0.2)  # 0.06 mm off every slice plane
    planes = [_circle(centre[0], centre[1], float(np.sqrt(radius**2 - h**2)), centre[2] + h) for h in heights]
    _set_contours(_of_modality(patient, "RTSTRUCT")[0], {"Bladder": planes})
    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "out", organs=["Bladder"])
    label = _read(tmp_path / "out" / result.entries[0]["label"]) == 1

    zz, yy, xx = np.meshgrid(zs, ys, xs, indexing="ij")
    sphere = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2 < radius**2
    assert _dice(label, sphere) > 0.99  # 0.94 when every plane was XORed onto its nearest slice
    # Exactly the test's own rasterisation of the plane nearest to each slice (within half a slice).
    expected = np.zeros_like(label)
    used = set()
    for k, z in enumerate(zs):
        nearest = int(np.argmin(np.abs(centre[2] + heights - z)))
        if abs(centre[2] + heights[nearest] - z) <= 1.5:
            expected[k] = _even_odd([planes[nearest]], xs, ys)
            used.add(nearest)
    np.testing.assert_array_equal(label, expected)
    notes = " | ".join(_messages(result))
    assert f"{len(used)} contour(s) on {len(used)} plane(s) lie off the CT's slice planes (up to" in notes
    unused = len(planes) - len(used)
    assert f"{unused} contour(s) on {unused} further plane(s) between the CT's slices were not used" in notes


# -------------------------------------------------------------- holes and nested contours in one plane, planes apart
def test_reliability_dicom_rt_holes_and_islands_in_one_plane_with_further_planes_between_slices(
    tmp_path: Path,
) -> None:
    patient = write_prostate_demo(tmp_path / "dicom", 1, shape=(28, 28, 8), spacing=(2.5, 2.5, 3.0))[0]
    xs, ys, zs = _axes(patient)
    cx, cy = xs.mean() + 0.37, ys.mean() - 0.29

    def plane(z: float) -> list[np.ndarray]:
        """A ring with an island in its hole, and a disjoint square; radii vary with the height."""
        t = z - zs.mean()
        outer, hole, island = 15.0 + 2.0 * np.sin(t / 7.0), 9.0 + 1.5 * np.sin(t / 5.0), 4.0 + 0.1 * t
        return [
            _circle(cx, cy, outer, z),
            _circle(cx, cy, hole, z),
            _circle(cx + 0.5, cy, island, z),
            _square(cx + 21.1, cx + 29.3, cy - 5.2, cy + 5.3, z),
        ]

    # Contoured every 1 mm on 3 mm slices: one plane on each slice, two between.
    contours = [c for z in zs for offset in (-1.0, 0.0, 1.0) for c in plane(float(z) + offset)]
    _set_contours(_of_modality(patient, "RTSTRUCT")[0], {"Rectum": contours})
    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "out", organs=["Rectum"])
    label = _read(tmp_path / "out" / result.entries[0]["label"]) == 1
    expected = np.stack([_even_odd(plane(float(z)), xs, ys) for z in zs])
    assert expected.any(axis=(1, 2)).all()
    assert not expected[:, 14, 16].any() and expected[:, 14, 14].all()  # in the hole; on the island inside it
    np.testing.assert_array_equal(label, expected)  # old: planes XORed onto one slice cut rings into each other
    unused = 2 * len(zs)
    assert f"{4 * unused} contour(s) on {unused} further plane(s) between the CT's slices" in " | ".join(
        _messages(result)
    )


# -------------------------------------------------------------------------------- overlaps and label_class_present
def test_reliability_dicom_rt_overlaps_and_a_class_emptied_by_them_is_absent_with_a_warning(tmp_path: Path) -> None:
    patient = write_prostate_demo(tmp_path / "dicom", 1, shape=SHAPE, spacing=(2.5, 2.5, 3.0))[0]
    xs, ys, zs = _axes(patient)
    cx, cy = xs.mean() + 0.21, ys.mean() - 0.13
    shapes = {
        "Rectum": lambda z: [_circle(cx - 4.0, cy, 10.0, z)],
        "Bladder": lambda z: [_circle(cx + 6.0, cy + 1.0, 9.0, z)],  # overlaps the rectum partly
        "Femur_L": lambda z: [_circle(cx - 8.0, cy, 3.0, z)],  # inside the rectum: loses all its voxels
    }
    _set_contours(
        _of_modality(patient, "RTSTRUCT")[0],
        {name: [c for z in zs for c in shape(float(z))] for name, shape in shapes.items()},
    )
    organs = ["Rectum", "Bladder", "Femur_L"]
    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "out", organs=organs)
    label = _read(tmp_path / "out" / result.entries[0]["label"])
    own = {name: np.stack([_even_odd(shape(float(z)), xs, ys) for z in zs]) for name, shape in shapes.items()}
    assert (own["Rectum"] & own["Bladder"]).sum() > 20 and not (own["Femur_L"] & ~own["Rectum"]).any()
    np.testing.assert_array_equal(label == 1, own["Rectum"])
    np.testing.assert_array_equal(label == 2, own["Bladder"] & ~own["Rectum"])  # the first organ wins the overlap
    assert not (label == 3).any()
    assert result.entries[0]["label_class_present"] == [1, 1, 1, 0]  # was [1, 1, 1, 1]: "present" with 0 voxels
    (warning,) = [m for m in _messages(result) if "'Femur_L'" in m]
    assert "entirely inside Rectum" in warning and "0 voxels remain" in warning


# --------------------------------------------------------------------------------- every other CT slice missing
def test_reliability_dicom_rt_every_other_ct_slice_missing_is_warned_naming_the_series(tmp_path: Path) -> None:
    patient = write_prostate_demo(tmp_path / "dicom", 1, shape=(24, 24, 12), spacing=(6.0, 6.0, 3.0))[0]
    ct_files = sorted(
        _of_modality(patient, "CT"),
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    _strip_image_references(_of_modality(patient, "RTSTRUCT")[0])  # an RTSTRUCT that lists no images
    for path in ct_files[1::2]:
        path.unlink()  # even gaps of 6 mm remain: nothing in the positions alone shows the loss
    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "out")
    assert len(result.entries) == 1  # the grid is regular: converted, but not silently
    series_uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID)
    messages = _messages(result)
    (thickness,) = [m for m in messages if "thick (SliceThickness)" in m]
    assert f"CT series {series_uid}" in thickness and "6.000 mm apart but 3.000 mm thick" in thickness
    halfway = [m for m in messages if "halfway between two CT slices" in m]
    assert halfway and all("every other slice missing" in m for m in halfway)


# --------------------------------------------------------------------- pairing: other studies, two CT series
def test_reliability_dicom_rt_rtstruct_and_rtdose_in_another_study_are_paired_with_the_ct(tmp_path: Path) -> None:
    patient = write_prostate_demo(tmp_path / "dicom", 1, shape=SHAPE)[0]
    other_study = generate_uid()
    for path in _of_modality(patient, "RTSTRUCT") + _of_modality(patient, "RTDOSE"):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = other_study  # same patient and frame of reference, another study
        ds.save_as(path)
    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "out")  # old: both studies failed
    (entry,) = result.entries
    assert entry["case_id"] == patient.patient_id and entry["dose"] is not None
    label = _read(tmp_path / "out" / entry["label"])
    assert _dice(label == 1, patient.masks["Rectum"]) > 0.97
    paired = [m for m in _messages(result) if "paired with" in m]
    assert len(paired) == 2 and all(f"stored in study {other_study}" in m for m in paired)
    assert any(m.startswith("RTSTRUCT") and "refer to" in m for m in paired)  # its contours' image references


def _second_ct_series(patient: SyntheticPatient, folder: Path) -> str:
    """Copy the patient's CT slices as a second series of the same study and frame of reference; return its UID."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for k, path in enumerate(_of_modality(patient, "CT")):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"copy{k:03d}.dcm")
    return series_uid


def test_reliability_dicom_rt_two_ct_series_in_a_study_are_decided_by_the_contours_image_references(
    tmp_path: Path,
) -> None:
    patient = write_prostate_demo(tmp_path / "dicom", 1, shape=SHAPE)[0]
    struct = _of_modality(patient, "RTSTRUCT")[0]
    drawn_on = str(pydicom.dcmread(patient.files[0], stop_before_pixels=True).SeriesInstanceUID)
    other = _second_ct_series(patient, tmp_path / "dicom" / "second_ct")
    _strip_image_references(struct, series=True, contours=False)  # names no series; each contour its image
    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "out")  # old: "2 CT series ... cannot choose"
    (entry,) = result.entries
    assert entry["source"]["ct_series_uid"] == drawn_on
    (choice,) = [m for m in _messages(result) if "CT series:" in m]
    assert f"converted CT series {drawn_on}" in choice and f"left out: CT series {other}" in choice

    _strip_image_references(struct, series=True, contours=True)  # now nothing decides: both are in its frame
    with pytest.raises(DatasetValidationError) as caught:
        convert_dicom_rt(tmp_path / "dicom", tmp_path / "out2")
    (problem,) = caught.value.problems
    study_uid = str(pydicom.dcmread(struct, stop_before_pixels=True).StudyInstanceUID)
    assert "cannot choose" in problem.message and study_uid in problem.message  # the message names both series
    assert drawn_on in problem.message and other in problem.message and struct.name in problem.message


# ------------------------------------------------------------------- empty ROIs: reasons; one bad study: --skip-bad
def test_reliability_dicom_rt_empty_rois_give_their_reasons_and_a_failed_study_suggests_skip_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = write_prostate_demo(tmp_path / "dicom", 2, shape=SHAPE)
    struct = _of_modality(bad, "RTSTRUCT")[0]
    ds = pydicom.dcmread(struct)
    for item in ds.ROIContourSequence:
        for contour in item.ContourSequence:  # every contour 1 m above the scan: the ROIs match, but are empty
            data = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3) + [0.0, 0.0, 1000.0]
            contour.ContourData = [f"{v:.3f}" for v in data.ravel()]
    ds.save_as(struct)
    with pytest.raises(DatasetValidationError) as caught:
        convert_dicom_rt(tmp_path / "dicom", tmp_path / "out")
    (problem,) = caught.value.problems
    assert problem.case == bad.patient_id and "every matched ROI is empty on the CT grid" in problem.message
    for organ in ("Rectum", "Bladder", "Femur_L", "Femur_R"):
        assert f"ROI '{organ}' ({organ}): " in problem.message
    assert problem.message.count("lie outside the CT's slices") == 4
    assert "--skip-bad" in str(caught.value) and "1 of 2 studies failed" in str(caught.value)

    args = ["convert", "--input", str(tmp_path / "dicom"), "--output", str(tmp_path / "cli")]
    assert main(args) == 1
    assert "--skip-bad" in capsys.readouterr().err
    assert main([*args, "--skip-bad"]) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert [e["case_id"] for e in manifest["cases"]] == [good.patient_id]
