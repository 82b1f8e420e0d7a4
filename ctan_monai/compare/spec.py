"""What a bundle tells the comparison: which report to read after evaluation and which metric stands for each task."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ComparisonSpec", "TaskMetric", "load_comparison_spec", "read_metric"]

SPEC_FILE = "configs/compare.yaml"


@dataclass(frozen=True)
class TaskMetric:
    """The metric M of one task in the comparison table.

    Args:
        task: the task's name.
        path: dotted path of the value in the evaluation report (``summary.mean_dice``).
        higher_is_better: the metric's direction (sets the sign of Delta, paper Eq. 3).
        label: column heading (``Dice (%)``).
        scale: factor applied to the report's value (100 turns a fraction into %).
    """

    task: str
    path: str
    higher_is_better: bool
    label: str
    scale: float = 1.0


@dataclass(frozen=True)
class ComparisonSpec:
    """A bundle's comparison settings (``configs/compare.yaml``).

    Args:
        bundle: the bundle folder.
        train_config: training config, relative to the bundle.
        evaluate_config: evaluation config merged over the training config.
        evaluate_id: the run id of the evaluation.
        prepare_id: the config id whose evaluation prepares the data (demo writing, conversion to a cache): run once
            before parallel runs (``--jobs``), so that they do not convert the same data at the same time.
        report: the evaluation report, relative to the run's ``output_dir``.
        metrics: one metric per task, in table order.
        curves: keys of ``metrics_history.json`` drawn as learning curves.
        overrides: config values every comparison run gets (before the user's).
        paper: the paper's Table 2 values for this dataset, ``{arch: {task: M}}`` (printed beside ours).
        paper_note: how the paper's metrics relate to ours (units, test set).
    """

    bundle: Path
    train_config: str
    evaluate_config: str
    evaluate_id: str
    report: str
    metrics: tuple[TaskMetric, ...]
    curves: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    paper_note: str = ""
    prepare_id: str = "data"

    @property
    def tasks(self) -> list[str]:
        """Task names in table order."""
        return [m.task for m in self.metrics]


def load_comparison_spec(bundle: str | os.PathLike[str]) -> ComparisonSpec:
    """Read and check ``<bundle>/configs/compare.yaml``.

    Args:
        bundle: the bundle folder.

    Returns:
        the spec.

    Raises:
        FileNotFoundError: when the bundle or its ``compare.yaml`` is missing.
        ValueError: when the file lacks a required entry or has a malformed metric (named in the message).

    Example:
        >>> spec = load_comparison_spec("bundles/ctan_openkbp")  # doctest: +SKIP
        >>> spec.tasks  # doctest: +SKIP
        ['seg', 'dose']
    """
    bundle = Path(bundle).resolve()
    path = bundle / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no comparison settings (is {bundle} a ctan_monai bundle?)")
    raw = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in ("report", "metrics") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    if not isinstance(raw["metrics"], dict) or not raw["metrics"]:
        raise ValueError(f"{path}: 'metrics' must map each task to its metric")
    metrics = []
    for task, entry in raw["metrics"].items():
        if not isinstance(entry, dict) or "path" not in entry or "higher_is_better" not in entry:
            raise ValueError(f"{path}: metric of task {task!r} needs 'path' and 'higher_is_better', got {entry!r}")
        metrics.append(
            TaskMetric(
                task=str(task),
                path=str(entry["path"]),
                higher_is_better=bool(entry["higher_is_better"]),
                label=str(entry.get("label", task)),
                scale=float(entry.get("scale", 1.0)),
            )
        )
    for key in ("train_config", "evaluate_config"):
        name = raw.get(key, f"configs/{'train' if key == 'train_config' else 'evaluate'}.yaml")
        if not (bundle / name).is_file():
            raise FileNotFoundError(f"{path}: {key} {name!r} not found in {bundle}")
    return ComparisonSpec(
        bundle=bundle,
        train_config=str(raw.get("train_config", "configs/train.yaml")),
        evaluate_config=str(raw.get("evaluate_config", "configs/evaluate.yaml")),
        evaluate_id=str(raw.get("evaluate_id", "evaluating")),
        report=str(raw["report"]),
        metrics=tuple(metrics),
        curves=tuple(raw.get("curves", ())),
        overrides=dict(raw.get("overrides", {}) or {}),
        paper={str(a): {str(t): float(v) for t, v in m.items()} for a, m in (raw.get("paper") or {}).items()},
        paper_note=str(raw.get("paper_note", "")),
        prepare_id=str(raw.get("prepare_id", "data")),
    )


def read_metric(report: dict[str, Any], metric: TaskMetric, source: str = "report") -> float:
    """The value of ``metric`` in an evaluation report, scaled.

    Args:
        report: the parsed report.
        metric: which value.
        source: the report's name, for error messages.

    Returns:
        the scaled value; NaN when the report holds ``null`` there (an undefined metric stays visibly undefined).

    Raises:
        KeyError: when the path does not exist in the report.

    Example:
        >>> read_metric({"summary": {"mean_dice": 0.7}}, TaskMetric("seg", "summary.mean_dice", True, "Dice", 100))
        70.0
    """
    value: Any = report
    for part in metric.path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{source}: no {metric.path!r} (task {metric.task!r}); missing at {part!r}")
        value = value[part]
    return float("nan") if value is None else float(value) * metric.scale
