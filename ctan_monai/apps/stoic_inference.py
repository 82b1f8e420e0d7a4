"""Glue for the STOIC bundle's inference config (``configs/inference.yaml``): list the chest CTs of a folder.
Reading and preprocessing the original files is ``ctan_monai.data.stoic.stoic_transform`` (``source="original"``);
the weights are loaded by ``ctan_monai.apps.load_weights`` and the per-patient probabilities written by
``ctan_monai.engines.patient_classification.PatientClassificationHandler``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ctan_monai.data.stoic import case_sort_key

__all__ = ["VOLUME_SUFFIXES", "find_inference_cases"]

# volume formats taken from a folder (STOIC ships .mha; SimpleITK reads the others too)
VOLUME_SUFFIXES = (".mha", ".mhd", ".nii.gz", ".nii", ".nrrd")


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_inference_cases(input_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """List the chest CT volumes to predict as inference data items.

    Args:
        input_dir: a folder of volumes (``.mha``, ``.mhd``, ``.nii.gz``, ``.nii``, ``.nrrd``), a STOIC dataset folder
            (its ``data/mha/`` is used) or one volume file.

    Returns:
        ``[{"image": path, "case_id": file name without suffix}, ...]``, in PatientID order.

    Raises:
        FileNotFoundError: naming ``input_dir`` when it does not exist or holds no volume.
        ValueError: when two files give the same case id (e.g. ``1.mha`` and ``1.nii.gz``).

    Example:
        >>> find_inference_cases("stoic-sample/data/mha")[0]["case_id"]  # doctest: +SKIP
        '1'
    """
    path = Path(input_dir)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        folder = path / "data" / "mha" if (path / "data" / "mha").is_dir() else path
        files = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)]
    else:
        raise FileNotFoundError(f"input_dir {str(input_dir)!r} does not exist")
    if not files:
        raise FileNotFoundError(
            f"input_dir {str(input_dir)!r} holds no chest CT to predict (looked for {', '.join(VOLUME_SUFFIXES)})"
        )
    by_case: dict[str, Path] = {}
    for file in files:
        case = _case_id(file)
        if case in by_case:
            raise ValueError(f"input_dir {str(input_dir)!r}: {by_case[case].name} and {file.name} are both case {case}")
        by_case[case] = file
    return [{"image": str(by_case[c]), "case_id": c} for c in sorted(by_case, key=case_sort_key)]
