"""DICOM-RT reading and conversion: synthetic round trips, error reports, pydicom test files, the real thorax case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813 (the conventional SimpleITK alias)
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from scipy import ndimage

from ctan_monai.apps.prostate.demo import DEMO_ORGANS, write_prostate_demo
from ctan_monai.data.dicom_rt import (
    THORAX_ORGANS,
    DicomDecodeError,
    DicomSeriesError,
    DoseUnitsError,
    build_synonym_table,
    convert_dicom_rt,
    find_studies,
    load_synonyms,
    match_rois,
    pixel_array,
    rasterise_contours,
    read_ct_series,
    read_rtdose,
)
from ctan_monai.data.dicom_rt.__main__ import main
from ctan_monai.data.validation import DatasetValidationError


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --- synthetic round trip ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, spacing",
    [((48, 48, 24), (6.0, 6.0, 4.0)), ((40, 44, 30), (7.0, 6.5, 2.5))],
    ids=["square-pixels", "anisotropic"],
)
def test_round_trip_masks_dose_and_geometry(tmp_path: Path, shape: tuple, spacing: tuple) -> None:
    patients = write_prostate_demo(tmp_path / "dicom", n_patients=2, seed=3, shape=shape, spacing=spacing)
    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "out")
    assert result.report.ok and not result.warnings
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["label_names"] == ["background", *DEMO_ORGANS]
    entries = {e["case_id"]: e for e in manifest["cases"]}
    assert sorted(entries) == [p.patient_id for p in patients]
    for patient in patients:
        entry = entries[patient.patient_id]
        assert entry["label_class_present"] == [1, 1, 1, 1, 1]
        assert entry["spacing"] == pytest.approx(list(spacing))
        image = sitk.ReadImage(str(tmp_path / "out" / entry["image"]))
        assert image.GetOrigin() == pytest.approx(patient.origin, abs=1e-3)
        assert image.GetSize() == tuple(shape)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), patient.ct)
        # NIfTI holds RAS: x and y of the LPS geometry negated.
        affine = nib.load(tmp_path / "out" / entry["image"]).affine
        np.testing.assert_allclose(np.diag(affine)[:3], [-spacing[0], -spacing[1], spacing[2]], atol=1e-4)
        np.testing.assert_allclose(affine[:3, 3], [-patient.origin[0], -patient.origin[1], patient.origin[2]], 1e-4)
        label = _read(tmp_path / "out" / entry["label"])
        assert label.dtype == np.uint8
        for index, organ in enumerate(DEMO_ORGANS, start=1):
            assert _dice(label == index, patient.masks[organ]) > 0.97, organ
        dose = _read(tmp_path / "out" / entry["dose"])
        error = np.abs(dose - patient.dose)[patient.dose_grid_support].max()
        assert error < 0.01 * patient.dose.max()
        assert patient.dose.max() > 55.0  # the prescription plateau was reached (60 Gy)
        dose_mask = _read(tmp_path / "out" / entry["dose_mask"]).astype(bool)
        assert dose_mask.any() and not (dose_mask & ~patient.dose_grid_support).any()


def test_round_trip_with_an_unaligned_dose_grid(tmp_path: Path) -> None:
    patient = write_prostate_demo(tmp_path / "dicom", 1, seed=5, shape=(40, 40, 20), dose_spacing=(4.0, 5.0, 3.0))[0]
    entry = convert_dicom_rt(tmp_path / "dicom", tmp_path / "out").entries[0]
    dose = _read(tmp_path / "out" / entry["dose"])
    inside = _read(tmp_path / "out" / entry["dose_mask"]).astype(bool)
    assert inside.sum() > 0.3 * inside.size  # the body
    # Independent resampling: scipy's trilinear interpolation of the stored grid at the CT voxel centres.
    rtdose = pydicom.dcmread(patient.files[-1])
    grid = rtdose.pixel_array * float(rtdose.DoseGridScaling)  # [frames, rows, cols]
    grid_origin = np.array([float(v) for v in rtdose.ImagePositionPatient])
    grid_step = np.array([float(rtdose.PixelSpacing[1]), float(rtdose.PixelSpacing[0]), 3.0])
    z, y, x = np.nonzero(inside)
    points = np.asarray(patient.origin) + np.stack([x, y, z], axis=1) * np.asarray(patient.spacing)
    index = ((points - grid_origin) / grid_step)[:, ::-1].T  # (frame, row, col)
    expected = ndimage.map_coordinates(grid, index, order=1, mode="nearest")
    np.testing.assert_allclose(dose[inside], expected, atol=1e-3 * grid.max())
    # Against the analytic dose: only interpolation error of a 4-5 mm grid across a steep fall-off remains.
    assert np.abs(dose - patient.dose)[inside].mean() < 0.01 * patient.dose.max()


def test_demo_is_tag_discoverable_and_labelled_synthetic(tmp_path: Path) -> None:
    patients = write_prostate_demo(tmp_path, n_patients=3, seed=1, shape=(32, 32, 12))
    (tmp_path / "dicom" / "notes.txt").write_text("not dicom")
    assert "SYNTHETIC" in (tmp_path / "README.txt").read_text()
    studies = find_studies(tmp_path)
    assert [s.case_id for s in studies] == [p.patient_id for p in patients]
    for study in studies:
        counts = {s.modality: len(s.files) for s in study.series.values()}
        assert counts == {"CT": 12, "RTSTRUCT": 1, "RTDOSE": 1}
        # files of one patient are spread over several folders, mixed with other patients' files
    folders = {f.parent for p in patients for f in p.files}
    assert all(len({f.parent for f in p.files}) > 1 for p in patients) and len(folders) >= 3
    assert str(pydicom.dcmread(patients[0].files[0]).PatientName).startswith("SYNTHETIC")


# --- rasterisation and ROI names -----------------------------------------------------------------------------------


def test_rasterise_even_odd_rule_holes_and_several_contours() -> None:
    reference = sitk.Image(20, 20, 3, sitk.sitkUInt8)
    reference.SetSpacing((2.0, 2.0, 3.0))
    reference.SetOrigin((-10.0, 5.0, 100.0))

    def square(x0: float, x1: float, y0: float, y1: float, z: float) -> np.ndarray:
        return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]])

    # On the slice at z = 103: an outer square with a square hole, and a disjoint square. Edges fall between
    # voxel centres (odd mm), so the expected voxels are exact.
    outer, hole, other = square(-9, 11, 6, 26, 103), square(-3, 5, 12, 20, 103), square(15, 21, 30, 40, 103)
    mask, notes = rasterise_contours([outer, hole, other, square(0, 4, 6, 10, 500)], reference)
    (note,) = notes
    assert note.startswith(
        "1 contour(s) lie outside the CT's slices (z 500.00..500.00 mm; the slices span 100.00..106.00"
    )
    x = -10.0 + 2.0 * np.arange(20)
    y = 5.0 + 2.0 * np.arange(20)
    yy, xx = np.meshgrid(y, x, indexing="ij")

    def inside(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        return (xx > x0) & (xx < x1) & (yy > y0) & (yy < y1)

    expected = (inside(-9, 11, 6, 26) & ~inside(-3, 5, 12, 20)) | inside(15, 21, 30, 40)
    np.testing.assert_array_equal(mask[1], expected)
    assert not mask[0].any() and not mask[2].any()
    assert expected.sum() == 100 - 16 + 15


def test_roi_synonyms_match_case_and_separator_insensitively(tmp_path: Path) -> None:
    table = build_synonym_table(["Rectum", "Bladder", "Femur_L", "Femur_R"])
    rois = ["RECTUM", "bladder", "Lt Femoral Head", "FemoralHead_R", "PTV", "rectum_wall-free"]
    assert match_rois(rois, table) == {
        "Rectum": "RECTUM",  # the first synonym that matches wins
        "Bladder": "bladder",
        "Femur_L": "Lt Femoral Head",
        "Femur_R": "FemoralHead_R",
    }
    assert match_rois(["rectum_wall-free", "Femur L"], table)["Rectum"] == "rectum_wall-free"
    assert match_rois(["LUNGS", "Lung_L", "heart"], build_synonym_table(THORAX_ORGANS)) == {
        "HEART": "heart",
        "SPINALCORD": None,
        "LUNG_L": "Lung_L",
        "LUNG_R": None,
    }
    path = tmp_path / "syn.yaml"
    path.write_text("Rectum: [Rektum]\nProstate: [CTV_prostate]\n")
    extended = build_synonym_table(["Rectum", "Prostate"], load_synonyms(path))
    assert match_rois(["REKTUM", "ctv prostate"], extended) == {"Rectum": "REKTUM", "Prostate": "ctv prostate"}
    with pytest.raises(ValueError, match="given for both"):
        build_synonym_table(["Rectum", "Bladder"], {"Bladder": ["rectum"]})
    path.write_text("- just a list\n")
    with pytest.raises(ValueError, match="syn.yaml"):
        load_synonyms(path)


def test_overlap_rule_first_organ_wins(tmp_path: Path) -> None:
    write_prostate_demo(tmp_path / "dicom", n_patients=1, shape=(40, 40, 20))
    # The PTV contains the prostate: with the prostate listed first, it keeps its voxels.
    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "a", organs=["Prostate", "PTV"])
    first = _read(tmp_path / "a" / result.entries[0]["label"])
    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "b", organs=["PTV", "Prostate"])
    second = _read(tmp_path / "b" / result.entries[0]["label"])
    assert (first == 1).sum() > 20 and (first > 0).sum() == (second > 0).sum()
    np.testing.assert_array_equal(second == 1, first > 0)  # PTV first: the prostate disappears under it
    # Hidden entirely: absent from the label map, so marked absent (not "annotated, no voxels"), with a warning.
    assert not (second == 2).any() and result.entries[0]["label_class_present"] == [1, 1, 0]
    (warning,) = [w.message for w in result.warnings if "'Prostate'" in w.message]
    assert "entirely inside PTV" in warning and "label_class_present 0" in warning


# --- reports of cases that cannot be converted ---------------------------------------------------------------------


def _edit(path: Path, **tags: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_every_bad_case_is_reported_at_once(tmp_path: Path) -> None:
    patients = write_prostate_demo(tmp_path / "dicom", n_patients=6, seed=2, shape=(32, 32, 12))
    patients[1].files[-2].unlink()  # RTSTRUCT gone
    _edit(patients[2].files[-1], FrameOfReferenceUID="1.2.3.4")  # dose in another frame of reference
    dose = pydicom.dcmread(patients[3].files[-1])
    _edit(patients[3].files[-1], ImagePositionPatient=[dose.ImagePositionPatient[0], 0, 5000.0])
    struct = pydicom.dcmread(patients[4].files[-2])
    for roi in struct.StructureSetROISequence:
        roi.ROIName = f"X{roi.ROINumber}"
    struct.save_as(patients[4].files[-2])
    patients[5].files[-1].unlink()  # no RTDOSE: converted, with a warning
    with pytest.raises(DatasetValidationError) as caught:
        convert_dicom_rt(tmp_path / "dicom", tmp_path / "out")
    messages = {p.case: p.message for p in caught.value.problems}
    assert set(messages) == {p.patient_id for p in patients[1:5]}
    assert "missing modality RTSTRUCT" in messages[patients[1].patient_id]
    assert "mixed frames of reference" in messages[patients[2].patient_id]
    assert "outside the CT" in messages[patients[3].patient_id]
    assert "no ROI matches" in messages[patients[4].patient_id]
    assert not (tmp_path / "out" / "manifest.json").exists()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["failed"]) == 4 and report["converted"] == [patients[0].patient_id, patients[5].patient_id]
    assert [w["case_id"] for w in report["warnings"]] == [patients[5].patient_id]

    result = convert_dicom_rt(tmp_path / "dicom", tmp_path / "skip", skip_bad=True)
    entries = {e["case_id"]: e for e in result.entries}
    assert sorted(entries) == [patients[0].patient_id, patients[5].patient_id]
    assert entries[patients[5].patient_id]["dose"] is None
    with pytest.raises(DatasetValidationError) as caught:
        convert_dicom_rt(tmp_path / "dicom", tmp_path / "strict", require_dose=True)
    messages = {p.case: p.message for p in caught.value.problems}
    assert len(messages) == 5 and "missing modality RTDOSE" in messages[patients[5].patient_id]


def test_cli_with_synonym_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    patient = write_prostate_demo(tmp_path / "dicom", n_patients=1, shape=(32, 32, 12))[0]
    struct = pydicom.dcmread(patient.files[-2])
    for roi in struct.StructureSetROISequence:
        roi.ROIName = {"Rectum": "Rektum", "Bladder": "VESSIE"}.get(roi.ROIName, roi.ROIName)
    struct.save_as(patient.files[-2])
    synonyms = tmp_path / "syn.yaml"
    synonyms.write_text("Rectum: [rektum]\nBladder: [vessie]\n")
    args = ["convert", "--input", str(tmp_path / "dicom"), "--output", str(tmp_path / "out")]
    assert main([*args, "--organs", "Rectum", "Bladder", "--synonyms", str(synonyms)]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["cases"][0]["label_class_present"] == [1, 1, 1]
    assert manifest["cases"][0]["source"]["matched_rois"] == {"Rectum": "Rektum", "Bladder": "VESSIE"}
    assert main([*args, "--organs", "Rectum"]) == 1  # "Rektum" is not a default synonym: no organ matches
    assert "no ROI matches any organ" in capsys.readouterr().err


# --- CT series, RTDOSE and pixel decoding --------------------------------------------------------------------------


def test_ct_series_irregular_stacks_are_refused(tmp_path: Path) -> None:
    patient = write_prostate_demo(tmp_path / "dicom", n_patients=1, shape=(32, 32, 8))[0]
    ct_files = patient.files[:8]
    image = read_ct_series(list(reversed(ct_files)))
    assert image.GetOrigin() == pytest.approx(patient.origin, abs=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), patient.ct)
    positions = {f: float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in ct_files}
    ordered = sorted(ct_files, key=positions.get)
    with pytest.raises(DicomSeriesError, match="slice gap"):
        read_ct_series(ordered[:3] + ordered[4:])  # a missing slice
    duplicate = tmp_path / "dup.dcm"
    shutil.copy(ordered[0], duplicate)
    _edit(duplicate, SOPInstanceUID=pydicom.uid.generate_uid())
    with pytest.raises(DicomSeriesError, match="same position"):
        read_ct_series([*ordered, duplicate])


def test_compressed_pixel_data_without_plugin_names_file_and_plugins() -> None:
    path = get_testdata_file("JPEGLSNearLossless_16.dcm")
    ds = pydicom.dcmread(path)
    if get_decoder(ds.file_meta.TransferSyntaxUID).is_available:
        pytest.skip("a JPEG-LS plugin is installed here")
    with pytest.raises(DicomDecodeError) as caught:
        pixel_array(ds, path)
    message = str(caught.value)
    assert path in message and "JPEG-LS" in message and "pylibjpeg" in message and "gdcm" in message
    rle = get_testdata_file("rtdose_rle.dcm")  # a compressed syntax pydicom decodes by itself
    plain = read_rtdose(get_testdata_file("rtdose.dcm"), require_gy=False)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(read_rtdose(rle, require_gy=False)), sitk.GetArrayFromImage(plain)
    )


def test_pydicom_rtdose_reads_with_its_geometry_and_scaling(tmp_path: Path) -> None:
    path = get_testdata_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    with pytest.raises(DoseUnitsError, match="RELATIVE"):
        read_rtdose(path)  # this file declares DoseUnits RELATIVE
    ds.DoseUnits = "GY"
    gy_path = tmp_path / "rtdose_gy.dcm"
    ds.save_as(gy_path)
    dose = read_rtdose(gy_path)
    assert dose.GetSize() == (10, 10, 15)
    assert dose.GetOrigin() == pytest.approx((189.43125, 199.43125, -761.87))
    assert dose.GetSpacing() == pytest.approx((10.0, 10.0, 5.0))
    assert dose.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    expected = ds.pixel_array.astype(np.float64) * 1e-6
    np.testing.assert_allclose(sitk.GetArrayFromImage(dose), expected, rtol=1e-6)
    # The older absolute form of GridFrameOffsetVector and a reversed frame order give the same grid.
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    ds.GridFrameOffsetVector = [f"{-761.87 + v:.3f}" for v in offsets]
    ds.save_as(gy_path)
    np.testing.assert_allclose(sitk.GetArrayFromImage(read_rtdose(gy_path)), expected, rtol=1e-6)
    ds.GridFrameOffsetVector = [-v for v in offsets]
    ds.ImagePositionPatient = [189.43125, 199.43125, -761.87 + 70.0]
    ds.save_as(gy_path)
    flipped = read_rtdose(gy_path)
    assert flipped.GetOrigin() == pytest.approx((189.43125, 199.43125, -761.87))
    np.testing.assert_allclose(sitk.GetArrayFromImage(flipped), expected[::-1], rtol=1e-6)
    # Uneven frame offsets: resampled linearly onto the smallest gap.
    ds.ImagePositionPatient = [189.43125, 199.43125, -761.87]
    ds.GridFrameOffsetVector = [0.0, 5.0, 15.0] + [15.0 + 10.0 * k for k in range(1, 13)]
    ds.save_as(gy_path)
    uneven = read_rtdose(gy_path)
    assert uneven.GetSize()[2] == 28 and uneven.GetSpacing()[2] == pytest.approx(5.0)
    frames = sitk.GetArrayFromImage(uneven)
    np.testing.assert_allclose(frames[2], (expected[1] + expected[2]) / 2, rtol=1e-5)  # 10 mm: between 5 and 15
    np.testing.assert_allclose(frames[3], expected[2], rtol=1e-6)


# --- the real thorax patient ---------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_thorax_patient_converts(dicom_rt_root: Path, tmp_path: Path) -> None:
    result = convert_dicom_rt(dicom_rt_root, tmp_path, organs=THORAX_ORGANS)
    assert len(result.entries) == 1
    entry = result.entries[0]
    # No RTDOSE: converted without dose, and reported.
    assert entry["dose"] is None and entry["dose_mask"] is None
    assert [w.message for w in result.warnings] == ["no RTDOSE in this study (missing modality RTDOSE)"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["warnings"][0]["case_id"] == entry["case_id"]

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(dicom_rt_root.rglob("CT_*.dcm"))]
    z = sorted(float(h.ImagePositionPatient[2]) for h in headers)
    first = min(headers, key=lambda h: float(h.ImagePositionPatient[2]))
    image = sitk.ReadImage(str(tmp_path / entry["image"]))
    assert image.GetSize() == (int(first.Columns), int(first.Rows), len(headers))
    assert image.GetOrigin() == pytest.approx([float(v) for v in first.ImagePositionPatient])
    assert image.GetSpacing() == pytest.approx(
        [float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), z[1] - z[0]]
    )
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    ct = sitk.GetArrayFromImage(image)
    stored = first.pixel_array if "PixelData" in first else pydicom.dcmread(first.filename).pixel_array
    np.testing.assert_array_equal(
        ct[0], stored.astype(np.int32) * int(first.RescaleSlope) + int(first.RescaleIntercept)
    )

    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / entry["label"])))
    body = np.stack([ndimage.binary_fill_holes(s) for s in ndimage.binary_opening(ct > -500, np.ones((1, 5, 5)))])
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    # Plausible adult volumes (ml) for the part of each organ inside this 42 cm scan.
    plausible = {"HEART": (250, 1200), "SPINALCORD": (15, 120), "LUNG_L": (500, 3500), "LUNG_R": (500, 4000)}
    for index, organ in enumerate(THORAX_ORGANS, start=1):
        mask = label == index
        volume = mask.sum() * voxel_ml
        low, high = plausible[organ]
        assert low < volume < high, (organ, volume)
        assert (mask & body).sum() / mask.sum() > 0.99, organ
    lungs = (label == 3) | (label == 4)
    assert ct[lungs].mean() < -500 and -100 < ct[label == 1].mean() < 150  # air-filled lungs, soft-tissue heart
    assert entry["label_class_present"] == [1, 1, 1, 1, 1]

    with pytest.raises(DatasetValidationError, match="missing modality RTDOSE"):
        convert_dicom_rt(dicom_rt_root, tmp_path / "strict", organs=THORAX_ORGANS, require_dose=True)
