"""Trivial floors from the training split (mean dose map, probabilistic atlas) and their scoring in the whole-volume
evaluation; the evaluation scores the dose as submitted (zero outside the possible-dose mask)."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from ctan_monai.engines import VolumeEvaluationHandler, VolumeFloor
from ctan_monai.engines.floors import anchor_mm
from ctan_monai.metrics import (
    aggregate_dice,
    aggregate_dose_results,
    dice_report,
    evaluate_dose,
    masked_mae,
    openkbp_dose_score,
)

SHAPE = (16, 16, 16)
NAMES = ["Cord", "Parotid"]  # labels 1 and 2


def _case(
    labels: np.ndarray | None,
    dose: np.ndarray | None,
    mask: np.ndarray | None = None,
    present: Sequence[int] = (1, 1, 1),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, Any]:
    """A case in the batch convention of ``load_case`` (what a floor loader returns)."""
    shape = (labels if labels is not None else dose).shape
    mask = np.ones(shape, dtype=bool) if mask is None else mask
    return {
        "image": torch.from_numpy(mask.astype(np.float32))[None],
        "seg": torch.from_numpy(np.zeros(shape, np.int64) if labels is None else labels.astype(np.int64))[None],
        "seg_class_present": torch.tensor([1.0, 0.0, 0.0] if labels is None else present, dtype=torch.float32),
        "seg_present": torch.tensor(float(labels is not None)),
        "dose": torch.from_numpy(np.zeros(shape, np.float32) if dose is None else dose.astype(np.float32))[None],
        "dose_mask": torch.from_numpy(mask.astype(np.float32))[None],
        "dose_present": torch.tensor(float(dose is not None)),
        "spacing": list(spacing),
    }


def _memory_floor(cases: Mapping[str, dict[str, Any]], **kwargs: Any) -> tuple[VolumeFloor, list[str]]:
    """A floor over in-memory cases; also returns the log of loader calls."""
    calls: list[str] = []

    def loader(entry: Mapping[str, Any]) -> dict[str, Any]:
        calls.append(entry["case_id"])
        return cases[entry["case_id"]]

    return VolumeFloor([{"case_id": c} for c in cases], num_classes=3, loader=loader, **kwargs), calls


def _hand_made() -> dict[str, dict[str, Any]]:
    """Three training patients: the mean dose and the atlas can be worked out by hand.

    - dose: 3 Gy, 6 Gy, and no dose at all (left out of the mean): mean 4.5 Gy where both plan, 1.5 where one does;
    - label 1 on block A in patients 1 and 2 (2/3: kept), on block B in patient 1 only (1/3: background);
    - label 2 on block C in patient 1 only, but patient 3 does not annotate label 2: 1/2, which reaches 0.5 (over all
      three patients it would be 1/3, background).
    """
    a, b, c = np.s_[2:5, 2:5, 2:5], np.s_[8:10, 8:10, 8:10], np.s_[12:14, 2:4, 2:4]
    labels = [np.zeros(SHAPE, np.int64) for _ in range(3)]
    labels[0][a] = labels[1][a] = 1
    labels[0][b] = 1
    labels[0][c] = 2
    dose1 = np.zeros(SHAPE, np.float32)
    dose1[:8] = 3.0
    dose2 = np.full(SHAPE, 6.0, np.float32)
    return {
        "p1": _case(labels[0], dose1),
        "p2": _case(labels[1], dose2),
        "p3": _case(labels[2], None, present=(1, 1, 0)),
    }


def test_mean_map_and_atlas_on_hand_made_volumes() -> None:
    cases = _hand_made()
    floor, _ = _memory_floor(cases)
    mean = floor.mean_dose
    assert mean.shape == SHAPE and mean.dtype == np.float32
    assert np.allclose(mean[:8], 4.5) and np.allclose(mean[8:], 3.0)
    assert np.allclose(mean, (cases["p1"]["dose"][0].numpy() + cases["p2"]["dose"][0].numpy()) / 2)
    atlas = floor.label_map
    assert atlas[3, 3, 3] == 1 and (atlas[2:5, 2:5, 2:5] == 1).all()  # 2 of 3
    assert atlas[9, 9, 9] == 0  # 1 of 3
    assert (atlas[12:14, 2:4, 2:4] == 2).all()  # 1 of the 2 patients that annotate label 2
    assert int((atlas > 0).sum()) == 27 + 8
    assert np.isclose(floor.class_frequency[0, 9, 9, 9], 1 / 3)
    assert np.isclose(floor.class_frequency[1, 12, 2, 2], 0.5)
    info = floor.describe()
    assert info["num_training_patients"] == 3 and info["num_dose_patients"] == 2 and info["num_label_patients"] == 3
    assert info["annotated_patients"] == [3, 2]
    assert "training" in info["definition"] and info["alignment"] == "grid"
    dose, labels = floor.predict(SHAPE)
    assert np.array_equal(dose, mean) and np.array_equal(labels, atlas)


def test_atlas_ties_go_to_the_more_frequent_then_lower_label() -> None:
    # label 1 annotated by patient 1 only, label 2 by patients 2 and 3: at the voxel both reach >= 0.5
    labels = [np.zeros(SHAPE, np.int64) for _ in range(3)]
    labels[0][0, 0, 0] = 1
    labels[1][0, 0, 0] = 2
    labels[0][1, 1, 1] = 1
    labels[1][1, 1, 1] = labels[2][1, 1, 1] = 2
    cases = {
        "p1": _case(labels[0], None, present=(1, 1, 0)),
        "p2": _case(labels[1], None, present=(1, 0, 1)),
        "p3": _case(labels[2], None, present=(1, 0, 1)),
    }
    floor, _ = _memory_floor(cases)
    assert floor.mean_dose is None
    assert floor.label_map[1, 1, 1] == 1  # label 1: 1/1, label 2: 2/2, a tie: the lower label
    assert floor.label_map[0, 0, 0] == 1  # label 1: 1/1 beats label 2: 1/2
    assert floor.predict(SHAPE)[0] is None


def test_floor_is_computed_once_on_first_use() -> None:
    floor, calls = _memory_floor(_hand_made())
    assert calls == []  # nothing read at construction (the bundle config builds it with the evaluator)
    floor.predict(SHAPE)
    floor.predict(SHAPE)
    _ = floor.mean_dose, floor.label_map, floor.describe()
    assert calls == ["p1", "p2", "p3"]


def test_grid_floor_refuses_other_grids() -> None:
    cases = _hand_made()
    other = _case(np.zeros((16, 16, 12), np.int64), np.zeros((16, 16, 12), np.float32))
    with pytest.raises(ValueError, match="share one grid"):
        _memory_floor({**cases, "odd": other})[0].build()
    with pytest.raises(ValueError, match="built on grid"):
        _memory_floor(cases)[0].predict((16, 16, 12))
    with pytest.raises(ValueError, match="alignment"):
        VolumeFloor([{"case_id": "a"}], alignment="atlas")


def test_default_loader_reads_the_manifest_entries(tmp_path: Path) -> None:
    entries = []
    for number, case in enumerate(_hand_made().values()):
        folder = tmp_path / f"p{number}"
        folder.mkdir()
        entry: dict[str, Any] = {"case_id": f"p{number}", "spacing": [1.0, 1.0, 1.0]}
        entry["label_class_present"] = case["seg_class_present"].int().tolist()
        for key, name in (("image", "image"), ("seg", "label"), ("dose_mask", "dose_mask")):
            nib.save(nib.Nifti1Image(case[key][0].numpy().astype(np.float32), np.eye(4)), folder / f"{name}.nii.gz")
            entry[name] = str(folder / f"{name}.nii.gz")
        if bool(case["dose_present"]):
            nib.save(nib.Nifti1Image(case["dose"][0].numpy(), np.eye(4)), folder / "dose.nii.gz")
            entry["dose"] = str(folder / "dose.nii.gz")
        entries.append(entry)
    floor = VolumeFloor(entries, num_classes=3)
    reference, _ = _memory_floor(_hand_made())
    assert np.allclose(floor.mean_dose, reference.mean_dose)
    assert np.array_equal(floor.label_map, reference.label_map)
    assert floor.num_dose_patients == 2 and floor.training_case_ids == ["p0", "p1", "p2"]


# --- centroid alignment (volumes of different shapes and spacings) --------------------------------------------------


def test_centroid_alignment_equals_grid_when_the_volumes_share_a_grid() -> None:
    cases = _hand_made()
    grid, _ = _memory_floor(cases)
    centroid, _ = _memory_floor(cases, alignment="centroid")
    dose, labels = centroid.predict(SHAPE, (1.0, 1.0, 1.0), dose_mask=np.ones(SHAPE))
    assert np.allclose(dose, grid.mean_dose, atol=1e-5)
    assert np.array_equal(labels, grid.label_map)
    assert centroid.describe()["reference_grid"]["shape"] == list(SHAPE)


def test_centroid_alignment_follows_the_mask_in_millimetres() -> None:
    """A training case at 2 mm whose dose rises 1 Gy/mm along axis 2 from its mask's centroid and whose label 1 is a
    12 mm cube about it; an evaluated case at 1 mm with its mask elsewhere on a larger grid: the floor is the same
    ramp and cube about the evaluated mask's centroid (linear interpolation is exact on a linear ramp)."""
    train_mask = np.zeros(SHAPE, bool)
    train_mask[4:12, 6:14, 2:10] = True  # centroid at voxel (7.5, 9.5, 5.5): (15, 19, 11) mm
    anchor = anchor_mm(SHAPE, (2.0, 2.0, 2.0), train_mask)
    assert np.allclose(anchor, [15.0, 19.0, 11.0])
    z_mm = np.arange(SHAPE[2]) * 2.0 - anchor[2]
    dose = np.broadcast_to(50.0 + z_mm, SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.int64)
    labels[5:11, 7:13, 3:9] = 1  # 6 voxels of 2 mm about the centroid on each axis
    floor, _ = _memory_floor({"t": _case(labels, dose, train_mask, spacing=(2.0, 2.0, 2.0))}, alignment="centroid")

    shape = (40, 40, 40)
    mask = np.zeros(shape, bool)
    mask[20:30, 10:20, 24:34] = True  # centroid at voxel (24.5, 14.5, 28.5), 1 mm voxels
    pred_dose, pred_labels = floor.predict(shape, (1.0, 1.0, 1.0), dose_mask=mask)
    z_rel = np.arange(shape[2]) - 28.5
    inside = np.abs(z_rel) <= 9.0  # within the training field of view (-11..19 mm about the anchor) with a margin
    assert np.allclose(pred_dose[24, 14, inside], 50.0 + z_rel[inside], atol=1e-4)
    assert np.allclose(pred_dose[24, 14, z_rel < -12.0], 0.0)  # below the training FOV: no data, 0 Gy
    cube = np.argwhere(pred_labels == 1)
    # per axis, the share is 1 within 5 mm of the anchor and falls linearly to 0 at 7 mm: 0.75 at the outer voxels
    # (5.5 mm), so a 12-voxel cube of 1 mm, less its 8 corners (0.75^3 < 0.5 under trilinear interpolation)
    assert np.allclose(cube.mean(axis=0), [24.5, 14.5, 28.5])
    assert (cube.max(axis=0) - cube.min(axis=0) + 1).tolist() == [12, 12, 12] and len(cube) == 12**3 - 8
    assert pred_labels[0, 0, 0] == 0


