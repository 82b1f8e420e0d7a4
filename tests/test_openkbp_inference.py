"""The OpenKBP bundle's inference config (``configs/inference.yaml``) and multi-process training
(``configs/multi_gpu_train.yaml`` under torchrun, gloo on CPU), both through MONAI's bundle CLI on the synthetic demo.

Timings on 2 shared CPU cores: train + infer one patient ~25 s, torchrun training ~40 s, error checks ~13 s."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctan_monai.apps.openkbp.reader import openkbp_affine, read_patient, read_sparse_csv
from tests.conftest import QUICK_TRAIN_ARGS as QUICK
from tests.conftest import run_bundle, run_command

pytestmark = pytest.mark.slow


def _run_threads1(command: list[str], cwd: Path, **kwargs) -> str:
    return run_command(command, cwd, threads=1, **kwargs)


def _bundle_threads1(args: list[str], cwd: Path, **kwargs) -> str:
    return run_bundle(args, cwd, threads=1, **kwargs)


def test_train_then_infer(bundle_copy: Path) -> None:
    """A 1-epoch model, then inference.yaml on one validation patient: NIfTI geometry, label range and the dose CSV
    reading back to the NIfTI dose bit for bit."""
    _bundle_threads1(["run", "training", "--config_file", "configs/train.yaml", *QUICK, "--epochs", "1"], bundle_copy)
    ckpt = bundle_copy / "models" / "model.pt"
    assert ckpt.is_file()
    # a 1-epoch model may predict no dose above 0 anywhere (written as one explicit zero row): raise the dose head's
    # bias so that the round trip compares many non-zero values
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["decoders.dose.head.bias"] = state["decoders.dose.head.bias"] + 40.0
    torch.save(state, ckpt)
    patient_dir = bundle_copy / "demo_data" / "openkbp" / "provided-data" / "validation-pats" / "pt_7"
    out_dir = bundle_copy / "predictions"
    _bundle_threads1(
        [
            "run",
            "--config_file",
            "configs/inference.yaml",
            "--backbone",
            "resnet18",
            "--input_dir",
            str(patient_dir),
            "--output_dir",
            str(out_dir),
        ],
        bundle_copy,
    )
    patient = read_patient(patient_dir, structures=())
    affine = openkbp_affine(patient.voxel_size_mm)
    dose_img = nib.load(out_dir / "pt_7" / "dose.nii.gz")
    seg_img = nib.load(out_dir / "pt_7" / "seg.nii.gz")
    for image in (dose_img, seg_img):
        assert image.shape == patient.ct.shape
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert dose_img.get_data_dtype() == np.float32 and seg_img.get_data_dtype() == np.uint8
    seg = np.asarray(seg_img.dataobj)
    assert seg.min() >= 0 and seg.max() <= 4
    dose = np.asarray(dose_img.dataobj)
    assert dose.min() >= 0 and dose.max() > 0
    assert not np.any(dose[~patient.possible_dose_mask])
    indices, values = read_sparse_csv(out_dir / "pt_7" / "dose.csv", patient.ct.shape, kind="dose")
    from_csv = np.zeros(dose.size, np.float32)
    from_csv[indices] = values
    np.testing.assert_array_equal(from_csv.reshape(dose.shape), dose)


def test_inference_errors_name_the_folder(bundle_copy: Path, tmp_path: Path) -> None:
    """An input folder without patients and a missing checkpoint each stop with a message naming the path."""
    empty = tmp_path / "no_patients"
    empty.mkdir()
    out = _bundle_threads1(
        ["run", "--config_file", "configs/inference.yaml", "--input_dir", str(empty)], bundle_copy, expect_ok=False
    )
    assert f"input_dir '{empty}'" in out
    missing = tmp_path / "nowhere" / "model.pt"
    out = _bundle_threads1(
        ["run", "--config_file", "configs/inference.yaml", "--ckpt_path", str(missing)],
        bundle_copy,
        expect_ok=False,
    )
    assert f"not found in '{missing.parent}'" in out


def test_multi_gpu_train_on_cpu(bundle_copy: Path) -> None:
    """multi_gpu_train.yaml under torchrun with two processes (gloo): one epoch with a validation in it (rank 0 alone
    validates: through the DDP wrapper it would wait for the other rank in the buffer broadcast), a checkpoint and a
    validation report written by rank 0."""
    config = "['configs/train.yaml','configs/multi_gpu_train.yaml']"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle"]
    command += ["run", "training", "--config_file", config, *QUICK, "--epochs", "1", "--val_interval", "1"]
    command += ["--arch", "hps"]
    _run_threads1(command, bundle_copy)
    assert (bundle_copy / "runs" / "hps" / "validation" / "report.json").is_file()
    assert (bundle_copy / "models" / "hps" / "model.pt").is_file()
    assert (bundle_copy / "runs" / "hps" / "checkpoints" / "checkpoint_epoch=1.pt").is_file()
