"""OpenKBP folders: finding the patients of a ``provided-data`` folder, up-front validation, datalists."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ctan_monai.apps.openkbp.reader import (
    _MAX_LISTED,
    GRID_SHAPE,
    SPLITS,
    STRUCTURE_NAMES,
    _check_structures,
    _read_patient_checked,
)
from ctan_monai.data.validation import (
    DataProblem,
    ValidationReport,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- datasets and lists
def _patient_number(folder: Path) -> tuple[int, str]:
    match = re.search(r"(\d+)$", folder.name)
    return (int(match.group(1)) if match else -1, folder.name)


def _patients_in(split_dir: Path) -> list[Path]:
    folders = [p for p in split_dir.iterdir() if p.is_dir() and p.name.startswith("pt_")]
    return sorted(folders, key=_patient_number)


#: The files that make a folder an OpenKBP patient's (every patient has them).
_PATIENT_FILES = ("ct.csv", "possible_dose_mask.csv")


def _misnamed_in(split_dir: Path) -> list[Path]:
    """Folders of ``split_dir`` holding a patient's CSV files but not named ``pt_<n>`` (they would be left out)."""
    if not split_dir.is_dir():
        return []
    folders = [
        p
        for p in split_dir.iterdir()
        if p.is_dir() and not p.name.startswith(("pt_", ".")) and any((p / f).is_file() for f in _PATIENT_FILES)
    ]
    return sorted(folders, key=_patient_number)


def misnamed_patient_folders(root: str | os.PathLike[str]) -> list[Path]:
    """Folders that hold an OpenKBP patient's CSV files (``ct.csv`` or ``possible_dose_mask.csv``) where
    :func:`find_patient_folders` looks for patients, but are not named ``pt_<n>``, so that it leaves them out.

    Args:
        root: anything :func:`find_patient_folders` accepts.

    Returns:
        the folders, by trailing number; empty when ``root`` does not exist or is a patient folder itself.

    Example:
        >>> misnamed_patient_folders("provided-data")  # doctest: +SKIP
        [PosixPath('provided-data/train-pats/patient_7')]
    """
    root = Path(root)
    if not root.is_dir():
        return []
    if (root / "provided-data").is_dir():
        root = root / "provided-data"
    if (root / "ct.csv").exists() or root.name.startswith("pt_"):
        return []
    splits = [root / split for split in SPLITS if (root / split).is_dir()]
    return [p for folder in (splits or [root]) for p in _misnamed_in(folder)]


def _misnamed_problem(folder: Path) -> DataProblem:
    """The problem of a folder that :func:`misnamed_patient_folders` found."""
    held = ", ".join(f for f in _PATIENT_FILES if (folder / f).is_file())
    number = max(_patient_number(folder)[0], 1)
    return DataProblem(
        str(folder),
        f"holds OpenKBP patient files ({held}) but is not named pt_<n>, so it is not read as a patient: rename it "
        f"pt_<n> (e.g. pt_{number}; numbers must not repeat within the split) or move it out of the dataset",
        folder.name,
    )


