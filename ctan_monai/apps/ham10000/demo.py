"""Synthetic HAM10000 demo data in the official on-disk layout (clearly labelled synthetic: no patient data).

The writer produces what :mod:`ctan_monai.apps.ham10000` reads: ``HAM10000_metadata.csv`` with the real columns,
JPEG images split across ``HAM10000_images_part_1`` and ``HAM10000_images_part_2``, and binary 0/255 PNG masks at
600x450 in ``HAM10000_segmentations_lesion_tschandl`` (the images are 200x150, as in the mirror the project tests
on, so the reader's resampling to one grid is exercised). Several images show the same lesion for some lesions.

The lesions are drawn so that the two tasks are learnable and related: the diagnosis sets the lesion's size,
border irregularity, elongation, edge sharpness, colour and texture (e.g. ``mel`` large, dark, irregular, with
blue-grey patches; ``nv`` round, uniform brown with a faint network; ``vasc`` small, red-purple with lacunae;
``df`` small with a white central patch; ``bcc`` pink with red branching vessels; ``akiec`` red-pink with white
scale; ``bkl`` light brown, elongated, sharply bordered and mottled), so the segmentation features help the
diagnosis. Ids are ``ISIC_9xxxxxx`` / ``HAM_9xxxxxx`` (outside the real ranges) and ``dx_type`` is ``synthetic``.

Example:
    >>> import tempfile
    >>> root = write_ham10000_demo(tempfile.mkdtemp(), n_images=14, seed=0)
    >>> (root / "HAM10000_metadata.csv").is_file()
    True
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ctan_monai.apps.ham10000.validation import HAM10000_CLASSES, MASK_DIR, MASK_SUFFIX, METADATA_FILE
from ctan_monai.utils.atomic import atomic_path, atomic_write_text

__all__ = ["write_ham10000_demo"]

MASK_SIZE = (600, 450)  # (width, height), as the published masks
IMAGE_SIZE = (200, 150)  # (width, height), as the mirror's images
RENDER_SIZE = (300, 225)  # (width, height) the colour image is drawn at, before down-sampling to IMAGE_SIZE
_OUTLINE_STEPS = 1024
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "neck", "scalp")
# Relative class frequencies of the demo: imbalanced like HAM10000 (nv most frequent) but every class well present.
CLASS_SHARES = {"akiec": 1.0, "bcc": 1.0, "bkl": 1.5, "df": 1.0, "mel": 1.5, "nv": 3.0, "vasc": 1.0}
_SKIN = np.array([0.86, 0.68, 0.58], dtype=np.float32)


@dataclass(frozen=True)
class _LesionStyle:
    """How a diagnosis looks: colour (RGB in [0, 1]), size and shape of the outline, edge and texture."""

    colour: tuple[float, float, float]
    radius: float  # mean radius as a fraction of the mask height
    irregularity: float  # total amplitude of the outline's harmonics
    elongation: float  # ratio of the long to the short axis
    edge: float  # width of the blended rim, as a fraction of the radius
    mean_age: float


_STYLES: dict[str, _LesionStyle] = {
    "akiec": _LesionStyle((0.80, 0.45, 0.42), 0.22, 0.12, 1.3, 0.06, 70),
    "bcc": _LesionStyle((0.87, 0.63, 0.63), 0.20, 0.06, 1.2, 0.08, 67),
    "bkl": _LesionStyle((0.62, 0.46, 0.32), 0.24, 0.05, 1.6, 0.015, 62),
    "df": _LesionStyle((0.62, 0.45, 0.35), 0.13, 0.03, 1.1, 0.12, 45),
    "mel": _LesionStyle((0.28, 0.17, 0.12), 0.30, 0.22, 1.3, 0.04, 60),
    "nv": _LesionStyle((0.48, 0.32, 0.22), 0.20, 0.02, 1.1, 0.10, 45),
    "vasc": _LesionStyle((0.62, 0.16, 0.28), 0.12, 0.04, 1.1, 0.03, 50),
}


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise of ``size`` (width, height): a coarse grid up-sampled bicubically."""
    coarse = Image.fromarray(rng.standard_normal((cells[1], cells[0])).astype(np.float32))
    field = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _blend(base: np.ndarray, colour: Any, weight: np.ndarray) -> np.ndarray:
    """Blend ``colour`` into the RGB ``base`` with a per-pixel ``weight`` in [0, 1]."""
    w = np.clip(weight, 0.0, 1.0)[..., None]
    return base * (1 - w) + np.asarray(colour, dtype=np.float32) * w


