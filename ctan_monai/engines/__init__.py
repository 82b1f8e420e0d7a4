"""Engine pieces for multi-task bundles: batch preparation, handlers, evaluation (whole volumes, images, patients),
figures."""

from ctan_monai.engines.base import RunCollectorHandler, csv_text, figures_never_fail, write_csv, write_report
from ctan_monai.engines.checkpoints import AtomicCheckpointSaver
from ctan_monai.engines.evaluation import VolumeEvaluationHandler, openkbp_dvh_structures
from ctan_monai.engines.handlers import (
    MetricsHistoryHandler,
    ProgressBarHandler,
    ResumeFromLatestCheckpoint,
    TaskWeightingHandler,
    TerminateOnNaNHandler,
    latest_checkpoint,
)
from ctan_monai.engines.image_evaluation import ImageEvaluationHandler
from ctan_monai.engines.patient_classification import PatientClassificationHandler
from ctan_monai.engines.prepare_batch import MultiTaskPrepareBatch

__all__ = [
    "AtomicCheckpointSaver",
    "ImageEvaluationHandler",
    "MetricsHistoryHandler",
    "MultiTaskPrepareBatch",
    "PatientClassificationHandler",
    "ProgressBarHandler",
    "ResumeFromLatestCheckpoint",
    "RunCollectorHandler",
    "TaskWeightingHandler",
    "TerminateOnNaNHandler",
    "VolumeEvaluationHandler",
    "csv_text",
    "figures_never_fail",
    "latest_checkpoint",
    "openkbp_dvh_structures",
    "write_csv",
    "write_report",
]
