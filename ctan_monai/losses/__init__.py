"""Multi-task losses: per-task losses (paper Table 1), missing-label masking and task weighting (DWA, equal)."""

from ctan_monai.losses.multitask import MultiTaskLoss
from ctan_monai.losses.task_losses import (
    VALIDATE_INPUTS_ENV,
    BinaryClassificationLoss,
    ClassificationLoss,
    MaskedMAELoss,
    SegmentationComboLoss,
    default_task_loss,
    validation_enabled,
)
from ctan_monai.losses.weighting import DynamicWeightAveraging, EqualWeighting, TaskWeighting, make_weighting

__all__ = [
    "VALIDATE_INPUTS_ENV",
    "BinaryClassificationLoss",
    "ClassificationLoss",
    "DynamicWeightAveraging",
    "EqualWeighting",
    "MaskedMAELoss",
    "MultiTaskLoss",
    "SegmentationComboLoss",
    "TaskWeighting",
    "default_task_loss",
    "make_weighting",
    "validation_enabled",
]
