"""Per-epoch random subsets of a dataset (uniform or weighted), the same in one process or sharded over DDP ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

__all__ = ["RandomSubsetSampler", "WeightedSubsetSampler"]


class RandomSubsetSampler(DistributedSampler):
    """Draw ``num_samples`` indices at random each epoch (all indices when ``None``) and, under DDP, give each rank
    its share of that one draw.

    The draw depends only on ``seed`` and the epoch (``set_epoch``, which MONAI's workflows call for any
    ``DistributedSampler`` at the start of each epoch), not on the global random state: a resumed run sees the same
    slices as an uninterrupted one, and ``num_samples`` means the same epoch budget on one process or on N.
    Indices are drawn without replacement while ``num_samples <= len(dataset)``; a larger budget concatenates
    further permutations.

    Args:
        dataset: the dataset to sample.
        num_samples: indices per epoch over all ranks; ``None`` for every index once per epoch.
        distributed: shard across the ranks of the initialised default process group.
        seed: seed of the draws.
        num_replicas: number of ranks, overriding the process group's (tests, custom launchers).
        rank: this rank, overriding the process group's.

    Raises:
        ValueError: when ``num_samples`` is not ``None`` or a positive integer (e.g. the string ``'null'`` that
            ``--train_slices_per_epoch null`` gives on the command line: write ``None``), or when the dataset is
            empty, or ``distributed`` is set without an initialised process group.

    Example:
        >>> sampler = RandomSubsetSampler(range(100), num_samples=8, seed=0)
        >>> sampler.set_epoch(1)
        >>> len(list(sampler))
        8
    """

    def __init__(
        self,
        dataset: Sized,
        num_samples: int | None = None,
        distributed: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0
        ):
            raise ValueError(
                f"num_samples must be a positive integer or None, got {num_samples!r} "
                "(on the command line, None is written None, not null)"
            )
        if len(dataset) == 0:
            raise ValueError("cannot sample from an empty dataset (no training slice was selected)")
        if distributed and num_replicas is None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed and dist.is_initialized() else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.samples_per_epoch = len(dataset) if num_samples is None else num_samples
        self.num_samples = math.ceil(self.samples_per_epoch / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        # one draw over all ranks from seed and epoch alone; each rank takes every num_replicas-th index of it
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        indices = self._draw(generator)
        return iter(indices[self.rank : self.total_size : self.num_replicas])

    def _draw(self, generator: torch.Generator) -> list[int]:
        """The epoch's ``total_size`` indices over all ranks: permutations, concatenated when the budget exceeds the
        dataset."""
        size = len(self.dataset)
        permutations = [torch.randperm(size, generator=generator) for _ in range(math.ceil(self.total_size / size))]
        return torch.cat(permutations)[: self.total_size].tolist()

    def __len__(self) -> int:
        return self.num_samples


class WeightedSubsetSampler(RandomSubsetSampler):
    """Draw ``num_samples`` indices per epoch with replacement, each with probability proportional to its weight
    (e.g. the class weight of each image, ``ctan_monai.apps.ham10000.prepare.sample_weights``), and under DDP give each
    rank its share of that one draw.

    Like :class:`RandomSubsetSampler`, the draw depends only on ``seed`` and the epoch (``set_epoch``, called by MONAI's
    workflows at the start of each epoch): a resumed run draws what an uninterrupted one would have, and
    ``num_samples`` is the same epoch budget on one process or on N.

    Args:
        weights: one non-negative weight per dataset index, not all zero.
        num_samples: indices per epoch over all ranks; None: as many as there are weights.
        distributed: shard across the ranks of the initialised default process group.
        seed: seed of the draws.
        num_replicas: number of ranks, overriding the process group's.
        rank: this rank, overriding the process group's.

    Raises:
        ValueError: for negative, non-finite or all-zero weights, or a malformed ``num_samples`` (see
            ``RandomSubsetSampler``).

    Example:
        >>> sampler = WeightedSubsetSampler(torch.tensor([1.0, 0.0, 3.0]), num_samples=6, seed=0)
        >>> sampler.set_epoch(1)
        >>> sorted(set(sampler)) in ([0, 2], [2])
        True
    """

    def __init__(
        self,
        weights: torch.Tensor | Sequence[float],
        num_samples: int | None = None,
        distributed: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if not bool(torch.isfinite(self.weights).all()) or bool((self.weights < 0).any()) or self.weights.sum() <= 0:
            raise ValueError("sampling weights must be finite, non-negative and not all zero")
        super().__init__(range(self.weights.numel()), num_samples, distributed, seed, num_replicas, rank)

    def _draw(self, generator: torch.Generator) -> list[int]:
        """The epoch's ``total_size`` indices over all ranks, drawn with replacement in proportion to the weights."""
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator).tolist()
