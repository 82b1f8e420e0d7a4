"""Turning a collated multi-task batch into what MONAI's engines pass to the network and the loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import convert_to_tensor

__all__ = ["MultiTaskPrepareBatch"]


class MultiTaskPrepareBatch(PrepareBatch):
    """``prepare_batch`` for ``SupervisedTrainer`` / ``SupervisedEvaluator`` with multi-task labels.

    Returns ``(image, targets)``: the image tensor goes to the network, ``targets`` (every other tensor of the batch:
    task labels, ``<task>_present``, ``<task>_mask``, ``<task>_class_present``) to ``MultiTaskLoss``. Non-tensor
    entries (ids, paths, metadata) stay in the batch and are not moved.

    Nothing here reads a tensor's values: the step stays free of host-device synchronisation (the labels were
    validated where the data enter, by the datasets and readers).

    Args:
        image_key: key of the input image.
        task_names: the tasks; each must have its label or a ``<task>_present`` flag in every batch (checked, so a
            misnamed key fails at the first iteration with a clear message instead of silently training nothing).
        channels_last: convert 4D / 5D images (and so activations) to channels-last memory format; convert the
            network's weights too (``ctan_monai.engines.place_network(network, device, channels_last=True)``).

    Raises:
        KeyError: when the image or a task's label/presence key is missing from a batch.

    Example:
        >>> prep = MultiTaskPrepareBatch(task_names=["seg"])
        >>> image, targets = prep({"image": torch.zeros(2, 1, 8, 8), "seg": torch.zeros(2, 1, 8, 8)}, "cpu")
        >>> sorted(targets)
        ['seg']
    """

    def __init__(self, image_key: str = "image", task_names: Sequence[str] = (), channels_last: bool = False) -> None:
        self.image_key = image_key
        self.task_names = list(task_names)
        self.channels_last = channels_last

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.image_key not in batchdata:
            raise KeyError(f"batch has no image key {self.image_key!r}; keys: {sorted(batchdata)}")
        for name in self.task_names:
            if name not in batchdata and f"{name}_present" not in batchdata:
                raise KeyError(
                    f"batch has neither a label {name!r} nor {name + '_present'!r} for task {name!r}; "
                    f"keys: {sorted(batchdata)}"
                )
        image = convert_to_tensor(batchdata[self.image_key], track_meta=False).to(
            device=device, non_blocking=non_blocking
        )
        if self.channels_last and image.dim() in (4, 5):
            image = image.contiguous(memory_format=torch.channels_last if image.dim() == 4 else torch.channels_last_3d)
        targets = {
            key: convert_to_tensor(value, track_meta=False).to(device=device, non_blocking=non_blocking)
            for key, value in batchdata.items()
            if key != self.image_key and isinstance(value, torch.Tensor)
        }
        return image, targets
