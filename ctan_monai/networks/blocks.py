"""Small convolution blocks shared by the decoders and the attention modules."""

from __future__ import annotations

from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch import nn

__all__ = ["conv_norm_act", "max_pool"]


def conv_norm_act(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    act: str | tuple | None = ("relu", {"inplace": True}),
) -> nn.Module:
    """Convolution, batch norm and an activation (MONAI's ``Convolution`` block, no bias before the norm).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: convolution kernel size ("same" padding).
        stride: convolution stride.
        act: activation name/args as MONAI accepts them, or None for none.

    Returns:
        the block.

    Example:
        >>> import torch
        >>> conv_norm_act(2, 3, 8)(torch.zeros(1, 3, 16, 16)).shape
        torch.Size([1, 8, 16, 16])
    """
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=stride,
        kernel_size=kernel_size,
        act=act,
        norm="batch",
        bias=False,
    )


def max_pool(spatial_dims: int) -> nn.Module:
    """A 2x max pool that rounds up (ceil mode), matching the sizes of stride-2 convolutions with padding 1.

    Args:
        spatial_dims: 2 or 3.

    Returns:
        the pooling layer.
    """
    return Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2, ceil_mode=True)
