"""MONAI transforms of the STOIC pipeline: reading and preprocessing an original volume on the fly, cutting 2.5D
slabs (three adjacent axial slices as channels) from lung slices, and the whole chain for 2.5D or 3D input, shared by
training (from the cache) and inference (from the .mha), so that both see the same input."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Randomizable,
    Resized,
    ScaleIntensityRanged,
    SelectItemsd,
)
from monai.utils import convert_to_tensor

from ctan_monai.apps.stoic.checks import read_checked_volume
from ctan_monai.apps.stoic.labels import LABEL_COLUMNS
from ctan_monai.apps.stoic.preprocessing import (
    CROP_MARGIN_MM,
    DEFAULT_SPACING,
    MIN_LUNG_AREA_FRACTION,
    evenly_spaced,
    preprocess_with_lung_slices,
)

__all__ = ["LABEL_KEYS", "LUNG_WINDOW", "LoadStoicCTd", "SampleAxialSlabsd", "stoic_transform"]

LUNG_WINDOW: tuple[float, float] = (-1000.0, 400.0)
# the label keys of every item: each task's 0/1 label and its presence flag
LABEL_KEYS: tuple[str, ...] = tuple(k for task in LABEL_COLUMNS for k in (task, f"{task}_present"))


class SampleAxialSlabsd(Randomizable, MapTransform):
    """Cut 2.5D samples from a volume: axial slices ``z-1, z, z+1`` as three channels, for several ``z``.

    Training draws ``num_samples`` centres at random among the lung slices (without repetition while there are
    enough); evaluation takes ``num_samples`` fixed centres spread evenly over them (all candidates, each once,
    when there are fewer). Each sample is a copy of the input dict with the 2D image and ``slice_index``; the output
    is a list (``monai.data.list_data_collate``, the default of ``monai.data.DataLoader``, flattens it into the
    batch).

    Args:
        keys: the volume key(s), each ``[1, X, Y, Z]`` (channel first, axial axis last, as ``LoadImaged`` gives).
        slices_key: the key holding the candidate centre slices (indices along the last axis).
        num_samples: samples per volume.
        random: draw the centres at random (training) or take fixed, evenly spread ones (evaluation).
        index_key: where the chosen centre goes.
        allow_missing_keys: do not raise when a key is absent.

    Example:
        >>> sampler = SampleAxialSlabsd("image", num_samples=2, random=False)
        >>> out = sampler({"image": torch.zeros(1, 8, 8, 10), "lung_slices": [2, 5, 7]})
        >>> [s["image"].shape for s in out], [s["slice_index"] for s in out]
        ([torch.Size([3, 8, 8]), torch.Size([3, 8, 8])], [2, 7])
    """

    def __init__(
        self,
        keys: KeysCollection,
        slices_key: str = "lung_slices",
        num_samples: int = 4,
        random: bool = True,
        index_key: str = "slice_index",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.slices_key = slices_key
        self.num_samples = num_samples
        self.random = random
        self.index_key = index_key
        self._centres: list[int] = []

    def randomize(self, candidates: Sequence[int]) -> None:
        """Choose the centre slices among ``candidates``."""
        if not self.random:
            self._centres = evenly_spaced(list(candidates), self.num_samples)
            return
        replace = len(candidates) < self.num_samples
        self._centres = [int(c) for c in self.R.choice(candidates, size=self.num_samples, replace=replace)]

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        candidates = [int(c) for c in data[self.slices_key]]
        if not candidates:
            raise ValueError(f"case {data.get('case_id', '?')}: no candidate slice in {self.slices_key!r}")
        self.randomize(candidates)
        samples = []
        for centre in self._centres:
            sample = dict(data)
            for key in self.key_iterator(sample):
                volume = sample[key]
                if not 1 <= centre <= volume.shape[-1] - 2:
                    raise ValueError(f"case {data.get('case_id', '?')}: slice {centre} has no neighbour in {key}")
                slab = volume[0, ..., centre - 1 : centre + 2]  # [X, Y, 3]
                sample[key] = convert_to_tensor(slab, track_meta=False).movedim(-1, 0).contiguous()
            sample[self.index_key] = centre
            samples.append(sample)
        return samples


class LoadStoicCTd(MapTransform):
    """Read an original chest CT (.mha, or any format SimpleITK reads) and preprocess it exactly as
    ``convert_dataset`` does for the cache: checked up front (``read_checked_volume``), resampled to ``spacing``,
    cropped to body and lungs (``preprocess_with_lung_slices``). ``image`` becomes the HU volume ``[1, X, Y, Z]``
    float32 (axial axis last, as ``LoadImaged`` gives the cached NIfTI); the 2.5D centre slices go to
    ``slices_key`` and the file name's stem to ``case_id`` (when absent).

    Args:
        keys: the key(s) holding the file path.
        spacing: resampling voxel size in mm, (x, y, z); must be the training run's.
        margin_mm: crop margin in mm.
        min_area_fraction: lung-area fraction that makes a slice a 2.5D centre (see ``lung_slice_candidates``).
        slices_key: where the centre slices go.
        allow_missing_keys: do not raise when a key is absent.

    Raises:
        DatasetValidationError: naming the file, when it is missing, unreadable or not a plausible chest CT in HU.
        ValueError: naming the file, when no lungs are found in it.

    Example:
        >>> item = LoadStoicCTd("image", spacing=(3.5, 3.5, 5.0))({"image": "data/mha/1.mha"})  # doctest: +SKIP
        >>> item["image"].shape[0], item["case_id"]  # doctest: +SKIP
        (1, '1')
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        spacing: Sequence[float] = DEFAULT_SPACING,
        margin_mm: float = CROP_MARGIN_MM,
        min_area_fraction: float = MIN_LUNG_AREA_FRACTION,
        slices_key: str = "lung_slices",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spacing = [float(s) for s in spacing]
        self.margin_mm = float(margin_mm)
        self.min_area_fraction = float(min_area_fraction)
        self.slices_key = slices_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = Path(os.fspath(d[key]))
            case = str(d.get("case_id", path.name.split(".")[0]))
            image = read_checked_volume(path, case)
            try:
                ct, lung_slices = preprocess_with_lung_slices(
                    image, self.spacing, self.margin_mm, self.min_area_fraction
                )
            except ValueError as err:
                raise ValueError(f"[{case}] {path}: {err}") from err
            hu = sitk.GetArrayFromImage(ct.image).transpose(2, 1, 0)  # [z, y, x] -> [x, y, z]
            d[key] = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None]
            d[self.slices_key] = lung_slices
            d.setdefault("case_id", case)
        return d


