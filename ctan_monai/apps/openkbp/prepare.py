"""Glue for the OpenKBP bundle: find the data (or write the synthetic demo), validate and convert it once, and
serve whole patients for slice-wise 3D evaluation."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctan_monai.apps.openkbp.conversion import MANIFEST_NAME, check_cache, convert_dataset, load_manifest
from ctan_monai.apps.openkbp.reader import DEFAULT_STRUCTURES, SPLITS
from ctan_monai.apps.openkbp.validation import find_patient_folders
from ctan_monai.data.slices import load_case
from ctan_monai.data.validation import DataProblem, DatasetValidationError

__all__ = ["LoadCased", "OpenKBPSplits", "prepare_openkbp"]

logger = logging.getLogger("ctan_monai.openkbp")


class OpenKBPSplits(dict[str, list[dict[str, Any]]]):
    """``{split: [entry, ...]}`` as :func:`prepare_openkbp` returns it, where asking for a split the dataset does not
    have (``data['validation-pats']`` in the bundle's config) is a ``DatasetValidationError`` naming the dataset
    folder and the splits it has, instead of a bare ``KeyError: 'validation-pats'``.

    Args:
        splits: the entries per split.
        dataset_dir: the dataset folder, for the message.

    Example:
        >>> splits = OpenKBPSplits({"train-pats": [{"case_id": "pt_1"}]}, "provided-data")
        >>> try:
        ...     splits["validation-pats"]
        ... except DatasetValidationError as err:
        ...     print(err.problems[0].message[:68])
        no 'validation-pats' patients: the dataset has train-pats (1 patient
    """

    def __init__(self, splits: Mapping[str, list[dict[str, Any]]], dataset_dir: str | os.PathLike[str]) -> None:
        super().__init__(splits)
        self.dataset_dir = str(dataset_dir)

    def __missing__(self, split: str) -> list[dict[str, Any]]:
        """Raise for a split without patients.

        Raises:
            DatasetValidationError: naming the dataset folder, the split asked for and the splits present.
        """
        have = ", ".join(f"{name} ({len(entries)} patient(s))" for name, entries in self.items()) or "no split"
        folder = f"a {split}/ folder of pt_<n> patient folders" if split in SPLITS else f"one of {', '.join(SPLITS)}"
        message = (
            f"no {split!r} patients: the dataset has {have} only. The bundle's training validates on "
            f"validation-pats (and evaluate.yaml reads --eval_split): add {folder} beside train-pats/ (OpenKBP's "
            "provided-data has train-pats, validation-pats and test-pats), e.g. by moving some training patients there"
        )
        raise DatasetValidationError([DataProblem(self.dataset_dir, message)], f"OpenKBP {self.dataset_dir}")


def prepare_openkbp(
    dataset_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    structures: Sequence[str] = DEFAULT_STRUCTURES,
    write_demo_if_missing: bool = False,
    demo_patients: tuple[int, int] = (6, 2),
    skip_bad_cases: bool = False,
    any_cache_source: bool = False,
) -> OpenKBPSplits:
    """Make the OpenKBP data ready for training: validate every patient up front, convert to the NIfTI cache once,
    and return the manifest entries per split (``train-pats``, ``validation-pats``, ``test-pats`` as present).

    Args:
        dataset_dir: the OpenKBP ``provided-data`` folder or a folder above it. When it holds no patient, the cache
            in ``cache_dir`` stands in for it only when it was converted from this same folder (a cache copied to a
            machine without the CSVs: pass the folder it was made from), or when ``dataset_dir`` is the cache folder
            itself; its files are then checked against the CRC-32s recorded at conversion.
        cache_dir: the NIfTI cache (reused across runs; patients whose source changed are redone).
        structures: structures of the segmentation task, in label order.
        write_demo_if_missing: when ``dataset_dir`` holds no patient, write the synthetic demo dataset there (the
            bundle's default points at its own ``demo_data`` folder).
        demo_patients: (training, validation) patients of the demo.
        skip_bad_cases: convert the good patients and list the bad ones instead of stopping.
        any_cache_source: use the cache when ``dataset_dir`` holds no patient even if the cache was converted from
            another folder (by default that is refused: a mistyped ``dataset_dir`` would train on other data).

    Returns:
        ``{split: [entry, ...]}`` (an :class:`OpenKBPSplits`: a split the dataset does not have is a
        ``DatasetValidationError`` naming it, not a ``KeyError``).

    Raises:
        FileNotFoundError: when ``dataset_dir`` holds no OpenKBP patient (and no demo is to be written) and there is
            no cache made from it.
        ValueError: when a cache used without its sources was made for other structures.
        DatasetValidationError: listing every problem of every bad patient, or every missing or corrupt file of a
            cache used without its sources.

    Example:
        >>> splits = prepare_openkbp("demo_data/openkbp", "cache/openkbp", write_demo_if_missing=True)  # doctest: +SKIP
        >>> sorted(splits)  # doctest: +SKIP
        ['train-pats', 'validation-pats']
    """
    dataset_dir = Path(dataset_dir)
    try:
        find_patient_folders(dataset_dir)
    except FileNotFoundError as err:
        manifest = Path(cache_dir) / MANIFEST_NAME
        if not write_demo_if_missing and manifest.is_file():
            return _splits_from_cache(manifest, structures, dataset_dir, any_cache_source, err)
        if not write_demo_if_missing:
            raise
        from ctan_monai.apps.openkbp.demo import write_openkbp_demo

        logger.info("no OpenKBP patients in %s: writing the synthetic demo dataset there", dataset_dir)
        write_openkbp_demo(dataset_dir, n_train=demo_patients[0], n_val=demo_patients[1])
    entries = convert_dataset(dataset_dir, cache_dir, structures=structures, skip_bad_cases=skip_bad_cases)
    splits: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        splits.setdefault(entry["split"], []).append(entry)
    logger.info("OpenKBP data: %s", {k: len(v) for k, v in splits.items()})
    return OpenKBPSplits(splits, dataset_dir)


def _made_from(recorded: Mapping[str, Any], manifest: Path, dataset_dir: Path) -> tuple[bool, str]:
    """Whether the cache of ``manifest`` was converted from ``dataset_dir`` (or ``dataset_dir`` is the cache), and the
    source folder it records (for messages)."""
    given = Path(dataset_dir).resolve()
    if given == manifest.parent.resolve():
        return True, str(manifest.parent)
    source = recorded.get("source_dir")
    if source:
        source_path = Path(source)
        return given in (source_path, source_path / "provided-data") or source_path == given / "provided-data", source
    # a cache written before source_dir was recorded: every patient's source folder must lie inside dataset_dir
    sources = [Path(e["source"]) for split in SPLITS for e in recorded.get(split, []) if e.get("source")]
    if not sources:
        return False, "an unrecorded folder"
    common = os.path.commonpath([str(p) for p in sources])
    return all(p.is_relative_to(given) for p in sources), common


def _splits_from_cache(
    manifest: Path,
    structures: Sequence[str],
    dataset_dir: Path,
    any_cache_source: bool,
    not_found: FileNotFoundError,
) -> OpenKBPSplits:
    """The splits of an existing cache, checked against the requested structures and source folder, and for missing
    or corrupt files."""
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{manifest}: not a JSON manifest ({err}); reconvert the cache") from None
    if list(recorded.get("structures") or []) != list(structures):
        raise ValueError(
            f"{manifest}: cache made for structures {recorded.get('structures')}, not {list(structures)}; reconvert it"
        )
    same, source = _made_from(recorded, manifest, dataset_dir)
    if not same and not any_cache_source:
        raise FileNotFoundError(
            f"{not_found}. The converted cache {manifest.parent} does not stand in for it: it was made from {source}, "
            f"not from {dataset_dir}. Check the dataset_dir (--dataset_dir) for a typo; to train on that cache as it "
            f"is, pass the folder it was made from ({source}) or prepare_openkbp(..., any_cache_source=True)"
        ) from None
    check_cache(manifest).raise_if_problems()
    entries = load_manifest(manifest)
    logger.warning(
        "no OpenKBP patients in %s: using the converted cache %s (made from %s) as it is",
        dataset_dir,
        manifest.parent,
        source,
    )
    splits: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        splits.setdefault(entry["split"], []).append(entry)
    logger.info("OpenKBP data (cache only): %s", {k: len(v) for k, v in splits.items()})
    return OpenKBPSplits(splits, dataset_dir)


class LoadCased:
    """Dataset transform: a manifest entry -> the whole case as tensors (``load_case``), keeping ``case_id``,
    ``source`` and ``spacing`` for the evaluation report and the DVH score.

    Args:
        seg_task: the segmentation task's name.
        dose_task: the dose task's name.
        num_classes: segmentation classes, background included.
    """

    def __init__(self, seg_task: str = "seg", dose_task: str = "dose", num_classes: int | None = None) -> None:
        self.seg_task = seg_task
        self.dose_task = dose_task
        self.num_classes = num_classes

    def __call__(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        case = load_case(entry, self.seg_task, self.dose_task, self.num_classes)
        case["source"] = str(entry.get("source", ""))
        case["spacing"] = [float(s) for s in entry.get("spacing", [1.0, 1.0, 1.0])]
        return case
