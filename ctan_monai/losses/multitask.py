"""The multi-task loss: per-task losses over labelled samples only, combined with a task weighting."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctan_monai.losses.task_losses import default_task_loss
from ctan_monai.losses.weighting import TaskWeighting, make_weighting
from ctan_monai.tasks import TaskSpec, parse_tasks

__all__ = ["MultiTaskLoss"]


class MultiTaskLoss(nn.Module):
    """Weighted sum of the task losses, with missing labels masked and the task weighting updated per epoch.

    For each task the per-sample loss (``[B]``, see ``task_losses``) is averaged over the samples that carry the
    task's label: a sample is unlabelled when ``batch["<task>_present"]`` is 0, or when ``batch["<task>_mask"]``
    is given and empty. The loss runs on the labelled samples alone (an unlabelled sample's placeholder label is
    never read), so it adds nothing to that task's loss; with none labelled the task loss is exactly 0, still
    attached to the network output so that ``backward`` works and every head receives a (zero) gradient.

    The total is ``sum_k lambda_k * L_k`` with the weights of the current epoch. In training mode each call adds
    the unweighted task losses, weighted by their labelled-sample counts, to running epoch sums;
    ``epoch_completed()`` turns them into epoch means (summed over processes under ``torch.distributed``), feeds
    them to the weighting and resets the sums. In eval mode (``.eval()``) nothing is accumulated.

    The weighting state and the running sums are saved with the module's ``state_dict`` (as its extra state,
    plain Python values), so a checkpoint that includes this module resumes with the same weights.

    Batch keys read, for a task named ``t``: ``t`` (label), ``t_present`` (0/1 per sample, optional),
    ``t_mask`` (regression region ``[B, 1, *spatial]``, optional, passed as ``mask=``), ``t_class_present``
    (0/1 ``[B, C]`` for segmentation, optional, passed as ``class_present=``).

    Args:
        tasks: the tasks, as ``TaskSpec`` or dicts (``parse_tasks``), e.g. from a bundle config.
        weighting: ``"dwa"`` (default, as the paper), ``"equal"`` or a ``TaskWeighting``.
        task_losses: optional ``{task_name: loss module}`` replacing the default loss of those tasks
            (``default_task_loss``); a replacement must map ``(input, target[, mask= | class_present=])`` to a
            per-sample ``[B]`` loss.

    Raises:
        ValueError: on malformed tasks, an unknown weighting, or a ``task_losses`` key that is not a task.

    Example:
        >>> loss = MultiTaskLoss([{"name": "dx", "level": "image", "kind": "classification", "out_channels": 3}])
        >>> total = loss({"dx": torch.zeros(2, 3)}, {"dx": torch.tensor([0, 2])})
        >>> round(float(total), 4), round(loss.last_losses["dx"], 4)
        (1.0986, 1.0986)
    """

    def __init__(
        self,
        tasks: Iterable[TaskSpec | Mapping[str, Any]],
        weighting: str | TaskWeighting = "dwa",
        task_losses: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = parse_tasks(tasks)
        names = [task.name for task in self.tasks]
        unknown = set(task_losses or {}) - set(names)
        if unknown:
            raise ValueError(f"task_losses given for unknown tasks {sorted(unknown)}; the tasks are {names}")
        given = dict(task_losses or {})
        self.task_losses = nn.ModuleDict(
            {task.name: given[task.name] if task.name in given else default_task_loss(task) for task in self.tasks}
        )
        self.weighting = make_weighting(weighting, names)
        self.last_losses: dict[str, float] = {}
        self.last_labelled: dict[str, int] = {}
        self._reset_epoch_sums()

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
        """Compute the weighted total loss of one batch.

        Args:
            outputs: the network's output dict ``{task_name: tensor}``.
            batch: the labels and optional ``<task>_present`` / ``<task>_mask`` / ``<task>_class_present``.

        Returns:
            the weighted total, a scalar tensor. The unweighted task losses are in ``last_losses`` and the
            numbers of labelled samples in ``last_labelled``.

        Raises:
            ValueError: when a task's output or label is missing, or a presence flag is malformed; the task
                losses raise ``ValueError`` on malformed predictions or labels.
        """
        weights = self.weighting.weights()
        total: torch.Tensor | None = None
        last_losses, last_labelled = {}, {}
        for task in self.tasks:
            loss, count = self._task_loss(task, outputs, batch)
            last_losses[task.name], last_labelled[task.name] = float(loss.detach()), count
            term = weights[task.name] * loss
            total = term if total is None else total + term
        self.last_losses, self.last_labelled = last_losses, last_labelled
        if self.training:
            for name, value in last_losses.items():
                self._epoch_sums[name] += value * last_labelled[name]
                self._epoch_counts[name] += last_labelled[name]
        assert total is not None  # parse_tasks guarantees at least one task
        return total

    def _task_loss(
        self, task: TaskSpec, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, int]:
        if task.name not in outputs:
            raise ValueError(f"the network output has no {task.name!r} (task {task.name!r}); got {sorted(outputs)}")
        pred = outputs[task.name]
        labelled = self._labelled(task.name, batch, pred.shape[0], pred.device)
        count = int(labelled.sum())
        if count == 0:
            # exactly zero, yet part of the graph: backward() works and the head gets a zero gradient
            return pred.sum() * 0.0, 0
        if task.name not in batch:
            raise ValueError(
                f"the batch has no label {task.name!r} for task {task.name!r}; mark missing labels "
                f"with {task.name + '_present'!r} = 0"
            )
        index = labelled.nonzero().flatten()
        extras = {}
        for key, argument in (("_mask", "mask"), ("_class_present", "class_present")):
            if task.name + key in batch:
                extras[argument] = torch.as_tensor(batch[task.name + key], device=pred.device)[index]
        target = torch.as_tensor(batch[task.name], device=pred.device)
        per_sample = self.task_losses[task.name](pred[index], target[index], **extras)
        if per_sample.shape != (count,):
            raise ValueError(
                f"the loss of task {task.name!r} must return one value per sample ({count}), "
                f"got shape {tuple(per_sample.shape)}"
            )
        return per_sample.mean(), count

    @staticmethod
    def _labelled(name: str, batch: Mapping[str, Any], size: int, device: torch.device) -> torch.Tensor:
        """Which samples carry the task's label: ``<task>_present`` is 1 and the ``<task>_mask``, if any, is not
        empty."""
        labelled = torch.ones(size, dtype=torch.bool, device=device)
        if name + "_present" in batch:
            present = torch.as_tensor(batch[name + "_present"], device=device).reshape(-1)
            if present.numel() != size:
                raise ValueError(f"{name}_present has {present.numel()} values for a batch of {size}")
            if not bool(((present == 0) | (present == 1)).all()):
                raise ValueError(f"{name}_present must hold only 0 (label missing) and 1, got {present.tolist()}")
            labelled &= present == 1
        if name + "_mask" in batch:
            mask = torch.as_tensor(batch[name + "_mask"], device=device)
            if mask.ndim == 0 or mask.shape[0] != size:
                raise ValueError(f"{name}_mask has shape {tuple(mask.shape)}, expected [{size}, 1, *spatial]")
            labelled &= mask.reshape(size, -1).ne(0).any(dim=1)
        return labelled

    def weights(self) -> dict[str, float]:
        """The task weights of the current epoch.

        Returns:
            ``{task_name: weight}``.
        """
        return self.weighting.weights()

    def epoch_means(self) -> dict[str, float | None]:
        """The running epoch means of the unweighted task losses (this process only).

        Returns:
            ``{task_name: mean}``, ``None`` for a task without a labelled sample so far in the epoch.
        """
        return {
            name: self._epoch_sums[name] / count if (count := self._epoch_counts[name]) else None
            for name in self._epoch_sums
        }

    def epoch_completed(self) -> dict[str, float | None]:
        """End the epoch: feed the epoch means of the task losses to the weighting and reset the sums.

        Under ``torch.distributed`` the sums and counts are first summed over the processes, so that every
        process ends with the same weights. Call it once per training epoch (the engines' weighting handler does).

        Returns:
            the epoch means given to the weighting (``None`` for a task without a labelled sample).
        """
        self._all_reduce_epoch_sums()
        means = self.epoch_means()
        self.weighting.epoch_completed(means)
        self._reset_epoch_sums()
        return means

    def _all_reduce_epoch_sums(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        names = list(self._epoch_sums)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        packed = torch.tensor(
            [self._epoch_sums[n] for n in names] + [float(self._epoch_counts[n]) for n in names],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(packed)
        values = packed.tolist()
        self._epoch_sums = dict(zip(names, values[: len(names)]))
        self._epoch_counts = {n: round(v) for n, v in zip(names, values[len(names) :])}

    def _reset_epoch_sums(self) -> None:
        self._epoch_sums: dict[str, float] = {task.name: 0.0 for task in self.tasks}
        self._epoch_counts: dict[str, int] = {task.name: 0 for task in self.tasks}

    def get_extra_state(self) -> dict[str, Any]:
        """The state saved with ``state_dict``: the weighting state and the running epoch sums.

        Returns:
            plain Python values (safe for ``torch.load(weights_only=True)``).
        """
        return {
            "weighting": self.weighting.state_dict(),
            "epoch_sums": dict(self._epoch_sums),
            "epoch_counts": dict(self._epoch_counts),
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore the state saved by ``get_extra_state`` (called by ``load_state_dict``).

        Args:
            state: the saved extra state.

        Raises:
            ValueError: when the saved state is malformed or belongs to other tasks.
        """
        if not isinstance(state, Mapping) or not {"weighting", "epoch_sums", "epoch_counts"} <= set(state):
            raise ValueError("MultiTaskLoss: the saved state lacks 'weighting', 'epoch_sums' or 'epoch_counts'")
        names = {task.name for task in self.tasks}
        if set(state["epoch_sums"]) != names or set(state["epoch_counts"]) != names:
            raise ValueError(
                f"MultiTaskLoss: the saved epoch sums are for tasks {sorted(state['epoch_sums'])}, "
                f"this loss has {sorted(names)}"
            )
        sums = {name: float(value) for name, value in state["epoch_sums"].items()}
        if not all(math.isfinite(value) for value in sums.values()):
            raise ValueError(f"MultiTaskLoss: the saved epoch sums are not finite: {sums}")
        self.weighting.load_state_dict(state["weighting"])
        self._epoch_sums = sums
        self._epoch_counts = {name: int(value) for name, value in state["epoch_counts"].items()}