def _draw_lines(
    rng: np.random.Generator, size: tuple[int, int], starts: np.ndarray, steps: int, step: float, width: int
) -> np.ndarray:
    """A 0/1 map of wiggly polylines (vessels, hairs) from ``starts``, of ``size`` (width, height)."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for x, y in starts:
        heading = rng.uniform(0, 2 * math.pi)
        points = [(float(x), float(y))]
        for _ in range(steps):
            heading += rng.normal(0, 0.4)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            points.append((float(x), float(y)))
        draw.line(points, fill=255, width=width)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _lesion_shape(rng: np.random.Generator, style: _LesionStyle) -> dict[str, Any]:
    """Parameters fixed for one lesion (all its images): outline, orientation, size, colour."""
    orders = np.arange(2, 8)
    amplitudes = rng.dirichlet(np.ones(len(orders))) * style.irregularity
    phases = rng.uniform(0, 2 * math.pi, len(orders))
    # The outline's relative radius over _OUTLINE_STEPS angles in [-pi, pi], looked up per pixel later.
    angles = np.linspace(-math.pi, math.pi, _OUTLINE_STEPS, endpoint=False)
    outline = 1 + (amplitudes[:, None] * np.cos(orders[:, None] * angles + phases[:, None])).sum(axis=0)
    return {
        "outline": outline.astype(np.float32),
        "angle": rng.uniform(0, math.pi),
        "radius": style.radius * rng.uniform(0.85, 1.15),
        "colour": np.clip(np.asarray(style.colour) * rng.uniform(0.92, 1.08, 3), 0, 1).astype(np.float32),
    }


def _geometry(
    size: tuple[int, int], pose: tuple[float, float, float, float], lesion: dict[str, Any], style: _LesionStyle
) -> tuple[np.ndarray, np.ndarray]:
    """Long-axis coordinate ``u`` and normalised radius ``d`` (< 1 inside the lesion) on a grid of ``size``.

    ``pose`` is (centre x, centre y, angle, radius in pixels), in the pixel units of the mask grid; a coarser
    ``size`` samples the same lesion at pixel centres.
    """
    width, height = size
    step = MASK_SIZE[0] / width
    ys = (np.arange(height, dtype=np.float32) + 0.5) * step - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) * step - 0.5
    centre_x, centre_y, angle, radius = pose
    dx_, dy_ = xs[None, :] - centre_x, ys[:, None] - centre_y
    u = dx_ * math.cos(angle) + dy_ * math.sin(angle)
    v = (-dx_ * math.sin(angle) + dy_ * math.cos(angle)) * style.elongation
    theta = np.arctan2(v, u)
    index = ((theta + math.pi) * (_OUTLINE_STEPS / (2 * math.pi))).astype(np.int64) % _OUTLINE_STEPS
    d = np.hypot(u, v) / (radius * lesion["outline"][index])
    return u, d


def _render(rng: np.random.Generator, dx: str, lesion: dict[str, Any]) -> tuple[Image.Image, Image.Image]:
    """One dermatoscopic-looking image (200x150 RGB) and its lesion mask (600x450, 0/255) of ``lesion``.

    The colour image is drawn at half the mask's resolution (then down-sampled to 200x150), the mask at full
    resolution from the same outline, so that image and mask agree.
    """
    style = _STYLES[dx]
    width, height = RENDER_SIZE
    scale = RENDER_SIZE[0] / MASK_SIZE[0]
    pose = (
        MASK_SIZE[0] * (0.5 + rng.uniform(-0.06, 0.06)),
        MASK_SIZE[1] * (0.5 + rng.uniform(-0.06, 0.06)),
        lesion["angle"] + rng.normal(0, 0.3),
        lesion["radius"] * MASK_SIZE[1] * rng.uniform(0.92, 1.08),
    )
    u, d = _geometry(RENDER_SIZE, pose, lesion, style)
    _, d_mask = _geometry(MASK_SIZE, pose, lesion, style)

    # Skin with mottled tone and the dark rim of a dermatoscope's field of view.
    skin = _SKIN * rng.uniform(0.9, 1.05, 3).astype(np.float32)
    image = skin * (1 + 0.04 * _smooth_noise(rng, (8, 6), RENDER_SIZE))[..., None]
    ys, xs = np.ogrid[0:height, 0:width]
    rim = np.hypot((xs - width / 2) / (width / 2), (ys - height / 2) / (height / 2))
    image *= np.clip(1.25 - 0.6 * rim**2, 0.3, 1.0)[..., None]

    # Lesion colour and the texture that belongs to the diagnosis.
    colour = lesion["colour"]
    lesion_rgb = np.broadcast_to(colour, image.shape).copy()
    lesion_rgb *= (1 + 0.05 * _smooth_noise(rng, (20, 15), RENDER_SIZE))[..., None]
    if dx == "nv":  # uniform brown, darker centre, faint pigment network
        lesion_rgb *= (0.9 + 0.1 * np.minimum(d, 1))[..., None]
        network = np.abs(_smooth_noise(rng, (60, 45), RENDER_SIZE)) < 0.25
        lesion_rgb = _blend(lesion_rgb, colour * 0.75, network * 0.6)
    elif dx == "mel":  # dark, multicoloured, asymmetric: a brown side, blue-grey veil, black dots
        lesion_rgb = _blend(lesion_rgb, (0.45, 0.30, 0.22), 0.5 + 0.5 * np.tanh(u * scale / 40))
        lesion_rgb = _blend(lesion_rgb, (0.38, 0.42, 0.55), _smooth_noise(rng, (10, 8), RENDER_SIZE) - 0.3)
        lesion_rgb = _blend(lesion_rgb, (0.05, 0.04, 0.04), (_smooth_noise(rng, (80, 60), RENDER_SIZE) > 1.8) * 1.0)
    elif dx == "bkl":  # waxy, mottled ("cerebriform") light brown, milia-like white spots
        lesion_rgb *= (1 + 0.15 * _smooth_noise(rng, (30, 22), RENDER_SIZE))[..., None]
        lesion_rgb = _blend(lesion_rgb, (0.92, 0.88, 0.80), (_smooth_noise(rng, (70, 52), RENDER_SIZE) > 2.0) * 1.0)
    elif dx == "df":  # light brown ring around a white, scar-like centre
        lesion_rgb = _blend(lesion_rgb, (0.93, 0.88, 0.84), np.clip((0.5 - d) / 0.15, 0, 1))
    elif dx == "bcc":  # pink, translucent, red branching (arborising) vessels
        centre = np.array(pose[:2]) * scale
        starts = centre + rng.normal(0, 15, (4, 2))
        vessels = _draw_lines(rng, RENDER_SIZE, starts, steps=12, step=4.5, width=2)
        lesion_rgb = _blend(lesion_rgb, (0.70, 0.08, 0.12), vessels * 0.9)
    elif dx == "akiec":  # red-pink, rough, with white scale
        lesion_rgb *= (1 + 0.10 * _smooth_noise(rng, (90, 68), RENDER_SIZE))[..., None]
        lesion_rgb = _blend(lesion_rgb, (0.95, 0.92, 0.88), (_smooth_noise(rng, (50, 38), RENDER_SIZE) - 1.2) * 1.5)
    elif dx == "vasc":  # red-purple lacunae separated by lighter septa
        lacunae = _smooth_noise(rng, (40, 30), RENDER_SIZE) > 0.2
        lesion_rgb = _blend(lesion_rgb, (0.40, 0.05, 0.20), lacunae * 0.8)
    alpha = np.clip((1.0 - d) / style.edge + 0.5, 0.0, 1.0)[..., None]
    image = image * (1 - alpha) + lesion_rgb * alpha

    # Hairs are common nuisance; they belong to no class.
    if rng.random() < 0.3:
        starts = rng.uniform((0, 0), (width, height), size=(int(rng.integers(1, 4)), 2))
        hairs = _draw_lines(rng, RENDER_SIZE, starts, steps=20, step=7.5, width=1)
        image = _blend(image, (0.12, 0.08, 0.06), hairs)

    image *= rng.uniform(0.92, 1.05)  # illumination of this photograph
    rgb = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    mask = Image.fromarray((d_mask < 1.0).astype(np.uint8) * 255)
    return rgb.resize(IMAGE_SIZE, Image.Resampling.LANCZOS), mask


def _images_per_class(n_images: int) -> dict[str, int]:
    """One image per class, the rest shared by ``CLASS_SHARES`` with largest-remainder rounding."""
    total = sum(CLASS_SHARES.values())
    exact = {c: (n_images - len(HAM10000_CLASSES)) * CLASS_SHARES[c] / total for c in HAM10000_CLASSES}
    counts = {c: 1 + math.floor(x) for c, x in exact.items()}
    by_remainder = sorted(HAM10000_CLASSES, key=lambda c: -(exact[c] - math.floor(exact[c])))
    for c in by_remainder[: n_images - sum(counts.values())]:
        counts[c] += 1
    return counts


def _group_into_lesions(rng: np.random.Generator, counts: dict[str, int]) -> list[tuple[str, int]]:
    """(dx, number of images) per lesion: mostly one image, some lesions photographed two or three times."""
    lesions: list[tuple[str, int]] = []
    for dx in HAM10000_CLASSES:
        left = counts[dx]
        while left:
            n = min(left, int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.10])))
            lesions.append((dx, n))
            left -= n
    if all(n == 1 for _, n in lesions):  # make sure the demo has a lesion with several images
        dx = max(counts, key=counts.get)
        if counts[dx] >= 2:
            first = next(i for i, (d, _) in enumerate(lesions) if d == dx)
            lesions[first] = (dx, 2)
            del lesions[first + 1]
    return lesions


def _readme(n_images: int, n_lesions: int, counts: dict[str, int], seed: int) -> str:
    table = "\n".join(f"  {dx:<6} {counts[dx]:>4} images" for dx in HAM10000_CLASSES)
    return (
        "SYNTHETIC DATA - NOT HAM10000, NOT DERMATOSCOPIC IMAGES OF ANY PERSON\n\n"
        "Written by ctan_monai.apps.ham10000.demo.write_ham10000_demo "
        f"(n_images={n_images}, seed={seed}) in the layout of the HAM10000 dataset\n"
        "(Tschandl et al., Sci. Data 2018), so that the demo exercises the real reader.\n\n"
        f"{n_images} images of {n_lesions} lesions. Each lesion is a drawn shape whose size, outline, colour and\n"
        "texture depend on its diagnosis (dx), so lesion segmentation and diagnosis are related tasks.\n"
        "Images: 200x150 JPEG in HAM10000_images_part_1/2. Masks: 600x450 PNG (0/255) in\n"
        "HAM10000_segmentations_lesion_tschandl. Ids ISIC_9xxxxxx / HAM_9xxxxxx; dx_type 'synthetic';\n"
        "age, sex and localization are random.\n\n"
        f"Images per class:\n{table}\n\n"
        "Free to use for any purpose; results on it say nothing about performance on real skin lesions.\n"
    )


def write_ham10000_demo(out_dir: str | os.PathLike[str], n_images: int = 70, seed: int = 0) -> Path:
    """Write a small synthetic dataset in the HAM10000 layout; deterministic for a given seed.

    Args:
        out_dir: the dataset folder to write (created; files of a previous demo are overwritten).
        n_images: number of images, at least 7 (every class is present).
        seed: random seed; the same seed writes the same dataset.

    Returns:
        ``out_dir`` as a ``Path`` (pass it as ``dataset_dir`` to :mod:`ctan_monai.apps.ham10000`).

    Raises:
        ValueError: when ``n_images`` < 7.

    Example:
        >>> import tempfile
        >>> from ctan_monai.apps.ham10000 import build_datalist
        >>> len(build_datalist(write_ham10000_demo(tempfile.mkdtemp(), n_images=7)))
        7
    """
    if n_images < len(HAM10000_CLASSES):
        raise ValueError(f"n_images must be at least {len(HAM10000_CLASSES)} (one per class), got {n_images}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    counts = _images_per_class(n_images)
    lesions = _group_into_lesions(rng, counts)
    # Image numbers are shuffled so that both image folders hold every class, as in the real archive.
    numbers = iter(rng.permutation(n_images))
    rows: list[dict[str, Any]] = []
    for lesion_index, (dx, n) in enumerate(lesions):
        style = _STYLES[dx]
        shape = _lesion_shape(rng, style)
        age = float(np.clip(5 * round(rng.normal(style.mean_age, 12) / 5), 5, 85))
        sex, site = str(rng.choice(["male", "female"])), str(rng.choice(LOCALIZATIONS))
        for _ in range(n):
            number = int(next(numbers))
            image_id = f"ISIC_{9000000 + number:07d}"
            image, mask = _render(rng, dx, shape)
            folder = IMAGE_DIRS[0] if number < (n_images + 1) // 2 else IMAGE_DIRS[1]
            with atomic_path(out / folder / f"{image_id}.jpg") as tmp:
                image.save(tmp, format="JPEG", quality=92)
            with atomic_path(out / MASK_DIR / f"{image_id}{MASK_SUFFIX}") as tmp:
                mask.save(tmp, format="PNG")
            row = (f"HAM_{9000000 + lesion_index:07d}", image_id, dx, "synthetic", age, sex, site)
            rows.append(dict(zip(METADATA_COLUMNS, row)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METADATA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / METADATA_FILE, buffer.getvalue())
    atomic_write_text(out / "README.txt", _readme(n_images, len(lesions), counts, seed))
    return out
