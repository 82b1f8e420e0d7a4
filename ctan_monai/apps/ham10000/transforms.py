"""HAM10000 transforms: presence flags, the training, evaluation, mask and inference chains."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import PILReader
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    Resized,
    ScaleIntensityRanged,
)
from PIL import Image

logger = logging.getLogger(__name__)

#: ImageNet statistics of RGB in [0, 1], as used to pretrain torchvision's ResNets.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


class AddPresenceFlagsd(MapTransform):
    """Add the float flag ``<key>_present`` for each key: 1 when the sample has that label, 0 when it has not.

    A flag the datalist already holds is kept (a datalist can mark a label as missing even when a placeholder
    value is there).

    Args:
        keys: task names (e.g. ``("seg", "dx")``).
        allow_missing_keys: kept for the ``MapTransform`` interface; a missing key always gives a 0 flag.

    Example:
        >>> AddPresenceFlagsd(["seg", "dx"])({"dx": 3})
        {'dx': 3, 'seg_present': tensor(0.), 'dx_present': tensor(1.)}
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with the flags added.

        Args:
            data: a sample.

        Returns:
            the sample with one ``<key>_present`` float tensor per key.
        """
        d = dict(data)
        for key in self.keys:
            flag = f"{key}_present"
            d[flag] = torch.as_tensor(d.get(flag, 1.0 if key in d else 0.0), dtype=torch.float32)
        return d


def _spatial_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be an int or (height, width) of positive ints, got {size}")
    return size  # type: ignore[return-value]


def _load_and_resize(size: tuple[int, int]) -> list[Any]:
    """Read image (RGB) and mask (grey through its palette), channel first [C, H, W], to one grid, mask to 0/1."""
    # reverse_indexing=False keeps numpy's (row, column) order, so tensors are [C, H, W] like torchvision's.
    rgb = PILReader(converter=functools.partial(Image.Image.convert, mode="RGB"), reverse_indexing=False)
    grey = PILReader(converter=functools.partial(Image.Image.convert, mode="L"), reverse_indexing=False)
    return [
        LoadImaged("image", reader=rgb, image_only=True),
        LoadImaged("seg", reader=grey, image_only=True),
        EnsureChannelFirstd(["image", "seg"]),
        AsDiscreted("seg", threshold=0.5),  # 0/255 and 0/1 masks both give 0/1
        ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        Resized(
            ["image", "seg"],
            spatial_size=size,
            mode=("bilinear", "nearest"),
            align_corners=(False, None),
            anti_aliasing=(True, False),
        ),
    ]


def _finish() -> list[Any]:
    """ImageNet normalisation, label types and presence flags."""
    return [
        NormalizeIntensityd("image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True),
        EnsureTyped("image", dtype=torch.float32),
        EnsureTyped("seg", dtype=torch.int64),
        EnsureTyped("dx", dtype=torch.int64, track_meta=False, allow_missing_keys=True),
        AddPresenceFlagsd(["seg", "dx"]),
    ]


def eval_transforms(size: int | Sequence[int] = DEFAULT_SIZE) -> Compose:
    """Deterministic transforms for validation, testing and inference.

    Output: ``image`` float32 [3, H, W] normalised with the ImageNet mean/std, ``seg`` int64 0/1 [1, H, W],
    ``dx`` int64 scalar (when in the input), ``seg_present`` and ``dx_present`` float 1.

    Args:
        size: output size, an int for a square or ``(height, width)``; default 224 (see the module docstring).

    Returns:
        the MONAI ``Compose``.

    Raises:
        ValueError: for a malformed size.

    Example:
        >>> t = eval_transforms(224)  # then t({"image": "x.jpg", "seg": "x_segmentation.png", "dx": 5})
    """
    return Compose([*_load_and_resize(_spatial_size(size)), *_finish()])


def mask_transforms(size: int | Sequence[int] = DEFAULT_SIZE) -> Compose:
    """Mask-only transforms giving the ``seg`` of :func:`eval_transforms`, without decoding the image: the mask read
    as 8-bit grey through its palette, thresholded to 0/1 and resized to ``size`` with nearest interpolation (the
    same steps, in the same order). Used to build the mean training mask of the segmentation floor.

    Args:
        size: output size, an int for a square or ``(height, width)``; default 224.

    Returns:
        the MONAI ``Compose`` mapping ``{"seg": path, ...}`` to the same dict with ``seg`` int64 0/1 [1, H, W].

    Raises:
        ValueError: for a malformed size.

    Example:
        >>> t = mask_transforms(224)  # then t({"seg": "ISIC_0024306_segmentation.png"})["seg"].shape == (1, 224, 224)
    """
    grey = PILReader(converter=functools.partial(Image.Image.convert, mode="L"), reverse_indexing=False)
    return Compose(
        [
            LoadImaged("seg", reader=grey, image_only=True),
            EnsureChannelFirstd("seg"),
            AsDiscreted("seg", threshold=0.5),
            Resized("seg", spatial_size=_spatial_size(size), mode="nearest", anti_aliasing=False),
            EnsureTyped("seg", dtype=torch.int64),
        ]
    )


def inference_transforms(size: int | Sequence[int] = DEFAULT_SIZE) -> Compose:
    """Image-only transforms for inference (no mask, no diagnosis): as :func:`eval_transforms` for the image.

    Args:
        size: output size, an int for a square or ``(height, width)``; default 224.

    Returns:
        the MONAI ``Compose`` mapping ``{"image": path}`` to ``{"image": float32 [3, H, W]}``.

    Raises:
        ValueError: for a malformed size.

    Example:
        >>> t = inference_transforms(224)  # then t({"image": "ISIC_0024306.jpg"})
    """
    rgb = PILReader(converter=functools.partial(Image.Image.convert, mode="RGB"), reverse_indexing=False)
    return Compose(
        [
            LoadImaged("image", reader=rgb, image_only=True),
            EnsureChannelFirstd("image"),
            ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
            Resized(
                "image", spatial_size=_spatial_size(size), mode="bilinear", align_corners=False, anti_aliasing=True
            ),
            NormalizeIntensityd("image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )


def train_transforms(
    size: int | Sequence[int] = DEFAULT_SIZE,
    flip_prob: float = 0.5,
    affine_prob: float = 0.5,
    rotate_degrees: float = 20.0,
    scale_range: float = 0.1,
    color_prob: float = 0.5,
    brightness: float = 0.1,
    color_balance: float = 0.05,
    contrast_gamma: tuple[float, float] = (0.8, 1.25),
) -> Compose:
    """Training transforms: those of :func:`eval_transforms` plus augmentation.

    Spatial (applied with the same draw to image and mask; the mask with nearest interpolation): flips along both
    axes and, for a square size, rotations by multiples of 90 degrees (a dermatoscopic image has no canonical
    orientation); a random affine with a small rotation and scaling. Colour (image only, on [0, 1] before the
    normalisation, mild because colour is diagnostic): brightness (one gain), colour balance (one gain per channel,
    like a change of illuminant), contrast (gamma); the result is clipped to [0, 1].

    Args:
        size: output size, an int for a square or ``(height, width)``; default 224.
        flip_prob: probability of each flip (and of the 90-degree rotation).
        affine_prob: probability of the random affine.
        rotate_degrees: the affine's rotation is drawn from +-``rotate_degrees``.
        scale_range: the affine's scaling is drawn from 1 +- ``scale_range``.
        color_prob: probability of each colour transform; 0 switches colour augmentation off.
        brightness: brightness gain drawn from 1 +- ``brightness``.
        color_balance: per-channel gain drawn from 1 +- ``color_balance``.
        contrast_gamma: range of the contrast gamma.

    Returns:
        the MONAI ``Compose`` (seed it with ``set_random_state`` for reproducible draws).

    Raises:
        ValueError: for a malformed size.

    Example:
        >>> t = train_transforms(224).set_random_state(seed=0)
    """
    spatial_size = _spatial_size(size)
    keys = ["image", "seg"]
    augment: list[Any] = [
        RandFlipd(keys, prob=flip_prob, spatial_axis=0),
        RandFlipd(keys, prob=flip_prob, spatial_axis=1),
    ]
    if spatial_size[0] == spatial_size[1]:  # a 90-degree turn of a non-square grid would change its shape
        augment.append(RandRotate90d(keys, prob=flip_prob, max_k=3))
    augment += [
        RandAffined(
            keys,
            prob=affine_prob,
            rotate_range=math.radians(rotate_degrees),
            scale_range=(scale_range, scale_range),
            mode=("bilinear", "nearest"),
            padding_mode="reflection",  # skin continues past the border better than black corners
        ),
        RandScaleIntensityd("image", factors=brightness, prob=color_prob),
        RandScaleIntensityd("image", factors=color_balance, prob=color_prob, channel_wise=True),
        RandAdjustContrastd("image", prob=color_prob, gamma=contrast_gamma),
        ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ]
    return Compose([*_load_and_resize(spatial_size), *augment, *_finish()])