# --- the floor in the whole-volume evaluation -----------------------------------------------------------------------


def _evaluation_case(seed: int, model_dose: np.ndarray | None = None, model_labels: np.ndarray | None = None) -> dict:
    """One collated evaluation batch (batch size 1) with the evaluator's output under ``_output``."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, bool)
    mask[2:14, 2:14, 1:15] = True
    ref_labels = np.zeros(SHAPE, np.int64)
    ref_labels[3:6, 3:6, 3:6] = 1
    ref_labels[8:11, 8:11, 8 + seed % 2 : 11 + seed % 2] = 2
    ref_dose = np.where(mask, 40.0 + 10.0 * rng.random(SHAPE), 0.0).astype(np.float32)
    model_dose = ref_dose + rng.normal(0, 1.0, SHAPE).astype(np.float32) if model_dose is None else model_dose
    model_labels = ref_labels if model_labels is None else model_labels
    logits = torch.nn.functional.one_hot(torch.from_numpy(model_labels), 3).permute(3, 0, 1, 2).float()[None]
    output = {
        "image": torch.from_numpy(mask.astype(np.float32))[None, None],
        "pred": {"seg": logits, "dose": torch.from_numpy(model_dose)[None, None]},
        "label": {
            "seg": torch.from_numpy(ref_labels)[None, None],
            "seg_class_present": torch.ones(1, 3),
            "dose": torch.from_numpy(ref_dose)[None, None],
            "dose_mask": torch.from_numpy(mask.astype(np.float32))[None, None],
            "dose_present": torch.ones(1),
        },
    }
    return {"case_id": [f"val_{seed}"], "spacing": torch.tensor([[2.0, 2.0, 2.0]]), "_output": output}


def _structures(batch_meta: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], Sequence[float]]:
    """DVH structures of every evaluation case: a target and an OAR."""
    ptv = np.zeros(SHAPE, bool)
    ptv[5:10, 5:10, 5:10] = True
    cord = np.zeros(SHAPE, bool)
    cord[6:9, 6:9, :] = True  # runs out of the possible-dose mask at both ends
    return {"PTV70": ptv, "Cord": cord}, (2.0, 2.0, 2.0)


def _run(handler: VolumeEvaluationHandler, batches: list[dict]) -> Engine:
    engine = Engine(lambda engine, batch: batch["_output"])
    handler.attach(engine)
    engine.run(batches, max_epochs=1)
    return engine


def test_floor_metrics_equal_the_metric_functions_on_the_floor(tmp_path: Path) -> None:
    floor, _ = _memory_floor(_hand_made())
    handler = VolumeEvaluationHandler(NAMES, output_dir=tmp_path, dvh_structures=_structures, figures=0, floor=floor)
    batches = [_evaluation_case(0), _evaluation_case(1)]
    engine = _run(handler, batches)

    dose_results, dice_reports, whole = [], [], []
    for batch in batches:
        label = batch["_output"]["label"]
        ref, mask = label["dose"][0, 0].numpy(), label["dose_mask"][0, 0].numpy() > 0
        scored = floor.mean_dose * mask
        masks, spacing = _structures({})
        dose_results.append(evaluate_dose(scored, ref, mask, masks, spacing))
        assert dose_results[-1]["dose_score"] == pytest.approx(openkbp_dose_score(floor.mean_dose, ref, mask))
        whole.append(masked_mae(scored, ref))
        dice_reports.append(dice_report(floor.label_map, label["seg"][0, 0].numpy(), NAMES, class_present=[1, 1, 1]))
    dose = aggregate_dose_results(dose_results)
    dice = aggregate_dice(dice_reports)
    metrics = engine.state.metrics
    assert metrics["val_floor_dose_mae"] == pytest.approx(dose["dose_score"])
    assert metrics["val_floor_dvh_score"] == pytest.approx(dose["dvh_score"])
    assert metrics["val_floor_whole_volume_mae"] == pytest.approx(np.mean(whole))
    assert metrics["val_floor_mean_dice"] == pytest.approx(dice["mean_dice"])
    assert metrics["val_floor_dice_Cord"] == pytest.approx(dice["dice"]["Cord"])
    assert metrics["val_whole_volume_mae"] < metrics["val_dose_mae"]  # the mask covers part of the grid only

    report = json.loads((tmp_path / "report.json").read_text())
    summary = report["summary"]
    assert summary["floor"]["num_training_patients"] == 3 and "definition" in summary["floor"]
    assert summary["floor"]["dvh_score"] == pytest.approx(dose["dvh_score"])
    assert summary["beats_floor"] == {"dose_mae": True, "dvh_score": True, "mean_dice": True}
    for case, expected, reports in zip(report["cases"], dose_results, dice_reports):
        assert case["floor"]["dose_mae"] == pytest.approx(expected["dose_score"])
        assert case["floor"]["dvh_score"] == pytest.approx(expected["dvh_score"])
        assert case["floor"]["mean_dice"] == pytest.approx(reports["mean_dice"])
        assert "whole_volume_mae" in case
    with (tmp_path / "cases.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[1]["floor_dvh_score"]) == pytest.approx(dose_results[1]["dvh_score"])
    assert float(rows[0]["whole_volume_mae"]) == pytest.approx(report["cases"][0]["whole_volume_mae"])

    # the floor is scored once per case: a second validation run reads nothing again and gives the same numbers
    again = _run(handler, batches)
    assert again.state.metrics["val_floor_dvh_score"] == metrics["val_floor_dvh_score"]


def test_warning_when_the_model_loses_to_its_floor(caplog: pytest.LogCaptureFixture) -> None:
    floor, _ = _memory_floor(_hand_made())
    zero = np.zeros(SHAPE, np.float32)
    losing = [_evaluation_case(s, model_dose=zero, model_labels=np.zeros(SHAPE, np.int64)) for s in (0, 1)]
    handler = VolumeEvaluationHandler(NAMES, dvh_structures=_structures, floor=floor)
    with caplog.at_level(logging.WARNING, logger="ctan_monai.evaluation"):
        engine = _run(handler, losing)
    warnings = [r.getMessage() for r in caplog.records if "DOES NOT BEAT" in r.getMessage()]
    assert len(warnings) == 3
    metrics = engine.state.metrics
    for name in ("dose_mae", "dvh_score", "mean_dice"):
        (line,) = [w for w in warnings if f"[{name}]" in w]
        assert f"model {metrics[f'val_{name}']:.4f} vs floor {metrics[f'val_floor_{name}']:.4f}" in line
    assert handler.summary["beats_floor"] == {"dose_mae": False, "dvh_score": False, "mean_dice": False}

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctan_monai.evaluation"):
        _run(handler, [_evaluation_case(0), _evaluation_case(1)])  # close to the reference: wins everywhere
    assert not [r for r in caplog.records if "FLOOR" in r.getMessage()]
    assert handler.summary["beats_floor"] == {"dose_mae": True, "dvh_score": True, "mean_dice": True}


def test_warning_when_evaluating_on_the_floors_training_patients(caplog: pytest.LogCaptureFixture) -> None:
    floor = VolumeFloor([{"case_id": "val_0"}], num_classes=3, loader=lambda e: _hand_made()["p2"])
    with caplog.at_level(logging.WARNING, logger="ctan_monai.evaluation"):
        _run(VolumeEvaluationHandler(NAMES, floor=floor), [_evaluation_case(0)])
    assert any("among the floor's training patients (val_0)" in r.getMessage() for r in caplog.records)


# --- the dose is scored as submitted: zero outside the possible-dose mask -------------------------------------------


def _independent_dvh(dose: np.ndarray, structures: Mapping[str, np.ndarray], voxel_mm3: float) -> dict[str, float]:
    """The OpenKBP DVH metrics, written out again: percentiles on targets, D_0.1cc and mean on OARs."""
    out = {}
    n_tenth_cc = max(1, round(100.0 / voxel_mm3))
    for name, inside in structures.items():
        d = dose[inside]
        if name.startswith("PTV"):
            out.update({f"{name} D99": np.percentile(d, 1), f"{name} D95": np.percentile(d, 5)})
            out[f"{name} D1"] = np.percentile(d, 99)
        else:
            out.update({f"{name} D0.1cc": np.percentile(d, 100 - 100 * n_tenth_cc / d.size), f"{name} mean": d.mean()})
    return out


def test_dvh_uses_the_prediction_zeroed_outside_the_possible_dose_mask() -> None:
    """The cord runs out of the mask, where the prediction is 70 Gy; the PTV straddles the mask's edge. The official
    DVH metrics of the prediction see 0 Gy there; those of the raw prediction (the old behaviour) do not."""
    mask = np.zeros(SHAPE, bool)
    mask[:, :, 4:12] = True
    ref = np.where(mask, 30.0, 0.0).astype(np.float32)
    pred = np.where(mask, 33.0, 70.0).astype(np.float32)
    ptv = np.zeros(SHAPE, bool)
    ptv[6:10, 6:10, 2:8] = True
    cord = np.zeros(SHAPE, bool)
    cord[2:5, 2:5, :] = True
    structures = {"PTV70": ptv, "Cord": cord}
    batch = _evaluation_case(0, model_dose=pred)
    batch["_output"]["label"]["dose"] = torch.from_numpy(ref)[None, None]
    batch["_output"]["label"]["dose_mask"] = torch.from_numpy(mask.astype(np.float32))[None, None]
    handler = VolumeEvaluationHandler(NAMES, dvh_structures=lambda meta: (structures, (2.0, 2.5, 2.0)))
    engine = _run(handler, [batch])

    expected_pred = _independent_dvh(pred * mask, structures, 2.0 * 2.5 * 2.0)
    expected_ref = _independent_dvh(ref, structures, 2.0 * 2.5 * 2.0)
    expected = np.mean([abs(expected_pred[k] - expected_ref[k]) for k in expected_ref])
    old = evaluate_dose(pred, ref, mask, structures, (2.0, 2.5, 2.0))["dvh_score"]
    assert abs(old - expected) > 1.0  # the case tells the two definitions apart
    assert engine.state.metrics["val_dvh_score"] == pytest.approx(expected)
    assert engine.state.metrics["val_dose_mae"] == pytest.approx(3.0)  # inside the mask, unchanged
    whole = (3.0 * mask.sum() + 0.0 * (~mask).sum()) / mask.size  # 0 Gy predicted and 0 Gy reference outside
    assert engine.state.metrics["val_whole_volume_mae"] == pytest.approx(whole)
    dvh = handler.cases[0]["dose"]["dvh"]["prediction"]
    assert dvh["Cord"]["mean"] == pytest.approx(expected_pred["Cord mean"])
    assert dvh["PTV70"]["D_99"] == pytest.approx(expected_pred["PTV70 D99"])
