"""Synthetic OpenKBP-format demo data: head-and-neck phantoms written as the challenge's sparse CSVs.

The phantoms are SYNTHETIC (no patient data). They make the two tasks related, as in real plans: the dose covers
the targets at their prescriptions (PTV70 / PTV63 / PTV56 Gy), falls off around them, is lower in the organs at
risk, and is zero outside the possible-dose mask, so knowing the anatomy helps to predict the dose and vice versa.
The grid follows the reader's convention (``ctan_monai.apps.openkbp``): ``[row A->P, column R->L, slice S->I]``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ctan_monai.apps.openkbp.reader import CT_RANGE, OpenKBPPatient, write_patient
from ctan_monai.utils.atomic import atomic_write_text

__all__ = ["synthetic_openkbp_patient", "write_openkbp_demo"]

_README = "README.txt"
_MARK = "SYNTHETIC OpenKBP-format demo data written by ctan_monai.apps.openkbp.demo"
# Organ sparing: the fraction of the (target-driven) dose removed at the organ's centre, outside the targets.
_SPARING = {"Brainstem": 0.55, "SpinalCord": 0.6, "RightParotid": 0.45, "LeftParotid": 0.45}
# bumped when the phantoms change, so that a demo written by an older version is rewritten
_PHANTOM_VERSION = 2
_PRESCRIPTION_GY = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}


def _ellipsoid_radius(
    grid: Sequence[np.ndarray], centre: Sequence[float], semi_axes: Sequence[float], axes: Sequence[int] = (0, 1, 2)
) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) over the listed axes of an open grid."""
    total = 0.0
    for axis in axes:
        total = total + ((grid[axis] - centre[axis]) / semi_axes[axis]) ** 2
    return np.sqrt(total).astype(np.float32)


