"""Find DICOM-RT cases in a folder tree by their tags (never by file names or order).

Files are grouped into studies (PatientID + StudyInstanceUID). An RTSTRUCT or RTDOSE stored in a study of its own
(without a CT series) is paired with the CT series of the same patient that it refers to in another study: the
series its RTSTRUCT names or whose images its contours refer to, else the only CT series in its frame of reference
(see :func:`pick_ct_for_rtstruct`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from ctan_monai.data.dicom_rt.rtstruct import RTStruct, read_rtstruct
from ctan_monai.data.validation import DataProblem

__all__ = [
    "DicomFile",
    "DicomSeries",
    "DicomRTStudy",
    "scan_dicom_files",
    "find_studies",
    "describe_series",
    "pick_ct_for_rtstruct",
    "rtstruct_references",
]

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

    @property
    def frame_of_reference(self) -> str:
        """The FrameOfReferenceUID of its files ("" when none has one; the first when they differ)."""
        frames = sorted({f.frame_of_reference for f in self.files if f.frame_of_reference})
        return frames[0] if frames else ""


@dataclass
class DicomRTStudy:
    """One study of one patient: the unit that converts to one NIfTI set.

    Args:
        case_id: a file-name-safe id (the PatientID; suffixed when a patient has several studies).
        patient_id: PatientID.
        study_uid: StudyInstanceUID.
        series: its series, by SeriesInstanceUID.
        unreadable: unreadable DICOM files in the folders of this study's files (and of no other study's).
        notes: how RTSTRUCT / RTDOSE series stored in another study of the patient were paired with this study's CT,
            or why a series of this study could not be paired with a CT series of another study.
    """

    case_id: str
    patient_id: str
    study_uid: str
    series: dict[str, DicomSeries] = field(default_factory=dict)
    unreadable: list[DataProblem] = field(default_factory=list)
    notes: list[DataProblem] = field(default_factory=list)

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


def describe_series(series: DicomSeries) -> str:
    """A series in words for messages: modality, SeriesInstanceUID, file count and folder.

    Args:
        series: the series.

    Returns:
        e.g. ``"CT series 1.2.3 (120 files in /data/p1/ct)"``.

    Example:
        >>> describe_series(DicomSeries("1.2.3", "CT", [DicomFile(Path("/d/a.dcm"), "p", "s", "1.2.3", "4", "CT")]))
        'CT series 1.2.3 (1 file(s) in /d)'
    """
    folders = sorted({str(f.path.parent) for f in series.files})
    where = folders[0] + (f" and {len(folders) - 1} other folder(s)" if len(folders) > 1 else "") if folders else "-"
    return f"{series.modality} series {series.series_uid} ({len(series.files)} file(s) in {where})"


def rtstruct_references(struct: RTStruct, series: DicomSeries) -> tuple[int, bool, bool]:
    """How a structure set refers to an image series.

    Args:
        struct: the structure set.
        series: the image series.

    Returns:
        ``(hits, names, same_frame)``: how many images of the series its contours refer to (ContourImageSequence),
        whether its RTReferencedSeriesSequence names the series or lists images of it, and whether it is in the
        series' frame of reference.

    Example:
        >>> rtstruct_references(RTStruct("rs.dcm", {}, {"1.9"}, {"1.2"}), DicomSeries("1.2", "CT"))
        (0, True, False)
    """
    sops = {f.sop_uid for f in series.files}
    listed = set().union(*struct.series_images.values()) if struct.series_images else set()
    names = series.series_uid in struct.referenced_series or bool(listed & sops)
    return len(struct.contour_images & sops), names, series.frame_of_reference in struct.frames_of_reference


def pick_ct_for_rtstruct(struct: RTStruct, cts: list[DicomSeries]) -> tuple[DicomSeries | None, str]:
    """The CT series a structure set was drawn on, chosen among ``cts`` by what the structure set refers to.

    Evidence, strongest first: the CT images its contours refer to (each contour's ContourImageSequence,
    ReferencedSOPInstanceUID), then the series its RTReferencedSeriesSequence names (or whose images it lists); the
    series with the most such references wins. Without any, the only CT series in its frame of reference is chosen.

    Args:
        struct: the structure set.
        cts: the candidate CT series.

    Returns:
        ``(series, reason)``: the series (None when none or several qualify equally) and why, naming the series.

    Example:
        >>> pick_ct_for_rtstruct(RTStruct("rs.dcm", {}, set(), set()), [])
        (None, 'there is no CT series to pair it with')
    """
    if not cts:
        return None, "there is no CT series to pair it with"
    evidence = {id(ct): rtstruct_references(struct, ct) for ct in cts}
    referred = [ct for ct in cts if evidence[id(ct)][0] or evidence[id(ct)][1]]
    if referred:
        best = max(evidence[id(ct)][:2] for ct in referred)
        top = [ct for ct in referred if evidence[id(ct)][:2] == best]
        if len(top) == 1:
            hits = best[0]
            return top[0], f"its contours refer to {hits} image(s) of it" if hits else "it names that series"
        return None, f"it refers equally to {', '.join(describe_series(ct) for ct in top)}"
    same_frame = [ct for ct in cts if evidence[id(ct)][2]]
    if len(same_frame) == 1:
        return same_frame[0], (
            f"it refers to no image of any CT series, and that is the only CT series in its frame of reference "
            f"{same_frame[0].frame_of_reference}"
        )
    referred_to = ", ".join(f"series {uid}" for uid in sorted(struct.referenced_series)) or "no series"
    frames = ", ".join(sorted(struct.frames_of_reference)) or "none"
    candidates = ", ".join(describe_series(ct) for ct in (same_frame or cts))
    return None, (
        f"it refers to no image of {'these' if len(cts) > 1 else 'this'} CT series ({candidates}), names {referred_to}"
        f", and its frames of reference ({frames}) "
        + (f"are shared by {len(same_frame)} of them" if same_frame else "are not theirs")
    )


def _pair_across_studies(studies: list[DicomRTStudy]) -> list[DicomRTStudy]:
    """Move RTSTRUCT / RTDOSE series of one patient's studies without CT into the study of the CT they belong to.

    A study whose CT series already has an RTSTRUCT (or RTDOSE) of its own receives no second one (conservative:
    the structure set in the CT's own study is kept); the series stays and a note says why. A study left without
    CT, RTSTRUCT and RTDOSE is merged into the study its series went to.

    Args:
        studies: the studies of one patient.

    Returns:
        the studies that remain, with ``notes`` on each pairing and on each series that could not be paired.
    """
    with_ct = [study for study in studies if study.of_modality("CT")]
    if not with_ct or len(studies) < 2:
        return studies
    cts = [ct for study in with_ct for ct in study.of_modality("CT")]
    owner = {ct.series_uid: study for study in with_ct for ct in study.of_modality("CT")}
    remaining = list(studies)
    for orphan in [study for study in studies if not study.of_modality("CT")]:
        moves: list[tuple[DicomSeries, DicomRTStudy]] = []
        struct_targets: set[int] = set()
        for series in orphan.of_modality("RTSTRUCT"):
            first = sorted(series.files, key=lambda f: str(f.path))[0]
            try:
                struct = read_rtstruct(first.path)
            except (ValueError, OSError):
                continue  # the conversion reports the unreadable file
            ct, reason = pick_ct_for_rtstruct(struct, cts)
            where = f"this study (StudyInstanceUID {orphan.study_uid}) has no CT series"
            if ct is None:
                orphan.notes.append(
                    DataProblem(
                        str(first.path),
                        f"{where}, and the patient's CT series in other studies do not decide which one this RTSTRUCT "
                        f"was drawn on: {reason}",
                    )
                )
                continue
            target = owner[ct.series_uid]
            if target.of_modality("RTSTRUCT"):
                orphan.notes.append(
                    DataProblem(
                        str(first.path),
                        f"{where}; this RTSTRUCT belongs to {describe_series(ct)} of study {target.study_uid} "
                        f"({reason}), but that study has an RTSTRUCT of its own, which is used there",
                    )
                )
                continue
            moves.append((series, target))
            struct_targets.add(id(target))
            target.notes.append(
                DataProblem(
                    str(first.path),
                    f"RTSTRUCT stored in study {orphan.study_uid}, paired with {describe_series(ct)} of study "
                    f"{target.study_uid}: {reason}",
                )
            )
        for series in orphan.of_modality("RTDOSE"):
            first = sorted(series.files, key=lambda f: str(f.path))[0]
            frame = series.frame_of_reference
            targets = [owner[ct.series_uid] for ct in cts if frame and ct.frame_of_reference == frame]
            unique = list({id(t): t for t in targets}.values())
            followed = [t for t in unique if id(t) in struct_targets]
            target = followed[0] if followed else (unique[0] if len(unique) == 1 else None)
            where = f"this study (StudyInstanceUID {orphan.study_uid}) has no CT series"
            if target is None:
                listed = ", ".join(f"study {t.study_uid}" for t in unique) or "none of the patient's CT series"
                orphan.notes.append(
                    DataProblem(
                        str(first.path),
                        f"{where}, and this RTDOSE's frame of reference {frame or '(absent)'} is that of {listed}: "
                        "cannot tell which CT it belongs to",
                    )
                )
                continue
            if target.of_modality("RTDOSE"):
                orphan.notes.append(
                    DataProblem(
                        str(first.path),
                        f"{where}; this RTDOSE is in the frame of reference of study {target.study_uid}, which has "
                        "an RTDOSE of its own, used there",
                    )
                )
                continue
            moves.append((series, target))
            target.notes.append(
                DataProblem(
                    str(first.path),
                    f"RTDOSE stored in study {orphan.study_uid}, paired with the CT of study {target.study_uid} "
                    f"(same frame of reference {frame})",
                )
            )
        for series, target in moves:
            target.series[series.series_uid] = orphan.series.pop(series.series_uid)
        if moves and not any(orphan.of_modality(m) for m in ("CT", "RTSTRUCT", "RTDOSE")):
            target = moves[0][1]
            target.series.update(orphan.series)  # what is left (RTPLAN, ...) goes along
            target.notes.extend(orphan.notes)
            remaining.remove(orphan)
    return remaining


def find_studies(root: str | os.PathLike[str], unreadable: list[DataProblem] | None = None) -> list[DicomRTStudy]:
    """Group the DICOM files under ``root`` into studies (PatientID + StudyInstanceUID) and series.

    Files may sit in any folder layout and order; a patient may arrive as several series (CT, RTSTRUCT, RTDOSE,
    RTPLAN) in separate folders. An RTSTRUCT or RTDOSE stored in a study without CT is moved into the patient's study
    whose CT it refers to (see the module docstring; ``notes`` of the study say so). An unreadable DICOM file (see
    :func:`scan_dicom_files`) in a folder that holds the files of one study only is listed in that study's
    ``unreadable`` (it is probably one of its files); every unreadable file is also appended to ``unreadable``.

    Args:
        root: a folder.
        unreadable: a list that receives one problem (file and reason) per unreadable DICOM file.

    Returns:
        the studies, ordered by case id. ``case_id`` is the PatientID made file-name safe, with ``_study<k>`` appended
        when a patient has several studies (k by StudyDate, then StudyInstanceUID), counted after the pairing.

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
        own: list[DicomRTStudy] = []
        for key in keys:
            study = DicomRTStudy(case_id="", patient_id=patient_id, study_uid=key[1])
            for record in grouped[key]:
                series = study.series.setdefault(record.series_uid, DicomSeries(record.series_uid, record.modality))
                series.files.append(record)
            own.append(study)
        own = _pair_across_studies(own)
        for k, study in enumerate(own):
            study.case_id = _safe_id(patient_id) + (f"_study{k + 1}" if len(own) > 1 else "")
            study.notes = [DataProblem(p.file, p.message, study.case_id) for p in study.notes]
        studies.extend(own)
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
