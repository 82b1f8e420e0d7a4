"""The training-split floor and the extra reported metrics in the comparison (table, CSV, warnings, bar plot,
learning curves) and the floor reference lines of a run's learning curves; hand-made records and histories only."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from ignite.engine import Engine, Events

from ctan_monai.compare import (
    RunPlan,
    below_floor,
    below_floor_messages,
    format_markdown,
    load_comparison_spec,
    load_finished_run,
    read_floor,
    report_values,
    summarise,
    summarise_floor,
    to_csv,
)
from ctan_monai.compare.__main__ import write_outputs
from ctan_monai.compare.plots import plot_learning_curves as plot_compare_curves
from ctan_monai.compare.plots import plot_metric_bars
from ctan_monai.compare.table import BELOW_FLOOR
from ctan_monai.engines import figures
from ctan_monai.engines.figures import plot_learning_curves, split_floor_keys
from ctan_monai.engines.handlers import MetricsHistoryHandler
from tests.conftest import OPENKBP_BUNDLE, REPO_ROOT

FLOOR = {"seg": 63.0, "dose": 5.0, "whole_volume_mae": 0.3}
FLOOR_LABEL = "floor (training split: mean training dose × possible-dose mask, atlas label map)"


def _record(arch: str, seed: int, seg: float, dose: float, wv: float, floor: dict | None = FLOOR) -> dict:
    return {
        "arch": arch,
        "seed": seed,
        "metrics": {"seg": seg, "dose": dose},
        "extra_metrics": {"whole_volume_mae": wv},
        "floor": None if floor is None else dict(floor),
        "timings": {"train_s": 10.0},
    }


def _records() -> list[dict]:
    # STL loses to the floor on seg (60 < 63) and dose (6 > 5 Gy); CTAN beats it everywhere; HPS ties the floor on
    # the whole-volume MAE (0.3, not strictly better: below floor)
    return [
        _record("stl", 0, 59.0, 6.1, 0.5),
        _record("stl", 1, 61.0, 5.9, 0.5),
        _record("ctan", 0, 70.0, 4.0, 0.2),
        _record("ctan", 1, 72.0, 4.2, 0.2),
        _record("hps", 0, 66.0, 4.5, 0.3),
        _record("hps", 1, 66.0, 4.5, 0.3),
    ]


def _cells(table: str, method: str) -> list[str]:
    line = next(row for row in table.splitlines() if row.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def spec():
    return load_comparison_spec(OPENKBP_BUNDLE)


# ------------------------------------------------------------------------------------------------------------ spec


def test_openkbp_spec_reports_the_whole_volume_mae_outside_delta(spec) -> None:
    assert spec.tasks == ["seg", "dose"]  # Delta (Eq. 3) over the two task metrics only
    assert [m.key for m in spec.reported_metrics] == ["seg", "dose", "whole_volume_mae"]
    (extra,) = spec.extra_metrics
    assert extra.is_extra and extra.task == "dose" and not extra.higher_is_better
    assert extra.path == "summary.whole_volume_mae" and extra.floor_path == "summary.floor.whole_volume_mae"
    assert spec.floor_row_label == FLOOR_LABEL


@pytest.mark.parametrize("bundle", sorted(p.name for p in (REPO_ROOT / "bundles").iterdir() if p.is_dir()))
def test_every_bundle_names_a_floor_for_each_metric(bundle: str) -> None:
    spec = load_comparison_spec(REPO_ROOT / "bundles" / bundle)
    assert all(m.floor_path and m.floor_path.startswith("summary.floor.") for m in spec.reported_metrics)
    assert spec.floor_label != "trivial predictors"  # each bundle says what its floor is


def test_spec_rejects_malformed_extra_metrics(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    for name in ("train.yaml", "evaluate.yaml"):
        (tmp_path / "configs" / name).write_text("{}\n")
    head = "report: r.json\nmetrics:\n  seg: {path: a.b, higher_is_better: true}\n"
    cases = {
        "extra_metrics:\n  wv: {task: dose, path: a.c, higher_is_better: false}\n": "needs a 'task' among",
        "extra_metrics:\n  seg: {task: seg, path: a.c, higher_is_better: false}\n": "has the name of a task",
        "extra_metrics:\n  wv: {task: seg, path: a.c}\n": "needs 'path' and 'higher_is_better'",
        "extra_metrics: [wv]\n": "must map each extra metric",
        "extra_metrics:\n  wv: {task: seg, path: a.c, higher_is_better: false, floor_path: [x]}\n": "dotted path",
    }
    for tail, message in cases.items():
        (tmp_path / "configs" / "compare.yaml").write_text(head + tail)
        with pytest.raises(ValueError, match=message):
            load_comparison_spec(tmp_path)


def _report(with_floor: bool = True, with_extra: bool = True) -> dict:
    summary = {"mean_dice": 40.0, "dose_mae": 3.0}
    if with_extra:
        summary["whole_volume_mae"] = 0.25
    if with_floor:
        summary["floor"] = {"mean_dice": 63.0, "dose_mae": 5.0, "whole_volume_mae": None}
    return {"summary": summary}


def test_report_values_read_extras_and_floors(spec, caplog: pytest.LogCaptureFixture) -> None:
    values = report_values(_report(), spec, "report.json")
    assert values["metrics"] == {"seg": 40.0, "dose": 3.0}
    assert values["extra_metrics"] == {"whole_volume_mae": 0.25}
    assert values["floor"]["seg"] == 63.0 and values["floor"]["dose"] == 5.0
    assert math.isnan(values["floor"]["whole_volume_mae"])  # null in the report: undefined, not absent
    with caplog.at_level(logging.WARNING, logger="ctan_monai.compare"):
        values = report_values(_report(with_floor=False), spec, "old.json")
    assert values["floor"] == {"seg": None, "dose": None, "whole_volume_mae": None}
    assert "old.json: no floor at summary.floor.mean_dice" in caplog.text
    with pytest.raises(KeyError, match="extra metric 'whole_volume_mae'"):
        report_values(_report(with_extra=False), spec, "old.json")  # a new run must have it
    lenient = report_values(_report(with_extra=False), spec, "old.json", strict=False)
    assert math.isnan(lenient["extra_metrics"]["whole_volume_mae"])
    assert read_floor(_report(), spec.metrics[0]) == 63.0


def test_a_finished_run_gets_its_floor_from_its_report(spec, tmp_path: Path) -> None:
    plan = RunPlan("stl", 0, tmp_path / "stl_seed0", {"epochs": 1})
    (plan.run_dir / "evaluation").mkdir(parents=True)
    record = {"arch": "stl", "seed": 0, "status": "finished", "overrides": {"epochs": 1}, "metrics": {"seg": 40.0}}
    (plan.run_dir / "run.json").write_text(json.dumps(record))  # finished before floors were recorded
    (plan.run_dir / "evaluation" / "report.json").write_text(json.dumps(_report()))
    assert "floor" not in load_finished_run(plan)
    loaded = load_finished_run(plan, spec)
    assert loaded["floor"]["seg"] == 63.0 and loaded["extra_metrics"] == {"whole_volume_mae": 0.25}
    assert loaded["metrics"] == {"seg": 40.0}  # the recorded task metrics are kept


# ----------------------------------------------------------------------------------------------------------- table


def test_floor_row_and_below_floor_marker(spec) -> None:
    records = _records()
    floor = summarise_floor(records, spec)
    assert floor["label"] == FLOOR_LABEL and floor["warnings"] == []
    assert {k: e["mean"] for k, e in floor["metrics"].items()} == FLOOR
    assert all(math.isnan(e["std"]) and e["agree"] and e["n_runs"] == 6 for e in floor["metrics"].values())
    rows = summarise(records, spec, floor=floor)
    by_arch = {r["arch"]: r for r in rows}
    assert by_arch["stl"]["tasks"]["seg"]["below_floor"] and by_arch["stl"]["tasks"]["dose"]["below_floor"]
    assert by_arch["ctan"]["tasks"]["seg"]["below_floor"] is False
    assert by_arch["ctan"]["extra"]["whole_volume_mae"]["below_floor"] is False
    assert by_arch["hps"]["extra"]["whole_volume_mae"]["below_floor"]  # a tie does not beat the floor
    # the extra metric does not enter Delta: CTAN's Delta mean is the mean of its two task Deltas
    ctan = by_arch["ctan"]
    assert math.isclose(
        ctan["delta_mean"], (ctan["tasks"]["seg"]["delta_mean"] + ctan["tasks"]["dose"]["delta_mean"]) / 2
    )

    table = format_markdown(rows, spec, floor=floor)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == [
        "Method",
        "seeds",
        "seg: Dice (%) ↑",
        "Δ seg (%) ↑",
        "dose: MAE (Gy) ↓",
        "Δ dose (%) ↑",
        "dose: whole-volume MAE (Gy) ↓",
        "Δ mean (%) ↑",
        "Rank",
        "train (s)",
    ]
    assert _cells(table, "STL")[2] == f"60.00 ± 1.41 {BELOW_FLOOR}"
    assert _cells(table, "STL")[4] == f"6.00 ± 0.14 {BELOW_FLOOR}"
    assert _cells(table, "STL")[6] == f"0.50 ± 0.00 {BELOW_FLOOR}"
    assert BELOW_FLOOR not in " ".join(_cells(table, "CTAN"))  # CTAN wins on every metric: no marker
    assert _cells(table, "CTAN")[6] == "0.20 ± 0.00"
    assert _cells(table, "HPS")[2] == "66.00 ± 0.00" and _cells(table, "HPS")[6] == f"0.30 ± 0.00 {BELOW_FLOOR}"
    floor_row = table.splitlines()[-1]
    assert floor_row == f"| {FLOOR_LABEL} | — | 63.00 | — | 5.00 | — | 0.30 | — | — | — |"  # no Delta, no rank
    assert table.count(BELOW_FLOOR) == 4

    messages = below_floor_messages(rows, spec, floor)
    assert [m.split(":")[0] for m in messages] == [
        "HPS does not beat the training-split floor on dose",
        "STL does not beat the training-split floor on seg",
        "STL does not beat the training-split floor on dose",
        "STL does not beat the training-split floor on dose",
    ]
    assert messages[1] == (
        "STL does not beat the training-split floor on seg: Dice (%): mean 60.00 vs floor 63.00 (higher is better)"
    )
    assert messages[0].endswith("whole-volume MAE (Gy): mean 0.30 vs floor 0.30 (lower is better)")


def test_below_floor_follows_the_metric_direction() -> None:
    assert below_floor(60.0, 63.0, higher_is_better=True) and not below_floor(64.0, 63.0, higher_is_better=True)
    assert below_floor(6.0, 5.0, higher_is_better=False) and not below_floor(4.0, 5.0, higher_is_better=False)
    assert below_floor(5.0, 5.0, higher_is_better=False) and below_floor(63.0, 63.0, higher_is_better=True)
    assert below_floor(math.nan, 5.0, True) is None and below_floor(5.0, math.nan, False) is None


def test_no_floor_means_no_floor_row_and_no_marker(spec) -> None:
    records = [{**r, "floor": None} for r in _records()]
    assert summarise_floor(records, spec) is None
    rows = summarise(records, spec)
    table = format_markdown(rows, spec)
    assert "floor" not in table and all(r["tasks"]["seg"]["below_floor"] is None for r in rows)
    assert below_floor_messages(rows, spec, None) == []
    assert not any(line.startswith("floor,") for line in to_csv(rows, spec).splitlines())


def test_floor_differing_between_seeds_is_their_mean_with_a_warning(spec) -> None:
    records = [
        _record("stl", 0, 60.0, 6.0, 0.5, {**FLOOR, "seg": 62.0}),
        _record("ctan", 0, 70.0, 4.0, 0.2, {**FLOOR, "seg": 62.0}),
        _record("stl", 1, 60.0, 6.0, 0.5, {**FLOOR, "seg": 64.0}),
        _record("ctan", 1, 70.0, 4.0, 0.2, {**FLOOR, "seg": 64.0}),
    ]
    floor = summarise_floor(records, spec)
    seg = floor["metrics"]["seg"]
    assert math.isclose(seg["mean"], 63.0) and math.isclose(seg["std"], math.sqrt(2.0)) and not seg["agree"]
    assert len(floor["warnings"]) == 1 and "differs between runs" in floor["warnings"][0]
    assert "63.00 ± 1.41" in format_markdown(summarise(records, spec, floor=floor), spec, floor=floor)
    records[1]["floor"]["seg"] = 65.0  # one seed, two floors: the runs did not see the same split
    warnings = summarise_floor(records, spec)["warnings"]
    assert any("between the runs of seed 0" in w for w in warnings)


def test_csv_has_the_floor_row_and_marker_columns(spec) -> None:
    records = _records()
    floor = summarise_floor(records, spec)
    lines = to_csv(summarise(records, spec, floor=floor), spec, floor).splitlines()
    header = lines[0].split(",")
    assert {"seg_below_floor", "whole_volume_mae_mean", "whole_volume_mae_below_floor"} <= set(header)
    assert "whole_volume_mae_delta_mean" not in header
    floor_row = dict(zip(header, lines[-1].split(",")))
    assert floor_row["arch"] == "floor" and float(floor_row["seg_mean"]) == 63.0 and floor_row["rank"] == ""
    stl = dict(zip(header, next(line for line in lines if line.startswith("stl,")).split(",")))
    assert stl["seg_below_floor"] == "True" and stl["whole_volume_mae_mean"] == "0.5"


def test_write_outputs_warns_and_draws_the_floor(spec, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = _records()
    plans = [RunPlan(r["arch"], r["seed"], tmp_path / "runs" / f"{r['arch']}_seed{r['seed']}", {}) for r in records]
    for plan in plans:
        plan.run_dir.mkdir(parents=True)
        history = {"val_mean_dice": [[1, 50.0], [2, 60.0]], "val_floor_mean_dice": [[1, 63.0], [2, 63.0]]}
        (plan.run_dir / "metrics_history.json").write_text(json.dumps(history))
    settings = {"archs": ["stl", "hps", "ctan"], "seeds": [0, 1], "overrides": {}}
    with caplog.at_level(logging.WARNING, logger="ctan_monai.compare"):
        markdown = write_outputs(spec, records, plans, tmp_path, settings)
    assert "STL does not beat the training-split floor on seg" in caplog.text
    assert "CTAN does not beat" not in caplog.text
    assert f"| {FLOOR_LABEL} |" in markdown and f"`{BELOW_FLOOR}`: the method's mean does not beat" in markdown
    assert "not part of Δ" in markdown  # the extra metric's legend
    assert (tmp_path / "table.md").read_text() == markdown
    assert json.loads((tmp_path / "runs.json").read_text())["floor"]["metrics"]["seg"]["mean"] == 63.0
    assert (tmp_path / "metrics.png").stat().st_size > 0 and (tmp_path / "learning_curves.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------- plots


def _floor_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_label().startswith("floor")]


def test_metric_bars_draw_the_floor_line_in_view(spec, tmp_path: Path) -> None:
    records = _records()
    floor = summarise_floor(records, spec)
    fig = plot_metric_bars(summarise(records, spec, floor=floor), spec, tmp_path / "m.png", floor)
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == [
        "seg: Dice (%)",
        "dose: MAE (Gy)",
        "dose: whole-volume MAE (Gy)",
    ]
    for ax, key in zip(fig.axes, ("seg", "dose", "whole_volume_mae")):
        (line,) = _floor_lines(ax)
        assert line.get_linestyle() == "--" and set(line.get_ydata()) == {FLOOR[key]}
        low, high = ax.get_ylim()
        assert low < FLOOR[key] < high
    fig = plot_metric_bars(summarise(records, spec), spec, tmp_path / "m.png")  # no floor: no line
    assert not any(_floor_lines(ax) for ax in fig.axes)


def test_compare_learning_curves_put_the_floor_in_its_metric_panel(tmp_path: Path) -> None:
    run_dirs = {}
    for arch, floor in (("stl", 30.0), ("ctan", 30.0)):
        run = tmp_path / arch
        run.mkdir()
        history = {
            "val_mean_dice": [[1, 20.0], [2, 40.0]],
            "val_floor_mean_dice": [[1, 29.0], [2, floor]],
            "train_loss_seg": [[1, 1.0], [2, 0.5]],
        }
        (run / "metrics_history.json").write_text(json.dumps(history))
        run_dirs[arch] = [run]
    keys = ["train_loss_seg", "val_mean_dice", "val_floor_mean_dice", "val_dose_mae"]
    fig = plot_compare_curves(run_dirs, keys, tmp_path / "lc.png")
    assert [ax.get_title() for ax in fig.axes] == ["train_loss_seg", "val_mean_dice"]  # no floor panel
    loss, dice = fig.axes
    assert not _floor_lines(loss)
    (line,) = _floor_lines(dice)
    assert line.get_label() == "floor" and set(line.get_ydata()) == {30.0}  # the latest epoch's value
    assert plot_compare_curves(run_dirs, ["val_floor_mean_dice"], tmp_path / "x.png") is None


def test_split_floor_keys() -> None:
    names = ["val_mean_dice", "val_floor_mean_dice", "val_balanced_accuracy", "val_floor_balanced_accuracy"]
    names += ["val_floor_prior_balanced_accuracy", "val_floor_prior_accuracy", "val_key_metric", "val_floor_dvh_score"]
    panels, lines = split_floor_keys(names)
    assert panels == ["val_mean_dice", "val_balanced_accuracy", "val_key_metric"]  # val_key_metric stays a panel
    assert lines == {
        "val_floor_mean_dice": ("val_mean_dice", "floor"),
        "val_floor_balanced_accuracy": ("val_balanced_accuracy", "floor"),
        "val_floor_prior_balanced_accuracy": ("val_balanced_accuracy", "floor (prior)"),
    }  # floors whose metric has no panel are not drawn


def test_run_learning_curves_draw_floors_as_reference_lines(tmp_path: Path) -> None:
    history = {
        "train_loss_seg": [(1, 1.0), (2, 0.8)],
        "val_mean_dice": [(1, 40.0), (2, 55.0)],
        "val_floor_mean_dice": [(1, 63.4), (2, 63.4)],
        "val_dose_mae": [(1, 9.0), (2, 6.0)],
        "val_floor_dose_mae": [(1, 5.7), (2, 5.7)],
        "val_floor_dice_Brainstem": [(1, 70.0), (2, 70.0)],  # its metric is not in the history: not drawn
        "val_key_metric": [(1, 0.1), (2, 0.2)],
    }
    fig = plot_learning_curves(history, tmp_path / "lc.png")
    assert (tmp_path / "lc.png").stat().st_size > 0
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(panels) == ["train_loss_seg", "val_mean_dice", "val_dose_mae", "val_key_metric"]
    for name, value in (("val_mean_dice", 63.4), ("val_dose_mae", 5.7)):
        (line,) = _floor_lines(panels[name])
        assert line.get_label() == "floor" and line.get_linestyle() == "--" and set(line.get_ydata()) == {value}
    assert not _floor_lines(panels["train_loss_seg"]) and not _floor_lines(panels["val_key_metric"])
    assert plot_learning_curves({"val_floor_mean_dice": [(1, 63.4)]}, tmp_path / "none.png") is None


def test_metrics_history_handler_records_floors_and_draws_them_as_lines(tmp_path: Path, monkeypatch) -> None:
    drawn = []
    original = figures.plot_learning_curves
    monkeypatch.setattr(figures, "plot_learning_curves", lambda h, p: drawn.append(original(h, p)) or drawn[-1])
    trainer = Engine(lambda engine, batch: None)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _metrics(engine: Engine) -> None:
        engine.state.metrics.update(val_mean_dice=10.0 * engine.state.epoch, val_floor_mean_dice=25.0)

    MetricsHistoryHandler(tmp_path).attach(trainer)
    trainer.run([0], max_epochs=2)
    history = json.loads((tmp_path / "metrics_history.json").read_text())
    assert history["val_floor_mean_dice"] == [[1, 25.0], [2, 25.0]]  # recorded like every metric
    fig = drawn[-1]
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["val_mean_dice"]
    assert [line.get_label() for line in _floor_lines(fig.axes[0])] == ["floor"]
