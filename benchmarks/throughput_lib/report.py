"""The report: the machine, Markdown tables, and the targets met or missed."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from throughput_lib.peers import PEER_ARCHS
from throughput_lib.settings import TARGETS, BenchmarkOptions


# ------------------------------------------------------------------------------------------------------- reporting
def machine_info(options: BenchmarkOptions) -> dict[str, Any]:
    """The machine, the software and the load, for the report.

    Args:
        options: the options (device).

    Returns:
        CPU model and cores, torch threads, load average, GPU name and memory (CUDA), versions.
    """
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "hostname_hash": hashlib.sha1(platform.node().encode()).hexdigest()[:8],
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "monai": _version("monai"),
        "ctan_monai": _version("ctan_monai"),
        "device": options.device,
    }
    if options.is_cuda:
        props = torch.cuda.get_device_properties(options.torch_device)
        info.update(
            gpu_name=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _version(module: str) -> str | None:
    import importlib

    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except ImportError:
        return None


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _profile_markdown(profiles: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One table per profiled architecture: top operators by self time, then the modules' inclusive forward time."""
    lines = []
    for arch, found in profiles.items():
        if "error" in found:
            lines += [f"Profile of {arch} failed: {found['error']}", ""]
            continue
        device = found["total_self_device_ms"] > 0
        unit = "self device ms" if device else "self CPU ms"
        total = found["total_self_device_ms"] if device else found["total_self_cpu_ms"]
        lines += [
            f"Profile of one training step, {arch} ({found['step_s']:.3f} s under the profiler; operators by {unit}, "
            f"{total:.1f} ms in all; modules: forward, inclusive):",
            "",
            f"| operator or module | calls | {unit} | share | CPU total ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in [*found["operators"], *found["modules"]]:
            own = r["self_device_ms"] if device else r["self_cpu_ms"]
            share = f"{100 * own / total:.1f} %" if total and not r["name"].startswith("module:") else "-"
            lines.append(f"| `{r['name']}` | {r['calls']} | {own:.1f} | {share} | {r['cpu_total_ms']:.1f} |")
        lines.append("")
    return lines


def _peer_markdown(archs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every architecture's training step and inference as a multiple of each peer's, when peers were measured."""
    peers = [p for p in PEER_ARCHS if p in archs]
    if not peers:
        return []
    lines = [
        "Side by side with " + ", ".join(peers) + " (the same run, interleaved; median of per-repeat ratios):",
        "",
        "| arch | "
        + " | ".join(f"train step x {p}" for p in peers)
        + " | "
        + " | ".join(f"inference x {p}" for p in peers)
        + " |",
        "|---|" + "---:|" * (2 * len(peers)),
    ]
    for arch, r in archs.items():
        train = " | ".join(_fmt(r.get(f"train_step_x_{p}")) for p in peers)
        infer = " | ".join(_fmt(r.get(f"inference_x_{p}")) for p in peers)
        lines.append(f"| {arch} | {train} | {infer} |")
    return [*lines, ""]


def _setting_markdown(name: str, result: Mapping[str, Any]) -> list[str]:
    """The table, notes, pipeline line and profiles of one setting."""
    lines: list[str] = []
    lines += [f"### {name}: {result['summary']}", ""]
    if result.get("status") == "failed":
        lines.append(f"Model benchmark failed: {result['error']}")
    volume = result.get("volume_inference")
    if result.get("archs"):
        header = (
            "| arch | params (M) | GFLOPs fwd/sample | train step (s) | x HPS | train samples/s | "
            "inference (ms/sample) | x HPS | peak train (MiB) | peak inference (MiB) |"
        )
        align = "|---|" + "---:|" * 9
        if volume:
            header += f" patient, {volume['slices']} slices (s) | x HPS |"
            align += "---:|---:|"
        lines += [header, align]
    for arch, r in result.get("archs", {}).items():
        row = (
            f"| {arch} | {r['params_m']:.1f} | {r['gflops_forward_per_sample']:.2f} | "
            f"{r['train_step_s']['median']:.3f} | {_fmt(r.get('train_step_x_hps'))} | "
            f"{r['train_samples_per_s']:.1f} | {r['inference_ms_per_sample']:.1f} | "
            f"{_fmt(r.get('inference_x_hps'))} | {_fmt(r.get('train_peak_mib'), 0)} | "
            f"{_fmt(r.get('inference_peak_mib'), 0)} |"
        )
        if volume:
            row += f" {r['volume_inference_s']['median']:.2f} | {_fmt(r.get('volume_inference_x_hps'))} |"
        lines.append(row)
    lines.append("")
    lines += _peer_markdown(result.get("archs", {}))
    ctan = result.get("archs", {}).get("ctan", {})
    if "train_step_x_mtan" in ctan:
        lines.append(f"CTAN training step: {ctan['train_step_x_mtan']:.2f}x MTAN.")
    if "memory_method" in result:
        lines.append(f"Peak memory: {result['memory_method']}.")
    if volume:
        lines.append(
            f"Whole patient: {volume['method']}; {volume['slices']} slices of {volume['slice_size'][0]}x"
            f"{volume['slice_size'][1]}, {volume['sw_batch_size']} per forward pass."
        )
    pipeline = result.get("pipeline")
    if pipeline and pipeline["status"] == "measured":
        ratios = ", ".join(f"{a} {x:.1f}x" for a, x in pipeline.get("ratio_to_model", {}).items())
        lines.append(
            f"Data pipeline ({pipeline['description']}; {pipeline['workers']} worker(s)): "
            f"**{pipeline['samples_per_s']:.0f} samples/s** (start-up: {pipeline['warmup_s']:.2f} s for "
            f"{pipeline['warmup_batches']} batches; setup {pipeline['setup_s']:.1f} s). Pipeline / model: "
            f"{ratios}" + (f"; minimum {pipeline['min_ratio']:.1f}x ({pipeline['min_ratio_arch']})." if ratios else ".")
        )
    elif pipeline:
        lines.append(f"Data pipeline {pipeline['status']}: {pipeline['note']}")
    lines.append("")
    lines += _profile_markdown(result.get("profile") or {})
    return lines


def markdown_report(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the machine, then one table (and the pipeline line) per setting, then the targets.

    Args:
        report: the report built by ``run``.

    Returns:
        Markdown text.
    """
    m, o = report["machine"], report["options"]
    device = (
        f"{m['gpu_name']} ({m['gpu_memory_gib']:.0f} GiB), CUDA {m['cuda']}"
        if "gpu_name" in m
        else f"CPU {m['cpu_model']}, {m['cpu_affinity']} core(s)"
    )
    start, end = m.get("load_average_at_start"), m.get("load_average_at_end")
    load = f"; 1-min load average {start[0]:.2f} at start, {end[0]:.2f} at end" if start and end else ""
    lines = [
        f"Machine: {device}; torch {m['torch']}, MONAI {m['monai']}, {m['torch_threads']} torch thread(s){load}.",
        f"Options: precision {o['amp']}, channels-last {'on' if o['channels_last'] else 'off'}, "
        f"{o['warmup']} warm-up + median of {o['repeats']} (round-robin over the architectures; x HPS = median of "
        "per-repeat ratios).",
        "",
    ]
    for name, result in report["settings"].items():
        lines += _setting_markdown(name, result)
    targets = report.get("targets", {})
    if targets:
        lines += ["### Targets", "", "| check | setting | value | target | met |", "|---|---|---:|---:|---|"]
        for item in targets:
            relation, digits = (">=", 1) if item["check"] == "pipeline_vs_model" else ("<=", 2)
            lines.append(
                f"| {item['check']} | {item['setting']} | {item['value']:.{digits}f} | {relation} {item['target']:.1f} "
                f"| {'yes' if item['met'] else '**no**'} |"
            )
        lines.append("")
    return "\n".join(lines)


def evaluate_targets(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets checked against the measured figures (where the needed architectures were measured).

    Args:
        report: the report built by ``run``.

    Returns:
        rows ``{"check", "setting", "value", "target", "met"}``.
    """
    rows = []
    for name, result in report["settings"].items():
        ctan = result.get("archs", {}).get("ctan", {})
        if "train_step_x_mtan" in ctan:
            value, target = ctan["train_step_x_mtan"], TARGETS["ctan_vs_mtan_train_step"]
            rows.append(
                {
                    "check": "ctan_vs_mtan_train_step",
                    "setting": name,
                    "value": value,
                    "target": target,
                    "met": value <= target,
                }
            )
        if "train_step_x_hps" in ctan:
            value, target = ctan["train_step_x_hps"], TARGETS["ctan_vs_hps_train_step"]
            rows.append(
                {
                    "check": "ctan_vs_hps_train_step",
                    "setting": name,
                    "value": value,
                    "target": target,
                    "met": value <= target,
                }
            )
        pipeline = result.get("pipeline") or {}
        if "min_ratio" in pipeline:
            rows.append(
                {
                    "check": "pipeline_vs_model",
                    "setting": name,
                    "value": pipeline["min_ratio"],
                    "target": pipeline["target"],
                    "met": bool(pipeline["meets_target"]),
                }
            )
    return rows
