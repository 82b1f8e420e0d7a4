"""The prostate bundle on the synthetic DICOM-RT demo: data preparation (convert once, splits), the orientation of the
converted cache, training through MONAI's bundle CLI with an --arch switch, whole-patient evaluation, inference from
a CT-only DICOM folder read back with its geometry, metadata verification and TorchScript export."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import verify_metadata, verify_net_in_out

from ctan_monai.apps.openkbp.reader import openkbp_affine
from ctan_monai.apps.prostate.demo import DEMO_ORGANS, write_prostate_demo
from ctan_monai.apps.prostate.inference import LoadDicomCTd, find_ct_series, ras_affine
from ctan_monai.apps.prostate.prepare import (
    BUNDLE_AXCODES,
    LabelMapStructures,
    LoadProstateCased,
    prepare_prostate,
    split_cases,
)
from ctan_monai.data.dicom_rt import body_mask_from_ct
from ctan_monai.data.slices import AxialSliceDataset
from ctan_monai.data.validation import DatasetValidationError
from ctan_monai.networks import build_network
from tests.conftest import REPO_ROOT, compare_metrics, run_bundle, shared_file
from tests.zoo_checks import assert_export_matches_eager

pytestmark = pytest.mark.slow

BUNDLE = REPO_ROOT / "bundles" / "ctan_prostate"
# a small, fast budget: resnet18, 32 random slices in batches of 16 (2 iterations) per epoch
QUICK = ["--backbone", "resnet18", "--train_slices_per_epoch", "32", "--batch_size", "16"]
QUICK += ["--progress_bar", "False", "--num_workers", "0"]
HU_RANGE = (-1024.0, 3071.0)
# as train.yaml declares them: the dose head predicts dose / 70 Gy (dose_scale), starting at 3 Gy (dose_initial)
DOSE_SCALE = 70.0
# as train.yaml and inference.yaml declare it: one up-sampling block to the stem's resolution
FINE_DECODER = [64]
TASKS = [
    {"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 5},
    {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1, "output_scale": DOSE_SCALE},
]


def _bundle_threads1(args: list[str], cwd: Path, **kwargs) -> str:
    return run_bundle(args, cwd, threads=1, **kwargs)


@pytest.fixture(scope="module")
def prostate_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundle's configs; the demo DICOM data and the cache are written there on first use."""
    root = tmp_path_factory.mktemp("bundle") / "ctan_prostate"
    shutil.copytree(BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    return root


@pytest.fixture(scope="module")
def small_splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A small demo (4 patients of 32 x 32 x 12 voxels), converted."""
    root = tmp_path_factory.mktemp("prostate")
    splits = prepare_prostate(
        root / "dicom", root / "cache", write_demo_if_missing=True, demo_patients=4, demo_shape=(32, 32, 12)
    )
    return root, splits


# --- data preparation ----------------------------------------------------------------------------------------------


def test_prepare_converts_once_and_splits(small_splits: tuple[Path, dict], tmp_path: Path) -> None:
    root, splits = small_splits
    assert {k: len(v) for k, v in splits.items()} == {"training": 3, "validation": 1, "test": 0}
    for split, entries in splits.items():
        for entry in entries:
            assert entry["split"] == split and Path(entry["image"]).is_absolute() and Path(entry["dose"]).is_file()
    manifest = root / "cache" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = prepare_prostate(root / "dicom", root / "cache", write_demo_if_missing=True, demo_patients=4)
    assert again == splits and manifest.stat().st_mtime_ns == stamp  # the cache was reused, not rewritten
    # a changed DICOM file makes the cache stale: converted again
    some_file = next((root / "dicom" / "dicom").rglob("*.dcm"))
    os.utime(some_file, ns=(some_file.stat().st_atime_ns, some_file.stat().st_mtime_ns + 10**9))
    prepare_prostate(root / "dicom", root / "cache")
    assert manifest.stat().st_mtime_ns != stamp

    # a cache inside the dataset folder does not make its own source look changed
    prepare_prostate(root / "dicom", root / "dicom" / "nifti")
    inner = (root / "dicom" / "nifti" / "manifest.json").stat().st_mtime_ns
    prepare_prostate(root / "dicom", root / "dicom" / "nifti")
    assert (root / "dicom" / "nifti" / "manifest.json").stat().st_mtime_ns == inner

    ids = [e["case_id"] for entries in splits.values() for e in entries]
    held_out = split_cases(ids, validation_fraction=0.25, test_fraction=0.25, seed=1)
    assert sorted(sum(held_out.values(), [])) == sorted(ids) and len(held_out["test"]) == 1
    assert split_cases(ids, seed=1) == split_cases(list(reversed(ids)), seed=1)  # deterministic
    splits_file = tmp_path / "splits.json"
    splits_file.write_text(json.dumps({"training": ids[:2], "validation": [ids[2]], "test": [ids[3]]}))
    chosen = prepare_prostate(root / "dicom", root / "cache", splits_file=splits_file)
    assert [e["case_id"] for e in chosen["test"]] == [ids[3]]
    splits_file.write_text(json.dumps({"training": ids[:2], "validation": ["NOBODY"]}))
    with pytest.raises(ValueError, match=r"splits\.json.*NOBODY"):
        prepare_prostate(root / "dicom", root / "cache", splits_file=splits_file)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_prostate(tmp_path / "nowhere", tmp_path / "cache")


def test_different_in_plane_sizes_are_refused_up_front(tmp_path: Path) -> None:
    write_prostate_demo(tmp_path / "src" / "a", n_patients=2, seed=1, shape=(32, 32, 10))
    # a second export with another matrix size (its own patients, ids made distinct)
    for patient in write_prostate_demo(tmp_path / "src" / "b", n_patients=2, seed=2, shape=(40, 32, 10)):
        for path in patient.files:
            ds = pydicom.dcmread(path)
            ds.PatientID = f"OTHER_MATRIX_{patient.patient_id}"
            ds.save_as(path)
    with pytest.raises(ValueError, match="different in-plane sizes.*spatial_size"):
        prepare_prostate(tmp_path / "src", tmp_path / "cache")
    resized = prepare_prostate(tmp_path / "src", tmp_path / "cache", spatial_size=(32, 32))
    dataset = AxialSliceDataset(resized["training"], num_classes=5, spatial_size=(32, 32), axcodes=BUNDLE_AXCODES)
    assert {tuple(dataset[i]["image"].shape) for i in range(len(dataset))} == {(1, 32, 32)}


def test_bad_patients_are_reported_or_skipped(tmp_path: Path) -> None:
    """A patient without RTSTRUCT stops preparation with every reason listed (or is skipped on request); a patient
    without RTDOSE trains its segmentation only."""
    patients = write_prostate_demo(tmp_path / "src", n_patients=3, seed=4, shape=(32, 32, 10))
    patients[0].files[-2].unlink()  # RTSTRUCT
    patients[1].files[-1].unlink()  # RTDOSE
    with pytest.raises(DatasetValidationError) as caught:
        prepare_prostate(tmp_path / "src", tmp_path / "cache")
    message = str(caught.value)
    assert "missing modality RTSTRUCT" in message and patients[0].patient_id in message
    assert str(tmp_path / "cache" / "report.json") in message and "skip_bad_cases" in message
    splits = prepare_prostate(tmp_path / "src", tmp_path / "cache", skip_bad_cases=True)
    entries = [e for split in splits.values() for e in split]
    assert sorted(e["case_id"] for e in entries) == [p.patient_id for p in patients[1:]]
    no_dose = next(e for e in entries if e["case_id"] == patients[1].patient_id)
    assert no_dose["dose"] is None
    dataset = AxialSliceDataset([no_dose], num_classes=5, axcodes=BUNDLE_AXCODES, image_range=HU_RANGE)
    assert float(dataset[0]["dose_present"]) == 0.0 and float(dataset[0]["seg_present"]) == 1.0
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert [f["case_id"] for f in report["failed"]] == [patients[0].patient_id]


def test_cache_loads_in_the_openkbp_orientation(small_splits: tuple[Path, dict]) -> None:
    """Slices of the DICOM-RT cache look as OpenKBP's: rows anterior -> posterior, columns patient right -> left,
    slices superior -> inferior; training slices and evaluation volumes agree voxel for voxel."""
    _, splits = small_splits
    assert "".join(nib.aff2axcodes(openkbp_affine((3.5, 3.5, 2.0)))) == BUNDLE_AXCODES
    entries = splits["training"]
    dataset = AxialSliceDataset(
        entries, num_classes=5, slice_rule="all", axcodes=BUNDLE_AXCODES, image_range=HU_RANGE, slice_axis=2
    )
    rectum, bladder, femur_l, femur_r = (DEMO_ORGANS.index(o) + 1 for o in ("Rectum", "Bladder", "Femur_L", "Femur_R"))
    rows: dict[int, list[float]] = {}
    cols: dict[int, list[float]] = {}
    depth: dict[int, list[int]] = {}
    for sample in (dataset[i] for i in range(len(dataset))):
        if sample["case_id"] != entries[0]["case_id"]:
            continue
        seg = sample["seg"][0].numpy()
        for label in (rectum, bladder, femur_l, femur_r):
            r, c = np.nonzero(seg == label)
            if r.size:
                rows.setdefault(label, []).append(float(r.mean()))
                cols.setdefault(label, []).append(float(c.mean()))
                depth.setdefault(label, []).append(sample["slice_index"])
    assert np.mean(rows[bladder]) < np.mean(rows[rectum])  # the bladder is anterior: nearer row 0
    assert np.mean(cols[femur_l]) > np.mean(cols[femur_r])  # the patient's left is towards the last column
    assert np.mean(depth[bladder]) < np.mean(depth[femur_l])  # the bladder is superior: nearer slice 0
    # the evaluation volume is the stack of the training slices
    case = LoadProstateCased(num_classes=5, image_range=HU_RANGE)(entries[0])
    assert case["image"].shape == (1, 32, 32, 12) and case["spacing"].tolist() == [6.0, 6.0, 4.0]
    for sample in (s for s in (dataset[i] for i in range(12)) if s["case_id"] == entries[0]["case_id"]):
        k = sample["slice_index"]
        torch.testing.assert_close(case["image"][..., k], sample["image"])
        torch.testing.assert_close(case["seg"][..., k], sample["seg"])
        torch.testing.assert_close(case["dose"][..., k], sample["dose"])
    femur = case["image"][case["seg"] == femur_l]
    assert float(case["image"].min()) >= 0.0 and float(case["image"].max()) <= 1.0
    assert float(femur.mean()) > float(case["image"][case["seg"] == bladder].mean())  # bone is bright
    masks, spacing = LabelMapStructures(DEMO_ORGANS)({"source": case["source"], "spacing": case["spacing"]})
    assert sorted(masks) == sorted(DEMO_ORGANS) and spacing == [6.0, 6.0, 4.0]
    np.testing.assert_array_equal(masks["Bladder"], case["seg"][0].numpy() == bladder)
    # resized like the training slices: half the size, twice the spacing
    small = LoadProstateCased(num_classes=5, image_range=HU_RANGE, spatial_size=(16, 16))(entries[0])
    assert small["seg"].shape == (1, 16, 16, 12) and small["spacing"].tolist() == [12.0, 12.0, 4.0]
    masks, _ = LabelMapStructures(DEMO_ORGANS, spatial_size=(16, 16))({"source": small["source"], "spacing": [1, 1, 1]})
    np.testing.assert_array_equal(masks["Femur_R"], small["seg"][0].numpy() == femur_r)


def test_inference_loader_matches_the_training_view(small_splits: tuple[Path, dict]) -> None:
    """The inference loader gives, from the DICOM series or from a NIfTI volume, the CT that training and evaluation
    see (same orientation, same voxels), with the CT's geometry."""
    root, splits = small_splits
    entry = splits["validation"][0]
    item = next(i for i in find_ct_series(root / "dicom") if i["case_id"] == entry["case_id"])
    from_dicom = LoadDicomCTd("image")(item)
    from_nifti = LoadDicomCTd("image")({"image": entry["image"], "case_id": entry["case_id"]})
    torch.testing.assert_close(from_dicom["image"], from_nifti["image"])
    torch.testing.assert_close(from_dicom["body"], from_nifti["body"])
    for key in ("ct_origin", "ct_spacing", "ct_direction"):
        torch.testing.assert_close(from_dicom[key], from_nifti[key])
    case = LoadProstateCased(num_classes=5, image_range=HU_RANGE)(entry)
    scaled = ((from_dicom["image"] - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])).clamp(0, 1)
    torch.testing.assert_close(scaled, case["image"])
    affine = ras_affine(*(from_dicom[k].tolist() for k in ("ct_origin", "ct_spacing", "ct_direction")))
    np.testing.assert_allclose(affine, nib.load(entry["image"]).affine, atol=1e-4)
    assert float(from_dicom["body"].float().mean()) > 0.3  # the elliptic body fills much of the field of view
    small = LoadDicomCTd("image", spatial_size=(16, 16))(item)
    assert small["image"].shape == (1, 16, 16, 12) and small["body"].shape == (1, 32, 32, 12)


