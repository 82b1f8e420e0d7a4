"""OpenKBP data: reader, validation, datalists, NIfTI cache, dose CSV writer, synthetic demo and 2D slices."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctan_monai.apps.openkbp.conversion import convert_dataset, load_manifest
from ctan_monai.apps.openkbp.demo import synthetic_openkbp_patient, write_openkbp_demo
from ctan_monai.apps.openkbp.reader import (
    DEFAULT_STRUCTURES,
    STRUCTURE_NAMES,
    OpenKBPDataWarning,
    label_map_from_structures,
    read_patient,
    read_sparse_csv,
    write_dose_csv,
)
from ctan_monai.apps.openkbp.validation import build_datalist, validate_dataset
from ctan_monai.data.slices import (
    AxialSliceDataset,
    load_case,
    slice_augmentation,
    slices_to_volume,
    volume_to_slices,
)
from ctan_monai.data.validation import DatasetValidationError

SMALL = 48  # grid side of the synthetic data used by the fast tests
SMALL_GRID = (SMALL, SMALL, SMALL)


# ------------------------------------------------------------------------------------------------ independent parsing
def _csv_rows(path: Path) -> list[list[str]]:
    """Rows of a challenge CSV with the plain csv module (header checked, not returned)."""
    with open(path, newline="") as stream:
        reader = csv.reader(stream)
        assert next(reader) == ["", "data"]
        return list(reader)


def _csv_values(path: Path) -> list[float]:
    """The value column of a challenge CSV, in one pass of the csv module."""
    with open(path, newline="") as stream:
        reader = csv.reader(stream)
        assert next(reader) == ["", "data"]
        return [float(value) for _, value in reader]


def _count_rows(path: Path) -> int:
    """Data rows of a challenge CSV, by counting lines (each listed voxel is one line)."""
    return path.read_bytes().count(b"\n") - 1


def _csv_volume(path: Path, shape: tuple[int, ...] = (128, 128, 128)) -> np.ndarray:
    """Dense volume from a challenge CSV: values, or 1 for a mask (empty value column)."""
    rows = _csv_rows(path)
    flat = np.zeros(int(np.prod(shape)), dtype=np.float64)
    index = np.array([int(r[0]) for r in rows], dtype=np.int64)
    flat[index] = [float(r[1]) if r[1] else 1.0 for r in rows]
    return flat.reshape(shape)


def _real_patient_dirs(root: Path) -> list[Path]:
    return sorted((root / "provided-data").glob("*/pt_*"))


@pytest.fixture(scope="session")
def real_dirs(openkbp_root: Path) -> list[Path]:
    dirs = _real_patient_dirs(openkbp_root)
    assert len(dirs) == 50
    return dirs


@pytest.fixture(scope="session")
def real_summaries(real_dirs: list[Path]) -> dict[str, dict]:
    """Every real patient read once with the reader; only summaries are kept (not 50 sets of volumes)."""
    summaries = {}
    for folder in real_dirs:
        patient = read_patient(folder, require_dose=True)
        _, present = label_map_from_structures(patient.structures, DEFAULT_STRUCTURES, patient.shape)
        summaries[folder.name] = {
            "shape": patient.shape,
            "ct_range": (float(patient.ct.min()), float(patient.ct.max())),
            "dose_max": float(patient.dose.max()),
            "dose_sum": float(patient.dose.astype(np.float64).sum()),
            "mask_voxels": int(patient.possible_dose_mask.sum()),
            "structures": {name: int(mask.sum()) for name, mask in patient.structures.items()},
            "voxel_size": patient.voxel_size_mm,
            "default_present": present,
            "dose_outside_mask": int(((patient.dose > 0) & ~patient.possible_dose_mask).sum()),
        }
    return summaries


@pytest.fixture()
def real_copy(real_dirs: list[Path], tmp_path: Path):
    """Copy a real patient (the smallest) into a temporary folder, to break it."""

    def make(name: str = "pt_copy", parent: Path | None = None) -> Path:
        source = min(real_dirs, key=lambda d: sum(f.stat().st_size for f in d.iterdir()))
        target = (parent or tmp_path / "train-pats") / name
        shutil.copytree(source, target)
        return target

    return make


# ------------------------------------------------------------------------------------------------------ real patients
@pytest.mark.realdata
def test_every_real_patient_matches_an_independent_parse(real_dirs, real_summaries):
    assert set(real_summaries) == {d.name for d in real_dirs}
    for folder in real_dirs:
        summary = real_summaries[folder.name]
        assert summary["shape"] == (128, 128, 128)
        assert summary["ct_range"][0] >= 0.0 and summary["ct_range"][1] <= 4095.0
        dose = _csv_values(folder / "dose.csv")
        assert summary["dose_max"] == pytest.approx(max(dose), abs=1e-4)
        assert summary["dose_sum"] == pytest.approx(sum(dose), rel=1e-6)
        assert 50.0 < summary["dose_max"] < 100.0  # head-and-neck plans of 56-70 Gy
        assert summary["mask_voxels"] == _count_rows(folder / "possible_dose_mask.csv")
        files = set(os.listdir(folder))
        assert set(summary["structures"]) == {n for n in STRUCTURE_NAMES if f"{n}.csv" in files}
        for name, voxels in summary["structures"].items():
            assert voxels == _count_rows(folder / f"{name}.csv")
        with open(folder / "voxel_dimensions.csv", newline="") as stream:
            assert summary["voxel_size"] == pytest.approx([float(r[0]) for r in csv.reader(stream)])
        assert summary["default_present"] == [1] + [int(f"{n}.csv" in files) for n in DEFAULT_STRUCTURES]
        assert summary["dose_outside_mask"] == 0


@pytest.mark.realdata
def test_missing_default_structures_are_counted(real_dirs, real_summaries):
    lacking = {n: sum(not (d / f"{n}.csv").exists() for d in real_dirs) for n in DEFAULT_STRUCTURES}
    from_reader = {
        n: sum(s["default_present"][i + 1] == 0 for s in real_summaries.values())
        for i, n in enumerate(DEFAULT_STRUCTURES)
    }
    assert from_reader == lacking
    print(f"\npatients lacking each default structure (of {len(real_dirs)}): {lacking}")
    assert sum(lacking.values()) > 0  # the subset has such patients; label_class_present must say so


@pytest.mark.realdata
def test_one_real_patient_volumes_equal_an_independent_parse(real_dirs):
    folder = real_dirs[0]
    patient = read_patient(folder)
    np.testing.assert_array_equal(patient.ct, np.clip(_csv_volume(folder / "ct.csv"), 0, 4095).astype(np.float32))
    np.testing.assert_array_equal(patient.dose, _csv_volume(folder / "dose.csv").astype(np.float32))
    np.testing.assert_array_equal(patient.possible_dose_mask, _csv_volume(folder / "possible_dose_mask.csv") > 0)
    np.testing.assert_array_equal(patient.structures["SpinalCord"], _csv_volume(folder / "SpinalCord.csv") > 0)


@pytest.mark.realdata
def test_real_orientation_is_as_documented(real_dirs):
    """Row A->P, column R->L, slice S->I (see the module docstring of ctan_monai.apps.openkbp)."""
    checked = 0
    for folder in real_dirs[:12]:
        names = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid")
        if not all((folder / f"{n}.csv").exists() for n in names):
            continue
        centre = {
            n: np.mean(np.unravel_index(read_sparse_csv(folder / f"{n}.csv", kind="mask")[0], (128,) * 3), axis=1)
            for n in names
        }
        assert centre["LeftParotid"][1] > centre["RightParotid"][1]  # patient left at larger column
        assert centre["SpinalCord"][0] > centre["RightParotid"][0]  # cord posterior to the parotids
        assert centre["Brainstem"][2] < centre["SpinalCord"][2]  # brainstem superior to the cord
        spread = np.ptp(
            np.unravel_index(read_sparse_csv(folder / "SpinalCord.csv", kind="mask")[0], (128,) * 3), axis=1
        )
        assert spread[2] > 3 * max(spread[0], spread[1])  # the cord runs along the slice axis
        checked += 1
    assert checked >= 5


@pytest.mark.realdata
def test_validate_real_dataset_and_datalists(openkbp_root):
    report = validate_dataset(openkbp_root, structures=DEFAULT_STRUCTURES)
    assert report.ok, report.problems
    assert len(report.valid_cases) == 50
    train = build_datalist(openkbp_root / "provided-data", "train-pats")
    val = build_datalist(openkbp_root, "validation-pats")
    assert len(train) == 40 and len(val) == 10
    numbers = [int(e["case_id"].split("_")[1]) for e in train]
    assert numbers == sorted(numbers)
    assert all(Path(e["ct"]).is_file() and Path(e["dose"]).is_file() for e in train + val)
    with pytest.raises(FileNotFoundError, match="test-pats"):
        build_datalist(openkbp_root, "test-pats")
    with pytest.raises(ValueError, match="split must be one of"):
        build_datalist(openkbp_root, "train")


# -------------------------------------------------------------------------------------------------- malformed files
def _rewrite_line(path: Path, line_number: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line_number - 1] = text + "\n"
    path.write_text("".join(lines))


@pytest.mark.realdata
@pytest.mark.parametrize(
    "breakage, file, expected",
    [
        ("truncate", "ct.csv", "truncated"),
        ("bad_index", "dose.csv", "outside the 128x128x128 grid"),
        ("nan", "dose.csv", "NaN or infinite: line 4"),
        ("missing_ct", "ct.csv", "missing ct.csv"),
        ("text_value", "ct.csv", "not numbers: line 3 ('abc')"),
        ("negative_dose", "dose.csv", "negative dose"),
        ("header", "possible_dose_mask.csv", "expected ',data'"),
        ("duplicate", "ct.csv", "listed more than once"),
        ("mask_value", "SpinalCord.csv", "must leave the data column empty"),
        ("no_voxel_size", "voxel_dimensions.csv", "missing voxel_dimensions.csv"),
    ],
)
def test_malformed_real_files_give_clear_errors(real_copy, breakage, file, expected):
    folder = real_copy()
    path = folder / file
    if breakage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 3])
    elif breakage == "bad_index":
        _rewrite_line(path, 5, "2097152,12.5")
    elif breakage == "nan":
        _rewrite_line(path, 4, path.read_text().splitlines()[3].split(",")[0] + ",nan")
    elif breakage in ("missing_ct", "no_voxel_size"):
        path.unlink()
    elif breakage == "text_value":
        _rewrite_line(path, 3, path.read_text().splitlines()[2].split(",")[0] + ",abc")
    elif breakage == "negative_dose":
        _rewrite_line(path, 6, path.read_text().splitlines()[5].split(",")[0] + ",-3.5")
    elif breakage == "header":
        _rewrite_line(path, 1, "index,value")
    elif breakage == "duplicate":
        lines = path.read_text().splitlines()
        _rewrite_line(path, 3, lines[1])
    elif breakage == "mask_value":
        _rewrite_line(path, 2, path.read_text().splitlines()[1].split(",")[0] + ",1")
    with pytest.raises(DatasetValidationError) as caught:
        read_patient(folder, require_dose=True)
    message = str(caught.value)
    assert str(path) in message, message
    assert expected in message, message
    assert all(p.case == "pt_copy" for p in caught.value.problems)


@pytest.mark.realdata
def test_validate_dataset_lists_every_problem_in_one_pass(real_copy, tmp_path):
    good = real_copy("pt_1")
    two_problems = real_copy("pt_2")
    (two_problems / "ct.csv").unlink()
    _rewrite_line(two_problems / "dose.csv", 2, "1,nan")
    no_mask = real_copy("pt_3")
    (no_mask / "possible_dose_mask.csv").unlink()
    report = validate_dataset(tmp_path / "train-pats")
    assert not report.ok
    assert report.valid_cases == [good.name]
    assert report.bad_cases() == ["pt_2", "pt_3"]
    files = sorted(Path(p.file).name for p in report.problems)
    assert files == ["ct.csv", "dose.csv", "possible_dose_mask.csv"]
    with pytest.raises(DatasetValidationError, match="3 problem"):
        report.raise_if_problems()
    # The same patients, converted: the good one is cached, every problem is listed, or skipped on request.
    with pytest.raises(DatasetValidationError) as caught:
        convert_dataset(tmp_path / "train-pats", tmp_path / "cache")
    assert len(caught.value.problems) == 3
    with pytest.warns(OpenKBPDataWarning, match="bad cases skipped"):
        entries = convert_dataset(tmp_path / "train-pats", tmp_path / "cache", skip_bad_cases=True)
    assert [e["case_id"] for e in entries] == ["pt_1"]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sorted({s["case"] for s in manifest["skipped"]}) == ["pt_2", "pt_3"]


def test_sparse_csv_checks_on_small_files(tmp_path):
    path = tmp_path / "dose.csv"
    path.write_text(",data\n0,1.5\n7,inf\n8,2.0\n")
    with pytest.raises(DatasetValidationError) as caught:
        read_sparse_csv(path, (2, 2, 2), kind="dose")
    assert "NaN or infinite: line 3 ('inf')" in str(caught.value)
    assert "outside the 2x2x2 grid (0..7): line 4" in str(caught.value)
    path.write_text("")
    with pytest.raises(DatasetValidationError, match="is empty"):
        read_sparse_csv(path, (2, 2, 2))
    path.write_text(",data\n0,1.5,3\n1,2\n")
    with pytest.raises(DatasetValidationError, match="more than two fields: line 2$"):
        read_sparse_csv(path, (2, 2, 2))
    path.write_text(",data\n0,1.5\n1,2,3,4\n")
    with pytest.raises(DatasetValidationError, match="Expected 3 fields in line 3, saw 4"):
        read_sparse_csv(path, (2, 2, 2))
    path.write_text(",data\n1.5,2\n")
    with pytest.raises(DatasetValidationError, match="not integers: line 2"):
        read_sparse_csv(path, (2, 2, 2))
    with pytest.raises(ValueError, match="unknown OpenKBP structure"):
        read_patient(tmp_path, structures=["Brainstm"])


def test_dose_outside_possible_dose_mask_warns(tmp_path):
    patient = synthetic_openkbp_patient("pt_1", np.random.default_rng(1), SMALL)
    folder = write_openkbp_demo(tmp_path, n_train=2, n_val=0, size=SMALL) / "train-pats" / "pt_1"
    outside = np.flatnonzero(~patient.possible_dose_mask.ravel())[0]
    with open(folder / "dose.csv", "a") as stream:
        stream.write(f"{outside},3.25\n")
    with pytest.warns(OpenKBPDataWarning, match=r"1 voxel\(s\) with dose above 0 outside possible_dose_mask"):
        read_patient(folder, grid_shape=SMALL_GRID)


# ------------------------------------------------------------------------------------------------------ dose writer
def test_dose_csv_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    dose = np.zeros(SMALL_GRID, dtype=np.float32)
    region = rng.uniform(size=SMALL_GRID) < 0.3
    values = rng.uniform(0, 80, size=int(region.sum())).astype(np.float32)
    values[:4] = [1e-30, 3.4e38, 70.0, 0.1]  # extremes and a value with no exact binary form
    dose[region] = values
    path = write_dose_csv(torch.from_numpy(dose)[None], tmp_path / "pt_1.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == ",data" and len(lines) == 1 + int(region.sum())
    assert lines[1] == f"{np.flatnonzero(region)[0]},1e-30"
    indices, read_values = read_sparse_csv(path, SMALL_GRID, kind="dose")
    back = np.zeros(dose.size, dtype=np.float32)
    back[indices] = read_values
    np.testing.assert_array_equal(back.reshape(SMALL_GRID), dose)  # bit-exact float32
    # an all-zero prediction is written as one explicit zero, which the (strict) reader accepts
    zero_path = write_dose_csv(np.zeros(SMALL_GRID, np.float32), tmp_path / "pt_0.csv")
    assert zero_path.read_text() == ",data\n0,0.0\n"
    indices, read_values = read_sparse_csv(zero_path, SMALL_GRID, kind="dose")
    assert indices.tolist() == [0] and read_values.tolist() == [0.0]
    with pytest.raises(ValueError, match="negative"):
        write_dose_csv(-dose, tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="NaN"):
        write_dose_csv(np.full((2, 2, 2), np.nan), tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="3D"):
        write_dose_csv(np.zeros((2, 2)), tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


@pytest.mark.realdata
def test_real_dose_round_trips_through_the_writer(real_dirs, tmp_path):
    patient = read_patient(real_dirs[1])
    path = write_dose_csv(patient.dose, tmp_path / f"{patient.id}.csv")
    indices, values = read_sparse_csv(path, kind="dose")
    back = np.zeros(patient.dose.size, dtype=np.float32)
    back[indices] = values
    np.testing.assert_array_equal(back.reshape(patient.dose.shape), patient.dose)
    original = {r[0]: r[1] for r in _csv_rows(real_dirs[1] / "dose.csv") if float(r[1]) != 0.0}
    written = dict(_csv_rows(path))
    assert written == original  # same rows, same decimal text (zeros are not written)


# ------------------------------------------------------------------------------------------------------ NIfTI cache
@pytest.mark.realdata
def test_real_cache_round_trip_and_reuse(real_dirs, tmp_path):
    lacking = next(d for d in real_dirs if any(not (d / f"{n}.csv").exists() for n in DEFAULT_STRUCTURES))
    source_root = tmp_path / "src" / "train-pats"
    source_root.mkdir(parents=True)
    for folder in (real_dirs[0], lacking):
        shutil.copytree(folder, source_root / folder.name)
    cache = tmp_path / "cache"
    entries = convert_dataset(tmp_path / "src", cache)
    assert [e["case_id"] for e in entries] == sorted({real_dirs[0].name, lacking.name}, key=lambda n: int(n[3:]))
    for entry in entries:
        patient = read_patient(source_root / entry["case_id"])
        image = nib.load(entry["image"])
        np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), patient.ct / np.float32(4095.0))
        assert image.get_data_dtype() == np.float32
        np.testing.assert_array_equal(np.asarray(nib.load(entry["dose"]).dataobj), patient.dose)
        np.testing.assert_array_equal(np.asarray(nib.load(entry["dose_mask"]).dataobj), patient.possible_dose_mask)
        label = np.asarray(nib.load(entry["label"]).dataobj)
        assert label.dtype == np.uint8
        for index, name in enumerate(DEFAULT_STRUCTURES, start=1):
            if name in patient.structures:
                # first listed wins overlaps: every voxel of a structure is it or an earlier one
                assert np.all((label[patient.structures[name]] <= index) & (label[patient.structures[name]] > 0))
            else:
                assert not np.any(label == index)
        assert entry["label_class_present"] == [1] + [int(n in patient.structures) for n in DEFAULT_STRUCTURES]
        assert np.linalg.norm(image.affine[:3, :3], axis=0) == pytest.approx(patient.voxel_size_mm)
        assert nib.aff2axcodes(image.affine) == ("P", "L", "I")
        assert entry["spacing"] == pytest.approx(patient.voxel_size_mm)
    assert 0 in entries[-1]["label_class_present"] or 0 in entries[0]["label_class_present"]

    stamp = {e["case_id"]: os.stat(e["image"]).st_mtime_ns for e in entries}
    assert convert_dataset(tmp_path / "src", cache) == entries  # reused: nothing rewritten
    assert {e["case_id"]: os.stat(e["image"]).st_mtime_ns for e in entries} == stamp
    assert load_manifest(cache, "train-pats") == entries

    corrupt = Path(entries[0]["dose"])
    corrupt.write_bytes(corrupt.read_bytes()[:1000])  # a half-written file: redone
    os.utime(source_root / entries[1]["case_id"] / "ct.csv")  # a changed source: redone
    again = convert_dataset(tmp_path / "src", cache)
    assert again == entries
    np.testing.assert_array_equal(
        np.asarray(nib.load(again[0]["dose"]).dataobj), read_patient(source_root / entries[0]["case_id"]).dose
    )
    assert os.stat(again[1]["image"]).st_mtime_ns != stamp[entries[1]["case_id"]]

    # the cache alone (copied to a machine without the CSVs) trains as is when dataset_dir is the folder it was made
    # from; another folder (a typo), a mismatched or a damaged cache is refused
    from ctan_monai.apps.openkbp.prepare import prepare_openkbp

    moved = tmp_path / "moved_cache"
    shutil.copytree(cache, moved)
    (tmp_path / "src").rename(tmp_path / "src_elsewhere")
    splits = prepare_openkbp(tmp_path / "src", moved, DEFAULT_STRUCTURES)
    assert [e["case_id"] for e in splits["train-pats"]] == [e["case_id"] for e in entries]
    assert all(e["image"].startswith(str(moved)) for e in splits["train-pats"])
    with pytest.raises(FileNotFoundError, match="does not stand in for it"):
        prepare_openkbp(tmp_path / "no_sources", moved, DEFAULT_STRUCTURES)
    with pytest.raises(ValueError, match="cache made for structures"):
        prepare_openkbp(tmp_path / "src", moved, ["Brainstem"])
    Path(splits["train-pats"][0]["dose"]).unlink()
    with pytest.raises(DatasetValidationError, match="dose.nii.gz: dose file is missing"):
        prepare_openkbp(tmp_path / "src", moved, DEFAULT_STRUCTURES)


# ----------------------------------------------------------------------------------------------------- demo dataset
def test_demo_writer_output_validates_and_reads_back(tmp_path):
    root = write_openkbp_demo(tmp_path, n_train=2, n_val=1, seed=5)  # the challenge's 128 grid
    assert "SYNTHETIC" in (tmp_path / "README.txt").read_text()
    report = validate_dataset(root)
    assert report.ok, report.problems
    assert report.valid_cases == ["pt_1", "pt_2", "pt_3"]
    assert not (root / "train-pats" / "pt_2" / "LeftParotid.csv").exists()
    assert (root / "train-pats" / "pt_1" / "LeftParotid.csv").exists()
    assert [e["case_id"] for e in build_datalist(root, "validation-pats")] == ["pt_3"]
    expected = synthetic_openkbp_patient("pt_1", np.random.default_rng([5, 1]), 128)
    patient = read_patient(root / "train-pats" / "pt_1")
    np.testing.assert_array_equal(patient.ct, expected.ct)
    np.testing.assert_array_equal(patient.dose, expected.dose)
    np.testing.assert_array_equal(patient.possible_dose_mask, expected.possible_dose_mask)
    assert sorted(patient.structures) == sorted(expected.structures)
    for name, mask in expected.structures.items():
        np.testing.assert_array_equal(patient.structures[name], mask)
    assert patient.voxel_size_mm == pytest.approx(expected.voxel_size_mm)
    # The phantom's dose follows the anatomy.
    dose = patient.dose
    assert abs(float(dose[patient.structures["PTV70"]].mean()) - 70.0) < 1.5
    assert abs(float(dose[patient.structures["PTV56"]].mean()) - 56.0) < 3.0
    assert not dose[~patient.possible_dose_mask].any()
    assert float(dose[patient.structures["SpinalCord"]].mean()) < 0.6 * float(dose[patient.structures["PTV56"]].mean())
    soft = patient.ct[patient.possible_dose_mask & (patient.ct > 500)]
    assert 1000 < float(np.median(soft)) < 1100
    assert float(patient.ct[~patient.possible_dose_mask].min()) == 0.0
    # Same parameters: nothing is rewritten; a foreign folder is never overwritten.
    stamp = os.stat(root / "train-pats" / "pt_1" / "ct.csv").st_mtime_ns
    assert write_openkbp_demo(tmp_path, n_train=2, n_val=1, seed=5) == root
    assert os.stat(root / "train-pats" / "pt_1" / "ct.csv").st_mtime_ns == stamp
    foreign = tmp_path / "real"
    (foreign / "provided-data").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a ctan_monai synthetic demo"):
        write_openkbp_demo(foreign)


def test_test_patients_without_dose_convert_and_load(tmp_path):
    root = write_openkbp_demo(tmp_path / "demo", n_train=2, n_val=1, size=SMALL)
    shutil.move(root / "validation-pats", root / "test-pats")
    (root / "test-pats" / "pt_3" / "dose.csv").unlink()
    assert validate_dataset(root, grid_shape=SMALL_GRID).ok  # dose is optional in test-pats only
    (root / "train-pats" / "pt_1" / "dose.csv").unlink()
    report = validate_dataset(root, grid_shape=SMALL_GRID)
    assert [(p.case, Path(p.file).name) for p in report.problems] == [("pt_1", "dose.csv")]
    entries = convert_dataset(root / "test-pats", tmp_path / "cache", grid_shape=SMALL_GRID)
    assert entries[0]["dose"] is None and entries[0]["split"] == "test-pats"
    sample = AxialSliceDataset(entries)[0]
    assert sample["dose_present"].item() == 0.0 and sample["seg_present"].item() == 1.0


def test_demo_varies_with_seed():
    a = synthetic_openkbp_patient("pt_1", np.random.default_rng([0, 1]), SMALL)
    b = synthetic_openkbp_patient("pt_1", np.random.default_rng([0, 2]), SMALL)
    assert not np.array_equal(a.structures["PTV70"], b.structures["PTV70"])
    assert a.voxel_size_mm != b.voxel_size_mm or not np.array_equal(a.ct, b.ct)


# ---------------------------------------------------------------------------------------------------- 2D slices
@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A small synthetic dataset (48^3) converted to the NIfTI cache."""
    base = tmp_path_factory.mktemp("openkbp_small")
    root = write_openkbp_demo(base / "demo", n_train=2, n_val=1, size=SMALL)
    entries = convert_dataset(root, base / "cache", grid_shape=SMALL_GRID)
    return base / "cache", entries


