"""Tests of benchmarks/throughput.py: a tiny CPU run of the command line through its GPU code path (bf16 autocast,
channels-last, the OpenKBP data pipeline on demo data), and its building blocks."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "throughput.py"
ARCHS = ["hps", "ctan"]
TINY_ARGS = [
    "--backbone",
    "resnet18",
    "--size",
    "64",
    "--batch",
    "2",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--archs",
    *ARCHS,
    "--amp",
    "bf16",
    "--channels_last",
    "--pipeline_patients",
    "2",
    "--pipeline_batches",
    "4",
    "--volume_slices",
    "8",
    "--volume_repeats",
    "1",
    "--profile",
    "5",
]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("throughput_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tp() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny CPU run of the command line: its JSON, Markdown file and stdout."""
    out = tmp_path_factory.mktemp("throughput")
    command = [
        sys.executable,
        str(SCRIPT),
        *TINY_ARGS,
        "--data_root",
        str(out / "data"),
        "--output",
        str(out / "report.json"),
        "--markdown",
        str(out / "report.md"),
    ]
    done = subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "json": json.loads((out / "report.json").read_text()),
        "markdown": (out / "report.md").read_text(),
        "stdout": done.stdout,
        "dir": out,
    }


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_report_records_machine_and_options(tiny_run: dict[str, Any]) -> None:
    report = tiny_run["json"]
    assert report["schema"] == "ctan_monai.benchmarks.throughput/1"
    machine = report["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["cpu_model"] and machine["cpu_count"] >= 1 and machine["device"] == "cpu"
    options = report["options"]
    assert options["amp"] == "bf16" and options["channels_last"] is True
    assert options["archs"] == ARCHS and options["repeats"] == 2 and options["warmup"] == 1
    assert list(report["settings"]) == ["openkbp"]
    setting = report["settings"]["openkbp"]["setting"]
    assert (setting["backbone"], setting["size"], setting["batch"]) == ("resnet18", 64, 2)
    assert [t["name"] for t in setting["tasks"]] == ["seg", "dose"]
    # no stray temporary files of the atomic writer
    assert sorted(p.name for p in tiny_run["dir"].iterdir()) == ["data", "report.json", "report.md"]


def test_model_figures_are_positive_and_consistent(tiny_run: dict[str, Any]) -> None:
    result = tiny_run["json"]["settings"]["openkbp"]
    assert list(result["archs"]) == ARCHS
    for arch, r in result["archs"].items():
        for key in (
            "params_m",
            "gflops_forward_per_sample",
            "gflops_train_step_per_sample",
            "train_samples_per_s",
            "inference_ms_per_sample",
            "train_peak_mib",
            "inference_peak_mib",
        ):
            assert _positive(r[key]), (arch, key, r[key])
        assert len(r["train_step_s"]["times"]) == 2 and all(_positive(t) for t in r["train_step_s"]["times"])
        assert len(r["inference_batch_s"]["times"]) == 2
        assert r["train_step_s"]["min"] <= r["train_step_s"]["median"]
        assert r["train_samples_per_s"] == pytest.approx(2 / r["train_step_s"]["median"])
        assert r["gflops_train_step_per_sample"] > r["gflops_forward_per_sample"]  # backward costs FLOPs too
        assert r["train_peak_mib"] > r["inference_peak_mib"]  # gradients and Adam state
        assert _positive(r["volume_inference_s"]["median"]) and len(r["volume_inference_s"]["times"]) == 1
        for ratio in ("train_step_x_hps", "inference_x_hps", "volume_inference_x_hps"):
            assert _positive(r[ratio])
    hps, ctan = result["archs"]["hps"], result["archs"]["ctan"]
    assert hps["train_step_x_hps"] == 1.0 and hps["inference_x_hps"] == 1.0
    pairs = zip(ctan["train_step_s"]["times"], hps["train_step_s"]["times"])
    assert ctan["train_step_x_hps"] == pytest.approx(sum(c / h for c, h in pairs) / 2)
    assert result["volume_inference"]["slices"] == 8
    assert "SliceInferer" in result["volume_inference"]["method"]
    assert "VmHWM" in result["memory_method"] or "ru_maxrss" in result["memory_method"]


def test_pipeline_measured_against_the_models(tiny_run: dict[str, Any]) -> None:
    result = tiny_run["json"]["settings"]["openkbp"]
    pipeline = result["pipeline"]
    assert pipeline["status"] == "measured", pipeline
    assert "AxialSliceDataset" in pipeline["description"] and pipeline["data"] == "demo"
    assert pipeline["workers"] == 0 and pipeline["pin_memory"] is False
    assert pipeline["batch_size_samples"] == 2 and pipeline["timed_batches"] == 4
    assert _positive(pipeline["samples_per_s"]) and _positive(pipeline["setup_s"])
    assert set(pipeline["ratio_to_model"]) == set(ARCHS)
    for arch, ratio in pipeline["ratio_to_model"].items():
        expected = pipeline["samples_per_s"] / result["archs"][arch]["train_samples_per_s"]
        assert ratio == pytest.approx(expected)
    assert pipeline["min_ratio"] == pytest.approx(min(pipeline["ratio_to_model"].values()))
    assert pipeline["meets_target"] == (pipeline["min_ratio"] >= 5.0)
    checks = {(t["check"], t["setting"]) for t in tiny_run["json"]["targets"]}
    assert checks == {("ctan_vs_hps_train_step", "openkbp"), ("pipeline_vs_model", "openkbp")}  # no MTAN measured
    # the demo data were written under --data_root and reused by the cache
    assert (tiny_run["dir"] / "data" / "openkbp" / "demo" / "provided-data" / "train-pats" / "pt_2").is_dir()


def test_profile_of_one_step(tiny_run: dict[str, Any]) -> None:
    profiles = tiny_run["json"]["settings"]["openkbp"]["profile"]
    assert set(profiles) == set(ARCHS)
    for arch, found in profiles.items():
        assert _positive(found["step_s"]) and _positive(found["total_self_cpu_ms"])
        times = [r["self_cpu_ms"] for r in found["operators"]]
        assert len(times) == 5 and times == sorted(times, reverse=True) and sum(times) <= found["total_self_cpu_ms"]
        modules = {r["name"] for r in found["modules"]}
        assert {"module:encoder", "module:decoders.seg", "module:decoders.dose"} <= modules
        assert ("module:ctab" in modules) == (arch == "ctan")
    assert "Profile of one training step, ctan" in tiny_run["markdown"]


def test_markdown_tables(tiny_run: dict[str, Any]) -> None:
    text = tiny_run["markdown"]
    assert text.strip() in tiny_run["stdout"]
    assert "| arch | params (M) | GFLOPs fwd/sample | train step (s) | x HPS |" in text
    rows = [line for line in text.splitlines() if line.startswith("| hps |") or line.startswith("| ctan |")]
    assert len(rows) == 2 and all(len(r.strip("|").split("|")) == 12 for r in rows)
    assert "samples/s" in text and "### Targets" in text and "pipeline_vs_model" in text


def test_round_robin_orders_interleave(tp: ModuleType) -> None:
    orders = tp.round_robin_orders(["stl", "hps", "mtan", "ctan"], 6)
    assert len(orders) == 6
    assert all(sorted(order) == ["ctan", "hps", "mtan", "stl"] for order in orders)
    assert [order[0] for order in orders] == ["stl", "hps", "mtan", "ctan", "stl", "hps"]
    assert tp.round_robin_orders([], 3) == []


def test_paired_ratio(tp: ModuleType) -> None:
    # a load spike in repeat 3 hits both architectures alike and cancels in the paired ratio
    assert tp.paired_ratio([1.2, 1.2, 4.8], [1.0, 1.0, 4.0]) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="equally long"):
        tp.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        tp.paired_ratio([1.0], [0.0])


