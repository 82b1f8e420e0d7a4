"""STOIC data: labels with missing values, validation, lung preprocessing, 2.5D / 3D datasets, demo writer."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import DataLoader
from scipy import ndimage

from ctan_monai.apps import stoic
from ctan_monai.apps.stoic.demo import make_chest_phantom, write_stoic_demo
from ctan_monai.data.validation import DatasetValidationError, ValidationReport
from tests.conftest import shared_file

DEMO_SPACING = (3.5, 3.5, 5.0)  # the demo's own grid: conversion without interpolation, fast


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _window(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu.astype(np.float64) + 1000.0) / 1400.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stoic_demo(tmp_path_factory.mktemp("stoic") / "demo", n_patients=6, seed=3)


@pytest.fixture(scope="module")
def demo_manifest(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return stoic.convert_dataset(demo_root, tmp_path_factory.mktemp("cache"), spacing=DEMO_SPACING)


# ------------------------------------------------------------------------------------------------------------- labels
@pytest.mark.realdata
def test_public_reference_labels_parse_and_class_balance() -> None:
    path = shared_file("stoic/stoic2021-public-reference-labels.csv")
    labels = stoic.read_reference(path)
    rows = _read_csv(path)
    assert len(labels) == len(rows) == 2000
    covid = [float(r["probCOVID"]) for r in rows]
    severe = [float(r["probSevere"]) for r in rows]
    assert [labels[r["PatientID"]]["covid"] for r in rows] == covid
    assert [labels[r["PatientID"]]["severe"] for r in rows] == severe
    n_covid = sum(covid)
    n_severe = sum(severe)
    assert n_covid == 1205 and n_severe == 301  # COVID-19 60.25 %; severe 15.05 % of all, 24.98 % of COVID-19
    assert not any(s == 1.0 and c == 0.0 for c, s in zip(covid, severe))  # severe implies COVID-19


def test_read_reference_missing_labels_and_every_error(tmp_path: Path) -> None:
    path = tmp_path / "reference.csv"
    path.write_text(
        "PatientID,probCOVID,probSevere\n1,1,\n2,0,0\n3,0.5,0\n4,1,yes\n5,0,1\n6,1,1\n6,1,0\n7,,\n8,1.0,1.0\n"
    )
    with pytest.raises(DatasetValidationError) as info:
        stoic.read_reference(path)
    messages = {p.case: p.message for p in info.value.problems}
    assert len(info.value.problems) == 4  # every problem at once
    assert "0.5" in messages["3"] and "yes" in messages["4"]
    assert "severe implies COVID-19" in messages["5"] and "more than once" in messages["6"]
    report = ValidationReport("x")
    labels = stoic.read_reference(path, report)
    assert labels == {
        "1": {"covid": 1.0, "severe": None},  # empty cell: unknown, not negative
        "2": {"covid": 0.0, "severe": 0.0},
        "7": {"covid": None, "severe": None},
        "8": {"covid": 1.0, "severe": 1.0},
    }
    assert report.bad_cases() == ["3", "4", "5", "6"]
    (tmp_path / "bad.csv").write_text("PatientID,COVID\n1,1\n")
    with pytest.raises(DatasetValidationError, match=r"missing column\(s\) \['probCOVID', 'probSevere'\]"):
        stoic.read_reference(tmp_path / "bad.csv")


def test_build_datalist_presence_flags(demo_root: Path) -> None:
    rows = {r["PatientID"]: r for r in _read_csv(demo_root / "metadata" / "reference.csv")}
    datalist = stoic.build_datalist(demo_root)
    assert [d["case_id"] for d in datalist] == sorted(rows, key=int)
    for item in datalist:
        row = rows[item["case_id"]]
        assert Path(item["image"]) == demo_root / "data" / "mha" / f"{item['case_id']}.mha"
        assert item["covid"] == float(row["probCOVID"]) and item["covid_present"] == 1.0
        assert item["severe_present"] == (0.0 if row["probSevere"] == "" else 1.0)
        assert item["severe"] == (float(row["probSevere"]) if row["probSevere"] else 0.0)
    assert any(d["severe_present"] == 0.0 for d in datalist)


# --------------------------------------------------------------------------------------------------------- validation
def test_validate_dataset_reports_every_problem(demo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(demo_root, root)
    assert stoic.validate_dataset(root).ok
    cases = [r["PatientID"] for r in _read_csv(root / "metadata" / "reference.csv")]
    mha = root / "data" / "mha"
    (mha / f"{cases[0]}.mha").unlink()
    (mha / f"{cases[1]}.mha").write_bytes(b"not an image at all")
    sitk.WriteImage(sitk.Image([64, 64], sitk.sitkInt16), str(mha / f"{cases[2]}.mha"))
    coarse = sitk.ReadImage(str(mha / f"{cases[3]}.mha"))
    coarse.SetSpacing((40.0, 40.0, 5.0))
    sitk.WriteImage(coarse, str(mha / f"{cases[3]}.mha"))
    # Unsigned storage without the -1024 offset: header fine, intensities not HU.
    shifted = sitk.Cast(sitk.ReadImage(str(mha / f"{cases[4]}.mha")) + 1024, sitk.sitkUInt16)
    sitk.WriteImage(shifted, str(mha / f"{cases[4]}.mha"))
    with open(root / "metadata" / "reference.csv", "a") as handle:
        handle.write("99999,0,1\n")

    header_only = stoic.validate_dataset(root, check_intensities=False)
    assert cases[4] not in header_only.bad_cases()
    report = stoic.validate_dataset(root)
    by_case = {case: [p for p in report.problems if p.case == case] for case in report.bad_cases()}
    assert set(by_case) == {*cases[:5], "99999"}
    assert report.valid_cases == cases[5:]
    assert "image file not found" in by_case[cases[0]][0].message
    assert "unreadable volume" in by_case[cases[1]][0].message
    assert "expected a 3D volume" in by_case[cases[2]][0].message
    assert "in-plane spacing (40.0, 40.0)" in by_case[cases[3]][0].message
    assert "no air" in by_case[cases[4]][0].message
    assert "severe implies COVID-19" in by_case["99999"][0].message
    assert all(p.file.endswith(f"{case}.mha") for case in cases[:5] for p in by_case[case])
    with pytest.raises(DatasetValidationError, match="6 problem"):
        report.raise_if_problems()


# ------------------------------------------------------------------------------------------------------ preprocessing
def _phantom_image(direction_flip: bool = False) -> tuple[sitk.Image, np.ndarray]:
    hu, lungs = make_chest_phantom((40, 80, 80), DEMO_SPACING, n_patches=4, rng=np.random.default_rng(7))
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(DEMO_SPACING)
    image.SetOrigin((-140.0, -140.0, -200.0))
    if direction_flip:  # the same physical volume, stored with x running right to left
        image = sitk.GetImageFromArray(hu[:, :, ::-1].copy())
        image.SetSpacing(DEMO_SPACING)
        image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        image.SetOrigin((-140.0 + 79 * DEMO_SPACING[0], -140.0, -200.0))
    return image, lungs


def test_preprocess_volume_finds_lungs_and_keeps_geometry() -> None:
    image, truth = _phantom_image()
    ct = stoic.preprocess_volume(image, spacing=DEMO_SPACING, margin_mm=10.0)
    (x0, y0, z0), (x1, y1, z1) = ct.body_box
    hu = sitk.GetArrayFromImage(ct.image)
    mask = sitk.GetArrayFromImage(ct.lung_mask).astype(bool)
    assert ct.image.GetSpacing() == DEMO_SPACING and hu.dtype == np.int16
    assert hu.shape[1] == hu.shape[2] == x1 - x0 == y1 - y0  # square in-plane
    # Same grid as the input: the crop is a pure index shift, so the origin moves by start * spacing.
    assert np.allclose(ct.image.GetOrigin(), np.array([-140.0, -140.0, -200.0]) + np.array([x0, y0, z0]) * DEMO_SPACING)
    source = sitk.GetArrayFromImage(image)
    inside = (slice(max(z0, 0), z1), slice(max(y0, 0), y1), slice(max(x0, 0), x1))
    local = tuple(slice(s.start - o, s.stop - o) for s, o in zip(inside, (z0, y0, x0)))
    assert np.array_equal(hu[local], source[inside])
    # The whole lung is inside the crop, and the mask matches the phantom's lungs.
    assert truth[inside].sum() == truth.sum()
    dice = 2 * (mask[local] & truth[inside]).sum() / (mask.sum() + truth.sum())
    assert dice > 0.97, dice
    flipped = stoic.preprocess_volume(_phantom_image(direction_flip=True)[0], spacing=DEMO_SPACING)
    assert np.array_equal(sitk.GetArrayFromImage(flipped.lung_mask), mask)
    assert np.allclose(flipped.image.GetOrigin(), ct.image.GetOrigin())


def test_preprocess_volume_rejects_non_chest() -> None:
    blank = sitk.GetImageFromArray(np.full((10, 40, 40), 40, np.int16))
    with pytest.raises(ValueError, match="no lungs found"):
        stoic.preprocess_volume(blank)


def test_lung_slice_selection() -> None:
    mask = np.zeros((20, 10, 10), bool)
    for z, width in zip(range(3, 17), [1, 2, 4, 6, 8, 8, 8, 8, 8, 8, 6, 4, 2, 1]):
        mask[z, :width, :8] = True  # areas 8..64 voxels
    # Slices with at least a quarter of the largest area (16 of 64 voxels): width >= 2.
    assert stoic.lung_slice_candidates(mask).tolist() == list(range(4, 16))
    assert stoic.lung_slice_candidates(np.moveaxis(mask, 0, -1), axis=-1).tolist() == list(range(4, 16))
    assert stoic.select_lung_slices(mask, 4) == [5, 8, 11, 14]  # centres of 4 equal bins of the 12 candidates
    assert stoic.select_lung_slices(mask, 50) == list(range(4, 16))
    edge = np.zeros((5, 4, 4), bool)
    edge[0] = True  # the only lung slice lacks a neighbour below
    assert stoic.lung_slice_candidates(edge).size == 0
    with pytest.raises(ValueError, match="empty"):
        stoic.select_lung_slices(np.zeros((5, 4, 4)), 2)


# --------------------------------------------------------------------------------------------------------- conversion
def test_convert_dataset_writes_once_and_reuses(demo_root: Path, demo_manifest: dict) -> None:
    cases = demo_manifest["cases"]
    cache = Path(cases[0]["image"]).parent
    assert [c["case_id"] for c in cases] == [d["case_id"] for d in stoic.build_datalist(demo_root)]
    assert demo_manifest["skipped"] == []
    assert json.loads((cache / "manifest.json").read_text()) == demo_manifest
    assert not list(cache.glob(".*part*"))  # no temporary left behind
    for case in cases:
        image = nib.load(case["image"])
        assert np.allclose(image.header.get_zooms(), DEMO_SPACING)
        assert case["lung_slices"] and max(case["lung_slices"]) <= image.shape[2] - 2
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.nii.gz")}
    again = stoic.convert_dataset(demo_root, cache, spacing=DEMO_SPACING)
    assert again["cases"] == cases
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.nii.gz")} == stamps  # reused, not redone
    stricter = stoic.convert_dataset(demo_root, cache, spacing=DEMO_SPACING, min_area_fraction=0.9)
    for old, new in zip(cases, stricter["cases"]):  # a changed setting redoes the case
        assert set(new["lung_slices"]) < set(old["lung_slices"])


def test_convert_dataset_bad_intensities_raise_or_skip(tmp_path: Path) -> None:
    root = write_stoic_demo(tmp_path / "demo", n_patients=3, seed=5)
    bad = sorted((root / "data" / "mha").glob("*.mha"))[0]
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(bad)) + 1024, sitk.sitkUInt16), str(bad))
    with pytest.raises(DatasetValidationError, match=f"{bad.stem}.*no air"):
        stoic.convert_dataset(root, tmp_path / "cache", spacing=(7.0, 7.0, 10.0))
    manifest = stoic.convert_dataset(root, tmp_path / "cache", spacing=(7.0, 7.0, 10.0), skip_bad_cases=True)
    assert [c["case_id"] for c in manifest["cases"]] == sorted((p.stem for p in bad.parent.glob("*.mha")), key=int)[1:]
    assert len(manifest["skipped"]) == 1 and bad.stem in manifest["skipped"][0]


# ----------------------------------------------------------------------------------------------------------- datasets
def test_25d_training_samples_are_lung_slabs(demo_manifest: dict) -> None:
    entry = demo_manifest["cases"][1]
    cached = nib.load(entry["image"]).get_fdata()  # [x, y, z]
    side = cached.shape[0]
    dataset = stoic.Stoic25DDataset([entry], training=True, image_size=side, slices_per_patient=5, seed=1)
    samples = dataset[0]
    assert len(samples) == 5
    for sample in samples:
        z = sample["slice_index"]
        assert z in entry["lung_slices"]
        assert sample["image"].shape == (3, side, side) and sample["image"].dtype == torch.float32
        expected = _window(np.moveaxis(cached[..., z - 1 : z + 2], -1, 0))
        assert np.allclose(sample["image"].numpy(), expected, atol=1e-5)
        for key in ("covid", "covid_present", "severe", "severe_present"):
            assert float(sample[key]) == entry[key]
        assert sample["case_id"] == entry["case_id"]
    same_seed = stoic.Stoic25DDataset([entry], training=True, image_size=side, slices_per_patient=5, seed=1)
    assert [s["slice_index"] for s in same_seed[0]] == [s["slice_index"] for s in samples]
    draws = {tuple(s["slice_index"] for s in dataset[0]) for _ in range(5)}
    assert len(draws) > 1  # a new draw each epoch


def test_25d_evaluation_fixed_slices_and_patient_mean(demo_manifest: dict) -> None:
    cases = demo_manifest["cases"][:3]
    dataset = stoic.Stoic25DDataset(cases, training=False, image_size=32, eval_slices=4)
    first = [[s["slice_index"] for s in dataset[i]] for i in range(len(cases))]
    assert first == [[s["slice_index"] for s in dataset[i]] for i in range(len(cases))]
    for case, indices in zip(cases, first):
        lungs = nib.load(case["lung_mask"]).get_fdata() > 0
        assert len(indices) == 4 and all(lungs[..., z].sum() > 0 for z in indices)
    batch = next(iter(DataLoader(dataset, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (12, 3, 32, 32) and len(batch["case_id"]) == 12
    probs = torch.linspace(0.0, 1.0, 12)
    patient = stoic.aggregate_patient_probabilities(batch["case_id"], probs)
    assert list(patient) == [c["case_id"] for c in cases]
    for k, case in enumerate(cases):
        assert patient[case["case_id"]] == pytest.approx(float(probs[4 * k : 4 * k + 4].mean()))
    present = stoic.aggregate_patient_probabilities(batch["case_id"], batch["severe_present"])
    assert present == {c["case_id"]: c["severe_present"] for c in cases}  # labelled patients only go to the AUC


def test_aggregate_patient_probabilities_checks_lengths() -> None:
    assert stoic.aggregate_patient_probabilities(["b", "a", "b"], np.array([0.2, 0.5, 0.6])) == pytest.approx(
        {"b": 0.4, "a": 0.5}
    )
    with pytest.raises(ValueError, match="2 case ids but 3 values"):
        stoic.aggregate_patient_probabilities(["a", "b"], [0.1, 0.2, 0.3])


def test_3d_dataset_runs_end_to_end(demo_manifest: dict) -> None:
    dataset = stoic.Stoic3DDataset(demo_manifest["cases"], volume_size=16)
    batch = next(iter(DataLoader(dataset, batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 1, 16, 16, 16)
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten()
    )
    head = torch.nn.Linear(4, 2)
    optimiser = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-3)
    logits = head(net(batch["image"]))
    labels = torch.stack([batch["covid"], batch["severe"]], dim=1)
    present = torch.stack([batch["covid_present"], batch["severe_present"]], dim=1)
    loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none") * present).sum()
    loss = loss / present.sum()
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss) and head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_original_file_gives_the_cached_input(demo_root: Path, demo_manifest: dict) -> None:
    """Inference reads the .mha and preprocesses it on the fly; training reads the cache: both give the network the
    same slices and the same tensors, in 2.5D and in 3D."""
    for entry in demo_manifest["cases"][:2]:
        source = {"image": entry["source"]}
        cached = stoic.Stoic25DDataset([entry], training=False, image_size=32, eval_slices=4)[0]
        original = stoic.stoic_transform(
            2, training=False, image_size=32, num_slices=4, source="original", spacing=DEMO_SPACING, labels=False
        )(source)
        assert [s["slice_index"] for s in original] == [s["slice_index"] for s in cached]
        for a, b in zip(original, cached):
            assert a["case_id"] == b["case_id"] == entry["case_id"] and "covid" not in a
            assert torch.allclose(a["image"], b["image"], atol=1e-6)
        volume = stoic.stoic_transform(3, volume_size=16, source="original", spacing=DEMO_SPACING, labels=False)(source)
        assert torch.allclose(volume["image"], stoic.Stoic3DDataset([entry], volume_size=16)[0]["image"], atol=1e-6)
    with pytest.raises(ValueError, match="source must be 'cache' or 'original'"):
        stoic.stoic_transform(source="dicom")
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        stoic.stoic_transform(spatial_dims=1)


def test_load_original_ct_errors_name_the_file(demo_root: Path, tmp_path: Path) -> None:
    loader = stoic.LoadStoicCTd("image", spacing=DEMO_SPACING)
    missing = tmp_path / "404.mha"
    with pytest.raises(DatasetValidationError, match=r"\[404\] .*404.mha: image file not found"):
        loader({"image": str(missing)})
    shifted = tmp_path / "7.mha"
    image = sitk.ReadImage(str(next((demo_root / "data" / "mha").glob("*.mha"))))
    sitk.WriteImage(sitk.Cast(image + 1024, sitk.sitkUInt16), str(shifted))
    with pytest.raises(DatasetValidationError, match=r"\[7\] .*7.mha: no air"):
        loader({"image": str(shifted)})
    blank = tmp_path / "8.mha"
    no_lungs = np.full((40, 64, 64), 40, np.int16)
    no_lungs[..., :10] = -1000  # air beside a block of tissue: HU-like, but nothing enclosed
    sitk.WriteImage(sitk.GetImageFromArray(no_lungs), str(blank))
    with pytest.raises(ValueError, match=r"\[8\] .*8.mha: no lungs found"):
        loader({"image": str(blank)})


# ---------------------------------------------------------------------------------------------------------- demo data
def test_demo_writer_layout_labels_and_lesions(demo_root: Path) -> None:
    assert "SYNTHETIC" in (demo_root / "README.txt").read_text()
    rows = _read_csv(demo_root / "metadata" / "reference.csv")
    assert list(rows[0]) == ["PatientID", "probCOVID", "probSevere"]
    assert any(r["probSevere"] == "" for r in rows)
    assert all(not (r["probSevere"] == "1" and r["probCOVID"] == "0") for r in rows)
    ggo_fraction: dict[str, list[float]] = {"negative": [], "covid": [], "severe": []}
    for row in rows:
        image = sitk.ReadImage(str(demo_root / "data" / "mha" / f"{row['PatientID']}.mha"))
        assert image.GetPixelID() == sitk.sitkInt16 and image.GetSpacing() == DEMO_SPACING
        hu = sitk.GetArrayFromImage(image)
        assert hu.shape == (48, 96, 96) and hu.min() >= -1024 and hu.max() <= 3071
        lungs = hu < -700
        ggo = (hu > -600) & (hu < -400) & ndimage.binary_dilation(lungs, iterations=3)
        kind = "negative" if row["probCOVID"] == "0" else "severe" if row["probSevere"] == "1" else "covid"
        if kind == "severe" or row["probSevere"] != "":  # a severity-unknown COVID case may be either
            ggo_fraction[kind].append(ggo.sum() / lungs.sum())
    assert max(ggo_fraction["negative"]) < 0.001 < min(ggo_fraction["covid"])
    assert max(ggo_fraction["covid"]) < min(ggo_fraction["severe"])
    assert (demo_root / "data" / "mha").is_dir() and not list(demo_root.rglob("*.part*"))


def test_demo_writer_is_reproducible(tmp_path: Path) -> None:
    first = write_stoic_demo(tmp_path / "a", n_patients=3, seed=11)
    second = write_stoic_demo(tmp_path / "b", n_patients=3, seed=11)
    assert (first / "metadata" / "reference.csv").read_text() == (second / "metadata" / "reference.csv").read_text()
    for path in (first / "data" / "mha").glob("*.mha"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(second / "data" / "mha" / path.name)))
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="n_patients"):
        write_stoic_demo(tmp_path / "c", n_patients=2)


# ---------------------------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_ct_geometry_labels_and_lung_slices(stoic_root: Path, tmp_path: Path) -> None:
    import itk

    root = stoic.find_stoic_root(stoic_root)
    report = stoic.validate_dataset(root)
    assert report.ok, report.problems
    rows = {r["PatientID"]: r for r in _read_csv(root / "metadata" / "reference.csv")}
    datalist = stoic.build_datalist(root)
    assert {d["case_id"] for d in datalist} == set(rows)
    for item in datalist:
        assert item["severe_present"] == (1.0 if rows[item["case_id"]]["probSevere"] else 0.0)
        # Geometry as read by ITK itself (a second reader) matches SimpleITK's header read.
        reader = sitk.ImageFileReader()
        reader.SetFileName(item["image"])
        reader.ReadImageInformation()
        itk_image = itk.imread(item["image"])
        assert reader.GetSize() == tuple(int(s) for s in itk.size(itk_image))
        assert np.allclose(reader.GetSpacing(), tuple(itk.spacing(itk_image)))
        assert np.allclose(reader.GetOrigin(), tuple(itk.origin(itk_image)))
        assert all(0.4 < s <= 2.5 for s in reader.GetSpacing())  # ~1.2-1.5 mm in-plane, 2 mm slices
    manifest = stoic.convert_dataset(root, tmp_path / "cache")
    assert len(manifest["cases"]) == len(rows)
    for case in manifest["cases"]:
        source = sitk.ReadImage(case["source"])
        cached = nib.load(case["image"])
        hu = cached.get_fdata()  # [x, y, z]
        assert np.allclose(cached.header.get_zooms(), stoic.DEFAULT_SPACING)
        # The cached grid (RAS affine) sits inside the source's physical z-range (LPS origin, axial stack).
        z_first, z_last = cached.affine[2, 3], cached.affine[2, 3] + 2.0 * (hu.shape[2] - 1)
        z_low = source.GetOrigin()[2]
        assert z_low - 1.0 <= z_first < z_last <= z_low + source.GetSpacing()[2] * (source.GetSize()[2] - 1) + 1.0
        # Independent check of the evaluation slices: in each, air enclosed by tissue (found here per slice, without
        # the package's 3D lung mask) covers >= 5 % of the slice and lies on both sides of the body's midline.
        for sample in stoic.Stoic25DDataset([case], training=False, image_size=64, eval_slices=8)[0]:
            _assert_slab_in_lungs(hu, sample["slice_index"], min_fraction=0.05, where=case["case_id"])


def _enclosed_air(plane: np.ndarray) -> np.ndarray:
    """Air (<= -500 HU) enclosed by tissue within one axial plane: the lungs, found without the package's masks."""
    return ndimage.binary_fill_holes(plane > -500) & (plane <= -500)


