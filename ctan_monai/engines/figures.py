"""Figures a person would rather look at than read: CT with predicted vs reference dose and contours, DVH curves,
learning curves. Written atomically as PNG."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: bundles run on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ctan_monai.metrics.dose import cumulative_dvh  # noqa: E402
from ctan_monai.utils.atomic import atomic_path  # noqa: E402

__all__ = [
    "FLOOR_INFIX",
    "draw_floor_lines",
    "plot_case_slices",
    "plot_dvh_curves",
    "plot_learning_curves",
    "split_floor_keys",
]

FLOOR_INFIX = "_floor_"
"""What marks a floor metric in ``engine.state.metrics`` and ``metrics_history.json``: ``<prefix>_floor_<metric>``
is the training-split floor of ``<prefix>_<metric>``."""


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


def split_floor_keys(names: Iterable[str]) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """Split metric names into learning-curve panels and floor reference lines.

    A floor metric ``<prefix>_floor_<metric>`` (see :data:`FLOOR_INFIX`) is no panel of its own: it is drawn in the
    panel ``<prefix>_<metric>``, labelled ``floor``; a ``<prefix>_floor_prior_<metric>`` (a class-prior guess) whose
    ``<prefix>_prior_<metric>`` is no panel goes to ``<prefix>_<metric>``, labelled ``floor (prior)``. A floor whose
    metric has no panel is not drawn.

    Args:
        names: metric names in panel order.

    Returns:
        the panel names (every name that is not a floor, in order) and ``{floor name: (panel, label)}``.

    Example:
        >>> split_floor_keys(["val_mean_dice", "val_floor_mean_dice", "val_floor_auc", "val_key_metric"])
        (['val_mean_dice', 'val_key_metric'], {'val_floor_mean_dice': ('val_mean_dice', 'floor')})
    """
    names = list(names)
    panels = [n for n in names if FLOOR_INFIX not in n]
    lines: dict[str, tuple[str, str]] = {}
    for name in names:
        if FLOOR_INFIX not in name:
            continue
        prefix, _, metric = name.partition(FLOOR_INFIX)
        candidates = [(f"{prefix}_{metric}", "floor")]
        if metric.startswith("prior_"):
            candidates.append((f"{prefix}_{metric.removeprefix('prior_')}", "floor (prior)"))
        for panel, label in candidates:
            if panel in panels:
                lines[name] = (panel, label)
                break
    return panels, lines


def draw_floor_lines(ax: Any, floors: Sequence[tuple[str, float]]) -> int:
    """Draw floors as dashed horizontal reference lines in a panel and add them to its legend.

    Args:
        ax: the matplotlib axes.
        floors: ``(label, value)`` pairs; NaN or infinite values are skipped.

    Returns:
        the number of lines drawn.

    Example:
        >>> fig, ax = plt.subplots()
        >>> draw_floor_lines(ax, [("floor", 63.4), ("floor (prior)", float("nan"))])
        1
    """
    drawn = 0
    for index, (label, value) in enumerate(floors):
        if not np.isfinite(value):
            continue
        ax.axhline(value, linestyle="--", linewidth=1.2, color=("0.2", "tab:red", "tab:purple")[index % 3], label=label)
        drawn += 1
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def plot_learning_curves(
    history: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike[str]
) -> Figure | None:
    """One panel per metric: value against epoch; each floor metric (``<prefix>_floor_<metric>``) is drawn as a dashed
    horizontal line labelled ``floor`` in its metric's panel instead of a flat panel of its own
    (:func:`split_floor_keys`), at its latest value.

    Args:
        history: ``{metric_name: [(epoch, value), ...]}``.
        path: PNG file to write.

    Returns:
        the matplotlib figure written (closed: inspect its axes, do not show it), or None when the history is empty.

    Example:
        >>> fig = plot_learning_curves({"val_mean_dice": [(1, 40.0)], "val_floor_mean_dice": [(1, 30.0)]}, "lc.png")
        ... # doctest: +SKIP
        >>> [ax.get_title() for ax in fig.axes]  # doctest: +SKIP
        ['val_mean_dice']
    """
    panels, floors = split_floor_keys(n for n, points in history.items() if points)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.ravel(), panels):
        epochs, values = zip(*history[name])
        ax.plot(epochs, values, marker="o", markersize=3)
        lines = [(label, _latest(history[f])) for f, (panel, label) in floors.items() if panel == name]
        draw_floor_lines(ax, lines)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    _save(fig, path)
    return fig


def _latest(points: Sequence[tuple[int, float]]) -> float:
    """The value at the latest epoch (NaN for none): a floor does not change, but the latest one is what holds."""
    if not points:
        return float("nan")
    return float(max(points, key=lambda p: p[0])[1])
