"""Glue for the prostate bundle: find the DICOM-RT data (or write the synthetic demo), convert it once to the NIfTI
cache, split the patients, and serve whole patients for slice-wise 3D evaluation.

The conversion (``ctan_monai.data.dicom_rt.convert_dicom_rt``) writes NIfTI volumes in the CT's own axis order
(SimpleITK: columns, rows, slices; ``("L", "P", "S")`` for a head-first supine axial CT). The slice pipeline
(``ctan_monai.data.slices``) reads them with ``axcodes``; the bundle uses ``"PLI"``, the orientation of the OpenKBP
cache (``openkbp_affine``): axis 0 rows anterior -> posterior, axis 1 columns patient right -> left, axis 2 slices
superior -> inferior, so that a slice looks as in a radiological viewer and both datasets share one orientation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist

from ctan_monai.apps.prostate.geometry import BUNDLE_AXCODES, oriented_spacing, reorient, resize_in_plane
from ctan_monai.data.dicom_rt.convert import convert_dicom_rt
from ctan_monai.data.dicom_rt.synonyms import PROSTATE_ORGANS, load_synonyms
from ctan_monai.data.slices import load_case
from ctan_monai.data.validation import DatasetValidationError
from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text
from ctan_monai.utils.integrity import file_problem, file_record

__all__ = [
    "BUNDLE_AXCODES",
    "SPLITS",
    "LabelMapStructures",
    "LoadProstateCased",
    "oriented_spacing",
    "prepare_prostate",
    "reorient",
    "resize_in_plane",
    "split_cases",
]

logger = logging.getLogger("ctan_monai.prostate")

SPLITS = ("training", "validation", "test")
_DEMO_MARKER = ".demo_complete"
_PREPARED = "prepared.json"


def _source_stamp(dataset_dir: Path, settings: Mapping[str, Any], exclude: Path | None = None) -> str:
    """A digest of every file under ``dataset_dir`` (path, size, modification time) and the conversion settings;
    files under ``exclude`` (a cache kept inside the dataset folder) do not count."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    skip = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, names in os.walk(dataset_dir):
        dirnames[:] = sorted(d for d in dirnames if (Path(dirpath) / d).resolve() != skip)
        for name in sorted(names):
            path = Path(dirpath) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(dataset_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cached_files(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The cache files of the manifest entries, relative to the cache folder."""
    return [str(e[k]) for e in entries for k in ("image", "label", "dose", "dose_mask") if e.get(k)]


def _output_records(cache_dir: Path, entries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Size and CRC-32 of every cache file of the entries, by path relative to ``cache_dir``."""
    return {name: file_record(cache_dir / name) for name in _cached_files(entries)}


def _cached_file_problem(cache_dir: Path, names: Sequence[str], outputs: Mapping[str, Any] | None) -> str | None:
    """The first cache file that cannot be trusted, as ``"<file> <problem>"``, or None when all can.

    ``outputs`` are the records written after the conversion; without them (an older cache) the gzip files are
    decompressed to the end instead."""
    for name in names:
        record = outputs.get(name) if isinstance(outputs, Mapping) else None
        if isinstance(outputs, Mapping) and record is None:
            return f"{cache_dir / name} has no integrity record"
        problem = file_problem(cache_dir / name, record)
        if problem is not None:
            return f"{cache_dir / name} {problem}"
    return None


@contextlib.contextmanager
def _rank_zero_first() -> Iterator[None]:
    """Under torch.distributed, let rank 0 write the demo and the cache while the other ranks wait, then read it."""
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        # rank 0 releases the others even when it failed: they then fail on their own instead of waiting forever
        if distributed and dist.get_rank() == 0:
            dist.barrier()


def _write_demo(dataset_dir: Path, n_patients: int, shape: Sequence[int], spacing: Sequence[float]) -> None:
    """Write the synthetic DICOM-RT demo into ``dataset_dir`` (again, if an earlier write was interrupted)."""
    from ctan_monai.apps.prostate.demo import write_prostate_demo  # only the demo needs the writer

    logger.info("no complete demo in %s: writing %d synthetic DICOM-RT patients there", dataset_dir, n_patients)
    for leftover in ("dicom", "README.txt"):  # only what the writer itself creates
        target = dataset_dir / leftover
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    write_prostate_demo(dataset_dir, n_patients=n_patients, shape=shape, spacing=spacing)
    atomic_write_text(dataset_dir / _DEMO_MARKER, "written by ctan_monai.apps.prostate.prepare\n")


def _convert(
    dataset_dir: Path,
    cache_dir: Path,
    organs: Sequence[str],
    synonyms: Mapping[str, Sequence[str]] | None,
    require_dose: bool,
    skip_bad_cases: bool,
) -> list[dict[str, Any]]:
    """Convert once: reuse the cache's manifest while the source files and the settings are unchanged and every
    cached file has the size and CRC-32 recorded after the conversion (else convert again, naming the bad file)."""
    settings = {"organs": list(organs), "synonyms": synonyms, "require_dose": require_dose, "skip": skip_bad_cases}
    stamp = _source_stamp(dataset_dir, settings, exclude=cache_dir)
    prepared, manifest_path = cache_dir / _PREPARED, cache_dir / "manifest.json"
    if prepared.is_file() and manifest_path.is_file():
        try:
            record = json.loads(prepared.read_text(encoding="utf-8"))
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            record, manifest = {}, {}
        entries = manifest.get("cases", []) if isinstance(manifest, Mapping) else []
        if isinstance(record, Mapping) and record.get("stamp") == stamp and entries:
            problem = _cached_file_problem(cache_dir, _cached_files(entries), record.get("outputs"))
            if problem is None:
                if record.get("outputs") is None:  # a cache from before the records: checked, now recorded
                    atomic_write_json(prepared, {**record, "outputs": _output_records(cache_dir, entries)})
                logger.info("DICOM-RT cache %s is up to date (%d cases)", cache_dir, len(entries))
                return entries
            logger.warning("DICOM-RT cache %s: %s; converting the studies again", cache_dir, problem)
    logger.info("converting the DICOM-RT studies of %s to %s", dataset_dir, cache_dir)
    prepared.unlink(missing_ok=True)  # invalid until the new conversion has finished
    try:
        result = convert_dicom_rt(
            dataset_dir, cache_dir, organs=organs, synonyms=synonyms, require_dose=require_dose, skip_bad=skip_bad_cases
        )
    except DatasetValidationError as err:
        hint = f"DICOM-RT {dataset_dir} (also in {cache_dir / 'report.json'}; skip_bad_cases=True trains on the others)"
        raise DatasetValidationError(err.problems, hint) from None
    for problem in result.warnings:
        logger.warning("conversion: %s", problem)
    for problem in result.report.problems:
        logger.warning("conversion skipped: %s", problem)
    outputs = _output_records(cache_dir, result.entries)
    atomic_write_json(prepared, {"stamp": stamp, "source": str(dataset_dir), "outputs": outputs})
    return result.entries


def split_cases(
    case_ids: Sequence[str],
    splits_file: str | os.PathLike[str] | None = None,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Split patients into ``training``, ``validation`` and ``test``: from a JSON file, or at random (seeded).

    Args:
        case_ids: the converted cases.
        splits_file: JSON ``{"training": [ids], "validation": [ids], "test": [ids]}`` (any subset of the keys; cases
            it does not list are left out); None for a random split.
        validation_fraction: share of the patients for validation (at least one).
        test_fraction: share of the patients held out for testing.
        seed: seed of the random split; the same ids and seed always give the same split.

    Returns:
        ``{split: [case ids]}`` for the three splits (lists may be empty except training and validation).

    Raises:
        ValueError: naming the splits file for unknown or repeated ids, an unknown split or no training /
            validation patient; for fewer than two patients or fractions that leave no training patient.

    Example:
        >>> split_cases(["a", "b", "c", "d", "e"], validation_fraction=0.2)["validation"]
        ['c']
    """
    ids = sorted(str(c) for c in case_ids)
    if splits_file is not None:
        try:
            given = json.loads(Path(splits_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"splits file {str(splits_file)!r} cannot be read as JSON: {err}") from None
        problems = []
        if not isinstance(given, Mapping):
            raise ValueError(f"splits file {str(splits_file)!r} must map split names to lists of case ids")
        unknown_splits = sorted(set(given) - set(SPLITS))
        if unknown_splits:
            problems.append(f"unknown split(s) {unknown_splits} (expected {list(SPLITS)})")
        listed = [str(c) for split in SPLITS for c in given.get(split, [])]
        unknown = sorted(set(listed) - set(ids))
        if unknown:
            problems.append(f"case ids not among the converted cases: {unknown}")
        repeated = sorted({c for c in listed if listed.count(c) > 1})
        if repeated:
            problems.append(f"case ids in several splits: {repeated}")
        splits = {split: sorted(str(c) for c in given.get(split, [])) for split in SPLITS}
        for split in SPLITS[:2]:
            if not splits[split]:
                problems.append(f"no {split} case")
        if problems:
            raise ValueError(f"splits file {str(splits_file)!r}: " + "; ".join(problems))
        return splits
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} converted case(s): at least 2 are needed (training and validation)")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_val = max(1, int(round(validation_fraction * len(ids))))
    n_test = int(round(test_fraction * len(ids)))
    if n_val + n_test >= len(ids):
        raise ValueError(
            f"validation_fraction {validation_fraction} and test_fraction {test_fraction} leave no training case "
            f"among {len(ids)}"
        )
    return {
        "training": sorted(order[n_val + n_test :]),
        "validation": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
    }


def _check_slice_shapes(entries: Sequence[Mapping[str, Any]], axcodes: str) -> None:
    """Slices of different in-plane sizes cannot share a batch: say so before training starts."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for entry in entries:
        image = nib.load(str(entry["image"]))
        shape = reorient(np.empty(image.shape[:3], dtype=np.uint8), image.affine, axcodes).shape
        shapes.setdefault((int(shape[0]), int(shape[1])), []).append(str(entry["case_id"]))
    if len(shapes) > 1:
        listing = "; ".join(f"{list(s)}: {ids[:5]}{' ...' if len(ids) > 5 else ''}" for s, ids in shapes.items())
        raise ValueError(
            f"the training CTs have different in-plane sizes ({listing}); set spatial_size (e.g. "
            "--spatial_size '[256, 256]') so that every slice is resized to one size"
        )


def prepare_prostate(
    dataset_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    organs: Sequence[str] = PROSTATE_ORGANS,
    synonyms: Mapping[str, Sequence[str]] | str | os.PathLike[str] | None = None,
    write_demo_if_missing: bool = False,
    demo_patients: int = 6,
    demo_shape: Sequence[int] = (64, 64, 32),
    demo_spacing: Sequence[float] = (6.0, 6.0, 4.0),
    splits_file: str | os.PathLike[str] | None = None,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    require_dose: bool = False,
    skip_bad_cases: bool = False,
    spatial_size: Sequence[int] | None = None,
    axcodes: str = BUNDLE_AXCODES,
) -> dict[str, list[dict[str, Any]]]:
    """Make DICOM-RT prostate data ready for training: convert every study once to the NIfTI cache (reused while the
    DICOM files and settings are unchanged and every cached file has the size and CRC-32 recorded after the
    conversion; a missing, truncated or corrupt cached file is named in the log and the studies are converted
    again), split the patients, and return the manifest entries per split.

    Args:
        dataset_dir: a folder tree of DICOM files (CT series, RTSTRUCT, RTDOSE per patient; any layout).
        cache_dir: the NIfTI cache (``convert_dicom_rt``'s output: one folder per case, ``manifest.json``,
            ``report.json``).
        organs: the segmentation classes 1..N in label order, matched to ROI names through synonyms.
        synonyms: extra ROI names per organ: a mapping or a YAML file.
        write_demo_if_missing: write the synthetic demo into ``dataset_dir`` when it holds no complete demo (the
            bundle sets it only for its own ``demo_data`` folder).
        demo_patients: patients of the demo.
        demo_shape: CT size (x, y, z) of the demo patients.
        demo_spacing: CT voxel size (x, y, z) in mm of the demo patients.
        splits_file: JSON file of the splits (see :func:`split_cases`); None for a seeded random split.
        validation_fraction: share of patients for validation in a random split.
        test_fraction: share of patients for testing in a random split.
        seed: seed of the random split.
        require_dose: a patient without RTDOSE fails conversion (by default it converts with its dose missing: it
            then adds to the segmentation loss only).
        skip_bad_cases: train on the patients that convert and list the others (in the log and the cache's
            ``report.json``) instead of stopping.
        spatial_size: the in-plane size the slices are resized to; None keeps the CT's, which must then be the same
            for all training patients (checked here, up front).
        axcodes: the orientation the slices are read in (checked for the in-plane sizes).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``: manifest entries with absolute paths and a
        ``split`` key.

    Raises:
        DatasetValidationError: listing every study that cannot be converted (unless ``skip_bad_cases``).
        FileNotFoundError: when ``dataset_dir`` does not exist (and no demo is to be written).
        ValueError: for a bad split or in-plane sizes that differ without ``spatial_size``.

    Example:
        >>> splits = prepare_prostate(  # doctest: +SKIP
        ...     "demo_data/prostate", "cache/prostate", write_demo_if_missing=True
        ... )
        >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
        {'training': 5, 'validation': 1, 'test': 0}
    """
    dataset_dir, cache_dir = Path(dataset_dir), Path(cache_dir)
    if synonyms is not None and not isinstance(synonyms, Mapping):
        synonyms = load_synonyms(synonyms)
    with _rank_zero_first():
        if write_demo_if_missing and not (dataset_dir / _DEMO_MARKER).is_file():
            _write_demo(dataset_dir, demo_patients, demo_shape, demo_spacing)
        if not dataset_dir.is_dir():
            raise FileNotFoundError(
                f"dataset_dir {str(dataset_dir)!r} does not exist: point it at a folder of DICOM files"
            )
        entries = _convert(dataset_dir, cache_dir, organs, synonyms, require_dose, skip_bad_cases)
    entries = [
        {**e, **{k: str(cache_dir / e[k]) for k in ("image", "label", "dose", "dose_mask") if e.get(k)}}
        for e in entries
    ]
    by_id = {str(e["case_id"]): e for e in entries}
    assignment = split_cases(list(by_id), splits_file, validation_fraction, test_fraction, seed)
    splits = {split: [{**by_id[c], "split": split} for c in ids] for split, ids in assignment.items()}
    if spatial_size is None:
        _check_slice_shapes(splits["training"], axcodes)
    logger.info("prostate data: %s", {k: len(v) for k, v in splits.items()})
    return splits


# --- whole patients for evaluation ---------------------------------------------------------------------------------


def _read_oriented(path: str | os.PathLike[str], axcodes: str) -> tuple[np.ndarray, list[float]]:
    image = nib.load(str(path))
    array = reorient(np.asarray(image.dataobj), image.affine, axcodes)
    return np.ascontiguousarray(array), oriented_spacing(image.affine, axcodes)


class LoadProstateCased:
    """Dataset transform: a manifest entry -> the whole patient as tensors ``[1, H, W, S]`` (``load_case`` in the
    bundle's orientation and intensity scale, resized in-plane like the training slices), with ``case_id``,
    ``source`` (the label map file, for :class:`LabelMapStructures`) and ``spacing`` (mm, per axis of the tensors).

    Args:
        seg_task: the segmentation task's name.
        dose_task: the dose task's name.
        num_classes: segmentation classes, background included.
        axcodes: orientation of the tensors (as the training slices).
        image_range: ``(a_min, a_max)`` HU clipped and scaled to [0, 1] (as the training slices).
        spatial_size: in-plane size ``(H, W)`` of the training slices, or None for the CT's.

    Example:
        >>> case = LoadProstateCased(num_classes=5)(splits["validation"][0])  # doctest: +SKIP
        >>> case["image"].shape  # doctest: +SKIP
        torch.Size([1, 64, 64, 32])
    """

    def __init__(
        self,
        seg_task: str = "seg",
        dose_task: str = "dose",
        num_classes: int | None = None,
        axcodes: str = BUNDLE_AXCODES,
        image_range: Sequence[float] | None = (-1024.0, 3071.0),
        spatial_size: Sequence[int] | None = None,
    ) -> None:
        self.seg_task, self.dose_task = seg_task, dose_task
        self.num_classes = num_classes
        self.axcodes = axcodes
        self.image_range = None if image_range is None else (float(image_range[0]), float(image_range[1]))
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)

    def __call__(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        case = load_case(
            entry,
            self.seg_task,
            self.dose_task,
            self.num_classes,
            axcodes=self.axcodes,
            image_range=self.image_range,
        )
        shape = case["image"].shape[1:]
        for key in ("image", self.dose_task):
            case[key] = resize_in_plane(case[key], self.spatial_size, nearest=False)
        for key in (self.seg_task, f"{self.dose_task}_mask"):
            case[key] = resize_in_plane(case[key], self.spatial_size, nearest=True)
        image = nib.load(str(entry["image"]))
        spacing = oriented_spacing(image.affine, self.axcodes)
        if self.spatial_size is not None:
            spacing = [spacing[i] * shape[i] / self.spatial_size[i] for i in range(2)] + spacing[2:]
        case["spacing"] = torch.tensor(spacing, dtype=torch.float64)  # one tensor: collates to [B, 3]
        case["source"] = str(entry.get("label") or "")
        return case


class LabelMapStructures:
    """The ``dvh_structures`` function of ``VolumeEvaluationHandler`` for the prostate bundle: the organ masks of a
    case, read from its label map (the batch's ``source``) on the evaluation grid, so that the report has DVH metrics
    (D_0.1cc and mean dose) of every organ. The organs are organs at risk: no target enters the DVH score.

    Args:
        organs: the names of labels 1..N.
        axcodes: orientation of the evaluation grid.
        spatial_size: in-plane size of the evaluation grid, or None.

    Example:
        >>> masks, spacing = LabelMapStructures(["Rectum"])({"source": "cache/p1/label.nii.gz"})  # doctest: +SKIP
    """

    def __init__(
        self, organs: Sequence[str], axcodes: str = BUNDLE_AXCODES, spatial_size: Sequence[int] | None = None
    ) -> None:
        self.organs = list(organs)
        self.axcodes = axcodes
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)

    def __call__(self, case: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], Sequence[float]] | None:
        source = case.get("source")
        if not source or not os.path.isfile(str(source)):
            return None
        label, _ = _read_oriented(source, self.axcodes)
        volume = resize_in_plane(torch.from_numpy(label.astype(np.int64))[None], self.spatial_size, nearest=True)
        label = volume[0].numpy()
        masks = {organ: label == index for index, organ in enumerate(self.organs, start=1) if (label == index).any()}
        spacing = case.get("spacing")
        spacing = [float(s) for s in (spacing.tolist() if hasattr(spacing, "tolist") else spacing)]
        return masks, spacing