# --- the bundle through MONAI's CLI --------------------------------------------------------------------------------


def test_demo_training_arch_switch_and_evaluate(prostate_bundle: Path) -> None:
    """The default train.yaml writes and converts the DICOM-RT demo and trains; ``--arch hps`` trains the baseline
    with everything else equal; evaluate.yaml reports 3D Dice per organ, dose MAE and DVH metrics with figures."""
    _bundle_threads1(
        ["run", "training", "--config_file", "configs/train.yaml", *QUICK, "--epochs", "1"], prostate_bundle
    )
    assert (prostate_bundle / "demo_data" / "prostate" / "README.txt").is_file()
    assert (prostate_bundle / "cache" / "prostate" / "manifest.json").is_file()
    # one epoch, validated (the last epoch always is): models/model.pt is that epoch, as model_final.pt
    best = torch.load(prostate_bundle / "models" / "model.pt", weights_only=True)
    last = torch.load(prostate_bundle / "models" / "model_final.pt", weights_only=True)
    assert set(best) == set(last) and all(torch.equal(best[k], last[k]) for k in last)
    summary = json.loads((prostate_bundle / "runs" / "ctan" / "training_summary.json").read_text())
    assert set(summary) == {"val_mean_dice", "val_dose_mae", "val_dvh_score", "val_whole_volume_mae"}
    assert summary["val_dose_mae"]["floor"] is not None and "best (epoch 1)" in summary["val_dose_mae"]
    history = json.loads((prostate_bundle / "runs" / "ctan" / "metrics_history.json").read_text())
    (_, key), (_, dice), (_, dose) = (history[k][0] for k in ("val_key_metric", "val_mean_dice", "val_dose_mae"))
    assert key == pytest.approx(dice / 100 - dose / DOSE_SCALE)
    _bundle_threads1(
        ["run", "training", "--config_file", "configs/train.yaml", *QUICK, "--arch", "hps", "--epochs", "1"],
        prostate_bundle,
    )
    assert (prostate_bundle / "models" / "hps" / "model.pt").is_file()
    out = _bundle_threads1(
        [
            "run",
            "evaluating",
            "--config_file",
            "['configs/train.yaml','configs/evaluate.yaml']",
            "--arch",
            "hps",
            "--backbone",
            "resnet18",
        ],
        prostate_bundle,
    )
    assert "test_mean_dice" in out and "test_dose_mae" in out
    report = json.loads((prostate_bundle / "runs" / "hps" / "evaluation" / "report.json").read_text())
    summary = report["summary"]
    # the demo's 16 patients with validation_fraction 0.2: 3 validation patients
    assert summary["num_cases"] == len(report["cases"]) == 3 and sorted(summary["dice"]) == sorted(DEMO_ORGANS)
    assert 0 <= summary["dose_mae"] < 60 and summary["dvh_score"] >= 0
    metrics = compare_metrics(prostate_bundle, prostate_bundle / "runs" / "hps", validated=True)
    assert metrics == {"seg": summary["mean_dice"], "dose": summary["dose_mae"]}
    case = report["cases"][0]
    assert sorted(case["dose"]["dvh"]["reference"]) == sorted(DEMO_ORGANS)  # DVH metrics of every organ
    figures = prostate_bundle / "runs" / "hps" / "evaluation" / "figures"
    assert (figures / f"{case['case_id']}_slices.png").is_file() and (figures / f"{case['case_id']}_dvh.png").is_file()


