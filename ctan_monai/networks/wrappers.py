"""Single-tensor views of the multi-task networks, for tools that expect ``net(x) -> Tensor``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TaskOutput"]


class TaskOutput(nn.Module):
    """One task's output of a multi-task network (``dict[task, Tensor]``), as a plain tensor.

    MONAI's ``verify_net_in_out`` (and other single-output tools) call ``net(x)`` and expect one tensor; wrap the
    bundle's network to check its first output (the segmentation) that way. The wrapped network keeps its weights
    and all its tasks run, so the check exercises the real forward pass.

    Args:
        network: a network returning ``dict[str, Tensor]``.
        task: the task whose output is returned.

    Raises:
        KeyError: at the forward pass, when the network has no output named ``task``.

    Example:
        >>> from ctan_monai.networks import build_network
        >>> tasks = [{"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 3},
        ...          {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1}]
        >>> net = TaskOutput(build_network("ctan", tasks, backbone="resnet18"), "seg")
        >>> net(torch.zeros(1, 1, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(self, network: nn.Module, task: str) -> None:
        super().__init__()
        self.network = network
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: dict[str, torch.Tensor] = self.network(x)
        if self.task not in outputs:
            raise KeyError(f"the network has no output {self.task!r}")
        return outputs[self.task]
