"""Inference pieces shared by the CT bundles (OpenKBP, prostate) for callers that hand over one image under
``image`` (MONAI Label, ``python -m monai.bundle run`` with ``--image``): check and load a CT volume file or a DICOM
series with its geometry as a MetaTensor (so that MONAI's ``Orientationd`` / ``Invertd`` move it to the training
orientation and back), and summarise the predicted dose per predicted structure in the result JSON.

A bad input raises :class:`ctan_monai.data.inputs.InputImageError` (a ``ValueError``) naming the file and the
problem; the MONAI Label app turns it into an HTTP 422 reply.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform

from ctan_monai.data.dicom_rt.ct_series import DicomSeriesError, read_ct_series
from ctan_monai.data.dicom_rt.inputs import find_ct_series, ras_affine
from ctan_monai.data.dicom_rt.pixels import DicomDecodeError
from ctan_monai.data.inputs import InputImageError, check_input_file
from ctan_monai.metrics.dose import dvh_metrics

__all__ = ["DoseSummaryd", "SplitTaskOutputsd", "InputImageError", "LoadCTVolumed", "check_input_file", "dose_summary"]


def _is_volume_file(path: Path) -> bool:
    """A file that is not a DICOM part-10 file (no ``DICM`` marker at byte 128)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] != b"DICM"


