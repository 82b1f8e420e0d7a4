"""DICOM CT inputs for inference: the CT series of a folder tree as data items, and the voxel-to-RAS affine of a
SimpleITK image (shared by the CT bundles' loaders)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctan_monai.data.dicom_rt.discovery import find_studies

__all__ = ["find_ct_series", "ras_affine"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ras_affine(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The voxel-to-RAS affine of a SimpleITK image's ``[x, y, z]`` index order (as nibabel reads its NIfTI file).

    Args:
        origin: the image origin (LPS, mm).
        spacing: the voxel size (mm).
        direction: the 9 direction cosines, row-major (SimpleITK's ``GetDirection()``).

    Returns:
        a 4 x 4 affine.

    Example:
        >>> np.diag(ras_affine((1.0, 2.0, 3.0), (6.0, 6.0, 4.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))).tolist()
        [-6.0, -6.0, 4.0, 1.0]
    """
    affine = np.eye(4)
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:3, :3] = _LPS_TO_RAS @ matrix
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


def find_ct_series(input_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """List the CT series of a DICOM folder tree (grouped by tags, any layout) as inference data items.

    Args:
        input_dir: a folder of DICOM files: CT series, with or without RTSTRUCT / RTDOSE / RTPLAN.

    Returns:
        ``[{"image": [CT slice files], "case_id": ..., "series_uid": ...}, ...]``; ``case_id`` is the study's (the
        PatientID), with ``_ct<k>`` appended when a study has several CT series.

    Raises:
        FileNotFoundError: naming ``input_dir`` when it is not a folder or holds no CT series.

    Example:
        >>> find_ct_series("demo_data/prostate")[0]["case_id"]  # doctest: +SKIP
        'SYNTH_PROSTATE_000'
    """
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"input_dir {str(input_dir)!r} is not a folder")
    items = []
    for study in find_studies(input_dir):
        cts = study.of_modality("CT")
        for k, series in enumerate(cts, start=1):
            case_id = study.case_id if len(cts) == 1 else f"{study.case_id}_ct{k}"
            paths = sorted(str(p) for p in series.paths)
            items.append({"image": paths, "case_id": case_id, "series_uid": series.series_uid})
    if not items:
        raise FileNotFoundError(f"input_dir {str(input_dir)!r} holds no DICOM CT series to predict")
    return items
