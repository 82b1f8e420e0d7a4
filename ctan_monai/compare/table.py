"""The comparison table in the paper's Table 2 format: per task M and Delta vs STL, Delta_mean and rank, as mean +- std
over seeds, with a mark on differences larger than the seed noise."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from ctan_monai.compare.spec import ComparisonSpec
from ctan_monai.metrics.relative import delta_task

__all__ = ["ArchSummary", "format_markdown", "summarise", "to_csv"]

ArchSummary = dict[str, Any]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    # one value has no spread: NaN, printed as no "± ..." rather than a misleading "± 0.00"
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else float("nan"))


def summarise(records: Sequence[Mapping[str, Any]], spec: ComparisonSpec, baseline: str = "stl") -> list[ArchSummary]:
    """Aggregate finished runs into one row per architecture.

    Delta (paper Eq. 3) is computed per seed against the baseline run of the same seed, then averaged, so its std is
    the seed-to-seed spread of the paired difference. A difference to the baseline *exceeds the seed noise* when the
    means differ by more than two standard errors of the difference (``2 * sqrt(s_a^2 / n_a + s_b^2 / n_b)``), with
    at least two seeds on each side: a screening rule over seeds only, not a significance test.

    Args:
        records: finished run records (``arch``, ``seed``, ``metrics``).
        spec: the bundle's comparison settings (tasks, directions).
        baseline: the architecture Delta refers to.

    Returns:
        rows in ranked order (best Delta_mean first; the baseline has Delta 0): ``arch``, ``n_seeds``, per task
        ``mean``/``std``/``delta_mean``/``delta_std``/``beyond_noise``, ``delta_mean``/``delta_mean_std`` over tasks,
        ``rank``, and ``train_s`` (mean training time).

    Raises:
        ValueError: when no run of the baseline finished (Delta needs it).
    """
    by_arch: dict[str, dict[int, Mapping[str, Any]]] = {}
    for record in records:
        by_arch.setdefault(record["arch"], {})[int(record["seed"])] = record
    if baseline not in by_arch:
        raise ValueError(f"no finished {baseline!r} run: Delta (Eq. 3) is relative to it")
    base_runs = by_arch[baseline]
    rows: list[ArchSummary] = []
    for arch, runs in by_arch.items():
        row: ArchSummary = {"arch": arch, "n_seeds": len(runs), "seeds": sorted(runs), "tasks": {}}
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


def format_markdown(rows: Sequence[ArchSummary], spec: ComparisonSpec, baseline: str = "stl") -> str:
    """The table as Markdown (one row per architecture, ranked; ``*`` marks a difference beyond seed noise).

    Args:
        rows: output of :func:`summarise`.
        spec: the bundle's comparison settings.
        baseline: the Delta baseline (its Delta cells are left empty).

    Returns:
        the Markdown text.
    """
    header = ["Method", "seeds"]
    for metric in spec.metrics:
        arrow = "↑" if metric.higher_is_better else "↓"
        header += [f"{metric.task}: {metric.label} {arrow}", f"Δ {metric.task} (%) ↑"]
    header += ["Δ mean (%) ↑", "Rank", "train (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [row["arch"].upper(), str(row["n_seeds"])]
        for metric in spec.metrics:
            task = row["tasks"][metric.task]
            cells.append(_pm(task["mean"], task["std"], 2))
            if row["arch"] == baseline:
                cells.append("")
            else:
                cells.append(
                    _pm(task["delta_mean"], task["delta_std"], 2, signed=True) + (" *" if task["beyond_noise"] else "")
                )
        cells.append("" if row["arch"] == baseline else _pm(row["delta_mean"], row["delta_mean_std"], 2, signed=True))
        cells += [str(row["rank"]), f"{row['train_s']:.0f}" if not math.isnan(row["train_s"]) else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[ArchSummary], spec: ComparisonSpec) -> str:
    """The table as CSV, one row per architecture, every number in its own column."""
    buffer = io.StringIO()
    fields = ["arch", "n_seeds", "rank", "delta_mean", "delta_mean_std", "train_s"]
    for metric in spec.metrics:
        fields += [f"{metric.task}_{k}" for k in ("mean", "std", "delta_mean", "delta_std", "beyond_noise")]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {k: row[k] for k in fields if k in row}
        for metric in spec.metrics:
            for key, value in row["tasks"][metric.task].items():
                flat[f"{metric.task}_{key}"] = value
        writer.writerow(flat)
    return buffer.getvalue()
