"""Convert DICOM-RT studies (CT + RTSTRUCT + RTDOSE) to one NIfTI set per patient, a manifest and a report.

Output layout (``output_dir``)::

    <case_id>/image.nii.gz      CT in HU (int16, or float32 for non-integral rescaling)
    <case_id>/label.nii.gz      uint8 label map: 0 background, i = i-th organ
    <case_id>/dose.nii.gz       float32 dose in Gy on the CT grid (only with an RTDOSE)
    <case_id>/dose_mask.nii.gz  uint8, 1 where the dose grid is defined and inside the body (only with an RTDOSE)
    manifest.json               {"organs", "label_names", "cases": [entry, ...]}; paths relative to output_dir
    report.json                 {"converted", "failed": [{"case_id", "file", "message"}], "warnings"}

Geometry: DICOM positions are in LPS; SimpleITK keeps them in LPS in memory and writes the NIfTI qform/sform in
RAS (x and y negated), so nibabel and MONAI read the correct RAS affine.
Overlap rule: a voxel inside several organs gets the organ listed first in ``organs``; an organ left without voxels
in the label map (inside organs listed before it) is marked absent in ``label_class_present``, with a warning.
Contours: even-odd rule within one contour plane (holes, islands in holes), never across planes; each CT slice shows
the contour plane nearest to it within half a slice spacing, with warnings counting contours off the slice planes, not
used, or beyond the slices (see :func:`~ctan_monai.data.dicom_rt.rtstruct.rasterise_contours`).
Pairing: an RTSTRUCT / RTDOSE stored in another study of the patient is paired with the CT it refers to (see
:mod:`~ctan_monai.data.dicom_rt.discovery`); with several CT series in a study, the one the RTSTRUCT refers to is used.
Missing slices: uneven slice gaps fail the study (:func:`~ctan_monai.data.dicom_rt.ct_series.read_ct_series`); signs
of slices missing at regular intervals (even gaps) are warnings (gaps of 1.5 or more SliceThicknesses, a
SpacingBetweenSlices that differs, skipped InstanceNumbers, contour planes halfway between the slices); CT images that
the RTSTRUCT refers to but the series lacks fail the study.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813 (the conventional SimpleITK alias)

from ctan_monai.data.dicom_rt.body import body_mask_from_ct
from ctan_monai.data.dicom_rt.ct_series import DicomSeriesError, read_ct_series
from ctan_monai.data.dicom_rt.discovery import (
    DicomFile,
    DicomRTStudy,
    describe_series,
    find_studies,
    pick_ct_for_rtstruct,
    rtstruct_references,
)
from ctan_monai.data.dicom_rt.pixels import DicomDecodeError
from ctan_monai.data.dicom_rt.rtdose import DoseUnitsError, dose_support, read_rtdose, resample_dose
from ctan_monai.data.dicom_rt.rtstruct import RTStruct, rasterise_contours, read_rtstruct
from ctan_monai.data.dicom_rt.synonyms import BODY_SYNONYMS, PROSTATE_ORGANS, build_synonym_table, match_rois
from ctan_monai.data.validation import DataProblem, DatasetValidationError, ValidationReport
from ctan_monai.utils.atomic import atomic_path, atomic_write_json

__all__ = ["CaseConversionError", "ConversionResult", "convert_study", "convert_dicom_rt"]

# Below this fraction of the body covered by the dose grid, the case converts with a warning.
_MIN_DOSE_COVERAGE = 0.95


class CaseConversionError(ValueError):
    """Raised when one study cannot be converted; ``problems`` says why, each naming a file.

    Args:
        problems: what is wrong.
    """

    def __init__(self, problems: Sequence[DataProblem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


@dataclass
class ConversionResult:
    """What :func:`convert_dicom_rt` did.

    Args:
        entries: the manifest entries of the converted cases.
        report: the cases that could not be converted, with every reason.
        warnings: problems that did not stop a conversion (e.g. no RTDOSE, an organ without matching ROI).
        manifest_path: the written manifest (None when nothing was written).
        report_path: the written report.
    """

    entries: list[dict[str, Any]]
    report: ValidationReport
    warnings: list[DataProblem] = field(default_factory=list)
    manifest_path: Path | None = None
    report_path: Path | None = None


def _write_image(image: sitk.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def _as_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _study_folder(study: DicomRTStudy) -> str:
    paths = [f.path for s in study.series.values() for f in s.files]
    return os.path.commonpath([str(p.parent) for p in paths]) if paths else study.case_id


def _modalities(study: DicomRTStudy) -> str:
    """What a study holds, for messages: its series by modality, with their SeriesInstanceUIDs."""
    return "; ".join(describe_series(s) for s in sorted(study.series.values(), key=lambda s: s.modality)) or "nothing"


def _pick_rtstruct(
    study: DicomRTStudy, problems: list[DataProblem], warnings: list[DataProblem]
) -> tuple[RTStruct | None, list[DicomFile]]:
    """Choose the CT series and the RTSTRUCT of a study; record why when that is impossible.

    With several CT series, the one an RTSTRUCT refers to is chosen (see
    :func:`~ctan_monai.data.dicom_rt.discovery.pick_ct_for_rtstruct`: the images its contours refer to, the series
    it names, its frame of reference); the others are left out with a warning.

    Args:
        study: the study.
        problems: receives why the study cannot be converted, naming its series and study.
        warnings: receives what was chosen when there was a choice.

    Returns:
        ``(struct, ct_files)``: the structure set and the files of its CT series; ``(None, [])`` on a problem.
    """
    case, folder = study.case_id, _study_folder(study)
    cts = study.of_modality("CT")
    struct_files = [f for s in study.of_modality("RTSTRUCT") for f in sorted(s.files, key=lambda f: str(f.path))]
    if not cts:
        problems.append(
            DataProblem(
                folder,
                f"no CT series in this study (missing modality CT); study {study.study_uid} holds {_modalities(study)}",
                case,
            )
        )
    if not struct_files:
        problems.append(
            DataProblem(
                folder,
                f"no RTSTRUCT in this study (missing modality RTSTRUCT); study {study.study_uid} holds "
                f"{_modalities(study)}",
                case,
            )
        )
    structs: list[RTStruct] = []
    for f in struct_files:
        try:
            structs.append(read_rtstruct(f.path))
        except (ValueError, OSError) as err:
            problems.append(DataProblem(str(f.path), f"unreadable RTSTRUCT: {err}", case))
    if not cts or not structs:
        return None, []
    if len(cts) == 1:
        ct = cts[0]
    else:
        decided = []
        reasons = []
        for struct in structs:
            chosen, reason = pick_ct_for_rtstruct(struct, cts)
            if chosen is not None:
                decided.append((struct, chosen, reason))
            reasons.append(f"RTSTRUCT {struct.path}: {reason}")
        if not decided:
            problems.append(
                DataProblem(
                    folder,
                    f"study {study.study_uid} has {len(cts)} CT series ({', '.join(describe_series(c) for c in cts)}) "
                    f"and no RTSTRUCT decides which one it was drawn on; cannot choose. " + "; ".join(reasons),
                    case,
                )
            )
            return None, []
        struct, ct, reason = decided[0]
        others = ", ".join(describe_series(c) for c in cts if c is not ct)
        warnings.append(
            DataProblem(
                struct.path,
                f"study {study.study_uid} has {len(cts)} CT series: converted {describe_series(ct)}, the one this "
                f"RTSTRUCT was drawn on ({reason}); left out: {others}",
                case,
            )
        )
    candidates = [s for s in structs if any(rtstruct_references(s, ct)[:2])] or [
        s for s in structs if not s.referenced_series
    ]
    if not candidates:
        named = sorted(set().union(*(s.referenced_series for s in structs)))
        problems.append(
            DataProblem(
                struct_files[0].path.as_posix(),
                f"no RTSTRUCT refers to the CT series of this study ({describe_series(ct)}, study "
                f"{study.study_uid}): they name series {', '.join(named)} and refer to none of its images",
                case,
            )
        )
        return None, []
    if len(candidates) > 1:
        warnings.append(
            DataProblem(candidates[0].path, f"{len(candidates)} RTSTRUCTs for one CT; the first is used", case)
        )
    return candidates[0], ct.files


def _pick_rtdose(
    study: DicomRTStudy, ct_frame: str, problems: list[DataProblem], warnings: list[DataProblem]
) -> Path | None:
    """Choose the RTDOSE of a study: the only one, or the only plan-summed one, in the CT's frame of reference."""
    case = study.case_id
    files = [f for s in study.of_modality("RTDOSE") for f in sorted(s.files, key=lambda f: str(f.path))]
    if not files:
        return None
    same_frame = [f for f in files if f.frame_of_reference == ct_frame]
    for f in files:
        if f.frame_of_reference != ct_frame:
            message = (
                f"mixed frames of reference: RTDOSE FrameOfReferenceUID {f.frame_of_reference or 'absent'} "
                f"differs from the CT's {ct_frame}"
            )
            (warnings if same_frame else problems).append(DataProblem(str(f.path), message, case))
    if len(same_frame) <= 1:
        return same_frame[0].path if same_frame else None
    kinds = {
        f.path: str(pydicom.dcmread(f.path, stop_before_pixels=True, force=True).get("DoseSummationType", "")).upper()
        for f in same_frame
    }
    plans = [p for p, kind in kinds.items() if kind == "PLAN"]
    if len(plans) == 1:
        return plans[0]
    problems.append(
        DataProblem(
            str(same_frame[0].path.parent),
            f"{len(same_frame)} RTDOSE files ({len(plans)} with DoseSummationType PLAN); cannot tell which is the "
            "plan dose: keep one per study",
            case,
        )
    )
    return None


