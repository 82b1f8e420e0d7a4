"""LibMTL's HPS and MTAN as peers in the benchmark: the same setting, batch, loss and optimiser as our four
architectures, timed in the same round-robin.

LibMTL (Lin and Zhang, https://github.com/median-research-group/LibMTL) is the multi-task library our
architectures are most often compared with. Its ``HPS`` and ``MTAN`` architectures run here with its own ResNet
(``LibMTL.model``, stride 32 as our encoder, the first convolution taking the setting's input channels) and, per
task, the decoder of its NYUv2 example: a DeepLab v3 head (atrous spatial pyramid pooling at rates 12, 24 and 36,
256 channels, then a 3x3 convolution and a 1x1 to the task's channels) on the encoder's last feature map, whose
output LibMTL's NYUv2 trainer interpolates to the input size (bilinear). The head is written here: LibMTL ships it
with the example, not in the package. Image-level tasks get global average pooling and a linear layer. Loss
(``MultiTaskLoss`` with DWA) and optimiser (Adam) are ours for every architecture, so what differs is the
architecture as each library builds it.

Install (its wheel requires torchvision, which this project does not use; LibMTL only imports a download helper
from it, never called here, and ``_stand_in_for_torchvision`` provides that helper from ``torch.hub``)::

    pip install --no-deps LibMTL==1.1.5
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from throughput_lib.models import ArchBench
from throughput_lib.settings import BenchmarkOptions, BenchmarkSetting

PEER_ARCHS = {"libmtl_hps": "HPS", "libmtl_mtan": "MTAN"}
INSTALL_HINT = "pip install --no-deps LibMTL==1.1.5"


class PeerUnavailableError(RuntimeError):
    """The peer library is not installed."""


def _stand_in_for_torchvision() -> None:
    """Register ``torchvision.models.utils.load_state_dict_from_url`` from ``torch.hub`` when torchvision is absent.

    LibMTL's ResNet module imports that one name at import time (for pretrained weights, which the benchmark does
    not load). A real torchvision, when installed, is left alone.
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    root = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    utils = types.ModuleType("torchvision.models.utils")
    utils.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    root.models, models.utils = models, utils
    root.__path__, models.__path__ = [], []  # packages, so that the submodule import resolves
    sys.modules.update({"torchvision": root, "torchvision.models": models, "torchvision.models.utils": utils})


def import_libmtl() -> types.ModuleType:
    """Import LibMTL's architectures and models.

    Returns:
        the ``LibMTL`` package, with ``LibMTL.architecture`` and ``LibMTL.model`` imported.

    Raises:
        PeerUnavailableError: when LibMTL is not installed (with the install command).
    """
    if importlib.util.find_spec("LibMTL") is None:
        raise PeerUnavailableError(f"LibMTL is not installed; for the peer benchmark: {INSTALL_HINT}")
    _stand_in_for_torchvision()
    package = importlib.import_module("LibMTL")
    importlib.import_module("LibMTL.architecture")
    importlib.import_module("LibMTL.model")
    return package