def _assert_slab_in_lungs(hu: np.ndarray, z: int, min_fraction: float, where: str, neighbours: bool = False) -> None:
    """The slab centred on axial slice ``z`` of ``hu`` ``[x, y, z]`` lies inside the lungs: in its centre slice (and,
    with ``neighbours``, in slices z-1 and z+1 too), enclosed air covers at least ``min_fraction`` of the slice and
    lies on both sides of the body's midline, two lungs and not bowel gas: each side at least a fifth of the other in
    the centre slice, a tenth in z-1 and z+1 (near the bases the two lungs end at different heights)."""
    for k in (-1, 0, 1) if neighbours else (0,):
        side_ratio = 0.2 if k == 0 else 0.1
        plane = hu[..., z + k]
        enclosed = _enclosed_air(plane)
        body_columns = np.flatnonzero((plane > -500).any(axis=1))
        midline = int((body_columns.min() + body_columns.max()) / 2)
        left, right = enclosed[:midline].sum(), enclosed[midline:].sum()
        assert enclosed.mean() >= min_fraction, (where, z, k, enclosed.mean())
        assert min(left, right) > side_ratio * max(left, right), (where, z, k, left, right)


@pytest.mark.realdata
def test_real_ct_inference_path_slices_inside_lungs(stoic_root: Path) -> None:
    """The bundle's default preprocessing (the demo grid, 3.5 x 3.5 x 5 mm) read straight from the real .mha, as
    inference does: the geometry is kept, and every 2.5D candidate slab (so any random training draw and the fixed
    evaluation slices) lies inside the lungs by the independent per-slice check, z-1 and z+1 included."""
    spacing = (3.5, 3.5, 5.0)
    root = stoic.find_stoic_root(stoic_root)
    for path in sorted((root / "data" / "mha").glob("*.mha")):
        item = stoic.LoadStoicCTd("image", spacing=spacing)({"image": str(path)})
        hu = item["image"][0].numpy()  # [x, y, z] HU
        source = sitk.ReadImage(str(path))
        ct = stoic.preprocess_volume(source, spacing)
        assert hu.shape == sitk.GetArrayFromImage(ct.image).T.shape and item["case_id"] == path.stem
        # the crop lies within the scan's physical extent (identity direction: index order is x, y, z)
        extent = np.array(source.GetOrigin()) + (np.array(source.GetSize()) - 1) * np.array(source.GetSpacing())
        crop_end = np.array(ct.image.GetOrigin()) + (np.array(hu.shape) - 1) * np.array(spacing)
        assert ct.image.GetOrigin()[2] >= source.GetOrigin()[2] - 1e-3 and crop_end[2] <= extent[2] + 1e-3
        candidates = item["lung_slices"]
        assert len(candidates) >= 20  # at 5 mm, a chest CT's lungs span far more than 20 slices
        per_slice = np.array([_enclosed_air(hu[..., z]).mean() for z in range(hu.shape[2])])
        for z in candidates:
            _assert_slab_in_lungs(hu, z, min_fraction=0.03, where=path.name, neighbours=True)
            assert per_slice[z] >= 0.2 * per_slice.max()  # not a lung tip: at least a fifth of the fullest slice
        chosen = stoic.SampleAxialSlabsd("image", num_samples=8, random=False)(item)
        assert [s["slice_index"] for s in chosen] == stoic.evenly_spaced(candidates, 8)
        drawn = stoic.SampleAxialSlabsd("image", num_samples=4, random=True)
        drawn.set_random_state(seed=0)
        assert all(s["slice_index"] in candidates for _ in range(3) for s in drawn(item))
        z = chosen[0]["slice_index"]  # the slab is slices z-1, z, z+1 as channels
        assert np.array_equal(chosen[0]["image"].numpy(), np.moveaxis(hu[..., z - 1 : z + 2], -1, 0))
