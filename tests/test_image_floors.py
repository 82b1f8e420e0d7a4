"""The trivial floors of the image-level evaluations (``ctan_monai.engines.image_floors``): hand-made labels and masks
give the floors they should; the evaluation handlers report the floor's metrics as the metric functions applied to
the floor predictor, add the floor block and ``beats_floor`` to the report and log a WARNING when the model loses;
missing STOIC labels are left out on both the training and the evaluated side. All synthetic and fast (seconds)."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ctan_monai.apps.ham10000.demo import write_ham10000_demo
from ctan_monai.apps.ham10000.prepare import training_floor
from ctan_monai.apps.ham10000.transforms import eval_transforms, mask_transforms
from ctan_monai.apps.ham10000.validation import HAM10000_CLASSES, build_datalist
from ctan_monai.engines import ClassificationFloor, ImageFloor, MaskFloor, PrevalenceFloor, compare_with_floor
from ctan_monai.engines.image_evaluation import ImageEvaluationHandler
from ctan_monai.engines.patient_classification import PatientClassificationHandler, task_metrics
from ctan_monai.metrics.classification import accuracy, balanced_accuracy
from ctan_monai.metrics.segmentation import aggregate_dice, dice_report
from tests.conftest import one_hot_logits, run_handler

NAMES = ["nv", "mel", "bcc"]


# ------------------------------------------------------------------------------------------------ the floors


def test_classification_floor_on_hand_made_labels() -> None:
    floor = ClassificationFloor.from_labels([0] * 6 + [1] * 3 + [2], NAMES)
    assert floor.counts == (6, 3, 1) and floor.majority_name == "nv" and floor.num_training == 10
    np.testing.assert_allclose(floor.prior, [0.6, 0.3, 0.1])
    # evaluated: two nv, two mel, one bcc without its label (left out)
    values = floor.metrics([0, 0, 1, 1, 2], present=[1, 1, 1, 1, 0])
    assert values["accuracy"] == pytest.approx(50.0)  # always nv: 2 of the 4 labelled
    assert values["balanced_accuracy"] == pytest.approx(50.0)  # recall nv 100, mel 0
    assert values["prior_accuracy"] == pytest.approx(100 * (0.6 * 0.5 + 0.3 * 0.5))  # sum_c p_train p_eval = 45
    assert values["prior_balanced_accuracy"] == pytest.approx(100 * (0.6 + 0.3) / 2)  # classes present: nv, mel
    # every class present: the prior guess's expected balanced accuracy is 1/K whatever the prior
    full = floor.metrics([0, 1, 2, 2, 2, 2])
    assert full["prior_balanced_accuracy"] == pytest.approx(100 / 3)
    assert full["prior_accuracy"] == pytest.approx(100 * (0.6 / 6 + 0.3 / 6 + 0.1 * 4 / 6))
    assert full["balanced_accuracy"] == pytest.approx(100 / 3) and full["accuracy"] == pytest.approx(100 / 6)
    # a tie goes to the first class; unlabelled training entries are not counted
    entries = [{"dx": 1}, {"dx": 2}, {"dx": 2, "dx_present": 0.0}, {"dx": 1}, {"dx": 2}, {"image": "no label"}]
    tied = ClassificationFloor.from_datalist(entries, NAMES)
    assert tied.counts == (0, 2, 2) and tied.majority_name == "mel"
    described = floor.describe()
    assert described["training_counts"] == {"nv": 6, "mel": 3, "bcc": 1} and described["majority_class"] == "nv"
    assert "training" in described["definition"]
    with pytest.raises(ValueError, match="not class indices"):
        ClassificationFloor.from_labels([0, 3], NAMES)
    with pytest.raises(ValueError, match="at least one image"):
        ClassificationFloor.from_datalist([{"dx": 0, "dx_present": 0.0}], NAMES)


def test_mask_floor_on_hand_made_masks() -> None:
    masks = [
        np.array([[1, 1, 0], [0, 0, 0]]),
        np.array([[1, 0, 0], [1, 0, 0]]),
        np.array([[1, 1, 1], [0, 0, 0]])[None],  # a leading channel axis is dropped
        np.array([[0, 0, 0], [1, 0, 0]]),
    ]
    floor = MaskFloor.from_masks(torch.as_tensor(m) for m in masks)
    assert floor.num_masks == 4
    np.testing.assert_allclose(floor.mean_mask, [[0.75, 0.5, 0.25], [0.5, 0.0, 0.0]])
    # foreground where at least half of the training masks have it (0.5 included)
    assert floor.label_map.tolist() == [[1, 1, 0], [1, 0, 0]]
    assert floor.label_map_for((1, 2, 3)).shape == (2, 3)
    described = floor.describe()
    assert described["foreground_fraction"] == pytest.approx(0.5) and described["shape"] == [2, 3]
    with pytest.raises(ValueError, match="network's input resolution"):
        floor.label_map_for((3, 2))
    with pytest.raises(ValueError, match="not binary"):
        MaskFloor.from_masks([np.array([[0, 2]])])
    with pytest.raises(ValueError, match="shape"):
        MaskFloor.from_masks([np.zeros((2, 2)), np.zeros((2, 3))])
    with pytest.raises(ValueError, match="no training mask"):
        MaskFloor.from_masks([])


def test_prevalence_floor_ignores_missing_labels() -> None:
    """Three labelled severities (two positive) and three missing ones whose placeholder is 0: counted as negatives
    they would make the majority label 0; left out, it is 1."""
    entries = [{"case_id": str(i), "covid": 1.0, "covid_present": 1.0} for i in range(6)]
    for entry, severe in zip(entries, [1.0, 1.0, 0.0, None, None, None]):
        entry["severe"] = 0.0 if severe is None else severe
        entry["severe_present"] = 0.0 if severe is None else 1.0
    entries[0]["covid"] = 0.0
    floor = PrevalenceFloor.from_datalist(entries, ["covid", "severe"])
    assert floor.labelled == {"covid": 6, "severe": 3} and floor.unlabelled == {"covid": 0, "severe": 3}
    assert floor.prevalence("severe") == pytest.approx(2 / 3) and floor.majority_label("severe") == 1
    assert floor.prevalence("covid") == pytest.approx(5 / 6) and floor.majority_label("covid") == 1
    # evaluated side: missing labels are left out too; accuracy of always answering 1
    values = floor.metrics([1, 0, 0, 1, 0], [1, 1, 0, 1, 0], "severe")
    assert values == {"auc": 50.0, "accuracy": pytest.approx(200 / 3)}
    none_labelled = PrevalenceFloor({"severe": 0}, {"severe": 0}, {"severe": 4})
    assert none_labelled.majority_label("severe") is None
    assert math.isnan(none_labelled.metrics([1, 0], [1, 1], "severe")["accuracy"])
    described = floor.describe()
    assert described["tasks"]["severe"]["num_training_unlabelled"] == 3 and "0.5" in described["note"]
    with pytest.raises(ValueError, match="not 0/1"):
        PrevalenceFloor.from_datalist([{"covid": 0.5}], ["covid"])


def test_compare_with_floor_warns_per_lost_metric(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ctan_monai.evaluation"):
        beats = compare_with_floor(
            {"mean_dice": 80.0, "balanced_accuracy": 14.0, "auc": math.nan},
            {"mean_dice": 70.0, "balanced_accuracy": 14.0, "auc": 50.0},
            context="val",
        )
    assert beats == {"mean_dice": True, "balanced_accuracy": False, "auc": None}  # a tie does not beat
    lost = [r.getMessage() for r in caplog.records if "DOES NOT BEAT" in r.getMessage()]
    assert lost == [
        "val: !!! MODEL DOES NOT BEAT ITS TRIVIAL FLOOR on balanced_accuracy: model 14.00 <= floor 14.00 "
        "(trivial predictor built from the training split) !!!"
    ]
    assert any("CANNOT COMPARE auc" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ image handler


def _image_batches(pred_masks: np.ndarray, predicted: np.ndarray) -> list[tuple[dict, dict]]:
    """Two batches of six 8x8 images: reference lesions, the given predicted masks and classes."""
    refs = np.zeros((6, 8, 8), dtype=np.int64)
    refs[:, 2:6, 2:6] = 1
    refs[1] = 0
    refs[1, 0:4, 0:4] = 1  # a lesion off-centre
    refs[4] = 0  # no lesion
    true = np.array([0, 0, 0, 1, 1, 2])
    present = np.array([1, 1, 1, 1, 1, 0])  # the last image has no diagnosis label
    batches = []
    for start, stop in ((0, 4), (4, 6)):
        logits = torch.full((stop - start, 3), -2.0)
        logits[torch.arange(stop - start), torch.as_tensor(predicted[start:stop])] = 2.0
        batches.append(
            (
                {"image_id": [f"img{i}" for i in range(start, stop)]},
                {
                    "image": torch.zeros(stop - start, 3, 8, 8),
                    "pred": {"seg": one_hot_logits(pred_masks[start:stop], 2), "dx": logits},
                    "label": {
                        "seg": torch.as_tensor(refs[start:stop, None]),
                        "dx": torch.as_tensor(true[start:stop]),
                        "dx_present": torch.as_tensor(present[start:stop], dtype=torch.float32),
                    },
                },
            )
        )
    return batches


def _floor() -> ImageFloor:
    """Training: mel is the majority class; the training masks cover rows 1..4, columns 1..6 at least half the time."""
    mean = np.zeros((8, 8))
    mean[1:5, 1:7] = 0.5
    mean[0, 0] = 0.4  # below the threshold
    return ImageFloor(ClassificationFloor(tuple(NAMES), (2, 5, 3)), MaskFloor(mean, num_masks=10))


def test_image_handler_floor_metrics_equal_the_metric_functions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    floor = _floor()
    refs = np.concatenate(
        [out["label"]["seg"][:, 0].numpy() for _, out in _image_batches(np.zeros((6, 8, 8)), np.zeros(6, int))]
    )
    handler = ImageEvaluationHandler(
        "seg", ["lesion"], "dx", NAMES, output_dir=tmp_path, figures=0, prefix="t", floor=floor
    )
    perfect = _image_batches(refs, np.array([0, 0, 0, 1, 1, 2]))  # a perfect model
    with caplog.at_level(logging.WARNING, logger="ctan_monai.evaluation"):
        metrics = run_handler(handler, perfect).state.metrics
    assert not [r for r in caplog.records if "DOES NOT BEAT" in r.getMessage()]
    # the floor's Dice: the same dice_report on the floor's mask, aggregated the same way
    trivial = floor.segmentation.label_map
    expected = aggregate_dice([dice_report(trivial, ref, ["lesion"]) for ref in refs])
    assert metrics["t_floor_mean_dice"] == pytest.approx(expected["mean_dice"])
    assert metrics["t_floor_dice_lesion"] == pytest.approx(expected["dice"]["lesion"])
    # by hand: the 4x6 floor against a 4x4 lesion: 2 * 12 / (24 + 16) = 60 %; image 1 overlaps 9 of 16: 2*9/40 = 45 %;
    # image 4 has no lesion: 0 %
    assert metrics["t_floor_mean_dice"] == pytest.approx((60 * 4 + 45 + 0) / 6)
    # the floor's classification: always mel, scored by the model's metric functions on the labelled images
    true, present = np.array([0, 0, 0, 1, 1, 2]), np.array([1, 1, 1, 1, 1, 0])
    constant = np.ones(6, dtype=int)
    assert metrics["t_floor_accuracy"] == pytest.approx(accuracy(constant, true, present, 3)) == pytest.approx(40.0)
    assert metrics["t_floor_balanced_accuracy"] == pytest.approx(balanced_accuracy(constant, true, present, 3))
    assert metrics["t_floor_balanced_accuracy"] == pytest.approx(50.0)
    assert metrics["t_floor_prior_accuracy"] == pytest.approx(100 * (0.2 * 0.6 + 0.5 * 0.4))
    assert metrics["t_floor_prior_balanced_accuracy"] == pytest.approx(100 * (0.2 + 0.5) / 2)

    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    block = summary["floor"]
    assert block["classification"]["training_counts"] == {"nv": 2, "mel": 5, "bcc": 3}
    assert block["classification"]["majority_class"] == "mel"
    assert block["segmentation"]["num_training"] == 10 and "definition" in block["segmentation"]
    assert block["segmentation"]["mean_dice"] == pytest.approx(metrics["t_floor_mean_dice"])
    assert block["key_metrics"] == {"mean_dice": pytest.approx(metrics["t_floor_mean_dice"]), "balanced_accuracy": 50.0}
    assert summary["beats_floor"] == {"mean_dice": True, "balanced_accuracy": True}
    with open(tmp_path / "images.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [round(float(r["floor_mean_dice"]), 3) for r in rows] == [60.0, 45.0, 60.0, 60.0, 0.0, 60.0]
    assert handler.rows[1]["floor_dice"]["lesion"] == pytest.approx(45.0)


def test_image_handler_warns_when_the_model_loses(caplog: pytest.LogCaptureFixture) -> None:
    """A model that finds no lesion and always answers bcc: below the floor on both key metrics, two WARNINGs."""
    handler = ImageEvaluationHandler("seg", ["lesion"], "dx", NAMES, prefix="val", floor=_floor())
    with caplog.at_level(logging.WARNING, logger="ctan_monai.evaluation"):
        metrics = run_handler(handler, _image_batches(np.zeros((6, 8, 8)), np.full(6, 2))).state.metrics
    assert metrics["val_mean_dice"] == 0.0 and metrics["val_balanced_accuracy"] == 0.0
    assert handler.summary["beats_floor"] == {"mean_dice": False, "balanced_accuracy": False}
    lost = [r for r in caplog.records if "DOES NOT BEAT" in r.getMessage()]
    assert [r.levelno for r in lost] == [logging.WARNING, logging.WARNING]
    dice_line = next(r.getMessage() for r in lost if "mean_dice" in r.getMessage())
    assert f"model 0.00 <= floor {metrics['val_floor_mean_dice']:.2f}" in dice_line
    assert "balanced_accuracy: model 0.00 <= floor 50.00" in next(
        r.getMessage() for r in lost if "balanced_accuracy" in r.getMessage()
    )


def test_image_handler_floor_checks() -> None:
    with pytest.raises(ValueError, match="differ"):
        ImageEvaluationHandler("seg", ["lesion"], "dx", ["a", "b", "c"], floor=_floor())
    with pytest.raises(ValueError, match="no cls_task"):
        ImageEvaluationHandler("seg", ["lesion"], floor=_floor().classification)
    with pytest.raises(ValueError, match="no seg_task"):
        ImageEvaluationHandler(None, cls_task="dx", class_names=NAMES, floor=_floor().segmentation)
    # a floor built at another resolution than the evaluation's is refused, not silently scored
    small = ImageEvaluationHandler("seg", ["lesion"], floor=MaskFloor(np.zeros((4, 4)), 1))
    with pytest.raises(ValueError, match="input resolution"):
        run_handler(small, _image_batches(np.zeros((6, 8, 8)), np.zeros(6, int)))
    # without a floor, nothing of it is reported
    plain = ImageEvaluationHandler("seg", ["lesion"], "dx", NAMES)
    metrics = run_handler(plain, _image_batches(np.zeros((6, 8, 8)), np.zeros(6, int))).state.metrics
    assert not [k for k in metrics if "floor" in k] and "floor" not in plain.summary


def test_ham10000_training_floor_uses_the_evaluation_masks(tmp_path: Path) -> None:
    """On the synthetic demo: the floor's masks are the evaluation transform's (same grid and resize), and the
    floor is the mean of the training masks and the training class counts."""
    datalist = build_datalist(write_ham10000_demo(tmp_path / "demo", n_images=14), validate=False)
    size = (48, 64)
    masks = [eval_transforms(size)(e)["seg"] for e in datalist[:3]]
    for entry, mask in zip(datalist, masks):
        only = mask_transforms(size)(entry)["seg"]
        assert only.shape == (1, 48, 64) and torch.equal(torch.as_tensor(only), torch.as_tensor(mask))
    floor = training_floor(datalist[:3], size)
    np.testing.assert_allclose(floor.segmentation.mean_mask, np.mean([np.asarray(m)[0] for m in masks], axis=0))
    counts = np.bincount([e["dx"] for e in datalist[:3]], minlength=len(HAM10000_CLASSES))
    assert floor.classification.counts == tuple(counts)
    with pytest.raises(ValueError, match="empty"):
        training_floor([], size)


# ------------------------------------------------------------------------------------------------ patient handler


def _patient_batches(probs: dict[str, list[float]], labels: dict[str, list[float | None]]) -> list[tuple[dict, dict]]:
    """One batch per patient (two identical slices), as a SupervisedEvaluator with decollate=False gives them."""
    batches = []
    for i in range(len(probs["covid"])):
        pred, label = {}, {}
        for task in probs:
            p = probs[task][i]
            pred[task] = torch.full((2, 1), math.log(p / (1 - p)))
            known = labels[task][i]
            label[task] = torch.full((2,), 0.0 if known is None else float(known))
            label[f"{task}_present"] = torch.full((2,), 0.0 if known is None else 1.0)
        batches.append(({"case_id": [str(i), str(i)]}, {"pred": pred, "label": label}))
    return batches


def test_patient_handler_floor_and_missing_labels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """COVID-19 is predicted well, severity backwards: the severity AUC is below the floor's 50 and is warned about.
    The evaluated patients without a severity label are left out of the floor's accuracy, as of the model's."""
    labels = {"covid": [1, 1, 0, 0, 1], "severe": [1, 0, 0, None, None]}
    probs = {"covid": [0.9, 0.8, 0.2, 0.1, 0.7], "severe": [0.2, 0.6, 0.7, 0.9, 0.99]}
    training = [{"case_id": "t1", "covid": 1.0, "covid_present": 1.0, "severe": 0.0, "severe_present": 1.0}]
    training += [{"case_id": "t2", "covid": 1.0, "covid_present": 1.0, "severe": 0.0, "severe_present": 0.0}]
    training += [{"case_id": "t3", "covid": 0.0, "covid_present": 1.0, "severe": 0.0, "severe_present": 0.0}]
    floor = PrevalenceFloor.from_datalist(training, ["covid", "severe"])
    handler = PatientClassificationHandler(["covid", "severe"], output_dir=tmp_path, figures=False, floor=floor)
    with caplog.at_level(logging.WARNING, logger="ctan_monai.evaluation"):
        metrics = run_handler(handler, _patient_batches(probs, labels)).state.metrics
    assert metrics["val_auc_covid"] == 100.0 and metrics["val_auc_severe"] == 0.0
    # the floor's AUC is what task_metrics gives a constant score: 50
    constant = [{**row, "covid_prob": 2 / 3, "severe_prob": 0.0} for row in handler.table]
    for task in ("covid", "severe"):
        assert metrics[f"val_floor_auc_{task}"] == task_metrics(constant, task)["auc"] == 50.0
    assert metrics["val_floor_mean_auc"] == 50.0
    # covid: training prevalence 2/3, always positive: 3 of 5; severe: training 0 of 1 labelled, always negative:
    # 2 of the 3 labelled evaluated patients (the two without a label are not counted)
    assert metrics["val_floor_accuracy_covid"] == pytest.approx(60.0)
    assert metrics["val_floor_accuracy_severe"] == pytest.approx(200 / 3)
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary["beats_floor"] == {"auc_covid": True, "auc_severe": False}
    severe = summary["floor"]["tasks"]["severe"]
    assert severe["num_training_labelled"] == 1 and severe["num_training_unlabelled"] == 2
    assert severe["num_evaluated_labelled"] == 3 and severe["majority_label"] == 0 and severe["auc"] == 50.0
    assert "AUC 0.5" in summary["floor"]["note"]
    lost = [r.getMessage() for r in caplog.records if "DOES NOT BEAT" in r.getMessage()]
    assert len(lost) == 1 and "auc_severe: model 0.00 <= floor 50.00" in lost[0]
    with pytest.raises(ValueError, match="the floor knows tasks"):
        PatientClassificationHandler(["covid", "severe"], floor=PrevalenceFloor({"covid": 1}, {"covid": 2}))