def test_settings_and_overrides(tp: ModuleType) -> None:
    paper = tp.SETTINGS["openkbp"]
    assert (paper.backbone, paper.size, paper.batch, paper.in_channels, paper.volume_slices) == (
        "resnet50",
        128,
        8,
        1,
        128,
    )
    assert tp.SETTINGS["prostate"].batch == 32
    chosen = tp.resolve_settings(["all"], backbone="resnet18", size=96)
    assert [s.name for s in chosen] == ["openkbp", "ham10000", "stoic", "prostate"]
    assert all(s.backbone == "resnet18" and s.size == 96 for s in chosen)
    with pytest.raises(ValueError, match="unknown setting"):
        tp.resolve_settings(["brats"])
    with pytest.raises(ValueError, match="multiple of 32"):
        tp.resolve_settings(["openkbp"], size=100)


@pytest.mark.parametrize("name", ["openkbp", "ham10000", "stoic", "prostate"])
def test_synthetic_batch_fits_the_multitask_loss(tp: ModuleType, name: str) -> None:
    from ctan_monai.losses import MultiTaskLoss

    setting = replace(tp.SETTINGS[name], batch=3, size=32)
    batch = tp.synthetic_batch(setting)
    assert batch["image"].shape == (3, setting.in_channels, 32, 32)
    outputs = {}
    for task in setting.task_specs():
        shape = (3, task.out_channels, 32, 32) if task.level == "pixel" else (3, task.out_channels)
        outputs[task.name] = torch.randn(shape, requires_grad=True)
    loss = MultiTaskLoss(setting.tasks)(outputs, batch)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()


