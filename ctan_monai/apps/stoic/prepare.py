"""Glue for the STOIC bundle: find the data (or write the synthetic demo), validate and convert it once, split the
patients into training and validation, and build the 2.5D or 3D dataset of a split."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import Dataset

from ctan_monai.apps.stoic.conversion import convert_dataset
from ctan_monai.apps.stoic.datasets import Stoic3DDataset, Stoic25DDataset
from ctan_monai.apps.stoic.labels import LABEL_COLUMNS, case_sort_key, find_stoic_root
from ctan_monai.apps.stoic.preprocessing import CROP_MARGIN_MM, DEFAULT_SPACING, MIN_LUNG_AREA_FRACTION
from ctan_monai.apps.stoic.transforms import LUNG_WINDOW

__all__ = ["SPLITS", "label_group", "make_stoic_dataset", "prepare_stoic", "single_class_problems", "split_patients"]

logger = logging.getLogger("ctan_monai.stoic")

SPLITS = ("training", "validation")


def label_group(entry: Mapping[str, Any]) -> str:
    """The label combination of a patient, for stratified splitting: each task's label, ``?`` when missing.

    Args:
        entry: a datalist / manifest entry (``covid``, ``covid_present``, ``severe``, ``severe_present``).

    Returns:
        e.g. ``"covid=1,severe=?"``.

    Example:
        >>> label_group({"covid": 1.0, "covid_present": 1.0, "severe": 0.0, "severe_present": 0.0})
        'covid=1,severe=?'
    """
    parts = []
    for task in LABEL_COLUMNS:
        known = float(entry.get(f"{task}_present", 1.0)) == 1.0
        parts.append(f"{task}={int(float(entry[task])) if known else '?'}")
    return ",".join(parts)


def split_patients(
    cases: Sequence[Mapping[str, Any]], val_fraction: float = 0.25, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Split patients into training and validation, stratified by label combination (``label_group``), so that both
    splits hold every combination that has at least two patients (and AUC is defined on validation when it can be).

    Within each group the patients are shuffled with ``seed`` and ``round(val_fraction * n)`` of them (at least one
    when the group has two or more) go to validation. The split depends only on the patients, their labels and the
    seed, so training and a later evaluation agree.

    Args:
        cases: manifest entries (``convert_dataset(...)["cases"]``).
        val_fraction: the share of each group held out, in [0, 1).
        seed: the shuffling seed.

    Returns:
        ``{"training": [...], "validation": [...]}``, each in PatientID order.

    Raises:
        ValueError: when ``val_fraction`` is outside [0, 1) or there is no patient.

    Example:
        >>> cases = [{"case_id": str(i), "covid": float(i % 2), "covid_present": 1.0, "severe": 0.0,
        ...           "severe_present": 1.0} for i in range(8)]
        >>> {k: len(v) for k, v in split_patients(cases, 0.25).items()}
        {'training': 6, 'validation': 2}
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not cases:
        raise ValueError("no patient to split")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for entry in sorted(cases, key=lambda e: case_sort_key(str(e["case_id"]))):
        groups.setdefault(label_group(entry), []).append(entry)
    rng = np.random.default_rng(seed)
    held_out: set[str] = set()
    for name in sorted(groups):
        members = groups[name]
        count = int(round(val_fraction * len(members)))
        if val_fraction > 0 and len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        order = rng.permutation(len(members))
        held_out.update(str(members[i]["case_id"]) for i in order[:count])
    ordered = sorted(cases, key=lambda e: case_sort_key(str(e["case_id"])))
    return {
        "training": [dict(e) for e in ordered if str(e["case_id"]) not in held_out],
        "validation": [dict(e) for e in ordered if str(e["case_id"]) in held_out],
    }


def _read_split_file(path: str | os.PathLike[str], cases: Sequence[Mapping[str, Any]]) -> dict[str, list[dict]]:
    """Splits given by the user: a JSON ``{"training": [PatientID, ...], "validation": [...], ...}``."""
    path = Path(path)
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"split file {str(path)!r} could not be read as JSON: {err}") from err
    if not isinstance(listed, Mapping) or not all(isinstance(v, list) for v in listed.values()):
        raise ValueError(f"split file {str(path)!r} must map split names to lists of PatientIDs")
    by_id = {str(e["case_id"]): e for e in cases}
    unknown = sorted({str(c) for ids in listed.values() for c in ids} - set(by_id), key=case_sort_key)
    if unknown:
        raise ValueError(f"split file {str(path)!r} names patients that are not in the (valid) data: {unknown[:20]}")
    return {str(name): [dict(by_id[str(c)]) for c in ids] for name, ids in listed.items()}


def prepare_stoic(
    dataset_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    spacing: Sequence[float] = DEFAULT_SPACING,
    margin_mm: float = CROP_MARGIN_MM,
    min_area_fraction: float = MIN_LUNG_AREA_FRACTION,
    val_fraction: float = 0.25,
    seed: int = 0,
    split_file: str | os.PathLike[str] | None = None,
    write_demo_if_missing: bool = False,
    demo_patients: int = 16,
    skip_bad_cases: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Make the STOIC data ready for training: validate every patient up front, convert to the NIfTI cache once, and
    split the patients (``split_patients``, or the user's ``split_file``).

    Args:
        dataset_dir: the STOIC dataset folder (``data/mha/``, ``metadata/reference.csv``) or a folder holding one.
        cache_dir: the NIfTI cache (reused across runs; cases whose source or settings changed are redone).
        spacing: resampling voxel size in mm, (x, y, z).
        margin_mm: crop margin in mm.
        min_area_fraction: lung-area fraction that makes a slice a 2.5D centre.
        val_fraction: validation share of each label group (ignored with ``split_file``).
        seed: seed of the split.
        split_file: optional JSON ``{"training": [ids], "validation": [ids], ...}`` replacing the random split.
        write_demo_if_missing: when ``dataset_dir`` holds no STOIC dataset, write the synthetic demo there (the
            bundle's default points at its own ``demo_data`` folder).
        demo_patients: patients of the demo.
        skip_bad_cases: convert the good patients and list the bad ones instead of stopping.

    Returns:
        ``{split: [manifest entry, ...]}`` with at least ``training`` and ``validation``.

    Raises:
        FileNotFoundError: when ``dataset_dir`` holds no STOIC dataset (and no demo is to be written).
        DatasetValidationError: listing every problem of every bad patient.
        ValueError: on a bad ``split_file``.

    Warns:
        (log WARNING) for each task whose labelled validation patients are all of one class: its AUC would be NaN
        at the end of training (see :func:`single_class_problems`).

    Example:
        >>> splits = prepare_stoic("demo_data/stoic", "cache/stoic", spacing=(3.5, 3.5, 5.0),
        ...                        write_demo_if_missing=True)  # doctest: +SKIP
        >>> sorted(splits)  # doctest: +SKIP
        ['training', 'validation']
    """
    dataset_dir = Path(dataset_dir)
    try:
        root = find_stoic_root(dataset_dir)
    except FileNotFoundError:
        if not write_demo_if_missing:
            raise
        from ctan_monai.apps.stoic.demo import write_stoic_demo

        logger.info("no STOIC dataset in %s: writing the synthetic demo dataset there", dataset_dir)
        root = write_stoic_demo(dataset_dir, n_patients=demo_patients, seed=seed)
    manifest = convert_dataset(
        root,
        cache_dir,
        spacing=spacing,
        margin_mm=margin_mm,
        min_area_fraction=min_area_fraction,
        skip_bad_cases=skip_bad_cases,
    )
    cases = manifest["cases"]
    splits = _read_split_file(split_file, cases) if split_file else split_patients(cases, val_fraction, seed)
    for name in SPLITS:
        splits.setdefault(name, [])
    for message in single_class_problems(splits["validation"]):
        logger.warning("STOIC validation split: %s", message)
    logger.info(
        "STOIC data: %s",
        {name: {"patients": len(items), "groups": _group_counts(items)} for name, items in splits.items()},
    )
    return splits


