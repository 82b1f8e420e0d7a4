"""The prostate bundle's grid: the orientation the network is trained in (OpenKBP's), reorientation to and from it,
the spacing along its axes, and in-plane resizing of volumes (shared by preparation and inference)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Resize
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

__all__ = ["BUNDLE_AXCODES", "oriented_spacing", "reorient", "resize_in_plane"]

BUNDLE_AXCODES = "PLI"  # the OpenKBP cache's orientation (rows A->P, columns R->L, slices S->I)


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str = BUNDLE_AXCODES, inverse: bool = False) -> np.ndarray:
    """Permute and flip a 3D array stored with ``affine`` (voxel -> RAS) into ``axcodes`` order, or back.

    The same axis choice as MONAI's ``Orientation`` (nibabel's ``io_orientation``), without resampling.

    Args:
        array: a 3D array in the stored order (``inverse=False``) or in ``axcodes`` order (``inverse=True``).
        affine: the stored array's voxel-to-RAS affine.
        axcodes: the target axis codes, e.g. ``"PLI"``.
        inverse: undo the reorientation (``axcodes`` order -> stored order).

    Returns:
        the reoriented array (a view where possible).

    Example:
        >>> reorient(np.zeros((4, 5, 6)), np.diag([-1.0, -1.0, 1.0, 1.0])).shape  # stored L, P, S
        (5, 4, 6)
    """
    stored = io_orientation(affine)
    target = axcodes2ornt(tuple(axcodes))
    transform = ornt_transform(target, stored) if inverse else ornt_transform(stored, target)
    return apply_orientation(array, transform)


def oriented_spacing(affine: np.ndarray, axcodes: str = BUNDLE_AXCODES) -> list[float]:
    """The voxel size (mm) along the axes of an array reoriented to ``axcodes``.

    Args:
        affine: the stored array's voxel-to-RAS affine.
        axcodes: the target axis codes.

    Returns:
        three spacings, in the reoriented axis order.

    Example:
        >>> oriented_spacing(np.diag([-6.0, -5.0, 4.0, 1.0]))
        [5.0, 6.0, 4.0]
    """
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(axcodes)))
    spacing = [0.0, 0.0, 0.0]
    for axis, (new_axis, _) in enumerate(transform):
        spacing[int(new_axis)] = float(zooms[axis])
    return spacing


def resize_in_plane(volume: torch.Tensor, spatial_size: Sequence[int] | None, nearest: bool) -> torch.Tensor:
    """Resize every axial slice of a ``[C, H, W, S]`` volume to ``spatial_size`` ``(H', W')``, as the slice dataset
    resizes its training slices (area averaging when shrinking, bilinear when enlarging, nearest for labels).

    Args:
        volume: ``[C, H, W, S]``.
        spatial_size: ``(H', W')``, or None to keep the size.
        nearest: nearest-neighbour interpolation (label maps, masks).

    Returns:
        ``[C, H', W', S]`` of the input's dtype.

    Example:
        >>> resize_in_plane(torch.ones(1, 8, 8, 3), (4, 4), nearest=False).shape
        torch.Size([1, 4, 4, 3])
    """
    if spatial_size is None or tuple(volume.shape[1:3]) == tuple(int(s) for s in spatial_size):
        return volume
    size = tuple(int(s) for s in spatial_size)
    shrink = all(t <= s for t, s in zip(size, volume.shape[1:3]))
    mode = "nearest" if nearest else ("area" if shrink else "bilinear")
    channels, _, _, slices = volume.shape
    stack = volume.permute(0, 3, 1, 2).reshape(channels * slices, *volume.shape[1:3]).float()
    out = torch.as_tensor(Resize(size, mode=mode)(stack))
    out = out.reshape(channels, slices, *size).permute(0, 2, 3, 1).contiguous()
    return out.to(volume.dtype) if nearest or not volume.dtype.is_floating_point else out


# --- preparing the data --------------------------------------------------------------------------------------------
