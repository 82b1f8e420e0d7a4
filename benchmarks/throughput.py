"""Throughput and memory of STL, HPS, MTAN and CTAN per bundle setting, and the speed of each bundle's data pipeline
against what the model consumes.

For every architecture and setting: parameters, FLOPs (``torch.utils.flop_counter``), the time of one training step
(forward + ``MultiTaskLoss`` + backward + Adam step), inference time per sample, peak memory, and for OpenKBP the
slice-wise inference of a whole 128-slice patient with MONAI's ``SliceInferer`` (as the bundle's evaluation does).
Warm-up steps first, then the median over repeats. The architectures are interleaved round-robin (repeat r runs
every architecture once, starting one further along each time), so that load from other processes on a shared
machine falls on all of them alike; the ratios to HPS are medians of the per-repeat ratios.

Then, per setting, the bundle's training data pipeline (its dataset, augmentation and a ``DataLoader``; the demo data
written once under ``--data_root`` unless ``--dataset_dir`` names the real data) is timed in samples/s, including the
transfer to the device, and compared with the samples/s of each architecture's training step ("pipeline / model",
target >= 5x). A pipeline whose pieces are not installed (e.g. SimpleITK for STOIC) is skipped with a note.

Settings (``--settings``; ``--backbone``, ``--size``, ``--batch`` override every chosen one):

- ``openkbp`` (default, the paper's setting): ResNet-50 with the stride-2 stem (output stride 32), 2D 128x128 CT
  slices, batch 8, 5-class segmentation + dose; data pipeline ``AxialSliceDataset`` + ``slice_augmentation``.
- ``ham10000``: RGB 224x224, batch 8, lesion segmentation (2 classes) + 7-class diagnosis; JPEG/PNG loading with the
  HAM10000 training transforms.
- ``stoic``: 2.5D (3 adjacent slices as channels) 224x224, batch 8 slices, COVID-19 + severe (binary, image level);
  ``Stoic25DDataset`` (4 slices per patient) from the preprocessed NIfTI cache.
- ``prostate``: as OpenKBP with batch 32 (the paper's); pipeline: DICOM-RT demo converted to NIfTI, then the shared
  slice pipeline.

Peak memory, per architecture as if it were alone: the peak during one step above what was allocated before it (the
other models included), plus its own weights and Adam state (weights alone for inference). The peak is
``torch.cuda.max_memory_allocated`` on CUDA (tensor bytes, not the allocator's reserve) and, on a Linux CPU, the
resident high-water mark ``VmHWM`` after returning freed memory to the kernel and resetting the mark
(``--cpu_memory peak``). Where the mark cannot be reset, ``--cpu_memory probe`` runs each architecture in a fresh
subprocess and reads ``getrusage`` ``ru_maxrss`` (psutil offers no peak that can be reset, so it is not used).

Usage:
    python benchmarks/throughput.py                                      # paper setting on the CPU
    python benchmarks/throughput.py --settings all --device cuda --amp bf16 --channels_last \\
        --pipeline_workers 8 --output runs/throughput_gpu.json
    python benchmarks/throughput.py --backbone resnet18 --size 64 --batch 2 --warmup 1 --repeats 2 \\
        --archs hps ctan --amp bf16 --channels_last --pipeline_patients 2   # a quick smoke run
    python benchmarks/throughput.py --peers --no_pipeline                # ours and LibMTL's HPS, MTAN side by side

Peers (``--peers``, or ``libmtl_hps`` / ``libmtl_mtan`` in ``--archs``): LibMTL's HPS and MTAN with its ResNet and
its NYUv2 example's DeepLab heads, timed in the same round-robin with the same batch, loss and optimiser, and every
architecture's ratio to each peer reported (``throughput_lib.peers``; ``pip install --no-deps LibMTL==1.1.5``).

Output: a Markdown report on stdout (``--markdown`` also writes it to a file) and a JSON file (``--output``), both
written atomically, the JSON after every setting so that an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput_lib, when run as a script

from throughput_lib.models import (  # noqa: E402
    ArchBench,
    ResidentPeak,
    benchmark_setting,
    cpu_memory_probe,
    peak_memory,
    profile_train_step,
    synthetic_batch,
)
from throughput_lib.peers import PEER_ARCHS, PeerUnavailableError, import_libmtl  # noqa: E402
from throughput_lib.pipelines import PIPELINES, PipelineSpec, PipelineUnavailableError, benchmark_pipeline  # noqa: E402
from throughput_lib.report import evaluate_targets, machine_info, markdown_report  # noqa: E402
from throughput_lib.settings import (  # noqa: E402
    ARCHS,
    CPU_MEMORY_METHODS,
    SCHEMA,
    SETTINGS,
    BenchmarkOptions,
    BenchmarkSetting,
    resolve_settings,
)
from throughput_lib.timing import _log, paired_ratio, round_robin_orders  # noqa: E402

__all__ = [
    "ARCHS",
    "PEER_ARCHS",
    "PIPELINES",
    "SETTINGS",
    "ArchBench",
    "BenchmarkOptions",
    "BenchmarkSetting",
    "PipelineSpec",
    "PipelineUnavailableError",
    "ResidentPeak",
    "benchmark_pipeline",
    "benchmark_setting",
    "check_archs",
    "cpu_memory_probe",
    "evaluate_targets",
    "machine_info",
    "main",
    "markdown_report",
    "paired_ratio",
    "peak_memory",
    "profile_train_step",
    "resolve_settings",
    "round_robin_orders",
    "run",
    "synthetic_batch",
]


# ------------------------------------------------------------------------------------------------------------- run
def run(
    settings: Sequence[BenchmarkSetting],
    archs: Sequence[str],
    options: BenchmarkOptions,
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Benchmark the settings and write the JSON report after each one.

    Args:
        settings: the settings.
        archs: the architectures.
        options: how to measure.
        output: the JSON file (written atomically after every setting), or None.

    Returns:
        the report: ``{"schema", "created", "machine", "options", "settings": {name: result}, "targets"}``.

    Raises:
        ValueError: for invalid options or architectures (before anything is measured).
    """
    options.check()
    check_archs(archs)
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.is_cuda:
        if options.torch_device.index is not None:  # set_device rejects a device without an index
            torch.cuda.set_device(options.torch_device)
        torch.backends.cudnn.benchmark = options.cudnn_benchmark
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(options),
        "options": {**asdict(options), "archs": list(archs)},
        "settings": {},
        "targets": [],
    }
    for setting in settings:
        try:
            result = benchmark_setting(setting, archs, options)
        except Exception as err:  # one run covers several settings (a GPU lease): keep the others' figures
            _log(f"{setting.name} failed:\n{traceback.format_exc()}")
            result = {"setting": asdict(setting), "summary": setting.summary(), "status": "failed"}
            result["error"] = f"{type(err).__name__}: {err}"
        gc.collect()  # out of the except block: the exception no longer holds the failed setting's models
        if options.is_cuda:
            torch.cuda.empty_cache()
        report["settings"][setting.name] = result
        if options.pipelines:
            result["pipeline"] = benchmark_pipeline(setting, options, result)
        report["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        report["targets"] = evaluate_targets(report)
        if output is not None:
            atomic_write_json(output, report)
    return report


def check_archs(archs: Sequence[str]) -> None:
    """Check the architecture names.

    Args:
        archs: the names.

    Raises:
        ValueError: for none, an unknown or a repeated name.
        PeerUnavailableError: when a peer is named and its library is not installed.
    """
    known = [*ARCHS, *PEER_ARCHS]
    unknown = [a for a in archs if a not in known]
    if unknown or not archs:
        raise ValueError(f"unknown or no architecture(s) {unknown}; choose from {known}")
    if len(set(archs)) != len(archs):
        raise ValueError(f"an architecture is named twice in {list(archs)}")
    if any(a in PEER_ARCHS for a in archs):
        import_libmtl()  # before anything is measured: PeerUnavailableError names the install command


def _dataset_dirs(items: Sequence[str]) -> dict[str, str]:
    dirs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--dataset_dir expects SETTING=PATH (e.g. openkbp=/data/open-kbp), got {item!r}")
        dirs[name] = path
    return dirs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        the namespace.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["openkbp"], help=f"{sorted(SETTINGS)} or 'all'")
    p.add_argument(
        "--archs",
        nargs="+",
        default=list(ARCHS),
        help=f"architectures (default: our four); peers: {', '.join(PEER_ARCHS)} (LibMTL, see throughput_lib.peers)",
    )
    p.add_argument("--peers", action="store_true", help="add LibMTL's HPS and MTAN to --archs (side by side)")
    p.add_argument("--backbone", help="override every setting's encoder (resnet18, resnet34, resnet50)")
    p.add_argument("--size", type=int, help="override every setting's input size (multiple of 32)")
    p.add_argument("--batch", type=int, help="override every setting's batch size")
    p.add_argument("--volume_slices", type=int, help="slices of the whole-patient inference (OpenKBP: 128)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="bfloat16 autocast")
    p.add_argument("--channels_last", action="store_true", help="channels-last models and inputs")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--volume_repeats", type=int, default=2, help="timed whole-patient inferences (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--no_cudnn_benchmark", action="store_true", help="do not let cuDNN pick algorithms")
    p.add_argument("--cpu_memory", default="auto", choices=CPU_MEMORY_METHODS, help="CPU peak memory method")
    p.add_argument("--profile", type=int, default=0, metavar="TOP", help="profile one training step: top operators")
    p.add_argument("--no_pipeline", action="store_true", help="skip the data pipelines")
    p.add_argument("--pipeline_workers", type=int, help="DataLoader workers (default: 0 on CPU, 8 on CUDA)")
    p.add_argument("--pipeline_batches", type=int, default=30)
    p.add_argument("--pipeline_warmup", type=int, default=2)
    p.add_argument("--pipeline_patients", type=int, default=4, help="patients of the pipeline's data")
    p.add_argument("--data_root", default=BenchmarkOptions().data_root, help="demo data and caches (reused)")
    p.add_argument(
        "--dataset_dir",
        action="append",
        default=[],
        metavar="SETTING=PATH",
        help="real data folder (openkbp: also a converted cache with manifest.json)",
    )
    p.add_argument("--output", default="throughput.json", help="JSON report (written atomically)")
    p.add_argument("--markdown", help="also write the Markdown report to this file")
    p.add_argument("--memory_probe", help=argparse.SUPPRESS)  # internal: one CPU memory probe (JSON payload)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        the exit status: 0, 1 when a setting's models or pipeline failed (the report holds the others' figures),
        2 for invalid arguments.
    """
    args = parse_args(argv)
    if args.memory_probe:
        payload = json.loads(args.memory_probe)
        setting = BenchmarkSetting(**{**payload["setting"], "tasks": tuple(payload["setting"]["tasks"])})
        print(json.dumps(cpu_memory_probe(setting, payload["arch"], BenchmarkOptions(**payload["options"]))))
        return 0
    try:
        settings = resolve_settings(args.settings, args.backbone, args.size, args.batch)
        if args.volume_slices is not None:
            settings = [replace(s, volume_slices=args.volume_slices if s.volume_slices else None) for s in settings]
        workers = args.pipeline_workers
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if args.device.startswith("cuda") else 0
        options = BenchmarkOptions(
            device=args.device,
            amp=args.amp,
            channels_last=args.channels_last,
            warmup=args.warmup,
            repeats=args.repeats,
            volume_repeats=args.volume_repeats,
            cpu_memory=args.cpu_memory,
            profile=args.profile,
            pipelines=not args.no_pipeline,
            pipeline_workers=workers,
            pipeline_batches=args.pipeline_batches,
            pipeline_warmup=args.pipeline_warmup,
            pipeline_patients=args.pipeline_patients,
            data_root=args.data_root,
            dataset_dirs=_dataset_dirs(args.dataset_dir),
            threads=args.threads,
            cudnn_benchmark=not args.no_cudnn_benchmark,
        )
        archs = list(args.archs) + [p for p in PEER_ARCHS if args.peers and p not in args.archs]
        options.check()
        check_archs(archs)
    except (ValueError, PeerUnavailableError) as err:
        print(f"throughput.py: error: {err}", file=sys.stderr)
        return 2
    report = run(settings, archs, options, args.output)
    text = markdown_report(report)
    print(text)
    if args.markdown:
        atomic_write_text(args.markdown, text + "\n")
    failed = [
        f"{name} ({part})"
        for name, result in report["settings"].items()
        for part, status in (("models", result["status"]), ("pipeline", result.get("pipeline", {}).get("status")))
        if status == "failed"
    ]
    if failed:
        _log(f"report written to {args.output}; failed: {', '.join(failed)}")
        return 1
    _log(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
