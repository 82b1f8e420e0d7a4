"""Engine pieces for multi-task bundles: batch preparation, mixed precision, handlers, evaluation (whole volumes,
images, patients), trivial floors from the training split, figures."""

from ctan_monai.utils.lazy import lazy_exports

# Read from the source by ctan_monai.zoo (keep it a literal): submodule -> the names it exports.
_EXPORTS = {
    "base": ["RunCollectorHandler", "csv_text", "figures_never_fail", "write_csv", "write_report"],
    "checkpoints": [
        "AtomicCheckpointSaver",
        "BestModelFallback",
        "BestModelSaver",
        "CheckpointDirLockedError",
        "CheckpointMismatchError",
        "checkpoint_problem",
        "lock_checkpoint_dir",
        "release_checkpoint_dir",
    ],
    "evaluation": ["CaseReference", "VolumeEvaluationHandler"],
    "floors": ["VolumeFloor"],
    "handlers": [
        "KeyMetricHandler",
        "MetricsHistoryHandler",
        "ProgressBarHandler",
        "ResumeFromLatestCheckpoint",
        "TaskWeightingHandler",
        "TerminateOnNaNHandler",
        "ValidateHandler",
        "latest_checkpoint",
    ],
    "image_evaluation": ["ImageEvaluationHandler"],
    "image_floors": ["ClassificationFloor", "ImageFloor", "MaskFloor", "PrevalenceFloor", "compare_with_floor"],
    "patient_classification": ["PatientClassificationHandler"],
    "precision": ["AutocastInferer", "MixedPrecision", "place_network"],
    "prepare_batch": ["MultiTaskPrepareBatch"],
    "schedules": ["WarmupCosineSchedule", "build_lr_schedule"],
    "summary": ["TrainingSummaryHandler", "summary_table"],
    "tracking": ["adapt_tracking_handlers", "collated_loss"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
