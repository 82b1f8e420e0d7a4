"""Task metrics on numpy arrays or torch tensors: Dice, dose and DVH (OpenKBP), classification, Delta vs STL.

Undefined values are NaN (kept out of means, written as ``NaN`` by ``atomic_write_json``); dict results hold
plain Python numbers so that they go straight into JSON reports.
"""

from ctan_monai.utils.lazy import lazy_exports

# Read from the source by ctan_monai.zoo (keep it a literal): submodule -> the names it exports.
_EXPORTS = {
    "classification": [
        "accuracy",
        "balanced_accuracy",
        "binary_report",
        "confusion_matrix",
        "multiclass_report",
        "per_class_recall",
        "roc_auc",
        "roc_curve_points",
    ],
    "dose": [
        "OAR_METRICS",
        "OPENKBP_TARGETS",
        "TARGET_METRICS",
        "aggregate_dose_results",
        "cumulative_dvh",
        "dvh_errors",
        "dvh_metrics",
        "dvh_score",
        "evaluate_dose",
        "masked_mae",
        "openkbp_dose_score",
        "voxels_in_volume",
    ],
    "relative": ["HIGHER_IS_BETTER", "delta_mean", "delta_task", "relative_performance"],
    "segmentation": ["aggregate_dice", "dice_per_structure", "dice_report", "mean_dice"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
