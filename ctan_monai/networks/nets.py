"""The four architectures of the paper: single-task learning (STL), hard parameter sharing (HPS), the multi-task
attention network (MTAN, Liu et al. 2019) and the cross-task attention network (CTAN). Each takes one image tensor
and returns ``{task_name: tensor}``: [B, C, *spatial] at the input size for pixel-level tasks, [B, C] logits for
image-level tasks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ctan_monai.networks.attention import CrossTaskAttentionBottleneck, TaskAttentionStage
from ctan_monai.networks.decoders import ImageDecoder, PixelDecoder
from ctan_monai.networks.encoder import ResNetEncoder, load_torchvision_resnet_weights
from ctan_monai.tasks import TaskSpec, parse_tasks

__all__ = ["ARCHITECTURES", "CTAN", "HPS", "MTAN", "STL", "MultiTaskNet", "build_network", "fine_channels_per_task"]


def _make_decoder(
    task: TaskSpec,
    spatial_dims: int,
    skip_channels: Sequence[int],
    bottleneck_channels: int,
    pixel_decoder_channels: Sequence[int],
    image_decoder_channels: Sequence[int],
    dropout: float,
    fine_decoder_channels: Sequence[int] = (),
    in_channels: int = 1,
) -> nn.Module:
    if task.level == "pixel":
        return PixelDecoder(
            spatial_dims,
            skip_channels,
            bottleneck_channels,
            task.out_channels,
            pixel_decoder_channels,
            output_scale=task.output_scale,
            output_bias=task.output_bias,
            fine_channels=fine_decoder_channels,
            image_channels=in_channels,
        )
    if task.output_scale != 1.0 or task.output_bias != 0.0:
        raise ValueError(f"task {task.name!r}: output_scale / output_bias are supported for pixel-level tasks only")
    return ImageDecoder(
        spatial_dims, skip_channels, bottleneck_channels, task.out_channels, image_decoder_channels, dropout
    )


def fine_channels_per_task(
    fine_decoder_channels: Sequence[int] | Mapping[str, Sequence[int]], task_names: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """Resolve ``fine_decoder_channels`` (one list for all tasks, or ``{task_name: widths}``) to widths per task.

    Args:
        fine_decoder_channels: one sequence of widths for every task, or a mapping from task names to widths.
        task_names: the network's tasks.

    Returns:
        ``{task_name: widths}`` for every task (empty: the paper's decoder).

    Raises:
        ValueError: when the mapping names a task the network does not have.

    Example:
        >>> fine_channels_per_task({"seg": [64]}, ["seg", "dose"])
        {'seg': (64,), 'dose': ()}
    """
    if isinstance(fine_decoder_channels, Mapping):
        unknown = sorted(set(fine_decoder_channels) - set(task_names))
        if unknown:
            raise ValueError(f"fine_decoder_channels names task(s) {unknown} the network does not have ({task_names})")
        return {n: tuple(int(c) for c in fine_decoder_channels.get(n, ())) for n in task_names}
    widths = tuple(int(c) for c in fine_decoder_channels)
    return {n: widths for n in task_names}


class MultiTaskNet(nn.Module):
    """Common parts: the shared ResNet encoder, one decoder per task, input checks, ImageNet weights.

    Args:
        tasks: task declarations (``TaskSpec`` or dicts).
        backbone: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        pretrained_weights: optional local file with torchvision-format ImageNet ResNet weights.
        bottleneck_channels: channels the decoders receive from the bottleneck (default: the encoder's last stage).
        pixel_decoder_channels: widths of the pixel decoders' up-sampling blocks.
        image_decoder_channels: widths of the image decoders' down-sampling layers.
        dropout: dropout before the image decoders' fully connected layer.
        stem_stride: stride of the encoder's first convolution.
        fine_decoder_channels: widths of up to two up-sampling blocks that the pixel decoders add past the paper's
            three (to the stem's resolution with the stem feature as skip, then to the input's with the image as
            skip); empty (default) is the paper's decoder, whose head works at 1/4 of the input resolution. One
            list for every pixel task, or ``{task_name: widths}`` for some of them (the others keep the paper's
            decoder), e.g. ``{"seg": [64]}``: fine organ boundaries, while a smooth dose map does not pay for it.
        input_windows: fixed intensity windows ``(low, high)`` whose clipped copies of the input join it before the
            encoder's first convolution (see ``ResNetEncoder``); empty (default) is the paper's input.
    """

    def __init__(
        self,
        tasks: Iterable[TaskSpec | Mapping[str, Any]],
        backbone: str = "resnet50",
        spatial_dims: int = 2,
        in_channels: int = 1,
        pretrained_weights: str | os.PathLike[str] | None = None,
        bottleneck_channels: int | None = None,
        pixel_decoder_channels: Sequence[int] = (256, 128, 64),
        image_decoder_channels: Sequence[int] = (128, 256, 512, 512),
        dropout: float = 0.0,
        stem_stride: int = 2,
        fine_decoder_channels: Sequence[int] | Mapping[str, Sequence[int]] = (),
        input_windows: Sequence[Sequence[float]] = (),
    ) -> None:
        super().__init__()
        self.task_specs = parse_tasks(tasks)
        self.task_names = [t.name for t in self.task_specs]
        fine_widths = fine_channels_per_task(fine_decoder_channels, self.task_names)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.encoder = ResNetEncoder(backbone, spatial_dims, in_channels, stem_stride, input_windows)
        if pretrained_weights:
            self.weight_report = load_torchvision_resnet_weights(self.encoder, pretrained_weights)
        enc = self.encoder.out_channels
        self.bottleneck_channels = int(bottleneck_channels or enc[3])
        self.decoders = nn.ModuleDict(
            {
                t.name: _make_decoder(
                    t,
                    spatial_dims,
                    enc[:3],
                    self.bottleneck_channels,
                    pixel_decoder_channels,
                    image_decoder_channels,
                    dropout,
                    fine_widths[t.name],
                    in_channels,
                )
                for t in self.task_specs
            }
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                "expected input [B, C, *spatial] with "
                + str(self.spatial_dims)
                + " spatial dims, got shape "
                + str(list(x.shape))
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                "expected "
                + str(self.in_channels)
                + " input channels, got "
                + str(x.shape[1])
                + " (shape "
                + str(list(x.shape))
                + ")"
            )


class HPS(MultiTaskNet):
    """Hard parameter sharing: one shared encoder, one decoder per task; every decoder reads the shared stage
    features P^1..P^3 (skips) and P^4 (bottleneck).

    Args:
        tasks, backbone, spatial_dims, in_channels, pretrained_weights, **kwargs: see ``MultiTaskNet``.

    Example:
        >>> net = HPS([{"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 3}],
        ...           backbone="resnet18")
        >>> net(torch.zeros(1, 1, 64, 64))["seg"].shape
        torch.Size([1, 3, 64, 64])
    """

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{task_name: output}``."""
        self._check_input(x)
        stem, _, ps = self.encoder(x)
        skips = ps[:3]
        size = list(x.shape[2:])
        fine = [stem, x]
        outputs: dict[str, torch.Tensor] = {}
        for name, decoder in self.decoders.items():
            outputs[name] = decoder(skips, ps[3], size, fine)
        return outputs


class _TaskAttentionNet(MultiTaskNet):
    """Shared encoder + per-task attention at every stage; task t's skips and bottleneck are its own features."""

    cross_task: bool = False

    def __init__(self, tasks: Iterable[TaskSpec | Mapping[str, Any]], reduction: int = 4, **kwargs: Any) -> None:
        super().__init__(tasks, **kwargs)
        enc = self.encoder.out_channels
        num_tasks = len(self.task_names)
        self.stages = nn.ModuleList(
            [
                TaskAttentionStage(
                    self.spatial_dims,
                    enc[j],
                    num_tasks,
                    first=j == 0,
                    next_channels=enc[j + 1] if j < 3 else 0,
                    cross_task=self.cross_task,
                    reduction=reduction,
                )
                for j in range(4)
            ]
        )

    def _task_features(
        self, x: torch.Tensor
    ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], list[torch.Tensor]]:
        """Per task, the attended features of stages 1-3 (skips), per task the stage-4 feature, and the shared
        fine-decoder inputs (stem feature, image)."""
        stem, us, ps = self.encoder(x)
        per_stage: list[list[torch.Tensor]] = []
        previous: list[torch.Tensor] = []
        for j, stage in enumerate(self.stages):
            features, previous = stage(us[j], ps[j], previous)
            per_stage.append(features)
        skips = [[per_stage[0][t], per_stage[1][t], per_stage[2][t]] for t in range(len(self.task_names))]
        return skips, per_stage[3], [stem, x]

    def _decode(
        self,
        skips: list[list[torch.Tensor]],
        bottlenecks: list[torch.Tensor],
        size: list[int],
        fine: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        for t, (name, decoder) in enumerate(self.decoders.items()):
            outputs[name] = decoder(skips[t], bottlenecks[t], size, fine)
        return outputs


class MTAN(_TaskAttentionNet):
    """Multi-task attention network (Liu et al., CVPR 2019) on the ResNet encoder: per task and stage an attention
    block over concat(U^j, previous task feature) gives a mask A_t^j; the task feature is A_t^j * P^j. Tasks share
    nothing but the encoder; their attention blocks never see each other.

    Args:
        tasks: task declarations.
        reduction: hidden width divisor of the attention blocks.
        **kwargs: see ``MultiTaskNet``.

    Example:
        >>> tasks = [{"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 3},
        ...          {"name": "dx", "level": "image", "kind": "classification", "out_channels": 7}]
        >>> {k: tuple(v.shape) for k, v in MTAN(tasks, backbone="resnet18")(torch.zeros(2, 1, 64, 64)).items()}
        {'seg': (2, 3, 64, 64), 'dx': (2, 7)}
    """

    cross_task = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{task_name: output}``."""
        self._check_input(x)
        skips, bottlenecks, fine = self._task_features(x)
        return self._decode(skips, bottlenecks, list(x.shape[2:]), fine)


class CTAN(_TaskAttentionNet):
    """Cross-task attention network (Kim, Purdie, McIntosh 2023).

    Encoder (CTAE, Eq. 1): the MTAN attention blocks, but task t's feature is built with the other task's mask,
    Â_t^j = Pool(A_{t'}^j * P^j) (with more than two tasks, the mean of the other tasks' masks). Bottleneck (CTAB,
    Eq. 2): Ā_t = Ê_t (Ê_{t'}^T Ê_t) on the task-embedded stage-4 features, normalised by default (see
    ``cross_task_attention``); Ā_t is what task t's decoder receives.

    Args:
        tasks: task declarations.
        ctab_channels: channels of the task embeddings Ê_t (default: a quarter of the encoder's last stage, 512 for
            ResNet-50, 128 for ResNet-18/34).
        ctab_normalization: ``"mean"`` (default), ``"none"`` (Eq. 2 as printed) or ``"softmax"``.
        ctab_residual: add Ê_t to Ā_t (ours; off by default, as in the paper).
        reduction: hidden width divisor of the attention blocks.
        **kwargs: see ``MultiTaskNet``.

    Example:
        >>> tasks = [{"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 5},
        ...          {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1}]
        >>> out = CTAN(tasks, backbone="resnet18")(torch.zeros(2, 1, 64, 64))
        >>> tuple(out["seg"].shape), tuple(out["dose"].shape)
        ((2, 5, 64, 64), (2, 1, 64, 64))
    """

    cross_task = True

    def __init__(
        self,
        tasks: Iterable[TaskSpec | Mapping[str, Any]],
        ctab_channels: int | None = None,
        ctab_normalization: str = "mean",
        ctab_residual: bool = False,
        reduction: int = 4,
        **kwargs: Any,
    ) -> None:
        backbone = kwargs.get("backbone", "resnet50")
        last = 2048 if backbone == "resnet50" else 512
        ctab_channels = int(ctab_channels or last // 4)
        super().__init__(tasks, reduction=reduction, bottleneck_channels=ctab_channels, **kwargs)
        self.ctab = CrossTaskAttentionBottleneck(
            self.spatial_dims,
            self.encoder.out_channels[3],
            ctab_channels,
            len(self.task_names),
            normalization=ctab_normalization,
            residual=ctab_residual,
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{task_name: output}``."""
        self._check_input(x)
        skips, bottlenecks, fine = self._task_features(x)
        return self._decode(skips, self.ctab(bottlenecks), list(x.shape[2:]), fine)


class STL(nn.Module):
    """Single-task learning: one independent encoder-decoder network per task (an ``HPS`` with one task each),
    behind the same dict interface. Trained on the plain sum of the task losses it is the same as training each
    network alone, since the parameters are disjoint.

    Args:
        tasks: task declarations.
        **kwargs: passed to each per-task ``HPS``.

    Example:
        >>> tasks = [{"name": "covid", "level": "image", "kind": "classification", "out_channels": 1},
        ...          {"name": "severe", "level": "image", "kind": "classification", "out_channels": 1}]
        >>> net = STL(tasks, backbone="resnet18", in_channels=3)
        >>> {k: tuple(v.shape) for k, v in net(torch.zeros(2, 3, 64, 64)).items()}
        {'covid': (2, 1), 'severe': (2, 1)}
    """

    def __init__(self, tasks: Iterable[TaskSpec | Mapping[str, Any]], **kwargs: Any) -> None:
        super().__init__()
        self.task_specs = parse_tasks(tasks)
        self.task_names = [t.name for t in self.task_specs]
        fine = fine_channels_per_task(kwargs.pop("fine_decoder_channels", ()), self.task_names)
        self.nets = nn.ModuleDict(
            {t.name: HPS([t], fine_decoder_channels=fine[t.name], **kwargs) for t in self.task_specs}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{task_name: output}``."""
        outputs: dict[str, torch.Tensor] = {}
        for _, net in self.nets.items():
            outputs.update(net(x))
        return outputs


ARCHITECTURES: dict[str, type[nn.Module]] = {"stl": STL, "hps": HPS, "mtan": MTAN, "ctan": CTAN}


def build_network(
    arch: str,
    tasks: Iterable[TaskSpec | Mapping[str, Any]],
    backbone: str = "resnet50",
    spatial_dims: int = 2,
    in_channels: int = 1,
    pretrained_weights: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build one of the four architectures by name: the single entry point for bundle configs
    (``_target_: ctan_monai.networks.build_network``) and for ``--arch`` overrides on the command line.

    Args:
        arch: ``"stl"``, ``"hps"``, ``"mtan"`` or ``"ctan"`` (case-insensitive).
        tasks: task declarations (``TaskSpec`` or dicts with name, level, kind, out_channels).
        backbone: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        pretrained_weights: optional local file with torchvision-format ImageNet ResNet weights (never downloaded).
        options: architecture options as one mapping (a config can pass ``{'ctab_normalization': ...}`` for CTAN
            and ``{}`` for the baselines); merged under ``kwargs``.
        **kwargs: architecture options (e.g. ``ctab_normalization`` for CTAN, decoder widths); options that an
            architecture does not take are rejected with an error naming them.

    Returns:
        the network; ``net(x)`` returns ``{task_name: tensor}``.

    Raises:
        ValueError: for an unknown architecture or an option it does not take.

    Example:
        >>> tasks = [{"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 5},
        ...          {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1}]
        >>> net = build_network("ctan", tasks, backbone="resnet18")
        >>> sorted(net(torch.zeros(1, 1, 64, 64)))
        ['dose', 'seg']
    """
    key = str(arch).lower()
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    kwargs = {**dict(options or {}), **kwargs}
    ctan_only = {"ctab_channels", "ctab_normalization", "ctab_residual"}
    attention_only = {"reduction"}
    allowed = {
        "bottleneck_channels",
        "pixel_decoder_channels",
        "image_decoder_channels",
        "dropout",
        "stem_stride",
        "fine_decoder_channels",
        "input_windows",
    }
    if key == "ctan":
        allowed |= ctan_only | attention_only
        allowed -= {"bottleneck_channels"}
    elif key == "mtan":
        allowed |= attention_only
    rejected = sorted(set(kwargs) - allowed)
    if rejected:
        raise ValueError(f"architecture {key!r} does not take option(s) {rejected}")
    common = dict(
        backbone=backbone, spatial_dims=spatial_dims, in_channels=in_channels, pretrained_weights=pretrained_weights
    )
    return ARCHITECTURES[key](tasks, **common, **kwargs)
