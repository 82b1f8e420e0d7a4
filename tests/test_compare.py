"""The comparison command: table arithmetic on hand values, settings checks, and a tiny end-to-end comparison on the
OpenKBP demo that is killed after its first run and resumed without redoing it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from ctan_monai.compare import (
    RunPlan,
    job_environments,
    load_comparison_spec,
    prepare_data,
    run_plans,
    summarise,
)
from ctan_monai.compare.__main__ import parse_overrides
from ctan_monai.compare.plots import bar_axis_limits
from ctan_monai.compare.table import format_markdown, to_csv
from tests.conftest import OPENKBP_BUNDLE, REPO_ROOT


def _record(arch: str, seed: int, seg: float, dose: float) -> dict:
    return {"arch": arch, "seed": seed, "metrics": {"seg": seg, "dose": dose}, "timings": {"train_s": 10.0}}


def test_summary_matches_hand_computed_deltas_and_ranks():
    spec = load_comparison_spec(OPENKBP_BUNDLE)
    records = [
        _record("stl", 0, 70.0, 2.0),
        _record("stl", 1, 72.0, 2.2),
        _record("ctan", 0, 77.0, 1.8),  # seg +10 %, dose +10 % (lower MAE is better)
        _record("ctan", 1, 79.2, 1.98),  # seg +10 %, dose +10 %
        _record("hps", 0, 63.0, 2.2),  # seg -10 %, dose -10 %
        _record("hps", 1, 72.0, 2.2),  # seg 0 %, dose 0 %
    ]
    rows = summarise(records, spec)
    assert [r["arch"] for r in rows] == ["ctan", "stl", "hps"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    ctan, stl, hps = rows
    assert math.isclose(ctan["tasks"]["seg"]["delta_mean"], 10.0)
    assert math.isclose(ctan["tasks"]["dose"]["delta_mean"], 10.0)
    assert math.isclose(ctan["delta_mean"], 10.0) and math.isclose(ctan["delta_mean_std"], 0.0, abs_tol=1e-9)
    assert math.isclose(stl["delta_mean"], 0.0)
    assert math.isclose(hps["tasks"]["seg"]["delta_mean"], -5.0)
    assert math.isclose(hps["tasks"]["seg"]["delta_std"], math.sqrt(50.0))
    assert math.isclose(hps["tasks"]["seg"]["mean"], 67.5) and math.isclose(hps["tasks"]["seg"]["std"], math.sqrt(40.5))
    # CTAN's seg gain (78.1 vs 71.0, spreads 1.56 and 1.41) is far beyond seed noise; HPS's (67.5, spread 6.4) is not
    assert ctan["tasks"]["seg"]["beyond_noise"] and not hps["tasks"]["seg"]["beyond_noise"]
    assert not stl["tasks"]["seg"]["beyond_noise"]
    markdown = format_markdown(rows, spec)
    assert markdown.splitlines()[2].startswith("| CTAN | 2 | 78.10 ± 1.56 | +10.00 ± 0.00 * |")
    csv_lines = to_csv(rows, spec).splitlines()
    assert csv_lines[0].startswith("arch,n_seeds,rank,delta_mean") and len(csv_lines) == 4


def test_summary_needs_the_stl_baseline_and_keeps_undefined_metrics_visible():
    spec = load_comparison_spec(OPENKBP_BUNDLE)
    with pytest.raises(ValueError, match="no finished 'stl' run"):
        summarise([_record("ctan", 0, 70.0, 2.0)], spec)
    rows = summarise([_record("stl", 0, 70.0, 2.0), _record("ctan", 0, float("nan"), 1.0)], spec)
    ctan = next(r for r in rows if r["arch"] == "ctan")
    assert math.isnan(ctan["tasks"]["seg"]["delta_mean"]) and math.isnan(ctan["delta_mean"])
    assert "n/a" in format_markdown(rows, spec)
    # one seed has no spread: no "± 0.00" that would read as a measured zero
    rows = summarise([_record("stl", 0, 70.0, 2.0), _record("ctan", 0, 77.0, 1.8)], spec)
    assert math.isnan(rows[0]["tasks"]["seg"]["std"]) and not rows[0]["tasks"]["seg"]["beyond_noise"]
    table = format_markdown(rows, spec)
    # a record without the extra metric (whole-volume MAE) shows n/a there; Delta stays over the two task metrics
    assert "| CTAN | 1 | 77.00 | +10.00 | 1.80 | +10.00 | n/a | +10.00 | 1 |" in table
    assert "±" not in table.split("\n", 2)[2]


def test_overrides_and_spec_errors(tmp_path):
    assert parse_overrides(["epochs=3", "train_slices_per_epoch=null", "amp=false"]) == {
        "epochs": 3,
        "train_slices_per_epoch": None,
        "amp": False,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["epochs"])
    with pytest.raises(ValueError, match="sets 'arch' itself"):
        parse_overrides(["arch=ctan"])
    with pytest.raises(FileNotFoundError, match="no comparison settings"):
        load_comparison_spec(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "compare.yaml").write_text("report: r.json\nmetrics:\n  seg: {path: a.b}\n")
    with pytest.raises(ValueError, match="needs 'path' and 'higher_is_better'"):
        load_comparison_spec(tmp_path)


@pytest.mark.parametrize("bundle", sorted(p.name for p in (REPO_ROOT / "bundles").iterdir() if p.is_dir()))
def test_every_bundle_declares_a_comparison(bundle):
    spec = load_comparison_spec(REPO_ROOT / "bundles" / bundle)
    assert len(spec.metrics) == 2 and set(spec.paper) == {"stl", "hps", "mtan", "ctan"}
    train = ConfigParser()
    train.read_config(str(spec.bundle / spec.train_config))
    assert spec.prepare_id in train and spec.evaluate_id in ConfigParser.load_config_files(
        [str(spec.bundle / spec.train_config), str(spec.bundle / spec.evaluate_config)]
    )
    assert train["task_names"] == spec.tasks


def test_job_environments_share_the_cores_and_spread_the_gpus():
    assert job_environments(1, cpu_count=8) == [{}]  # one job: the user's own settings, untouched
    assert job_environments(1, gpus=["3"], cpu_count=8) == [{"CUDA_VISIBLE_DEVICES": "3"}]
    slots = job_environments(3, gpus=["0", "1"], cpu_count=8)
    assert [s["OMP_NUM_THREADS"] for s in slots] == ["2", "2", "2"]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0"]
    assert job_environments(4, cpu_count=2)[0]["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ValueError, match="at least 1"):
        job_environments(0)


def _plans(n: int) -> list[RunPlan]:
    return [RunPlan(arch="hps", seed=s, run_dir=Path(f"/nonexistent/{s}"), overrides={}) for s in range(n)]


def test_run_plans_runs_in_parallel_slots_in_order():
    running, peak, seen = [0], [0], []
    lock = threading.Lock()

    def execute(plan, env):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            seen.append((plan.seed, env["CUDA_VISIBLE_DEVICES"]))
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return {"seed": plan.seed}

    records, failed = run_plans(_plans(5), execute, job_environments(2, gpus=["0", "1"]))
    assert failed == [] and sorted(records) == [f"hps_seed{s}" for s in range(5)]
    assert peak[0] == 2  # two at a time, never more
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4]  # started in plan order
    assert {gpu for _, gpu in seen} == {"0", "1"}


def test_run_plans_stops_after_a_failure_unless_keep_going():
    def execute(plan, env):
        if plan.seed == 1:
            raise RuntimeError("training failed")
        if plan.seed == 3:
            raise KeyError("report has no 'summary.mean_dice'")  # not lost in a worker thread either
        return {"seed": plan.seed}

    records, failed = run_plans(_plans(4), execute, [{}])
    assert sorted(records) == ["hps_seed0"] and failed == ["hps_seed1"]  # nothing started after the failure
    records, failed = run_plans(_plans(4), execute, [{}], keep_going=True)
    assert sorted(records) == ["hps_seed0", "hps_seed2"] and failed == ["hps_seed1", "hps_seed3"]
    records, failed = run_plans(_plans(4), execute, job_environments(2), keep_going=True)
    assert sorted(records) == ["hps_seed0", "hps_seed2"] and sorted(failed) == ["hps_seed1", "hps_seed3"]


def test_prepare_data_converts_once_before_parallel_runs(bundle_copy: Path, tmp_path: Path):
    (bundle_copy / "configs" / "compare.yaml").write_text((OPENKBP_BUNDLE / "configs" / "compare.yaml").read_text())
    spec = load_comparison_spec(bundle_copy)
    plan = RunPlan("hps", 0, tmp_path / "hps_seed0", {"output_dir": str(tmp_path / "hps_seed0")})
    prepare_data(plan, spec, env={"OMP_NUM_THREADS": "1"})
    assert (bundle_copy / "cache" / "openkbp" / "manifest.json").is_file()
    assert "converted" in (tmp_path / "hps_seed0" / "prepare.log").read_text()
    missing = {"dataset_dir": str(tmp_path / "nowhere"), "cache_dir": str(tmp_path / "no_cache")}
    bad = RunPlan("hps", 0, tmp_path / "bad", missing)
    with pytest.raises(RuntimeError, match="prepare.log"):
        prepare_data(bad, spec)


def _compare(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    # two threads unless the caller's environment asks for fewer (a shared machine)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.Popen(
        [sys.executable, "-m", "ctan_monai.compare", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_tiny_comparison_is_killed_and_resumes(bundle_copy: Path, tmp_path: Path):
    """Two architectures, one epoch of 8 slices each on the demo: kill the comparison once STL has finished, rerun
    the same command: STL is kept (not retrained), HPS completes, the table is well-formed."""
    (bundle_copy / "configs" / "compare.yaml").write_text((OPENKBP_BUNDLE / "configs" / "compare.yaml").read_text())
    out_dir = tmp_path / "cmp"
    args = ["--bundle", str(bundle_copy), "--archs", "stl", "hps", "--seeds", "0", "--output_dir", str(out_dir)]
    args += ["--set", "epochs=1", "--set", "train_slices_per_epoch=8", "--set", "batch_size=4"]
    # one validation patient of the demo's two, in the training's validation and in the evaluation alike
    args += ["--set", "validate#dataset#data=$@data['validation-pats'][:1]"]
    args += ["--set", "val_interval=2", "--set", "eval_figures=0", "--set", "summary_untrained=False"]
    stl_record = out_dir / "runs" / "stl_seed0" / "run.json"
    proc = _compare(args, tmp_path, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if stl_record.is_file() and json.loads(stl_record.read_text()).get("status") == "finished":
            break
        time.sleep(1)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    finished_at = stl_record.stat().st_mtime_ns
    assert not (out_dir / "table.md").exists()

    proc = _compare([*args, "--jobs", "2"], tmp_path)  # two job slots: the CPU threads are shared between them
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "stl_seed0: finished earlier, kept" in out
    assert stl_record.stat().st_mtime_ns == finished_at
    runs = json.loads((out_dir / "runs.json").read_text())["runs"]
    assert sorted(r["arch"] for r in runs) == ["hps", "stl"]
    hps = next(r for r in runs if r["arch"] == "hps")
    assert hps["job_environment"] == {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}
    for record in runs:
        assert record["status"] == "finished" and record["environment"]["torch"]
        assert 0.0 <= record["metrics"]["seg"] <= 100.0 and record["metrics"]["dose"] >= 0.0
        assert record["timings"]["train_s"] > 0
    for arch in ("stl", "hps"):  # the override reached the evaluation: one patient evaluated
        cases = (out_dir / "runs" / f"{arch}_seed0" / "evaluation" / "cases.csv").read_text().strip().splitlines()
        assert len(cases) == 2, cases
    for record in runs:  # the extra metric and every floor come from the run's report
        assert record["extra_metrics"]["whole_volume_mae"] >= 0.0
        assert set(record["floor"]) == {"seg", "dose", "whole_volume_mae"}
        assert all(v is not None for v in record["floor"].values())
    for key, value in runs[0]["floor"].items():  # one split, one floor
        assert math.isclose(value, runs[1]["floor"][key], rel_tol=1e-6)
    table = (out_dir / "table.md").read_text().splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("| Method"))
    assert {table[header + 2].split(" | ")[0], table[header + 3].split(" | ")[0]} == {"| STL", "| HPS"}
    assert "whole-volume MAE (Gy) ↓" in table[header]
    assert table[header + 4].startswith("| floor (training split: mean training dose × possible-dose mask")
    assert "floor (training split:" in "\n".join(table[header + 5 :])  # its legend
    csv_rows = (out_dir / "table.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[-1].startswith("floor,")
    assert (out_dir / "metrics.png").stat().st_size > 0 and (out_dir / "learning_curves.png").stat().st_size > 0

    # the same output folder with other settings is refused instead of mixing unlike runs
    proc = _compare([*args[:-2], "--set", "eval_figures=1"], tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "finished with other settings" in out


def test_bar_axis_shows_every_error_bar_whole() -> None:
    # the OpenKBP dose panel once zoomed to the bars and cut every seed spread off
    means, stds = [13.12, 13.80, 13.05, 13.64], [3.34, 1.20, 1.97, 1.44]
    low, high = bar_axis_limits(means, stds)
    assert low <= min(m - s for m, s in zip(means, stds))
    assert high >= max(m + s for m, s in zip(means, stds))
    assert low > 0  # still zoomed in, not from zero


def test_bar_axis_without_spread_or_values() -> None:
    low, high = bar_axis_limits([15.0, 36.6], [math.nan, math.nan])  # one seed: no error bars
    assert 0 <= low < 15.0 and high > 36.6
    assert bar_axis_limits([math.nan], [math.nan]) is None
    low, _ = bar_axis_limits([-2.0, 1.0], [0.5, 0.5])  # negative values are not clipped at zero
    assert low < -2.5