def single_class_problems(
    entries: Sequence[Mapping[str, Any]], tasks: Sequence[str] = tuple(LABEL_COLUMNS)
) -> list[str]:
    """The tasks whose labelled patients in ``entries`` are all of one class, so that their AUC is undefined (NaN).

    Args:
        entries: the patients of a split (``<task>`` 0/1 and ``<task>_present`` flags).
        tasks: the binary tasks.

    Returns:
        one message per such task, with the counts and what to do; empty when ``entries`` is empty (the split's
        dataset refuses an empty split) or every task has both classes.

    Example:
        >>> rows = [{"covid": 1.0, "covid_present": 1.0, "severe": 0.0, "severe_present": 1.0}] * 3
        >>> [m.split(":")[0] for m in single_class_problems(rows)]
        ["task 'covid' has no negative patient", "task 'severe' has no positive patient"]
    """
    problems = []
    for task in tasks if entries else ():
        labelled = [e for e in entries if float(e.get(f"{task}_present", 1.0)) == 1.0]
        positive = sum(float(e[task]) == 1.0 for e in labelled)
        counts = (
            f"{len(labelled)} labelled: {positive} positive, {len(labelled) - positive} negative; "
            f"{len(entries) - len(labelled)} unlabelled"
        )
        if not labelled:
            what = "has no labelled patient"
        elif positive == 0:
            what = "has no positive patient"
        elif positive == len(labelled):
            what = "has no negative patient"
        else:
            continue
        problems.append(
            f"task {task!r} {what}: {counts}. Its validation AUC will be NaN (undefined with one class) and the key "
            "metric (the mean AUC) leaves it out: model selection ignores that task. Use more patients, another "
            "val_fraction or seed, or a split_file whose validation patients hold both classes of every task"
        )
    return problems