def _missing_ct_images(struct: RTStruct, ct_files: Sequence[DicomFile]) -> list[str]:
    """The SOPInstanceUIDs the RTSTRUCT refers to as images of the chosen CT series that the series lacks.

    Counted: the images its RTReferencedSeriesSequence lists for that series and, when it was drawn on that series
    only (or names no series), the images its contours refer to that it lists under no other series.
    """
    series_uid = ct_files[0].series_uid
    present = {f.sop_uid for f in ct_files}
    expected = set(struct.series_images.get(series_uid, set()))
    if struct.referenced_series <= {series_uid}:
        elsewhere = set().union(*(v for k, v in struct.series_images.items() if k != series_uid))
        expected |= struct.contour_images - elsewhere
    return sorted(expected - present)


def _empty_reason(n_contours: int, skipped: int, notes: Sequence[str]) -> str:
    """Why an ROI is empty on the CT grid, in words.

    Args:
        n_contours: its closed planar contours.
        skipped: its contours that are not closed planar polygons (points, open lines).
        notes: what the rasterisation said about its contours.

    Returns:
        the reason.
    """
    if n_contours == 0:
        return (
            f"it has no closed planar contours ({skipped} point or open contour(s) left out)"
            if skipped
            else "it has no contours"
        )
    return "; ".join(notes) or "its contours enclose no voxel centre"


