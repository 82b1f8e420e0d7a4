"""Find DICOM-RT cases in a folder tree by their tags (never by file names or order)."""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

__all__ = ["DicomFile", "DicomSeries", "DicomRTStudy", "scan_dicom_files", "find_studies"]

# Only these tags are needed to group files; reading stops before the pixel data so a scan stays fast.
_HEADER_TAGS = [
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "FrameOfReferenceUID",
    "StudyDate",
]


@dataclass(frozen=True)
class DicomFile:
    """The grouping tags of one DICOM file.

    Args:
        path: the file.
        patient_id: PatientID (0010,0020); "" when absent.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        sop_uid: SOPInstanceUID.
        modality: Modality (CT, RTSTRUCT, RTDOSE, RTPLAN, ...).
        frame_of_reference: FrameOfReferenceUID ("" when absent, as in most RTSTRUCTs).
        study_date: StudyDate ("" when absent).
    """

    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    frame_of_reference: str = ""
    study_date: str = ""


@dataclass
class DicomSeries:
    """The files of one series (one SeriesInstanceUID), in no particular order.

    Args:
        series_uid: SeriesInstanceUID.
        modality: the series' modality.
        files: its files.
    """

    series_uid: str
    modality: str
    files: list[DicomFile] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """The file paths of the series."""
        return [f.path for f in self.files]


@dataclass
class DicomRTStudy:
    """One study of one patient: the unit that converts to one NIfTI set.

    Args:
        case_id: a file-name-safe id (the PatientID; suffixed when a patient has several studies).
        patient_id: PatientID.
        study_uid: StudyInstanceUID.
        series: its series, by SeriesInstanceUID.
    """

    case_id: str
    patient_id: str
    study_uid: str
    series: dict[str, DicomSeries] = field(default_factory=dict)

    def of_modality(self, modality: str) -> list[DicomSeries]:
        """The series of one modality (e.g. ``"CT"``), ordered by SeriesInstanceUID for determinism."""
        return sorted((s for s in self.series.values() if s.modality == modality), key=lambda s: s.series_uid)


def _read_header(path: Path) -> DicomFile | None:
    """The grouping tags of ``path``, or None when it is not a DICOM file (README, DICOMDIR, ...)."""
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except InvalidDicomError:
            # Older exports omit the preamble; a forced read of a non-DICOM file lacks the UIDs checked below.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds or "Modality" not in ds:
        return None  # DICOMDIR and other non-instance files
    return DicomFile(
        path=path,
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.SOPInstanceUID),
        modality=str(ds.Modality).upper(),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
    )


def scan_dicom_files(root: str | os.PathLike[str]) -> list[DicomFile]:
    """Read the grouping tags of every DICOM file under ``root`` (recursively); other files are ignored.

    Args:
        root: a folder.

    Returns:
        one record per DICOM instance, sorted by path; a SOPInstanceUID seen twice (a copied file) is kept once.

    Raises:
        FileNotFoundError: when ``root`` is not a folder.

    Example:
        >>> import tempfile
        >>> scan_dicom_files(tempfile.mkdtemp())
        []
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    found: dict[str, DicomFile] = {}
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            record = _read_header(Path(dirpath) / name)
            if record is not None:
                found.setdefault(record.sop_uid, record)
    return sorted(found.values(), key=lambda f: str(f.path))


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "anonymous"


def find_studies(root: str | os.PathLike[str]) -> list[DicomRTStudy]:
    """Group the DICOM files under ``root`` into studies (PatientID + StudyInstanceUID) and series.

    Files may sit in any folder layout and order; a patient may arrive as several series (CT, RTSTRUCT, RTDOSE,
    RTPLAN) in separate folders.

    Args:
        root: a folder.

    Returns:
        the studies, ordered by case id. ``case_id`` is the PatientID made file-name safe, with ``_study<k>`` appended
        when a patient has several studies (k by StudyDate, then StudyInstanceUID).

    Example:
        >>> import tempfile
        >>> find_studies(tempfile.mkdtemp())
        []
    """
    grouped: dict[tuple[str, str], list[DicomFile]] = defaultdict(list)
    for record in scan_dicom_files(root):
        grouped[(record.patient_id, record.study_uid)].append(record)
    by_patient: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for patient_id, study_uid in grouped:
        by_patient[patient_id].append((patient_id, study_uid))
    studies: list[DicomRTStudy] = []
    for patient_id, keys in by_patient.items():
        keys.sort(key=lambda k: (min(f.study_date for f in grouped[k]), k[1]))
        for k, key in enumerate(keys):
            case_id = _safe_id(patient_id) + (f"_study{k + 1}" if len(keys) > 1 else "")
            study = DicomRTStudy(case_id=case_id, patient_id=patient_id, study_uid=key[1])
            for record in grouped[key]:
                series = study.series.setdefault(record.series_uid, DicomSeries(record.series_uid, record.modality))
                series.files.append(record)
            studies.append(study)
    return sorted(studies, key=lambda s: s.case_id)
