"""One-time conversion of a STOIC dataset into a NIfTI cache (preprocessed HU volume, lung mask, 2.5D centre slices)
with a manifest; unchanged cases are reused."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from ctan_monai.apps.stoic.checks import intensity_problems, validate_dataset, volume_read_problem
from ctan_monai.apps.stoic.labels import datalist_entry, find_stoic_root, read_reference
from ctan_monai.apps.stoic.preprocessing import (
    CROP_MARGIN_MM,
    DEFAULT_SPACING,
    MIN_LUNG_AREA_FRACTION,
    preprocess_with_lung_slices,
)
from ctan_monai.data.validation import DatasetValidationError, ValidationReport
from ctan_monai.utils.atomic import atomic_path, atomic_write_json
from ctan_monai.utils.integrity import file_problem, file_record

__all__ = ["convert_dataset"]

logger = logging.getLogger("ctan_monai.apps.stoic")

CONVERSION_VERSION = 1
_OUTPUT_KEYS = ("image", "lung_mask")


def _source_fingerprint(path: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    stat = path.stat()
    return {"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **settings}


def _reusable_record(record_path: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cache record of a case when it was made from the same source with the same settings and its volumes are
    intact (the size and CRC-32 recorded when they were written; a record from before those were kept: the gzip
    streams read to the end, then the sizes and CRCs recorded); None when the case must be converted again, with a
    warning naming the file when a cached volume is missing, truncated or corrupt."""
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("fingerprint") != fingerprint:
            return None
        outputs = record.get("outputs")
        for key in _OUTPUT_KEYS:
            problem = file_problem(record[key], outputs[key] if outputs is not None else None)
            if problem is not None:
                logger.warning("STOIC cache: %s %s; converting the case again", record[key], problem)
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        logger.warning("STOIC cache: record %s is unreadable (%s); converting the case again", record_path, err)
        return None
    if outputs is None:
        record["outputs"] = {key: file_record(record[key]) for key in _OUTPUT_KEYS}
        atomic_write_json(record_path, record)
    return record


def _convert_case(entry: Mapping[str, Any], cache_dir: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Convert one case to the cache (or reuse it) and return its cache record. Raises ``ValueError`` on bad data."""
    source = Path(entry["image"])
    case = entry["case_id"]
    record_path = cache_dir / f"{case}.json"
    fingerprint = _source_fingerprint(source, settings)
    record = _reusable_record(record_path, fingerprint)
    if record is not None:
        return record
    try:
        image = sitk.ReadImage(str(source))
    except RuntimeError as err:  # the header read (validated up front); the voxels did not
        raise ValueError(f"voxels unreadable: {volume_read_problem(source, err)}") from err
    problems = intensity_problems(sitk.GetArrayViewFromImage(image))
    if problems:
        raise ValueError("; ".join(problems))
    ct, lung_slices = preprocess_with_lung_slices(
        image, settings["spacing"], settings["margin_mm"], settings["min_area_fraction"]
    )
    record = {
        "image": str(cache_dir / f"{case}_ct.nii.gz"),
        "lung_mask": str(cache_dir / f"{case}_lung.nii.gz"),
        "lung_slices": lung_slices,
        "spacing": list(ct.image.GetSpacing()),
        "size": list(ct.image.GetSize()),
        "body_box": [list(ct.body_box[0]), list(ct.body_box[1])],
        "fingerprint": fingerprint,
    }
    for key, volume in (("image", ct.image), ("lung_mask", ct.lung_mask)):
        with atomic_path(record[key]) as tmp:
            sitk.WriteImage(volume, str(tmp), True)
    record["outputs"] = {key: file_record(record[key]) for key in _OUTPUT_KEYS}
    atomic_write_json(record_path, record)  # written last: its presence means the case is complete
    return record


def convert_dataset(
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    spacing: Sequence[float] = DEFAULT_SPACING,
    margin_mm: float = CROP_MARGIN_MM,
    min_area_fraction: float = MIN_LUNG_AREA_FRACTION,
    skip_bad_cases: bool = False,
) -> dict[str, Any]:
    """Validate a STOIC dataset, preprocess every case once into ``cache_dir`` (NIfTI), and write ``manifest.json``.

    Headers and labels are validated before any conversion. A case already converted with the same settings from
    the same (unchanged) file is reused, not redone, when its cached volumes still have the size and CRC-32 recorded
    when they were written; a missing, truncated or corrupt cached volume is named in the log and the case converted
    again. Every file is written atomically; a case's record JSON is written last, so an interrupted conversion is
    redone, never trusted. Labels are always taken from the current
    reference.csv (a label fix needs no reconversion).

    Args:
        root: the dataset folder (see ``find_stoic_root``).
        cache_dir: where the NIfTI volumes, per-case records and ``manifest.json`` go.
        spacing: resampling voxel size in mm, (x, y, z).
        margin_mm: crop margin (see ``preprocess_volume``).
        min_area_fraction: lung-area fraction that makes a slice a 2.5D centre (see ``lung_slice_candidates``).
        skip_bad_cases: leave bad cases out (listed under ``"skipped"`` and logged) instead of raising.

    Returns:
        the manifest: ``{"settings": ..., "cases": [datalist entries with "image" (cached CT), "lung_mask",
        "lung_slices", "source" (the mha), labels and presence flags], "skipped": [problem strings]}``.

    Raises:
        DatasetValidationError: listing every problem, unless ``skip_bad_cases``.

    Example:
        >>> manifest = convert_dataset("stoic2021", "cache/stoic", spacing=(1.5, 1.5, 2.0))  # doctest: +SKIP
        >>> train_ds = Stoic25DDataset(manifest["cases"], training=True)  # doctest: +SKIP
    """
    root = find_stoic_root(root)
    cache_dir = Path(cache_dir)
    settings = {
        "spacing": [float(s) for s in spacing],
        "margin_mm": float(margin_mm),
        "min_area_fraction": float(min_area_fraction),
        "version": CONVERSION_VERSION,
    }
    report = validate_dataset(root, check_intensities=False)
    if report.problems and not skip_bad_cases:
        report.raise_if_problems()
    labels = read_reference(root / "metadata" / "reference.csv", ValidationReport(str(root)))
    cases = []
    for case in report.valid_cases:
        entry = datalist_entry(case, root / "data" / "mha" / f"{case}.mha", labels[case])
        try:
            record = _convert_case(entry, cache_dir, settings)
        except (ValueError, RuntimeError) as err:
            report.add(entry["image"], str(err).strip().splitlines()[-1], case)
            continue
        cases.append(
            {
                **entry,
                "source": entry["image"],
                "image": record["image"],
                "lung_mask": record["lung_mask"],
                "lung_slices": record["lung_slices"],
            }
        )
    if report.problems and not skip_bad_cases:
        raise DatasetValidationError(report.problems, str(root))
    for problem in report.problems:
        logger.warning("STOIC case skipped: %s", problem)
    manifest = {"settings": settings, "cases": cases, "skipped": [str(p) for p in report.problems]}
    atomic_write_json(cache_dir / "manifest.json", manifest)
    return manifest
