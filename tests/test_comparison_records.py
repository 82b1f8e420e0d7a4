"""benchmarks/comparison_records.py: a comparison's finished runs kept as records, restored so compare skips them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ctan_monai.compare.runner import RunPlan, load_finished_run
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import comparison_records  # noqa: E402


def _finished_run(runs_dir: Path, arch: str, seed: int, dice: float) -> Path:
    """A run folder as compare leaves it: run.json, metrics_history.json, the evaluation report, a checkpoint."""
    run_dir = runs_dir / f"{arch}_seed{seed}"
    (run_dir / "evaluation").mkdir(parents=True)
    (run_dir / "models").mkdir()
    (run_dir / "models" / "model.pt").write_bytes(b"weights")
    overrides = {"epochs": 2, "arch": arch, "seed": seed, "output_dir": str(run_dir)}
    record = {
        "arch": arch,
        "seed": seed,
        "status": "finished",
        "overrides": overrides,
        "metrics": {"seg": dice, "dose": 9.0},
        "extra_metrics": {"whole_volume_mae": 0.3},
        "floor": {},
        "timings": {"train_s": 100.0},
    }
    (run_dir / "run.json").write_text(json.dumps(record))
    (run_dir / "metrics_history.json").write_text(json.dumps({"val_mean_dice": [[2, dice]]}))
    summary = {"mean_dice": dice, "dose_score": 9.0, "dvh_score": 12.5, "dice": {"Brainstem": 70.0}}
    (run_dir / "evaluation" / "report.json").write_text(json.dumps({"summary": summary, "cases": [1, 2, 3]}))
    return run_dir


def test_save_then_restore_lets_compare_skip_the_run(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    run_dir = _finished_run(runs_dir, "ctan", 0, 65.0)
    (runs_dir / "stl_seed0").mkdir()
    (runs_dir / "stl_seed0" / "run.json").write_text(json.dumps({"status": "running"}))
    records = tmp_path / "records"
    assert comparison_records.save(runs_dir, records) == ["ctan_seed0"]
    kept = sorted(p.name for p in (records / "ctan_seed0").iterdir())
    assert kept == ["metrics_history.json", "report_summary.json", "run.json"]  # no checkpoint, no per-case list
    assert "cases" not in json.loads((records / "ctan_seed0" / "report_summary.json").read_text())

    # the machine is replaced: the run's folder is gone, then restored at its path
    original = json.loads((run_dir / "run.json").read_text())
    for path in sorted(runs_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    assert comparison_records.restore(records, runs_dir) == ["ctan_seed0"]
    plan = RunPlan(arch="ctan", seed=0, run_dir=run_dir, overrides=original["overrides"])
    assert load_finished_run(plan) == original
    assert comparison_records.restore(records, runs_dir) == []  # already there: left alone


def test_restore_refuses_another_folder(tmp_path: Path) -> None:
    records = tmp_path / "records"
    _finished_run(tmp_path / "runs", "hps", 1, 60.0)
    comparison_records.save(tmp_path / "runs", records)
    with pytest.raises(ValueError, match="the run was made in"):
        comparison_records.restore(records, tmp_path / "elsewhere")


def test_rows_per_run_in_architecture_order(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    _finished_run(runs_dir, "ctan", 0, 65.0)
    _finished_run(runs_dir, "stl", 1, 61.0)
    _finished_run(runs_dir, "stl", 0, 60.0)
    records = tmp_path / "records"
    comparison_records.save(runs_dir, records)
    (records / "stl_seed1" / "report_summary.json").unlink()  # a record without report: n/a where it is needed
    table = comparison_records.rows(records, "openkbp").splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| STL seed 0", "| STL seed 1", "| CTAN seed 0"]
    assert table[2].split(" | ")[1:4] == ["60.00", "9.00", "12.50"]
    assert table[3].split(" | ")[3] == "n/a"
    assert comparison_records.main(["rows", "--records", str(tmp_path / "missing"), "--kind", "openkbp"]) == 2


def test_ham_rows_list_recall_in_the_class_order_of_the_header(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    run_dir = _finished_run(runs_dir, "ctan", 0, 90.0)
    recall = {name: float(i) for i, name in reversed(list(enumerate(comparison_records.HAM10000_CLASSES)))}
    summary = {"segmentation": {"mean_dice": 90.0}, "classification": {"balanced_accuracy": 60.0, "recall": recall}}
    (run_dir / "evaluation" / "report.json").write_text(json.dumps({"summary": summary}))
    records = tmp_path / "records"
    comparison_records.save(runs_dir, records)
    header, _, row = comparison_records.rows(records, "ham10000").splitlines()
    assert "recall akiec / bcc / bkl / df / mel / nv / vasc (%)" in header
    assert row.split(" | ")[4] == "0 / 1 / 2 / 3 / 4 / 5 / 6"
