"""Glue for the OpenKBP bundle's inference config (``configs/inference.yaml``): list the patients of a folder, load
one patient's CT for the network, load the trained weights, split the multi-task output into MONAI Label's keys
(``pred``: the segmentation, ``dose``: the dose) and write the predictions (NIfTI + the challenge's ``dose.csv``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ctan_monai.apps.openkbp.reader import CT_RANGE, GRID_SHAPE, openkbp_affine, read_patient, write_dose_csv
from ctan_monai.apps.openkbp.validation import find_patient_folders
from ctan_monai.apps.volume_inference import SplitTaskOutputsd  # noqa: F401 (kept importable from here)
from ctan_monai.utils.atomic import atomic_path

__all__ = [
    "LoadOpenKBPPatientd",
    "SplitTaskOutputsd",
    "WriteOpenKBPPredictiond",
    "find_inference_cases",
]

logger = logging.getLogger("ctan_monai.openkbp")


def find_inference_cases(input_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """List the OpenKBP patient folders under ``input_dir`` as inference data items.

    Args:
        input_dir: anything ``find_patient_folders`` accepts (a dataset root, ``provided-data``, a split folder, the
            ``pt_*`` folders' parent or one patient folder).

    Returns:
        ``[{"image": patient folder, "case_id": folder name}, ...]``.

    Raises:
        FileNotFoundError: naming ``input_dir`` when it does not exist or holds no patient.

    Example:
        >>> find_inference_cases("demo_data/openkbp/provided-data/validation-pats")[0]["case_id"]  # doctest: +SKIP
        'pt_7'
    """
    try:
        folders = find_patient_folders(input_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"input_dir {str(input_dir)!r} holds no OpenKBP patient to predict: {err}") from err
    return [{"image": str(folder), "case_id": folder.name} for _, folder in folders]


class LoadOpenKBPPatientd(MapTransform):
    """Load an OpenKBP patient's CT for inference: ``image`` (a patient folder, or a NIfTI file of CT grey values on
    the same grid) becomes the CT, clipped to ``CT_RANGE`` (not yet scaled), ``[1, *grid]`` float32.

    Also adds ``dose_mask`` (``[1, *grid]`` float32, the possible-dose mask; ones for a NIfTI input), ``spacing``
    (float64 tensor of the voxel size in mm) and ``case_id`` (when absent).

    Args:
        keys: the key holding the input path (``image``).
        grid_shape: the OpenKBP grid (the challenge's is 128^3).
        allow_missing_keys: skip missing keys instead of raising.

    Raises:
        DatasetValidationError: listing every problem of a bad patient folder.

    Example:
        >>> item = LoadOpenKBPPatientd("image")({"image": "validation-pats/pt_7"})  # doctest: +SKIP
        >>> item["image"].shape, item["case_id"]  # doctest: +SKIP
        (torch.Size([1, 128, 128, 128]), 'pt_7')
    """

    def __init__(
        self, keys: KeysCollection = "image", grid_shape: Sequence[int] = GRID_SHAPE, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.grid_shape = tuple(int(s) for s in grid_shape)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = Path(str(d[key]))
            if source.is_dir():
                patient = read_patient(source, structures=(), grid_shape=self.grid_shape)
                ct, mask, spacing = patient.ct, patient.possible_dose_mask, patient.voxel_size_mm
                case_id = patient.id
            else:
                image = nib.load(str(source))
                ct = np.clip(np.asarray(image.get_fdata(), dtype=np.float32), *CT_RANGE)
                mask = np.ones(ct.shape, dtype=bool)
                spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
                case_id = source.name.split(".")[0]
            d[key] = torch.from_numpy(np.ascontiguousarray(ct, dtype=np.float32))[None]
            d["dose_mask"] = torch.from_numpy(mask.astype(np.float32))[None]
            d["spacing"] = torch.tensor(spacing, dtype=torch.float64)
            d.setdefault("case_id", case_id)
        return d


class WriteOpenKBPPredictiond(MapTransform):
    """Finish and write one patient's predictions to ``output_dir/<case_id>/``: ``seg.nii.gz`` (uint8 label map),
    ``dose.nii.gz`` (float32 Gy, at least 0, zero outside the possible-dose mask) and ``dose.csv`` (the challenge's
    submission format), both NIfTI files with the affine ``openkbp_affine(spacing)``. Every file is written
    atomically. The dose under ``dose`` is replaced by the finished (clamped, masked) dose.

    Args:
        keys: the segmentation key (``pred``: a label map ``[1, *grid]`` or logits ``[C, *grid]``, argmax taken).
        output_dir: the output folder.
        dose_key: the dose key (``[1, *grid]``).
        mask_key: the possible-dose mask key (optional in the data).
        allow_missing_keys: skip missing keys instead of raising.

    Example:
        >>> writer = WriteOpenKBPPredictiond("pred", output_dir="predictions")  # doctest: +SKIP
        >>> out = writer({"pred": seg, "dose": dose, "spacing": sp, "case_id": "pt_7"})  # doctest: +SKIP
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike[str] = "predictions",
        dose_key: str = "dose",
        mask_key: str = "dose_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.dose_key, self.mask_key = dose_key, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            seg = torch.as_tensor(d[key]).detach().cpu()
            labels = (seg.argmax(0) if seg.shape[0] > 1 else seg[0]).numpy().astype(np.uint8)
            dose = torch.as_tensor(d[self.dose_key]).detach().cpu().float()[0].clamp_min(0)
            mask = d.get(self.mask_key)
            if mask is not None:
                dose = dose * (torch.as_tensor(mask).detach().cpu()[0] > 0)
            dose_np = np.ascontiguousarray(dose.numpy(), dtype=np.float32)
            case_id = str(d.get("case_id", "case"))
            spacing = [float(s) for s in torch.as_tensor(d["spacing"]).reshape(-1).tolist()]
            affine = openkbp_affine(spacing, labels.shape)
            case_dir = self.output_dir / case_id
            for name, array in (("seg.nii.gz", labels), ("dose.nii.gz", dose_np)):
                image = nib.Nifti1Image(array, affine)
                image.header.set_xyzt_units("mm")
                with atomic_path(case_dir / name) as tmp:
                    nib.save(image, str(tmp))
            write_dose_csv(dose_np, case_dir / "dose.csv")
            d[self.dose_key] = torch.from_numpy(dose_np)[None]
            logger.info("%s: wrote seg.nii.gz, dose.nii.gz and dose.csv to %s", case_id, case_dir)
        return d