def convert_study(
    study: DicomRTStudy,
    output_dir: str | os.PathLike[str],
    synonym_table: Mapping[str, Sequence[str]],
    require_dose: bool = False,
    body_threshold_hu: float = -400.0,
) -> tuple[dict[str, Any], list[DataProblem]]:
    """Convert one study to NIfTI files under ``output_dir/<case_id>/``.

    Args:
        study: a study from :func:`~ctan_monai.data.dicom_rt.discovery.find_studies`.
        output_dir: the conversion's output folder.
        synonym_table: organ -> ROI synonyms (organs in label order), from
            :func:`~ctan_monai.data.dicom_rt.synonyms.build_synonym_table`.
        require_dose: make a study without RTDOSE a failure instead of a warning.
        body_threshold_hu: HU threshold of the body mask when the RTSTRUCT has no external contour.

    Returns:
        ``(entry, warnings)``: the manifest entry (paths relative to ``output_dir``; ``label_class_present`` says
        which organs have voxels in the label map) and non-fatal problems (pairings with other studies, contours off
        the slice planes, signs of missing slices, organs emptied by the overlap rule, ...).

    Raises:
        CaseConversionError: listing every reason the study cannot be converted (missing modality, no ROI matching
            any organ, mixed frames of reference, dose grid outside the CT, unreadable or irregular files, CT images
            the RTSTRUCT refers to that the series lacks, NaN / negative / implausibly high dose, several CT series of
            which no RTSTRUCT decides one, every matched ROI empty on the CT grid (with each ROI's reason)).

    Example:
        >>> import tempfile
        >>> from ctan_monai.apps.prostate.demo import write_prostate_demo
        >>> from ctan_monai.data.dicom_rt.discovery import find_studies
        >>> from ctan_monai.data.dicom_rt.synonyms import build_synonym_table
        >>> src = tempfile.mkdtemp()
        >>> _ = write_prostate_demo(src, n_patients=1, shape=(32, 32, 12))
        >>> entry, _ = convert_study(find_studies(src)[0], tempfile.mkdtemp(), build_synonym_table(["Rectum"]))
        >>> entry["label_class_present"]
        [1, 1]
    """
    case = study.case_id
    problems: list[DataProblem] = [
        DataProblem(p.file, f"{p.message}; it lies among this study's files (move it away if it is not one)", case)
        for p in study.unreadable
    ]
    warnings: list[DataProblem] = list(study.notes)  # how series of other studies were paired with this one
    struct, ct_files = _pick_rtstruct(study, problems, warnings)
    if struct is None:
        raise CaseConversionError(problems + study.notes)  # the notes say why series of other studies did not pair
    missing = _missing_ct_images(struct, ct_files)
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        problems.append(
            DataProblem(
                struct.path,
                f"the RTSTRUCT refers to {len(missing)} image(s) of CT series {ct_files[0].series_uid} that the "
                f"series lacks (it has {len(ct_files)} readable file(s)): SOPInstanceUID {listed}. A slice is missing "
                "or unreadable, so the CT volume would not be the one the contours were drawn on",
                case,
            )
        )
    ct_folder = str(ct_files[0].path.parent)
    ct_frames = sorted({f.frame_of_reference for f in ct_files})
    if len(ct_frames) != 1 or not ct_frames[0]:
        problems.append(DataProblem(ct_folder, f"CT slices have FrameOfReferenceUIDs {ct_frames}, expected one", case))
    ct_frame = ct_frames[0]
    if struct.frames_of_reference and ct_frame not in struct.frames_of_reference:
        problems.append(
            DataProblem(
                struct.path,
                f"mixed frames of reference: RTSTRUCT refers to {sorted(struct.frames_of_reference)}, "
                f"the CT is in {ct_frame}",
                case,
            )
        )
    matched = match_rois(struct.rois, synonym_table)
    if not any(matched.values()):
        problems.append(
            DataProblem(
                struct.path,
                f"no ROI matches any organ {list(synonym_table)}; ROIs present: {sorted(struct.rois)} "
                "(add synonyms with --synonyms)",
                case,
            )
        )
    dose_path = _pick_rtdose(study, ct_frame, problems, warnings)
    if dose_path is None and not any("RTDOSE" in p.message for p in problems):
        (problems if require_dose else warnings).append(
            DataProblem(_study_folder(study), "no RTDOSE in this study (missing modality RTDOSE)", case)
        )
    if problems:  # before reading the CT, the slowest step
        raise CaseConversionError(problems)
    series_notes: list[str] = []
    try:
        ct = read_ct_series([f.path for f in ct_files], series_notes)
    except (DicomSeriesError, DicomDecodeError) as err:
        raise CaseConversionError([DataProblem(ct_folder, f"CT series cannot be read: {err}", case)]) from None
    warnings.extend(DataProblem(ct_folder, note, case) for note in series_notes)

    label = np.zeros(sitk.GetArrayViewFromImage(ct).shape, dtype=np.uint8)
    organs = list(synonym_table)
    masks: dict[str, np.ndarray] = {}
    empty: list[str] = []  # why each matched ROI is empty, for the message when all are
    for organ in organs:
        roi_name = matched[organ]
        if roi_name is None:
            warnings.append(DataProblem(struct.path, f"no ROI matches organ {organ!r}; its class is absent", case))
            continue
        roi = struct.rois[roi_name]
        mask, notes = rasterise_contours(roi.contours, ct)
        warnings.extend(DataProblem(struct.path, f"ROI {roi_name!r}: {note}", case) for note in notes)
        if not mask.any():
            reason = _empty_reason(len(roi.contours), roi.skipped, notes)
            empty.append(f"ROI {roi_name!r} ({organ}): {reason}")
            warnings.append(
                DataProblem(struct.path, f"ROI {roi_name!r} ({organ}) is empty on the CT grid: {reason}", case)
            )
            continue
        masks[organ] = mask
    if not masks:
        unmatched = [organ for organ in organs if matched[organ] is None]
        raise CaseConversionError(
            [
                DataProblem(
                    struct.path,
                    "every matched ROI is empty on the CT grid: "
                    + "; ".join(empty)
                    + (f"; no ROI matches {', '.join(unmatched)}" if unmatched else ""),
                    case,
                )
            ]
        )
    # Earlier organs win overlaps: paint in reverse order so that they are painted last.
    for index in range(len(organs), 0, -1):
        if organs[index - 1] in masks:
            label[masks[organs[index - 1]]] = index
    # Presence is what the label map holds: an ROI that organs listed before it cover entirely is absent there.
    painted = np.bincount(label.ravel(), minlength=len(organs) + 1) > 0
    present = [1] + [int(painted[index]) for index in range(1, len(organs) + 1)]
    for index, organ in enumerate(organs, start=1):
        if organ in masks and not painted[index]:
            cover = [o for o in organs[: index - 1] if o in masks and (masks[o] & masks[organ]).any()]
            warnings.append(
                DataProblem(
                    struct.path,
                    f"ROI {matched[organ]!r} ({organ}, {int(masks[organ].sum())} voxels) lies entirely inside "
                    f"{', '.join(cover)}, listed before it, which take the overlap: 0 voxels remain in the label map, "
                    "so its class is marked absent (label_class_present 0); list it earlier to keep it",
                    case,
                )
            )

    out = Path(output_dir)
    case_dir = out / case
    entry: dict[str, Any] = {
        "case_id": case,
        "image": f"{case}/image.nii.gz",
        "label": f"{case}/label.nii.gz",
        "dose": None,
        "dose_mask": None,
        "label_class_present": present,
        "spacing": [float(s) for s in ct.GetSpacing()],
        "source": {
            "patient_id": study.patient_id,
            "study_uid": study.study_uid,
            "ct_series_uid": ct_files[0].series_uid,
            "ct_files": len(ct_files),
            "rtstruct": struct.path,
            "rtdose": None,
            "matched_rois": matched,
        },
    }
    if dose_path is not None:
        try:
            dose_grid = read_rtdose(dose_path, require_gy=True)
        except (DoseUnitsError, DicomDecodeError, ValueError) as err:
            raise CaseConversionError([DataProblem(str(dose_path), f"RTDOSE cannot be read: {err}", case)]) from None
        support = dose_support(dose_grid, ct)
        if not support.any():
            raise CaseConversionError(
                [DataProblem(str(dose_path), "the dose grid lies entirely outside the CT volume", case)]
            )
        ct_array = sitk.GetArrayViewFromImage(ct)
        body_name = match_rois(struct.rois, {"BODY": list(BODY_SYNONYMS)})["BODY"]
        body = rasterise_contours(struct.rois[body_name].contours, ct)[0] if body_name else None
        if body is None or not body.any():
            body = body_mask_from_ct(np.asarray(ct_array, dtype=np.float32), body_threshold_hu)
        coverage = float((support & body).sum() / max(int(body.sum()), 1))
        if coverage < _MIN_DOSE_COVERAGE:
            warnings.append(
                DataProblem(str(dose_path), f"the dose grid covers only {coverage:.1%} of the body on the CT", case)
            )
        dose = sitk.GetArrayFromImage(resample_dose(dose_grid, ct))
        _write_image(_as_image(dose.astype(np.float32), ct), case_dir / "dose.nii.gz")
        _write_image(_as_image((support & body).astype(np.uint8), ct), case_dir / "dose_mask.nii.gz")
        entry.update(dose=f"{case}/dose.nii.gz", dose_mask=f"{case}/dose_mask.nii.gz")
        entry["source"].update(rtdose=str(dose_path), dose_body_coverage=coverage, body_from=body_name or "CT")
    _write_image(ct, case_dir / "image.nii.gz")
    _write_image(_as_image(label, ct), case_dir / "label.nii.gz")
    return entry, warnings


