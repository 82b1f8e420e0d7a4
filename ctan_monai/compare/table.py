"""The comparison table in the paper's Table 2 format: per task M and Delta vs STL, Delta_mean and rank, as mean +- std
over seeds, with a mark on differences larger than the seed noise; the bundle's extra reported metrics (not in Delta);
and a floor row, the trivial predictors built from the training split that every report carries, with a marker on
each method mean that does not beat it."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from ctan_monai.compare.spec import ComparisonSpec, TaskMetric
from ctan_monai.metrics.relative import delta_task

__all__ = [
    "BELOW_FLOOR",
    "ArchSummary",
    "FloorSummary",
    "below_floor",
    "below_floor_messages",
    "format_markdown",
    "summarise",
    "summarise_floor",
    "to_csv",
]

ArchSummary = dict[str, Any]
FloorSummary = dict[str, Any]

BELOW_FLOOR = "(below floor)"
"""The marker on a method's mean that does not beat the floor."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    # one value has no spread: NaN, printed as no "± ..." rather than a misleading "± 0.00"
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else float("nan"))


def summarise(
    records: Sequence[Mapping[str, Any]],
    spec: ComparisonSpec,
    baseline: str = "stl",
    floor: FloorSummary | None = None,
) -> list[ArchSummary]:
    """Aggregate finished runs into one row per architecture.

    Delta (paper Eq. 3) is computed per seed against the baseline run of the same seed, then averaged, so its std is
    the seed-to-seed spread of the paired difference. A difference to the baseline *exceeds the seed noise* when the
    means differ by more than two standard errors of the difference (``2 * sqrt(s_a^2 / n_a + s_b^2 / n_b)``), with
    at least two seeds on each side: a screening rule over seeds only, not a significance test.

    Args:
        records: finished run records (``arch``, ``seed``, ``metrics``; optionally ``extra_metrics``).
        spec: the bundle's comparison settings (tasks, directions, extra metrics).
        baseline: the architecture Delta refers to.
        floor: output of :func:`summarise_floor`: each metric cell then says whether the method's mean falls below it.

    Returns:
        rows in ranked order (best Delta_mean first; the baseline has Delta 0): ``arch``, ``n_seeds``, per task
        ``mean``/``std``/``delta_mean``/``delta_std``/``beyond_noise``/``below_floor``, per extra metric (``extra``)
        ``mean``/``std``/``below_floor``, ``delta_mean``/``delta_mean_std`` over tasks, ``rank``, and ``train_s``
        (mean training time). ``below_floor`` is True when the mean does not beat the floor, None when either is
        undefined or there is no floor.

    Raises:
        ValueError: when no run of the baseline finished (Delta needs it).

    Example:
        >>> rows = summarise(records, spec, floor=summarise_floor(records, spec))  # doctest: +SKIP
        >>> rows[0]["tasks"]["seg"]["below_floor"]  # doctest: +SKIP
        False
    """
    by_arch: dict[str, dict[int, Mapping[str, Any]]] = {}
    for record in records:
        by_arch.setdefault(record["arch"], {})[int(record["seed"])] = record
    if baseline not in by_arch:
        raise ValueError(f"no finished {baseline!r} run: Delta (Eq. 3) is relative to it")
    base_runs = by_arch[baseline]
    rows: list[ArchSummary] = []
    for arch, runs in by_arch.items():
        row: ArchSummary = {"arch": arch, "n_seeds": len(runs), "seeds": sorted(runs), "tasks": {}, "extra": {}}
        per_seed_delta_mean: list[float] = []
        deltas_by_seed: dict[int, dict[str, float]] = {}
        for metric in spec.metrics:
            values = [float(r["metrics"][metric.task]) for r in runs.values()]
            base_values = [float(r["metrics"][metric.task]) for r in base_runs.values()]
            mean, std = _mean_std(values)
            base_mean, base_std = _mean_std(base_values)
            paired = [
                _delta_or_nan(runs[s]["metrics"][metric.task], base_runs[s]["metrics"][metric.task], metric)
                for s in sorted(runs)
                if s in base_runs
            ]
            for s, d in zip([s for s in sorted(runs) if s in base_runs], paired):
                deltas_by_seed.setdefault(s, {})[metric.task] = d
            d_mean, d_std = _mean_std(paired) if paired else (float("nan"), float("nan"))
            noise = math.sqrt(std**2 / len(values) + base_std**2 / len(base_values))
            enough = len(values) >= 2 and len(base_values) >= 2 and arch != baseline
            row["tasks"][metric.task] = {
                "mean": mean,
                "std": std,
                "delta_mean": d_mean,
                "delta_std": d_std,
                "beyond_noise": bool(enough and abs(mean - base_mean) > 2 * noise),
                "below_floor": below_floor(mean, _floor_mean(floor, metric.key), metric.higher_is_better),
            }
        for metric in spec.extra_metrics:
            values = [float((r.get("extra_metrics") or {}).get(metric.key, float("nan"))) for r in runs.values()]
            mean, std = _mean_std(values)
            row["extra"][metric.key] = {
                "mean": mean,
                "std": std,
                "below_floor": below_floor(mean, _floor_mean(floor, metric.key), metric.higher_is_better),
            }
        for deltas in deltas_by_seed.values():
            if len(deltas) == len(spec.metrics):
                per_seed_delta_mean.append(statistics.fmean(deltas.values()))
        row["delta_mean"], row["delta_mean_std"] = _mean_std(per_seed_delta_mean)
        times = [float(r.get("timings", {}).get("train_s", float("nan"))) for r in runs.values()]
        row["train_s"] = _mean_std(times)[0]
        rows.append(row)
    rows.sort(key=lambda r: -r["delta_mean"] if not math.isnan(r["delta_mean"]) else math.inf)
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def summarise_floor(
    records: Sequence[Mapping[str, Any]], spec: ComparisonSpec, rel_tol: float = 1e-6
) -> FloorSummary | None:
    """The table's floor row, from the floors that the runs' reports carry (the trivial predictors built from the
    training split, scored on the same cases as the model).

    The floor depends on the split only, so every run of one split has the same one: when all runs agree, that is the
    floor (no spread). When they differ, the floor is the mean over seeds of each seed's floor (std over seeds), and
    a warning says so: between seeds the splits differ; within one seed runs should never differ (the warning names
    the seed).

    Args:
        records: finished run records, with ``floor`` (``{metric key: value or None}``, see
            :func:`ctan_monai.compare.runner.report_values`).
        spec: the bundle's comparison settings (the metrics and their floors).
        rel_tol: relative tolerance under which two runs' floors count as the same.

    Returns:
        ``{"label", "metrics": {key: {"mean", "std", "n_runs", "n_seeds", "agree"}}, "warnings": [...]}``, or None
        when no run's report has a floor (runs evaluated before floors were reported, or a spec without
        ``floor_path``). A metric without any floor value has a NaN mean and ``n_runs`` 0.

    Example:
        >>> floor = summarise_floor(records, spec)  # doctest: +SKIP
        >>> floor["metrics"]["seg"]["mean"]  # doctest: +SKIP
        63.35
    """
    metrics: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for metric in spec.reported_metrics:
        by_seed: dict[int, list[float]] = {}
        for record in records:
            value = (record.get("floor") or {}).get(metric.key)
            if value is not None and not math.isnan(float(value)):
                by_seed.setdefault(int(record["seed"]), []).append(float(value))
        values = [v for seed_values in by_seed.values() for v in seed_values]
        entry: dict[str, Any] = {"n_runs": len(values), "n_seeds": len(by_seed), "agree": True}
        if not values:
            entry.update(mean=float("nan"), std=float("nan"))
        elif all(_same(v, values[0], rel_tol) for v in values):
            entry.update(mean=statistics.fmean(values), std=float("nan"))
        else:
            entry["agree"] = False
            for seed, seed_values in sorted(by_seed.items()):
                if not all(_same(v, seed_values[0], rel_tol) for v in seed_values):
                    warnings.append(
                        f"the floor of {metric.key} differs between the runs of seed {seed} "
                        f"({min(seed_values):.6g} .. {max(seed_values):.6g}): they were not evaluated on the same "
                        "split or training data"
                    )
            per_seed = [statistics.fmean(v) for _, v in sorted(by_seed.items())]
            entry["mean"], entry["std"] = _mean_std(per_seed)
            warnings.append(
                f"the floor of {metric.key} differs between runs ({min(values):.6g} .. {max(values):.6g}; the splits "
                f"differ): the floor row shows the mean over {len(per_seed)} seed(s)"
            )
        metrics[metric.key] = entry
    if not any(entry["n_runs"] for entry in metrics.values()):
        return None
    return {"label": spec.floor_row_label, "metrics": metrics, "warnings": warnings}


