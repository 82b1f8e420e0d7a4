"""What a training run learned, in a table a person reads in five seconds: each key validation metric of the
untrained network, the best validated epoch and the last one, beside the trivial floor from the training split."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from ctan_monai.engines.checkpoints import SKIP_MODEL_SELECTION
from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text

__all__ = ["TrainingSummaryHandler", "summary_table"]

UNTRAINED_FILE = "untrained_metrics.json"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if _finite(value) else "-"


def summary_table(
    metrics: Mapping[str, tuple[str, bool]],
    columns: Mapping[str, Mapping[str, float]],
    floor: Mapping[str, float],
) -> tuple[str, dict[str, Any]]:
    """The summary as a markdown table and as a record.

    Args:
        metrics: metric key -> (title, higher_is_better).
        columns: column title -> {metric key: value} (e.g. untrained, best epoch, last epoch).
        floor: metric key -> the floor's value (missing keys: no floor).

    Returns:
        ``(table, record)``; the record has per metric the columns, the floor and ``beats_floor`` (None when the
        model's value or the floor is missing or not finite).

    Example:
        >>> table, record = summary_table({"val_mean_dice": ("mean Dice (%)", True)},
        ...                               {"untrained": {"val_mean_dice": 0.0}, "best": {"val_mean_dice": 61.0}},
        ...                               {"val_mean_dice": 30.0})
        >>> record["val_mean_dice"]["beats_floor"]
        True
    """
    titles = list(columns)
    lines = ["| metric | " + " | ".join(titles) + " | floor | beats floor |", "|---|" + "---:|" * (len(titles) + 2)]
    record: dict[str, Any] = {}
    best_title = next((t for t in titles if t.startswith("best")), titles[-1])
    for key, (title, higher) in metrics.items():
        values = {t: columns[t].get(key) for t in titles}
        floor_value = floor.get(key)
        model = values.get(best_title)
        beats = None  # undefined (e.g. an AUC on a split with one label) is no verdict, neither yes nor NO
        if _finite(model) and _finite(floor_value):
            beats = bool(model > floor_value) if higher else bool(model < floor_value)
        verdict = "-" if beats is None else ("yes" if beats else "NO")
        cells = " | ".join(_fmt(values[t]) for t in titles)
        lines.append(f"| {title} | {cells} | {_fmt(floor_value)} | {verdict} |")
        record[key] = {"title": title, "higher_is_better": higher, **values, "floor": floor_value, "beats_floor": beats}
    return "\n".join(lines) + "\n", record


class TrainingSummaryHandler:
    """At the end of training, print and write (``<output_dir>/training_summary.md`` and ``.json``) a table of the key
    validation metrics: untrained network, best validated epoch (by the key metric), last validated epoch, and the
    floor (the evaluator's ``<floor_prefix><name>`` metrics, e.g. ``val_floor_mean_dice``), with a verdict per metric.

    The untrained network is evaluated once when training first starts (its metrics are kept in
    ``untrained_metrics.json``, so a resumed run reuses them; the weights are still the fresh ones then, since the
    resume handler runs after this one). That evaluation is no candidate for the best model (its evaluator state has
    ``SKIP_MODEL_SELECTION`` set while it runs, which ``BestModelSaver`` honours). When no validated epoch had the key
    metric (e.g. an AUC undefined on a tiny validation split), the table shows the last validated epoch instead of
    the best one. A model that does not beat its floor is logged as a warning.

    Args:
        evaluator: the validation engine.
        output_dir: the run folder (with ``metrics_history.json``).
        metrics: metric key -> ``[title, higher_is_better]``, e.g. ``{"val_mean_dice": ["mean Dice (%)", true]}``.
        key_metric: the history key that ranks epochs (higher is better).
        evaluate_untrained: evaluate the untrained network at the start (one extra validation run).
        floor_prefix: prefix of the floor metrics, replacing ``val_``.

    Example:
        >>> handler = TrainingSummaryHandler(None, "/tmp/run", {"val_mean_dice": ["mean Dice (%)", True]})
    """

    def __init__(
        self,
        evaluator: Engine | None,
        output_dir: str | os.PathLike[str],
        metrics: Mapping[str, Any],
        key_metric: str = "val_key_metric",
        evaluate_untrained: bool = True,
        floor_prefix: str = "val_floor_",
    ) -> None:
        self.evaluator = evaluator
        self.output_dir = Path(output_dir)
        self.metrics = {str(k): (str(v[0]), bool(v[1])) for k, v in metrics.items()}
        self.key_metric = key_metric
        self.evaluate_untrained = evaluate_untrained
        self.floor_prefix = floor_prefix
        self.logger = logging.getLogger("ctan_monai.summary")

    def attach(self, engine: Engine) -> None:
        """Register on the trainer's ``STARTED`` (untrained evaluation) and ``COMPLETED`` (the table)."""
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        """Evaluate the untrained network once per run folder."""
        path = self.output_dir / UNTRAINED_FILE
        if not self.evaluate_untrained or self.evaluator is None or path.is_file():
            return
        self.logger.info("evaluating the untrained network (for the summary at the end)")
        setattr(self.evaluator.state, SKIP_MODEL_SELECTION, True)
        try:
            self.evaluator.run(1)
        finally:
            setattr(self.evaluator.state, SKIP_MODEL_SELECTION, False)
        untrained = {k: float(v) for k, v in self.evaluator.state.metrics.items() if isinstance(v, (int, float))}
        # the history handler must not take these for epoch 1's validation
        self.evaluator.state.epoch = 0
        atomic_write_json(path, untrained)

    def _floor(self) -> dict[str, float]:
        metrics = getattr(getattr(self.evaluator, "state", None), "metrics", None) or {}
        floor = {}
        for key in self.metrics:
            name = self.floor_prefix + (key[4:] if key.startswith("val_") else key)
            if isinstance(metrics.get(name), (int, float)):
                floor[key] = float(metrics[name])
        return floor

    def completed(self, engine: Engine) -> None:
        """Print and write the table."""
        history_path = self.output_dir / "metrics_history.json"
        history = json.loads(history_path.read_text()) if history_path.is_file() else {}
        columns: dict[str, dict[str, float]] = {}
        untrained_path = self.output_dir / UNTRAINED_FILE
        if untrained_path.is_file():
            columns["untrained"] = json.loads(untrained_path.read_text())
        ranked = history.get(self.key_metric) or []
        validated = sorted({int(e) for key in self.metrics for e, _ in history.get(key, [])})
        picks: tuple[tuple[str, int], ...] = ()
        if ranked:
            best_epoch = max(ranked, key=lambda point: point[1])[0]
            last_epoch = max([int(e) for e, _ in ranked] + validated)  # the last validated, with a key metric or not
            picks = ((f"best (epoch {best_epoch})", best_epoch), (f"last (epoch {last_epoch})", last_epoch))
        elif validated:
            # no epoch had the key metric: nothing was selected, the last validated epoch is the model
            self.logger.warning("no validated epoch has the key metric %s: the summary shows the last", self.key_metric)
            picks = ((f"last (epoch {validated[-1]})", validated[-1]),)
        for title, epoch in picks:
            columns[title] = {k: v for k, points in history.items() for e, v in points if e == epoch}
        if not columns:
            self.logger.warning("no validation ran: no training summary")
            return
        table, record = summary_table(self.metrics, columns, self._floor())
        atomic_write_text(self.output_dir / "training_summary.md", table)
        atomic_write_json(self.output_dir / "training_summary.json", record)
        print("\nWhat this run learned (validation; floor = trivial predictor from the training split):\n" + table)
        for row in record.values():
            if row["beats_floor"] is False:
                self.logger.warning("%s does NOT beat its floor: %s vs floor %s", row["title"], row, row["floor"])
