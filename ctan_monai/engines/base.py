"""The skeleton shared by the evaluation and prediction handlers: collect on every iteration of an evaluator run,
summarise and write at its end; plus the CSV and report writers they share."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text
from ctan_monai.utils.json_safe import json_safe

__all__ = ["RunCollectorHandler", "csv_text", "figures_never_fail", "write_csv", "write_report"]


class RunCollectorHandler(ABC):
    """Base of handlers that gather something from every iteration of an engine run and act on it at the end.

    ``attach`` registers :meth:`reset` on ``STARTED`` (so a handler on a validation evaluator that runs every few
    epochs starts afresh each time), :meth:`iteration_completed` on ``ITERATION_COMPLETED`` and :meth:`run_completed`
    on ``EPOCH_COMPLETED`` (an evaluator's run is one epoch). Subclasses implement the three.

    Example:
        >>> class CountIterations(RunCollectorHandler):
        ...     def reset(self, engine=None):
        ...         self.count = 0
        ...     def iteration_completed(self, engine):
        ...         self.count += 1
        ...     def run_completed(self, engine):
        ...         engine.state.metrics["iterations"] = self.count
    """

    def attach(self, engine: Engine) -> None:
        """Register on ``STARTED``, ``ITERATION_COMPLETED`` and ``EPOCH_COMPLETED``.

        Args:
            engine: the (evaluator) engine to collect from.
        """
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.run_completed)

    @abstractmethod
    def reset(self, engine: Engine | None = None) -> None:
        """Forget what a previous run collected."""

    @abstractmethod
    def iteration_completed(self, engine: Engine) -> None:
        """Collect from the iteration just completed (``engine.state.batch`` and ``engine.state.output``)."""

    @abstractmethod
    def run_completed(self, engine: Engine) -> None:
        """Summarise what the run collected: set ``engine.state.metrics`` and/or write files."""


def csv_text(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A CSV table as text, with None and NaN written as empty cells (what spreadsheets and pandas read as missing).

    Args:
        columns: the header.
        rows: the rows, each as long as ``columns``.

    Returns:
        The CSV text, lines ended by ``\\n``.

    Raises:
        ValueError: when a row's length differs from the header's.

    Example:
        >>> csv_text(["case", "dice"], [["a", 0.5], ["b", float("nan")]])
        'case,dice\\na,0.5\\nb,\\n'
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for index, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"CSV row {index} has {len(row)} values for {len(columns)} columns")
        writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
    return buffer.getvalue()


def write_report(
    path: str | os.PathLike[str],
    engine: Engine,
    summary: Mapping[str, Any],
    records_key: str,
    records: Sequence[Mapping[str, Any]],
) -> None:
    """Write an evaluation report atomically as strict JSON (NaN and infinities become null).

    Args:
        path: the report file.
        engine: the engine whose run is reported; its epoch is recorded (the training epoch for a validation run).
        summary: the run's overall metrics.
        records_key: the name of the per-item list (e.g. ``"cases"``, ``"images"``, ``"patients"``).
        records: the per-item metrics.

    Example:
        >>> write_report("eval/report.json", evaluator, {"mean_dice": 71.2}, "cases", rows)  # doctest: +SKIP
    """
    report = {"epoch": getattr(engine.state, "epoch", None), "summary": summary, records_key: list(records)}
    atomic_write_json(Path(path), json_safe(report))


def write_csv(path: str | os.PathLike[str], columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write :func:`csv_text` atomically to ``path``.

    Args:
        path: the CSV file.
        columns: the header.
        rows: the rows.

    Example:
        >>> write_csv("eval/cases.csv", ["case", "dice"], [["a", 0.5]])  # doctest: +SKIP
    """
    atomic_write_text(Path(path), csv_text(columns, rows))


@contextmanager
def figures_never_fail(logger: logging.Logger, what: str) -> Iterator[None]:
    """Run figure drawing so that a failure is logged with its traceback and never costs the evaluation's metrics.

    Args:
        logger: where the failure goes.
        what: names the figures in the message.

    Example:
        >>> with figures_never_fail(logging.getLogger("x"), "the ROC curve"):
        ...     raise RuntimeError("no display")
    """
    try:
        yield
    except Exception:  # a figure must never cost the evaluation
        logger.exception("%s could not be written", what)