class LoadCTVolumed(MapTransform):
    """Load one CT under ``image``: a volume file (NIfTI, MHA, NRRD, ... as MONAI's ``LoadImage`` reads it) or a DICOM
    series (a folder, one of its slice files, or the list of its slice files), as a channel-first MetaTensor
    ``[1, X, Y, Z]`` float32 in the stored index order, with ``affine`` and ``original_affine`` (voxel to RAS mm),
    ``spatial_shape`` and ``filename_or_obj`` in its meta, as MONAI's loaders set them.

    The image is checked first, every problem naming the input: not empty, readable, one grey value per voxel (an
    RGB or multi-channel image is refused) and three spatial dimensions (a 2D image is refused).

    Args:
        keys: the key holding the input (``image``).
        allow_missing_keys: skip missing keys instead of raising.

    Raises:
        InputImageError: for an input that is missing, empty, unreadable, multi-channel or not 3D.

    Example:
        >>> item = LoadCTVolumed("image")({"image": "ct.nii.gz"})  # doctest: +SKIP
        >>> item["image"].shape, item["image"].meta["original_affine"].shape  # doctest: +SKIP
        (torch.Size([1, 128, 128, 128]), (4, 4))
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self._loader = LoadImage(image_only=True, ensure_channel_first=False, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.load(d[key])
        return d

    def load(self, source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> MetaTensor:
        """Load and check one CT (see the class docstring).

        Args:
            source: a volume file, a DICOM folder or slice file, or a list of DICOM slice files.

        Returns:
            ``[1, X, Y, Z]`` float32 MetaTensor with its geometry.

        Raises:
            InputImageError: as the class says.
        """
        if isinstance(source, (str, os.PathLike)):
            path = check_input_file(source)
            if _is_volume_file(path):
                return self._load_volume(path)
            paths = [path]
        else:
            paths = [check_input_file(p) for p in source]
            if not paths:
                raise InputImageError("input is an empty list of DICOM files")
        return self._load_dicom(paths)

    def _load_volume(self, path: Path) -> MetaTensor:
        try:
            image = self._loader(str(path))
        except Exception as err:  # every reader's own error type: report it with the file
            raise InputImageError(f"input {str(path)!r} cannot be read as an image: {err}") from None
        meta = dict(image.meta)
        channel_dim = meta.get("original_channel_dim", "no_channel")
        has_channels = not (channel_dim == "no_channel" or (isinstance(channel_dim, float) and math.isnan(channel_dim)))
        shape = tuple(int(s) for s in image.shape)
        if has_channels:
            channels = shape[int(channel_dim)]
            raise InputImageError(
                f"input {str(path)!r} has {channels} channels per pixel (shape {shape}; RGB or multi-channel): "
                "this bundle needs a grey-value CT, one value per voxel"
            )
        spatial = [s for s in shape]
        if len(spatial) != 3:
            raise InputImageError(
                f"input {str(path)!r} is a {len(spatial)}D image (shape {shape}): this bundle needs a 3D CT volume"
            )
        tensor = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None]
        meta["spatial_shape"] = np.asarray(spatial)
        meta["original_channel_dim"] = "no_channel"
        return MetaTensor(tensor, affine=image.affine, meta=meta)

    @staticmethod
    def _load_dicom(paths: Sequence[Path]) -> MetaTensor:
        if len(paths) == 1 and paths[0].is_dir():  # a folder: its one CT series (RTSTRUCT, RTDOSE, ... ignored)
            try:
                series = find_ct_series(paths[0])
            except (FileNotFoundError, DicomSeriesError, DicomDecodeError, ValueError) as err:
                raise InputImageError(f"input {str(paths[0])!r} holds no readable DICOM CT series: {err}") from None
            if len(series) > 1:
                raise InputImageError(
                    f"input {str(paths[0])!r} holds {len(series)} CT series ({[s['case_id'] for s in series]}): "
                    "send one"
                )
            files = [Path(f) for f in series[0]["image"]]
        else:
            files = list(paths)
        try:
            ct = read_ct_series(files)
        except (DicomSeriesError, DicomDecodeError, ValueError) as err:
            raise InputImageError(f"input {str(paths[0])!r}: the DICOM CT series cannot be read: {err}") from None
        import SimpleITK as sitk  # noqa: N813 (the conventional SimpleITK alias)

        array = sitk.GetArrayFromImage(ct).astype(np.float32).transpose(2, 1, 0)  # [z, y, x] -> [x, y, z]
        if array.ndim != 3:
            raise InputImageError(f"input {str(paths[0])!r}: the DICOM series is not one 3D grey-value volume")
        affine = torch.as_tensor(ras_affine(ct.GetOrigin(), ct.GetSpacing(), ct.GetDirection()), dtype=torch.float64)
        meta = {
            "original_affine": affine.numpy().copy(),
            "spatial_shape": np.asarray(array.shape),
            "original_channel_dim": "no_channel",
            "filename_or_obj": str(paths[0]),
            "space": "RAS",
        }
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=affine, meta=meta)


def dose_summary(
    dose: np.ndarray, labels: np.ndarray, names: Sequence[str], voxel_spacing_mm: Sequence[float]
) -> dict[str, Any]:
    """Summarise a dose volume over each structure of a label map.

    Args:
        dose: the dose (Gy), any shape.
        labels: the label map of the same shape (0 background, ``k`` the ``k``-th of ``names``).
        names: the structure names, label 1 first.
        voxel_spacing_mm: the voxel dimensions in mm (for the volumes and the voxel count of 0.1 cc).

    Returns:
        ``{"unit": "Gy", "max": ..., "structures": {name: {"volume_cc", "mean", "max", "D0.1cc"}}}``; a structure
        that the label map does not hold gets ``volume_cc`` 0 and no dose values. D0.1cc and the mean are the
        OpenKBP definitions the evaluation uses (``ctan_monai.metrics.dose.dvh_metrics``).

    Raises:
        ValueError: when ``dose`` and ``labels`` differ in shape.

    Example:
        >>> s = dose_summary(np.full((2, 2, 2), 5.0), np.ones((2, 2, 2), dtype=np.uint8), ["Bladder"], (10, 10, 10))
        >>> s["structures"]["Bladder"]["mean"], s["structures"]["Bladder"]["volume_cc"]
        (5.0, 8.0)
    """
    dose = np.asarray(dose, dtype=np.float64)
    labels = np.asarray(labels)
    if dose.shape != labels.shape:
        raise ValueError(f"dose {dose.shape} and label map {labels.shape} differ in shape")
    voxel_cc = float(np.prod(np.asarray(voxel_spacing_mm, dtype=np.float64))) / 1000.0
    masks = {str(name): labels == k for k, name in enumerate(names, start=1)}
    oar_metrics = dvh_metrics(dose, masks, voxel_spacing_mm, targets=())  # structures with at least one voxel
    structures: dict[str, Any] = {}
    for name, inside in masks.items():
        entry: dict[str, Any] = {"volume_cc": round(float(inside.sum()) * voxel_cc, 3)}
        if name in oar_metrics:
            entry.update(
                mean=round(oar_metrics[name]["mean"], 3),
                max=round(float(dose[inside].max()), 3),
                **{"D0.1cc": round(oar_metrics[name]["D_0.1_cc"], 3)},
            )
        structures[name] = entry
    return {"unit": "Gy", "max": round(float(dose.max()) if dose.size else 0.0, 3), "structures": structures}


class DoseSummaryd(MapTransform):
    """Put a summary of the predicted dose per predicted structure in ``data[result_key]["dose"]`` (the result JSON
    MONAI Label returns). ``dose`` is clamped at 0 in place; the label map under the key and the dose must be on the
    same grid (both back in the input's order after ``Invertd``).

    Args:
        keys: the label map key (``pred``: ``[1, X, Y, Z]`` label map).
        dose_key: the dose key (``[1, X, Y, Z]``, Gy).
        structure_names: the structures, label 1 first.
        ref_key: the input image key whose meta holds ``original_affine`` (the voxel volume).
        result_key: the result JSON key.
        remove_dose: drop the dose volume from the data afterwards (nothing downstream needs it).
        allow_missing_keys: skip missing keys instead of raising.

    Example:
        >>> d = DoseSummaryd("pred", structure_names=["Rectum"])(
        ...     {"pred": torch.ones(1, 2, 2, 2), "dose": torch.full((1, 2, 2, 2), 2.0)})
        >>> d["result"]["dose"]["structures"]["Rectum"]["mean"]
        2.0
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        dose_key: str = "dose",
        structure_names: Sequence[str] = (),
        ref_key: str = "image",
        result_key: str = "result",
        remove_dose: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dose_key, self.ref_key, self.result_key = dose_key, ref_key, result_key
        self.structure_names = [str(n) for n in structure_names]
        self.remove_dose = remove_dose

    def _voxel_spacing(self, d: Mapping[Hashable, Any]) -> tuple[float, ...]:
        ref = d.get(self.ref_key)
        meta = ref.meta if isinstance(ref, MetaTensor) else d.get(f"{self.ref_key}_meta_dict", {})
        affine = meta.get("original_affine") if meta else None
        if affine is None:
            return (1.0, 1.0, 1.0)
        return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = torch.as_tensor(d[key]).detach().cpu()
            labels = labels.argmax(0) if labels.shape[0] > 1 else labels[0]
            dose = torch.as_tensor(d[self.dose_key]).detach().cpu().float()[0].clamp_min(0)
            result = dict(d.get(self.result_key) or {})
            result["dose"] = dose_summary(
                dose.numpy(), labels.numpy().astype(np.int64), self.structure_names, self._voxel_spacing(d)
            )
            d[self.result_key] = result
            if self.remove_dose:
                d.pop(self.dose_key, None)
        return d


class SplitTaskOutputsd(MapTransform):
    """Split the multi-task network output ``{seg: ..., dose: ...}`` held under ``pred`` into ``pred`` (the
    segmentation logits) and ``dose`` (the dose), the keys MONAI Label and the writer use. A ``pred`` that is already
    a tensor is left as it is.

    Args:
        keys: the key of the network output (``pred``).
        seg_task: the segmentation task's name.
        dose_task: the dose task's name (the output key too).
        allow_missing_keys: skip missing keys instead of raising.

    Example:
        >>> out = SplitTaskOutputsd("pred")({"pred": {"seg": torch.zeros(5, 2, 2, 2), "dose": torch.ones(1, 2, 2, 2)}})
        >>> out["pred"].shape[0], float(out["dose"].max())
        (5, 1.0)
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        seg_task: str = "seg",
        dose_task: str = "dose",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.seg_task, self.dose_task = seg_task, dose_task

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], Mapping):
                outputs = d[key]
                d[self.dose_task] = outputs[self.dose_task]
                d[key] = outputs[self.seg_task]
        return d