def synthetic_openkbp_patient(
    patient_id: str,
    rng: np.random.Generator,
    size: int = 128,
    structures_missing: Sequence[str] = (),
    shift: float = 0.08,
) -> OpenKBPPatient:
    """Make one synthetic head-and-neck patient on a ``size``-cubed grid.

    CT: air 0, soft tissue about 1040 (+-12 noise) with the contrast real CTs show (fatty parotids -70, brainstem
    +25, enhancing gross tumour +35, cerebrospinal fluid around the cord -30), skull, mandible and vertebrae
    brighter (1700-2200), an air-filled airway. Structures: Brainstem, SpinalCord, parotids, PTV70, PTV63 (for most
    patients), PTV56 (the targets do not overlap). Dose: each target at its prescription, an exponential fall-off
    around them, lower in the organs at risk, 1 % noise, rounded to 0.001 Gy like the real files, 0 outside the
    possible-dose mask (the body within the slices around the targets). Shapes, sizes and positions vary with
    ``rng``, and the whole anatomy moves by up to ``shift`` of the grid in-plane (half of it across slices), as real
    patients lie at different places on the grid: an atlas of the training patients then does not fit a new one.

    Args:
        patient_id: e.g. ``"pt_1"``.
        rng: the random generator (one per patient for reproducible data).
        size: grid side (the challenge's is 128; smaller grids keep tests fast).
        structures_missing: structures this patient has no file for (as some real patients lack one).
        shift: largest offset of the whole anatomy, as a fraction of the grid side (rows and columns; slices: half).

    Returns:
        the patient (CT on the 0..4095 scale).

    Raises:
        ValueError: when ``size`` is below 16.

    Example:
        >>> p = synthetic_openkbp_patient("pt_1", np.random.default_rng(0), size=32)
        >>> p.ct.shape, round(float(p.dose[p.structures["PTV70"]].mean()))
        ((32, 32, 32), 70)
    """
    if size < 16:
        raise ValueError(f"the phantom needs a grid of at least 16 voxels per side, got {size}")
    n = float(size)

    def jitter(scale: float) -> float:
        """A random offset of up to ``scale`` grid sides."""
        return float(rng.uniform(-scale, scale)) * n

    # the patient's place on the grid: every position below is relative to the shifted grid
    offsets = (jitter(shift), jitter(shift), jitter(shift / 2))
    grid = [(g - o).astype(np.float32) for g, o in zip(np.ogrid[:size, :size, :size], offsets)]
    row, _, sli = grid

    # Body: an elliptic cross-section per slice: a rounded head on top, a neck, shoulders widening at the bottom.
    centre_row, centre_col = 0.5 * n + jitter(0.02), 0.5 * n + jitter(0.02)
    half_row, half_col = 0.2 * n * rng.uniform(0.92, 1.08), 0.16 * n * rng.uniform(0.92, 1.08)
    head_scale = np.sqrt(np.clip(1.0 - ((0.42 * n - sli) / (0.32 * n)) ** 2, 0.0, 1.0))
    scale = np.where(sli < 0.42 * n, head_scale, 1.0)
    shoulders = np.clip((sli - 0.8 * n) / (0.2 * n), 0.0, 1.0)
    semi_row = np.maximum(half_row * scale * (1.0 + 0.1 * shoulders), 1e-3)
    semi_col = np.maximum(half_col * scale * (1.0 + 1.2 * shoulders), 1e-3)
    body_radius = np.sqrt(((row - centre_row) / semi_row) ** 2 + ((grid[1] - centre_col) / semi_col) ** 2)
    body = body_radius <= 1.0

    # Organs at risk (right parotid at smaller column indices: the patient's right).
    cord_row = 0.6 * n + jitter(0.015)
    cord_radius = max(0.022 * n, 1.2)
    in_cord_slices = sli >= 0.42 * n
    cord_q = _ellipsoid_radius(grid, (cord_row, centre_col, 0), (cord_radius, cord_radius, 1), axes=(0, 1))
    cord_q = np.where(in_cord_slices, cord_q, np.float32(1e3))
    oar_q = {
        "Brainstem": _ellipsoid_radius(
            grid, (0.55 * n + jitter(0.01), centre_col, 0.35 * n + jitter(0.02)), (0.045 * n, 0.04 * n, 0.07 * n)
        ),
        "SpinalCord": cord_q,
    }
    parotid_axes = tuple(s * n * rng.uniform(0.85, 1.15) for s in (0.055, 0.035, 0.06))
    parotid_offset = 0.115 * n + jitter(0.01)
    parotid_slice = 0.45 * n + jitter(0.02)
    for name, side in (("RightParotid", -1.0), ("LeftParotid", 1.0)):
        centre = (0.47 * n + jitter(0.01), centre_col + side * parotid_offset, parotid_slice)
        oar_q[name] = _ellipsoid_radius(grid, centre, parotid_axes)

    # Targets: a primary PTV70, an elective PTV63 shell around it and a PTV56 shell extending inferiorly.
    target_centre = (0.43 * n + jitter(0.02), centre_col + jitter(0.07), 0.52 * n + jitter(0.03))
    target_axes = np.array([0.065, 0.065, 0.08]) * n * rng.uniform(0.85, 1.15)
    has_ptv63 = bool(rng.uniform() < 0.7)
    q70 = _ellipsoid_radius(grid, target_centre, target_axes)
    q63 = _ellipsoid_radius(grid, target_centre, target_axes + 0.035 * n)
    centre56 = (target_centre[0], target_centre[1], target_centre[2] + 0.06 * n)
    q56 = _ellipsoid_radius(grid, centre56, target_axes + 0.07 * n)
    ptv70 = (q70 <= 1.0) & body
    ptv63 = (q63 <= 1.0) & body & ~ptv70
    ptv56 = (q56 <= 1.0) & body & ~ptv70 & ~ptv63
    if not has_ptv63:  # the elective volume is then treated to 56 Gy
        ptv56 |= ptv63
        ptv63 = np.zeros_like(ptv63)

    structures = {name: (q <= 1.0) & body for name, q in oar_q.items()}
    structures.update(PTV70=ptv70, PTV56=ptv56)
    if has_ptv63:
        structures["PTV63"] = ptv63
    for name in structures_missing:
        structures.pop(name, None)

    # CT on the 0..4095 scale (air near 0, soft tissue near 1040, bone brighter).
    ct = np.where(body, 1040.0 + 12.0 * rng.standard_normal(body.shape, dtype=np.float32), 0.0).astype(np.float32)
    skull = body & (sli < 0.36 * n) & (body_radius > 0.86)
    mandible = body & (np.abs(sli - 0.44 * n) < 0.04 * n) & (body_radius > 0.72) & (body_radius < 0.92)
    mandible &= row < centre_row - 0.05 * n
    vertebra_q = _ellipsoid_radius(grid, (cord_row, centre_col, 0), (cord_radius, cord_radius, 1), axes=(0, 1))
    vertebra = body & in_cord_slices & (vertebra_q > 1.4) & (vertebra_q < 3.0)
    airway_q = _ellipsoid_radius(grid, (0.42 * n, centre_col, 0), (0.03 * n, 0.03 * n, 1), axes=(0, 1))
    airway = body & (airway_q <= 1.0) & (sli > 0.5 * n) & (sli < 0.85 * n) & ~ptv70
    # soft-tissue contrast as in real planning CTs: parotid glands are fatty (darker than muscle), the gross tumour
    # enhances slightly, and the cord sits in darker cerebrospinal fluid; targets and organs are otherwise invisible
    for name, offset in (("RightParotid", -70.0), ("LeftParotid", -70.0), ("Brainstem", 25.0)):
        ct[(oar_q[name] <= 1.0) & body] += offset
    ct[ptv70] += 35.0
    csf = body & in_cord_slices & (cord_q > 1.0) & (vertebra_q <= 1.4)
    ct[csf] -= 30.0
    ct[skull] = 2200.0
    ct[mandible] = 1900.0
    ct[vertebra] = 1700.0
    ct[airway] = 30.0
    ct = np.clip(np.round(ct), *CT_RANGE).astype(np.float32)

    # Dose: the highest prescription reaching a voxel, falling off with the (approximate) distance to each target.
    fall_off = 0.08 * n
    dose = np.zeros(body.shape, dtype=np.float32)
    for name, q, axes in (("PTV70", q70, target_axes), ("PTV63", q63, target_axes + 0.035 * n)):
        if name == "PTV63" and not has_ptv63:
            continue
        distance = np.maximum(q - 1.0, 0.0) * float(np.mean(axes))
        dose = np.maximum(dose, _PRESCRIPTION_GY[name] * np.exp(-distance / fall_off))
    distance56 = np.maximum(q56 - 1.0, 0.0) * float(np.mean(target_axes + 0.07 * n))
    dose = np.maximum(dose, _PRESCRIPTION_GY["PTV56"] * np.exp(-distance56 / fall_off))
    targets = ptv70 | ptv63 | ptv56
    for name, q in oar_q.items():
        weight = np.clip(1.5 - q, 0.0, 1.0)  # 1 in the organ's core, 0 from half a radius outside it
        dose = np.where(targets, dose, dose * (1.0 - _SPARING[name] * weight))
    dose *= 1.0 + 0.01 * rng.standard_normal(dose.shape, dtype=np.float32)
    target_slices = np.flatnonzero(targets.any(axis=(0, 1)))
    margin = int(round(0.12 * n))
    in_plan = (sli >= target_slices.min() - margin) & (sli <= target_slices.max() + margin)
    possible_dose_mask = body & in_plan
    dose = np.where(possible_dose_mask, np.round(np.clip(dose, 0.0, None), 3), 0.0).astype(np.float32)

    in_plane = round(float(rng.uniform(3.5, 4.7)) * 128.0 / n, 3)
    thickness = float(rng.choice([2.0, 2.5, 3.0])) * 128.0 / n
    return OpenKBPPatient(patient_id, ct, dose, possible_dose_mask, structures, (in_plane, in_plane, thickness))


