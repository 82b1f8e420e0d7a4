"""Engine pieces for multi-task bundles: batch preparation, handlers, whole-volume evaluation, figures."""

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
from ctan_monai.engines.prepare_batch import MultiTaskPrepareBatch

__all__ = [
    "AtomicCheckpointSaver",
    "MetricsHistoryHandler",
    "MultiTaskPrepareBatch",
    "ProgressBarHandler",
    "ResumeFromLatestCheckpoint",
    "TaskWeightingHandler",
    "TerminateOnNaNHandler",
    "VolumeEvaluationHandler",
    "latest_checkpoint",
    "openkbp_dvh_structures",
]