def test_inference_from_a_ct_only_dicom_folder(prostate_bundle: Path, tmp_path: Path) -> None:
    """inference.yaml on a DICOM folder holding only a CT series (another spacing than the demo's): the NIfTI
    outputs have the CT's grid and geometry, and equal the network applied to the CT by hand."""
    ckpt = prostate_bundle / "models" / "model.pt"
    if not ckpt.is_file():
        pytest.skip("needs the model trained by test_demo_training_arch_switch_and_evaluate")
    # a 1-epoch model predicts about dose_initial everywhere: raise the dose by 40 Gy through the head's bias (in
    # units of dose_scale) so that the dose has values to compare
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["decoders.dose.head.bias"] = state["decoders.dose.head.bias"] + 40.0 / DOSE_SCALE
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    torch.save(state, model_dir / "model.pt")
    patient = write_prostate_demo(tmp_path / "dicom", n_patients=1, seed=11, shape=(48, 40, 14), spacing=(5, 7, 3))[0]
    for path in patient.files[-2:]:  # RTSTRUCT and RTDOSE: inference needs the CT only
        path.unlink()
    out_dir = tmp_path / "predictions"
    args = ["run", "--config_file", "configs/inference.yaml", "--input_dir", str(tmp_path / "dicom")]
    _bundle_threads1([*args, "--output_dir", str(out_dir), "--model_dir", str(model_dir)], prostate_bundle)

    seg_img = nib.load(out_dir / patient.patient_id / "seg.nii.gz")
    dose_img = nib.load(out_dir / patient.patient_id / "dose.nii.gz")
    x0, y0, z0 = patient.origin
    expected_affine = np.array([[-5.0, 0, 0, -x0], [0, -7.0, 0, -y0], [0, 0, 3.0, z0], [0, 0, 0, 1]])
    for image in (seg_img, dose_img):
        assert image.shape == (48, 40, 14)  # the CT's columns, rows, slices
        np.testing.assert_allclose(image.affine, expected_affine, atol=1e-4)
    assert seg_img.get_data_dtype() == np.uint8 and dose_img.get_data_dtype() == np.float32
    seg = np.asarray(seg_img.dataobj)
    dose = np.asarray(dose_img.dataobj)

    # by hand: the CT ([z, y, x] in LPS) in the bundle's orientation [y (A->P), x (R->L), z (S->I)], scaled
    ct = patient.ct.transpose(1, 2, 0)[:, :, ::-1].astype(np.float32)
    scaled = np.clip((ct - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0]), 0, 1)
    net = build_network("ctan", TASKS, backbone="resnet18", fine_decoder_channels=FINE_DECODER)
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        out = net(torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))[:, None])
    labels = out["seg"].argmax(1).numpy().transpose(1, 2, 0)  # [y, x, z]
    expected_dose = out["dose"][:, 0].clamp_min(0).numpy().transpose(1, 2, 0)
    body = body_mask_from_ct(patient.ct.astype(np.float32)).transpose(1, 2, 0)[:, :, ::-1]
    # the written arrays, [x, y, z] with the CT's z order, back to [y, x, z (S->I)]
    np.testing.assert_array_equal(seg.transpose(1, 0, 2)[:, :, ::-1], labels)
    written_dose = dose.transpose(1, 0, 2)[:, :, ::-1]
    np.testing.assert_allclose(written_dose[body], expected_dose[body], rtol=1e-4, atol=1e-3)
    assert not written_dose[~body].any() and written_dose.max() > 0
    assert written_dose[body].mean() > 30.0  # Gy (the raised bias), not Gy / dose_scale


