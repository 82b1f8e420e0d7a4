"""Tests of benchmarks/whole_patient.py: the OpenKBP bundle's inference on a demo patient in two variants, timed,
and the agreement check that compares their written predictions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest

from ctan_monai.apps.openkbp.demo import write_openkbp_demo
from tests.zoo_checks import seeded_network

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "whole_patient.py"


@pytest.fixture(scope="module")
def wp() -> ModuleType:
    spec = importlib.util.spec_from_file_location("whole_patient_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write_prediction(folder: Path, seg: np.ndarray, dose: np.ndarray) -> None:
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), np.eye(4)), str(folder / "seg.nii.gz"))
    nib.save(nib.Nifti1Image(dose.astype(np.float32), np.eye(4)), str(folder / "dose.nii.gz"))


def test_agreement_measures_the_differences(wp: ModuleType, tmp_path: Path) -> None:
    seg = np.zeros((8, 8, 4), np.uint8)
    seg[2:6, 2:6, :] = 1  # 64 voxels
    other = seg.copy()
    other[2:6, 2, :] = 0  # 16 of them lost: Dice 2 * 48 / (64 + 48)
    other[0, 0, 0] = 2  # a label only the other variant has: Dice 0
    dose = np.zeros((8, 8, 4))
    dose[1:7, 1:7, :] = 50.0
    shifted = dose.copy()
    shifted[1:7, 1:7, 0] += 2.0  # one slice of four 2 Gy higher inside the dose
    _write_prediction(tmp_path / "a" / "pt_1", seg, dose)
    _write_prediction(tmp_path / "b" / "pt_1", other, shifted)
    found = wp.agreement(tmp_path / "a", tmp_path / "b", ["pt_1"])
    assert sorted(found["patients"]["pt_1"]["dice"]) == [1, 2]  # the structures; background is no structure
    assert found["patients"]["pt_1"]["dice"][1] == pytest.approx(96 / 112)
    assert found["patients"]["pt_1"]["dice"][2] == 0.0 and found["min_dice"] == 0.0
    assert found["dose_mean_abs_gy"] == pytest.approx(0.5) and found["dose_max_abs_gy"] == pytest.approx(2.0)
    with pytest.raises(FileNotFoundError, match="not written"):
        wp.agreement(tmp_path / "a", tmp_path / "b", ["pt_2"])


def test_bad_arguments_fail_up_front(wp: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert wp.main(["--ckpt_path", str(tmp_path / "missing.pt"), "--input_dir", str(tmp_path)]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert wp.main(["--ckpt_path", "none", "--input_dir", str(tmp_path), "--variants", "fp8"]) == 2
    assert "unknown or repeated variant" in capsys.readouterr().err
    assert wp.main(["--ckpt_path", "none", "--input_dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _varied_weights(path: Path) -> Path:
    """Untrained weights whose heads draw several structures and a positive dose (a seeded network predicts
    background and 0 Gy everywhere, which would make the agreement check vacuous)."""
    import torch

    net = seeded_network(REPO_ROOT / "bundles" / "ctan_openkbp")
    with torch.no_grad():
        net.decoders["seg"].head.weight.mul_(50.0)
        net.decoders["dose"].head.bias.fill_(0.5)
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_demo_patient_in_two_variants(wp: ModuleType, tmp_path: Path) -> None:
    """The bundle's inference, float32 contiguous against channels-last, on one 128-slice demo patient."""
    root = write_openkbp_demo(tmp_path / "demo", n_train=2, n_val=1)
    args = ["--input_dir", str(root / "validation-pats"), "--ckpt_path", str(_varied_weights(tmp_path / "w.pt"))]
    args += ["--repeats", "1"]
    args += ["--work_dir", str(tmp_path / "work"), "--output", str(tmp_path / "r.json")]
    args += ["--markdown", str(tmp_path / "r.md")]
    assert wp.main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["patients"] == ["pt_3"] and report["reference"] == "float32"
    fast = report["variants"]["channels_last"]
    assert fast["channels_last"] is True and fast["meets_tolerance"] is True
    assert fast["agreement"]["min_dice"] >= 0.99 and fast["agreement"]["dose_mean_abs_gy"] <= 0.5
    assert fast["agreement"]["structures_compared"] >= 2  # the Dice check compared label maps, not empty ones
    for variant in ("float32", "channels_last"):
        assert report["variants"][variant]["seconds_per_patient"]["median"] > 0
        seg = nib.load(str(tmp_path / "work" / variant / "pt_3" / "seg.nii.gz"))
        assert seg.shape == (128, 128, 128)
    assert "| channels_last | yes | none |" in (tmp_path / "r.md").read_text()
