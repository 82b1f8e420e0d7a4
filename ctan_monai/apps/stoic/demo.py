"""Synthetic STOIC demo data: chest CT phantoms in the STOIC2021 on-disk layout (.mha + reference.csv).

Each phantom has air around a body (soft tissue with a fat rim), two lungs (about -850 HU) that narrow towards the
apex, a heart, a spine and a scanner table below the body. COVID-19 cases carry a few ground-glass patches
(about -500 HU) inside the lungs; severe cases carry more and larger ones (severe implies COVID-19); negative cases
may carry a small solid nodule, so that "any lesion" is not the answer. Some cases have an empty probSevere (an
unknown severity, a missing label). Everything written is labelled synthetic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctan_monai.utils.atomic import atomic_path, atomic_write_text

__all__ = ["make_chest_phantom", "write_stoic_demo"]

# (number of ground-glass patches, radius range in mm) per class: negative, COVID-19, severe.
_PATCHES = {0: (0, (0.0, 0.0)), 1: (3, (10.0, 18.0)), 2: (9, (16.0, 28.0))}

_README = """SYNTHETIC DATA - NOT REAL PATIENTS

Written by ctan_monai.apps.stoic.demo.write_stoic_demo (n_patients={n}, seed={seed}) to exercise the STOIC2021
readers and the ctan_stoic bundle on a laptop. Layout and formats are those of STOIC2021:
  data/mha/<PatientID>.mha     int16 chest CT phantoms in Hounsfield units, spacing {spacing} mm (x, y, z)
  metadata/reference.csv       PatientID,probCOVID,probSevere (1/0; an empty probSevere is an unknown severity)
Phantoms: body, two lungs (~-850 HU), heart, spine, table. COVID-19 cases have ground-glass patches (~-500 HU) in
the lungs; severe cases (always COVID-19 positive) have more and larger ones. Nothing here is medical data.
"""


def make_chest_phantom(
    shape: Sequence[int] = (48, 96, 96),
    spacing: Sequence[float] = (3.5, 3.5, 5.0),
    n_patches: int = 0,
    patch_radius_mm: tuple[float, float] = (10.0, 18.0),
    nodule: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic chest CT phantom.

    Args:
        shape: array shape ``(z, y, x)``; rows run anterior to posterior, slices inferior to superior.
        spacing: voxel size in mm, ``(x, y, z)`` as SimpleITK orders it.
        n_patches: ground-glass patches (about -500 HU) placed inside the lungs.
        patch_radius_mm: range of the patches' radii.
        nodule: add one small solid nodule (about 30 HU) in a lung.
        rng: random generator (patch places, sizes, noise); a fresh default one when ``None``.

    Returns:
        ``(hu, lungs)``: int16 HU ``[z, y, x]`` and the phantom's bool lung mask (ground-glass included).

    Example:
        >>> hu, lungs = make_chest_phantom(rng=np.random.default_rng(0))
        >>> hu.shape, bool(-900 < hu[lungs].mean() < -800)
        ((48, 96, 96), True)
    """
    rng = np.random.default_rng() if rng is None else rng
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        np.linspace(0.0, 1.0, nz), np.linspace(-1.0, 1.0, ny), np.linspace(-1.0, 1.0, nx), indexing="ij"
    )
    hu = np.full(shape, -1000.0)
    body = (x / 0.85) ** 2 + (y / 0.6) ** 2 <= 1.0
    hu[body] = -100.0  # subcutaneous fat rim
    hu[(x / 0.78) ** 2 + (y / 0.53) ** 2 <= 1.0] = 40.0
    hu[(np.abs(y - 0.71) <= 0.03) & (np.abs(x) <= 0.9)] = 150.0  # scanner table, an air gap below the body
    # Lungs from 12 % to 90 % of the axial extent, narrowing to the base and apex.
    t = np.clip((z - 0.12) / 0.78, 0.0, 1.0)
    profile = (4.0 * t * (1.0 - t)) ** 0.35
    heart = ((x - 0.1) / 0.22) ** 2 + ((y + 0.12) / 0.25) ** 2 + ((z - 0.35) / 0.2) ** 2 <= 1.0
    lungs = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        lungs |= ((x - 0.4 * side) / 0.28) ** 2 + ((y + 0.03) / 0.4) ** 2 <= profile**2
    lungs &= ~heart & (profile > 0.05)
    hu[lungs] = -850.0
    hu[heart] = 45.0
    spine = x**2 + (y - 0.4) ** 2
    hu[spine <= 0.12**2] = 700.0
    hu[spine <= 0.09**2] = 300.0
    size_mm = np.array(shape) * np.array(spacing[::-1])
    grid_mm = np.stack([z * size_mm[0], (y + 1) * size_mm[1] / 2, (x + 1) * size_mm[2] / 2])
    lung_points = np.argwhere(lungs)
    for _ in range(n_patches):
        centre = grid_mm[(slice(None), *lung_points[rng.integers(len(lung_points))])]
        radius = rng.uniform(*patch_radius_mm)
        blob = ((grid_mm - centre[:, None, None, None]) ** 2).sum(axis=0) <= radius**2
        hu[blob & lungs] = -500.0
    if nodule:
        centre = grid_mm[(slice(None), *lung_points[rng.integers(len(lung_points))])]
        hu[(((grid_mm - centre[:, None, None, None]) ** 2).sum(axis=0) <= 6.0**2) & lungs] = 30.0
    hu += rng.normal(0.0, 15.0, size=shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), lungs