def test_inference_errors_name_the_folder(prostate_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no DICOM CT series"):
        find_ct_series(tmp_path)
    (tmp_path / "notes.txt").write_text("no DICOM here")
    ckpt = tmp_path / "model.pt"  # untrained weights: the folder is what fails
    torch.save(build_network("ctan", TASKS, backbone="resnet18", fine_decoder_channels=FINE_DECODER).state_dict(), ckpt)
    out = _bundle_threads1(
        ["run", "--config_file", "configs/inference.yaml", "--input_dir", str(tmp_path), "--ckpt_path", str(ckpt)],
        prostate_bundle,
        expect_ok=False,
    )
    assert f"input_dir '{tmp_path}' holds no DICOM CT series" in out


def test_verify_metadata_against_published_schema(tmp_path: Path) -> None:
    schema = shared_file("../schemas/meta_schema_20240725.json")
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith("meta_schema_20240725.json")
    outputs = meta["network_data_format"]["outputs"]
    assert list(outputs)[0] == "pred" and outputs["pred"]["format"] == "segmentation"
    assert [outputs["pred"]["channel_def"][str(i)] for i in range(1, 5)] == list(DEMO_ORGANS)
    shutil.copy(schema, tmp_path / "schema.json")
    meta_file = str(BUNDLE / "configs" / "metadata.json")
    # in this process (a subprocess costs 10 s of imports; the CLI runs in the training tests): raises on an error
    verify_metadata(meta_file=meta_file, filepath=str(tmp_path / "schema.json"))


def test_verify_net_in_out_on_segmentation_output(prostate_bundle: Path) -> None:
    """MONAI's shape check runs on the segmentation output (``seg_network_def`` wraps the multi-task network)."""
    verify_net_in_out(  # raises when the output's shape or dtype disagrees with metadata.json
        "seg_network_def",
        meta_file=str(prostate_bundle / "configs" / "metadata.json"),
        config_file=str(prostate_bundle / "configs" / "train.yaml"),
        bundle_root=str(prostate_bundle),
        backbone="resnet18",
    )


def test_ckpt_export_matches_checkpoint(prostate_bundle: Path, tmp_path: Path) -> None:
    """A checkpoint (random weights: no training run needed) exports to TorchScript with equal outputs."""
    torch.manual_seed(5)
    net = build_network("ctan", TASKS, backbone="resnet18", fine_decoder_channels=FINE_DECODER)
    example = torch.rand(2, 1, 64, 64)
    exported = assert_export_matches_eager(net, prostate_bundle, tmp_path, example, backbone="resnet18")
    assert set(exported) == {"seg", "dose"}


def test_demo_learns_on_a_short_run(prostate_bundle: Path, tmp_path: Path) -> None:
    """The default demo, on a third of its budget (5 of 15 epochs), learns: its training summary shows the best
    validated epoch far above the untrained network on Dice and below it on the dose score (the full demo reaches
    86.5 % Dice and 1.16 Gy against 0.17 % / 3.26 Gy untrained and the floor's 58.5 % / 1.51 Gy)."""
    out = tmp_path / "run"
    _bundle_threads1(
        ["run", "training", "--config_file", "configs/train.yaml", "--epochs", "5", "--val_interval", "5"]
        + ["--progress_bar", "False", "--output_dir", str(out), "--model_dir", str(tmp_path / "models")],
        prostate_bundle,
        timeout=900,
    )
    summary = json.loads((out / "training_summary.json").read_text())
    dice, dose = summary["val_mean_dice"], summary["val_dose_mae"]
    best = next(key for key in dice if key.startswith("best"))
    assert dice[best] >= 30.0 and dice[best] >= dice["untrained"] + 25.0, dice
    assert dose[best] <= 0.85 * dose["untrained"], dose
    assert dice["floor"] is not None and dose["floor"] is not None
