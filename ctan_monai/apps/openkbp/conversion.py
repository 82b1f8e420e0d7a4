"""The OpenKBP NIfTI cache: conversion of the CSV patients (once, checked against their sources), its check and
manifest."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctan_monai.apps.openkbp.reader import (
    CT_RANGE,
    DEFAULT_STRUCTURES,
    GRID_SHAPE,
    SPLITS,
    OpenKBPDataWarning,
    _check_structures,
    label_map_from_structures,
    read_patient,
)
from ctan_monai.apps.openkbp.validation import _misnamed_problem, find_patient_folders, misnamed_patient_folders
from ctan_monai.data.validation import (
    DataProblem,
    DatasetValidationError,
    ValidationReport,
)
from ctan_monai.utils.atomic import atomic_path, atomic_write_json
from ctan_monai.utils.integrity import file_crc32

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_MARKER_NAME = ".converted.json"
_CACHE_FORMAT = "ctan_monai.openkbp.nifti/1"


def _source_stats(folder: Path) -> dict[str, list[int]]:
    """Size and modification time of every CSV of a patient folder: a change means the cache entry is stale."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.glob("*.csv"))}


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(affine, code=1)  # 1 = scanner-based coordinates
    image.header.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def _cached_entry(case_dir: Path, source: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The marker's manifest entry when the cache entry is complete, intact and made from the same sources."""
    try:
        marker = json.loads((case_dir / _MARKER_NAME).read_text(encoding="utf-8"))
        if marker["settings"] != settings or marker["sources"] != _source_stats(source):
            return None
        for name, crc in marker["outputs"].items():
            if file_crc32(case_dir / name) != crc:
                return None
        return marker["entry"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _convert_patient(
    folder: Path, split: str, cache_dir: Path, names: tuple[str, ...], grid_shape: tuple[int, ...]
) -> dict[str, Any]:
    """Convert one patient to NIfTI and write its marker last; returns the entry (paths relative to ``cache_dir``)."""
    patient = read_patient(folder, names, grid_shape, require_dose=split != "test-pats")
    relative = Path(split) / patient.id
    case_dir = cache_dir / relative
    affine = patient.affine
    label, present = label_map_from_structures(patient.structures, names, patient.shape)
    volumes = {
        "image": (patient.ct / CT_RANGE[1]).astype(np.float32),
        "label": label,
        "dose": patient.dose,
        "dose_mask": patient.possible_dose_mask.astype(np.uint8),
    }
    entry: dict[str, Any] = {"case_id": patient.id, "split": split}
    outputs = {}
    for key, array in volumes.items():
        if array is None:
            entry[key] = None
            continue
        name = f"{key}.nii.gz"
        _save_nifti(array, affine, case_dir / name)
        entry[key] = str(relative / name)
        outputs[name] = file_crc32(case_dir / name)
    entry.update(
        label_class_present=present,
        spacing=list(patient.voxel_size_mm),
        source=str(folder.resolve()),
    )
    settings = {"format": _CACHE_FORMAT, "structures": list(names), "grid_shape": list(grid_shape)}
    marker = {"settings": settings, "sources": _source_stats(folder), "outputs": outputs, "entry": entry}
    atomic_write_json(case_dir / _MARKER_NAME, marker)
    return entry


def _absolute(entry: Mapping[str, Any], base: Path) -> dict[str, Any]:
    resolved = dict(entry)
    for key in ("image", "label", "dose", "dose_mask"):
        if resolved.get(key) is not None:
            resolved[key] = str(base / resolved[key])
    return resolved


def convert_dataset(
    src_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    structures: Sequence[str] = DEFAULT_STRUCTURES,
    overwrite: bool = False,
    grid_shape: Sequence[int] = GRID_SHAPE,
    skip_bad_cases: bool = False,
) -> list[dict[str, Any]]:
    """Convert OpenKBP patients once to NIfTI and write a JSON manifest; later runs reuse what is still valid.

    Per patient, ``cache_dir/<split>/<case_id>/`` holds ``image.nii.gz`` (CT / 4095 after clipping, float32 in
    [0, 1]), ``label.nii.gz`` (uint8, 0 background, ``i`` = ``structures[i - 1]``, first listed wins overlaps),
    ``dose.nii.gz`` (float32 Gy; absent for patients without dose), ``dose_mask.nii.gz`` (uint8 possible-dose mask)
    and a marker written last with the source files' sizes and modification times and the outputs' CRC-32. A patient
    whose marker matches is skipped; a changed source, other settings, or a missing / corrupt output redoes it.
    ``cache_dir/manifest.json`` (written atomically) holds ``structures``, ``label_names``, ``source_dir`` (the
    folder converted, resolved), one list of entries per split (paths relative to ``cache_dir``) and ``skipped``
    cases.

    Args:
        src_dir: anything ``find_patient_folders`` accepts (e.g. the ``provided-data`` folder).
        cache_dir: the output folder.
        structures: the structures of the label map, in label order.
        overwrite: convert every patient again.
        grid_shape: the grid the flat indices refer to.
        skip_bad_cases: convert the good patients and list the bad ones under ``skipped`` (with a warning) instead
            of raising.

    Returns:
        the manifest entries (absolute paths): ``case_id``, ``split``, ``image``, ``label``, ``dose`` (or None),
        ``dose_mask``, ``label_class_present`` (0/1 per class, background first), ``spacing`` (mm per axis) and
        ``source`` (the patient folder).

    Raises:
        DatasetValidationError: listing every problem of every bad patient (after converting the good ones) and
            every folder holding patient files that is not named ``pt_<n>``, unless ``skip_bad_cases``.
        FileNotFoundError: when ``src_dir`` holds no patient.
        ValueError: when ``structures`` names a structure the format does not define.

    Example:
        >>> entries = convert_dataset("provided-data", "cache/openkbp")  # doctest: +SKIP
        >>> entries[0]["label_class_present"]  # doctest: +SKIP
        [1, 1, 1, 1, 1]
    """
    names = _check_structures(structures)
    shape = tuple(int(s) for s in grid_shape)
    cache = Path(cache_dir)
    settings = {"format": _CACHE_FORMAT, "structures": list(names), "grid_shape": list(shape)}
    by_split: dict[str, list[dict[str, Any]]] = {}
    patients = find_patient_folders(src_dir)
    problems: list[DataProblem] = [_misnamed_problem(p) for p in misnamed_patient_folders(src_dir)]
    converted = reused = 0
    for split, folder in patients:
        entry = None if overwrite else _cached_entry(cache / split / folder.name, folder, settings)
        if entry is None:
            try:
                entry = _convert_patient(folder, split, cache, names, shape)
            except DatasetValidationError as err:
                problems.extend(err.problems)
                continue
            converted += 1
        else:
            reused += 1
        by_split.setdefault(split, []).append(entry)
    logger.info("OpenKBP cache %s: %d converted, %d reused, %d bad", cache, converted, reused, len(problems))
    if problems and not skip_bad_cases:
        raise DatasetValidationError(problems, f"OpenKBP {src_dir}")
    if problems:
        warnings.warn(
            str(DatasetValidationError(problems, f"OpenKBP {src_dir} (bad cases skipped)")),
            OpenKBPDataWarning,
            stacklevel=2,
        )
    manifest = {
        "description": "OpenKBP patients converted to NIfTI by ctan_monai.apps.openkbp.conversion.convert_dataset",
        "format": _CACHE_FORMAT,
        "structures": list(names),
        "label_names": ["background", *names],
        "grid_shape": list(shape),
        "orientation": "array axes [row A->P, column R->L, slice S->I]; affine in RAS mm; axial slice axis 2",
        "source_dir": str(Path(src_dir).resolve()),
        **by_split,
        "skipped": [{"case": p.case, "file": p.file, "message": p.message} for p in problems],
    }
    atomic_write_json(cache / MANIFEST_NAME, manifest)
    return [_absolute(entry, cache) for split in by_split for entry in by_split[split]]


def check_cache(path: str | os.PathLike[str]) -> ValidationReport:
    """Check a converted cache on its own (without the CSVs it was made from): every file of every entry must exist
    and have the CRC-32 that its patient's conversion marker recorded.

    Args:
        path: the manifest file or the cache folder that holds ``manifest.json``.

    Returns:
        the report: a problem per missing, truncated or corrupt file and per entry without a readable marker;
        ``valid_cases`` lists the patients whose files are intact.

    Raises:
        FileNotFoundError: when there is no manifest.
        ValueError: when the file is not a ``convert_dataset`` manifest.

    Example:
        >>> check_cache("cache/openkbp").raise_if_problems()  # doctest: +SKIP
    """
    file = Path(path)
    if file.is_dir():
        file = file / MANIFEST_NAME
    report = ValidationReport(dataset=f"OpenKBP cache {file.parent}")
    for entry in load_manifest(file):
        case = str(entry["case_id"])
        marker_path = file.parent / str(entry["split"]) / case / _MARKER_NAME
        try:
            outputs = json.loads(marker_path.read_text(encoding="utf-8"))["outputs"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            outputs = None
            report.add(
                str(marker_path),
                f"conversion marker missing or unreadable ({type(err).__name__}): the patient's cached files cannot be "
                "verified; convert it again from its CSVs",
                case,
            )
        for key in ("image", "label", "dose", "dose_mask"):
            if entry.get(key) is None:
                continue
            cached = Path(entry[key])
            if not cached.is_file():
                report.add(str(cached), f"{key} file is missing", case)
            elif outputs is not None and cached.name in outputs and file_crc32(cached) != outputs[cached.name]:
                report.add(
                    str(cached),
                    f"{key} file has another CRC-32 than when it was converted: truncated or corrupt; convert the "
                    "patient again from its CSVs",
                    case,
                )
        if case not in report.bad_cases():
            report.valid_cases.append(case)
    return report


def load_manifest(path: str | os.PathLike[str], split: str | None = None) -> list[dict[str, Any]]:
    """Read the entries of a ``convert_dataset`` manifest, with absolute paths.

    Args:
        path: the manifest file or the cache folder that holds ``manifest.json``.
        split: one split's entries (e.g. ``"train-pats"``); default: every split, in ``SPLITS`` order.

    Returns:
        the entries, as ``convert_dataset`` returns them.

    Raises:
        FileNotFoundError: when there is no manifest.
        ValueError: when the file is not a ``convert_dataset`` manifest.
        KeyError: when ``split`` has no entry in the manifest.

    Example:
        >>> train = load_manifest("cache/openkbp", "train-pats")  # doctest: +SKIP
    """
    file = Path(path)
    if file.is_dir():
        file = file / MANIFEST_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: OpenKBP manifest not found (run convert_dataset first)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{file}: not a JSON manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _CACHE_FORMAT:
        raise ValueError(f"{file}: not a manifest written by convert_dataset (format {_CACHE_FORMAT})")
    splits = [split] if split is not None else [s for s in SPLITS if s in manifest]
    if split is not None and split not in manifest:
        raise KeyError(f"{file}: no entries for split {split!r}; it has {[s for s in SPLITS if s in manifest]}")
    return [_absolute(entry, file.parent) for s in splits for entry in manifest[s]]
