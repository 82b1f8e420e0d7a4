"""Task metrics on numpy arrays or torch tensors: Dice, dose and DVH (OpenKBP), classification, Delta vs STL.

Undefined values are NaN (kept out of means, written as ``NaN`` by ``atomic_write_json``); dict results hold
plain Python numbers so that they go straight into JSON reports.
"""

from ctan_monai.metrics.classification import (
    accuracy,
    balanced_accuracy,
    binary_report,
    confusion_matrix,
    multiclass_report,
    per_class_recall,
    roc_auc,
    roc_curve_points,
)
from ctan_monai.metrics.dose import (
    OAR_METRICS,
    OPENKBP_TARGETS,
    TARGET_METRICS,
    aggregate_dose_results,
    cumulative_dvh,
    dvh_errors,
    dvh_metrics,
    dvh_score,
    evaluate_dose,
    masked_mae,
    openkbp_dose_score,
    voxels_in_volume,
)
from ctan_monai.metrics.relative import HIGHER_IS_BETTER, delta_mean, delta_task, relative_performance
from ctan_monai.metrics.segmentation import aggregate_dice, dice_per_structure, dice_report, mean_dice

__all__ = [
    "HIGHER_IS_BETTER",
    "OAR_METRICS",
    "OPENKBP_TARGETS",
    "TARGET_METRICS",
    "accuracy",
    "aggregate_dice",
    "aggregate_dose_results",
    "balanced_accuracy",
    "binary_report",
    "confusion_matrix",
    "cumulative_dvh",
    "delta_mean",
    "delta_task",
    "dice_per_structure",
    "dice_report",
    "dvh_errors",
    "dvh_metrics",
    "dvh_score",
    "evaluate_dose",
    "masked_mae",
    "mean_dice",
    "multiclass_report",
    "openkbp_dose_score",
    "per_class_recall",
    "relative_performance",
    "roc_auc",
    "roc_curve_points",
    "voxels_in_volume",
]
