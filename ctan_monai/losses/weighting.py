"""Task weighting for multi-task training: equal weights or Dynamic Weight Averaging (DWA, Liu et al. 2019).

A weighting sees, at the end of every epoch, the epoch means of the unweighted task losses and gives the weights
of the next epoch. Its whole state (epoch counter, loss history) round-trips through ``state_dict`` /
``load_state_dict`` as plain Python values, so that it can go into a checkpoint and a resumed training continues
with the same weights.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DynamicWeightAveraging", "EqualWeighting", "TaskWeighting", "make_weighting"]


class TaskWeighting(ABC):
    """Base of the task weightings: keeps the per-epoch loss history; subclasses turn it into weights.

    Args:
        task_names: the tasks weighted, in order. May be left out and given later with ``set_tasks`` (the
            multi-task loss does so with its own tasks).

    Raises:
        ValueError: when a task name repeats.
    """

    def __init__(self, task_names: Sequence[str] | None = None) -> None:
        self._task_names: tuple[str, ...] | None = None
        self.epoch = 0
        self.history: list[dict[str, float | None]] = []
        if task_names is not None:
            self.set_tasks(task_names)

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks weighted.

        Raises:
            RuntimeError: when the tasks were not set yet.
        """
        if self._task_names is None:
            raise RuntimeError(f"{type(self).__name__}: the task names are not set (call set_tasks)")
        return self._task_names

    def set_tasks(self, task_names: Sequence[str]) -> None:
        """Declare the tasks weighted (once; again only with the same names).

        Args:
            task_names: the task names, in order.

        Raises:
            ValueError: when a name repeats, the list is empty, or other tasks were declared before.
        """
        names = tuple(str(n) for n in task_names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"task names must be non-empty and unique, got {list(names)}")
        if self._task_names is not None and self._task_names != names:
            raise ValueError(f"{type(self).__name__} weights tasks {list(self._task_names)}, not {list(names)}")
        self._task_names = names

    @abstractmethod
    def weights(self) -> dict[str, float]:
        """The weight of each task for the current epoch.

        Returns:
            ``{task_name: weight}``.
        """

    def epoch_completed(self, epoch_losses: Mapping[str, float | None]) -> None:
        """Record the epoch means of the unweighted task losses and move on to the next epoch.

        Args:
            epoch_losses: ``{task_name: mean loss}``, ``None`` (or a missing key) for a task that had no labelled
                sample in the epoch.

        Raises:
            ValueError: on an unknown task name or a non-finite or negative loss.
        """
        unknown = set(epoch_losses) - set(self.task_names)
        if unknown:
            raise ValueError(f"{type(self).__name__}: losses given for unknown tasks {sorted(unknown)}")
        record: dict[str, float | None] = {}
        for name in self.task_names:
            value = epoch_losses.get(name)
            if value is not None:
                value = float(value)
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"{type(self).__name__}: epoch loss of task {name!r} is {value}")
            record[name] = value
        self.history.append(record)
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """The weighting state as plain Python values (safe for ``torch.load(weights_only=True)``).

        Returns:
            ``{"task_names", "epoch", "history"}``.
        """
        return {
            "task_names": list(self.task_names),
            "epoch": self.epoch,
            "history": [dict(record) for record in self.history],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by ``state_dict``.

        Args:
            state_dict: the saved state.

        Raises:
            ValueError: when keys are missing or the saved tasks differ from this weighting's.
        """
        missing = {"task_names", "epoch", "history"} - set(state_dict)
        if missing:
            raise ValueError(f"{type(self).__name__}: the saved weighting state lacks {sorted(missing)}")
        self.set_tasks(state_dict["task_names"])
        history = [dict(record) for record in state_dict["history"]]
        if int(state_dict["epoch"]) != len(history):
            raise ValueError(f"{type(self).__name__}: saved epoch {state_dict['epoch']} != {len(history)} records")
        self.history = history
        self.epoch = int(state_dict["epoch"])


class EqualWeighting(TaskWeighting):
    """Every task weighted 1 (the plain sum of the task losses).

    Example:
        >>> EqualWeighting(["seg", "dose"]).weights()
        {'seg': 1.0, 'dose': 1.0}
    """

    def weights(self) -> dict[str, float]:
        """The weights: 1 for every task.

        Returns:
            ``{task_name: 1.0}``.
        """
        return dict.fromkeys(self.task_names, 1.0)


class DynamicWeightAveraging(TaskWeighting):
    """Dynamic Weight Averaging (Liu, Johns and Davison, CVPR 2019), as used by the CTAN paper.

    Weights are 1 for the first two epochs; for epoch ``t >= 2`` (counting from 0),
    ``lambda_k = K * softmax_k(w_k / T)`` with ``w_k = L_k(t-1) / L_k(t-2)``, the epoch means of the unweighted
    task losses, K the number of tasks.

    Our rule for a ratio that cannot be formed: when task k had no labelled sample in epoch t-1 or t-2 (no epoch
    mean), or ``L_k(t-2)`` is 0, its ratio is 1 (read as "no change"), so the task keeps a neutral share instead of
    stopping the weighting of the others.

    Args:
        task_names: the tasks weighted (may be set later by the multi-task loss).
        temperature: T, the softmax temperature (paper and DWA: 2); larger is closer to equal weights.

    Raises:
        ValueError: when ``temperature`` is not positive.

    Example:
        >>> dwa = DynamicWeightAveraging(["seg", "dose"])
        >>> dwa.epoch_completed({"seg": 1.0, "dose": 1.0})
        >>> dwa.epoch_completed({"seg": 0.5, "dose": 1.0})
        >>> round(dwa.weights()["dose"], 4)
        1.1244
    """

    def __init__(self, task_names: Sequence[str] | None = None, temperature: float = 2.0) -> None:
        if not temperature > 0:
            raise ValueError(f"the DWA temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        super().__init__(task_names)

    def ratios(self) -> dict[str, float]:
        """The loss ratios ``w_k = L_k(t-1) / L_k(t-2)`` behind the current weights (1 where undefined).

        Returns:
            ``{task_name: ratio}``; all 1 before two epochs are recorded.
        """
        if len(self.history) < 2:
            return dict.fromkeys(self.task_names, 1.0)
        previous, before = self.history[-1], self.history[-2]
        ratios = {}
        for name in self.task_names:
            last, older = previous.get(name), before.get(name)
            ratios[name] = 1.0 if last is None or older is None or older == 0 else last / older
        return ratios

    def weights(self) -> dict[str, float]:
        """The DWA weights of the current epoch.

        Returns:
            ``{task_name: lambda_k}``, summing to K.
        """
        if len(self.history) < 2:
            return dict.fromkeys(self.task_names, 1.0)
        scaled = {name: ratio / self.temperature for name, ratio in self.ratios().items()}
        # subtract the largest exponent: the softmax is unchanged and exp cannot overflow
        top = max(scaled.values())
        exps = {name: math.exp(value - top) for name, value in scaled.items()}
        total = sum(exps.values())
        count = len(exps)
        return {name: count * value / total for name, value in exps.items()}


def make_weighting(weighting: str | TaskWeighting, task_names: Sequence[str]) -> TaskWeighting:
    """Build (or bind) a task weighting for the given tasks.

    Args:
        weighting: ``"dwa"`` (DWA, T = 2), ``"equal"``, or a ``TaskWeighting`` instance.
        task_names: the tasks to weight.

    Returns:
        the weighting, with its tasks set.

    Raises:
        ValueError: on an unknown name or an instance declared for other tasks.

    Example:
        >>> type(make_weighting("dwa", ["seg", "dose"])).__name__
        'DynamicWeightAveraging'
    """
    if isinstance(weighting, TaskWeighting):
        weighting.set_tasks(task_names)
        return weighting
    builders = {"dwa": DynamicWeightAveraging, "equal": EqualWeighting}
    key = str(weighting).lower()
    if key not in builders:
        raise ValueError(f"unknown task weighting {weighting!r}; use one of {sorted(builders)} or a TaskWeighting")
    return builders[key](task_names)
