"""ResNet encoder on MONAI's ResNet, exposing per stage the features U^j (input of the stage's last block) and
P^j (output of the stage's last block), as MTAN and CTAN need them; ImageNet weights load from a local file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import nn

__all__ = ["RESNET_CONFIGS", "ResNetEncoder", "WeightLoadReport", "load_torchvision_resnet_weights"]

# name -> (block, blocks per stage); torchvision's ResNet-18/34/50 layouts.
RESNET_CONFIGS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (ResNetBlock, (2, 2, 2, 2)),
    "resnet34": (ResNetBlock, (3, 4, 6, 3)),
    "resnet50": (ResNetBottleneck, (3, 4, 6, 3)),
}
_STAGE_PLANES = (64, 128, 256, 512)


class ResNetEncoder(nn.Module):
    """A ResNet encoder (MONAI's ResNet blocks) returning the shared features of its four stages.

    The stem is torchvision's: a 7x7 stride-2 convolution, batch norm, ReLU and a stride-2 max pool, so stage j
    (1..4) works at 1/2^(j+1) of the input and the encoder's output stride is 32. (MONAI's ``resnet50`` defaults to a
    stride-1 stem, several times slower at the same input and not what ImageNet weights expect.)

    Parameter names follow torchvision's (``conv1``, ``bn1``, ``layers.{j}`` for ``layer{j+1}``), so that ImageNet
    weights in torchvision's state-dict format load with a fixed renaming (see ``load_torchvision_resnet_weights``).

    Args:
        backbone: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        spatial_dims: 2 or 3.
        in_channels: number of input channels.
        stem_stride: stride of the first convolution (2 as in torchvision; 1 as in MONAI's default ResNets).
        input_windows: intensity windows ``(low, high)`` on the input's scale; each adds, per input channel, the
            channel ``clip((x - low) / (high - low), 0, 1)`` before the first convolution (e.g. a CT soft-tissue
            window: OpenKBP's parotids differ from muscle by under 2 % of the full 0..4095 range, a quarter of a
            -160..240 HU window). The network still takes ``in_channels`` channels; the windows are fixed, not learned.

    Raises:
        ValueError: for an unknown backbone or unsupported ``spatial_dims``, or a window with ``high <= low``.

    Example:
        >>> enc = ResNetEncoder("resnet18", spatial_dims=2, in_channels=1)
        >>> stem, us, ps = enc(torch.zeros(2, 1, 64, 64))
        >>> [tuple(p.shape) for p in ps]
        [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        spatial_dims: int = 2,
        in_channels: int = 3,
        stem_stride: int = 2,
        input_windows: Sequence[Sequence[float]] = (),
    ):
        super().__init__()
        if backbone not in RESNET_CONFIGS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(RESNET_CONFIGS)}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        windows = [(float(w[0]), float(w[1])) for w in input_windows]
        bad = [w for w in windows if not w[1] > w[0]]
        if bad:
            raise ValueError(f"input_windows must be (low, high) pairs with high > low, got {bad}")
        block, layers = RESNET_CONFIGS[backbone]
        resnet = ResNet(
            block=block,
            layers=list(layers),
            block_inplanes=list(_STAGE_PLANES),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels * (1 + len(windows)),
            conv1_t_size=7,
            conv1_t_stride=stem_stride,
            shortcut_type="B",
            bias_downsample=False,  # torchvision's downsample convolutions have no bias
            feed_forward=False,
        )
        self.backbone = backbone
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.input_windows = windows
        self.num_windows = len(windows)  # what TorchScript reads (an empty list attribute has no TorchScript type)
        # not persistent: the windows are part of the architecture (the config), like the layer widths
        self.register_buffer("_window_low", torch.tensor([w[0] for w in windows]), persistent=False)
        self.register_buffer("_window_width", torch.tensor([w[1] - w[0] for w in windows]), persistent=False)
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.act = resnet.act
        self.maxpool = resnet.maxpool
        self.layers = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
        expansion = int(getattr(block, "expansion", 1))
        self.out_channels = [p * expansion for p in _STAGE_PLANES]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Run the shared encoder.

        Args:
            x: images [B, in_channels, *spatial].

        Returns:
            ``(stem, us, ps)``: the stem's output before the max pool (64 channels, 1/``stem_stride`` of the input,
            for the fine decoder blocks), then per stage U^j (the input of the stage's last block) and P^j (the
            stage's output).
        """
        stem = self.act(self.bn1(self.conv1(self.windowed(x))))
        x = self.maxpool(stem)
        us: list[torch.Tensor] = []
        ps: list[torch.Tensor] = []
        for layer in self.layers:
            u = x
            for block in layer:
                u = x
                x = block(x)
            us.append(u)
            ps.append(x)
        return stem, us, ps

    def windowed(self, x: torch.Tensor) -> torch.Tensor:
        """The input followed by its windowed copies (``input_windows``), as the first convolution sees it.

        Args:
            x: images [B, in_channels, *spatial].

        Returns:
            ``[B, in_channels * (1 + len(input_windows)), *spatial]``; ``x`` itself without windows.
        """
        if self.num_windows == 0:
            return x
        channels = x.shape[1]
        spatial_ones = [1] * (x.dim() - 2)
        # window k applies to the k-th copy of the in_channels channels
        low = self._window_low.to(x.dtype).repeat_interleave(channels).view([1, -1] + spatial_ones)
        width = self._window_width.to(x.dtype).repeat_interleave(channels).view([1, -1] + spatial_ones)
        copies = x.repeat([1, self.num_windows] + spatial_ones)
        return torch.cat([x, ((copies - low) / width).clamp(0.0, 1.0)], dim=1)


@dataclass
class WeightLoadReport:
    """What happened when loading a torchvision-format state dict into a ``ResNetEncoder``.

    Args:
        loaded: encoder parameter/buffer names that were set from the file.
        missing: encoder names the file did not provide.
        unexpected: file keys that match nothing in the encoder (the classifier ``fc.*`` is ignored, not listed).
        adapted: names whose tensor was adapted (first convolution to other input channels, 2D kernels to 3D).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)


