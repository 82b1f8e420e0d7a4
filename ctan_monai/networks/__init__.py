"""Networks: the ResNet encoder, task attention (MTAN, CTAE), the cross-task attention bottleneck (CTAB), the
decoders and the four architectures (STL, HPS, MTAN, CTAN)."""

from ctan_monai.networks.attention import (
    CrossTaskAttentionBottleneck,
    TaskAttentionBlock,
    TaskAttentionStage,
    cross_task_attention,
    mix_other_tasks,
)
from ctan_monai.networks.decoders import ImageDecoder, PixelDecoder
from ctan_monai.networks.encoder import ResNetEncoder, WeightLoadReport, load_torchvision_resnet_weights
from ctan_monai.networks.nets import ARCHITECTURES, CTAN, HPS, MTAN, STL, MultiTaskNet, build_network
from ctan_monai.networks.wrappers import TaskOutput

__all__ = [
    "ARCHITECTURES",
    "CTAN",
    "HPS",
    "MTAN",
    "STL",
    "CrossTaskAttentionBottleneck",
    "ImageDecoder",
    "MultiTaskNet",
    "PixelDecoder",
    "ResNetEncoder",
    "TaskAttentionBlock",
    "TaskAttentionStage",
    "TaskOutput",
    "WeightLoadReport",
    "build_network",
    "cross_task_attention",
    "load_torchvision_resnet_weights",
    "mix_other_tasks",
]
