"""Figures of a comparison: learning curves per architecture (mean over seeds) and bars of each reported metric, with
the training-split floor as a dashed reference line in both."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: comparisons run on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ctan_monai.compare.spec import ComparisonSpec  # noqa: E402
from ctan_monai.engines.figures import draw_floor_lines, split_floor_keys  # noqa: E402
from ctan_monai.utils.atomic import atomic_path  # noqa: E402

__all__ = ["bar_axis_limits", "plot_learning_curves", "plot_metric_bars"]


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_learning_curves(
    run_dirs: Mapping[str, Sequence[Path]], keys: Sequence[str], path: str | os.PathLike[str]
) -> Figure | None:
    """One panel per history key, one line per architecture (mean over its seeds, shaded min..max), and in each panel
    the training-split floor of its metric (``val_floor_mean_dice`` in ``val_mean_dice``) as a dashed line labelled
    ``floor``: the latest value of each run, mean over the runs. Floor keys in ``keys`` get no panel of their own.

    Args:
        run_dirs: architecture to its runs' folders (each with ``metrics_history.json``).
        keys: history keys to draw (``train_loss_seg``, ``val_mean_dice``, ...); absent keys are skipped.
        path: the PNG to write.

    Returns:
        the figure written (closed: inspect its axes), or None when no run has any of the keys.

    Example:
        >>> fig = plot_learning_curves({"stl": [Path("runs/stl_seed0")]}, ["val_mean_dice"], "lc.png")  # doctest: +SKIP
    """
    histories = {
        arch: [
            json.loads((d / "metrics_history.json").read_text()) for d in dirs if (d / "metrics_history.json").is_file()
        ]
        for arch, dirs in run_dirs.items()
    }
    every_key = {k for hs in histories.values() for h in hs for k in h}
    present, _ = split_floor_keys(k for k in keys if k in every_key)
    if not present:
        return None
    _, floor_keys = split_floor_keys([*present, *sorted(k for k in every_key if k not in present)])
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], present):
        for arch, hs in histories.items():
            series = [dict((int(e), float(v)) for e, v in h[key]) for h in hs if key in h]
            if not series:
                continue
            epochs = sorted(set().union(*series))
            values = np.array([[s.get(e, math.nan) for e in epochs] for s in series])
            ax.plot(epochs, np.nanmean(values, axis=0), marker="o", ms=3, label=arch.upper())
            if len(series) > 1:
                ax.fill_between(epochs, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.2)
        floors = [
            (label, _mean_latest([h[name] for hs in histories.values() for h in hs if h.get(name)]))
            for name, (panel, label) in floor_keys.items()
            if panel == key
        ]
        draw_floor_lines(ax, floors)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, path)
    return fig


def _mean_latest(series: Sequence[Sequence[Sequence[float]]]) -> float:
    """The mean over runs of each run's value at its latest epoch (NaN when none is finite)."""
    latest = [float(max(points, key=lambda p: p[0])[1]) for points in series if points]
    finite = [v for v in latest if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def bar_axis_limits(means: Sequence[float], stds: Sequence[float]) -> tuple[float, float] | None:
    """The value axis of a bar panel: zoomed in on the bars (the differences of interest are small next to the values)
    yet showing every error bar whole, so that the seed spread is never cut off.

    Args:
        means: the bars' heights (NaN for a missing value).
        stds: their error bars (NaN for none, e.g. one seed).

    Returns:
        ``(low, high)``, or None when no mean is finite. ``low`` is not below 0 for non-negative values.

    Example:
        >>> [round(v, 2) for v in bar_axis_limits([13.1, 13.8], [3.3, 1.2])]
        [8.81, 17.39]
    """
    bars = [(m, s if math.isfinite(s) else 0.0) for m, s in zip(means, stds) if math.isfinite(m)]
    if not bars:
        return None
    low, high = min(m - s for m, s in bars), max(m + s for m, s in bars)
    pad = max((high - low) * 0.15, abs(high) * 0.02, 1e-6)
    floor = 0.0 if min(m for m, _ in bars) >= 0 else -math.inf
    return max(floor, low - pad), high + pad


def plot_metric_bars(
    rows: Sequence[Mapping[str, Any]],
    spec: ComparisonSpec,
    path: str | os.PathLike[str],
    floor: Mapping[str, Any] | None = None,
) -> Figure:
    """One panel per reported metric (each task's metric, then its extra metrics): the mean over seeds per
    architecture, with the std as error bar, and the floor as a dashed horizontal line labelled ``floor`` (kept in
    view).

    Args:
        rows: output of :func:`ctan_monai.compare.table.summarise`.
        spec: the bundle's comparison settings.
        path: the PNG to write.
        floor: output of :func:`ctan_monai.compare.table.summarise_floor`, or None for no floor lines.

    Returns:
        the figure written (closed: inspect its axes).

    Example:
        >>> fig = plot_metric_bars(rows, spec, "metrics.png", floor)  # doctest: +SKIP
    """
    metrics = spec.reported_metrics
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    ordered = sorted(
        rows,
        key=lambda r: (
            ["stl", "hps", "mtan", "ctan"].index(r["arch"]) if r["arch"] in ("stl", "hps", "mtan", "ctan") else 9
        ),
    )
    for ax, metric in zip(axes[0], metrics):
        cells = [r["extra"].get(metric.key, {}) if metric.is_extra else r["tasks"][metric.task] for r in ordered]
        names = [r["arch"].upper() for r in ordered]
        means = [c.get("mean", math.nan) for c in cells]
        stds = [c.get("std", math.nan) for c in cells]
        ax.bar(names, means, yerr=stds, capsize=4, color=plt.cm.tab10(np.arange(len(names))))
        entry = (floor or {}).get("metrics", {}).get(metric.key, {})
        floor_value = float(entry.get("mean", math.nan))
        drawn = draw_floor_lines(ax, [("floor", floor_value)])
        limits = bar_axis_limits([*means, floor_value] if drawn else means, [*stds, math.nan] if drawn else stds)
        if limits is not None:
            ax.set_ylim(*limits)
        arrow = "higher is better" if metric.higher_is_better else "lower is better"
        ax.set_title(f"{metric.task}: {metric.label}\n({arrow})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return fig
