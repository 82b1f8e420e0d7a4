"""Task decoders: pixel level (U-Net-style up-sampling with skip connections) and image level (down-sampling with
skip connections, global average pooling, fully connected layer). Both take the same inputs, so every
architecture feeds every decoder the same way."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

from ctan_monai.networks.blocks import conv_norm_act

__all__ = ["ImageDecoder", "PixelDecoder"]


def _match_size(x: torch.Tensor, reference: torch.Tensor, mode: str) -> torch.Tensor:
    """Resize ``x`` to the spatial size of ``reference`` if they differ (odd input sizes)."""
    if x.shape[2:] == reference.shape[2:]:
        return x
    return F.interpolate(x, size=reference.shape[2:], mode=mode, align_corners=False)


def _output_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a decoder's output layer, in float32 when autocast is on: bf16 outputs keep 8 bits of mantissa, a dose
    of 70 Gy would move in steps of 0.25 Gy and logits lose the small differences the losses depend on. The layer
    is a 1x1 convolution or a linear layer with a few outputs: float32 costs little there. (Eager mode only: the
    decoders call it through a ``torch.jit.unused`` method, TorchScript runs the layer as it is.)"""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return layer(x.float())
    return layer(x)


class _UpBlock(nn.Module):
    """Up-sample (bilinear / trilinear) to the skip's size, concatenate the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.conv1 = conv_norm_act(spatial_dims, in_channels + skip_channels, out_channels)
        self.conv2 = conv_norm_act(spatial_dims, out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class PixelDecoder(nn.Module):
    """Pixel-level decoder: three up-sampling blocks with skip connections from encoder stages 3, 2 and 1, a 1x1
    convolution to the task's channels, and interpolation to the input size (the paper's decoder for segmentation
    and dose).

    Args:
        spatial_dims: 2 or 3.
        skip_channels: channels of the skip features of encoder stages 1, 2, 3.
        bottleneck_channels: channels of the bottleneck feature (stage 4, after any attention).
        out_channels: output channels (classes for segmentation, 1 for dose).
        decoder_channels: widths of the three up-sampling blocks.
        output_scale: the head predicts ``output / output_scale``; the decoder multiplies it back (see
            ``TaskSpec.output_scale``).
        output_bias: initial output value, through the head's bias (see ``TaskSpec.output_bias``).
        fine_channels: widths of up to two more up-sampling blocks past the paper's three (ours, off by default):
            the first to the stem's resolution with the stem feature as skip (``stem_channels``), the second to the
            input resolution with the input image as skip (``image_channels``). Small structures (a 2-pixel spinal
            cord) cannot be drawn by a head at 1/4 of the input resolution.
        stem_channels: channels of the stem feature (for ``fine_channels``).
        image_channels: channels of the input image (for a second fine block).

    Example:
        >>> dec = PixelDecoder(2, (64, 128, 256), 512, out_channels=5)
        >>> skips = [torch.zeros(1, 64, 16, 16), torch.zeros(1, 128, 8, 8), torch.zeros(1, 256, 4, 4)]
        >>> dec(skips, torch.zeros(1, 512, 2, 2), [64, 64], []).shape
        torch.Size([1, 5, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int,
        skip_channels: Sequence[int],
        bottleneck_channels: int,
        out_channels: int,
        decoder_channels: Sequence[int] = (256, 128, 64),
        output_scale: float = 1.0,
        output_bias: float = 0.0,
        fine_channels: Sequence[int] = (),
        stem_channels: int = 64,
        image_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(skip_channels) != 3 or len(decoder_channels) != 3:
            raise ValueError("PixelDecoder needs three skip widths and three decoder widths")
        if len(fine_channels) > 2:
            raise ValueError(f"fine_channels takes at most two widths (stem, then input), got {fine_channels}")
        if not output_scale > 0:
            raise ValueError(f"output_scale must be > 0, got {output_scale}")
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        widths = [bottleneck_channels, *decoder_channels]
        self.up = nn.ModuleList(
            [_UpBlock(spatial_dims, widths[i], skip_channels[2 - i], widths[i + 1]) for i in range(3)]
        )
        fine_in = [decoder_channels[-1], *fine_channels[:1]]
        fine_skips = [stem_channels, image_channels]
        self.fine = nn.ModuleList(
            [_UpBlock(spatial_dims, fine_in[i], fine_skips[i], int(c)) for i, c in enumerate(fine_channels)]
        )
        last = int(fine_channels[-1]) if len(fine_channels) else decoder_channels[-1]
        self.head = Conv[Conv.CONV, spatial_dims](last, out_channels, kernel_size=1)
        # a buffer, so that the scale travels with the weights: loading a trained model restores it, and a config
        # that forgot it cannot silently write doses divided by the scale
        self.register_buffer("output_scale", torch.tensor(float(output_scale)))
        if output_bias or float(output_scale) != 1.0:
            # a scaled regression head starts as the constant output_bias: its random weights, multiplied by the
            # scale, would otherwise start it at tens of Gy of noise
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.fill_(float(output_bias) / float(output_scale))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # weights saved before the output scale was stored keep the configured one (load_state_dict passes a copy)
        state_dict.setdefault(prefix + "output_scale", self.output_scale.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.jit.unused
    def _head_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The output layer, in float32 under autocast (see ``_output_layer``)."""
        return _output_layer(self.head, x)

    def forward(
        self, skips: list[torch.Tensor], bottleneck: torch.Tensor, out_size: list[int], fine: list[torch.Tensor]
    ) -> torch.Tensor:
        """Decode.

        Args:
            skips: features of encoder stages 1, 2, 3 (finest first).
            bottleneck: the stage-4 feature.
            out_size: spatial size of the output (the input image's).
            fine: the stem feature and the input image (used by the ``fine_channels`` blocks only).

        Returns:
            [B, out_channels, *out_size] (float32 under autocast: the output layer runs in float32).
        """
        x = bottleneck
        for i, block in enumerate(self.up):
            x = block(x, skips[2 - i])
        for i, block in enumerate(self.fine):
            x = block(x, fine[i])
        x = self.head(x) if torch.jit.is_scripting() else self._head_eager(x)
        x = x * self.output_scale.to(x.dtype)
        return F.interpolate(x, size=out_size, mode=self.mode, align_corners=False)


class ImageDecoder(nn.Module):
    """Image-level decoder with skip connections (paper Sec. 2.1): starting from the stage-1 feature, four
    stride-2 3x3 conv-BN-ReLU down-sampling layers; after each of the first three the next encoder stage's feature
    (stage 2, stage 3, then the bottleneck) is concatenated; then global average pooling, dropout and a fully
    connected layer giving logits (sigmoid / softmax belong to the loss and the post-processing).

    Args:
        spatial_dims: 2 or 3.
        skip_channels: channels of the skip features of encoder stages 1, 2, 3.
        bottleneck_channels: channels of the bottleneck feature.
        out_channels: number of logits (1 for a binary task).
        decoder_channels: widths of the four down-sampling layers.
        dropout: dropout before the fully connected layer.

    Example:
        >>> dec = ImageDecoder(2, (64, 128, 256), 512, out_channels=7)
        >>> skips = [torch.zeros(2, 64, 16, 16), torch.zeros(2, 128, 8, 8), torch.zeros(2, 256, 4, 4)]
        >>> dec(skips, torch.zeros(2, 512, 2, 2), [64, 64], []).shape
        torch.Size([2, 7])
    """

    def __init__(
        self,
        spatial_dims: int,
        skip_channels: Sequence[int],
        bottleneck_channels: int,
        out_channels: int,
        decoder_channels: Sequence[int] = (128, 256, 512, 512),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(skip_channels) != 3 or len(decoder_channels) != 4:
            raise ValueError("ImageDecoder needs three skip widths and four decoder widths")
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        fused = [skip_channels[1], skip_channels[2], bottleneck_channels, 0]
        in_widths = [skip_channels[0]] + [decoder_channels[i] + fused[i] for i in range(3)]
        self.down = nn.ModuleList(
            [conv_norm_act(spatial_dims, in_widths[i], decoder_channels[i], stride=2) for i in range(4)]
        )
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(decoder_channels[-1], out_channels)

    @torch.jit.unused
    def _down_eager(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A down-sampling layer; on a CPU under autocast, in float32 where its input is one pixel wide (images under
        64 px reach the last layer so): there oneDNN's bf16 weight gradient of the padded stride-2 convolution is not
        finite on CPUs with native bf16 (AVX-512 BF16; torch 2.13: 48 non-finite values in 5 backward passes of a
        528-channel 3x3 convolution on a 1x1 input, none in float32 or on larger inputs). One pixel: no cost."""
        if x.device.type == "cpu" and min(x.shape[2:]) == 1:
            return _output_layer(layer, x)
        return layer(x)

    @torch.jit.unused
    def _fc_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The fully connected layer, in float32 under autocast (see ``_output_layer``)."""
        return _output_layer(self.fc, x)

    def forward(
        self, skips: list[torch.Tensor], bottleneck: torch.Tensor, out_size: list[int], fine: list[torch.Tensor]
    ) -> torch.Tensor:
        """Decode.

        Args:
            skips: features of encoder stages 1, 2, 3 (finest first).
            bottleneck: the stage-4 feature.
            out_size: unused (the pixel decoder's signature, so all decoders are called alike).
            fine: unused (likewise).

        Returns:
            logits [B, out_channels] (float32 under autocast: the output layer runs in float32).
        """
        fused = [skips[1], skips[2], bottleneck]
        x = skips[0]
        for i, layer in enumerate(self.down):
            x = layer(x) if torch.jit.is_scripting() else self._down_eager(layer, x)
            if i < 3:
                x = torch.cat([x, _match_size(fused[i], x, self.mode)], dim=1)
        x = self.pool(x).flatten(1)
        x = self.dropout(x)
        return self.fc(x) if torch.jit.is_scripting() else self._fc_eager(x)