def below_floor(mean: float, floor: float, higher_is_better: bool) -> bool | None:
    """Whether a method's mean fails to beat the floor (is not strictly better in the metric's direction).

    Args:
        mean: the method's mean over seeds.
        floor: the floor's value (NaN: none).
        higher_is_better: the metric's direction.

    Returns:
        True when the mean does not beat the floor, False when it does, None when either is undefined (NaN).

    Example:
        >>> below_floor(60.0, 63.4, higher_is_better=True), below_floor(3.0, 5.7, higher_is_better=False)
        (True, False)
    """
    if math.isnan(mean) or math.isnan(floor):
        return None
    return not (mean > floor if higher_is_better else mean < floor)


def below_floor_messages(rows: Sequence[ArchSummary], spec: ComparisonSpec, floor: FloorSummary | None) -> list[str]:
    """One line per (method, metric) whose mean does not beat the floor, for the command's warnings.

    Args:
        rows: output of :func:`summarise` (with ``floor``).
        spec: the bundle's comparison settings.
        floor: output of :func:`summarise_floor`; None gives no messages.

    Returns:
        the messages, in table order.

    Example:
        >>> below_floor_messages(rows, spec, floor)  # doctest: +SKIP
        ['HPS does not beat the training-split floor on seg: Dice (%): mean 60.00 vs floor 63.35 (higher is better)']
    """
    if floor is None:
        return []
    messages = []
    for row in rows:
        for metric in spec.reported_metrics:
            cell = _cell(row, metric)
            if cell.get("below_floor"):
                messages.append(
                    f"{row['arch'].upper()} does not beat the training-split floor on {metric.task}: {metric.label}: "
                    f"mean {cell['mean']:.2f} vs floor {floor['metrics'][metric.key]['mean']:.2f} "
                    f"({'higher' if metric.higher_is_better else 'lower'} is better)"
                )
    return messages


