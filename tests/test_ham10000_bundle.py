"""The HAM10000 bundle end to end on the synthetic demo (training through MONAI's bundle CLI, resume, ``--arch``
switch, evaluation on the test split, inference read-back, metadata verification, TorchScript export), and the
pieces it is made of: the image evaluation handler, the class-balance switches, the split-file guard.

Timings on 2 shared CPU cores: the unit tests a few seconds; the bundle tests about 2-3 minutes together (64 px,
2 iterations per epoch)."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctan_monai.apps.ham10000.demo import write_ham10000_demo
from ctan_monai.apps.ham10000.inference import TaskOutputsToKeysd, find_inference_images
from ctan_monai.apps.ham10000.prepare import diagnosis_task_losses, prepare_ham10000, sample_weights, training_sampler
from ctan_monai.apps.ham10000.transforms import inference_transforms
from ctan_monai.apps.ham10000.validation import HAM10000_CLASSES
from ctan_monai.data.samplers import WeightedSubsetSampler
from ctan_monai.data.validation import DatasetValidationError
from ctan_monai.engines.image_evaluation import ImageEvaluationHandler
from tests.conftest import REPO_ROOT, compare_metrics, one_hot_logits, run_bundle, run_handler, shared_file

BUNDLE = REPO_ROOT / "bundles" / "ctan_ham10000"
CLASSES = list(HAM10000_CLASSES)
# the demo-learns test, 2 of the demo's 4 epochs: measured Dice 90.8 % (floor 73.0), balanced accuracy 75.0 % (14.3)
DEMO_DICE_OVER_FLOOR = 5.0
DEMO_BACC_OVER_FLOOR = 30.0
# small, fast training budget: resnet18 at 64 px, 16 class-balanced draws (2 iterations) per epoch
QUICK = [
    "--image_size",
    "64",
    "--backbone",
    "resnet18",
    "--train_samples_per_epoch",
    "16",
    "--progress_bar",
    "False",
    "--num_workers",
    "0",
]
TASKS = [
    {"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 2},
    {"name": "dx", "level": "image", "kind": "classification", "out_channels": 7},
]


# ------------------------------------------------------------------------------------------------ evaluation handler


def test_image_evaluation_handler_metrics_report_and_figures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    size, names = 16, ["nv", "mel", "bcc"]
    true = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2])
    present = np.array([1, 1, 1, 1, 1, 0])  # the last image has no diagnosis label
    refs = np.zeros((6, size, size), dtype=np.int64)
    refs[:, 4:12, 4:12] = 1
    preds = refs.copy()
    preds[:, 4:12, 4:8] = 0  # half the lesion found: Dice 2 * 32 / (32 + 64) = 66.7 %
    preds[5] = 0  # nothing found: Dice 0
    batches = []
    for start in (0, 4):
        stop = min(start + 4, 6)
        logits = torch.full((stop - start, 3), -2.0)
        logits[torch.arange(stop - start), torch.as_tensor(predicted[start:stop])] = 2.0
        batches.append(
            (
                {"image_id": [f"img{i}" for i in range(start, stop)]},
                {
                    "image": torch.as_tensor(rng.normal(size=(stop - start, 3, size, size)), dtype=torch.float32),
                    "pred": {"seg": one_hot_logits(preds[start:stop], 2), "dx": logits},
                    "label": {
                        "seg": torch.as_tensor(refs[start:stop, None]),
                        "dx": torch.as_tensor(true[start:stop]),
                        "dx_present": torch.as_tensor(present[start:stop], dtype=torch.float32),
                    },
                },
            )
        )
    handler = ImageEvaluationHandler("seg", ["lesion"], "dx", names, output_dir=tmp_path, figures=3, prefix="t")
    metrics = run_handler(handler, batches).state.metrics
    expected_dice = (5 * 200 / 3 + 0) / 6
    assert metrics["t_mean_dice"] == pytest.approx(expected_dice)
    assert metrics["t_dice_lesion"] == pytest.approx(expected_dice)
    assert metrics["t_accuracy"] == pytest.approx(60.0)  # 3 of the 5 labelled images
    assert metrics["t_recall_nv"] == pytest.approx(200 / 3) and metrics["t_recall_mel"] == pytest.approx(50.0)
    assert np.isnan(metrics["t_recall_bcc"])  # its only image is unlabelled
    assert metrics["t_balanced_accuracy"] == pytest.approx((200 / 3 + 50) / 2)

    report = json.loads((tmp_path / "report.json").read_text())
    summary = report["summary"]
    assert summary["num_images"] == 6 and summary["classification"]["num_labelled"] == 5
    assert summary["classification"]["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert summary["classification"]["chance_balanced_accuracy"] == pytest.approx(50.0)  # two classes present
    assert summary["classification"]["majority_class_accuracy"] == pytest.approx(60.0)
    assert summary["classification"]["recall"]["bcc"] is None  # NaN is written as null: strict JSON
    assert [r["image_id"] for r in report["images"]] == [f"img{i}" for i in range(6)]
    assert report["images"][5]["true_class"] is None and report["images"][5]["predicted_class"] == "bcc"
    with open(tmp_path / "images.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["predicted_class"] for r in rows] == [names[p] for p in predicted]
    assert float(rows[5]["mean_dice"]) == 0.0 and float(rows[0]["dice_lesion"]) == pytest.approx(200 / 3)
    probabilities = np.array([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    for figure in ("confusion_matrix.png", "overlays.png"):
        with Image.open(tmp_path / "figures" / figure) as im:
            assert im.size[0] > 200 and im.size[1] > 200
    assert not list(tmp_path.rglob("*.part*"))  # atomic writes leave no temporary file behind


def test_image_evaluation_handler_binary_and_errors() -> None:
    scores = torch.tensor([[-2.0], [1.0], [3.0], [-1.0]])
    batch = (
        {},
        {"image": torch.zeros(4, 1, 8, 8), "pred": {"covid": scores}, "label": {"covid": torch.tensor([0, 1, 1, 1])}},
    )
    handler = ImageEvaluationHandler(None, cls_task="covid", class_names=["negative", "positive"], prefix="b")
    metrics = run_handler(handler, [batch]).state.metrics
    assert metrics["b_auc"] == pytest.approx(100.0)  # every positive scores above the negative
    assert metrics["b_accuracy"] == pytest.approx(75.0)  # threshold 0.5: the last positive is missed
    assert "b_mean_dice" not in metrics
    with pytest.raises(ValueError, match="seg_task, a cls_task or both"):
        ImageEvaluationHandler(None, cls_task=None)
    with pytest.raises(ValueError, match="class_names"):
        ImageEvaluationHandler(cls_task="dx")
    decollated = [({}, [{"pred": {}, "image": torch.zeros(1, 8, 8)}])]
    with pytest.raises(TypeError, match="decollate=False"):
        run_handler(ImageEvaluationHandler("seg"), decollated)


# ------------------------------------------------------------------------------------------------ class balance


def test_class_balanced_sampler_balances_reproducibly_and_shards() -> None:
    datalist = [{"dx": 5}] * 90 + [{"dx": 4}] * 10
    sampler = training_sampler(datalist, "sampler", "inverse_frequency", num_samples=4000, seed=0)
    sampler.set_epoch(1)
    drawn = [datalist[i]["dx"] for i in sampler]
    assert abs(drawn.count(4) / 4000 - 0.5) < 0.03  # 10 % of the images, half of the draws
    again = training_sampler(datalist, num_samples=4000, seed=0)
    again.set_epoch(1)
    assert list(again) == list(sampler)  # the draw depends on the seed and the epoch only (resume)
    again.set_epoch(2)
    assert list(again) != list(sampler)
    # two ranks split one draw between them
    weights = sample_weights(datalist)
    ranks = [WeightedSubsetSampler(weights, 10, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    whole = WeightedSubsetSampler(weights, 10, seed=3)
    assert [len(r) for r in ranks] == [5, 5]
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(whole)
    # no balancing: a random order of every image, or a random subset
    plain = training_sampler(datalist, "none")
    assert sorted(plain) == list(range(100))
    assert len(list(training_sampler(datalist, "loss_weights", num_samples=16))) == 16
    with pytest.raises(ValueError, match="class_balance must be one of"):
        training_sampler(datalist, "oversample")
    with pytest.raises(ValueError, match="balance_method"):
        training_sampler(datalist, "sampler", "focal")
    with pytest.raises(ValueError, match="not all zero"):
        WeightedSubsetSampler([0.0, 0.0])


def test_diagnosis_task_losses_switch() -> None:
    datalist = [{"dx": 5}] * 30 + [{"dx": 4}] * 10
    assert diagnosis_task_losses(datalist, "sampler") is None
    assert diagnosis_task_losses(datalist, "none") is None
    loss = diagnosis_task_losses(datalist, "loss_weights")["dx"]
    weights = loss.weight.tolist()
    assert weights[4] == pytest.approx(2.0) and weights[5] == pytest.approx(2 / 3)  # mean weight per image is 1
    logits = torch.zeros(2, 7)
    per_image = loss(logits, torch.tensor([4, 5]))
    assert per_image[0] / per_image[1] == pytest.approx(3.0)  # a mel image counts three times an nv image


def test_prepare_writes_demo_splits_once_and_guards_the_dataset(tmp_path: Path, caplog) -> None:
    demo = tmp_path / "demo"
    split_file = tmp_path / "run" / "splits.json"
    caplog.set_level("INFO")
    splits = prepare_ham10000(demo, split_file, write_demo_if_missing=True, demo_images=21)
    assert (demo / "HAM10000_metadata.csv").is_file() and split_file.is_file()
    assert sum(len(v) for v in splits.values()) == 21
    # class counts per split are reported when the split is made, and again when it is read
    assert "split written to" in caplog.text and "lesions" in caplog.text
    caplog.clear()
    assert prepare_ham10000(demo, split_file) == splits
    assert "split read from" in caplog.text and "nv " in caplog.text
    other = write_ham10000_demo(tmp_path / "other", n_images=14, seed=1)
    with pytest.raises(ValueError, match="made for the dataset at"):
        prepare_ham10000(other, split_file)
    with pytest.raises(FileNotFoundError):
        prepare_ham10000(tmp_path / "nowhere", tmp_path / "x.json")
    # a bad case stops the preparation up front, naming the file; or is skipped and listed when asked
    broken = Path(shutil.copytree(other, tmp_path / "broken"))
    jpeg = sorted(broken.glob("HAM10000_images*/*.jpg"))[0]
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    with pytest.raises(DatasetValidationError, match=str(jpeg)):
        prepare_ham10000(broken, tmp_path / "broken_run" / "splits.json")
    assert not (tmp_path / "broken_run" / "splits.json").exists()
    kept = prepare_ham10000(broken, tmp_path / "skip_run" / "splits.json", skip_bad=True)
    assert sum(len(v) for v in kept.values()) == 13


def test_inference_pieces(tmp_path: Path) -> None:
    root = write_ham10000_demo(tmp_path / "HAM10000", n_images=7)
    items = find_inference_images(root)  # a dataset folder: its image folders, not the masks
    assert len(items) == 7 and all(i["image"].endswith(".jpg") for i in items)
    one = find_inference_images(items[0]["image"])
    assert one == [items[0]]
    with pytest.raises(FileNotFoundError, match="holds no image"):
        find_inference_images(root / "HAM10000_segmentations_lesion_tschandl")
    out = TaskOutputsToKeysd("pred", "seg")({"pred": {"seg": torch.zeros(2, 4, 4), "dx": torch.ones(7)}})
    assert tuple(out["pred"].shape) == (2, 4, 4) and float(out["dx"].sum()) == 7


# ------------------------------------------------------------------------------------------------ the bundle


@pytest.fixture(scope="module")
def ham_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundle's configs; training writes the demo, the split, the runs and the models there."""
    root = tmp_path_factory.mktemp("bundle") / "ctan_ham10000"
    shutil.copytree(BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    return root


@pytest.mark.slow
def test_training_writes_demo_and_resumes(ham_bundle: Path) -> None:
    """One epoch on the demo (written on first use), then the same command with ``--epochs 2`` continues from the
    epoch-1 checkpoint: the optimiser, the trainer state and the DWA history carry over."""
    args = ["run", "training", "--config_file", "configs/train.yaml", *QUICK, "--val_interval", "1"]
    out = run_bundle([*args, "--epochs", "1"], ham_bundle)
    assert (ham_bundle / "demo_data" / "ham10000" / "README.txt").is_file()
    assert "split written to" in out and "lesions" in out  # the class counts per split
    splits = json.loads((ham_bundle / "runs" / "ctan" / "splits.json").read_text())
    lesions = [{e["lesion_id"] for e in splits[name]} for name in ("training", "validation", "test")]
    assert not (lesions[0] & lesions[1] or lesions[0] & lesions[2] or lesions[1] & lesions[2])
    out = run_bundle([*args, "--epochs", "2"], ham_bundle)
    assert "resumed from" in out and "checkpoint_epoch=1.pt" in out
    history = json.loads((ham_bundle / "runs" / "ctan" / "metrics_history.json").read_text())
    assert [e for e, _ in history["train_loss_dx"]] == [1, 2]
    for name in ("val_mean_dice", "val_accuracy", "val_balanced_accuracy", "val_recall_mel", "weight_seg"):
        assert [e for e, _ in history[name]] == [1, 2], name
    final = torch.load(ham_bundle / "runs" / "ctan" / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=False)
    assert final["trainer"]["iteration"] == 4
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {4}
    assert final["loss"]["_extra_state"]["weighting"]["epoch"] == 2
    assert final["lr_scheduler"]["last_epoch"] == 4  # the schedule is stepped per iteration and resumed
    report = json.loads((ham_bundle / "runs" / "ctan" / "validation" / "report.json").read_text())
    assert report["epoch"] == 2 and report["summary"]["num_images"] == len(splits["validation"])
    # models/model.pt: the validated epoch with the best key metric (mean of Dice and balanced accuracy, as
    # fractions), its record kept across the resume; model_final.pt: the last epoch's weights
    keys = history["val_key_metric"]
    assert [e for e, _ in keys] == [1, 2]
    for (_, key), (_, dice), (_, bacc) in zip(keys, history["val_mean_dice"], history["val_balanced_accuracy"]):
        assert key == pytest.approx(0.005 * dice + 0.005 * bacc)
    best_epoch, best_key = max(keys, key=lambda point: point[1])  # the first of equal scores, as the saver keeps
    assert final["best_model"]["_saved"][0][0] == pytest.approx(best_key)
    best = torch.load(ham_bundle / "models" / "model.pt", weights_only=True)
    last = torch.load(ham_bundle / "models" / "model_final.pt", weights_only=True)
    assert all(torch.equal(last[k], v) for k, v in final["model"].items())
    assert all(torch.equal(best[k], last[k]) for k in last) == (best_epoch == 2)
    summary = (ham_bundle / "runs" / "ctan" / "training_summary.md").read_text()
    assert f"best (epoch {best_epoch})" in summary and "last (epoch 2)" in summary and "untrained" in summary


@pytest.mark.slow
def test_arch_switch_and_evaluate(ham_bundle: Path) -> None:
    """``--arch hps`` trains the baseline with everything else equal (and the class-weighted loss instead of the
    sampler); evaluate.yaml reports on the held-out test lesions with figures."""
    train = ["run", "training", "--config_file", "configs/train.yaml", *QUICK, "--epochs", "1", "--val_interval", "2"]
    run_bundle([*train, "--arch", "hps", "--class_balance", "loss_weights"], ham_bundle)
    # validated at the last epoch although val_interval is 2: the one epoch is models/model.pt
    assert (ham_bundle / "models" / "hps" / "model.pt").is_file()
    assert (ham_bundle / "models" / "hps" / "model_final.pt").is_file()
    evaluate = ["run", "evaluating", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']", *QUICK[:4]]
    out = run_bundle([*evaluate, "--arch", "hps"], ham_bundle)
    assert "test_balanced_accuracy" in out
    evaluation = ham_bundle / "runs" / "hps" / "evaluation"
    report = json.loads((evaluation / "report.json").read_text())
    test_ids = [e["image_id"] for e in json.loads((ham_bundle / "runs" / "hps" / "splits.json").read_text())["test"]]
    assert [r["image_id"] for r in report["images"]] == test_ids
    summary = report["summary"]
    assert 0 <= summary["segmentation"]["mean_dice"] <= 100
    assert compare_metrics(ham_bundle, ham_bundle / "runs" / "hps", validated=True) == {
        "seg": summary["segmentation"]["mean_dice"],
        "dx": summary["classification"]["balanced_accuracy"],
    }
    hits = [r["true_class"] == r["predicted_class"] for r in report["images"]]
    assert summary["classification"]["accuracy"] == pytest.approx(100 * np.mean(hits))
    truth = Counter(r["true_class"] for r in report["images"])
    assert summary["classification"]["class_counts"] == {c: truth.get(c, 0) for c in CLASSES}
    assert (evaluation / "figures" / "confusion_matrix.png").is_file()
    assert (evaluation / "figures" / "overlays.png").is_file()
    # a checkpoint of another architecture fails to load instead of evaluating a half-initialised network
    hps_model = str(ham_bundle / "models" / "hps" / "model.pt")
    out = run_bundle([*evaluate, "--arch", "mtan", "--ckpt_path", hps_model], ham_bundle, expect_ok=False)
    assert "state_dict" in out


@pytest.mark.slow
def test_inference_reads_back(ham_bundle: Path, tmp_path: Path) -> None:
    """inference.yaml on three demo images: masks at each input's size (0/255), probabilities equal to the network's
    own on the same preprocessing, and the CSV table agreeing with the per-image JSON."""
    ckpt = ham_bundle / "models" / "model.pt"
    if not ckpt.is_file():
        pytest.skip("needs the model trained by test_training_writes_demo_and_resumes")
    images = sorted((ham_bundle / "demo_data" / "ham10000" / "HAM10000_images_part_1").glob("*.jpg"))[:3]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for image in images:
        shutil.copy(image, inputs)
    out_dir = tmp_path / "predictions"
    run_bundle(
        ["run", "--config_file", "configs/inference.yaml", "--image_size", "64", "--input_dir", str(inputs)]
        + ["--output_dir", str(out_dir)],
        ham_bundle,
    )
    from ctan_monai.networks import build_network

    net = build_network("ctan", TASKS, backbone="resnet18", in_channels=3)
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    net.eval()
    with open(out_dir / "predictions.csv", newline="") as handle:
        table = {row["image_id"]: row for row in csv.DictReader(handle)}
    assert sorted(table) == [p.stem for p in images]
    for image in images:
        record = json.loads((out_dir / f"{image.stem}_dx.json").read_text())
        with Image.open(out_dir / f"{image.stem}_segmentation.png") as mask_file, Image.open(image) as source:
            assert mask_file.mode == "L" and mask_file.size == source.size
            mask = np.asarray(mask_file)
        assert set(np.unique(mask)) <= {0, 255}
        x = inference_transforms(64)({"image": str(image)})["image"].as_tensor()[None]
        with torch.no_grad():
            outputs = net(x)
        expected = torch.softmax(outputs["dx"][0], dim=0).numpy()
        np.testing.assert_allclose([record["probabilities"][c] for c in CLASSES], expected, atol=1e-5)
        assert record["predicted_class"] == CLASSES[int(expected.argmax())]
        row = table[image.stem]
        np.testing.assert_allclose([float(row[f"prob_{c}"]) for c in CLASSES], expected, atol=1e-5)
        assert float(row["lesion_fraction"]) == pytest.approx((mask > 0).mean())
        # the mask is the network's lesion map brought back to the image's size
        probs = torch.softmax(outputs["seg"], dim=1)
        resized = torch.nn.functional.interpolate(probs, size=mask.shape, mode="bilinear", align_corners=False)
        agreement = ((resized[0].argmax(0).numpy() > 0) == (mask > 0)).mean()
        assert agreement > 0.98
    out = run_bundle(
        ["run", "--config_file", "configs/inference.yaml", "--input_dir", str(tmp_path / "empty")],
        ham_bundle,
        expect_ok=False,
    )
    assert f"input_dir '{tmp_path / 'empty'}'" in out
    missing = tmp_path / "nowhere" / "model.pt"
    out = run_bundle(
        ["run", "--config_file", "configs/inference.yaml", "--ckpt_path", str(missing)], ham_bundle, expect_ok=False
    )
    assert f"No such file or directory: '{missing}'" in out


@pytest.mark.slow
def test_verify_metadata_and_net_in_out(ham_bundle: Path, tmp_path: Path) -> None:
    schema = shared_file("../schemas/meta_schema_20240725.json")
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith("meta_schema_20240725.json")
    outputs = meta["network_data_format"]["outputs"]
    assert list(outputs) == ["pred", "dx"] and outputs["pred"]["format"] == "segmentation"
    assert list(outputs["dx"]["channel_def"].values()) == CLASSES
    shutil.copy(schema, tmp_path / "schema.json")
    meta_file = str(BUNDLE / "configs" / "metadata.json")
    out = run_bundle(
        ["verify_metadata", "--meta_file", meta_file, "--filepath", str(tmp_path / "schema.json")], tmp_path
    )
    assert "metadata is verified with no error" in out
    out = run_bundle(
        ["verify_net_in_out", "seg_network_def", "--meta_file", meta_file, "--config_file", "configs/train.yaml"],
        ham_bundle,
    )
    assert "data shape of network is verified with no error" in out


@pytest.mark.slow
def test_ckpt_export_matches_checkpoint(ham_bundle: Path) -> None:
    ckpt = ham_bundle / "models" / "model.pt"
    if not ckpt.is_file():
        pytest.skip("needs the model trained by test_training_writes_demo_and_resumes")
    run_bundle(
        ["ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt"]
        + ["--meta_file", "configs/metadata.json", "--config_file", "configs/train.yaml"],
        ham_bundle,
    )
    scripted = torch.jit.load(str(ham_bundle / "models" / "model.ts"))
    from ctan_monai.networks import build_network

    net = build_network("ctan", TASKS, backbone="resnet18", in_channels=3)
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager, exported = net(x), scripted(x)
    for name in ("seg", "dx"):
        assert (eager[name] - exported[name]).abs().max() < 1e-4


@pytest.mark.slow
def test_demo_learns_on_a_short_run(tmp_path: Path) -> None:
    """The default demo on half its budget (2 of 4 epochs) learns: the best validated epoch beats the untrained
    network and the floor on lesion Dice and balanced accuracy (the full demo reaches 94.1 % Dice and 95.2 % balanced
    accuracy against 12.2 % / 14.3 % untrained and the floor's 73.0 % / 14.3 %)."""
    root = tmp_path / "ctan_ham10000"
    shutil.copytree(BUNDLE / "configs", root / "configs")
    out = tmp_path / "run"
    run_bundle(
        ["run", "training", "--config_file", "configs/train.yaml", "--epochs", "2", "--val_interval", "2"]
        + ["--progress_bar", "False", "--output_dir", str(out), "--model_dir", str(tmp_path / "models")],
        root,
        timeout=900,
    )
    summary = json.loads((out / "training_summary.json").read_text())
    dice, bacc = summary["val_mean_dice"], summary["val_balanced_accuracy"]
    best = next(key for key in dice if key.startswith("best"))
    assert dice[best] >= dice["floor"] + DEMO_DICE_OVER_FLOOR and dice[best] >= dice["untrained"] + 40.0, dice
    assert bacc[best] >= bacc["floor"] + DEMO_BACC_OVER_FLOOR, bacc
