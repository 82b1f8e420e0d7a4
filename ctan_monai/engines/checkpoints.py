"""MONAI's ``CheckpointSaver`` with atomic writes: a checkpoint is complete or absent, never half written; the best
validated model kept as one file, with a fallback to the last weights for a run that never had a key metric."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver", "BestModelFallback", "BestModelSaver", "SKIP_MODEL_SELECTION"]

# an evaluator run whose ``engine.state`` has this attribute set True is not a candidate for the best model (e.g. the
# training summary's evaluation of the untrained network, before the first epoch)
SKIP_MODEL_SELECTION = "skip_model_selection"


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

    Attach it to the evaluator, after the handler that sets ``key_metric_name``. An epoch replaces the file only when
    its key metric is strictly better than every earlier epoch's; an evaluation without the key metric (missing or
    not finite: ``KeyMetricHandler`` leaves it unset) is no candidate, nor is one whose ``engine.state`` has
    ``SKIP_MODEL_SELECTION`` set (the untrained network that ``TrainingSummaryHandler`` evaluates before training).
    Its record of the best score so far is checkpointable: put the saver itself in the trainer's checkpoint objects
    (``state_dict`` / ``load_state_dict``), so that a resumed run replaces ``model.pt`` only with a better epoch than
    any before it.

    A run in which no epoch had a key metric would end without the file: ``BestModelFallback`` on the trainer then
    writes the last weights in its place (``save_fallback``), with a warning.

    Args:
        save_dir: the model folder.
        save_dict: what the file holds, e.g. ``{"model": network}`` (one entry: the file is its bare ``state_dict``).
        key_metric_name: the metric in ``engine.state.metrics`` that ranks epochs (higher is better unless
            ``lower_is_better``).
        filename: the file name of the best model.
        lower_is_better: rank by the negated metric.

    Example:
        >>> import torch
        >>> saver = BestModelSaver("/tmp/models", {"model": torch.nn.Linear(1, 1)}, "val_key_metric")
        >>> saver.has_best()
        False
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
        self.filename = filename
        self.fallback_logger = logging.getLogger("ctan_monai.best_model")

    @property
    def path(self) -> Path:
        """The best model's file."""
        return Path(self.save_dir) / self.filename

    def metrics_completed(self, engine: Engine) -> None:
        """Save when the key metric is there and better than every earlier epoch's (a run without it: nothing)."""
        if getattr(engine.state, SKIP_MODEL_SELECTION, False):
            return
        value = engine.state.metrics.get(self.key_metric_name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        super().metrics_completed(engine)

    def has_best(self) -> bool:
        """Whether an epoch was selected (in this run or, once resumed, an earlier one) and its file is there."""
        return bool(self._key_metric_checkpoint._saved) and self.path.is_file()  # noqa: SLF001 - Ignite's record

    def best_score(self) -> float | None:
        """The best key metric so far (as ranked: negated when ``lower_is_better``), or None."""
        saved = self._key_metric_checkpoint._saved  # noqa: SLF001
        return float(saved[-1].priority) if saved else None

    def save_fallback(self, engine: Engine | None = None) -> bool:
        """Write the current weights as the best file when no epoch was ever selected, with a warning.

        The file is not recorded as a selection: a later (resumed) epoch with a key metric replaces it. Weights that
        are not finite (a diverged run) are not written.

        Args:
            engine: the trainer (for the log message's epoch); optional.

        Returns:
            True when the file was written.
        """
        if self.has_best():
            return False
        state = {name: _unwrapped(obj).state_dict() for name, obj in self.save_dict.items()}
        tensors = [t for s in state.values() if isinstance(s, dict) for t in s.values() if torch.is_tensor(t)]
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
            self.fallback_logger.warning("no best model and the last weights are not finite: %s not written", self.path)
            return False
        epoch = getattr(getattr(engine, "state", None), "epoch", None)
        self.fallback_logger.warning(
            "no validated epoch had a finite key metric %r: %s holds the LAST weights (epoch %s), not a selected model",
            self.key_metric_name,
            self.path,
            epoch,
        )
        # as Ignite's Checkpoint writes it: one object is saved as its bare state_dict
        checkpoint: Any = next(iter(state.values())) if len(state) == 1 else state
        self._key_metric_checkpoint.save_handler(checkpoint, self.filename)  # noqa: SLF001 - the atomic saver
        return True

    def state_dict(self) -> dict[str, Any]:
        """The best score so far and its file (Ignite ``Checkpoint`` state)."""
        return self._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best score so far, e.g. when resuming."""
        self._key_metric_checkpoint.load_state_dict(state_dict)


def _unwrapped(obj: Any) -> Any:
    """The module inside a (Distributed)DataParallel wrapper, as Ignite's ``Checkpoint`` saves it."""
    if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return obj.module
    return obj


class BestModelFallback:
    """On the trainer's ``COMPLETED``: when no validated epoch was selected by ``saver`` (no finite key metric in the
    whole run, e.g. an AUC undefined on a tiny validation split), write the last weights as its best file, with a
    warning, so that every finished run leaves ``models/model.pt`` (``BestModelSaver.save_fallback``).

    Attach it to the trainer, after the handlers that validate (a run that ends validated has ranked its last epoch
    first). With distributed training, attach it on the rank that validates only.

    Args:
        saver: the evaluator's ``BestModelSaver``.

    Example:
        >>> import torch
        >>> saver = BestModelSaver("/tmp/models", {"model": torch.nn.Linear(1, 1)})
        >>> fallback = BestModelFallback(saver)
    """

    def __init__(self, saver: BestModelSaver) -> None:
        self.saver = saver

    def attach(self, engine: Engine) -> None:
        """Register on the trainer's ``COMPLETED``."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.saver.save_fallback(engine)
