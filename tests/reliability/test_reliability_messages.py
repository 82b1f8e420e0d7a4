"""Reliability: clear messages, not raw ones (issue 16, "Clear, not raw").

The problem list of an up-front ``DatasetValidationError`` is the last thing a ``python -m monai.bundle run`` prints
(not 30-100 lines above MONAI's ``Failed to evaluate ConfigExpression``), and each raw or misleading message the
sweep found now names the file (or option) and the problem: a missing ``validation-pats`` split, ``--val_interval 0``,
resuming a checkpoint of another ``--arch``, a corrupt STOIC ``.mha``, a validation split without positives for a
task, an all-zero OpenKBP training dose, OpenKBP patient folders not named ``pt_*`` and a HAM10000 mask covering the
whole image. Every input is tiny and synthetic (the demo writers); one test runs the bundle in a subprocess, which
stops at its first step (the data), the others call the readers directly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from PIL import Image

from ctan_monai.apps import stoic
from ctan_monai.apps.ham10000.demo import write_ham10000_demo
from ctan_monai.apps.ham10000.validation import validate_dataset as validate_ham10000
from ctan_monai.apps.openkbp import prepare as openkbp_app
from ctan_monai.apps.openkbp.conversion import convert_dataset
from ctan_monai.apps.openkbp.demo import synthetic_openkbp_patient, write_openkbp_demo
from ctan_monai.apps.openkbp.prepare import prepare_openkbp
from ctan_monai.apps.openkbp.reader import read_patient, write_patient
from ctan_monai.apps.openkbp.validation import find_patient_folders, validate_dataset
from ctan_monai.apps.stoic.demo import write_stoic_demo
from ctan_monai.apps.stoic.prepare import prepare_stoic
from ctan_monai.data.validation import DatasetValidationError
from ctan_monai.engines import CheckpointMismatchError, ResumeFromLatestCheckpoint, ValidateHandler
from ctan_monai.excepthook import install_excepthook, problem_summary

GRID = 24  # OpenKBP phantoms on a 24-cubed grid, as in test_reliability_data.py
OPENKBP_GRID = (GRID, GRID, GRID)
STOIC_SHAPE = (12, 40, 40)  # (z, y, x): the smallest demo chest the STOIC checks accept, converted in a blink
STOIC_SPACING = (3.5, 3.5, 5.0)


def _last_lines(text: str, n: int) -> list[str]:
    return text.rstrip().splitlines()[-n:]


# ---------------------------------------------------------------------- the problem list is the last thing printed
def test_reliability_bundle_run_ends_with_the_dataset_problem_list(bundle_copy: Path, tmp_path: Path) -> None:
    source = write_openkbp_demo(tmp_path / "bad", n_train=2, n_val=0, size=GRID)
    shutil.rmtree(source / "train-pats" / "pt_1")  # one patient, the bad one: nothing is converted before the error
    ct = source / "train-pats" / "pt_2" / "ct.csv"
    ct.write_text("not,an openkbp file\n1,2\n")
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml"]
    command += ["--dataset_dir", str(tmp_path / "bad"), "--cache_dir", str(tmp_path / "cache")]
    command += ["--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=bundle_copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    tail = _last_lines(proc.stderr, 3)
    assert "Failed to evaluate ConfigExpression" in proc.stderr  # MONAI's wrapper is still printed, above
    assert tail[0].startswith("ctan_monai: the run stopped on this problem"), proc.stderr[-3000:]
    assert tail[1] == f"DatasetValidationError: OpenKBP {tmp_path / 'bad'}: 1 problem(s) found:"
    assert tail[2].startswith(f"  - [pt_2] {ct}: has header 'not,an openkbp file'")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_reliability_excepthook_leaves_plain_errors_alone(capsys: pytest.CaptureFixture[str]) -> None:
    install_excepthook()
    try:
        raise KeyError("plain")  # not wrapped by MONAI: its traceback already ends with it
    except KeyError as err:
        assert problem_summary(err) is None
        sys.excepthook(type(err), err, err.__traceback__)
    assert "ctan_monai:" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- --val_interval 0
@pytest.mark.parametrize("interval", [0, -2, 2.5, "x"])
def test_reliability_val_interval_0_names_the_option_as_the_last_line(
    interval: object, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = f"--val_interval {interval!r}: val_interval must be >= 1, a whole number of epochs"
    with pytest.raises(ValueError, match=expected):
        ValidateHandler(validator=None, interval=interval)  # type: ignore[arg-type]
    # as the bundle builds it: MONAI's "Failed to instantiate" wraps it, and the hook prints it again, last
    handler = {"_target_": "ctan_monai.engines.ValidateHandler", "validator": None, "interval": interval}
    parser = ConfigParser({"handler": handler})
    install_excepthook()
    with pytest.raises(RuntimeError, match="Failed to instantiate") as caught:
        parser.get_parsed_content("handler")
    sys.excepthook(caught.type, caught.value, caught.tb)
    last = _last_lines(capsys.readouterr().err, 1)[0]
    assert last.startswith(f"ValueError: --val_interval {interval!r}: val_interval must be >= 1, a whole")
    ValidateHandler(validator=None, interval=3.0)  # type: ignore[arg-type]  # a whole float from the CLI: fine


# ------------------------------------------------------------------------------------- OpenKBP: missing split
def test_reliability_openkbp_without_validation_pats_names_the_split(tmp_path: Path, monkeypatch) -> None:
    source = write_openkbp_demo(tmp_path / "data", n_train=2, n_val=0, size=GRID)
    monkeypatch.setattr(openkbp_app, "convert_dataset", functools.partial(convert_dataset, grid_shape=OPENKBP_GRID))
    splits = prepare_openkbp(source, tmp_path / "cache")
    assert [e["case_id"] for e in splits["train-pats"]] == ["pt_1", "pt_2"]
    with pytest.raises(DatasetValidationError) as caught:
        splits["validation-pats"]  # the bundle's "$@data['validation-pats']"
    (problem,) = caught.value.problems
    assert problem.file == str(source)
    assert "no 'validation-pats' patients: the dataset has train-pats (2 patient(s)) only" in problem.message
    assert "validation-pats/ folder of pt_<n> patient folders" in problem.message
    # the cache standing in for its sources (a machine without the CSVs) answers the same
    source.rename(tmp_path / "elsewhere")
    cached = prepare_openkbp(source, tmp_path / "cache")
    with pytest.raises(DatasetValidationError, match="no 'test-pats' patients"):
        cached["test-pats"]


# -------------------------------------------------------------------------------- resuming another architecture
def test_reliability_resume_of_another_arch_names_the_checkpoint(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "runs" / "ctan" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))  # "--arch hps" wrote this folder
    path = ckpt_dir / "checkpoint_epoch=2.pt"
    torch.save({"model": other.state_dict(), "trainer": {"epoch": 2, "iteration": 4}}, path)

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))  # this run's network does not fit it
    trainer = Engine(lambda engine, batch: None)
    resume = ResumeFromLatestCheckpoint(ckpt_dir, {"model": model, "trainer": trainer})
    resume.attach(trainer)
    try:
        with pytest.raises(CheckpointMismatchError) as caught:
            trainer.run([0], max_epochs=3)
    finally:
        resume.release()
    message = str(caught.value)
    assert f"cannot resume from checkpoint {path}" in message and "another --arch" in message
    assert "--output_dir" in message and "--resume False" in message
    assert '(Error(s) in loading state_dict for Sequential: Unexpected key(s) in state_dict: "1.weight"' in message
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert caught.value.path == path


# ------------------------------------------------------------------------------------------- STOIC: corrupt .mha
@pytest.fixture()
def stoic_demo(tmp_path: Path) -> Path:
    return write_stoic_demo(tmp_path / "stoic", n_patients=4, shape=STOIC_SHAPE, spacing=STOIC_SPACING)


def test_reliability_stoic_corrupt_mha_says_what_is_wrong_with_the_file(stoic_demo: Path, tmp_path: Path) -> None:
    first, second = sorted((stoic_demo / "data" / "mha").glob("*.mha"))[:2]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # voxel data cut (the header reads)
    with pytest.raises(DatasetValidationError) as caught:
        stoic.convert_dataset(stoic_demo, tmp_path / "cache", spacing=STOIC_SPACING)
    (problem,) = caught.value.problems
    assert problem.file == str(first) and "No such file" not in problem.message
    assert "voxels unreadable: corrupt or truncated file: the compressed voxel data is cut short" in problem.message

    second.write_bytes(b"\x00\x17garbage" * 40)  # no MetaImage header at all
    problems = {p.file: p.message for p in stoic.validate_dataset(stoic_demo).problems}
    assert set(problems) == {str(first), str(second)}
    assert "not a MetaImage file" in problems[str(second)]
    assert not any("No such file" in m for m in problems.values())


# ----------------------------------------------------------------------------- STOIC: validation without positives
def test_reliability_stoic_validation_split_without_positives_is_warned_up_front(
    stoic_demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = pd.read_csv(stoic_demo / "metadata" / "reference.csv", dtype=str, keep_default_na=False)
    not_severe = table["probSevere"] == "0"
    assert set(table.loc[not_severe, "probCOVID"]) == {"0", "1"}  # covid has both classes there, severe none
    split_file = tmp_path / "split.json"
    split_file.write_text(
        json.dumps(
            {
                "training": table.loc[~not_severe, "PatientID"].tolist(),
                "validation": table.loc[not_severe, "PatientID"].tolist(),
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="ctan_monai.stoic"):
        splits = prepare_stoic(stoic_demo, tmp_path / "cache", spacing=STOIC_SPACING, split_file=split_file)
    assert len(splits["validation"]) == int(not_severe.sum())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    (warning,) = [w for w in warnings if "validation split" in w]
    n = int(not_severe.sum())
    assert f"task 'severe' has no positive patient: {n} labelled: 0 positive, {n} negative" in warning
    assert "AUC will be NaN" in warning and "covid" not in warning


# -------------------------------------------------------------------------------------- OpenKBP: all-zero dose
def test_reliability_openkbp_all_zero_training_dose_is_refused(tmp_path: Path) -> None:
    patient = synthetic_openkbp_patient("pt_1", np.random.default_rng(0), size=GRID)
    patient.dose = np.zeros_like(patient.dose)
    folder = write_patient(patient, tmp_path / "provided-data" / "train-pats" / "pt_1")
    with pytest.raises(DatasetValidationError) as caught:
        read_patient(folder, grid_shape=OPENKBP_GRID, require_dose=True)
    (problem,) = caught.value.problems
    assert problem.file == str(folder / "dose.csv") and problem.case == "pt_1"
    assert problem.message.startswith("the dose is 0 Gy in every voxel: a training or validation patient needs")
    assert read_patient(folder, grid_shape=OPENKBP_GRID).dose.max() == 0  # a test patient's dose is not needed


# ---------------------------------------------------------------------------- OpenKBP: folders not named pt_*
def test_reliability_openkbp_patient_folders_not_named_pt_are_reported(tmp_path: Path) -> None:
    source = write_openkbp_demo(tmp_path / "data", n_train=3, n_val=0, size=GRID)
    misnamed = source / "train-pats" / "patient_3"
    (source / "train-pats" / "pt_3").rename(misnamed)
    with pytest.raises(DatasetValidationError) as caught:
        convert_dataset(source, tmp_path / "cache", grid_shape=OPENKBP_GRID)
    (problem,) = caught.value.problems
    assert problem.file == str(misnamed)
    assert "holds OpenKBP patient files (ct.csv, possible_dose_mask.csv) but is not named pt_<n>" in problem.message
    assert "e.g. pt_3" in problem.message
    assert [p.file for p in validate_dataset(source, grid_shape=OPENKBP_GRID).problems] == [str(misnamed)]

    for folder in (source / "train-pats").glob("pt_*"):
        folder.rename(folder.with_name(folder.name.replace("pt_", "case")))
    with pytest.raises(FileNotFoundError, match=r"3 folder\(s\) hold OpenKBP patient files but are not named pt_<n>"):
        find_patient_folders(source)


# -------------------------------------------------------------------------- HAM10000: mask over the whole image
def test_reliability_ham10000_mask_covering_the_whole_image_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_ham10000_demo(tmp_path / "HAM10000", n_images=14, seed=0)
    mask = sorted(root.rglob("*_segmentation.png"))[0]
    with Image.open(mask) as im:
        size = im.size
    Image.new("L", size, 255).save(mask)  # every pixel lesion: inverted, blank white, or a lesion filling the frame
    with caplog.at_level(logging.WARNING, logger="ctan_monai.apps.ham10000"):
        report = validate_ham10000(root)
    assert report.ok  # kept: the real HAM10000 has such masks of lesions that fill the frame
    (warning,) = [r.getMessage() for r in caplog.records if "whole image" in r.getMessage()]
    assert f"1 lesion mask(s) cover the whole image (every pixel is lesion): {mask}." in warning
    assert "inverted" in warning