def _readme(n_train: int, n_val: int, seed: int, size: int) -> str:
    return (
        f"{_MARK}\n"
        f"phantom version {_PHANTOM_VERSION}; parameters: n_train={n_train} n_val={n_val} seed={seed} size={size}\n\n"
        "THIS IS SYNTHETIC DATA. It contains no patient data and is not fit for any clinical use.\n"
        "Phantoms of the head and neck in the OpenKBP challenge's on-disk format (provided-data/<split>/pt_<n>/,\n"
        "sparse CSVs with the header ',data', rows 'flat_index,value', C-order flat indices of a\n"
        f"{size}x{size}x{size} [row, column, slice] grid; masks have an empty data column).\n"
        "Structures: Brainstem, SpinalCord, RightParotid, LeftParotid, PTV70, PTV63 (most patients), PTV56.\n"
        "Dose (Gy): prescriptions 70/63/56 Gy on the targets, falling off around them, lower in the organs at risk,\n"
        "0 outside possible_dose_mask. The second training patient has no LeftParotid.csv (as some real patients\n"
        "lack a structure).\n"
        "Read it with ctan_monai.apps.openkbp.reader.read_patient / convert_dataset"
        + ("" if size == 128 else f" with grid_shape=({size}, {size}, {size})")
        + ".\n"
    )


