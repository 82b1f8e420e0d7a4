"""Glue for the prostate bundle's inference config (``configs/inference.yaml``): list the CT series of a DICOM folder,
load one CT for the network (in the training orientation and scale), and write the predictions back on the CT's own
grid as NIfTI (label map + dose in Gy), with the CT's geometry. RTSTRUCT and RTDOSE files in the folder are allowed
and ignored: only the CT is needed."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the conventional SimpleITK alias)
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ctan_monai.apps.prostate.geometry import BUNDLE_AXCODES, reorient, resize_in_plane
from ctan_monai.data.dicom_rt.body import body_mask_from_ct
from ctan_monai.data.dicom_rt.ct_series import DicomSeriesError, read_ct_series
from ctan_monai.data.dicom_rt.inputs import find_ct_series, ras_affine
from ctan_monai.data.dicom_rt.pixels import DicomDecodeError
from ctan_monai.utils.atomic import atomic_path

__all__ = ["LoadDicomCTd", "WriteProstatePredictiond", "find_ct_series", "ras_affine"]

logger = logging.getLogger("ctan_monai.prostate")

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


class LoadDicomCTd(MapTransform):
    """Load a CT for inference: ``image`` (the slice files of a DICOM series in any order, or one NIfTI / MHA / NRRD
    volume in HU) becomes the CT in HU,
    ``[1, H, W, S]`` float32, reoriented to ``axcodes`` and resized in-plane as the training slices were.

    Also adds ``body`` (``[1, H, W, S]`` uint8 at the CT's resolution in ``axcodes`` order: the body mask, where the
    dose is kept), ``ct_origin``, ``ct_spacing``, ``ct_direction`` (float64 tensors: the CT's LPS geometry, for the
    writer) and ``case_id`` (when absent).

    Args:
        keys: the key holding the slice files or the volume file (``image``).
        axcodes: orientation of the network input (the training orientation).
        spatial_size: in-plane size of the training slices, or None for the CT's.
        body_threshold_hu: HU threshold of the body mask.
        allow_missing_keys: skip missing keys instead of raising.

    Raises:
        ValueError: naming the case and files when the series does not form one regular volume or cannot be decoded.

    Example:
        >>> item = LoadDicomCTd("image")(find_ct_series("demo_data/prostate")[0])  # doctest: +SKIP
        >>> item["image"].shape  # doctest: +SKIP
        torch.Size([1, 64, 64, 32])
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        axcodes: str = BUNDLE_AXCODES,
        spatial_size: Sequence[int] | None = None,
        body_threshold_hu: float = -400.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.axcodes = axcodes
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        self.body_threshold_hu = body_threshold_hu

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = [d[key]] if isinstance(d[key], (str, os.PathLike)) else list(d[key])
            case_id = str(d.get("case_id", Path(str(paths[0])).parent.name))
            ct = self._read(paths, case_id)
            hu = sitk.GetArrayFromImage(ct).astype(np.float32)  # [z, y, x]
            affine = ras_affine(ct.GetOrigin(), ct.GetSpacing(), ct.GetDirection())
            image = reorient(hu.transpose(2, 1, 0), affine, self.axcodes)
            body = reorient(body_mask_from_ct(hu, self.body_threshold_hu).transpose(2, 1, 0), affine, self.axcodes)
            volume = torch.from_numpy(np.ascontiguousarray(image))[None]
            d[key] = resize_in_plane(volume, self.spatial_size, nearest=False)
            d["body"] = torch.from_numpy(np.ascontiguousarray(body, dtype=np.uint8))[None]
            d["ct_origin"] = torch.tensor(ct.GetOrigin(), dtype=torch.float64)
            d["ct_spacing"] = torch.tensor(ct.GetSpacing(), dtype=torch.float64)
            d["ct_direction"] = torch.tensor(ct.GetDirection(), dtype=torch.float64)
            d.setdefault("case_id", case_id)
        return d

    @staticmethod
    def _read(paths: Sequence[str | os.PathLike[str]], case_id: str) -> sitk.Image:
        """The CT: a DICOM series (its slice files), or one volume file in HU (NIfTI, MHA, NRRD: what MONAI Label
        sends), read with its geometry."""
        if len(paths) == 1 and str(paths[0]).lower().endswith(_VOLUME_SUFFIXES):
            try:
                return sitk.ReadImage(str(paths[0]))
            except RuntimeError as err:
                raise ValueError(f"case {case_id}: {paths[0]} cannot be read as a CT volume: {err}") from None
        try:
            return read_ct_series(paths)
        except (DicomSeriesError, DicomDecodeError) as err:
            raise ValueError(f"case {case_id}: the CT series cannot be read: {err}") from None


