"""Learning-rate schedules for the bundles: a linear warm-up then a cosine decay, stepped once per iteration."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineSchedule", "build_lr_schedule"]


class WarmupCosineSchedule(LRScheduler):
    """Linear warm-up from ``warmup_start * lr`` to ``lr`` over ``warmup_steps``, then a cosine decay to
    ``final_fraction * lr`` at ``total_steps``; constant at that floor after it.

    The run's length is a constructor argument and is *not* part of the saved state: a run resumed with more
    epochs continues on the longer schedule instead of failing (as ``OneCycleLR`` does past its ``total_steps``).

    Args:
        optimizer: the optimiser whose learning rates (its ``initial_lr`` per group) are scheduled.
        total_steps: iterations of the whole run.
        warmup_steps: iterations of the linear warm-up (0 for none).
        warmup_start: the warm-up's starting fraction of the learning rate.
        final_fraction: the fraction of the learning rate reached at the end.
        last_epoch: the index of the last step taken (-1 for a new run), as torch's schedulers.

    Raises:
        ValueError: for a non-positive ``total_steps``, a negative ``warmup_steps`` or fractions outside (0, 1].

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = WarmupCosineSchedule(opt, total_steps=10, warmup_steps=2, final_fraction=0.01)
        >>> lrs = []
        >>> for _ in range(10):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3)); opt.step(); sched.step()
        >>> lrs[:3], lrs[-1] < 0.1
        ([0.1, 0.55, 1.0], True)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_start: float = 0.1,
        final_fraction: float = 0.01,
        last_epoch: int = -1,
    ) -> None:
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        for name, value in (("warmup_start", warmup_start), ("final_fraction", final_fraction)):
            if not 0 < float(value) <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {value}")
        self.total_steps = int(total_steps)
        self.warmup_steps = min(int(warmup_steps), self.total_steps)
        self.warmup_start = float(warmup_start)
        self.final_fraction = float(final_fraction)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The fraction of the base learning rate at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_start + (1.0 - self.warmup_start) * step / max(1, self.warmup_steps)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.final_fraction + (1.0 - self.final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        """Learning rates of the parameter groups at the current step."""
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The step count and base rates; the run length stays the constructor's (see the class docstring)."""
        keep = ("last_epoch", "base_lrs", "_step_count", "_last_lr")
        return {k: v for k, v in self.__dict__.items() if k in keep}


def build_lr_schedule(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_fraction: float = 0.05,
    final_fraction: float = 0.01,
) -> LRScheduler:
    """The bundles' ``lr_schedule`` option as a scheduler stepped once per iteration.

    Args:
        optimizer: the optimiser.
        schedule: ``"cosine"`` (linear warm-up over ``warmup_fraction`` of the run, then cosine decay to
            ``final_fraction``) or ``"constant"`` (the paper's fixed learning rate).
        total_steps: iterations of the whole run (epochs x iterations per epoch).
        warmup_fraction: fraction of the run spent warming up (cosine only).
        final_fraction: fraction of the learning rate at the end (cosine only).

    Returns:
        the scheduler (``constant``: one that never changes the rate, so checkpoints have the same entries).

    Raises:
        ValueError: for an unknown ``schedule``.

    Example:
        >>> opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        >>> type(build_lr_schedule(opt, "constant", 100)).__name__
        'WarmupCosineSchedule'
    """
    if schedule == "constant":
        return WarmupCosineSchedule(optimizer, total_steps=max(1, int(total_steps)), final_fraction=1.0)
    if schedule == "cosine":
        steps = max(1, int(total_steps))
        return WarmupCosineSchedule(
            optimizer, steps, warmup_steps=round(warmup_fraction * steps), final_fraction=final_fraction
        )
    raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {schedule!r}")
