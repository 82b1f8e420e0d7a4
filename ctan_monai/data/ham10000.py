"""HAM10000 (Tschandl et al., Sci. Data 2018): validation, datalist, lesion-grouped splits, transforms, class balance.

The official layout is a folder holding ``HAM10000_metadata.csv`` (columns ``lesion_id, image_id, dx, dx_type, age,
sex, localization``), the JPEG images in one or more folders named ``HAM10000_images*`` (the publishers ship
``HAM10000_images_part_1`` and ``HAM10000_images_part_2``; mirrors often merge them into ``HAM10000_images``) and the
lesion masks in ``HAM10000_segmentations_lesion_tschandl/<image_id>_segmentation.png``.

Choices made here (ours, documented):

- **The metadata CSV is the list of cases.** Every row must have its image and its mask; a row whose image or mask is
  missing is a reported problem, so that a partial copy is never mistaken for the whole dataset. With
  ``skip_bad=True`` the bad rows are dropped and listed (count and reasons) in the log instead. Image files that
  the CSV does not list are ignored.
- **Masks are read through their palette.** Some of the published masks are palette ("P" mode) PNGs whose palette
  is inverted (index 0 is white): reading their raw indices, as a plain array reader does, swaps lesion and skin.
  Every mask is therefore converted to 8-bit grey by PIL before it is thresholded (and images to RGB).
- **A mask covering the whole image is warned about, not refused.** Two masks of the real subset mark every pixel
  as lesion, and their images show lesions that fill the frame; but an inverted or blank white mask looks the same,
  so every such mask is named in a WARNING when the files are checked.
- **One grid for image and mask.** Images and masks may differ in size (the mirror's images are 200x150, the masks
  600x450); both are resized to ``size`` (image bilinear with anti-aliasing, mask nearest). Their aspect ratios must
  agree (validated). The default ``size`` is 224x224: the input size that ImageNet-pretrained ResNets are trained
  at, divisible by 32 (a 7x7 bottleneck after the five stride-2 stages), and close to the mirror's 200x150, so that
  little is invented by up-sampling. The 4:3 images are squashed to a square; the distortion is the same for every
  image. A ``(height, width)`` such as ``(192, 256)`` keeps the aspect ratio.
- **Splits are by lesion, stratified by diagnosis.** Several images may show one lesion; all of them go to the same
  split. Within each class the lesions are shuffled with ``seed`` and cut by the fractions (largest-remainder
  rounding). Written by hand because scikit-learn's stratified splitters either ignore groups or take no arbitrary
  fractions, and fail on the rare classes of small datasets.
- **Class imbalance** (nv is about two thirds of HAM10000) is handled, when asked, either by a
  ``WeightedRandomSampler`` (:func:`weighted_sampler`) or by class weights in the cross-entropy loss
  (:func:`class_weights`); ``method="none"`` switches either off. The weights are ``1 / n_c`` ("inverse_frequency")
  or ``1 / sqrt(n_c)`` ("inverse_sqrt"), scaled so that their mean over the samples is 1 (the loss keeps its scale).

Example:
    >>> from ctan_monai.data.demo.ham10000 import write_ham10000_demo
    >>> import tempfile
    >>> root = write_ham10000_demo(tempfile.mkdtemp(), n_images=14)
    >>> datalist = build_datalist(root)
    >>> splits = split_by_lesion(datalist, seed=0)
    >>> sample = eval_transforms(224)(datalist[0])
    >>> tuple(sample["image"].shape), tuple(sample["seg"].shape)
    ((3, 224, 224), (1, 224, 224))
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import PILReader
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    Resized,
    ScaleIntensityRanged,
)
from PIL import Image, UnidentifiedImageError
from torch.utils.data import WeightedRandomSampler

from ctan_monai.data.validation import ValidationReport
from ctan_monai.utils.atomic import atomic_write_json

__all__ = [
    "HAM10000_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AddPresenceFlagsd",
    "build_datalist",
    "check_no_lesion_leak",
    "class_count_table",
    "class_counts",
    "class_weights",
    "eval_transforms",
    "find_dataset_dir",
    "inference_transforms",
    "load_split",
    "mask_transforms",
    "prepare_splits",
    "split_by_lesion",
    "train_transforms",
    "validate_dataset",
    "weighted_sampler",
]

logger = logging.getLogger(__name__)

#: Diagnoses in the order of the class indices (alphabetical, as in the ISIC 2018 task 3 ground truth).
HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA_FILE = "HAM10000_metadata.csv"
IMAGE_DIR_PREFIX = "HAM10000_images"
MASK_DIR = "HAM10000_segmentations_lesion_tschandl"
MASK_SUFFIX = "_segmentation.png"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
IMAGE_EXTENSIONS = (".jpg", ".jpeg")
#: ImageNet statistics of RGB in [0, 1], as used to pretrain torchvision's ResNets.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_NAMES = ("training", "validation", "test")
BALANCE_METHODS = ("inverse_frequency", "inverse_sqrt", "none")
# Relative aspect-ratio difference up to which image and mask are taken to cover the same field of view.
_ASPECT_TOLERANCE = 0.02
_JPEG_EOI = b"\xff\xd9"
# What PIL raises for files it cannot open or decode (a decompression bomb is not an OSError).
_PIL_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------------------------
# Layout, metadata and validation
# ----------------------------------------------------------------------------------------------------------------


def find_dataset_dir(root: str | os.PathLike[str], metadata_file: str = METADATA_FILE) -> Path:
    """Find the HAM10000 folder: ``root`` itself or its one sub-folder that holds the metadata CSV.

    Args:
        root: the dataset folder, or a folder that contains it (e.g. an archive's extraction folder).
        metadata_file: name of the metadata CSV.

    Returns:
        the folder that holds ``metadata_file``.

    Raises:
        FileNotFoundError: when neither ``root`` nor exactly one of its sub-folders holds ``metadata_file``.

    Example:
        >>> find_dataset_dir("/data/ham10000-subset")  # doctest: +SKIP
        PosixPath('/data/ham10000-subset/HAM10000')
    """
    root = Path(root)
    if (root / metadata_file).is_file():
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: HAM10000 dataset folder not found")
    found = sorted(p.parent for p in root.glob(f"*/{metadata_file}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{root}: no {metadata_file} in this folder or its sub-folders (not a HAM10000 layout)")
    raise FileNotFoundError(f"{root}: several sub-folders hold {metadata_file} ({[str(p) for p in found]}); pick one")


def _image_dirs(dataset_dir: Path, image_dirs: Sequence[str] | None) -> list[Path]:
    """The image folders: those given, or every sub-folder whose name starts with ``HAM10000_images``."""
    if image_dirs is not None:
        return [dataset_dir / d for d in image_dirs]
    return sorted(p for p in dataset_dir.iterdir() if p.is_dir() and p.name.startswith(IMAGE_DIR_PREFIX))


def _index_images(folders: Sequence[Path], report: ValidationReport) -> dict[str, list[Path]]:
    """Map each image id (file stem) to the JPEG files of that name found in ``folders``."""
    index: dict[str, list[Path]] = defaultdict(list)
    for folder in folders:
        if not folder.is_dir():
            report.add(str(folder), "image folder not found")
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_EXTENSIONS and entry.is_file():
                    index[stem].append(Path(entry.path))
    return index


def _read_metadata(path: Path, report: ValidationReport) -> pd.DataFrame | None:
    """Read the metadata CSV as strings; record a problem and return None when it cannot be used."""
    if not path.is_file():
        report.add(str(path), "metadata CSV not found")
        return None
    try:
        # Ids are strings; keep_default_na=False stops pandas turning an id such as "NA" into a missing value.
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        report.add(str(path), f"metadata CSV cannot be parsed ({err})")
        return None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        report.add(str(path), f"metadata CSV lacks column(s) {missing}; found {list(table.columns)}")
        return None
    for column in REQUIRED_COLUMNS:
        table[column] = table[column].str.strip()
    return table


def _scan_cases(
    dataset_dir: Path,
    report: ValidationReport,
    metadata_file: str,
    image_dirs: Sequence[str] | None,
    mask_dir: str,
) -> list[dict[str, Any]]:
    """Check the metadata rows against each other and the files on disk; return one entry per listed row.

    Problems that need no decoding (missing files, duplicate or empty ids, unknown dx, a lesion with two diagnoses)
    are recorded in ``report``. Entries carry ``image``/``seg`` (None when not found), ``dx`` (-1 when unknown),
    ``image_id``, ``lesion_id`` and ``row`` (line number in the CSV).
    """
    metadata_path = dataset_dir / metadata_file
    table = _read_metadata(metadata_path, report)
    if table is None:
        return []
    folders = _image_dirs(dataset_dir, image_dirs)
    if not folders:
        report.add(str(dataset_dir), f"no image folder ({IMAGE_DIR_PREFIX}*) in the dataset folder")
    index = _index_images(folders, report)
    masks = dataset_dir / mask_dir
    if not masks.is_dir():
        report.add(str(masks), "mask folder not found")

    rows_of_id: dict[str, list[int]] = defaultdict(list)
    dx_of_lesion: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    entries: list[dict[str, Any]] = []
    for i, (image_id, lesion_id, dx) in enumerate(zip(table["image_id"], table["lesion_id"], table["dx"])):
        row = i + 2  # line number in the CSV file, after the header
        case = image_id or f"row {row}"
        if not image_id:
            report.add(str(metadata_path), f"line {row}: empty image_id", case)
            continue
        rows_of_id[image_id].append(row)
        if not lesion_id:
            report.add(str(metadata_path), f"line {row}: empty lesion_id", case)
        if dx not in HAM10000_CLASSES:
            report.add(str(metadata_path), f"line {row}: unknown dx {dx!r} (expected one of {HAM10000_CLASSES})", case)
        elif lesion_id:
            dx_of_lesion[lesion_id][dx].append(image_id)
        found = index.get(image_id, [])
        if not found:
            where = ", ".join(str(f / f"{image_id}.jpg") for f in folders) or str(dataset_dir / IMAGE_DIR_PREFIX)
            report.add(where, "image listed in the metadata CSV but not found", case)
        elif len(found) > 1:
            report.add(str(found[0]), f"image found in several folders: {[str(p) for p in found]}", case)
        mask = masks / f"{image_id}{MASK_SUFFIX}"
        if masks.is_dir() and not mask.is_file():
            report.add(str(mask), "lesion mask not found", case)
        entries.append(
            {
                "image": found[0] if len(found) == 1 else None,
                "seg": mask if mask.is_file() else None,
                "dx": HAM10000_CLASSES.index(dx) if dx in HAM10000_CLASSES else -1,
                "image_id": image_id,
                "lesion_id": lesion_id,
                "row": row,
            }
        )
    for image_id, rows in rows_of_id.items():
        if len(rows) > 1:
            report.add(str(metadata_path), f"duplicate image_id, listed on lines {rows}", image_id)
    for lesion_id, by_dx in dx_of_lesion.items():
        if len(by_dx) > 1:
            detail = "; ".join(f"{dx}: {ids}" for dx, ids in sorted(by_dx.items()))
            for ids in by_dx.values():
                for image_id in ids:
                    report.add(str(metadata_path), f"lesion {lesion_id} has several diagnoses ({detail})", image_id)
    return entries


def _decode_problem(im: Image.Image) -> str | None:
    """Fully decode an opened image; the error text when it is truncated or corrupt, else None."""
    try:
        im.load()
    except _PIL_ERRORS as err:
        return f"truncated or corrupt ({err})"
    return None


def _jpeg_looks_complete(path: Path) -> bool:
    """True when the end-of-image marker is in the file's last KiB (a truncated JPEG lacks it).

    0xFFD9 cannot occur inside entropy-coded data (0xFF bytes are stuffed there), so finding it near the end is
    cheap evidence of a complete file; files without it are fully decoded to decide.
    """
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 1024))
        return _JPEG_EOI in handle.read()


def _check_image(path: Path, deep: bool) -> tuple[list[str], tuple[int, int] | None]:
    """Problems of one image file and its (width, height)."""
    try:
        with Image.open(path) as im:
            size = im.size
            if deep or im.format != "JPEG" or not _jpeg_looks_complete(path):
                problem = _decode_problem(im)
                if problem:
                    return [f"image {problem}"], None
    except _PIL_ERRORS as err:
        return [f"image cannot be read ({err})"], None
    return [], size


def _check_mask(path: Path) -> tuple[list[str], tuple[int, int] | None, bool]:
    """Problems of one mask file (unreadable, truncated, not binary), its (width, height) and whether it marks every
    pixel as lesion."""
    try:
        with Image.open(path) as im:
            size = im.size
            problem = _decode_problem(im)
            if problem:
                return [f"mask {problem}"], None, False
            # Through the palette for "P" masks: their raw indices may be inverted (see the module docstring).
            histogram = (im if im.mode == "L" else im.convert("L")).histogram()
    except _PIL_ERRORS as err:
        return [f"mask cannot be read ({err})"], None, False
    values = {v for v, count in enumerate(histogram) if count}
    if not (values <= {0, 255} or values <= {0, 1}):
        shown = f"{sorted(values)[:8]}{' ...' if len(values) > 8 else ''}"
        return [f"mask is not binary: grey values {shown} (expected 0/255 or 0/1)"], size, False
    return [], size, values in ({255}, {1})


def _check_files(entry: Mapping[str, Any], deep: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """Decode-level problems of one case as (file, message) pairs, and its mask file when that marks the whole image
    as lesion (a warning, not a problem: see :func:`_warn_whole_image_masks`)."""
    problems: list[tuple[str, str]] = []
    whole: list[str] = []
    image_size = mask_size = None
    if entry["image"] is not None:
        messages, image_size = _check_image(entry["image"], deep)
        problems += [(str(entry["image"]), m) for m in messages]
    if entry["seg"] is not None:
        messages, mask_size, covers_all = _check_mask(entry["seg"])
        problems += [(str(entry["seg"]), m) for m in messages]
        if covers_all:
            whole.append(str(entry["seg"]))
    if image_size and mask_size:
        image_aspect, mask_aspect = image_size[0] / image_size[1], mask_size[0] / mask_size[1]
        if abs(mask_aspect - image_aspect) > _ASPECT_TOLERANCE * image_aspect:
            problems.append(
                (
                    str(entry["seg"]),
                    f"mask size {mask_size[0]}x{mask_size[1]} has another aspect ratio than its image "
                    f"({image_size[0]}x{image_size[1]}): they cannot be brought to one grid",
                )
            )
    return problems, whole


def _warn_whole_image_masks(dataset: str, masks: Sequence[str]) -> None:
    """Log one WARNING naming the lesion masks that mark every pixel as lesion.

    Kept, not refused: a lesion may fill the whole frame (two masks of the real HAM10000 subset do), but a mask saved
    inverted or blank white would teach the segmentation that everything is lesion, so the user is told which."""
    if not masks:
        return
    shown = ", ".join(masks[:10]) + (f" and {len(masks) - 10} more" if len(masks) > 10 else "")
    logger.warning(
        "%s: %d lesion mask(s) cover the whole image (every pixel is lesion): %s. They are used as they are: the "
        "lesion may fill the frame, but a mask saved inverted or blank white teaches the segmentation that "
        "everything is lesion; check them against their images (a mask marks the lesion white on black)",
        dataset,
        len(masks),
        shown,
    )


def _validate(
    root: str | os.PathLike[str],
    deep: bool,
    check_files: bool,
    metadata_file: str,
    image_dirs: Sequence[str] | None,
    mask_dir: str,
    num_workers: int | None,
) -> tuple[ValidationReport, list[dict[str, Any]], Path]:
    """Validation shared by :func:`validate_dataset` and :func:`build_datalist`."""
    dataset_dir = find_dataset_dir(root, metadata_file)
    report = ValidationReport(dataset=f"HAM10000 at {dataset_dir}")
    entries = _scan_cases(dataset_dir, report, metadata_file, image_dirs, mask_dir)
    if check_files and entries:
        workers = num_workers or min(8, os.cpu_count() or 1)
        # PIL decodes outside the GIL, so threads overlap the decoding of the files.
        whole: list[str] = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for entry, (problems, masks) in zip(entries, pool.map(functools.partial(_check_files, deep=deep), entries)):
                for file, message in problems:
                    report.add(file, message, entry["image_id"])
                whole += masks
        _warn_whole_image_masks(report.dataset, whole)
    bad = set(report.bad_cases())
    report.valid_cases = [e["image_id"] for e in entries if e["image_id"] not in bad]
    return report, entries, dataset_dir


def validate_dataset(
    root: str | os.PathLike[str],
    deep: bool = False,
    metadata_file: str = METADATA_FILE,
    image_dirs: Sequence[str] | None = None,
    mask_dir: str = MASK_DIR,
    num_workers: int | None = None,
) -> ValidationReport:
    """Check a HAM10000 folder before training and report every problem at once.

    Checked: the metadata CSV (present, parseable, required columns), empty or duplicate ``image_id``, empty
    ``lesion_id``, unknown ``dx``, a lesion listed with two diagnoses, each listed image (found in exactly one image
    folder, readable, not truncated), each mask (present, readable, not truncated, binary 0/255 or 0/1 after the
    palette, same aspect ratio as its image; a mask that marks every pixel as lesion is named in one WARNING, not
    refused: a lesion may fill the frame). Masks are always decoded (the binary check needs their pixels);
    JPEG images are only opened (header) and checked for their end-of-image marker, and fully decoded when the
    marker is missing or ``deep=True``. 5 to 10 s for the 8,024 cases of the real subset on 2 busy CPU cores.

    Args:
        root: the dataset folder (or a folder containing it, see :func:`find_dataset_dir`).
        deep: fully decode every image too (slower; catches corruption inside the entropy-coded data).
        metadata_file: name of the metadata CSV.
        image_dirs: image folder names relative to the dataset folder; default: every ``HAM10000_images*`` folder.
        mask_dir: mask folder name relative to the dataset folder.
        num_workers: threads decoding files; default: the CPU count, at most 8.

    Returns:
        the report; ``valid_cases`` lists the image ids without problems.

    Raises:
        FileNotFoundError: when no metadata CSV is found under ``root``.

    Example:
        >>> report = validate_dataset("/data/HAM10000")  # doctest: +SKIP
        >>> report.raise_if_problems()  # doctest: +SKIP
    """
    report, _, _ = _validate(root, deep, True, metadata_file, image_dirs, mask_dir, num_workers)
    return report


def _cases_to_skip(report: ValidationReport, skip_bad: bool, what: str) -> set[str]:
    """The cases to leave out for a report's problems: raises unless ``skip_bad`` and every problem names a case,
    and logs the skipped ones (``what`` says of what, e.g. ``"of 70 case(s)"``); empty when there is no problem."""
    if report.problems and (not skip_bad or any(p.case is None for p in report.problems)):
        report.raise_if_problems()
    if not report.problems:
        return set()
    bad = set(report.bad_cases())
    logger.warning(
        "%s: skipping %d %s with problems:\n%s",
        report.dataset,
        len(bad),
        what,
        "\n".join(f"  - {p}" for p in report.problems),
    )
    return bad


def build_datalist(
    root: str | os.PathLike[str],
    validate: bool = True,
    deep: bool = False,
    skip_bad: bool = False,
    metadata_file: str = METADATA_FILE,
    image_dirs: Sequence[str] | None = None,
    mask_dir: str = MASK_DIR,
    num_workers: int | None = None,
) -> list[dict[str, Any]]:
    """Build the datalist of a HAM10000 folder, one entry per metadata row, after validating it.

    Args:
        root: the dataset folder (or a folder containing it, see :func:`find_dataset_dir`).
        validate: decode-level checks (see :func:`validate_dataset`); when False only the metadata and the
            presence of the files are checked.
        deep: fully decode every image during validation.
        skip_bad: drop the cases with problems (they are logged, with the count) instead of raising. Problems that
            belong to no case (no metadata CSV, missing folders) always raise.
        metadata_file: name of the metadata CSV.
        image_dirs: image folder names relative to the dataset folder; default: every ``HAM10000_images*`` folder.
        mask_dir: mask folder name relative to the dataset folder.
        num_workers: threads decoding files during validation.

    Returns:
        entries ``{"image": path, "seg": mask path, "dx": class index (order of HAM10000_CLASSES), "image_id",
        "lesion_id"}`` in the order of the metadata CSV, paths as strings.

    Raises:
        DatasetValidationError: listing every problem, when there is any (and ``skip_bad`` is False or a problem
            belongs to no case).
        FileNotFoundError: when no metadata CSV is found under ``root``.

    Example:
        >>> datalist = build_datalist("/data/HAM10000")  # doctest: +SKIP
        >>> datalist[0]["dx"], HAM10000_CLASSES[datalist[0]["dx"]]  # doctest: +SKIP
        (2, 'bkl')
    """
    report, entries, _ = _validate(root, deep, validate, metadata_file, image_dirs, mask_dir, num_workers)
    bad = _cases_to_skip(report, skip_bad, f"of {len(entries)} case(s)")
    if bad:
        entries = [e for e in entries if e["image_id"] not in bad]
    return [
        {
            "image": str(e["image"]),
            "seg": str(e["seg"]),
            "dx": e["dx"],
            "image_id": e["image_id"],
            "lesion_id": e["lesion_id"],
        }
        for e in entries
    ]


# ----------------------------------------------------------------------------------------------------------------
# Splits and class counts
# ----------------------------------------------------------------------------------------------------------------


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
        "description": "HAM10000 split by lesion_id, stratified by dx (ctan_monai.data.ham10000.split_by_lesion)",
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

    Meant for bundle configs, e.g. ``"$ctan_monai.data.ham10000.prepare_splits(@dataset_dir, @split_file,
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


def class_counts(datalist: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Number of entries per diagnosis, every class listed (in the order of ``HAM10000_CLASSES``).

    Args:
        datalist: entries with an integer ``dx``.

    Returns:
        class name to count.

    Example:
        >>> class_counts([{"dx": 5}, {"dx": 5}, {"dx": 4}])["nv"]
        2
    """
    counts = np.bincount([int(e["dx"]) for e in datalist], minlength=len(HAM10000_CLASSES))
    return {name: int(n) for name, n in zip(HAM10000_CLASSES, counts)}


def class_count_table(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """A plain-text table of the images per class and split (count and percentage of the split).

    Args:
        splits: split name to datalist.

    Returns:
        the table, one row per class, plus the totals and the number of lesions.

    Example:
        >>> print(class_count_table({"training": [{"dx": 5, "lesion_id": "a"}]}).splitlines()[6])
        nv               1 (100.0%)
    """
    names = list(splits)
    counts = {name: class_counts(entries) for name, entries in splits.items()}
    lines = ["class   " + "".join(f"{name:>18}" for name in names)]
    for cls in HAM10000_CLASSES:
        cells = []
        for name in names:
            total = max(1, len(splits[name]))
            cells.append(f"{counts[name][cls]:>10} ({100 * counts[name][cls] / total:4.1f}%)")
        lines.append(f"{cls:<8}" + "".join(cells))
    lines.append("images  " + "".join(f"{len(splits[n]):>18}" for n in names))
    lines.append("lesions " + "".join(f"{len({e['lesion_id'] for e in splits[n]}):>18}" for n in names))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Class imbalance
# ----------------------------------------------------------------------------------------------------------------


def class_weights(counts: Mapping[str, int] | Sequence[int], method: str = "inverse_frequency") -> torch.Tensor:
    """Per-class weights against class imbalance, e.g. for ``torch.nn.CrossEntropyLoss(weight=...)``.

    ``inverse_frequency`` gives ``1 / n_c``, ``inverse_sqrt`` ``1 / sqrt(n_c)`` (milder), ``none`` ones. The weights
    are scaled so that ``sum_c n_c w_c = sum_c n_c`` (a sample's mean weight is 1, the loss keeps its scale); a
    class without samples gets 0.

    Args:
        counts: samples per class, as a mapping in class order (e.g. from :func:`class_counts`) or a sequence.
        method: one of ``"inverse_frequency"``, ``"inverse_sqrt"``, ``"none"``.

    Returns:
        float32 tensor of one weight per class.

    Raises:
        ValueError: for an unknown method, a negative count, or no sample at all.

    Example:
        >>> [round(w, 4) for w in class_weights([10, 30]).tolist()]
        [2.0, 0.6667]
    """
    if method not in BALANCE_METHODS:
        raise ValueError(f"unknown class balancing method {method!r}; expected one of {BALANCE_METHODS}")
    n = np.asarray(list(counts.values()) if isinstance(counts, Mapping) else list(counts), dtype=np.float64)
    if (n < 0).any() or n.sum() <= 0:
        raise ValueError(f"class counts must be non-negative with at least one sample, got {n.tolist()}")
    present = n > 0
    raw = np.zeros_like(n)
    power = {"inverse_frequency": 1.0, "inverse_sqrt": 0.5, "none": 0.0}[method]
    raw[present] = n[present] ** -power
    weights = raw * n.sum() / (raw * n).sum()
    return torch.as_tensor(weights, dtype=torch.float32)


def weighted_sampler(
    datalist: Sequence[Mapping[str, Any]],
    method: str = "inverse_frequency",
    num_samples: int | None = None,
    seed: int | None = None,
) -> WeightedRandomSampler | None:
    """A ``WeightedRandomSampler`` that draws the classes more evenly, or None when switched off.

    Each sample is drawn with the weight of its class (:func:`class_weights`), with replacement. Use it as the
    ``sampler`` of the training ``DataLoader`` with ``shuffle=False``; with ``method="none"`` it returns None, so
    the same config can say ``shuffle: "$@sampler is None"``.

    Args:
        datalist: the training entries (integer ``dx``).
        method: one of ``"inverse_frequency"``, ``"inverse_sqrt"``, ``"none"`` (no sampler).
        num_samples: draws per epoch; default ``len(datalist)``.
        seed: seed of the sampler's generator (reproducible draws); None uses torch's global generator.

    Returns:
        the sampler, or None for ``method="none"``.

    Raises:
        ValueError: for an unknown method or an empty datalist.

    Example:
        >>> sampler = weighted_sampler([{"dx": 5}] * 9 + [{"dx": 4}], seed=0)
        >>> len(list(sampler))
        10
    """
    if method not in BALANCE_METHODS:
        raise ValueError(f"unknown class balancing method {method!r}; expected one of {BALANCE_METHODS}")
    if method == "none":
        return None
    if not datalist:
        raise ValueError("cannot build a weighted sampler for an empty datalist")
    per_class = class_weights(class_counts(datalist), method)
    weights = per_class[torch.as_tensor([int(e["dx"]) for e in datalist])]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return WeightedRandomSampler(weights.double(), num_samples or len(datalist), replacement=True, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


class AddPresenceFlagsd(MapTransform):
    """Add the float flag ``<key>_present`` for each key: 1 when the sample has that label, 0 when it has not.

    A flag the datalist already holds is kept (a datalist can mark a label as missing even when a placeholder
    value is there).

    Args:
        keys: task names (e.g. ``("seg", "dx")``).
        allow_missing_keys: kept for the ``MapTransform`` interface; a missing key always gives a 0 flag.

    Example:
        >>> AddPresenceFlagsd(["seg", "dx"])({"dx": 3})
        {'dx': 3, 'seg_present': tensor(0.), 'dx_present': tensor(1.)}
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with the flags added.

        Args:
            data: a sample.

        Returns:
            the sample with one ``<key>_present`` float tensor per key.
        """
        d = dict(data)
        for key in self.keys:
            flag = f"{key}_present"
            d[flag] = torch.as_tensor(d.get(flag, 1.0 if key in d else 0.0), dtype=torch.float32)
        return d


def _spatial_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be an int or (height, width) of positive ints, got {size}")
    return size  # type: ignore[return-value]


def _load_and_resize(size: tuple[int, int]) -> list[Any]:
    """Read image (RGB) and mask (grey through its palette), channel first [C, H, W], to one grid, mask to 0/1."""
    # reverse_indexing=False keeps numpy's (row, column) order, so tensors are [C, H, W] like torchvision's.
    rgb = PILReader(converter=functools.partial(Image.Image.convert, mode="RGB"), reverse_indexing=False)
    grey = PILReader(converter=functools.partial(Image.Image.convert, mode="L"), reverse_indexing=False)
    return [
        LoadImaged("image", reader=rgb, image_only=True),
        LoadImaged("seg", reader=grey, image_only=True),
        EnsureChannelFirstd(["image", "seg"]),
        AsDiscreted("seg", threshold=0.5),  # 0/255 and 0/1 masks both give 0/1
        ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        Resized(
            ["image", "seg"],
            spatial_size=size,
            mode=("bilinear", "nearest"),
            align_corners=(False, None),
            anti_aliasing=(True, False),
        ),
    ]


def _finish() -> list[Any]:
    """ImageNet normalisation, label types and presence flags."""
    return [
        NormalizeIntensityd("image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True),
        EnsureTyped("image", dtype=torch.float32),
        EnsureTyped("seg", dtype=torch.int64),
        EnsureTyped("dx", dtype=torch.int64, track_meta=False, allow_missing_keys=True),
        AddPresenceFlagsd(["seg", "dx"]),
    ]


def eval_transforms(size: int | Sequence[int] = DEFAULT_SIZE) -> Compose:
    """Deterministic transforms for validation, testing and inference.

    Output: ``image`` float32 [3, H, W] normalised with the ImageNet mean/std, ``seg`` int64 0/1 [1, H, W],
    ``dx`` int64 scalar (when in the input), ``seg_present`` and ``dx_present`` float 1.

    Args:
        size: output size, an int for a square or ``(height, width)``; default 224 (see the module docstring).

    Returns:
        the MONAI ``Compose``.

    Raises:
        ValueError: for a malformed size.

    Example:
        >>> t = eval_transforms(224)  # then t({"image": "x.jpg", "seg": "x_segmentation.png", "dx": 5})
    """
    return Compose([*_load_and_resize(_spatial_size(size)), *_finish()])


def mask_transforms(size: int | Sequence[int] = DEFAULT_SIZE) -> Compose:
    """Mask-only transforms giving the ``seg`` of :func:`eval_transforms`, without decoding the image: the mask read
    as 8-bit grey through its palette, thresholded to 0/1 and resized to ``size`` with nearest interpolation (the
    same steps, in the same order). Used to build the mean training mask of the segmentation floor.

    Args:
        size: output size, an int for a square or ``(height, width)``; default 224.

    Returns:
        the MONAI ``Compose`` mapping ``{"seg": path, ...}`` to the same dict with ``seg`` int64 0/1 [1, H, W].

    Raises:
        ValueError: for a malformed size.

    Example:
        >>> t = mask_transforms(224)  # then t({"seg": "ISIC_0024306_segmentation.png"})["seg"].shape == (1, 224, 224)
    """
    grey = PILReader(converter=functools.partial(Image.Image.convert, mode="L"), reverse_indexing=False)
    return Compose(
        [
            LoadImaged("seg", reader=grey, image_only=True),
            EnsureChannelFirstd("seg"),
            AsDiscreted("seg", threshold=0.5),
            Resized("seg", spatial_size=_spatial_size(size), mode="nearest", anti_aliasing=False),
            EnsureTyped("seg", dtype=torch.int64),
        ]
    )


def inference_transforms(size: int | Sequence[int] = DEFAULT_SIZE) -> Compose:
    """Image-only transforms for inference (no mask, no diagnosis): as :func:`eval_transforms` for the image.

    Args:
        size: output size, an int for a square or ``(height, width)``; default 224.

    Returns:
        the MONAI ``Compose`` mapping ``{"image": path}`` to ``{"image": float32 [3, H, W]}``.

    Raises:
        ValueError: for a malformed size.

    Example:
        >>> t = inference_transforms(224)  # then t({"image": "ISIC_0024306.jpg"})
    """
    rgb = PILReader(converter=functools.partial(Image.Image.convert, mode="RGB"), reverse_indexing=False)
    return Compose(
        [
            LoadImaged("image", reader=rgb, image_only=True),
            EnsureChannelFirstd("image"),
            ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
            Resized(
                "image", spatial_size=_spatial_size(size), mode="bilinear", align_corners=False, anti_aliasing=True
            ),
            NormalizeIntensityd("image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )


def train_transforms(
    size: int | Sequence[int] = DEFAULT_SIZE,
    flip_prob: float = 0.5,
    affine_prob: float = 0.5,
    rotate_degrees: float = 20.0,
    scale_range: float = 0.1,
    color_prob: float = 0.5,
    brightness: float = 0.1,
    color_balance: float = 0.05,
    contrast_gamma: tuple[float, float] = (0.8, 1.25),
) -> Compose:
    """Training transforms: those of :func:`eval_transforms` plus augmentation.

    Spatial (applied with the same draw to image and mask; the mask with nearest interpolation): flips along both
    axes and, for a square size, rotations by multiples of 90 degrees (a dermatoscopic image has no canonical
    orientation); a random affine with a small rotation and scaling. Colour (image only, on [0, 1] before the
    normalisation, mild because colour is diagnostic): brightness (one gain), colour balance (one gain per channel,
    like a change of illuminant), contrast (gamma); the result is clipped to [0, 1].

    Args:
        size: output size, an int for a square or ``(height, width)``; default 224.
        flip_prob: probability of each flip (and of the 90-degree rotation).
        affine_prob: probability of the random affine.
        rotate_degrees: the affine's rotation is drawn from +-``rotate_degrees``.
        scale_range: the affine's scaling is drawn from 1 +- ``scale_range``.
        color_prob: probability of each colour transform; 0 switches colour augmentation off.
        brightness: brightness gain drawn from 1 +- ``brightness``.
        color_balance: per-channel gain drawn from 1 +- ``color_balance``.
        contrast_gamma: range of the contrast gamma.

    Returns:
        the MONAI ``Compose`` (seed it with ``set_random_state`` for reproducible draws).

    Raises:
        ValueError: for a malformed size.

    Example:
        >>> t = train_transforms(224).set_random_state(seed=0)
    """
    spatial_size = _spatial_size(size)
    keys = ["image", "seg"]
    augment: list[Any] = [
        RandFlipd(keys, prob=flip_prob, spatial_axis=0),
        RandFlipd(keys, prob=flip_prob, spatial_axis=1),
    ]
    if spatial_size[0] == spatial_size[1]:  # a 90-degree turn of a non-square grid would change its shape
        augment.append(RandRotate90d(keys, prob=flip_prob, max_k=3))
    augment += [
        RandAffined(
            keys,
            prob=affine_prob,
            rotate_range=math.radians(rotate_degrees),
            scale_range=(scale_range, scale_range),
            mode=("bilinear", "nearest"),
            padding_mode="reflection",  # skin continues past the border better than black corners
        ),
        RandScaleIntensityd("image", factors=brightness, prob=color_prob),
        RandScaleIntensityd("image", factors=color_balance, prob=color_prob, channel_wise=True),
        RandAdjustContrastd("image", prob=color_prob, gamma=contrast_gamma),
        ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ]
    return Compose([*_load_and_resize(spatial_size), *augment, *_finish()])