class AtrousPyramidHead(nn.Module):
    """DeepLab v3 head, as LibMTL's NYUv2 example decodes each task: ASPP (a 1x1 branch, three 3x3 atrous branches
    and image pooling, 256 channels each, concatenated and projected to 256), a 3x3 convolution, a 1x1 to the task.

    Args:
        in_channels: channels of the encoder's feature map.
        out_channels: the task's channels.
        rates: dilation rates of the atrous branches.
        width: channels of every branch.

    Example:
        >>> AtrousPyramidHead(512, 5)(torch.zeros(2, 512, 4, 4)).shape
        torch.Size([2, 5, 4, 4])
    """

    def __init__(
        self, in_channels: int, out_channels: int, rates: tuple[int, ...] = (12, 24, 36), width: int = 256
    ) -> None:
        super().__init__()

        def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
            pad = dilation * (kernel // 2)
            return nn.Sequential(
                nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, width, 1), *(conv_bn_relu(in_channels, width, 3, r) for r in rates)]
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, width, 1))
        self.project = nn.Sequential(conv_bn_relu(width * (len(rates) + 2), width, 1), nn.Dropout(0.5))
        self.head = nn.Sequential(conv_bn_relu(width, width, 3), nn.Conv2d(width, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the task's map at the feature map's resolution."""
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        features = torch.cat([*(branch(x) for branch in self.branches), pooled], dim=1)
        return self.head(self.project(features))


class _ImageHead(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _LibMTLNet(nn.Module):
    """A LibMTL architecture in our network convention: ``{task: output}``, pixel maps at the input size."""

    def __init__(self, architecture: nn.Module, pixel_tasks: set[str]) -> None:
        super().__init__()
        self.architecture = architecture
        self.pixel_tasks = pixel_tasks

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.architecture(x)
        size = x.shape[-2:]
        for name in self.pixel_tasks:  # LibMTL's NYUv2 trainer brings every map to the input size
            outputs[name] = F.interpolate(outputs[name], size=size, mode="bilinear", align_corners=True)
        return outputs


def build_libmtl_network(peer: str, setting: BenchmarkSetting, device: torch.device) -> nn.Module:
    """LibMTL's HPS or MTAN for the setting's tasks, with its ResNet encoder and NYUv2-style heads.

    Args:
        peer: ``"libmtl_hps"`` or ``"libmtl_mtan"``.
        setting: the setting (backbone, input channels, tasks).
        device: where LibMTL builds its attention modules.

    Returns:
        a module returning ``{task_name: output}`` as our networks do.

    Raises:
        ValueError: for an unknown peer or a backbone LibMTL does not have.
        PeerUnavailableError: when LibMTL is not installed.

    Example:
        >>> net = build_libmtl_network("libmtl_mtan", replace(SETTINGS["openkbp"], backbone="resnet18"), "cpu")
    """
    if peer not in PEER_ARCHS:
        raise ValueError(f"unknown peer {peer!r}; choose from {sorted(PEER_ARCHS)}")
    libmtl = import_libmtl()
    make_resnet = getattr(libmtl.model, setting.backbone, None)
    if make_resnet is None:
        raise ValueError(f"LibMTL has no backbone {setting.backbone!r}")
    resnet = make_resnet()
    if setting.in_channels != 3:  # as ours: the stem takes the setting's channels
        resnet.conv1 = nn.Conv2d(setting.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    feature_channels = int(resnet.feature_dim)

    specs = setting.task_specs()
    decoders = nn.ModuleDict(
        {
            t.name: AtrousPyramidHead(feature_channels, t.out_channels)
            if t.level == "pixel"
            else _ImageHead(feature_channels, t.out_channels)
            for t in specs
        }
    )
    architecture = getattr(libmtl.architecture, PEER_ARCHS[peer])(
        task_name=[t.name for t in specs],
        encoder_class=lambda: resnet,  # LibMTL's architectures call it once, to build their encoder
        decoders=decoders,
        rep_grad=False,
        multi_input=False,
        device=torch.device(device),
    )
    return _LibMTLNet(architecture, {t.name for t in specs if t.level == "pixel"})


class PeerBench(ArchBench):
    """A LibMTL architecture timed like ``ArchBench``: the same batch, loss (DWA) and Adam settings.

    Args:
        arch: ``"libmtl_hps"`` or ``"libmtl_mtan"``; the other arguments as ``ArchBench``'s.

    Raises:
        PeerUnavailableError: when LibMTL is not installed.

    Example:
        >>> bench = PeerBench("libmtl_mtan", replace(SETTINGS["openkbp"], backbone="resnet18", size=64, batch=2),
        ...                   BenchmarkOptions())
        >>> bench.train_step()
    """

    def build_network(self) -> nn.Module:
        """LibMTL's network of ``self.arch`` (see ``build_libmtl_network``)."""
        return build_libmtl_network(self.arch, self.setting, self.device)


def make_bench(
    arch: str,
    setting: BenchmarkSetting,
    options: BenchmarkOptions,
    batch: Mapping[str, torch.Tensor] | None = None,
) -> ArchBench:
    """Our architecture or a peer's, ready to be timed.

    Args:
        arch: one of ours (``ARCHS``) or a peer (``PEER_ARCHS``).
        setting: the setting.
        options: how to measure.
        batch: the CPU batch.

    Returns:
        the ``ArchBench`` (or ``PeerBench``).
    """
    if arch in PEER_ARCHS:
        return PeerBench(arch, setting, options, batch)
    return ArchBench(arch, setting, options, batch)
