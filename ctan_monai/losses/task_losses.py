"""Per-task losses (paper Table 1), each returning one loss value per sample so that missing labels can be masked.

Every loss here maps ``(input, target, ...)`` to a ``[B]`` tensor: the multi-task loss averages it over the samples
that carry the task's label only. Losses are evaluated in float32 whatever the input precision (mixed precision
logits would otherwise lose the small differences that cross-entropy and Dice depend on).

Shapes are always checked (free: shapes live on the host). The checks of *values* (class indices in range, 0/1
flags, finite targets, non-negative masks) read the tensors on the host, a device synchronisation on a GPU, so they
run only when :func:`validation_enabled` says so: by default outside a training step (no gradient recorded for the
prediction: tests, evaluation, interactive use), never inside one, where the data path has already validated the
labels (``AxialSliceDataset`` checks label values, class flags and doses when it reads a case; the HAM10000 and
STOIC readers check the diagnosis and label columns). ``validate_inputs=True`` on a loss, or the environment
variable ``CTAN_MONAI_VALIDATE_INPUTS=1``, turns the checks on in training too (debugging a new data source).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import nn

from ctan_monai.tasks import TaskSpec

__all__ = [
    "VALIDATE_INPUTS_ENV",
    "BinaryClassificationLoss",
    "ClassificationLoss",
    "MaskedMAELoss",
    "SegmentationComboLoss",
    "default_task_loss",
    "validation_enabled",
]

VALIDATE_INPUTS_ENV = "CTAN_MONAI_VALIDATE_INPUTS"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def validation_enabled(setting: bool | None, *predictions: torch.Tensor) -> bool:
    """Whether a loss call checks the values of its inputs (which reads them on the host: a GPU sync).

    Args:
        setting: the loss's ``validate_inputs``: True or False decide; None (the default) is automatic: the
            environment variable ``CTAN_MONAI_VALIDATE_INPUTS`` when it is set (``1``/``true``/``yes``/``on`` or
            ``0``/``false``/``no``/``off``), else True unless the call records gradients for one of
            ``predictions`` (a training step, kept free of host-device synchronisation).
        predictions: the network outputs the loss is called with.

    Returns:
        True when the values are to be checked.

    Raises:
        ValueError: when the environment variable holds something else.

    Example:
        >>> validation_enabled(None, torch.zeros(2))  # no gradient recorded: checked
        True
        >>> validation_enabled(None, torch.zeros(2, requires_grad=True))  # a training step: not checked
        False
    """
    if setting is not None:
        return bool(setting)
    env = os.environ.get(VALIDATE_INPUTS_ENV, "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    if env:
        raise ValueError(f"{VALIDATE_INPUTS_ENV}={env!r}: use one of {_TRUE + _FALSE}")
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in predictions))


def _check_batch(input: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if target.shape[0] != input.shape[0]:
        raise ValueError(f"{what}: target batch size {target.shape[0]} differs from input batch size {input.shape[0]}")


def _check_class_indices(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() == 0:
        return
    if torch.is_floating_point(labels) and not torch.equal(labels, labels.round()):
        raise ValueError(f"{what}: labels must be integer class indices, got non-integer values")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{what}: labels must lie in [0, {num_classes - 1}], got values in [{low}, {high}]")


class SegmentationComboLoss(nn.Module):
    """Combo loss ``lambda_dice * Dice + lambda_ce * cross-entropy`` on softmax logits, one value per sample.

    With every class annotated this is MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` with the same
    ``lambda_dice``, ``lambda_ce``, ``include_background`` and smoothing, averaged per sample instead of over the
    batch (the batch mean of the returned vector equals ``DiceCELoss``).

    Partially annotated samples (``class_present``) use the marginal approach: in a sample where class ``c`` is
    not annotated, its voxels are labelled background, so the network must not be taught "background" there.
    For that sample the probabilities of the unannotated classes are merged into background: the cross-entropy
    uses ``log(p_background + sum_unannotated p_c)`` (a log-sum-exp of those log-probabilities) for background
    voxels, and the Dice leaves the unannotated classes out, its background term using the merged probability.
    Predicting an unannotated class where the label says background therefore costs nothing.

    Args:
        lambda_dice: weight of the Dice term (paper: 0.3).
        lambda_ce: weight of the cross-entropy term (paper: 0.7).
        include_background: whether the Dice term includes the background class (MONAI's default, True).
        smooth_nr: Dice numerator smoothing (MONAI's default).
        smooth_dr: Dice denominator smoothing (MONAI's default).
        batch: compute the Dice term over the whole batch (per class, over the samples that annotate it) instead of
            per sample, as MONAI's ``DiceLoss(batch=True)`` and nnU-Net's batch Dice; each sample's returned value
            then carries the batch Dice, so the batch mean is ``lambda_ce * CE + lambda_dice * batch Dice``. Small
            structures learn much faster: a slice without the structure contributes its false positives instead of
            a constant, gradient-free per-sample Dice of 1.
        validate_inputs: check label values and ``class_present`` flags on every call (True), never (False) or
            outside training steps only (None, the default; see :func:`validation_enabled`).

    Raises:
        ValueError: when a weight is negative.

    Example:
        >>> loss = SegmentationComboLoss()
        >>> loss(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.long)).shape
        torch.Size([2])
    """

    def __init__(
        self,
        lambda_dice: float = 0.3,
        lambda_ce: float = 0.7,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        validate_inputs: bool | None = None,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice} and {lambda_ce}")
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.include_background = include_background
        self.batch = bool(batch)
        self.validate_inputs = validate_inputs
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)
        # probabilities are given to it already merged, one-hot targets: Dice per sample and class
        self.dice = DiceLoss(
            include_background=True, reduction="none", smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=False
        )

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        class_present: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the per-sample combo loss.

        Args:
            input: logits ``[B, C, *spatial]`` (C classes, background first).
            target: integer label map ``[B, 1, *spatial]``.
            class_present: optional 0/1 ``[B, C]``; 0 where the class is not annotated in that sample. Background
                (column 0) must be 1.
            sample_weight: optional 0/1 ``[B]``, the samples that count (the multi-task loss passes the labelled
                ones). Only the batch Dice (``batch=True``) uses it: a sample of weight 0 takes no part in it. Every
                other term is per sample and does not depend on it.

        Returns:
            the loss of each sample, ``[B]``.

        Raises:
            ValueError: on mismatched shapes, and (when validating, see ``validate_inputs``) labels outside
                ``[0, C-1]`` or a ``class_present`` that is not 0/1 with background 1.
        """
        what = "segmentation loss"
        if input.ndim < 3 or target.ndim != input.ndim or target.shape[1] != 1:
            raise ValueError(
                f"{what}: expected logits [B, C, *spatial] and labels [B, 1, *spatial], "
                f"got {tuple(input.shape)} and {tuple(target.shape)}"
            )
        _check_batch(input, target, what)
        if target.shape[2:] != input.shape[2:]:
            raise ValueError(f"{what}: label spatial shape {tuple(target.shape[2:])} != {tuple(input.shape[2:])}")
        num_classes = input.shape[1]
        validate = validation_enabled(self.validate_inputs, input)
        if validate:
            _check_class_indices(target, num_classes, what)
        present = self._present(class_present, input, validate)
        if sample_weight is not None and tuple(sample_weight.shape) != (input.shape[0],):
            raise ValueError(
                f"{what}: sample_weight must be [B] = [{input.shape[0]}], got {tuple(sample_weight.shape)}"
            )

        labels = target.long()
        # an unannotated class's voxels are background by convention; map stray ones there too
        labels = torch.where(torch.gather(present, 1, labels.flatten(1)).view_as(labels) > 0, labels, 0)
        log_probs = F.log_softmax(input.float(), dim=1)
        # per sample, the classes whose probability is merged into background: background and the unannotated
        merged = present == 0
        merged[:, 0] = True
        merged = merged.view(*merged.shape, *([1] * (input.ndim - 2)))
        log_background = torch.logsumexp(log_probs.masked_fill(~merged, float("-inf")), dim=1, keepdim=True)
        log_probs = torch.cat([log_background, log_probs[:, 1:]], dim=1)
        ce = -torch.gather(log_probs, 1, labels).flatten(1).mean(dim=1)

        # merged probabilities: unannotated classes zeroed, their mass moved into background
        probs = log_probs.exp() * torch.cat([torch.ones_like(merged[:, :1]), ~merged[:, 1:]], dim=1)
        reference = one_hot(labels, num_classes=num_classes, dtype=probs.dtype)
        dice_mask = present.float()
        if not self.include_background:
            dice_mask[:, 0] = 0.0
        if self.batch:
            batch_mask = dice_mask if sample_weight is None else dice_mask * sample_weight.to(dice_mask).unsqueeze(1)
            return self.lambda_dice * self._batch_dice(probs, reference, batch_mask) + self.lambda_ce * ce
        per_class = self.dice(probs, reference).flatten(1)
        dice = (per_class * dice_mask).sum(dim=1) / dice_mask.sum(dim=1).clamp(min=1.0)
        return self.lambda_dice * dice + self.lambda_ce * ce

    def _batch_dice(self, probs: torch.Tensor, reference: torch.Tensor, dice_mask: torch.Tensor) -> torch.Tensor:
        """Batch Dice loss per class over the samples where the class counts, averaged over the classes that count
        in any sample, broadcast to ``[B]``."""
        weight = dice_mask.view(*dice_mask.shape, *([1] * (probs.ndim - 2)))
        dims = [0, *range(2, probs.ndim)]
        intersection = (probs * reference * weight).sum(dim=dims)
        denominator = ((probs + reference) * weight).sum(dim=dims)
        per_class = 1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        counted = (dice_mask.sum(dim=0) > 0).float()
        dice = (per_class * counted).sum() / counted.sum().clamp(min=1.0)
        return dice.expand(probs.shape[0])

    @staticmethod
    def _present(class_present: torch.Tensor | None, input: torch.Tensor, validate: bool) -> torch.Tensor:
        batch, num_classes = input.shape[:2]
        if class_present is None:
            return torch.ones(batch, num_classes, dtype=torch.long, device=input.device)
        if tuple(class_present.shape) != (batch, num_classes):
            raise ValueError(
                f"segmentation loss: class_present must be [B, C] = {(batch, num_classes)}, "
                f"got {tuple(class_present.shape)}"
            )
        if validate:
            if not bool(((class_present == 0) | (class_present == 1)).all()):
                raise ValueError("segmentation loss: class_present must hold only 0 and 1")
            if not bool((class_present[:, 0] == 1).all()):
                raise ValueError("segmentation loss: class_present[:, 0] (background) must be 1 for every sample")
        return class_present.to(device=input.device, dtype=torch.long)


class MaskedMAELoss(nn.Module):
    """Mean absolute error per sample, over the voxels of a mask when one is given (dose loss, paper Table 1).

    With a mask the loss of a sample is ``sum(mask * |input - target|) / sum(mask)`` (a 0-1 float mask acts as voxel
    weights); a sample whose mask is empty gets 0 (the multi-task loss counts it as unlabelled).

    Args:
        validate_inputs: check the mask (non-negative) and the target (finite where it counts) on every call
            (True), never (False) or outside training steps only (None, the default; see
            :func:`validation_enabled`).

    Example:
        >>> MaskedMAELoss()(torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)).tolist()
        [1.0, 1.0]
    """

    def __init__(self, validate_inputs: bool | None = None) -> None:
        super().__init__()
        self.validate_inputs = validate_inputs

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the per-sample (masked) mean absolute error.

        Args:
            input: prediction ``[B, 1, *spatial]``.
            target: reference ``[B, 1, *spatial]``.
            mask: optional region ``[B, 1, *spatial]`` (0/1 or weights in [0, 1]) where the error counts.

        Returns:
            the loss of each sample, ``[B]``.

        Raises:
            ValueError: on mismatched shapes, and (when validating, see ``validate_inputs``) a negative mask or a
                non-finite target inside the mask.
        """
        what = "regression loss"
        if input.ndim < 2 or target.shape != input.shape:
            raise ValueError(f"{what}: target shape {tuple(target.shape)} != prediction shape {tuple(input.shape)}")
        validate = validation_enabled(self.validate_inputs, input)
        error = (input.float() - target.float()).abs()
        if mask is None:
            if validate and not bool(torch.isfinite(target).all()):
                raise ValueError(f"{what}: the target holds NaN or infinite values")
            return error.flatten(1).mean(dim=1)
        if mask.shape != input.shape:
            raise ValueError(f"{what}: mask shape {tuple(mask.shape)} != prediction shape {tuple(input.shape)}")
        weight = mask.float()
        if validate:
            if bool((weight < 0).any()):
                raise ValueError(f"{what}: the mask holds negative values")
            if not bool(torch.isfinite(target[weight > 0]).all()):
                raise ValueError(f"{what}: the target holds NaN or infinite values inside the mask")
        # where() rather than a product: a non-finite target outside the mask must not leak in as 0 * inf
        weighted = torch.where(weight > 0, error * weight, torch.zeros_like(error)).flatten(1).sum(dim=1)
        return weighted / weight.flatten(1).sum(dim=1).clamp(min=torch.finfo(torch.float32).tiny)


class ClassificationLoss(nn.Module):
    """Cross-entropy per sample for multi-class logits ``[B, C]`` against class indices ``[B]``.

    Args:
        weight: optional class weights ``[C]`` for class imbalance (e.g. inverse class frequencies). Each sample's
            loss is multiplied by the weight of its class; the multi-task loss then averages over labelled samples
            (a plain mean, unlike ``torch.nn.CrossEntropyLoss``'s weight-normalised mean), so weights averaging
            about 1 keep the loss scale.
        label_smoothing: as ``torch.nn.functional.cross_entropy``.
        validate_inputs: check that the targets are class indices in range on every call (True), never (False) or
            outside training steps only (None, the default; see :func:`validation_enabled`).

    Raises:
        ValueError: when a weight is negative.

    Example:
        >>> ClassificationLoss()(torch.zeros(2, 4), torch.tensor([0, 3])).shape
        torch.Size([2])
    """

    weight: torch.Tensor | None

    def __init__(
        self,
        weight: Sequence[float] | torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        validate_inputs: bool | None = None,
    ) -> None:
        super().__init__()
        tensor = None if weight is None else torch.as_tensor(weight, dtype=torch.float32).flatten()
        if tensor is not None and bool((tensor < 0).any()):
            raise ValueError(f"class weights must be >= 0, got {tensor.tolist()}")
        # not persistent: class weights come from the config, a checkpoint must not override them
        self.register_buffer("weight", tensor, persistent=False)
        self.label_smoothing = float(label_smoothing)
        self.validate_inputs = validate_inputs

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the per-sample cross-entropy.

        Args:
            input: logits ``[B, C]``.
            target: class indices ``[B]`` (or ``[B, 1]``).

        Returns:
            the loss of each sample, ``[B]``.

        Raises:
            ValueError: on mismatched shapes or a class-weight length != C, and (when validating, see
                ``validate_inputs``) class indices outside ``[0, C-1]``.
        """
        what = "classification loss"
        if input.ndim != 2:
            raise ValueError(f"{what}: expected logits [B, C], got {tuple(input.shape)}")
        target = target.reshape(target.shape[0], -1) if target.ndim > 1 else target
        if target.ndim > 1 and target.shape[1] != 1:
            raise ValueError(f"{what}: expected class indices [B], got {tuple(target.shape)}")
        target = target.reshape(-1)
        _check_batch(input, target, what)
        if validation_enabled(self.validate_inputs, input):
            _check_class_indices(target, input.shape[1], what)
        if self.weight is not None and self.weight.numel() != input.shape[1]:
            raise ValueError(f"{what}: {self.weight.numel()} class weights for {input.shape[1]} classes")
        return F.cross_entropy(
            input.float(), target.long(), weight=self.weight, reduction="none", label_smoothing=self.label_smoothing
        )


class BinaryClassificationLoss(nn.Module):
    """Binary cross-entropy with logits per sample, for a one-logit task ``[B, 1]`` against 0/1 targets.

    Args:
        pos_weight: optional weight of the positive class (e.g. ``n_negative / n_positive`` for imbalance), as
            ``torch.nn.BCEWithLogitsLoss``.
        validate_inputs: check that the targets lie in [0, 1] on every call (True), never (False) or outside
            training steps only (None, the default; see :func:`validation_enabled`).

    Raises:
        ValueError: when ``pos_weight`` is negative.

    Example:
        >>> BinaryClassificationLoss()(torch.zeros(2, 1), torch.tensor([0.0, 1.0])).shape
        torch.Size([2])
    """

    pos_weight: torch.Tensor | None

    def __init__(self, pos_weight: float | None = None, validate_inputs: bool | None = None) -> None:
        super().__init__()
        if pos_weight is not None and pos_weight < 0:
            raise ValueError(f"pos_weight must be >= 0, got {pos_weight}")
        tensor = None if pos_weight is None else torch.tensor([float(pos_weight)])
        self.register_buffer("pos_weight", tensor, persistent=False)
        self.validate_inputs = validate_inputs

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the per-sample binary cross-entropy.

        Args:
            input: logits ``[B, 1]`` (or ``[B]``).
            target: 0/1 targets ``[B]`` or ``[B, 1]`` (soft targets in [0, 1] are accepted).

        Returns:
            the loss of each sample, ``[B]``.

        Raises:
            ValueError: on mismatched shapes, and (when validating, see ``validate_inputs``) targets outside [0, 1].
        """
        what = "binary classification loss"
        if input.numel() != input.shape[0] or target.numel() != target.shape[0]:
            raise ValueError(
                f"{what}: expected one logit and one target per sample, got "
                f"{tuple(input.shape)} and {tuple(target.shape)}"
            )
        _check_batch(input, target, what)
        target = target.reshape(-1).float()
        validate = validation_enabled(self.validate_inputs, input)
        if validate and target.numel() and not bool(((target >= 0) & (target <= 1)).all()):
            raise ValueError(
                f"{what}: targets must lie in [0, 1], got values in [{float(target.min())}, {float(target.max())}]"
            )
        return F.binary_cross_entropy_with_logits(
            input.reshape(-1).float(), target, pos_weight=self.pos_weight, reduction="none"
        )


def default_task_loss(task: TaskSpec, validate_inputs: bool | None = None) -> nn.Module:
    """The paper's loss for a task (Table 1): combo loss, MAE or (binary) cross-entropy.

    Args:
        task: the task.
        validate_inputs: the loss's ``validate_inputs`` (see :func:`validation_enabled`).

    Returns:
        ``SegmentationComboLoss()``, ``MaskedMAELoss()``, ``BinaryClassificationLoss()`` (one channel) or
        ``ClassificationLoss()``.

    Example:
        >>> type(default_task_loss(TaskSpec("dose", "pixel", "regression", 1))).__name__
        'MaskedMAELoss'
    """
    if task.kind == "segmentation":
        return SegmentationComboLoss(validate_inputs=validate_inputs)
    if task.kind == "regression":
        return MaskedMAELoss(validate_inputs=validate_inputs)
    if task.is_binary:
        return BinaryClassificationLoss(validate_inputs=validate_inputs)
    return ClassificationLoss(validate_inputs=validate_inputs)
