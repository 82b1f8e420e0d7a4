"""The shared skeleton of the evaluation handlers: event wiring, CSV and report writers, figure guard."""

from __future__ import annotations

import csv
import json
import logging
import math

import pytest
from ignite.engine import Engine

from ctan_monai.apps.ham10000.inference import PredictionTableHandler
from ctan_monai.engines import (
    ImageEvaluationHandler,
    PatientClassificationHandler,
    RunCollectorHandler,
    VolumeEvaluationHandler,
    csv_text,
    figures_never_fail,
    write_csv,
    write_report,
)


class SumOutputs(RunCollectorHandler):
    def reset(self, engine: Engine | None = None) -> None:
        self.values: list[int] = []

    def iteration_completed(self, engine: Engine) -> None:
        self.values.append(engine.state.output)

    def run_completed(self, engine: Engine) -> None:
        engine.state.metrics["total"] = sum(self.values)


def test_collector_starts_afresh_on_every_run() -> None:
    engine = Engine(lambda engine, batch: batch * 10)
    handler = SumOutputs()
    handler.attach(engine)
    engine.run([1, 2, 3], max_epochs=1)
    assert handler.values == [10, 20, 30]
    assert engine.state.metrics["total"] == 60
    engine.run([4], max_epochs=1)  # a second validation run must not see the first run's items
    assert handler.values == [40]
    assert engine.state.metrics["total"] == 40


def test_collector_is_abstract() -> None:
    class Incomplete(RunCollectorHandler):
        def reset(self, engine: Engine | None = None) -> None:
            pass

    with pytest.raises(TypeError):
        Incomplete()  # type: ignore[abstract]


@pytest.mark.parametrize(
    "handler",
    [
        VolumeEvaluationHandler(["Brainstem"]),
        ImageEvaluationHandler("seg", ["lesion"]),
        PatientClassificationHandler(["covid"]),
        PredictionTableHandler("unused"),
    ],
    ids=lambda h: type(h).__name__,
)
def test_every_evaluation_handler_shares_the_skeleton(handler: RunCollectorHandler) -> None:
    assert isinstance(handler, RunCollectorHandler)
    engine = Engine(lambda engine, batch: batch)
    handler.attach(engine)
    assert engine.has_event_handler(handler.iteration_completed)
    assert engine.has_event_handler(handler.run_completed)
    assert engine.has_event_handler(handler.reset)


def test_csv_text_blanks_missing_values_and_reads_back(tmp_path) -> None:
    path = tmp_path / "sub" / "cases.csv"
    write_csv(path, ["case", "dice", "mae"], [["a", 71.5, None], ["b", math.nan, 2.0]])
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["case", "dice", "mae"], ["a", "71.5", ""], ["b", "", "2.0"]]
    assert not list(tmp_path.joinpath("sub").glob("*.tmp*"))  # atomic: no temporary left behind


def test_csv_text_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="row 1 has 1 values for 2 columns"):
        csv_text(["case", "dice"], [["a", 1.0], ["b"]])


def test_write_report_is_strict_json_with_the_epoch(tmp_path) -> None:
    engine = Engine(lambda engine, batch: None)
    engine.run([0], max_epochs=1)
    path = tmp_path / "report.json"
    write_report(path, engine, {"mean_dice": math.nan}, "cases", [{"case_id": "a", "dose_mae": math.inf}])
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)
    assert report == {"epoch": 1, "summary": {"mean_dice": None}, "cases": [{"case_id": "a", "dose_mae": None}]}


def test_figures_never_fail_logs_and_goes_on(caplog) -> None:
    logger = logging.getLogger("ctan_monai.test")
    with (
        caplog.at_level(logging.ERROR, logger="ctan_monai.test"),
        figures_never_fail(logger, "the ROC figure of covid"),
    ):
        raise RuntimeError("no backend")
    assert "the ROC figure of covid could not be written" in caplog.text
    assert "no backend" in caplog.text


def test_figures_never_fail_does_not_swallow_interrupts() -> None:
    with pytest.raises(KeyboardInterrupt), figures_never_fail(logging.getLogger("ctan_monai.test"), "figures"):
        raise KeyboardInterrupt
