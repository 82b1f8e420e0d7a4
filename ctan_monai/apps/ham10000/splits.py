"""HAM10000 splits by lesion, stratified by diagnosis, written once and re-checked on load."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ctan_monai.apps.ham10000.sampling import class_count_table, class_counts
from ctan_monai.apps.ham10000.validation import (
    HAM10000_CLASSES,
    MASK_DIR,
    METADATA_FILE,
    _cases_to_skip,
    _check_files,
    _scan_cases,
    _warn_whole_image_masks,
    build_datalist,
    find_dataset_dir,
)
from ctan_monai.data.validation import ValidationReport
from ctan_monai.utils.atomic import atomic_write_json

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_NAMES = ("training", "validation", "test")


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer parts of ``n * fractions`` that sum to ``n`` (ties go to the earlier, larger share)."""
    exact = [n * f for f in fractions]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def check_no_lesion_leak(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Raise when a lesion has images in two splits (the test set would leak into training).

    Args:
        splits: split name to datalist.

    Raises:
        ValueError: naming the lesions found in more than one split.

    Example:
        >>> check_no_lesion_leak({"training": [{"lesion_id": "a"}], "test": [{"lesion_id": "b"}]})
    """
    split_of: dict[str, set[str]] = defaultdict(set)
    for name, entries in splits.items():
        for entry in entries:
            split_of[entry["lesion_id"]].add(name)
    leaks = {lesion: sorted(names) for lesion, names in split_of.items() if len(names) > 1}
    if leaks:
        shown = dict(list(leaks.items())[:10])
        raise ValueError(f"{len(leaks)} lesion(s) in more than one split: {shown}")


def split_by_lesion(
    datalist: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    split_file: str | os.PathLike[str] | None = None,
    names: Sequence[str] | None = None,
    dataset_dir: str | os.PathLike[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Split a datalist by ``lesion_id``, stratified by ``dx``, reproducibly from ``seed``.

    Within each class, the lesions (sorted, then shuffled with ``seed``) are cut by ``fractions`` with
    largest-remainder rounding, so a class of one lesion goes to the first split. The result does not depend on
    the order of ``datalist``.

    Args:
        datalist: entries with ``lesion_id``, ``dx``, ``image_id`` (e.g. from :func:`build_datalist`).
        fractions: share of the lesions of each class per split; non-negative, summing to 1.
        seed: seed of the shuffle.
        split_file: when given, the split is written there (JSON, atomically) for auditing and re-use with
            :func:`load_split`: seed, fractions, class counts, the entries (paths relative to ``dataset_dir``) and
            the size and modification time of every file (``file_stats``, for :func:`prepare_splits`' re-check).
        names: split names; default ``("training", "validation", "test")`` cut to ``len(fractions)``.
        dataset_dir: the folder the written paths are relative to; default: the common folder of all paths.

    Returns:
        split name to datalist (entries sorted by ``image_id``).

    Raises:
        ValueError: when the fractions or names are malformed, a lesion has two diagnoses, or an entry has an
            unknown ``dx``.

    Example:
        >>> data = [{"image_id": f"i{k}", "lesion_id": f"l{k // 2}", "dx": k // 2 % 2} for k in range(40)]
        >>> splits = split_by_lesion(data, fractions=(0.5, 0.5), seed=1)
        >>> [len(v) for v in splits.values()]
        [20, 20]
    """
    names = tuple(names) if names is not None else SPLIT_NAMES[: len(fractions)]
    if len(names) != len(fractions) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct split name per fraction, got names {names} for fractions {fractions}")
    if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    dx_of_lesion: dict[str, int] = {}
    images_of_lesion: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for entry in datalist:
        lesion, dx = entry["lesion_id"], int(entry["dx"])
        if not 0 <= dx < len(HAM10000_CLASSES):
            raise ValueError(f"image {entry.get('image_id')}: dx index {dx} is not a HAM10000 class")
        if dx_of_lesion.setdefault(lesion, dx) != dx:
            raise ValueError(f"lesion {lesion} has two diagnoses ({dx_of_lesion[lesion]} and {dx}): cannot stratify")
        images_of_lesion[lesion].append(entry)

    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for dx in range(len(HAM10000_CLASSES)):
        lesions = sorted(lesion for lesion, d in dx_of_lesion.items() if d == dx)
        lesions = [lesions[i] for i in rng.permutation(len(lesions))]
        start = 0
        for name, count in zip(names, _largest_remainder(len(lesions), fractions)):
            for lesion in lesions[start : start + count]:
                splits[name].extend(dict(e) for e in images_of_lesion[lesion])
            start += count
    for entries in splits.values():
        entries.sort(key=lambda e: e["image_id"])
    check_no_lesion_leak(splits)
    if split_file is not None:
        _write_split(split_file, splits, dict(zip(names, fractions)), seed, dataset_dir)
    return splits


def _common_dir(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    paths = [str(e[k]) for entries in splits.values() for e in entries for k in ("image", "seg") if k in e]
    return os.path.commonpath(paths) if paths else ""


def _write_split(
    split_file: str | os.PathLike[str],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    fractions: Mapping[str, float],
    seed: int,
    dataset_dir: str | os.PathLike[str] | None,
) -> None:
    """Write the split as JSON: provenance, class counts, and the entries with paths relative to ``dataset_dir``."""
    base = os.path.abspath(dataset_dir) if dataset_dir is not None else os.path.abspath(_common_dir(splits))

    def relative(path: Any) -> str:
        path = os.path.abspath(str(path))
        inside = base and os.path.commonpath([base, path]) == base
        return os.path.relpath(path, base) if inside else path

    document: dict[str, Any] = {
        "description": (
            "HAM10000 split by lesion_id, stratified by dx (ctan_monai.apps.ham10000.splits.split_by_lesion)"
        ),
        "dataset_dir": base,
        "seed": seed,
        "fractions": dict(fractions),
        "classes": list(HAM10000_CLASSES),
        "class_counts": {name: class_counts(entries) for name, entries in splits.items()},
        "num_lesions": {name: len({e["lesion_id"] for e in entries}) for name, entries in splits.items()},
    }
    for name, entries in splits.items():
        document[name] = [{**e, **{k: relative(e[k]) for k in ("image", "seg") if k in e}} for e in entries]
    # size and modification time of every file when the split was written: a later run re-checks the files that
    # changed (e.g. truncated by a failed copy) before training on them
    document["file_stats"] = {
        relative(e[k]): stat
        for entries in splits.values()
        for e in entries
        for k in ("image", "seg")
        if k in e and (stat := _file_stat(e[k])) is not None
    }
    atomic_write_json(split_file, document)


def _file_stat(path: Any) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, or None when it cannot be stat'ed."""
    try:
        stat = os.stat(str(path))
    except OSError:
        return None
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def load_split(
    split_file: str | os.PathLike[str],
    split: str | None = None,
    dataset_dir: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> Any:
    """Read a split written by :func:`split_by_lesion`.

    Args:
        split_file: the JSON split file.
        split: one split name (e.g. ``"training"``) to return its datalist; None returns all splits.
        dataset_dir: folder the relative paths are resolved against; default: the one recorded in the file
            (pass it when the dataset has moved).
        check_files: check that every image and mask exists, reporting all missing files at once.

    Returns:
        the datalist of ``split``, or a dict split name to datalist; paths are absolute strings.

    Raises:
        FileNotFoundError: when the split file does not exist.
        KeyError: when ``split`` is not in the file.
        ValueError: when a lesion is in two splits (the file was edited into a leak).
        DatasetValidationError: listing every missing file, when ``check_files``.

    Example:
        >>> training = load_split("splits.json", "training")  # doctest: +SKIP
    """
    path = Path(split_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found")
    document = json.loads(path.read_text(encoding="utf-8"))
    names = list(document.get("fractions", {}))
    if split is not None and split not in names:
        raise KeyError(f"{path}: no split {split!r}; the file holds {names}")
    base = Path(dataset_dir) if dataset_dir is not None else Path(document.get("dataset_dir", path.parent))
    splits = {
        name: [{**e, **{k: str(base / e[k]) for k in ("image", "seg") if k in e}} for e in document[name]]
        for name in names
    }
    check_no_lesion_leak(splits)
    if check_files:
        report = ValidationReport(dataset=f"split file {path}")
        for entries in splits.values() if split is None else [splits[split]]:
            for entry in entries:
                for key in ("image", "seg"):
                    if key in entry and not os.path.isfile(entry[key]):
                        report.add(entry[key], f"file listed in {path.name} not found", entry.get("image_id"))
        report.raise_if_problems()
    return splits if split is None else splits[split]


def prepare_splits(
    dataset_dir: str | os.PathLike[str],
    split_file: str | os.PathLike[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    split: str | None = None,
    skip_bad: bool = False,
    deep: bool = False,
) -> Any:
    """Load the split file when it exists, else validate the dataset, split it and write the file.

    Meant for bundle configs, e.g. ``"$ctan_monai.apps.ham10000.splits.prepare_splits(@dataset_dir, @split_file,
    split='training')"``: the first run writes the split, later runs (and the evaluation) read the same one.

    A split that is read is re-checked against the dataset as it is now, cheaply, before anything trains on it: the
    metadata CSV is read again (the diagnoses of the split's images are taken from it: a ``dx`` corrected after the
    split is used, with a warning naming the image; an image no longer listed or moved to another lesion is a
    problem), every file must exist, and the files whose size or modification time differ from those recorded
    with the split are decoded again (a truncated image is a problem, not a traceback in the first iteration).
    When something was re-checked or corrected and all is well, the split file is rewritten with the current
    diagnoses, class counts and file times (its lesion assignment never changes).

    Args:
        dataset_dir: the dataset folder.
        split_file: where the split is (or will be) written.
        fractions: split fractions (see :func:`split_by_lesion`).
        seed: split seed.
        split: one split name to return its datalist; None returns all splits.
        skip_bad: drop cases with problems instead of raising (see :func:`build_datalist`).
        deep: fully decode every image during validation.

    Returns:
        the datalist of ``split``, or a dict split name to datalist.

    Raises:
        ValueError: when an existing split file was made with another seed or other fractions (it is never
            overwritten silently: delete it or choose another path).
        DatasetValidationError: when the dataset has problems (see :func:`build_datalist`), or, for an existing
            split, when its images are no longer listed in the CSV, changed lesion, are missing, truncated or
            corrupt (with ``skip_bad`` those images are left out and logged instead, unless a problem belongs to no
            image).

    Example:
        >>> val = prepare_splits("/data/HAM10000", "runs/splits.json", split="validation")  # doctest: +SKIP
    """
    names = SPLIT_NAMES[: len(fractions)]
    path = Path(split_file)
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        wanted = dict(zip(names, (float(f) for f in fractions)))
        if recorded.get("seed") != seed or recorded.get("fractions") != wanted:
            raise ValueError(
                f"{path}: existing split was made with seed={recorded.get('seed')}, fractions="
                f"{recorded.get('fractions')}, not seed={seed}, fractions={wanted}; delete it or use another path"
            )
        root = find_dataset_dir(dataset_dir)
        splits = load_split(path, dataset_dir=root, check_files=False)
        splits = _recheck_split(path, recorded, splits, root, deep, skip_bad)
        return splits if split is None else splits[split]
    datalist = build_datalist(dataset_dir, deep=deep, skip_bad=skip_bad)
    splits = split_by_lesion(
        datalist, [float(f) for f in fractions], seed, split_file=path, dataset_dir=find_dataset_dir(dataset_dir)
    )
    logger.info("HAM10000 split written to %s:\n%s", path, class_count_table(splits))
    return splits if split is None else splits[split]


def _recheck_split(
    path: Path,
    document: Mapping[str, Any],
    splits: dict[str, list[dict[str, Any]]],
    dataset_dir: Path,
    deep: bool,
    skip_bad: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Re-check a split read from ``path`` against the dataset as it is now (see :func:`prepare_splits`)."""
    report = ValidationReport(dataset=f"HAM10000 at {dataset_dir}, split {path}")
    metadata_path = dataset_dir / METADATA_FILE
    scan = ValidationReport(dataset=report.dataset)
    current = {e["image_id"]: e for e in _scan_cases(dataset_dir, scan, METADATA_FILE, None, MASK_DIR)}
    in_split = {e["image_id"] for entries in splits.values() for e in entries}
    # problems of the CSV that concern the split's images or the whole dataset; other rows are not trained on
    report.problems.extend(p for p in scan.problems if p.case is None or p.case in in_split)
    recorded_stats = document.get("file_stats") or {}
    base = Path(document.get("dataset_dir") or dataset_dir)
    stale: list[Mapping[str, Any]] = []
    relabelled: list[str] = []
    for entries in splits.values():
        for entry in entries:
            image_id = entry["image_id"]
            now = current.get(image_id)
            if now is None:
                report.add(
                    str(metadata_path),
                    f"image in the split file but no longer listed in {METADATA_FILE}; delete {path} to split again",
                    image_id,
                )
                continue
            if now["lesion_id"] != entry["lesion_id"]:
                report.add(
                    str(metadata_path),
                    f"lesion_id is {now['lesion_id']!r} in {METADATA_FILE} but {entry['lesion_id']!r} in the split "
                    f"file: the split's lesion grouping no longer holds; delete {path} to split again",
                    image_id,
                )
            if now["dx"] >= 0 and now["dx"] != int(entry["dx"]):
                relabelled.append(
                    f"{image_id}: dx {HAM10000_CLASSES[int(entry['dx'])]} in the split file, "
                    f"{HAM10000_CLASSES[now['dx']]} in {METADATA_FILE} (used)"
                )
                entry["dx"] = now["dx"]
            changed = False
            for key in ("image", "seg"):
                if not os.path.isfile(entry[key]):
                    report.add(entry[key], f"file listed in {path.name} not found", image_id)
                    continue
                recorded = recorded_stats.get(_relative_to(entry[key], dataset_dir)) or recorded_stats.get(
                    _relative_to(entry[key], base)
                )
                changed |= recorded is None or list(recorded) != _file_stat(entry[key])
            if changed:
                stale.append({"image": Path(entry["image"]), "seg": Path(entry["seg"]), "image_id": image_id})
    if stale:
        workers = min(8, os.cpu_count() or 1)
        whole: list[str] = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for entry, (problems, masks) in zip(stale, pool.map(functools.partial(_check_files, deep=deep), stale)):
                for file, message in problems:
                    report.add(file, f"{message} (changed since the split was made)", entry["image_id"])
                whole += masks
        _warn_whole_image_masks(str(path), whole)
    if relabelled:
        logger.warning(
            "%s: %d image(s) have another diagnosis in the metadata CSV than in the split file; the CSV's is used:\n%s",
            path,
            len(relabelled),
            "\n".join(f"  - {line}" for line in relabelled),
        )
    unused = [image_id for image_id in current if image_id not in in_split]
    if unused:
        logger.warning(
            "%s: %d image(s) of %s are not in the split (added after it was made, or left out as bad), e.g. %s; they "
            "are not used: delete the split file to split again with them",
            path,
            len(unused),
            METADATA_FILE,
            unused[:5],
        )
    bad = _cases_to_skip(report, skip_bad, "image(s) of the split")
    if bad:
        return {name: [e for e in entries if e["image_id"] not in bad] for name, entries in splits.items()}
    if stale or relabelled:
        fractions = {name: float(f) for name, f in document["fractions"].items()}
        _write_split(path, splits, fractions, int(document["seed"]), dataset_dir)
    return splits


def _relative_to(path: str, base: Path) -> str:
    """``path`` relative to ``base`` as :func:`_write_split` writes it (absolute when outside ``base``)."""
    path, root = os.path.abspath(path), os.path.abspath(base)
    return os.path.relpath(path, root) if os.path.commonpath([root, path]) == root else path