def _assign_classes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class per patient (0 negative, 1 COVID-19, 2 severe) and which ones lose their severity label."""
    n_severe = max(1, round(0.25 * n))
    n_covid = max(1, round(0.35 * n))
    classes = np.array([2] * n_severe + [1] * n_covid + [0] * (n - n_severe - n_covid))
    rng.shuffle(classes)
    # A quarter of the severity labels go missing, taken in turn from each class while it keeps two labelled.
    missing = np.zeros(n, bool)
    for k in range(n // 4):
        for cls in np.roll([0, 1, 2], -k):
            labelled = np.flatnonzero((classes == cls) & ~missing)
            if len(labelled) >= 2:
                missing[labelled[0]] = True
                break
    return classes, missing


def write_stoic_demo(
    out_dir: str | os.PathLike[str],
    n_patients: int = 12,
    seed: int = 0,
    shape: Sequence[int] = (48, 96, 96),
    spacing: Sequence[float] = (3.5, 3.5, 5.0),
) -> Path:
    """Write a synthetic STOIC dataset: ``data/mha/<id>.mha``, ``metadata/reference.csv`` and ``README.txt``.

    Args:
        out_dir: the dataset folder to create (existing files of the same names are replaced, atomically).
        n_patients: number of patients (>= 3: at least one negative, one COVID-19, one severe).
        seed: makes the whole dataset reproducible.
        shape: volume shape ``(z, y, x)``.
        spacing: voxel size in mm ``(x, y, z)``.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: when ``n_patients`` < 3.

    Example:
        >>> root = write_stoic_demo("/tmp/stoic-demo", n_patients=6)  # doctest: +SKIP
        >>> sorted(p.name for p in root.iterdir())  # doctest: +SKIP
        ['README.txt', 'data', 'metadata']
    """
    if n_patients < 3:
        raise ValueError(f"n_patients must be >= 3 (one per class), got {n_patients}")
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(np.arange(1, 10000), size=n_patients, replace=False))
    classes, missing = _assign_classes(n_patients, rng)
    origin = [-0.5 * shape[2] * spacing[0], -0.5 * shape[1] * spacing[1], -float(shape[0] * spacing[2])]
    rows = ["PatientID,probCOVID,probSevere"]
    for index, (case, cls, no_severity) in enumerate(zip(ids, classes, missing)):
        patient_rng = np.random.default_rng([seed, index])
        n_patches, radii = _PATCHES[int(cls)]
        hu, _ = make_chest_phantom(
            shape, spacing, n_patches, radii, nodule=cls == 0 and patient_rng.random() < 0.5, rng=patient_rng
        )
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin(origin)
        with atomic_path(root / "data" / "mha" / f"{case}.mha") as tmp:
            sitk.WriteImage(image, str(tmp), True)
        severe = "" if no_severity else str(int(cls == 2))
        rows.append(f"{case},{int(cls >= 1)},{severe}")
    atomic_write_text(root / "metadata" / "reference.csv", "\n".join(rows) + "\n")
    atomic_write_text(root / "README.txt", _README.format(n=n_patients, seed=seed, spacing=tuple(spacing)))
    return root
