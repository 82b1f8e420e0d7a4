"""Figures a person would rather look at than read: CT with predicted vs reference dose and contours, DVH curves,
learning curves. Written atomically as PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: bundles run on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ctan_monai.metrics.dose import cumulative_dvh  # noqa: E402
from ctan_monai.utils.atomic import atomic_path  # noqa: E402

__all__ = ["plot_case_slices", "plot_dvh_curves", "plot_learning_curves"]


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def _pick_slices(arrays: Mapping[str, np.ndarray], count: int) -> list[int]:
    """Axial slices (last axis) through the dose (or the labels): the 25th, 50th and 75th percentile slices."""
    weight = arrays.get("ref_dose")
    if weight is None:
        weight = arrays.get("ref_labels")
    if weight is None:
        weight = arrays["image"]
    profile = np.asarray(weight, dtype=np.float64).sum(axis=(0, 1))
    candidates = np.flatnonzero(profile > 0)
    if candidates.size == 0:
        candidates = np.arange(profile.size)
    return [int(candidates[int(q * (candidates.size - 1))]) for q in np.linspace(0.25, 0.75, count)]


def plot_case_slices(
    arrays: Mapping[str, np.ndarray],
    structure_names: Sequence[str],
    path: str | os.PathLike[str],
    num_slices: int = 3,
    title: str = "",
) -> None:
    """Axial slices of one case: CT with reference and predicted contours, reference dose, predicted dose, and the
    dose difference, one row per slice.

    Args:
        arrays: ``image`` and optionally ``ref_labels``, ``pred_labels``, ``ref_dose``, ``pred_dose``, volumes with
            the axial axis last.
        structure_names: names of labels 1..C-1 (legend).
        path: PNG file to write.
        num_slices: number of slices (rows).
        title: figure title.
    """
    slices = _pick_slices(arrays, num_slices)
    has_dose = "ref_dose" in arrays and "pred_dose" in arrays
    columns = 4 if has_dose else 1
    fig, axes = plt.subplots(len(slices), columns, figsize=(3.2 * columns, 3.2 * len(slices)), squeeze=False)
    vmax = float(np.max(arrays["ref_dose"])) if has_dose else 1.0
    colours = plt.cm.tab10(np.arange(max(len(structure_names), 1)) % 10)
    for row, z in enumerate(slices):
        ct = arrays["image"][..., z]
        ax = axes[row, 0]
        ax.imshow(ct, cmap="gray")
        for label, colour in enumerate(colours, start=1):
            for key, style in (("ref_labels", "-"), ("pred_labels", "--")):
                if key in arrays and (arrays[key][..., z] == label).any():
                    ax.contour(arrays[key][..., z] == label, levels=[0.5], colors=[colour], linestyles=style)
        ax.set_title(f"slice {z}: contours (ref -, pred --)", fontsize=8)
        if has_dose:
            for col, (key, name) in enumerate((("ref_dose", "reference dose"), ("pred_dose", "predicted dose")), 1):
                axes[row, col].imshow(ct, cmap="gray")
                shown = axes[row, col].imshow(
                    np.ma.masked_less(arrays[key][..., z], 0.5), cmap="jet", alpha=0.5, vmin=0, vmax=vmax
                )
                axes[row, col].set_title(f"{name} (Gy)", fontsize=8)
            fig.colorbar(shown, ax=axes[row, 2], fraction=0.046)
            diff = arrays["pred_dose"][..., z] - arrays["ref_dose"][..., z]
            limit = max(float(np.abs(diff).max()), 1e-6)
            im = axes[row, 3].imshow(diff, cmap="bwr", vmin=-limit, vmax=limit)
            axes[row, 3].set_title("pred - ref (Gy)", fontsize=8)
            fig.colorbar(im, ax=axes[row, 3], fraction=0.046)
    for ax in axes.ravel():
        ax.axis("off")
    handles = [plt.Line2D([0], [0], color=c, label=n) for n, c in zip(structure_names, colours)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_dvh_curves(
    pred_dose: np.ndarray,
    ref_dose: np.ndarray,
    structures: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
) -> None:
    """Cumulative DVH of every structure: reference (solid) vs prediction (dashed).

    Args:
        pred_dose: predicted dose (Gy).
        ref_dose: reference dose (Gy).
        structures: structure masks on the dose grid.
        path: PNG file to write.
    """
    top = float(max(np.max(pred_dose), np.max(ref_dose)))
    ref = cumulative_dvh(ref_dose, structures, max_dose_gy=top)
    pred = cumulative_dvh(pred_dose, structures, max_dose_gy=top)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(ref["volume_pct"]):
        colour = plt.cm.tab10(i % 10)
        ax.plot(ref["dose_gy"], ref["volume_pct"][name], color=colour, label=name)
        ax.plot(pred["dose_gy"], pred["volume_pct"][name], color=colour, linestyle="--")
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_title("DVH: reference (solid) vs prediction (dashed)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_learning_curves(history: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike[str]) -> None:
    """One panel per metric: value against epoch.

    Args:
        history: ``{metric_name: [(epoch, value), ...]}``.
        path: PNG file to write.
    """
    names = [n for n, points in history.items() if points]
    if not names:
        return
    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.ravel(), names):
        epochs, values = zip(*history[name])
        ax.plot(epochs, values, marker="o", markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    _save(fig, path)
