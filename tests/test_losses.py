"""Tests of ctan_monai.losses: task losses, missing-label masking, DWA / equal weighting and their state."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

from ctan_monai.losses import (
    BinaryClassificationLoss,
    ClassificationLoss,
    DynamicWeightAveraging,
    EqualWeighting,
    MaskedMAELoss,
    MultiTaskLoss,
    SegmentationComboLoss,
    make_weighting,
)

SEG = {"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 3}
DOSE = {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1}
DX = {"name": "dx", "level": "image", "kind": "classification", "out_channels": 4}


def _seg_batch(seed: int, batch: int = 3, classes: int = 3, shape: tuple[int, ...] = (6, 7)):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, *shape, generator=gen)
    labels = torch.randint(0, classes, (batch, 1, *shape), generator=gen)
    return logits, labels


def _dwa_weights(ratios: list[float], temperature: float = 2.0) -> list[float]:
    """DWA by hand: K * exp(w_k / T) / sum_j exp(w_j / T)."""
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(ratios) * e / sum(exps) for e in exps]


# ---------------------------------------------------------------- segmentation combo loss


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 3)])
@pytest.mark.parametrize("include_background", [True, False])
def test_combo_loss_equals_monai_dicece_when_all_classes_present(shape, include_background):
    logits, labels = _seg_batch(0, shape=shape)
    reference = DiceCELoss(
        include_background=include_background, to_onehot_y=True, softmax=True, lambda_dice=0.3, lambda_ce=0.7
    )(logits, labels)
    loss = SegmentationComboLoss(include_background=include_background)
    per_sample = loss(logits, labels)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), reference, rtol=1e-6, atol=1e-6)
    all_present = torch.ones(3, 3)
    torch.testing.assert_close(loss(logits, labels, class_present=all_present), per_sample, rtol=0, atol=0)


@pytest.mark.parametrize("include_background", [True, False])
def test_batch_dice_combo_loss_equals_monai_batch_dicece(include_background):
    logits, labels = _seg_batch(3, batch=4, classes=4)
    ours = SegmentationComboLoss(1.0, 1.0, include_background=include_background, batch=True)(logits, labels)
    monai = DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background, batch=True)
    assert ours.shape == (4,)
    dice_only = SegmentationComboLoss(1.0, 0.0, include_background=include_background, batch=True)(logits, labels)
    assert torch.allclose(dice_only, dice_only[0].expand(4))  # every sample carries the one batch Dice
    assert torch.allclose(ours.mean(), monai(logits, labels), atol=1e-5)
    per_sample = SegmentationComboLoss(1.0, 1.0, include_background=include_background)(logits, labels).mean()
    assert not torch.allclose(ours.mean(), per_sample)


def test_batch_dice_leaves_a_class_out_only_where_it_is_not_annotated():
    logits, labels = _seg_batch(4, batch=2, classes=3)
    present = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss = SegmentationComboLoss(1.0, 0.0, include_background=False, batch=True)
    value = loss(logits, labels, present)[0]
    # by hand: class 1 over both samples, class 2 over sample 0 only (sample 1's stray class-2 voxels are background)
    labels1 = torch.where(labels[1:] == 2, 0, labels[1:])
    probs = torch.softmax(logits, 1)
    merged1 = torch.cat([probs[1:, :1] + probs[1:, 2:], probs[1:, 1:2], torch.zeros_like(probs[1:, 2:])], dim=1)
    all_probs = torch.cat([probs[:1], merged1])
    reference = F.one_hot(torch.cat([labels[:1], labels1])[:, 0], 3).movedim(-1, 1).float()

    def dice(p, r):
        return 1 - (2 * (p * r).sum() + 1e-5) / ((p + r).sum() + 1e-5)

    expected = (dice(all_probs[:, 1], reference[:, 1]) + dice(all_probs[:1, 2], reference[:1, 2])) / 2
    assert torch.allclose(value, expected, atol=1e-5)


def test_combo_loss_per_sample_values_are_independent_of_the_batch():
    logits, labels = _seg_batch(1)
    loss = SegmentationComboLoss()
    per_sample = loss(logits, labels)
    dicece = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.3, lambda_ce=0.7)
    for b in range(3):
        torch.testing.assert_close(per_sample[b], dicece(logits[b : b + 1], labels[b : b + 1]), rtol=1e-6, atol=1e-6)


def test_marginal_ce_does_not_penalise_an_unannotated_class_predicted_on_background():
    # every voxel labelled background; prediction A says background, prediction B swaps the background and class-2
    # logits (so it says class 2 wherever A said background): with class 2 unannotated both lose the same
    logits, _ = _seg_batch(2, batch=1)
    labels = torch.zeros(1, 1, 6, 7, dtype=torch.long)
    logits_a = logits.clone()
    logits_a[:, 0] += 4.0
    logits_b = logits_a[:, [2, 1, 0]]
    ce_only = SegmentationComboLoss(lambda_dice=0.0, lambda_ce=1.0)
    absent = torch.tensor([[1.0, 1.0, 0.0]])

    # with the class annotated the swap is penalised heavily
    present_a, present_b = ce_only(logits_a, labels), ce_only(logits_b, labels)
    assert float(present_b) > float(present_a) + 3.0
    # with class 2 unannotated the swap costs nothing: CE = -log(p0 + p2), by hand
    absent_a, absent_b = ce_only(logits_a, labels, absent), ce_only(logits_b, labels, absent)
    torch.testing.assert_close(absent_a, absent_b, rtol=1e-6, atol=1e-6)
    probs = torch.softmax(logits_a, dim=1)
    expected = -torch.log(probs[:, 0] + probs[:, 2]).mean()
    torch.testing.assert_close(absent_a, expected.reshape(1), rtol=1e-5, atol=1e-6)
    assert float(absent_b) < float(present_b) - 3.0
    # the full combo loss (Dice on the merged background, class 2 left out) is swap-invariant too
    combo = SegmentationComboLoss()
    torch.testing.assert_close(combo(logits_a, labels, absent), combo(logits_b, labels, absent), rtol=1e-6, atol=1e-6)


def test_marginal_dice_leaves_the_unannotated_class_out():
    logits, labels = _seg_batch(3, batch=2)
    labels[labels == 2] = 0  # class 2 not annotated in either sample: its voxels are background
    absent = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    dice_only = SegmentationComboLoss(lambda_dice=1.0, lambda_ce=0.0)
    probs = torch.softmax(logits, dim=1)
    merged = [probs[:, 0] + probs[:, 2], probs[:, 1]]
    expected = torch.zeros(2)
    for b in range(2):
        for cls, prob in enumerate(merged):
            truth = (labels[b, 0] == cls).float()
            inter = (prob[b] * truth).sum()
            expected[b] += 1 - (2 * inter + 1e-5) / (prob[b].sum() + truth.sum() + 1e-5)
    torch.testing.assert_close(dice_only(logits, labels, absent), expected / 2, rtol=1e-5, atol=1e-6)


def test_marginal_loss_varies_per_sample_and_keeps_gradients_finite():
    logits, labels = _seg_batch(4, batch=2)
    logits.requires_grad_(True)
    present = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    loss = SegmentationComboLoss()
    per_sample = loss(logits, labels, present)
    # sample 0 has every class: same as the plain loss; sample 1 differs
    plain = loss(logits, labels)
    torch.testing.assert_close(per_sample[0], plain[0], rtol=0, atol=0)
    assert abs(float((per_sample[1] - plain[1]).detach())) > 1e-3
    per_sample.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    ("logits", "labels", "present", "message"),
    [
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4), None, "labels"),
        (torch.zeros(2, 3, 4, 4), torch.full((2, 1, 4, 4), 3), None, r"\[0, 2\]"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 5), None, "spatial shape"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), torch.ones(2, 2), "class_present"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), torch.tensor([[0.0, 1, 1], [1, 1, 1]]), "background"),
    ],
)
def test_combo_loss_rejects_bad_input(logits, labels, present, message):
    with pytest.raises(ValueError, match=message):
        SegmentationComboLoss()(logits, labels.long(), present)


# ---------------------------------------------------------------- dose, classification


def test_masked_mae_ignores_errors_outside_the_mask():
    target = torch.zeros(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2] = 1  # 8 voxels in sample 0; sample 1 has an empty mask
    pred = torch.zeros(2, 1, 4, 4)
    pred[0, 0, 0] = 2.0  # 4 voxels inside, error 2
    pred[0, 0, 1, :2] = -1.0  # 2 voxels inside, error 1
    loss = MaskedMAELoss()
    values = loss(pred, target, mask)
    torch.testing.assert_close(values, torch.tensor([(4 * 2.0 + 2 * 1.0) / 8, 0.0]))
    changed = pred.clone()
    changed[:, 0, 2:] = 100.0  # outside the mask of sample 0, all of sample 1
    torch.testing.assert_close(loss(changed, target, mask), values)
    target_outside_nan = target.clone()
    target_outside_nan[0, 0, 3] = float("nan")
    torch.testing.assert_close(loss(pred, target_outside_nan, mask), values)
    # without a mask it is the plain per-sample MAE
    torch.testing.assert_close(loss(changed, target), (changed - target).abs().flatten(1).mean(1))
    with pytest.raises(ValueError, match="mask shape"):
        loss(pred, target, mask[:, :, :2])


def test_classification_losses_match_torch_per_sample():
    gen = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(5, 4, generator=gen), torch.tensor([0, 3, 1, 1, 2])
    weight = [0.5, 1.0, 2.0, 1.5]
    values = ClassificationLoss(weight=weight)(logits, labels)
    log_probs = torch.log_softmax(logits, dim=1)
    expected = torch.tensor([-weight[y] * float(log_probs[i, y]) for i, y in enumerate(labels.tolist())])
    torch.testing.assert_close(values, expected)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        ClassificationLoss()(logits, torch.tensor([0, 4, 1, 1, 2]))

    binary_logits, targets = torch.randn(5, 1, generator=gen), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    values = BinaryClassificationLoss(pos_weight=3.0)(binary_logits, targets)
    z = binary_logits.flatten()
    expected = -(3.0 * targets * F.logsigmoid(z) + (1 - targets) * F.logsigmoid(-z))
    torch.testing.assert_close(values, expected)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BinaryClassificationLoss()(binary_logits, targets * 2)


# ---------------------------------------------------------------- weighting


def test_dwa_matches_hand_computed_weights_over_four_epochs():
    losses = [
        {"seg": 1.0, "dose": 2.0},
        {"seg": 0.8, "dose": 1.9},
        {"seg": 0.5, "dose": 1.8},
        {"seg": 0.45, "dose": 1.2},
    ]
    dwa = DynamicWeightAveraging(["seg", "dose"])
    seen = [dwa.weights()]
    for epoch_losses in losses:
        dwa.epoch_completed(epoch_losses)
        seen.append(dwa.weights())
    expected = [
        [1.0, 1.0],  # epoch 0
        [1.0, 1.0],  # epoch 1
        _dwa_weights([0.8 / 1.0, 1.9 / 2.0]),
        _dwa_weights([0.5 / 0.8, 1.8 / 1.9]),
        _dwa_weights([0.45 / 0.5, 1.2 / 1.8]),
    ]
    for got, want in zip(seen, expected):
        assert [got["seg"], got["dose"]] == pytest.approx(want, rel=1e-12)
    # a task whose loss fell faster gets the smaller weight, and the weights sum to K
    assert seen[4]["dose"] < 1.0 < seen[4]["seg"]
    assert sum(seen[3].values()) == pytest.approx(2.0)
    # spot check of one value by hand: exp(0.45) / (exp(0.45) + exp(1/3)) * 2
    assert seen[4]["seg"] == pytest.approx(2 * math.exp(0.45) / (math.exp(0.45) + math.exp(1 / 3)), rel=1e-12)


def test_dwa_temperature_and_missing_epoch_mean_rule():
    dwa = DynamicWeightAveraging(["a", "b", "c"], temperature=1.0)
    dwa.epoch_completed({"a": 2.0, "b": None, "c": 1.0})  # b unlabelled all epoch
    dwa.epoch_completed({"a": 1.0, "b": 3.0})  # c missing from the dict: also no mean
    weights = dwa.weights()
    expected = _dwa_weights([0.5, 1.0, 1.0], temperature=1.0)
    assert [weights["a"], weights["b"], weights["c"]] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="unknown tasks"):
        dwa.epoch_completed({"z": 1.0})
    with pytest.raises(ValueError, match="nan"):
        dwa.epoch_completed({"a": float("nan")})
    with pytest.raises(ValueError, match="temperature"):
        DynamicWeightAveraging(["a"], temperature=0.0)


def test_weighting_state_round_trips():
    first = DynamicWeightAveraging(["seg", "dose"])
    for epoch_losses in ({"seg": 1.0, "dose": 2.0}, {"seg": 0.7, "dose": 1.9}, {"seg": 0.6, "dose": 1.0}):
        first.epoch_completed(epoch_losses)
    restored = DynamicWeightAveraging()
    restored.load_state_dict(first.state_dict())
    assert restored.weights() == first.weights() and restored.epoch == 3
    for weighting in (first, restored):
        weighting.epoch_completed({"seg": 0.3, "dose": 0.9})
    assert restored.weights() == first.weights()
    assert restored.weights()["seg"] == pytest.approx(_dwa_weights([0.5, 0.9])[0], rel=1e-12)
    with pytest.raises(ValueError, match="weights tasks"):
        DynamicWeightAveraging(["x", "y"]).load_state_dict(first.state_dict())


def test_equal_weighting_and_factory():
    equal = make_weighting("equal", ["a", "b"])
    assert isinstance(equal, EqualWeighting)
    equal.epoch_completed({"a": 1.0, "b": 5.0})
    equal.epoch_completed({"a": 0.1, "b": 5.0})
    assert equal.weights() == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="unknown task weighting"):
        make_weighting("uncertainty", ["a"])


# ---------------------------------------------------------------- multi-task loss


def _trained_dwa_loss(weighting: str = "dwa") -> MultiTaskLoss:
    """A seg + dx loss whose DWA weights differ from 1 (two epochs recorded by hand)."""
    loss = MultiTaskLoss([SEG, DX], weighting=weighting)
    loss.weighting.epoch_completed({"seg": 1.0, "dx": 1.0})
    loss.weighting.epoch_completed({"seg": 0.5, "dx": 1.2})
    return loss


def test_batch_without_task2_labels_gives_exactly_task1_weighted_loss():
    torch.manual_seed(0)
    logits, labels = _seg_batch(6)
    head = torch.nn.Parameter(torch.randn(3, 4))
    outputs = {"seg": logits.requires_grad_(True), "dx": head * 1.0}
    batch = {"seg": labels, "dx": torch.full((3,), -1), "dx_present": torch.zeros(3)}  # -1: placeholder
    loss = _trained_dwa_loss()
    weights = loss.weights()
    assert weights["seg"] == pytest.approx(_dwa_weights([0.5, 1.2])[0], rel=1e-12)
    total = loss(outputs, batch)
    reference = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.3, lambda_ce=0.7)(logits, labels)
    torch.testing.assert_close(total, weights["seg"] * reference, rtol=1e-6, atol=1e-7)
    assert loss.last_losses["dx"] == 0.0 and loss.last_labelled == {"seg": 3, "dx": 0}
    total.backward()
    assert head.grad is not None and torch.equal(head.grad, torch.zeros_like(head))
    assert logits.grad.abs().sum() > 0


def test_task_loss_is_the_mean_over_labelled_samples_only():
    gen = torch.Generator().manual_seed(7)
    logits, labels = _seg_batch(7, batch=4)
    dx_logits = torch.randn(4, 4, generator=gen)
    dx_labels = torch.tensor([2, -1, 0, -1])  # samples 1 and 3 unlabelled
    present = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = MultiTaskLoss([SEG, DX], weighting="equal")
    total = loss({"seg": logits, "dx": dx_logits}, {"seg": labels, "dx": dx_labels, "dx_present": present})
    subset = F.cross_entropy(dx_logits[[0, 2]], dx_labels[[0, 2]])
    assert loss.last_losses["dx"] == pytest.approx(float(subset), rel=1e-6)
    seg_reference = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.3, lambda_ce=0.7)(logits, labels)
    torch.testing.assert_close(total, seg_reference + subset, rtol=1e-6, atol=1e-6)


def test_empty_dose_mask_counts_as_unlabelled():
    pred, target = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    mask = torch.zeros(2, 1, 3, 3)
    mask[0, 0, 0, 0] = 1
    pred[0, 0, 0, 0] = 3.0
    loss = MultiTaskLoss([DOSE], weighting="equal")
    total = loss({"dose": pred}, {"dose": target, "dose_mask": mask})
    assert float(total) == pytest.approx(3.0) and loss.last_labelled == {"dose": 1}


def test_epoch_means_are_weighted_by_labelled_counts_and_feed_the_weighting():
    gen = torch.Generator().manual_seed(8)
    loss = MultiTaskLoss([SEG, DX])
    values = []
    for present in (torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0])):
        logits, labels = _seg_batch(int(present.sum()) + 10)
        dx_logits, dx_labels = torch.randn(3, 4, generator=gen), torch.tensor([1, 2, 3])
        loss({"seg": logits, "dx": dx_logits}, {"seg": labels, "dx": dx_labels, "dx_present": present})
        values.append(dict(loss.last_losses))
    expected_dx = (3 * values[0]["dx"] + 1 * values[1]["dx"]) / 4
    expected_seg = (values[0]["seg"] + values[1]["seg"]) / 2
    # eval mode must not accumulate
    loss.eval()
    loss({"seg": logits, "dx": dx_logits * 10}, {"seg": labels, "dx": dx_labels})
    loss.train()
    means = loss.epoch_completed()
    assert means["dx"] == pytest.approx(expected_dx, rel=1e-12) and means["seg"] == pytest.approx(expected_seg)
    assert loss.weighting.history == [means]
    assert loss.epoch_means() == {"seg": None, "dx": None}


def test_multitask_state_round_trips_through_a_checkpoint():
    loss = _trained_dwa_loss()
    logits, labels = _seg_batch(9)
    batch = {"seg": labels, "dx": torch.tensor([0, 1, 2])}
    outputs = {"seg": logits, "dx": torch.randn(3, 4, generator=torch.Generator().manual_seed(9))}
    loss(outputs, batch)  # mid-epoch: running sums are part of the state
    buffer = io.BytesIO()
    torch.save(loss.state_dict(), buffer)
    buffer.seek(0)
    restored = MultiTaskLoss([SEG, DX])
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.weights() == loss.weights()
    assert restored.epoch_means() == loss.epoch_means()
    assert restored.epoch_completed() == loss.epoch_completed()
    assert restored.weights() == loss.weights() and restored.weighting.epoch == 3
    with pytest.raises(ValueError, match="tasks"):
        MultiTaskLoss([SEG, DOSE]).load_state_dict(loss.state_dict())


def test_multitask_loss_from_a_bundle_config():
    config = {
        "tasks": [SEG, {"name": "covid", "level": "image", "kind": "classification", "out_channels": 1}],
        "loss": {
            "_target_": "ctan_monai.losses.MultiTaskLoss",
            "tasks": "@tasks",
            "weighting": {"_target_": "ctan_monai.losses.DynamicWeightAveraging", "temperature": 3.0},
            "task_losses": {"seg": {"_target_": "ctan_monai.losses.SegmentationComboLoss", "lambda_dice": 0.5}},
        },
    }
    loss = ConfigParser(config).get_parsed_content("loss")
    assert isinstance(loss.weighting, DynamicWeightAveraging) and loss.weighting.temperature == 3.0
    assert loss.weighting.task_names == ("seg", "covid")
    assert loss.task_losses["seg"].lambda_dice == 0.5
    assert isinstance(loss.task_losses["covid"], BinaryClassificationLoss)


def test_multitask_loss_rejects_bad_batches():
    loss = MultiTaskLoss([DX])
    outputs = {"dx": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match="output has no 'dx'"):
        loss({}, {"dx": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="no label 'dx'"):
        loss(outputs, {})
    with pytest.raises(ValueError, match="only 0"):
        loss(outputs, {"dx": torch.tensor([0, 1]), "dx_present": torch.tensor([1.0, -1.0])})
    with pytest.raises(ValueError, match="unknown tasks"):
        MultiTaskLoss([DX], task_losses={"seg": SegmentationComboLoss()})
    # a batch in which no sample has the label needs no label tensor at all
    assert float(loss(outputs, {"dx_present": torch.zeros(2)})) == 0.0
