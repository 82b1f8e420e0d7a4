"""Reliability: wrong data is refused up front (before training), naming the file and the value, never trained on.

One test per case of issue 16's "Train silently on wrong data": implausible doses (OpenKBP CSV and DICOM RTDOSE), a
mistyped OpenKBP ``dataset_dir`` standing in for the cache of another folder, OpenKBP CT in Hounsfield units,
unreadable or missing DICOM CT slices, HAM10000 files or labels changed after the split, and truncated STOIC /
prostate cache files. Every input is tiny and synthetic (the demo writers), so each test takes about a second.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from ctan_monai.apps import stoic
from ctan_monai.apps.ham10000.demo import write_ham10000_demo
from ctan_monai.apps.ham10000.splits import prepare_splits
from ctan_monai.apps.ham10000.validation import HAM10000_CLASSES, METADATA_FILE
from ctan_monai.apps.openkbp.conversion import convert_dataset
from ctan_monai.apps.openkbp.demo import synthetic_openkbp_patient, write_openkbp_demo
from ctan_monai.apps.openkbp.prepare import prepare_openkbp
from ctan_monai.apps.openkbp.reader import read_patient, write_patient
from ctan_monai.apps.prostate.demo import write_prostate_demo
from ctan_monai.apps.prostate.prepare import prepare_prostate
from ctan_monai.apps.stoic.demo import write_stoic_demo
from ctan_monai.data.dicom_rt import convert_dicom_rt, read_rtdose
from ctan_monai.data.validation import DatasetValidationError

GRID = 24  # OpenKBP phantoms on a 24-cubed grid: enough for every structure, fast to write and read
OPENKBP_GRID = (GRID, GRID, GRID)
DICOM_SHAPE = (24, 24, 8)  # CT size (x, y, z) of the synthetic DICOM-RT patients


def _openkbp_patient(tmp_path: Path, name: str = "pt_1"):
    """A synthetic OpenKBP patient (in memory) and the folder to write it to."""
    patient = synthetic_openkbp_patient(name, np.random.default_rng(0), size=GRID)
    return patient, tmp_path / "provided-data" / "train-pats" / name


def _problems(error: pytest.ExceptionInfo[DatasetValidationError]) -> list[str]:
    return [str(p) for p in error.value.problems]


def _modality(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).Modality)


# ------------------------------------------------------------------------------------------------ implausible doses
def test_reliability_openkbp_dose_in_cgy_is_refused_naming_file_and_value(tmp_path: Path) -> None:
    patient, folder = _openkbp_patient(tmp_path)
    patient.dose = patient.dose * 1e4  # about 7e5 "Gy": a dose written in the wrong unit
    write_patient(patient, folder)
    with pytest.raises(DatasetValidationError) as caught:
        read_patient(folder, grid_shape=OPENKBP_GRID, require_dose=True)
    (problem,) = [p for p in _problems(caught) if "dose.csv" in p]
    assert str(folder / "dose.csv") in problem
    assert f"{float(patient.dose.max()):.6g} Gy" in problem and "cGy" in problem and "mGy" in problem
    assert "line " in problem  # the rows are quoted

    plausible = synthetic_openkbp_patient("pt_2", np.random.default_rng(0), size=GRID)
    read_patient(write_patient(plausible, tmp_path / "ok" / "pt_2"), grid_shape=OPENKBP_GRID)  # 70 Gy: fine


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # the NaN DoseGridScaling written on purpose
def test_reliability_rtdose_scaling_negative_and_nan_are_refused_naming_the_file(tmp_path: Path) -> None:
    write_prostate_demo(tmp_path / "dicom", n_patients=1, shape=DICOM_SHAPE)
    (dose_path,) = [p for p in (tmp_path / "dicom").rglob("*.dcm") if _modality(p) == "RTDOSE"]
    original = pydicom.dcmread(dose_path)
    assert read_rtdose(dose_path).GetMetaData("DoseUnits") == "GY"  # the demo's dose reads

    scaled = pydicom.dcmread(dose_path)
    scaled.DoseGridScaling = f"{float(original.DoseGridScaling) * 1e5:.6g}"  # the x1e5 DoseGridScaling of the issue
    scaled.save_as(dose_path)
    with pytest.raises(DatasetValidationError) as caught:
        convert_dicom_rt(tmp_path / "dicom", tmp_path / "out")
    (problem,) = _problems(caught)
    assert str(dose_path) in problem and "DoseGridScaling" in problem and "cGy" in problem

    signed = pydicom.dcmread(dose_path)
    signed.DoseGridScaling = original.DoseGridScaling
    signed.PixelRepresentation = 1  # the stored values above 32767 now read as negative numbers
    signed.save_as(dose_path)
    with pytest.raises(ValueError, match=r"negative dose value\(s\)") as negative:
        read_rtdose(dose_path)
    assert str(dose_path) in str(negative.value)

    signed.PixelRepresentation = 0
    signed.DoseGridScaling = "NaN"
    signed.save_as(dose_path)
    with pytest.raises(ValueError, match="not a positive finite number") as nan:
        read_rtdose(dose_path)
    assert str(dose_path) in str(nan.value)


# ---------------------------------------------------------------------------- a cache standing in for its sources
def test_reliability_openkbp_mistyped_dataset_dir_does_not_train_on_another_cache(tmp_path: Path) -> None:
    source = write_openkbp_demo(tmp_path / "demo", n_train=2, n_val=0, size=GRID)
    cache = tmp_path / "cache"
    convert_dataset(source, cache, grid_shape=OPENKBP_GRID)

    typo = tmp_path / "real-data-with-a-typo"
    with pytest.raises(FileNotFoundError, match="does not stand in for it") as caught:
        prepare_openkbp(typo, cache)
    assert str(source.resolve()) in str(caught.value) and str(typo) in str(caught.value)
    assert json.loads((cache / "manifest.json").read_text())["source_dir"] == str(source.resolve())
    # explicitly allowed, or a dataset_dir that is the folder the cache was made from (CSVs not copied): used
    assert [e["case_id"] for e in prepare_openkbp(typo, cache, any_cache_source=True)["train-pats"]] == ["pt_1", "pt_2"]
    source.rename(tmp_path / "elsewhere")
    splits = prepare_openkbp(source, cache)
    assert [e["case_id"] for e in splits["train-pats"]] == ["pt_1", "pt_2"]
    # a cache used without its sources is verified: a truncated file is named, not met in the first iteration
    dose = Path(splits["train-pats"][1]["dose"])
    dose.write_bytes(dose.read_bytes()[: dose.stat().st_size // 2])
    with pytest.raises(DatasetValidationError, match="CRC-32") as damaged:
        prepare_openkbp(source, cache)
    assert [p.file for p in damaged.value.problems] == [str(dose)]


# ------------------------------------------------------------------------------------------- OpenKBP CT in HU
def test_reliability_openkbp_ct_in_hounsfield_units_is_refused_with_the_reason(tmp_path: Path) -> None:
    patient, folder = _openkbp_patient(tmp_path)
    patient.ct = patient.ct - 1024.0  # Hounsfield units: air -1024 instead of 0
    write_patient(patient, folder)
    with pytest.raises(DatasetValidationError) as caught:
        read_patient(folder, grid_shape=OPENKBP_GRID)
    (problem,) = _problems(caught)
    assert str(folder / "ct.csv") in problem
    assert "min -1024" in problem and "Hounsfield" in problem and "0..4095" in problem


# ---------------------------------------------------------------------------------- DICOM CT: unreadable, missing
def _ct_files_by_height(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*.dcm") if _modality(p) == "CT"]
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def test_reliability_unreadable_or_missing_ct_slice_is_reported(tmp_path: Path) -> None:
    write_prostate_demo(tmp_path / "dicom", n_patients=1, shape=DICOM_SHAPE)
    slices = _ct_files_by_height(tmp_path / "dicom")
    top = slices[-1]
    top_uid = str(pydicom.dcmread(top, stop_before_pixels=True).SOPInstanceUID)
    top.write_bytes(top.read_bytes()[:300])  # the end slice cut inside its header: its UIDs are unreadable
    stray = tmp_path / "dicom" / "unrelated" / "junk.dcm"
    stray.parent.mkdir()
    stray.write_bytes(b"\0" * 64)  # in a folder of no study: a warning, the conversion goes on
    with pytest.raises(DatasetValidationError) as caught:
        convert_dicom_rt(tmp_path / "dicom", tmp_path / "out")
    by_file = {p.file: p.message for p in caught.value.problems}
    assert "unreadable DICOM file" in by_file[str(top)]
    (struct,) = [f for f in by_file if f != str(top)]
    assert "refers to 1 image(s) of CT series" in by_file[struct] and top_uid in by_file[struct]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [w["file"] for w in report["warnings"]] == [str(stray)]

    top.unlink()  # the end slice simply missing from the export
    with pytest.raises(DatasetValidationError, match=r"refers to 1 image\(s\) of CT series .* lacks"):
        convert_dicom_rt(tmp_path / "dicom", tmp_path / "out")


# -------------------------------------------------------------------------- HAM10000: files and labels after split
@pytest.fixture()
def ham_split(tmp_path: Path) -> tuple[Path, Path, dict]:
    root = write_ham10000_demo(tmp_path / "HAM10000", n_images=14, seed=0)
    split_file = tmp_path / "run" / "splits.json"
    return root, split_file, prepare_splits(root, split_file, seed=0)


def test_reliability_ham10000_image_truncated_after_the_split_is_refused(ham_split: tuple[Path, Path, dict]) -> None:
    root, split_file, splits = ham_split
    image = Path(splits["training"][0]["image"])
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(DatasetValidationError) as caught:
        prepare_splits(root, split_file, seed=0)
    (problem,) = caught.value.problems
    assert problem.file == str(image) and problem.case == splits["training"][0]["image_id"]
    assert "truncated" in problem.message
    kept = prepare_splits(root, split_file, seed=0, skip_bad=True)  # skip_bad: trained without it, listed
    assert problem.case not in {e["image_id"] for e in kept["training"]}


def test_reliability_ham10000_dx_corrected_after_the_split_uses_the_csv(
    ham_split: tuple[Path, Path, dict], caplog: pytest.LogCaptureFixture
) -> None:
    root, split_file, splits = ham_split
    table = pd.read_csv(root / METADATA_FILE, dtype=str, keep_default_na=False)
    single = table.groupby("lesion_id")["image_id"].transform("size") == 1  # a lesion of one image
    row = int(np.flatnonzero(single.to_numpy())[0])
    image_id, old = table.at[row, "image_id"], table.at[row, "dx"]
    new = next(c for c in HAM10000_CLASSES if c != old)
    table.at[row, "dx"] = new
    table.to_csv(root / METADATA_FILE, index=False)
    with caplog.at_level(logging.WARNING):
        again = prepare_splits(root, split_file, seed=0)
    (entry,) = [e for entries in again.values() for e in entries if e["image_id"] == image_id]
    assert HAM10000_CLASSES[entry["dx"]] == new
    assert f"{image_id}: dx {old} in the split file, {new} in {METADATA_FILE}" in caplog.text
    document = json.loads(split_file.read_text())
    assert [HAM10000_CLASSES[e["dx"]] for n in again for e in document[n] if e["image_id"] == image_id] == [new]
    assert {n: [e["image_id"] for e in v] for n, v in again.items()} == {
        n: [e["image_id"] for e in v] for n, v in splits.items()
    }  # the lesion assignment is kept

    table.loc[table["image_id"] == image_id, "lesion_id"] = "HAM_moved"  # regrouped: the split no longer holds
    table.to_csv(root / METADATA_FILE, index=False)
    with pytest.raises(DatasetValidationError, match=f"{image_id}.*lesion_id is 'HAM_moved'"):
        prepare_splits(root, split_file, seed=0)


# ---------------------------------------------------------------------------------- STOIC and prostate caches
def test_reliability_stoic_truncated_cache_volume_is_rebuilt_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_stoic_demo(tmp_path / "demo", n_patients=3, seed=5)
    spacing = (7.0, 7.0, 10.0)
    manifest = stoic.convert_dataset(root, tmp_path / "cache", spacing=spacing)
    cached = Path(manifest["cases"][0]["image"])
    intact = nib.load(cached).get_fdata()
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        again = stoic.convert_dataset(root, tmp_path / "cache", spacing=spacing)
    assert str(cached) in caplog.text and "truncated" in caplog.text
    np.testing.assert_array_equal(nib.load(again["cases"][0]["image"]).get_fdata(), intact)
    # a cache written before the CRCs were recorded is checked (gzip to the end) and reused, not converted again
    record_path = tmp_path / "cache" / f"{again['cases'][0]['case_id']}.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({k: v for k, v in record.items() if k != "outputs"}))
    stamp = cached.stat().st_mtime_ns
    assert stoic.convert_dataset(root, tmp_path / "cache", spacing=spacing)["cases"] == again["cases"]
    assert cached.stat().st_mtime_ns == stamp and json.loads(record_path.read_text()) == record


def test_reliability_prostate_truncated_cache_volume_is_rebuilt_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_prostate_demo(tmp_path / "dicom", n_patients=2, shape=DICOM_SHAPE)
    splits = prepare_prostate(tmp_path / "dicom", tmp_path / "cache", validation_fraction=0.5)
    cached = Path(splits["training"][0]["label"])
    intact = np.asarray(nib.load(cached).dataobj)
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        again = prepare_prostate(tmp_path / "dicom", tmp_path / "cache", validation_fraction=0.5)
    assert str(cached) in caplog.text and "truncated" in caplog.text
    np.testing.assert_array_equal(np.asarray(nib.load(again["training"][0]["label"]).dataobj), intact)
    # a cache written before the CRCs were recorded is checked (gzip to the end) and reused, not converted again
    prepared = tmp_path / "cache" / "prepared.json"
    record = json.loads(prepared.read_text())
    prepared.write_text(json.dumps({k: v for k, v in record.items() if k != "outputs"}))
    stamp = cached.stat().st_mtime_ns
    assert prepare_prostate(tmp_path / "dicom", tmp_path / "cache", validation_fraction=0.5) == again
    assert cached.stat().st_mtime_ns == stamp and json.loads(prepared.read_text()) == record
