"""MONAI's ``CheckpointSaver`` with atomic writes: a checkpoint is complete or absent, never half written."""

from __future__ import annotations

from typing import Any

from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver"]


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` whose files are written to a temporary file in the same folder and renamed
    into place (Ignite's atomic ``DiskSaver``; group and others keep read permission).

    MONAI turns Ignite's atomic mode off, so a run killed while saving leaves a truncated ``checkpoint_epoch=N.pt``
    that a resume would then fail on; with this saver an interrupted save leaves the previous checkpoint as the
    latest one. Takes every argument of ``CheckpointSaver``.

    Example:
        >>> import torch
        >>> saver = AtomicCheckpointSaver("/tmp/ckpt", {"model": torch.nn.Linear(1, 1)}, save_final=True)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True  # noqa: SLF001 - Ignite's switch; MONAI hard-codes False
