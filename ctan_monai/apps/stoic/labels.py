"""STOIC labels: ``reference.csv`` with missing labels, dataset root discovery and datalists."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctan_monai.data.validation import ValidationReport

__all__ = [
    "LABEL_COLUMNS",
    "build_datalist",
    "case_sort_key",
    "datalist_entry",
    "find_stoic_root",
    "read_reference",
]

# reference.csv column of each task.
LABEL_COLUMNS: dict[str, str] = {"covid": "probCOVID", "severe": "probSevere"}


def find_stoic_root(path: str | os.PathLike[str]) -> Path:
    """The STOIC dataset folder (the one with ``metadata/reference.csv``): ``path`` or its only such sub-folder.

    Args:
        path: the dataset folder, or a folder that contains exactly one STOIC dataset folder (as an extracted archive).

    Returns:
        the dataset folder.

    Raises:
        FileNotFoundError: when no (or more than one) dataset folder is found.

    Example:
        >>> find_stoic_root("/data/stoic2021")  # doctest: +SKIP
        PosixPath('/data/stoic2021')
    """
    root = Path(path)
    if (root / "metadata" / "reference.csv").is_file():
        return root
    found = sorted(p.parent.parent for p in root.glob("*/metadata/reference.csv"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{root}: no STOIC dataset here (expected metadata/reference.csv and data/mha/)")
    raise FileNotFoundError(f"{root}: several STOIC datasets found ({[str(f) for f in found]}); name one")


def _parse_label(text: str) -> float | None:
    """0/1 label from a CSV cell; ``None`` for an empty cell; ``ValueError`` otherwise."""
    text = text.strip()
    if text == "" or text.lower() == "nan":
        return None
    value = float(text)  # raises ValueError on non-numbers
    if value not in (0.0, 1.0):
        raise ValueError(text)
    return value


def read_reference(
    csv_path: str | os.PathLike[str], report: ValidationReport | None = None
) -> dict[str, dict[str, float | None]]:
    """Read a STOIC ``reference.csv``: per patient, ``covid`` and ``severe`` as 0.0/1.0, or ``None`` when unknown.

    Every problem of the file is collected (label not 0/1, severe without COVID-19, repeated PatientID, missing
    column); patients with a problem are left out of the result.

    Args:
        csv_path: the CSV (columns PatientID, probCOVID, probSevere; other columns are ignored).
        report: where to record problems; when ``None`` they are raised together.

    Returns:
        ``{patient_id: {"covid": 1.0 | 0.0 | None, "severe": 1.0 | 0.0 | None}}`` in file order.

    Raises:
        DatasetValidationError: when ``report`` is ``None`` and the file has problems.

    Example:
        >>> labels = read_reference("stoic2021/metadata/reference.csv")  # doctest: +SKIP
        >>> labels["1"]  # doctest: +SKIP
        {'covid': 1.0, 'severe': None}
    """
    own_report = report is None
    report = ValidationReport(str(csv_path)) if report is None else report
    labels: dict[str, dict[str, float | None]] = {}
    path = Path(csv_path)
    if not path.is_file():
        report.add(str(path), "reference file not found")
    else:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("PatientID", *LABEL_COLUMNS.values()) if c not in (reader.fieldnames or [])]
            if missing:
                report.add(str(path), f"missing column(s) {missing}; found {reader.fieldnames}")
            else:
                for line, row in enumerate(reader, start=2):
                    _parse_reference_row(row, f"{path}:{line}", labels, report)
    if own_report:
        report.raise_if_problems()
    return labels


def _parse_reference_row(
    row: Mapping[str, str | None], where: str, labels: dict[str, dict[str, float | None]], report: ValidationReport
) -> None:
    """Parse one row of reference.csv into ``labels``, recording its problems in ``report``."""
    case = (row.get("PatientID") or "").strip()
    if not case:
        report.add(where, "empty PatientID")
        return
    if not re.fullmatch(r"[\w.-]+", case):  # the id names files (data/mha/<id>.mha, the cache)
        report.add(where, f"PatientID {case!r} is not a plain file name", case)
        return
    if case in labels:
        report.add(where, f"PatientID {case} appears more than once", case)
        labels.pop(case)
        return
    values: dict[str, float | None] = {}
    ok = True
    for task, column in LABEL_COLUMNS.items():
        cell = row.get(column) or ""
        try:
            values[task] = _parse_label(cell)
        except ValueError:
            report.add(where, f"{column} must be 0, 1 or empty (unknown), got {cell!r}", case)
            ok = False
    # Severe (intubation or death) is defined on COVID-19 patients: a severe negative case is a data error.
    if ok and values["severe"] == 1.0 and values["covid"] == 0.0:
        report.add(where, "probSevere is 1 but probCOVID is 0 (severe implies COVID-19)", case)
        ok = False
    if ok:
        labels[case] = values


def case_sort_key(case: str) -> tuple[int, int | str]:
    """Sort key of PatientIDs: numeric ids in numeric order first, then the others alphabetically.

    Args:
        case: a PatientID.

    Returns:
        a key for ``sorted``.

    Example:
        >>> sorted(["10", "9", "a"], key=case_sort_key)
        ['9', '10', 'a']
    """
    return (0, int(case)) if case.isdigit() else (1, case)


def datalist_entry(case: str, image: Path, values: Mapping[str, float | None]) -> dict[str, Any]:
    """One datalist item: labels as 0.0/1.0 with presence flags (a missing label becomes 0.0 with presence 0.0).

    Args:
        case: the PatientID.
        image: the volume file.
        values: ``{task: 0.0 | 1.0 | None}`` as ``read_reference`` gives.

    Returns:
        ``{"case_id", "image", "<task>", "<task>_present", ...}``.

    Example:
        >>> datalist_entry("1", Path("1.mha"), {"covid": 1.0, "severe": None})["severe_present"]
        0.0
    """
    entry: dict[str, Any] = {"case_id": case, "image": str(image)}
    for task in LABEL_COLUMNS:
        value = values.get(task)
        entry[task] = 0.0 if value is None else float(value)
        entry[f"{task}_present"] = 0.0 if value is None else 1.0
    return entry


def build_datalist(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The datalist of a STOIC dataset: one dict per patient of ``reference.csv``.

    Only files are listed here (nothing is opened but the CSV); use ``validate_dataset`` to check the volumes.

    Args:
        root: the dataset folder (see ``find_stoic_root``).

    Returns:
        dicts with ``case_id``, ``image`` (mha path), ``covid`` / ``severe`` (0.0 or 1.0; 0.0 when unknown) and
        ``covid_present`` / ``severe_present`` (1.0 when labelled, 0.0 when missing), sorted by PatientID.

    Raises:
        DatasetValidationError: when reference.csv has problems or a listed patient has no image file.

    Example:
        >>> build_datalist("stoic2021")[0]  # doctest: +SKIP
        {'case_id': '1', 'image': '.../data/mha/1.mha', 'covid': 1.0, 'covid_present': 1.0, 'severe': 0.0,
         'severe_present': 0.0}
    """
    root = find_stoic_root(root)
    report = ValidationReport(str(root))
    labels = read_reference(root / "metadata" / "reference.csv", report)
    datalist = []
    for case in sorted(labels, key=case_sort_key):
        image = root / "data" / "mha" / f"{case}.mha"
        if not image.is_file():
            report.add(str(image), "image file not found (listed in reference.csv)", case)
            continue
        datalist.append(datalist_entry(case, image, labels[case]))
    report.raise_if_problems()
    return datalist