class WriteProstatePredictiond(MapTransform):
    """Finish and write one patient's predictions to ``output_dir/<case_id>/`` on the CT's grid: ``seg.nii.gz``
    (uint8 label map) and ``dose.nii.gz`` (float32 Gy, at least 0, zero outside the body), with the CT's geometry
    (the NIfTI affine is the CT's, in RAS). Each file is written atomically. ``pred`` and ``dose`` are replaced by the
    finished label map and dose (``[1, H, W, S]`` at the CT's resolution, in ``axcodes`` order).

    Args:
        keys: the segmentation key (``pred``: logits ``[C, h, w, S]``, or a label map ``[1, h, w, S]``).
        output_dir: the output folder.
        dose_key: the dose key (``[1, h, w, S]``).
        body_key: the body mask key (``[1, H, W, S]``, the CT's resolution; sets the output size).
        axcodes: the orientation of the predictions (the network input's).
        allow_missing_keys: skip missing keys instead of raising.

    Example:
        >>> writer = WriteProstatePredictiond("pred", output_dir="predictions")  # doctest: +SKIP
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike[str] = "predictions",
        dose_key: str = "dose",
        body_key: str = "body",
        axcodes: str = BUNDLE_AXCODES,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.dose_key, self.body_key = dose_key, body_key
        self.axcodes = axcodes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            body = torch.as_tensor(d[self.body_key]).detach().cpu()[0] > 0
            size = tuple(body.shape[:2])
            seg = torch.as_tensor(d[key]).detach().cpu().float()
            if seg.shape[0] > 1:  # logits: interpolated before the argmax
                labels = resize_in_plane(seg, size, nearest=False).argmax(0)
            else:
                labels = resize_in_plane(seg, size, nearest=True)[0]
            dose = torch.as_tensor(d[self.dose_key]).detach().cpu().float()
            dose = resize_in_plane(dose, size, nearest=False)[0].clamp_min(0) * body
            origin, spacing, direction = (
                [float(v) for v in torch.as_tensor(d[k]).reshape(-1).tolist()]
                for k in ("ct_origin", "ct_spacing", "ct_direction")
            )
            affine = ras_affine(origin, spacing, direction)
            case_id = str(d.get("case_id", "case"))
            case_dir = self.output_dir / case_id
            outputs = (
                ("seg.nii.gz", labels.numpy().astype(np.uint8)),
                ("dose.nii.gz", dose.numpy().astype(np.float32)),
            )
            for name, array in outputs:
                stored = reorient(array, affine, self.axcodes, inverse=True)  # [x, y, z], the CT's index order
                image = sitk.GetImageFromArray(np.ascontiguousarray(stored.transpose(2, 1, 0)))
                image.SetOrigin(origin)
                image.SetSpacing(spacing)
                image.SetDirection(direction)
                with atomic_path(case_dir / name) as tmp:
                    sitk.WriteImage(image, str(tmp), useCompression=True)
            d[key] = labels[None].to(torch.uint8)
            d[self.dose_key] = dose[None]
            logger.info("%s: wrote seg.nii.gz and dose.nii.gz to %s", case_id, case_dir)
        return d
