"""Ignite handlers for multi-task training: task weighting at epoch end, resuming from the latest checkpoint."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from ctan_monai.engines.checkpoints import (
    LOCK_FILENAME,
    CheckpointMismatchError,
    checkpoint_problem,
    lock_checkpoint_dir,
    release_checkpoint_dir,
    remove_orphan_files,
)
from ctan_monai.losses import MultiTaskLoss

__all__ = [
    "KeyMetricHandler",
    "MetricsHistoryHandler",
    "ProgressBarHandler",
    "ResumeFromLatestCheckpoint",
    "TaskWeightingHandler",
    "TerminateOnNaNHandler",
    "ValidateHandler",
    "latest_checkpoint",
]

_EPOCH_RE = re.compile(r"^(?!\.).*checkpoint_epoch=(\d+)\.pt$")  # not the hidden temporary files of a save


class TaskWeightingHandler:
    """At the end of each training epoch: publish the per-task epoch-mean losses and the task weights in
    ``engine.state.metrics`` (so StatsHandler and TensorBoard show them), then let the loss update its weighting
    (DWA) for the next epoch. Attach it before the stats handlers.

    Args:
        loss: the trainer's ``MultiTaskLoss``.
        name: logger name.

    Example:
        >>> from ctan_monai.losses import MultiTaskLoss
        >>> handler = TaskWeightingHandler(MultiTaskLoss([{"name": "dx", "level": "image",
        ...                                                "kind": "classification", "out_channels": 2}]))
    """

    def __init__(self, loss: MultiTaskLoss, name: str = "ctan_monai.weighting") -> None:
        self.loss = loss
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_COMPLETED``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        used = self.loss.weights()
        means = self.loss.epoch_completed()
        for task, value in means.items():
            if value is not None:
                engine.state.metrics[f"train_loss_{task}"] = value
            engine.state.metrics[f"weight_{task}"] = used[task]
        self.logger.info(
            "epoch %d task losses %s, weights used %s, next %s",
            engine.state.epoch,
            {k: None if v is None else round(v, 5) for k, v in means.items()},
            {k: round(v, 4) for k, v in used.items()},
            {k: round(v, 4) for k, v in self.loss.weights().items()},
        )


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """The usable ``checkpoint_epoch=N.pt`` file with the largest N in a folder, or None.

    Every candidate is verified (:func:`ctan_monai.engines.checkpoints.checkpoint_problem`: a complete zip archive
    whose every member matches its CRC): a file cut short by a kill, or with bytes changed on disk, is skipped with a
    warning naming it and why, and the previous epoch's file is taken instead.

    Args:
        checkpoint_dir: the folder (need not exist).

    Returns:
        the path, or None when there is none.

    Example:
        >>> latest_checkpoint("/nonexistent") is None
        True
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH_RE.search(p.name))), reverse=True)
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logging.getLogger("ctan_monai.resume").warning(
            "checkpoint %s is unusable, %s: skipped (falling back to the previous one)", path, problem
        )
    return None