def test_bad_arguments_fail_up_front(tp: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert tp.main(["--archs", "hps", "unet", "--output", "never.json"]) == 2
    assert "unknown or no architecture" in capsys.readouterr().err
    assert tp.main(["--settings", "brats"]) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert tp.main(["--dataset_dir", "openkbp"]) == 2
    assert "SETTING=PATH" in capsys.readouterr().err
    assert tp.main(["--dataset_dir", "openkbp=/does/not/exist"]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert tp.main(["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not Path("never.json").exists()


def test_pipeline_skips_and_failures_are_recorded(tp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    setting = replace(tp.SETTINGS["openkbp"], batch=2, size=32)
    options = tp.BenchmarkOptions()

    def missing(*_: Any) -> Any:
        raise tp.PipelineUnavailableError("nibabel cannot be imported")

    def no_module(*_: Any) -> Any:
        raise ModuleNotFoundError("No module named 'SimpleITK'")

    def broken(*_: Any) -> Any:
        raise FileNotFoundError("no patients")

    monkeypatch.setitem(tp.PIPELINES, "openkbp", missing)
    assert tp.benchmark_pipeline(setting, options) == {
        "status": "skipped",
        "note": "PipelineUnavailableError: nibabel cannot be imported",
    }
    monkeypatch.setitem(tp.PIPELINES, "openkbp", no_module)
    assert tp.benchmark_pipeline(setting, options) == {
        "status": "skipped",
        "note": "ModuleNotFoundError: No module named 'SimpleITK'",
    }
    monkeypatch.setitem(tp.PIPELINES, "openkbp", broken)
    assert tp.benchmark_pipeline(setting, options) == {"status": "failed", "note": "FileNotFoundError: no patients"}
    monkeypatch.delitem(tp.PIPELINES, "openkbp")
    assert tp.benchmark_pipeline(setting, options)["status"] == "skipped"


def test_resident_peak_sees_a_large_allocation(tp: ModuleType) -> None:
    if not tp.ResidentPeak.available():
        pytest.skip("the resident high-water mark cannot be reset here")
    with tp.ResidentPeak() as peak:
        block = torch.ones(2**24)  # 64 MiB, touched
        del block
    assert peak.bytes >= 0.9 * 2**26
    with tp.ResidentPeak() as small:
        pass
    assert small.bytes < 2**25


def test_a_failing_setting_keeps_the_others(tp: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_benchmark(setting: Any, archs: Any, options: Any) -> dict[str, Any]:
        if setting.name == "stoic":
            raise RuntimeError("CUDA out of memory")
        return {
            "setting": {},
            "summary": setting.summary(),
            "status": "measured",
            "archs": {},
            "volume_inference": None,
            "memory_method": "test",
            "profile": {},
        }

    monkeypatch.setattr(tp, "benchmark_setting", fake_benchmark)
    settings = tp.resolve_settings(["stoic", "openkbp"], backbone="resnet18", size=32, batch=2)
    output = tmp_path / "report.json"
    report = tp.run(settings, ["hps"], tp.BenchmarkOptions(pipelines=False), output)
    assert report["settings"]["stoic"]["status"] == "failed"
    assert report["settings"]["stoic"]["error"] == "RuntimeError: CUDA out of memory"
    assert report["settings"]["openkbp"]["status"] == "measured"
    assert json.loads(output.read_text())["settings"]["stoic"]["status"] == "failed"
    assert "Model benchmark failed: RuntimeError: CUDA out of memory" in tp.markdown_report(report)


def test_a_failing_profile_keeps_the_timings(tp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_profiler(*_: Any) -> Any:
        raise RuntimeError("CUPTI not available")

    # patched where benchmark_setting looks it up (its module in benchmarks/throughput_lib)
    monkeypatch.setattr(sys.modules[tp.benchmark_setting.__module__], "profile_train_step", no_profiler)
    setting = tp.resolve_settings(["openkbp"], backbone="resnet18", size=32, batch=2)[0]
    options = tp.BenchmarkOptions(warmup=0, repeats=1, volume_repeats=0, cpu_memory="off", profile=3)
    result = tp.benchmark_setting(setting, ["hps"], options)
    assert result["status"] == "measured" and _positive(result["archs"]["hps"]["train_step_s"]["median"])
    assert result["profile"] == {"hps": {"error": "RuntimeError: CUPTI not available"}}
    report = {"machine": tp.machine_info(options), "options": asdict(options), "settings": {"openkbp": result}}
    text = tp.markdown_report(report)
    assert "Profile of hps failed: RuntimeError: CUPTI not available" in text and "| hps | " in text


def _require_libmtl() -> None:
    if importlib.util.find_spec("LibMTL") is None:  # CI installs it (README: Test)
        pytest.skip("the peer benchmark needs: pip install --no-deps LibMTL==1.1.5")


def test_libmtl_peers_side_by_side(tp: ModuleType) -> None:
    """LibMTL's HPS and MTAN run in the same round-robin as ours, with every ratio to each peer reported."""
    _require_libmtl()
    setting = replace(tp.SETTINGS["openkbp"], backbone="resnet18", size=64, batch=2)
    options = tp.BenchmarkOptions(warmup=1, repeats=2, volume_repeats=0, pipelines=False, cpu_memory="off")
    archs = ["hps", "ctan", "libmtl_hps", "libmtl_mtan"]
    report = tp.run([setting], archs, options)
    result = report["settings"]["openkbp"]
    assert result["status"] == "measured"
    figures = result["archs"]
    for arch in archs:
        for peer in ("libmtl_hps", "libmtl_mtan"):
            assert _positive(figures[arch][f"train_step_x_{peer}"]), (arch, peer)
            assert _positive(figures[arch][f"inference_x_{peer}"]), (arch, peer)
    assert figures["libmtl_hps"]["train_step_x_libmtl_hps"] == pytest.approx(1.0)
    # LibMTL's MTAN adds attention modules to the same encoder, its HPS does not
    assert figures["libmtl_mtan"]["params_m"] > figures["libmtl_hps"]["params_m"]
    text = tp.markdown_report(report)
    assert "| arch | train step x libmtl_hps | train step x libmtl_mtan |" in text
    assert sum(line.startswith("| libmtl_mtan |") for line in text.splitlines()) == 2


def test_peer_outputs_follow_our_convention() -> None:
    """A peer network returns our ``{task: output}`` dict: pixel maps at the input size, logits per image."""
    _require_libmtl()
    sys.path.insert(0, str(SCRIPT.parent))
    from throughput_lib.peers import build_libmtl_network
    from throughput_lib.settings import SETTINGS

    for name in ("openkbp", "ham10000"):
        setting = replace(SETTINGS[name], backbone="resnet18", size=64)
        net = build_libmtl_network("libmtl_mtan", setting, torch.device("cpu")).eval()
        with torch.no_grad():
            out = net(torch.zeros(2, setting.in_channels, 64, 64))
        for task in setting.task_specs():
            expected = (2, task.out_channels, 64, 64) if task.level == "pixel" else (2, task.out_channels)
            assert tuple(out[task.name].shape) == expected, (name, task.name)


def test_missing_peer_library_is_named_up_front(tp: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import importlib.util as util

    real_find_spec = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "LibMTL" else real_find_spec(name, *a))
    assert tp.main(["--peers", "--output", "never.json"]) == 2
    assert "pip install --no-deps LibMTL==1.1.5" in capsys.readouterr().err
    assert not Path("never.json").exists()
