"""Synthetic prostate DICOM-RT patients (CT series, RTSTRUCT, RTDOSE), written with pydicom.

The built-in demo data of the prostate bundle and the fixture of the DICOM-RT round-trip tests. Everything here is
SYNTHETIC: analytic shapes standing in for a pelvis, labelled as such in the files (PatientName, SeriesDescription)
and in a README.txt. Files of all patients are mixed in randomly named folders under random names, in random order,
so that readers must group them by their DICOM tags.

Anatomy (fractions of the field of view, LPS: +x patient left, +y posterior, +z superior): an elliptic body with a
subcutaneous fat rim around muscle, pelvic fat in the middle; the bladder anterior-superior; the prostate (CTV) and
its 1.25x expansion (PTV) central; the rectum posterior; the femurs lateral and inferior. Patients differ as real
ones do (``_patient_shapes``): body habitus, where the pelvic organs sit in the body, bladder filling, rectal
content, femur spacing and height. CT numbers are those of planning CTs (fat -95, muscle 45, urine 10, prostate 40,
rectal wall 35 around gas and faeces -350..-100, bone 700 HU), so that the organs stand out against the pelvic fat
as on real scans. The dose conforms to the PTV, falls off smoothly, and is lowered in the rectum and the bladder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctan_monai.utils.atomic import atomic_path, atomic_write_text

__all__ = ["SyntheticPatient", "write_prostate_demo", "DEMO_ORGANS"]

DEMO_ORGANS: tuple[str, ...] = ("Rectum", "Bladder", "Femur_L", "Femur_R")
_RT_STRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
_PRESCRIPTION_GY = 60.0
# Shapes of the average patient: (kind, centre, semi-axes) in fractions of the half field of view; "cyl" ignores z.
# Painted in this order, later over earlier: fat rim (BODY), muscle, pelvic fat, organs. Muscle, PelvicFat and
# RectalLumen are CT only (no ROI).
_ANATOMY: dict[str, tuple[str, tuple[float, float, float], tuple[float, float, float]]] = {
    "BODY": ("cyl", (0.0, 0.0, 0.0), (0.85, 0.6, 1.0)),
    "Muscle": ("cyl", (0.0, 0.0, 0.0), (0.78, 0.53, 1.0)),
    "PelvicFat": ("cyl", (0.0, -0.02, 0.0), (0.34, 0.44, 1.0)),
    "Bladder": ("ell", (0.0, -0.25, 0.25), (0.22, 0.18, 0.3)),
    "Prostate": ("ell", (0.0, 0.0, -0.1), (0.12, 0.1, 0.22)),
    "Rectum": ("ell", (0.0, 0.24, -0.15), (0.1, 0.09, 0.55)),
    "RectalLumen": ("ell", (0.0, 0.24, -0.15), (0.06, 0.054, 0.5)),  # the rectum's own, shrunk: its wall stays
    "Femur_L": ("ell", (0.47, 0.0, -0.35), (0.12, 0.12, 0.45)),
    "Femur_R": ("ell", (-0.47, 0.0, -0.35), (0.12, 0.12, 0.45)),
}
_HU = {
    "BODY": -95.0,
    "Muscle": 45.0,
    "PelvicFat": -90.0,
    "Bladder": 10.0,
    "Prostate": 40.0,
    "Rectum": 35.0,  # the wall
    "RectalLumen": -220.0,  # gas and faeces, the mean; each patient's is drawn in _patient_shapes
    "Femur_L": 700.0,
    "Femur_R": 700.0,
}
_PELVIC_ORGANS = ("Bladder", "Prostate", "Rectum")
_PTV_MARGIN = 1.25  # the PTV is the prostate ellipsoid scaled by this factor
# a patient's shapes: name -> (centre, semi-axes), fractions of the half field of view
_Shapes = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class SyntheticPatient:
    """One written synthetic patient and the truth it was made from (arrays [z, y, x], z increasing).

    Args:
        patient_id: PatientID.
        files: every file written for the patient.
        origin: LPS position of the CT's first voxel (lowest z), mm.
        spacing: CT voxel size (x, y, z), mm.
        ct: the CT in HU.
        masks: organ -> bool mask on the CT grid (voxel centres inside the organ's analytic shape).
        dose: the dose in Gy at the CT voxel centres (0 outside the dose grid).
        dose_grid_support: where the dose grid covers the CT voxel centres.
    """

    patient_id: str
    files: list[Path]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    ct: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    dose: np.ndarray | None = None
    dose_grid_support: np.ndarray | None = None


@dataclass
class _Layout:
    """What the three writers of one patient share: ids, UIDs and the CT grid (LPS, mm).

    Args:
        patient_id: PatientID.
        uid: deterministic UID from parts (seed and patient included).
        study_uid: StudyInstanceUID.
        frame_uid: FrameOfReferenceUID of all series.
        size: CT size (x, y, z).
        step: CT spacing (x, y, z).
        axes: voxel-centre coordinates along x, y and z.
        half_fov: half the field of view (x, y, z), the unit of the anatomy's fractions.
        centre: the field of view's centre.
        shapes: this patient's shapes, name -> (centre, semi-axes) in fractions of ``half_fov``.
    """

    patient_id: str
    uid: Callable[..., str]
    study_uid: str
    frame_uid: str
    size: np.ndarray
    step: np.ndarray
    axes: list[np.ndarray]
    half_fov: np.ndarray
    centre: np.ndarray
    shapes: _Shapes


def _ds(value: float) -> str:
    """A DS string (at most 16 characters)."""
    return f"{value:.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.8e}"


def _patient_shapes(rng: np.random.Generator) -> tuple[_Shapes, dict[str, float]]:
    """One patient's shapes and CT numbers: the average anatomy varied as patients and scans vary.

    Without this variation every patient would be the same phantom, and the trivial atlas of the training patients
    (the evaluation's floor) would score a Dice above 90 % and a near-zero dose error: nothing left to learn from the
    image. Here (mm at the default grid): body habitus (+-10 %); the pelvic organs together shifted in the body (+-12
    mm left-right and antero-posterior, +-6 mm cranio-caudal); prostate size (0.85-1.2x); bladder filling
    (0.75-1.35x, growing upwards and forwards from the prostate); rectal position and content; femur spacing (with
    the body width) and height; and where the scan starts: all the anatomy +-19 mm cranio-caudally in the field of
    view, as scan ranges differ from patient to patient (which an atlas aligned on the scanned body cannot know, and
    a slice-wise network does not need to). Rectum and femurs keep their size within +-10 %, so that their contours
    stay faithful on coarse grids.
    """
    shapes: _Shapes = {}
    habitus = np.array([*rng.uniform(0.9, 1.1, size=2), 1.0])  # the body's width and depth; "cyl" ignores z
    scan = np.array([0.0, 0.0, rng.uniform(-0.3, 0.3)])
    group = rng.uniform(-1.0, 1.0, size=3) * np.array([0.06, 0.06, 0.1]) + scan
    filling = rng.uniform(0.75, 1.35)
    gland = rng.uniform(0.85, 1.2)
    for name, (_, centre, semi) in _ANATOMY.items():
        c, a = np.asarray(centre, dtype=np.float64), np.asarray(semi, dtype=np.float64)
        jitter = rng.uniform(0.9, 1.1, size=3)
        if name in ("BODY", "Muscle", "PelvicFat"):  # the fat rim and the pelvic fat vary a little in thickness
            c, a = c * habitus, a * habitus * (1.0 if name == "BODY" else rng.uniform(0.97, 1.03))
        elif name in _PELVIC_ORGANS:
            c, a = c + group, a * jitter
            if name == "Prostate":
                a = a * gland
            elif name == "Bladder":  # a fuller bladder rises and bulges forwards, its base stays on the prostate
                c = c + (filling - 1.0) * np.array([0.0, -0.5 * semi[1], 0.8 * semi[2]])
                a = a * filling
            elif name == "Rectum":
                c = c + np.array([*rng.uniform(-0.03, 0.03, size=2), 0.0])
        elif name == "RectalLumen":  # inside this patient's rectum (painted after it)
            rectum_c, rectum_a = shapes["Rectum"]
            c, a = rectum_c.copy(), rectum_a * (a / np.asarray(_ANATOMY["Rectum"][2]))
        else:  # femurs: spaced with the body width, each at a height of its own
            c = c * habitus + scan + np.array([0.0, rng.uniform(-0.03, 0.03), rng.uniform(-0.12, 0.12)])
            a = a * jitter
        shapes[name] = (c, a)
    hu = {**_HU, "RectalLumen": float(rng.uniform(-350.0, -100.0))}
    return shapes, hu


def _shape_radius(name: str, points: np.ndarray, half_fov: np.ndarray, shapes: _Shapes) -> np.ndarray:
    """Normalised radius of ``points`` [..., 3] in an analytic shape: < 1 inside, 1 on the surface."""
    centre, semi = shapes[name]
    rel = (points - centre * half_fov) / (semi * half_fov)
    if _ANATOMY[name][0] == "cyl":
        rel = rel[..., :2]
    return np.sqrt((rel**2).sum(-1))


def _dose_at(points: np.ndarray, half_fov: np.ndarray, shapes: _Shapes) -> np.ndarray:
    """Smooth dose (Gy) of a coplanar arc plan: a plateau on the PTV with a steep sigmoid edge; around it, in the
    slices the arcs cross (the PTV's cranio-caudal extent), the low-dose bath (about half the prescription at the
    PTV's surface, falling by e every 0.9 PTV radii in-plane: a third of it some 2 cm out); beyond those slices only a
    sharp penumbra (e every 0.35 PTV half-lengths, some 6 mm); lowered in rectum and bladder."""
    centre, semi = shapes["Prostate"]
    rel = (points - centre * half_fov) / (semi * _PTV_MARGIN * half_fov)
    r = np.sqrt((rel**2).sum(-1))
    plateau = 1.0 / (1.0 + np.exp((r - 1.1) / 0.08))
    in_plane = np.sqrt((rel[..., :2] ** 2).sum(-1))
    beyond = np.maximum(np.abs(rel[..., 2]) - 1.0, 0.0)
    bath = 0.55 * np.exp(-np.maximum(in_plane - 1.0, 0.0) / 0.9 - beyond / 0.35)
    dose = _PRESCRIPTION_GY * (0.04 + 0.96 * (plateau + (1.0 - plateau) * bath))
    for organ, depth in (("Rectum", 0.3), ("Bladder", 0.25)):
        dose *= 1.0 - depth * np.exp(-(_shape_radius(organ, points, half_fov, shapes) ** 2))
    return dose


def _meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _common(ds: Dataset, patient_id: str, study_uid: str, series_uid: str, modality: str, description: str) -> None:
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = {"CT": 1, "RTSTRUCT": 2, "RTDOSE": 3}[modality]
    ds.Modality = modality
    ds.SeriesDescription = f"SYNTHETIC {description} (ctan_monai demo, not patient data)"
    ds.Manufacturer = "ctan_monai synthetic demo"


def _save(ds: Dataset, path: Path) -> None:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_prostate_demo(
    out_dir: str | os.PathLike[str],
    n_patients: int = 4,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 32),
    spacing: Sequence[float] = (6.0, 6.0, 4.0),
    dose_spacing: Sequence[float] | None = None,
) -> list[SyntheticPatient]:
    """Write synthetic prostate DICOM-RT patients: CT series, RTSTRUCT and RTDOSE per patient.

    Args:
        out_dir: output folder (created); files go to randomly named sub-folders, mixed across patients.
        n_patients: how many patients.
        seed: random seed (shapes, intensities, noise, UIDs, file names and order all follow from it).
        shape: CT size (x, y, z) = (columns, rows, slices).
        spacing: CT voxel size (x, y, z) in mm.
        dose_spacing: RTDOSE voxel size (x, y, z); None puts the dose grid on the CT's voxel centres (a sub-box of
            the CT grid covering the body). Otherwise the grid covers the body with that spacing, not aligned.

    Returns:
        the patients with the truth they were made from.

    Raises:
        ValueError: for fewer than one patient, or a shape/spacing that is not three positive values.

    Example:
        >>> import tempfile
        >>> patients = write_prostate_demo(tempfile.mkdtemp(), n_patients=1, shape=(32, 32, 12))
        >>> patients[0].ct.shape, sorted(patients[0].masks)
        ((12, 32, 32), ['Bladder', 'Femur_L', 'Femur_R', 'Rectum'])
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    size = np.asarray(shape, dtype=int)
    step = np.asarray(spacing, dtype=np.float64)
    if size.shape != (3,) or step.shape != (3,) or (size < 2).any() or (step <= 0).any():
        raise ValueError(f"shape and spacing must be 3 positive values (x, y, z), got {shape} and {spacing}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    folders = [out / "dicom" / f"{rng.integers(16**6):06x}" for _ in range(max(3, n_patients))]
    atomic_write_text(
        out / "README.txt",
        "SYNTHETIC DATA - NOT PATIENT DATA.\n"
        f"{n_patients} synthetic prostate radiotherapy patients written by ctan_monai.apps.prostate.demo "
        f"(seed {seed}): CT series, RTSTRUCT (BODY, Rectum, Bladder, Femur_L, Femur_R, Prostate, PTV) and RTDOSE "
        "(Gy) per patient, made of analytic shapes.\nFiles are named and placed at random on purpose: group them by "
        "DICOM tags (python -m ctan_monai.data.dicom_rt convert --input <this folder> --output <dir>).\n",
    )
    patients = []
    for index in range(n_patients):
        patient_id = f"SYNTH_PROSTATE_{index:03d}"
        patients.append(_write_patient(patient_id, seed, rng, folders, size, step, dose_spacing))
    return patients


def _write_patient(
    patient_id: str,
    seed: int,
    rng: np.random.Generator,
    folders: list[Path],
    size: np.ndarray,
    step: np.ndarray,
    dose_spacing: Sequence[float] | None,
) -> SyntheticPatient:
    """Write one patient's CT, RTSTRUCT and RTDOSE; return the truth."""

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[str(seed), patient_id, *map(str, parts)])

    def file_path() -> Path:
        return folders[int(rng.integers(len(folders)))] / f"{rng.integers(16**12):012x}.dcm"

    half_fov = size * step / 2.0
    # The CT's first voxel: centred field of view plus a random table offset, so that geometry is not trivial.
    origin = -half_fov + step / 2.0 + np.array([0.0, 0.0, float(rng.uniform(-300.0, 300.0))])
    half_fov_centre = origin + (size - 1) * step / 2.0
    shapes, hu = _patient_shapes(rng)
    axes = [origin[i] + step[i] * np.arange(size[i]) for i in range(3)]
    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    points = np.stack([xx, yy, zz], axis=-1) - half_fov_centre

    ct = np.full(points.shape[:3], -1000.0)
    inside = {name: _shape_radius(name, points, half_fov, shapes) < 1.0 for name in _ANATOMY}
    for name in _ANATOMY:  # later shapes paint over earlier ones (organs over the body)
        ct[inside[name]] = hu[name]
    ct = np.rint(ct + rng.normal(0.0, 8.0, ct.shape) * inside["BODY"]).clip(-1024, 3000)

    study_uid, frame_uid = uid("study"), uid("frame")
    ct_series, struct_series, dose_series = uid("ct"), uid("rtstruct"), uid("rtdose")
    files: list[Path] = []
    slice_uids = [uid("ct", k) for k in range(size[2])]
    order = rng.permutation(size[2])  # write order and InstanceNumber carry no geometry
    for write_rank, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = _meta(CTImageStorage, slice_uids[k])
        _common(ds, patient_id, study_uid, ct_series, "CT", "pelvis CT")
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, slice_uids[k]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = int(write_rank + 1)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImagePositionPatient = [_ds(origin[0]), _ds(origin[1]), _ds(axes[2][k])]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [_ds(step[1]), _ds(step[0])]
        ds.SliceThickness = _ds(step[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(size[1]), int(size[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.KVP = "120"
        ds.PixelData = (ct[k] + 1024).astype(np.uint16).tobytes()
        path = file_path()
        _save(ds, path)
        files.append(path)

    layout = _Layout(patient_id, uid, study_uid, frame_uid, size, step, axes, half_fov, half_fov_centre, shapes)
    files.append(_write_rtstruct(layout, file_path(), ct_series, struct_series, slice_uids))
    dose_path, dose, support = _write_rtdose(layout, file_path(), dose_series, inside["BODY"], dose_spacing)
    files.append(dose_path)
    masks = {organ: inside[organ] for organ in DEMO_ORGANS}
    return SyntheticPatient(patient_id, files, tuple(origin), tuple(step), ct.astype(np.int16), masks, dose, support)


def _ellipse_section(
    name: str, z: float, half_fov: np.ndarray, centre_offset: np.ndarray, shapes: _Shapes, scale: float = 1.0
) -> np.ndarray | None:
    """The polygon (72 vertices, LPS mm) where an analytic shape meets the plane at height ``z``, or None."""
    centre, semi = shapes[name]
    centre_mm = centre * half_fov + centre_offset
    semi_mm = semi * half_fov * scale
    shrink = 1.0
    if _ANATOMY[name][0] == "ell":
        rel = (z - centre_mm[2]) / semi_mm[2]
        if abs(rel) >= 1.0:
            return None
        shrink = float(np.sqrt(1.0 - rel**2))
    angles = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
    x = centre_mm[0] + semi_mm[0] * shrink * np.cos(angles)
    y = centre_mm[1] + semi_mm[1] * shrink * np.sin(angles)
    return np.stack([x, y, np.full_like(x, z)], axis=1)


def _write_rtstruct(layout: _Layout, path: Path, ct_series: str, series_uid: str, slice_uids: list[str]) -> Path:
    """Write the RTSTRUCT: closed planar contours of every shape on every CT slice it crosses."""
    sop_uid = layout.uid("rtstruct", "sop")
    ds = Dataset()
    ds.file_meta = _meta(_RT_STRUCT_STORAGE, sop_uid)
    _common(ds, layout.patient_id, layout.study_uid, series_uid, "RTSTRUCT", "structure set")
    ds.SOPClassUID, ds.SOPInstanceUID = _RT_STRUCT_STORAGE, sop_uid
    ds.StructureSetLabel = "SYNTHETIC"
    ds.StructureSetDate, ds.StructureSetTime = "20240101", "120000"
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ct_series
    series_ref.ContourImageSequence = DicomSequence()
    for sop in slice_uids:
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = CTImageStorage, sop
        series_ref.ContourImageSequence.append(image)
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as TPSs write
    study_ref.ReferencedSOPInstanceUID = layout.study_uid
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = layout.frame_uid
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = (
        DicomSequence(),
        DicomSequence(),
        DicomSequence(),
    )
    rois = [("BODY", "BODY", 1.0, "EXTERNAL")] + [(n, n, 1.0, "ORGAN") for n in DEMO_ORGANS]
    rois += [("Prostate", "Prostate", 1.0, "CTV"), ("PTV", "Prostate", _PTV_MARGIN, "PTV")]
    for number, (roi_name, shape_name, scale, kind) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, layout.frame_uid, roi_name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        ds.StructureSetROISequence.append(roi)
        contours = DicomSequence()
        for k, z in enumerate(layout.axes[2]):
            polygon = _ellipse_section(shape_name, float(z), layout.half_fov, layout.centre, layout.shapes, scale)
            if polygon is None:
                continue
            contour = Dataset()
            image = Dataset()
            image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = CTImageStorage, slice_uids[k]
            contour.ContourImageSequence = DicomSequence([image])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(polygon)
            contour.ContourData = [f"{v:.3f}" for v in polygon.ravel()]
            contours.append(contour)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = [int(v) for v in (np.array([37, 91, 53]) * number) % 256]
        roi_contour.ContourSequence = contours
        ds.ROIContourSequence.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = kind, ""
        ds.RTROIObservationsSequence.append(observation)
    _save(ds, path)
    return path


def _write_rtdose(
    layout: _Layout, path: Path, series_uid: str, body: np.ndarray, dose_spacing: Sequence[float] | None
) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write the RTDOSE (a grid over the body, all CT slices); return the path and the truth on the CT grid."""
    axes, size, step = layout.axes, layout.size, layout.step
    in_plane = body.any(axis=0)
    rows, cols = np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))
    lo = np.array([axes[0][max(cols[0] - 1, 0)], axes[1][max(rows[0] - 1, 0)], axes[2][0]])
    hi = np.array([axes[0][min(cols[-1] + 1, size[0] - 1)], axes[1][min(rows[-1] + 1, size[1] - 1)], axes[2][-1]])
    if dose_spacing is None:
        grid_step = step.copy()
        grid_origin = lo
    else:  # an unaligned grid: it starts a fraction of a voxel before the body box
        grid_step = np.asarray(dose_spacing, dtype=np.float64)
        grid_origin = lo - 0.37 * grid_step
    grid_size = np.floor((hi - grid_origin) / grid_step + 1e-6).astype(int) + 1
    if dose_spacing is not None:
        grid_size[:2] += 1  # reach past the body box in-plane
    grid_axes = [grid_origin[i] + grid_step[i] * np.arange(grid_size[i]) for i in range(3)]
    gz, gy, gx = np.meshgrid(*grid_axes[::-1], indexing="ij")
    grid_dose = _dose_at(np.stack([gx, gy, gz], axis=-1) - layout.centre, layout.half_fov, layout.shapes)
    scaling = _ds(float(grid_dose.max()) / 65000.0)
    stored = np.rint(grid_dose / float(scaling)).astype(np.uint16)

    sop_uid = layout.uid("rtdose", "sop")
    ds = Dataset()
    ds.file_meta = _meta(_RT_DOSE_STORAGE, sop_uid)
    _common(ds, layout.patient_id, layout.study_uid, series_uid, "RTDOSE", "plan dose")
    ds.SOPClassUID, ds.SOPInstanceUID = _RT_DOSE_STORAGE, sop_uid
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = layout.frame_uid, ""
    ds.ImagePositionPatient = [_ds(v) for v in grid_origin]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds(grid_step[1]), _ds(grid_step[0])]
    ds.SliceThickness = ""
    ds.NumberOfFrames = int(grid_size[2])
    ds.FrameIncrementPointer = 0x3004000C
    ds.GridFrameOffsetVector = [_ds(grid_step[2] * k) for k in range(grid_size[2])]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(grid_size[1]), int(grid_size[0])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    ds.DoseGridScaling = scaling
    ds.PixelData = stored.tobytes()
    _save(ds, path)

    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    ct_points = np.stack([xx, yy, zz], axis=-1)
    index = (ct_points - grid_origin) / grid_step
    # Where SimpleITK's resampling treats a point as inside the grid: within half a voxel of the outer centres.
    support = ((index >= -0.5) & (index < grid_size - 0.5)).all(axis=-1)
    truth = np.where(support, _dose_at(ct_points - layout.centre, layout.half_fov, layout.shapes), 0.0)
    return path, truth.astype(np.float32), support