def find_patient_folders(root: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """Find the patient folders under a dataset root, a ``provided-data`` folder, a split folder or a patient folder.

    Args:
        root: a folder holding ``provided-data/``, or split folders (``train-pats/`` ...), or ``pt_*`` folders, or the
            files of one patient.

    Returns:
        ``(split, patient_folder)`` pairs, splits in ``SPLITS`` order and patients by number; ``split`` is the split
        folder's name (or the parent folder's name for a patient folder).

    Raises:
        FileNotFoundError: when ``root`` does not exist or holds no patient (naming the folders that hold patient
            files but are not named ``pt_<n>``, if any).

    Example:
        >>> find_patient_folders("provided-data")[0]  # doctest: +SKIP
        ('train-pats', PosixPath('provided-data/train-pats/pt_1'))
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: OpenKBP folder does not exist")
    if (root / "provided-data").is_dir():
        root = root / "provided-data"
    if (root / "ct.csv").exists() or root.name.startswith("pt_"):
        return [(root.parent.name, root)]
    found = [(split, p) for split in SPLITS if (root / split).is_dir() for p in _patients_in(root / split)]
    if not found:
        found = [(root.name, p) for p in _patients_in(root)]
    if not found:
        misnamed = misnamed_patient_folders(root)
        hint = ""
        if misnamed:
            names = ", ".join(str(p) for p in misnamed[:_MAX_LISTED]) + (
                f" and {len(misnamed) - _MAX_LISTED} more" if len(misnamed) > _MAX_LISTED else ""
            )
            hint = (
                f"; {len(misnamed)} folder(s) hold OpenKBP patient files but are not named pt_<n>: {names}. Rename "
                "them pt_<n> (OpenKBP's names: pt_1, pt_2, ...)"
            )
        raise FileNotFoundError(
            f"{root}: no OpenKBP patient folders (pt_*/) found here or in {', '.join(s + '/' for s in SPLITS)}{hint}"
        )
    return found


def validate_dataset(
    root_or_split_dir: str | os.PathLike[str],
    structures: Iterable[str] | None = None,
    grid_shape: Sequence[int] = GRID_SHAPE,
    require_dose: bool | None = None,
) -> ValidationReport:
    """Check every patient of an OpenKBP dataset and report every problem in one pass.

    Args:
        root_or_split_dir: anything ``find_patient_folders`` accepts.
        structures: the structures to check (default: all).
        grid_shape: the grid the flat indices refer to.
        require_dose: whether ``dose.csv`` is required; default: required except in ``test-pats``.

    Returns:
        the report: ``problems`` (file, case, message; folders holding patient files but not named ``pt_<n>``
        among them) and ``valid_cases`` (patient ids without problems).

    Raises:
        ValueError: when ``structures`` names a structure the format does not define.

    Example:
        >>> report = validate_dataset("provided-data")  # doctest: +SKIP
        >>> report.ok, len(report.valid_cases)  # doctest: +SKIP
        (True, 50)
    """
    names = _check_structures(structures)
    shape = tuple(int(s) for s in grid_shape)
    report = ValidationReport(dataset=f"OpenKBP {root_or_split_dir}")
    try:
        patients = find_patient_folders(root_or_split_dir)
    except FileNotFoundError as err:
        report.add(str(root_or_split_dir), str(err).split(": ", 1)[-1])
        return report
    report.problems.extend(_misnamed_problem(p) for p in misnamed_patient_folders(root_or_split_dir))
    for split, folder in patients:
        needs_dose = split != "test-pats" if require_dose is None else require_dose
        patient, problems = _read_patient_checked(folder, names, shape, needs_dose)
        report.problems.extend(problems)
        if patient is not None and not problems:
            report.valid_cases.append(folder.name)
    return report


def build_datalist(provided_data_dir: str | os.PathLike[str], split: str) -> list[dict[str, Any]]:
    """List the patients of one split with the paths of their files (nothing is parsed).

    Args:
        provided_data_dir: the ``provided-data`` folder (or the folder that holds it).
        split: one of ``SPLITS``.

    Returns:
        one dict per patient, by patient number: ``case_id``, ``split``, ``folder``, ``ct``, ``dose`` (None when
        absent), ``possible_dose_mask``, ``voxel_dimensions`` (paths as strings) and ``structures`` (name -> path,
        only the structures present).

    Raises:
        ValueError: for an unknown split.
        FileNotFoundError: when the split folder does not exist.

    Example:
        >>> build_datalist("provided-data", "validation-pats")[0]["case_id"]  # doctest: +SKIP
        'pt_201'
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    base = Path(provided_data_dir)
    if (base / "provided-data").is_dir():
        base = base / "provided-data"
    split_dir = base / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: OpenKBP split folder does not exist")
    datalist = []
    for folder in _patients_in(split_dir):
        dose = folder / "dose.csv"
        datalist.append(
            {
                "case_id": folder.name,
                "split": split,
                "folder": str(folder),
                "ct": str(folder / "ct.csv"),
                "dose": str(dose) if dose.is_file() else None,
                "possible_dose_mask": str(folder / "possible_dose_mask.csv"),
                "voxel_dimensions": str(folder / "voxel_dimensions.csv"),
                "structures": {
                    name: str(folder / f"{name}.csv") for name in STRUCTURE_NAMES if (folder / f"{name}.csv").is_file()
                },
            }
        )
    return datalist


# ------------------------------------------------------------------------------------------------------- NIfTI cache
