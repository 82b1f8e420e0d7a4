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

from ctan_monai.data.validation import DataProblem

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
_DICM_PREFIX = b"DICM"
_MEDIA_DIRECTORY_UID = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR


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
        unreadable: unreadable DICOM files in the folders of this study's files (and of no other study's).
    """

    case_id: str
    patient_id: str
    study_uid: str
    series: dict[str, DicomSeries] = field(default_factory=dict)
    unreadable: list[DataProblem] = field(default_factory=list)

    def of_modality(self, modality: str) -> list[DicomSeries]:
        """The series of one modality (e.g. ``"CT"``), ordered by SeriesInstanceUID for determinism."""
        return sorted((s for s in self.series.values() if s.modality == modality), key=lambda s: s.series_uid)


def _looks_like_dicom(path: Path) -> bool:
    """Whether a file claims to be DICOM: a ``.dcm`` name or the ``DICM`` prefix after the 128-byte preamble."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as stream:
            stream.seek(128)
            return stream.read(4) == _DICM_PREFIX
    except OSError:
        return False


def _is_dicomdir(ds: pydicom.Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "MediaStorageSOPClassUID", "") if meta is not None else "") == _MEDIA_DIRECTORY_UID


def _read_header(path: Path) -> tuple[DicomFile | None, str | None]:
    """The grouping tags of ``path``; ``(None, None)`` when it is not a DICOM instance (README, DICOMDIR, ...), and
    ``(None, reason)`` when it claims to be DICOM (``.dcm`` name or ``DICM`` prefix) but cannot be read as one."""
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except InvalidDicomError:
            # Older exports omit the preamble; a forced read of a non-DICOM file lacks the UIDs checked below.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
        if not _looks_like_dicom(path):
            return None, None
        return None, f"unreadable DICOM file: {type(err).__name__}: {str(err).strip()[:200]}"
    lacking = [tag for tag in ("SOPInstanceUID", "SeriesInstanceUID", "Modality") if tag not in ds]
    if lacking:
        if _is_dicomdir(ds) or path.name.upper() == "DICOMDIR" or not _looks_like_dicom(path):
            return None, None  # DICOMDIR and other non-instance files
        size = path.stat().st_size
        return None, (
            f"unreadable DICOM file: lacks {', '.join(lacking)} ({size} bytes; truncated or corrupt header?), so it "
            "cannot be assigned to a series"
        )
    return DicomFile(
        path=path,
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.SOPInstanceUID),
        modality=str(ds.Modality).upper(),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
    ), None


def scan_dicom_files(root: str | os.PathLike[str], unreadable: list[DataProblem] | None = None) -> list[DicomFile]:
    """Read the grouping tags of every DICOM file under ``root`` (recursively); other files are ignored.

    A file that claims to be DICOM (a ``.dcm`` name or the ``DICM`` prefix) but whose header cannot be read, or
    lacks the UIDs that place it in a series, is not silently dropped: it is appended to ``unreadable`` (a corrupt
    CT slice would otherwise just be missing from its series).

    Args:
        root: a folder.
        unreadable: a list that receives one problem (file and reason) per unreadable DICOM file.

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
            record, problem = _read_header(Path(dirpath) / name)
            if record is not None:
                found.setdefault(record.sop_uid, record)
            elif problem is not None and unreadable is not None:
                unreadable.append(DataProblem(str(Path(dirpath) / name), problem))
    return sorted(found.values(), key=lambda f: str(f.path))


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "anonymous"


def find_studies(root: str | os.PathLike[str], unreadable: list[DataProblem] | None = None) -> list[DicomRTStudy]:
    """Group the DICOM files under ``root`` into studies (PatientID + StudyInstanceUID) and series.

    Files may sit in any folder layout and order; a patient may arrive as several series (CT, RTSTRUCT, RTDOSE,
    RTPLAN) in separate folders. An unreadable DICOM file (see :func:`scan_dicom_files`) in a folder that holds the
    files of one study only is listed in that study's ``unreadable`` (it is probably one of its files); every
    unreadable file is also appended to ``unreadable``.

    Args:
        root: a folder.
        unreadable: a list that receives one problem (file and reason) per unreadable DICOM file.

    Returns:
        the studies, ordered by case id. ``case_id`` is the PatientID made file-name safe, with ``_study<k>`` appended
        when a patient has several studies (k by StudyDate, then StudyInstanceUID).

    Example:
        >>> import tempfile
        >>> find_studies(tempfile.mkdtemp())
        []
    """
    bad: list[DataProblem] = []
    grouped: dict[tuple[str, str], list[DicomFile]] = defaultdict(list)
    for record in scan_dicom_files(root, bad):
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
    folders: dict[Path, set[str]] = defaultdict(set)
    for study in studies:
        for series in study.series.values():
            for record in series.files:
                folders[record.path.parent].add(study.case_id)
    by_case = {study.case_id: study for study in studies}
    for problem in bad:
        owners = folders.get(Path(problem.file).parent, set())
        if len(owners) == 1:
            owner = by_case[next(iter(owners))]
            owner.unreadable.append(DataProblem(problem.file, problem.message, owner.case_id))
    if unreadable is not None:
        unreadable.extend(bad)
    return sorted(studies, key=lambda s: s.case_id)