def stoic_transform(
    spatial_dims: int = 2,
    training: bool = False,
    image_size: int = 224,
    num_slices: int = 8,
    volume_size: int = 64,
    window: Sequence[float] = LUNG_WINDOW,
    source: str = "cache",
    spacing: Sequence[float] = DEFAULT_SPACING,
    margin_mm: float = CROP_MARGIN_MM,
    min_area_fraction: float = MIN_LUNG_AREA_FRACTION,
    labels: bool = True,
) -> Compose:
    """The transform chain from a data item to network input, for 2.5D or 3D, from the cache or an original file.

    2.5D (``spatial_dims=2``): ``num_slices`` samples per patient, each the axial slices ``z-1, z, z+1`` (lung
    window, [0, 1]) as three channels resized to ``image_size``; random lung slices in training, fixed ones spread
    evenly over the lungs otherwise. The output of one item is a list (``monai.data.DataLoader`` flattens it into the
    batch). 3D (``spatial_dims=3``): the preprocessed volume in the lung window, resized to a ``volume_size`` cube,
    ``[1, D, H, W]``.

    Args:
        spatial_dims: 2 (2.5D) or 3.
        training: random (training) or fixed (evaluation, inference) 2.5D slices.
        image_size: side of the square 2.5D slices.
        num_slices: 2.5D samples per patient.
        volume_size: side of the 3D cube.
        window: HU window mapped to [0, 1].
        source: ``"cache"`` (manifest entries of ``convert_dataset``: cached NIfTI and ``lung_slices``) or
            ``"original"`` (an item ``{"image": path to the .mha}``, preprocessed on the fly with ``spacing``,
            ``margin_mm`` and ``min_area_fraction``, which must then be those of the cache the model was trained on).
        spacing: see ``source``.
        margin_mm: see ``source``.
        min_area_fraction: see ``source``.
        labels: the items carry labels and presence flags (``covid``, ``covid_present``, ...), kept as float tensors.

    Returns:
        the chain; items keep ``image``, the labels, ``case_id`` and (2.5D) ``slice_index``.

    Raises:
        ValueError: for ``spatial_dims`` other than 2 or 3 or an unknown ``source``.

    Example:
        >>> chain = stoic_transform(2, training=False, image_size=96, num_slices=4, source="original",
        ...                         spacing=(3.5, 3.5, 5.0), labels=False)
        >>> samples = chain({"image": "data/mha/1.mha"})  # doctest: +SKIP
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (2.5D) or 3, got {spatial_dims}")
    if source == "cache":
        load: list[Any] = [
            LoadImaged(keys="image", reader="NibabelReader", image_only=True),
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        ]
    elif source == "original":
        load = [LoadStoicCTd("image", spacing=spacing, margin_mm=margin_mm, min_area_fraction=min_area_fraction)]
    else:
        raise ValueError(f"source must be 'cache' or 'original', got {source!r}")
    chain = [
        *load,
        ScaleIntensityRanged(keys="image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
    ]
    if spatial_dims == 2:
        chain += [
            SampleAxialSlabsd("image", num_samples=num_slices, random=training),
            Resized(keys="image", spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True),
        ]
    else:
        chain.append(Resized(keys="image", spatial_size=(volume_size,) * 3, mode="trilinear", anti_aliasing=True))
    label_keys = LABEL_KEYS if labels else ()
    if labels:
        chain.append(EnsureTyped(keys=label_keys, data_type="tensor", dtype=torch.float32, track_meta=False))
    chain += [
        EnsureTyped(keys="image", data_type="tensor", dtype=torch.float32, track_meta=False),
        SelectItemsd(keys=("image", *label_keys, "case_id", *(("slice_index",) if spatial_dims == 2 else ()))),
    ]
    return Compose(chain)