def write_openkbp_demo(
    out_dir: str | os.PathLike[str],
    n_train: int = 6,
    n_val: int = 2,
    seed: int = 0,
    size: int = 128,
    overwrite: bool = False,
) -> Path:
    """Write a small synthetic dataset in the OpenKBP challenge's layout, with a README.txt saying it is synthetic.

    Layout: ``out_dir/README.txt`` and ``out_dir/provided-data/{train-pats,validation-pats}/pt_<k>/*.csv`` with
    patients ``pt_1 .. pt_<n_train>`` for training and the next ``n_val`` for validation (ids are unique across splits,
    as in the challenge). The second training patient lacks ``LeftParotid.csv``. The README is written last and
    records the parameters: a later call with the same parameters returns at once.

    Args:
        out_dir: the output folder.
        n_train: training patients (at least 2, so that one of them lacks a structure file).
        n_val: validation patients.
        seed: seed of the phantoms' variations.
        size: grid side; the challenge's format is 128 (a reader needs ``grid_shape=(size,) * 3`` otherwise).
        overwrite: rewrite even when a demo with the same parameters is there.

    Returns:
        the ``provided-data`` folder.

    Raises:
        FileExistsError: when ``out_dir/provided-data`` exists and is not a demo written by this function.
        ValueError: for fewer than 2 training patients, a negative ``n_val`` or a grid below 16.

    Example:
        >>> import tempfile
        >>> root = write_openkbp_demo(tempfile.mkdtemp(), n_train=2, n_val=1, size=32)
        >>> sorted(p.name for p in (root / "train-pats").iterdir())
        ['pt_1', 'pt_2']
    """
    if n_train < 2 or n_val < 0:
        raise ValueError(f"need n_train >= 2 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    out = Path(out_dir)
    provided = out / "provided-data"
    readme = out / _README
    text = _readme(n_train, n_val, seed, size)
    previous = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if previous == text and not overwrite:
        return provided
    if provided.exists():
        if not previous.startswith(_MARK):
            raise FileExistsError(f"{provided}: exists and is not a ctan_monai synthetic demo; not overwriting it")
        readme.unlink()  # the folder is incomplete until the README is written again
        shutil.rmtree(provided)
    splits = [("train-pats", k) for k in range(1, n_train + 1)]
    splits += [("validation-pats", k) for k in range(n_train + 1, n_train + n_val + 1)]
    for split, number in splits:
        rng = np.random.default_rng([seed, number])
        missing = ("LeftParotid",) if number == 2 else ()
        patient = synthetic_openkbp_patient(f"pt_{number}", rng, size, structures_missing=missing)
        write_patient(patient, provided / split / patient.id)
    atomic_write_text(readme, text)
    return provided