def _group_counts(items: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in items:
        counts[label_group(entry)] = counts.get(label_group(entry), 0) + 1
    return dict(sorted(counts.items()))


def make_stoic_dataset(
    data: Sequence[Mapping[str, Any]],
    spatial_dims: int = 2,
    training: bool = True,
    image_size: int = 224,
    slices_per_patient: int = 4,
    eval_slices: int = 8,
    volume_size: int = 64,
    window: Sequence[float] = LUNG_WINDOW,
    seed: int = 0,
) -> Dataset:
    """The dataset of one split for 2.5D (``spatial_dims=2``: ``Stoic25DDataset``) or 3D (``Stoic3DDataset``) input,
    so that the bundle switches between them with one value.

    Args:
        data: manifest entries of the split.
        spatial_dims: 2 (2.5D, three adjacent axial slices as channels) or 3 (the resampled volume).
        training: random lung slices (training) or fixed ones (evaluation); 2.5D only.
        image_size: side of the 2.5D slices.
        slices_per_patient: 2.5D samples per patient per epoch in training.
        eval_slices: 2.5D samples per patient at evaluation (their probabilities are averaged per patient).
        volume_size: side of the 3D cube.
        window: HU window mapped to [0, 1].
        seed: seed of the 2.5D slice draws.

    Returns:
        the dataset; with ``monai.data.DataLoader`` a batch of B patients holds B x k slices (2.5D) or B volumes.

    Raises:
        ValueError: for ``spatial_dims`` other than 2 or 3, or an empty split.

    Example:
        >>> ds = make_stoic_dataset(splits["training"], spatial_dims=2, image_size=96)  # doctest: +SKIP
    """
    if not data:
        raise ValueError("the split holds no patient: check the dataset, val_fraction or split_file")
    if spatial_dims == 2:
        return Stoic25DDataset(
            data,
            training=training,
            image_size=image_size,
            slices_per_patient=slices_per_patient,
            eval_slices=eval_slices,
            window=window,
            seed=seed,
        )
    if spatial_dims == 3:
        return Stoic3DDataset(data, volume_size=volume_size, window=window)
    raise ValueError(f"spatial_dims must be 2 (2.5D) or 3, got {spatial_dims}")