def _same(value: float, other: float, rel_tol: float) -> bool:
    return math.isclose(value, other, rel_tol=rel_tol, abs_tol=1e-9)


def _floor_mean(floor: FloorSummary | None, key: str) -> float:
    if floor is None or key not in floor["metrics"]:
        return float("nan")
    return float(floor["metrics"][key]["mean"])


def _cell(row: ArchSummary, metric: TaskMetric) -> dict[str, Any]:
    """A row's summary of one reported metric (a task metric or an extra one)."""
    return row["extra"].get(metric.key, {}) if metric.is_extra else row["tasks"][metric.task]


def _delta_or_nan(value: float, base: float, metric: Any) -> float:
    """Delta (Eq. 3), or NaN where it is undefined (an STL metric of 0, e.g. a Dice of 0 after a short budget)."""
    try:
        return delta_task(value, base, metric.higher_is_better)
    except ValueError:
        return float("nan")


def _pm(mean: float, std: float, digits: int, signed: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    sign = "+" if signed else ""
    if math.isnan(std):
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def format_markdown(
    rows: Sequence[ArchSummary], spec: ComparisonSpec, baseline: str = "stl", floor: FloorSummary | None = None
) -> str:
    """The table as Markdown: one row per architecture, ranked (``*`` marks a difference beyond seed noise, ``(below
    floor)`` a mean that does not beat the floor), then the floor row when there is a floor.

    Each task has its M and Delta columns, followed by the columns of its extra metrics (M only: Delta is the
    paper's Eq. 3 over the task metrics). The floor row has M only (``—`` for Delta, rank and time).

    Args:
        rows: output of :func:`summarise`.
        spec: the bundle's comparison settings.
        baseline: the Delta baseline (its Delta cells are left empty).
        floor: output of :func:`summarise_floor`, or None for no floor row.

    Returns:
        the Markdown text.

    Example:
        >>> print(format_markdown(rows, spec, floor=floor))  # doctest: +SKIP
        | Method | seeds | seg: Dice (%) ↑ | Δ seg (%) ↑ | ...
    """
    header = ["Method", "seeds"]
    for metric in spec.reported_metrics:
        arrow = "↑" if metric.higher_is_better else "↓"
        header.append(f"{metric.task}: {metric.label} {arrow}")
        if not metric.is_extra:
            header.append(f"Δ {metric.task} (%) ↑")
    header += ["Δ mean (%) ↑", "Rank", "train (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [row["arch"].upper(), str(row["n_seeds"])]
        for metric in spec.reported_metrics:
            cell = _cell(row, metric)
            marker = f" {BELOW_FLOOR}" if cell.get("below_floor") else ""
            cells.append(_pm(cell.get("mean", float("nan")), cell.get("std", float("nan")), 2) + marker)
            if metric.is_extra:
                continue
            if row["arch"] == baseline:
                cells.append("")
            else:
                cells.append(
                    _pm(cell["delta_mean"], cell["delta_std"], 2, signed=True) + (" *" if cell["beyond_noise"] else "")
                )
        cells.append("" if row["arch"] == baseline else _pm(row["delta_mean"], row["delta_mean_std"], 2, signed=True))
        cells += [str(row["rank"]), f"{row['train_s']:.0f}" if not math.isnan(row["train_s"]) else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    if floor is not None:
        cells = [floor["label"], "—"]
        for metric in spec.reported_metrics:
            entry = floor["metrics"].get(metric.key, {})
            cells.append(_pm(entry.get("mean", float("nan")), entry.get("std", float("nan")), 2))
            if not metric.is_extra:
                cells.append("—")
        cells += ["—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[ArchSummary], spec: ComparisonSpec, floor: FloorSummary | None = None) -> str:
    """The table as CSV, one row per architecture, every number in its own column, then the floor row (``arch``
    ``floor``: its ``<metric>_mean`` and ``<metric>_std`` only) when there is a floor.

    Args:
        rows: output of :func:`summarise`.
        spec: the bundle's comparison settings.
        floor: output of :func:`summarise_floor`, or None.

    Returns:
        the CSV text: per task metric ``<task>_mean/_std/_delta_mean/_delta_std/_beyond_noise/_below_floor``, per
        extra metric ``<name>_mean/_std/_below_floor``.

    Example:
        >>> to_csv(rows, spec, floor).splitlines()[-1].split(",")[0]  # doctest: +SKIP
        'floor'
    """
    buffer = io.StringIO()
    fields = ["arch", "n_seeds", "rank", "delta_mean", "delta_mean_std", "train_s"]
    for metric in spec.reported_metrics:
        keys = ("mean", "std", "below_floor") if metric.is_extra else _TASK_CSV_KEYS
        fields += [f"{metric.key}_{k}" for k in keys]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {k: row[k] for k in fields if k in row}
        for metric in spec.reported_metrics:
            for key, value in _cell(row, metric).items():
                flat[f"{metric.key}_{key}"] = value
        writer.writerow(flat)
    if floor is not None:
        flat = {"arch": "floor", "n_seeds": max(e["n_seeds"] for e in floor["metrics"].values())}
        for key, entry in floor["metrics"].items():
            flat[f"{key}_mean"], flat[f"{key}_std"] = entry["mean"], entry["std"]
        writer.writerow(flat)
    return buffer.getvalue()


_TASK_CSV_KEYS = ("mean", "std", "delta_mean", "delta_std", "beyond_noise", "below_floor")