class ResumeFromLatestCheckpoint:
    """When training starts, load the latest usable ``checkpoint_epoch=N.pt`` of ``checkpoint_dir`` if there is one:
    model, optimiser, loss weighting state, trainer state (epoch and iteration), so that rerunning the same command
    after an interruption continues after epoch N instead of starting over. Does nothing on a fresh folder.

    When attached (on the main process of a distributed run), it takes the folder's exclusive lock
    (:func:`ctan_monai.engines.checkpoints.lock_checkpoint_dir`: a second training on the same output folder fails
    at once, naming the first one's PID) and removes the temporary files of interrupted saves. It releases the lock
    when the run completes. A folder that holds files but no usable checkpoint (all truncated or corrupt) is
    reported with a WARNING naming it: the run starts from epoch 0.

    Args:
        checkpoint_dir: where ``CheckpointSaver`` writes the epoch checkpoints.
        load_dict: the objects to restore, as saved (e.g. ``{"model": net, "optimizer": opt, "loss": loss,
            "trainer": trainer}``).
        enabled: set False to always start from scratch (the folder is still locked).
        map_location: passed to ``torch.load``.

    Raises:
        CheckpointDirLockedError: (when attached) another process holds the folder's lock.
        CheckpointMismatchError: (when training starts) the checkpoint does not fit the objects, e.g. another
            architecture was trained in the same folder; it names the file and suggests ``--output_dir`` or
            ``--resume False``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(1, 1)
        >>> resume = ResumeFromLatestCheckpoint("/tmp/ckpt", {"model": net})
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        load_dict: Mapping[str, Any],
        enabled: bool = True,
        map_location: Any = "cpu",
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.load_dict = dict(load_dict)
        self.enabled = enabled
        self.map_location = map_location
        self.logger = logging.getLogger("ctan_monai.resume")
        self.resumed_from: str | None = None
        self.orphans_removed: list[str] = []

    @staticmethod
    def _is_main() -> bool:
        return idist.get_rank() == 0

    def attach(self, engine: Engine) -> None:
        """Lock the folder and remove orphan temporary files; register on ``STARTED`` (resume) and ``COMPLETED``
        (release the lock).

        Raises:
            CheckpointDirLockedError: another process holds the folder's lock.
        """
        if self._is_main():
            lock_checkpoint_dir(self.checkpoint_dir)
            self.orphans_removed = remove_orphan_files(self.checkpoint_dir)
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.COMPLETED, self.release)

    def release(self, engine: Engine | None = None) -> None:
        """Release the folder's lock (the process's end releases it too)."""
        if self._is_main():
            release_checkpoint_dir(self.checkpoint_dir)

    def __call__(self, engine: Engine) -> None:
        if self._is_main():
            lock_checkpoint_dir(self.checkpoint_dir)  # a no-op when attached; again for an engine run twice
        path = latest_checkpoint(self.checkpoint_dir) if self.enabled else None
        if path is None:
            if self.enabled:
                self._warn_if_unusable()
            return
        try:
            CheckpointLoader(load_path=path, load_dict=self.load_dict, map_location=self.map_location)(engine)
        except (RuntimeError, KeyError, ValueError) as err:
            # torch's load_state_dict (another network), the optimiser's (other parameter groups) or Ignite's "not
            # found in the checkpoint" (other objects); MONAI's "Epoch count ... larger than max_epochs" is its own
            if isinstance(err, ValueError) and str(err).startswith("Epoch count"):
                raise
            raise CheckpointMismatchError(path, err) from err
        self.resumed_from = path
        self.logger.info("resumed from %s at epoch %d", path, engine.state.epoch)

    def _warn_if_unusable(self) -> None:
        folder = Path(self.checkpoint_dir)
        files = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILENAME) if folder.is_dir() else []
        orphans = [f"{name} (removed: an interrupted save)" for name in self.orphans_removed]
        found = files + orphans
        if found:
            self.logger.warning(
                "checkpoint folder %s has NO USABLE CHECKPOINT, though it held %d file(s): %s. Training starts from "
                "epoch 0, not resumed",
                folder,
                len(found),
                ", ".join(found[:10]) + (", ..." if len(found) > 10 else ""),
            )


class TerminateOnNaNHandler:
    """Stop training when the loss becomes NaN or infinite (Ignite's ``TerminateOnNan`` on the trainer's ``loss``),
    so a diverged run ends at once with a message instead of writing NaN checkpoints for hours.

    Args:
        loss_key: key of the loss in ``engine.state.output``.
    """

    def __init__(self, loss_key: str = "loss") -> None:
        self.loss_key = loss_key

    def attach(self, engine: Engine) -> None:
        """Register Ignite's ``TerminateOnNan`` on ``ITERATION_COMPLETED``."""
        from ignite.handlers import TerminateOnNan

        engine.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(lambda out: out[self.loss_key]))


