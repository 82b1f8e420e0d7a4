"""Engine pieces for multi-task bundles: batch preparation, mixed precision, handlers, evaluation (whole volumes,
images, patients), trivial floors from the training split, figures."""

from ctan_monai.engines.base import RunCollectorHandler, csv_text, figures_never_fail, write_csv, write_report
from ctan_monai.engines.checkpoints import (
    AtomicCheckpointSaver,
    BestModelFallback,
    BestModelSaver,
    CheckpointDirLockedError,
    CheckpointMismatchError,
    checkpoint_problem,
    lock_checkpoint_dir,
    release_checkpoint_dir,
)
from ctan_monai.engines.evaluation import CaseReference, VolumeEvaluationHandler, openkbp_dvh_structures
from ctan_monai.engines.floors import VolumeFloor
from ctan_monai.engines.handlers import (
    KeyMetricHandler,
    MetricsHistoryHandler,
    ProgressBarHandler,
    ResumeFromLatestCheckpoint,
    TaskWeightingHandler,
    TerminateOnNaNHandler,
    ValidateHandler,
    latest_checkpoint,
)
from ctan_monai.engines.image_evaluation import ImageEvaluationHandler
from ctan_monai.engines.image_floors import (
    ClassificationFloor,
    ImageFloor,
    MaskFloor,
    PrevalenceFloor,
    compare_with_floor,
)
from ctan_monai.engines.patient_classification import PatientClassificationHandler
from ctan_monai.engines.precision import AutocastInferer, MixedPrecision, place_network
from ctan_monai.engines.prepare_batch import MultiTaskPrepareBatch
from ctan_monai.engines.schedules import WarmupCosineSchedule, build_lr_schedule
from ctan_monai.engines.summary import TrainingSummaryHandler, summary_table

__all__ = [
    "AtomicCheckpointSaver",
    "AutocastInferer",
    "BestModelFallback",
    "BestModelSaver",
    "CheckpointDirLockedError",
    "CheckpointMismatchError",
    "checkpoint_problem",
    "lock_checkpoint_dir",
    "release_checkpoint_dir",
    "CaseReference",
    "ClassificationFloor",
    "ImageEvaluationHandler",
    "KeyMetricHandler",
    "ImageFloor",
    "MaskFloor",
    "MetricsHistoryHandler",
    "MixedPrecision",
    "MultiTaskPrepareBatch",
    "PatientClassificationHandler",
    "PrevalenceFloor",
    "ProgressBarHandler",
    "ResumeFromLatestCheckpoint",
    "RunCollectorHandler",
    "TaskWeightingHandler",
    "TerminateOnNaNHandler",
    "TrainingSummaryHandler",
    "ValidateHandler",
    "VolumeEvaluationHandler",
    "VolumeFloor",
    "WarmupCosineSchedule",
    "build_lr_schedule",
    "compare_with_floor",
    "csv_text",
    "figures_never_fail",
    "latest_checkpoint",
    "openkbp_dvh_structures",
    "place_network",
    "summary_table",
    "write_csv",
    "write_report",
]
