"""STOIC datasets over the cache (2.5D slabs or 3D volumes) and the patient-level mean of slice probabilities."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import Dataset

from ctan_monai.apps.stoic.transforms import LUNG_WINDOW, stoic_transform

__all__ = ["Stoic25DDataset", "Stoic3DDataset", "aggregate_patient_probabilities"]


class Stoic25DDataset(Dataset):
    """2.5D STOIC dataset: per patient, a list of samples with ``image`` [3, H, W] (slices z-1, z, z+1 in the lung
    window, resized to ``image_size``), labels with presence flags, ``case_id`` and ``slice_index``.

    Training yields ``slices_per_patient`` random lung slices per patient and per epoch; evaluation yields
    ``eval_slices`` fixed ones, whose probabilities ``aggregate_patient_probabilities`` averages per patient.
    Use ``monai.data.DataLoader`` (its collate flattens the per-patient lists: a batch of B patients holds B x k
    slices).

    Args:
        data: manifest entries (``convert_dataset(...)["cases"]``).
        training: random (training) or fixed (evaluation) slices.
        image_size: side of the square output slices.
        slices_per_patient: samples per patient per epoch in training.
        eval_slices: samples per patient at evaluation.
        window: HU window mapped to [0, 1].
        seed: seed of the slice draws (workers of ``monai.data.DataLoader`` are reseeded from it).

    Example:
        >>> ds = Stoic25DDataset(manifest["cases"], training=True, image_size=224)  # doctest: +SKIP
        >>> [s["image"].shape for s in ds[0]]  # doctest: +SKIP
        [torch.Size([3, 224, 224]), ...]
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        training: bool = True,
        image_size: int = 224,
        slices_per_patient: int = 4,
        eval_slices: int = 8,
        window: Sequence[float] = LUNG_WINDOW,
        seed: int = 0,
    ) -> None:
        num_samples = slices_per_patient if training else eval_slices
        transform = stoic_transform(2, training, image_size=image_size, num_slices=num_samples, window=window)
        transform.set_random_state(seed=seed)  # after Compose, which reseeds its members from MONAI's global seed
        super().__init__(data=list(data), transform=transform)


class Stoic3DDataset(Dataset):
    """3D STOIC dataset: the resampled, cropped volume in the lung window, resized to a cube, ``image`` [1, D, H, W].

    Args:
        data: manifest entries (``convert_dataset(...)["cases"]``).
        volume_size: side of the output cube (the crop is resized anisotropically to it).
        window: HU window mapped to [0, 1].

    Example:
        >>> ds = Stoic3DDataset(manifest["cases"], volume_size=64)  # doctest: +SKIP
        >>> ds[0]["image"].shape  # doctest: +SKIP
        torch.Size([1, 64, 64, 64])
    """

    def __init__(
        self, data: Sequence[Mapping[str, Any]], volume_size: int = 64, window: Sequence[float] = LUNG_WINDOW
    ) -> None:
        transform = stoic_transform(3, volume_size=volume_size, window=window)
        super().__init__(data=list(data), transform=transform)


def aggregate_patient_probabilities(
    case_ids: Iterable[str], probs: Iterable[float] | torch.Tensor | np.ndarray
) -> dict[str, float]:
    """Per-patient mean of slice-level values (probabilities; also labels or presence flags, constant per patient).

    Args:
        case_ids: the patient of each slice.
        probs: one value per slice (any shape that flattens to one per slice).

    Returns:
        ``{case_id: mean}`` in order of first appearance.

    Raises:
        ValueError: when the two lengths differ.

    Example:
        >>> aggregate_patient_probabilities(["1", "1", "2"], [0.2, 0.4, 0.9])
        {'1': 0.30000000000000004, '2': 0.9}
    """
    ids = [str(c) for c in case_ids]
    values = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=float).ravel()
    if len(ids) != values.size:
        raise ValueError(f"{len(ids)} case ids but {values.size} values")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for case, value in zip(ids, values):
        sums[case] = sums.get(case, 0.0) + float(value)
        counts[case] = counts.get(case, 0) + 1
    return {case: sums[case] / counts[case] for case in sums}