def test_slice_dataset_yields_the_stored_slices(small_cache):
    _, entries = small_cache
    ds = AxialSliceDataset(entries)
    expected = [
        (e["case_id"], k)
        for e in entries
        for k in np.flatnonzero(np.asarray(nib.load(e["dose_mask"]).dataobj).any(axis=(0, 1)))
    ]
    assert [(s["case_id"], s["slice_index"]) for s in (ds[i] for i in range(len(ds)))] == expected
    sample = ds[len(ds) // 2]
    entry = next(e for e in entries if e["case_id"] == sample["case_id"])
    k = sample["slice_index"]
    image = nib.load(entry["image"]).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(sample["image"][0].numpy(), image[:, :, k])
    np.testing.assert_array_equal(sample["seg"][0].numpy(), np.asarray(nib.load(entry["label"]).dataobj)[:, :, k])
    np.testing.assert_array_equal(sample["dose"][0].numpy(), np.asarray(nib.load(entry["dose"]).dataobj)[:, :, k])
    assert sample["image"].dtype == torch.float32 and sample["seg"].dtype == torch.int64
    assert sample["seg_present"].item() == 1.0 and sample["dose_present"].item() == 1.0
    assert sample["dose_mask"].shape == (1, SMALL, SMALL)
    pt2 = next(ds[i] for i in range(len(ds)) if ds[i]["case_id"] == "pt_2")
    assert pt2["seg_class_present"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # pt_2 has no LeftParotid

    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, SMALL, SMALL) and batch["seg_class_present"].shape == (4, 5)


def test_slice_rules_resize_and_task_names(small_cache):
    _, entries = small_cache
    assert len(AxialSliceDataset(entries, slice_rule="all")) == 3 * SMALL
    labels = [np.asarray(nib.load(e["label"]).dataobj) for e in entries]
    assert len(AxialSliceDataset(entries, slice_rule="label")) == sum(
        int((lab > 0).any(axis=(0, 1)).sum()) for lab in labels
    )
    body = len(AxialSliceDataset(entries, slice_rule="body"))
    assert len(AxialSliceDataset(entries)) < body < 3 * SMALL
    first_half = AxialSliceDataset(entries, slice_rule=lambda v: np.arange(v["image"].shape[0]) < SMALL // 2)
    assert len(first_half) == 3 * (SMALL // 2)
    small = AxialSliceDataset(entries, seg_task="organs", dose_task="rt", spatial_size=(32, 32))
    sample = small[5]
    assert sample["image"].shape == (1, 32, 32) and sample["organs"].shape == (1, 32, 32)
    assert set(sample) >= {"organs_class_present", "organs_present", "rt", "rt_mask", "rt_present"}
    assert set(torch.unique(sample["organs"]).tolist()) <= set(range(5))
    assert set(torch.unique(sample["rt_mask"]).tolist()) <= {0.0, 1.0}
    full = AxialSliceDataset(entries, seg_task="organs", dose_task="rt")
    assert float(sample["image"].mean()) == pytest.approx(float(full[5]["image"].mean()), abs=0.02)  # area averaging
    with pytest.raises(ValueError, match="slice_rule"):
        AxialSliceDataset(entries, slice_rule="tumour")


def test_slice_dataset_reports_every_bad_entry(small_cache, tmp_path):
    cache, entries = small_cache
    missing = dict(entries[0], image=str(tmp_path / "nope.nii.gz"))
    wrong_label = dict(entries[1], label=str(tmp_path / "label.nii.gz"))
    nib.save(nib.Nifti1Image(np.full(SMALL_GRID, 9, np.uint8), np.eye(4)), wrong_label["label"])
    with pytest.raises(DatasetValidationError) as caught:
        AxialSliceDataset([missing, wrong_label, entries[2]])
    message = str(caught.value)
    assert "2 problem" in message and "nope.nii.gz: image file does not exist" in message
    assert "label values 9..9 outside 0..4" in message


def test_slice_dataset_entries_without_dose_or_in_hu(small_cache, tmp_path):
    cache, entries = small_cache
    hu = tmp_path / "hu.nii.gz"
    image = nib.load(entries[0]["image"])
    nib.save(nib.Nifti1Image(image.get_fdata(dtype=np.float32) * 4095.0 - 1024.0, image.affine), hu)
    no_dose = {"case_id": "ct_only", "image": str(hu), "label": entries[0]["label"], "dose": None, "dose_mask": None}
    relative = {
        k: os.path.relpath(v, cache) if isinstance(v, str) and k != "case_id" else v for k, v in entries[0].items()
    }
    ds = AxialSliceDataset([no_dose], num_classes=5, slice_rule="all", image_range=(-1024.0, 3071.0))
    ref = AxialSliceDataset([relative], slice_rule="all", base_dir=cache)
    sample = ds[20]
    assert sample["dose_present"].item() == 0.0 and not sample["dose"].any() and not sample["dose_mask"].any()
    assert sample["seg_class_present"].tolist() == [1.0] * 5  # no flags in the entry: all annotated
    torch.testing.assert_close(sample["image"], ref[20]["image"], atol=1e-5, rtol=0)
    dose_only = dict(relative, dose_mask=None)
    assert AxialSliceDataset([dose_only], slice_rule="all", base_dir=cache)[20]["dose_mask"].all()


def test_slice_dataset_reorients_on_request(small_cache):
    _, entries = small_cache
    stored = AxialSliceDataset(entries[:1], slice_rule="all")
    same = AxialSliceDataset(entries[:1], slice_rule="all", axcodes="PLI")  # the cache's own orientation
    swapped = AxialSliceDataset(entries[:1], slice_rule="all", axcodes="LPI")  # rows and columns exchanged
    torch.testing.assert_close(same[24]["image"], stored[24]["image"])
    torch.testing.assert_close(swapped[24]["image"][0], stored[24]["image"][0].T)
    torch.testing.assert_close(swapped[24]["seg"][0], stored[24]["seg"][0].T)


def test_load_case_and_slice_volume_helpers(small_cache):
    _, entries = small_cache
    case = load_case(entries[1], seg_task="organs")
    assert case["image"].shape == (1, *SMALL_GRID) and case["organs"].dtype == torch.int64
    assert case["organs_class_present"].tolist() == entries[1]["label_class_present"]
    np.testing.assert_array_equal(case["dose"][0].numpy(), np.asarray(nib.load(entries[1]["dose"]).dataobj))
    slices = volume_to_slices(case["image"], slice_axis=2)
    assert slices.shape == (SMALL, 1, SMALL, SMALL)
    torch.testing.assert_close(slices[7, 0], case["image"][0, :, :, 7])
    torch.testing.assert_close(slices_to_volume(slices, slice_axis=2), case["image"])
    torch.testing.assert_close(slices_to_volume(volume_to_slices(case["dose"], 0), 0), case["dose"])


def test_slice_augmentation_keeps_labels_consistent(small_cache):
    _, entries = small_cache
    torch.manual_seed(0)
    aug = slice_augmentation(prob=1.0)
    aug.set_random_state(seed=0)
    ds = AxialSliceDataset(entries[:1], transform=aug)
    plain = AxialSliceDataset(entries[:1])
    sample, reference = ds[10], plain[10]
    assert type(sample["image"]) is torch.Tensor and sample["seg"].dtype == torch.int64
    assert set(torch.unique(sample["seg"]).tolist()) <= set(torch.unique(reference["seg"]).tolist())
    assert not torch.equal(sample["image"], reference["image"])
    assert torch.equal(plain[10]["image"], reference["image"])  # the cache is not changed by the transform
