"""HAM10000 folders: the layout, metadata, up-front checks of images and masks, and the datalist."""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from ctan_monai.data.validation import ValidationReport

logger = logging.getLogger(__name__)

#: Diagnoses in the order of the class indices (alphabetical, as in the ISIC 2018 task 3 ground truth).
HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA_FILE = "HAM10000_metadata.csv"
IMAGE_DIR_PREFIX = "HAM10000_images"
MASK_DIR = "HAM10000_segmentations_lesion_tschandl"
MASK_SUFFIX = "_segmentation.png"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
IMAGE_EXTENSIONS = (".jpg", ".jpeg")
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