def _torchvision_to_encoder_key(key: str) -> str:
    """``layer3.1.conv2.weight`` -> ``layers.2.1.conv2.weight``; stem keys are unchanged."""
    if key.startswith("layer") and key[5:6].isdigit():
        stage, rest = key[5:].split(".", 1)
        return f"layers.{int(stage) - 1}.{rest}"
    return key


def _adapt_tensor(name: str, value: torch.Tensor, target: torch.Tensor, report: WeightLoadReport) -> torch.Tensor:
    """Adapt a 2D RGB weight to the encoder's input channels and dimensionality, or raise on a true mismatch."""
    if value.shape == target.shape:
        return value
    adapted = value
    if name == "conv1.weight" and value.ndim == 4 and value.shape[1] != target.shape[1]:
        # Average the RGB filters and spread them over the new channels, scaled so that an image whose channels
        # are all equal gives the same response as the RGB filter on a grey image.
        in_ch = target.shape[1]
        adapted = value.mean(dim=1, keepdim=True).repeat(1, in_ch, 1, 1) * (value.shape[1] / in_ch)
    if adapted.ndim == 4 and target.ndim == 5:
        # Inflate 2D kernels to 3D (I3D style): repeat over depth and divide by it, so a volume that is constant in
        # depth gives the 2D response.
        depth = target.shape[2]
        adapted = adapted.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    if adapted.shape != target.shape:
        raise ValueError(
            f"shape mismatch for {name}: file has {tuple(value.shape)}, encoder expects {tuple(target.shape)}; "
            "is the file a checkpoint of the same ResNet depth (resnet18/34/50)?"
        )
    report.adapted.append(name)
    return adapted


def load_torchvision_resnet_weights(
    encoder: ResNetEncoder, path: str | os.PathLike[str], strict: bool = True
) -> WeightLoadReport:
    """Load ImageNet weights saved in torchvision's ResNet state-dict format from a local file (never downloads).

    The classifier (``fc.*``) is ignored. The first convolution is adapted to other numbers of input channels, and
    2D kernels are inflated to 3D for ``spatial_dims=3``.

    Args:
        encoder: the encoder to fill.
        path: a ``.pth``/``.pt`` file holding a state dict (or a dict with a ``"state_dict"`` entry).
        strict: raise when the file lacks encoder tensors or has tensors the encoder does not know.

    Returns:
        a ``WeightLoadReport`` with the loaded, missing, unexpected and adapted names.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a state dict, a tensor's shape does not match, or (``strict``) keys are
            missing or unexpected.

    Example:
        >>> enc = ResNetEncoder("resnet50", in_channels=1)
        >>> report = load_torchvision_resnet_weights(enc, "/models/resnet50-imagenet.pth")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or non-torch file: say which file
        raise ValueError(f"{path}: cannot be read as a PyTorch state dict ({err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (torchvision ResNet state dict)")
    state = {k.removeprefix("module."): v for k, v in state.items()}

    own = encoder.state_dict()
    report = WeightLoadReport()
    new_state: dict[str, torch.Tensor] = {}
    errors: list[str] = []
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        name = _torchvision_to_encoder_key(key)
        if name not in own:
            report.unexpected.append(key)
            continue
        try:
            new_state[name] = _adapt_tensor(name, value, own[name], report).to(own[name].dtype)
            report.loaded.append(name)
        except ValueError as err:
            errors.append(str(err))
    report.missing = [k for k in own if k not in new_state and not k.endswith("num_batches_tracked")]
    if errors:
        details = "\n  ".join(errors)
        raise ValueError(f"{path}: {len(errors)} tensor(s) do not fit the {encoder.backbone} encoder:\n  {details}")
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"{path}: does not match a torchvision {encoder.backbone}: "
            f"{len(report.missing)} missing key(s) {report.missing[:5]}, "
            f"{len(report.unexpected)} unexpected key(s) {report.unexpected[:5]}"
        )
    encoder.load_state_dict(new_state, strict=False)
    return report