def convert_dicom_rt(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    organs: Sequence[str] = PROSTATE_ORGANS,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    require_dose: bool = False,
    skip_bad: bool = False,
    body_threshold_hu: float = -400.0,
) -> ConversionResult:
    """Find every DICOM-RT study under ``input_dir`` and convert each to NIfTI (see the module docstring).

    Every study is tried; ``report.json`` lists every one that failed and why, and the warnings, before anything is
    raised, so that one run shows all the problems of a dataset. A file that claims to be DICOM but cannot be read
    fails the study whose folder holds it (when one study's files are there), else it is listed as a warning.

    Args:
        input_dir: folder tree of DICOM files (any layout, names and order).
        output_dir: where the NIfTI sets, ``manifest.json`` and ``report.json`` are written.
        organs: the organs of the label map in label order; they are matched to ROI names through synonyms.
        synonyms: extra ROI synonyms per organ, added to the default table.
        require_dose: make a study without RTDOSE a failure instead of a warning.
        skip_bad: write the manifest of the converted studies and return even when some failed (they stay listed
            in the report); by default a failure raises after the report is written.
        body_threshold_hu: HU threshold of the body mask when the RTSTRUCT has no external contour.

    Returns:
        the manifest entries, the report of failures and the warnings.

    Raises:
        DatasetValidationError: listing every failed study (unless ``skip_bad``; the message suggests ``--skip-bad``
            when other studies converted), or when no study was found or none converted.
        ValueError: when the organs or synonyms are inconsistent.

    Example:
        >>> import tempfile
        >>> from ctan_monai.apps.prostate.demo import write_prostate_demo
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> _ = write_prostate_demo(src, n_patients=2, shape=(32, 32, 12))
        >>> [e["case_id"] for e in convert_dicom_rt(src, dst).entries]
        ['SYNTH_PROSTATE_000', 'SYNTH_PROSTATE_001']
    """
    table = build_synonym_table(organs, synonyms)
    out = Path(output_dir)
    report = ValidationReport(dataset=f"DICOM-RT {input_dir}")
    warnings: list[DataProblem] = []
    entries: list[dict[str, Any]] = []
    unreadable: list[DataProblem] = []
    studies = find_studies(input_dir, unreadable)
    if not studies:
        report.add(str(input_dir), "no DICOM files found")
    owned = {p.file for study in studies for p in study.unreadable}
    # unreadable files that no single study's folder holds: reported, they cannot be assigned to a study
    warnings.extend(p for p in unreadable if p.file not in owned)
    for study in studies:
        try:
            entry, case_warnings = convert_study(study, out, table, require_dose, body_threshold_hu)
        except CaseConversionError as err:
            report.problems.extend(err.problems)
            continue
        entries.append(entry)
        warnings.extend(case_warnings)
        report.valid_cases.append(study.case_id)
    result = ConversionResult(entries, report, warnings)
    result.report_path = out / "report.json"
    atomic_write_json(
        result.report_path,
        {
            "input": str(input_dir),
            "converted": report.valid_cases,
            "failed": [{"case_id": p.case, "file": p.file, "message": p.message} for p in report.problems],
            "warnings": [{"case_id": p.case, "file": p.file, "message": p.message} for p in warnings],
        },
    )
    if not entries:
        report.raise_if_problems()
    if not (report.ok or skip_bad):
        failed = report.bad_cases()
        raise DatasetValidationError(
            report.problems,
            f"DICOM-RT {input_dir} ({len(failed)} of {len(studies)} studies failed and {len(entries)} converted, but "
            "no manifest was written: rerun with --skip-bad (python -m ctan_monai.data.dicom_rt convert; skip_bad=True "
            "in Python) to write the manifest of the converted studies, the failed ones stay listed in "
            f"{result.report_path})",
        )
    result.manifest_path = out / "manifest.json"
    atomic_write_json(
        result.manifest_path,
        {
            "organs": list(table),
            "label_names": ["background", *table],
            "synonyms": table,
            "coordinates": "NIfTI RAS affine (SimpleITK converts DICOM LPS)",
            "overlap_rule": "a voxel in several organs gets the organ listed first; an organ without voxels left in "
            "the label map is marked absent in label_class_present",
            "contour_rule": "even-odd within a contour plane, never across planes; each CT slice shows the contour "
            "plane nearest to it within half a slice spacing",
            "dose_mask": "dose grid support intersected with the body (external ROI, else CT threshold)",
            "cases": entries,
        },
    )
    return result
