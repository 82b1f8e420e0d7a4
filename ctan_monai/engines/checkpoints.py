"""MONAI's ``CheckpointSaver`` with atomic writes: a checkpoint is complete or absent, never half written."""

from __future__ import annotations

from typing import Any

from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver", "BestModelSaver"]


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


class BestModelSaver(AtomicCheckpointSaver):
    """Keep the weights of the best validated epoch as one file (the model zoo's ``models/model.pt``), chosen by a
    key metric of the evaluator, written atomically.

    Attach it to the evaluator, after the handler that sets ``key_metric_name``. Its record of the best score so far
    is checkpointable: put the saver itself in the trainer's checkpoint objects (``state_dict`` /
    ``load_state_dict``), so that a resumed run replaces ``model.pt`` only with a better epoch than any before it.

    Args:
        save_dir: the model folder.
        save_dict: what the file holds, e.g. ``{"model": network}``.
        key_metric_name: the metric in ``engine.state.metrics`` that ranks epochs (higher is better unless
            ``lower_is_better``).
        filename: the file name of the best model.
        lower_is_better: rank by the negated metric.

    Example:
        >>> import torch
        >>> saver = BestModelSaver("/tmp/models", {"model": torch.nn.Linear(1, 1)}, "val_key_metric")
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        key_metric_name: str = "val_key_metric",
        filename: str = "model.pt",
        lower_is_better: bool = False,
    ) -> None:
        super().__init__(
            save_dir=save_dir,
            save_dict=save_dict,
            save_key_metric=True,
            key_metric_name=key_metric_name,
            key_metric_filename=filename,
            key_metric_negative_sign=lower_is_better,
        )
        self.key_metric_name = key_metric_name

    def metrics_completed(self, engine: Any) -> None:
        """Save when the key metric is there and better than every earlier epoch's (a run without it: nothing)."""
        if self.key_metric_name not in engine.state.metrics:
            return
        super().metrics_completed(engine)

    def state_dict(self) -> dict[str, Any]:
        """The best score so far and its file (Ignite ``Checkpoint`` state)."""
        return self._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best score so far, e.g. when resuming."""
        self._key_metric_checkpoint.load_state_dict(state_dict)
