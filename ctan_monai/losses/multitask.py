"""The multi-task loss: per-task losses over labelled samples only, combined with a task weighting."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctan_monai.losses.task_losses import default_task_loss, validation_enabled
from ctan_monai.losses.weighting import TaskWeighting, make_weighting
from ctan_monai.tasks import TaskSpec, parse_tasks

__all__ = ["MultiTaskLoss"]


class MultiTaskLoss(nn.Module):
    """Weighted sum of the task losses, with missing labels masked and the task weighting updated per epoch.

    For each task the per-sample loss (``[B]``, see ``task_losses``) is averaged over the samples that carry the
    task's label: a sample is unlabelled when ``batch["<task>_present"]`` is 0, or when ``batch["<task>_mask"]``
    is given and empty. The loss runs on the whole batch and the unlabelled samples are masked out of the mean (no
    boolean indexing, whose data-dependent shape would synchronise a GPU with the host); their placeholder labels
    are first replaced by harmless values (0, and 1 for ``class_present``), so a placeholder such as -1 or NaN never
    reaches the loss. An unlabelled sample therefore adds nothing to that task's loss; with none labelled the task
    loss is exactly 0, still attached to the network output so that ``backward`` works and every head receives a
    (zero) gradient. A task loss that couples the samples (the batch Dice of ``SegmentationComboLoss``) receives
    the labelled samples as ``sample_weight=`` when its ``forward`` takes that argument.

    The total is ``sum_k lambda_k * L_k`` with the weights of the current epoch. In training mode each call adds
    the unweighted task losses, weighted by their labelled-sample counts, to running epoch sums, kept on the
    loss's device; ``epoch_completed()`` turns them into epoch means (summed over processes under
    ``torch.distributed``), feeds them to the weighting and resets the sums. In eval mode (``.eval()``) nothing is
    accumulated. A training step reads nothing back to the host: ``last_losses``, ``last_labelled`` and the epoch
    means are read when asked for (one synchronisation then, not one per task and step).

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
            per-sample ``[B]`` loss, finite for every sample whose label is valid.
        validate_inputs: check the values of the presence flags (0/1) here and of the labels in the default task
            losses on every call (True), never (False), or outside training steps only (None, the default: see
            ``ctan_monai.losses.task_losses.validation_enabled``; the data path validates the labels before
            training, and the environment variable ``CTAN_MONAI_VALIDATE_INPUTS=1`` turns the checks on there too).

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
        validate_inputs: bool | None = None,
    ) -> None:
        super().__init__()
        self.tasks = parse_tasks(tasks)
        names = [task.name for task in self.tasks]
        unknown = set(task_losses or {}) - set(names)
        if unknown:
            raise ValueError(f"task_losses given for unknown tasks {sorted(unknown)}; the tasks are {names}")
        given = dict(task_losses or {})
        self.validate_inputs = validate_inputs
        self.task_losses = nn.ModuleDict(
            {
                task.name: given[task.name] if task.name in given else default_task_loss(task, validate_inputs)
                for task in self.tasks
            }
        )
        self._takes_sample_weight = {
            name: _takes_argument(loss, "sample_weight") for name, loss in self.task_losses.items()
        }
        self.weighting = make_weighting(weighting, names)
        # the last call's unweighted task losses and labelled counts, [K] tensors on the loss's device
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reset_epoch_sums()

    @property
    def last_losses(self) -> dict[str, float]:
        """The unweighted task losses of the last call (read from the device when asked: a GPU sync).

        Returns:
            ``{task_name: loss}``; empty before the first call.
        """
        if self._last is None:
            return {}
        return dict(zip(self._names(), self._last[0].tolist()))

    @property
    def last_labelled(self) -> dict[str, int]:
        """The numbers of labelled samples of each task in the last call (read when asked: a GPU sync).

        Returns:
            ``{task_name: count}``; empty before the first call.
        """
        if self._last is None:
            return {}
        return dict(zip(self._names(), (int(c) for c in self._last[1].tolist())))

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
        """Compute the weighted total loss of one batch, without reading a tensor back to the host.

        Args:
            outputs: the network's output dict ``{task_name: tensor}``.
            batch: the labels and optional ``<task>_present`` / ``<task>_mask`` / ``<task>_class_present``.

        Returns:
            the weighted total, a scalar tensor. The unweighted task losses are in ``last_losses`` and the
            numbers of labelled samples in ``last_labelled``.

        Raises:
            ValueError: when a task's output or label is missing, a per-sample loss has the wrong shape, or (when
                validating, see ``validate_inputs``) a presence flag is not 0/1; the task losses raise
                ``ValueError`` on malformed predictions or labels.
        """
        weights = self.weighting.weights()
        validate = validation_enabled(self.validate_inputs, *outputs.values())
        total: torch.Tensor | None = None
        losses, counts = [], []
        for task in self.tasks:
            loss, count = self._task_loss(task, outputs, batch, validate)
            losses.append(loss.detach().float())
            counts.append(count)
            term = weights[task.name] * loss
            total = term if total is None else total + term
        assert total is not None  # parse_tasks guarantees at least one task
        last = (torch.stack(losses), torch.stack([c.to(losses[0].device) for c in counts]))
        self._last = last
        if self.training:
            dtype = _accumulator_dtype(last[0].device)
            sums, numbers = last[0].to(dtype) * last[1].to(dtype), last[1]
            if self._pending is None:
                self._pending = (sums, numbers)
            else:
                self._pending = (self._pending[0] + sums, self._pending[1] + numbers)
        return total

    def _names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def _task_loss(
        self, task: TaskSpec, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any], validate: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's mean loss over its labelled samples and their number (a 0-dim tensor), both on the device."""
        if task.name not in outputs:
            raise ValueError(f"the network output has no {task.name!r} (task {task.name!r}); got {sorted(outputs)}")
        pred = outputs[task.name]
        size = pred.shape[0]
        labelled = self._labelled(task.name, batch, size, pred.device, validate)
        count = labelled.sum()
        if task.name not in batch:
            flagged = task.name + "_present" in batch or task.name + "_mask" in batch
            if not flagged or (validate and bool(count > 0)):
                raise ValueError(
                    f"the batch has no label {task.name!r} for task {task.name!r}; mark missing labels "
                    f"with {task.name + '_present'!r} = 0"
                )
            # no sample of the batch carries the label: exactly zero, yet part of the graph (backward() works and
            # the head gets a zero gradient)
            return pred.sum() * 0.0, torch.zeros((), dtype=count.dtype, device=pred.device)
        flags = task.name + "_present" in batch
        target = torch.as_tensor(batch[task.name], device=pred.device)
        if flags:
            target = _fill_unlabelled(target, labelled, 0)
        extras: dict[str, torch.Tensor] = {}
        for key, argument in (("_mask", "mask"), ("_class_present", "class_present")):
            if task.name + key in batch:
                value = torch.as_tensor(batch[task.name + key], device=pred.device)
                extras[argument] = (
                    _fill_unlabelled(value, labelled, 1) if flags and argument == "class_present" else value
                )
        if self._takes_sample_weight[task.name]:
            extras["sample_weight"] = labelled.float()
        per_sample = self.task_losses[task.name](pred, target, **extras)
        if per_sample.shape != (size,):
            raise ValueError(
                f"the loss of task {task.name!r} must return one value per sample ({size}), "
                f"got shape {tuple(per_sample.shape)}"
            )
        # the mean over the labelled samples; where() and not a product, so that nothing of an unlabelled sample
        # leaks in
        mean = torch.where(labelled, per_sample, torch.zeros_like(per_sample)).sum() / count.clamp(min=1)
        return mean, count

    @staticmethod
    def _labelled(name: str, batch: Mapping[str, Any], size: int, device: torch.device, validate: bool) -> torch.Tensor:
        """Which samples carry the task's label: ``<task>_present`` is 1 and the ``<task>_mask``, if any, is not
        empty (a ``[B]`` bool tensor, computed on the device)."""
        labelled = torch.ones(size, dtype=torch.bool, device=device)
        if name + "_present" in batch:
            present = torch.as_tensor(batch[name + "_present"], device=device).reshape(-1)
            if present.numel() != size:
                raise ValueError(f"{name}_present has {present.numel()} values for a batch of {size}")
            if validate and not bool(((present == 0) | (present == 1)).all()):
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
        """The running epoch means of the unweighted task losses (this process only; read from the device).

        Returns:
            ``{task_name: mean}``, ``None`` for a task without a labelled sample so far in the epoch.
        """
        self._flush_pending()
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
        self._flush_pending()
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
        # the sums and counts of the calls since the last flush, [K] tensors on the device (None: no call)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def _flush_pending(self) -> None:
        """Add the sums kept on the device to the host's epoch sums (one read, at epoch end or on demand)."""
        if self._pending is None:
            return
        sums, counts = self._pending[0].tolist(), self._pending[1].tolist()
        self._pending = None
        for name, value, count in zip(self._names(), sums, counts):
            self._epoch_sums[name] += float(value)
            self._epoch_counts[name] += int(count)

    def get_extra_state(self) -> dict[str, Any]:
        """The state saved with ``state_dict``: the weighting state and the running epoch sums.

        Returns:
            plain Python values (safe for ``torch.load(weights_only=True)``).
        """
        self._flush_pending()
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
        self._pending = None
        self._epoch_sums = sums
        self._epoch_counts = {name: int(value) for name, value in state["epoch_counts"].items()}


def _takes_argument(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` names the argument ``name`` (not merely ``**kwargs``, which may pass it on)."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters and parameters[name].kind is not inspect.Parameter.POSITIONAL_ONLY


def _fill_unlabelled(value: torch.Tensor, labelled: torch.Tensor, fill: float) -> torch.Tensor:
    """``value`` with the entries of unlabelled samples (first dimension) replaced by ``fill``; unchanged when its
    first dimension is not the batch (the loss then reports the shape)."""
    if value.ndim == 0 or value.shape[0] != labelled.shape[0]:
        return value
    keep = labelled.view(-1, *([1] * (value.ndim - 1)))
    return torch.where(keep, value, torch.full((), fill, dtype=value.dtype, device=value.device))


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for the running epoch sums (as the Python floats they become), float32 where it is unsupported."""
    return torch.float32 if device.type == "mps" else torch.float64
