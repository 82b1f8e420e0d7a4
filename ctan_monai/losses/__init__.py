"""Multi-task losses: per-task losses (paper Table 1), missing-label masking and task weighting (DWA, equal)."""

from ctan_monai.losses.multitask import MultiTaskLoss
from ctan_monai.losses.task_losses import (
    BinaryClassificationLoss,
    ClassificationLoss,
    MaskedMAELoss,
    SegmentationComboLoss,
    default_task_loss,
)
from ctan_monai.losses.weighting import DynamicWeightAveraging, EqualWeighting, TaskWeighting, make_weighting

__all__ = [
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
]
