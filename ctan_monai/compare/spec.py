"""What a bundle tells the comparison: which report to read after evaluation, which metric stands for each task,
which further metrics the table reports beside them, and where each metric's training-split floor is in the report."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ComparisonSpec", "TaskMetric", "load_comparison_spec", "read_floor", "read_metric"]

SPEC_FILE = "configs/compare.yaml"


@dataclass(frozen=True)
class TaskMetric:
    """The metric M of one task in the comparison table, or an extra reported metric of a task (a column of the table
    that Delta does not use).

    Args:
        task: the task's name (for an extra metric: the task it describes).
        path: dotted path of the value in the evaluation report (``summary.mean_dice``).
        higher_is_better: the metric's direction (sets the sign of Delta, paper Eq. 3, and what beating the floor
            means).
        label: column heading (``Dice (%)``).
        scale: factor applied to the report's value (100 turns a fraction into %); the floor's value gets it too.
        floor_path: dotted path of the training-split floor's value of the same metric in the report
            (``summary.floor.mean_dice``), or None when the bundle reports no floor for it.
        name: an extra metric's own name (its key in records and CSV columns); None for a task metric, whose key is
            the task.

    Example:
        >>> TaskMetric("dose", "summary.whole_volume_mae", False, "MAE (Gy)", name="whole_volume_mae").key
        'whole_volume_mae'
    """

    task: str
    path: str
    higher_is_better: bool
    label: str
    scale: float = 1.0
    floor_path: str | None = None
    name: str | None = None

    @property
    def key(self) -> str:
        """The metric's key in run records and CSV columns: the task for a task metric, else the extra's name."""
        return self.name or self.task

    @property
    def is_extra(self) -> bool:
        """Whether this is an extra reported metric (shown in the table, left out of Delta)."""
        return self.name is not None


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
        metrics: one metric per task, in table order: Delta (paper Eq. 3) and the rank use these only.
        curves: keys of ``metrics_history.json`` drawn as learning curves.
        overrides: config values every comparison run gets (before the user's).
        paper: the paper's Table 2 values for this dataset, ``{arch: {task: M}}`` (printed beside ours).
        paper_note: how the paper's metrics relate to ours (units, test set).
        extra_metrics: further metrics reported in the table (each after its task's columns), not part of Delta.
        floor_label: what the training-split floor is, in a few words (the table's floor row reads
            ``floor (training split: <floor_label>)``).
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
    extra_metrics: tuple[TaskMetric, ...] = ()
    floor_label: str = "trivial predictors"

    @property
    def tasks(self) -> list[str]:
        """Task names in table order."""
        return [m.task for m in self.metrics]

    @property
    def reported_metrics(self) -> list[TaskMetric]:
        """Every metric of the table in column order: each task metric followed by that task's extra metrics."""
        ordered: list[TaskMetric] = []
        for metric in self.metrics:
            ordered.append(metric)
            ordered += [e for e in self.extra_metrics if e.task == metric.task]
        return ordered

    @property
    def floor_row_label(self) -> str:
        """The heading of the table's floor row."""
        return f"floor (training split: {self.floor_label})"


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
    metrics = [_parse_metric(path, str(task), entry) for task, entry in raw["metrics"].items()]
    extras_raw = raw.get("extra_metrics") or {}
    if not isinstance(extras_raw, dict):
        raise ValueError(f"{path}: 'extra_metrics' must map each extra metric's name to its entry")
    tasks = [m.task for m in metrics]
    extras = []
    for name, entry in extras_raw.items():
        if not isinstance(entry, dict) or entry.get("task") not in tasks:
            raise ValueError(f"{path}: extra metric {name!r} needs a 'task' among {tasks}, got {entry!r}")
        if str(name) in tasks:
            raise ValueError(f"{path}: extra metric {name!r} has the name of a task (names must be unique)")
        extras.append(_parse_metric(path, str(entry["task"]), entry, name=str(name)))
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
        extra_metrics=tuple(extras),
        floor_label=str(raw.get("floor_label", "trivial predictors")),
    )


def _parse_metric(spec_path: Path, task: str, entry: Any, name: str | None = None) -> TaskMetric:
    """One ``metrics`` or ``extra_metrics`` entry of ``compare.yaml`` as a :class:`TaskMetric`.

    Raises:
        ValueError: when ``path`` or ``higher_is_better`` is missing, or ``floor_path`` is not a string.
    """
    what = f"task {task!r}" if name is None else f"extra metric {name!r}"
    if not isinstance(entry, dict) or "path" not in entry or "higher_is_better" not in entry:
        raise ValueError(f"{spec_path}: metric of {what} needs 'path' and 'higher_is_better', got {entry!r}")
    floor_path = entry.get("floor_path")
    if floor_path is not None and not isinstance(floor_path, str):
        raise ValueError(f"{spec_path}: 'floor_path' of {what} must be a dotted path, got {floor_path!r}")
    return TaskMetric(
        task=task,
        path=str(entry["path"]),
        higher_is_better=bool(entry["higher_is_better"]),
        label=str(entry.get("label", name or task)),
        scale=float(entry.get("scale", 1.0)),
        floor_path=floor_path,
        name=name,
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
    value = _lookup(report, metric.path, f"{source}: no {metric.path!r} ({_what(metric)})")
    return float("nan") if value is None else float(value) * metric.scale


def read_floor(report: dict[str, Any], metric: TaskMetric) -> float | None:
    """The training-split floor of ``metric`` in an evaluation report, scaled like the metric.

    Args:
        report: the parsed report.
        metric: which metric's floor (its ``floor_path``).

    Returns:
        the scaled floor; NaN when the report holds ``null`` there; None when the metric declares no floor or the
        report has none at ``floor_path`` (e.g. a run evaluated before floors were reported).

    Example:
        >>> m = TaskMetric("seg", "summary.mean_dice", True, "Dice", 100, floor_path="summary.floor.mean_dice")
        >>> read_floor({"summary": {"mean_dice": 0.7, "floor": {"mean_dice": 0.25}}}, m)
        25.0
        >>> read_floor({"summary": {"mean_dice": 0.7}}, m) is None
        True
    """
    if metric.floor_path is None:
        return None
    try:
        value = _lookup(report, metric.floor_path, "")
    except KeyError:
        return None
    return float("nan") if value is None else float(value) * metric.scale


def _what(metric: TaskMetric) -> str:
    return f"task {metric.task!r}" if metric.name is None else f"extra metric {metric.name!r} of task {metric.task!r}"


def _lookup(report: dict[str, Any], dotted: str, message: str) -> Any:
    """The value at a dotted path of a nested dict; KeyError (``message``, then where the path breaks) if absent."""
    value: Any = report
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{message}; missing at {part!r}")
        value = value[part]
    return value