class ProgressBarHandler:
    """A tqdm progress bar over the iterations of each epoch, showing the running loss (Ignite's ``ProgressBar``).

    Args:
        loss_key: key of the loss in ``engine.state.output``.
        enabled: set False for non-interactive logs.

    Raises:
        TypeError: when ``enabled`` is not a bool.
    """

    def __init__(self, loss_key: str = "loss", enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            # `--progress_bar false` on the bundle command line arrives as the (truthy) string 'false'
            raise TypeError(f"enabled must be True or False, got {enabled!r} (on the command line write False)")
        self.loss_key = loss_key
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        """Attach the bar."""
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(
            engine, output_transform=lambda out: {"loss": float(out[self.loss_key].detach())}
        )


class MetricsHistoryHandler:
    """After each training epoch, append the trainer's and the evaluator's current metrics to
    ``metrics_history.json`` and redraw ``learning_curves.png`` (both written atomically). On resume the existing
    history is kept and continued.

    The training-split floors of the evaluation (``val_floor_<metric>``) are recorded like every metric; the figure
    draws each one as a dashed ``floor`` line in the panel of its metric (``val_floor_mean_dice`` in
    ``val_mean_dice``), not as a panel of its own (:func:`ctan_monai.engines.figures.plot_learning_curves`).

    History and figure never stop training or its checkpoints: the file is read when training starts, and one that
    cannot be read (not JSON, or not ``{metric: [[epoch, value], ...]}``) is moved aside to
    ``metrics_history.json.corrupt-<YYYYmmdd-HHMMSS>`` with a warning (the history restarts); an error while
    recording, writing or drawing is logged as a warning, not raised. Points from the current epoch on (left by a
    run killed after recording an epoch but before its checkpoint) are replaced when that epoch is rerun, and the
    temporary files of an interrupted write of either file are removed at the start.

    Args:
        output_dir: folder for the two files.
        evaluator: the validation engine, whose metrics are recorded when it ran in that epoch.

    Example:
        >>> MetricsHistoryHandler("runs/hps", evaluator=validator).attach(trainer)  # doctest: +SKIP
    """

    def __init__(self, output_dir: str | os.PathLike[str], evaluator: Engine | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.logger = logging.getLogger("ctan_monai.history")
        self._loaded = False

    @property
    def path(self) -> Path:
        """The history file."""
        return self.output_dir / "metrics_history.json"

    def attach(self, engine: Engine) -> None:
        """Register on ``STARTED`` (read the history) and ``EPOCH_COMPLETED`` (attach after the validation handler)."""
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def load(self, engine: Engine | None = None) -> dict[str, list[tuple[int, float]]]:
        """Read the history file, if any; move an unreadable one aside with a warning. Never raises.

        Args:
            engine: unused (an Ignite handler's argument).

        Returns:
            the history (empty for a missing or unreadable file).
        """
        self._loaded = True
        self.history = {}
        path = self.path
        self._remove_orphans()
        try:
            if not path.is_file():
                return self.history
            self.history = _parse_history(json.loads(path.read_text(encoding="utf-8")))
        except Exception as error:  # noqa: BLE001 - a bad history must never block training
            self.history = {}
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                os.replace(path, aside)
                where = f"moved aside to {aside}"
            except OSError as move_error:
                where = f"could not be moved aside ({move_error}); it will be overwritten"
            self.logger.warning(
                "metrics history %s is unreadable (%s: %s): %s; the history restarts with this run's epochs",
                path,
                type(error).__name__,
                error,
                where,
            )
        return self.history

    def _remove_orphans(self) -> None:
        """Remove the temporary files of a write of the history or the figure that a kill interrupted."""
        pattern = re.compile(r"\.(?:metrics_history\.json|learning_curves\.png)\.[a-z0-9_]{8}\.part\.(?:json|png)")
        try:
            for file in self.output_dir.iterdir() if self.output_dir.is_dir() else []:
                if pattern.fullmatch(file.name):
                    file.unlink(missing_ok=True)
                    self.logger.info("removed %s (an interrupted write)", file)
        except OSError as error:
            self.logger.warning("could not clean %s of interrupted writes: %s", self.output_dir, error)

    def __call__(self, engine: Engine) -> None:
        try:
            self._record(engine)
        except Exception as error:  # noqa: BLE001 - history and plots must never block training or checkpoints
            self.logger.warning(
                "metrics history of epoch %s not recorded (%s: %s); training goes on",
                getattr(engine.state, "epoch", "?"),
                type(error).__name__,
                error,
            )
            self.logger.debug("metrics history failure", exc_info=True)
            return
        try:
            from ctan_monai.engines.figures import plot_learning_curves

            plot_learning_curves(self.history, self.output_dir / "learning_curves.png")
        except Exception as error:  # noqa: BLE001 - a figure is never worth a training
            self.logger.warning("learning curves not drawn (%s: %s); training goes on", type(error).__name__, error)
            self.logger.debug("learning curves failure", exc_info=True)

    def _record(self, engine: Engine) -> None:
        from ctan_monai.utils.atomic import atomic_write_json

        if not self._loaded:
            self.load()
        epoch = int(engine.state.epoch)
        metrics = dict(engine.state.metrics)
        evaluated = self.evaluator is not None and getattr(self.evaluator.state, "iteration", 0) > 0
        if evaluated and self.evaluator.state.metrics and self._eval_ran_now(engine):
            metrics.update(self.evaluator.state.metrics)
        for name in list(self.history):
            self.history[name] = [p for p in self.history[name] if p[0] < epoch]
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.history.setdefault(name, []).append((epoch, float(value)))
        self.history = {name: points for name, points in self.history.items() if points}
        atomic_write_json(self.path, self.history)

    def _eval_ran_now(self, engine: Engine) -> bool:
        # The ValidationHandler runs the evaluator in this same EPOCH_COMPLETED event before us; MONAI's evaluator
        # sets its epoch to the trainer's epoch it ran for.
        return int(self.evaluator.state.epoch) == int(engine.state.epoch)


def _parse_history(data: Any) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [[epoch, value], ...]}`` as read from JSON, checked.

    Raises:
        ValueError: when ``data`` does not have that shape.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected an object of metrics, got {type(data).__name__}")
    history: dict[str, list[tuple[int, float]]] = {}
    for name, points in data.items():
        if not isinstance(points, list):
            raise ValueError(f"{name!r}: expected a list of [epoch, value] points")
        parsed = []
        for point in points:
            ok = isinstance(point, list) and len(point) == 2
            epoch, value = (point[0], point[1]) if ok else (None, None)
            if not ok or isinstance(epoch, bool) or not isinstance(epoch, int) or not isinstance(value, (int, float)):
                raise ValueError(f"{name!r}: bad point {point!r} (expected [epoch, value])")
            parsed.append((epoch, float(value)))
        history[name] = parsed
    return history


class KeyMetricHandler:
    """Combine evaluation metrics into one key metric, ``sum_k weight_k * metrics[k]``, for best-model selection
    (MONAI's ``CheckpointSaver(save_key_metric=True)``, the model zoo's ``key_metric``).

    Attach it to the evaluator after the handlers that set the metrics and before the saver that reads it. A metric
    missing or not finite in a run leaves the key metric unset for that run (no model is selected on it).

    Args:
        weights: metric name -> weight; a negative weight for a lower-is-better metric, e.g.
            ``{"val_mean_dice": 0.01, "val_dose_mae": -0.0142857}`` (Dice in %, dose score as a fraction of 70 Gy).
        name: the key metric's name in ``engine.state.metrics``.

    Raises:
        ValueError: when ``weights`` is empty.

    Example:
        >>> handler = KeyMetricHandler({"val_mean_dice": 0.01, "val_dose_mae": -1 / 70})
    """

    def __init__(self, weights: Mapping[str, float], name: str = "val_key_metric") -> None:
        if not weights:
            raise ValueError("KeyMetricHandler needs at least one metric weight")
        self.weights = {str(k): float(v) for k, v in weights.items()}
        self.name = name
        self.logger = logging.getLogger("ctan_monai.key_metric")

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_COMPLETED`` of the evaluator (after the metric handlers attached before it)."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import math

        metrics = engine.state.metrics
        values = {k: metrics.get(k) for k in self.weights}
        bad = [k for k, v in values.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            metrics.pop(self.name, None)
            self.logger.warning("key metric %s not computed: %s missing or not finite", self.name, bad)
            return
        metrics[self.name] = sum(self.weights[k] * float(v) for k, v in values.items())


class ValidateHandler:
    """MONAI's ``ValidationHandler`` on the epochs that are multiples of ``interval`` *and* on the last epoch, so
    that every run ends validated (its best-model selection and report cover the final weights).

    Args:
        validator: the evaluator.
        interval: validate every ``interval`` epochs.

    Raises:
        ValueError: naming ``--val_interval`` when ``interval`` is not a whole number >= 1.

    Example:
        >>> handler = ValidateHandler(validator=None, interval=2)  # doctest: +SKIP
    """

    def __init__(self, validator: Engine, interval: int = 1) -> None:
        try:
            whole = float(interval) == int(interval)
        except (TypeError, ValueError):
            whole = False
        if not whole or int(interval) < 1:
            raise ValueError(
                f"--val_interval {interval!r}: val_interval must be >= 1, a whole number of epochs (the bundle "
                "validates every val_interval epochs and after the last one); to validate only at the end, pass "
                "--val_interval equal to --epochs"
            )
        self.validator = validator
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        """Register on the trainer's ``EPOCH_COMPLETED`` for the epochs to validate."""

        def due(trainer: Engine, epoch: int) -> bool:
            return epoch % self.interval == 0 or epoch == trainer.state.max_epochs

        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=due), self)

    def __call__(self, engine: Engine) -> None:
        self.validator.run(engine.state.epoch)
