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

Output: a Markdown report on stdout (``--markdown`` also writes it to a file) and a JSON file (``--output``), both
written atomically, the JSON after every setting so that an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ctan_monai.losses import MultiTaskLoss
from ctan_monai.networks import build_network
from ctan_monai.tasks import TaskSpec, parse_tasks
from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text

__all__ = [
    "ARCHS",
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

SCHEMA = "ctan_monai.benchmarks.throughput/1"
ARCHS = ("stl", "hps", "mtan", "ctan")
MIB = 2.0**20
CPU_MEMORY_METHODS = ("auto", "peak", "probe", "off")
TARGETS = {"ctan_vs_mtan_train_step": 1.1, "ctan_vs_hps_train_step": 1.5, "pipeline_vs_model": 5.0}


# ---------------------------------------------------------------------------------------------------------- settings
def _seg(name: str, classes: int) -> dict[str, Any]:
    return {"name": name, "level": "pixel", "kind": "segmentation", "out_channels": classes}


def _dose(name: str = "dose") -> dict[str, Any]:
    return {"name": name, "level": "pixel", "kind": "regression", "out_channels": 1}


def _image_task(name: str, classes: int) -> dict[str, Any]:
    return {"name": name, "level": "image", "kind": "classification", "out_channels": classes}


@dataclass(frozen=True)
class BenchmarkSetting:
    """One bundle's network and batch, as the benchmark builds them.

    Args:
        name: the setting's name (also the name of its data pipeline).
        description: what it stands for, in words.
        tasks: task declarations (dicts, as in a bundle config).
        in_channels: input channels.
        size: side of the square 2D input.
        batch: training batch size.
        backbone: ResNet encoder.
        volume_slices: slices of one whole patient for slice-wise volume inference (None: not timed).
        sw_batch_size: slices per forward pass of the volume inference (the bundle's ``SliceInferer`` batch).

    Example:
        >>> replace(SETTINGS["openkbp"], backbone="resnet18").backbone
        'resnet18'
    """

    name: str
    description: str
    tasks: tuple[dict[str, Any], ...]
    in_channels: int
    size: int
    batch: int
    backbone: str = "resnet50"
    volume_slices: int | None = None
    sw_batch_size: int = 32

    def task_specs(self) -> tuple[TaskSpec, ...]:
        """The tasks as ``TaskSpec``.

        Returns:
            the parsed tasks.
        """
        return parse_tasks(self.tasks)

    def summary(self) -> str:
        """One line: backbone, input, batch and tasks.

        Returns:
            e.g. ``"resnet50, 2D 1x128x128, batch 8, tasks seg(segmentation 5) + dose(regression 1)"``.
        """
        tasks = " + ".join(f"{t.name}({t.kind} {t.out_channels})" for t in self.task_specs())
        return f"{self.backbone}, 2D {self.in_channels}x{self.size}x{self.size}, batch {self.batch}, tasks {tasks}"


SETTINGS: dict[str, BenchmarkSetting] = {
    "openkbp": BenchmarkSetting(
        "openkbp",
        "paper setting: head-and-neck CT slices, OAR segmentation + dose (OpenKBP bundle)",
        (_seg("seg", 5), _dose()),
        in_channels=1,
        size=128,
        batch=8,
        volume_slices=128,
    ),
    "ham10000": BenchmarkSetting(
        "ham10000",
        "dermoscopy RGB, lesion segmentation + 7-class diagnosis (HAM10000 bundle)",
        (_seg("seg", 2), _image_task("dx", 7)),
        in_channels=3,
        size=224,
        batch=8,
    ),
    "stoic": BenchmarkSetting(
        "stoic",
        "2.5D chest CT (3 slices as channels), COVID-19 + severe, binary image tasks (STOIC bundle)",
        (_image_task("covid", 1), _image_task("severe", 1)),
        in_channels=3,
        size=224,
        batch=8,
    ),
    "prostate": BenchmarkSetting(
        "prostate",
        "prostate CT slices from DICOM-RT, OAR segmentation + dose, batch 32 (prostate bundle)",
        (_seg("seg", 5), _dose()),
        in_channels=1,
        size=128,
        batch=32,
    ),
}


@dataclass
class BenchmarkOptions:
    """How to measure.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"`` etc.).
        amp: ``"bf16"`` for bfloat16 autocast, ``"none"`` for float32.
        channels_last: channels-last memory format for the models and inputs.
        warmup: untimed steps per architecture before the timed ones.
        repeats: timed steps (and inference passes) per architecture.
        volume_repeats: timed whole-patient inferences per architecture (after one untimed).
        cpu_memory: how to measure peak memory on the CPU: ``"peak"`` (resident high-water mark in this process,
            Linux), ``"probe"`` (``ru_maxrss`` of a fresh subprocess per architecture), ``"auto"`` (``"peak"`` where
            available, else ``"probe"``) or ``"off"``.
        profile: print and record the ``top`` operators of one profiled training step per architecture (0: off).
        pipelines: run the data pipelines of the chosen settings.
        pipeline_workers: ``DataLoader`` workers.
        pipeline_batches: timed batches of the pipeline (after ``pipeline_warmup`` untimed ones).
        pipeline_warmup: untimed batches (worker start-up, first file reads).
        pipeline_patients: patients (images for HAM10000: 20 per patient) of demo or real data the pipeline uses.
        data_root: where demo data and caches are written (reused across runs).
        dataset_dirs: ``{setting: path}`` of real data to use instead of the demo (for OpenKBP also a NIfTI cache
            folder holding the ``manifest.json`` of ``convert_dataset``).
        threads: torch intra-op threads (0: PyTorch's default).
        cudnn_benchmark: let cuDNN pick the fastest convolution algorithms (CUDA; fixed shapes).
    """

    device: str = "cpu"
    amp: str = "none"
    channels_last: bool = False
    warmup: int = 2
    repeats: int = 5
    volume_repeats: int = 2
    cpu_memory: str = "auto"
    profile: int = 0
    pipelines: bool = True
    pipeline_workers: int = 0
    pipeline_batches: int = 30
    pipeline_warmup: int = 2
    pipeline_patients: int = 4
    data_root: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "ctan_monai_benchmark"))
    dataset_dirs: dict[str, str] = field(default_factory=dict)
    threads: int = 0
    cudnn_benchmark: bool = True

    @property
    def torch_device(self) -> torch.device:
        """The device as a ``torch.device``."""
        return torch.device(self.device)

    @property
    def is_cuda(self) -> bool:
        """Whether the benchmark runs on a CUDA device."""
        return self.torch_device.type == "cuda"

    def check(self) -> None:
        """Check the options before anything is measured.

        Raises:
            ValueError: for an option out of range or inconsistent with the machine (no CUDA, unknown precision).
        """
        if self.torch_device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda[:index], got {self.device!r}")
        if self.is_cuda and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available in this PyTorch ({torch.__version__})")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"--amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.amp == "bf16" and self.is_cuda and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(self.torch_device)} does not support bfloat16")
        if self.cpu_memory not in CPU_MEMORY_METHODS:
            raise ValueError(f"--cpu_memory must be one of {CPU_MEMORY_METHODS}, got {self.cpu_memory!r}")
        if self.cpu_memory == "peak" and not self.is_cuda and not ResidentPeak.available():
            raise ValueError("--cpu_memory peak needs Linux with a writable /proc/self/clear_refs; use probe or auto")
        for name, value, low in (
            ("warmup", self.warmup, 0),
            ("repeats", self.repeats, 1),
            ("volume_repeats", self.volume_repeats, 0),
            ("profile", self.profile, 0),
            ("pipeline_workers", self.pipeline_workers, 0),
            ("pipeline_batches", self.pipeline_batches, 1),
            ("pipeline_warmup", self.pipeline_warmup, 0),
            ("pipeline_patients", self.pipeline_patients, 1),
            ("threads", self.threads, 0),
        ):
            if value < low:
                raise ValueError(f"--{name} must be >= {low}, got {value}")
        unknown = set(self.dataset_dirs) - set(SETTINGS)
        if unknown:
            raise ValueError(f"--dataset_dir names unknown setting(s) {sorted(unknown)}; known: {sorted(SETTINGS)}")
        for name, path in self.dataset_dirs.items():
            if not Path(path).exists():
                raise ValueError(f"--dataset_dir {name}={path}: the folder does not exist")


def resolve_settings(
    names: Sequence[str], backbone: str | None = None, size: int | None = None, batch: int | None = None
) -> list[BenchmarkSetting]:
    """The chosen settings with the command line's overrides applied.

    Args:
        names: setting names, or ``["all"]``.
        backbone: replaces every setting's backbone when given.
        size: replaces every setting's input size when given.
        batch: replaces every setting's batch size when given.

    Returns:
        the settings, in the given order.

    Raises:
        ValueError: for an unknown name or a non-positive size or batch.

    Example:
        >>> [s.batch for s in resolve_settings(["openkbp", "prostate"])]
        [8, 32]
    """
    chosen = list(SETTINGS) if list(names) == ["all"] else list(dict.fromkeys(names))
    unknown = [n for n in chosen if n not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; choose from {sorted(SETTINGS)} or 'all'")
    for what, value in (("size", size), ("batch", batch)):
        if value is not None and value < 1:
            raise ValueError(f"--{what} must be >= 1, got {value}")
    if size is not None and size % 32:
        raise ValueError(f"--size must be a multiple of 32 (the encoder's output stride), got {size}")
    overrides = {k: v for k, v in (("backbone", backbone), ("size", size), ("batch", batch)) if v is not None}
    return [replace(SETTINGS[n], **overrides) for n in chosen]


# ------------------------------------------------------------------------------------------------ timing primitives
def round_robin_orders(archs: Sequence[str], repeats: int) -> list[list[str]]:
    """The order of the architectures in each repeat: every one once, the start moving one further each time.

    Args:
        archs: the architectures.
        repeats: number of repeats.

    Returns:
        one list per repeat.

    Example:
        >>> round_robin_orders(["hps", "mtan", "ctan"], 4)
        [['hps', 'mtan', 'ctan'], ['mtan', 'ctan', 'hps'], ['ctan', 'hps', 'mtan'], ['hps', 'mtan', 'ctan']]
    """
    n = len(archs)
    return [[archs[(r + k) % n] for k in range(n)] for r in range(repeats)] if n else []


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median of the per-repeat ratios ``times[r] / reference[r]`` (both measured in the same round-robin repeat,
    so a load change between repeats cancels).

    Args:
        times: one architecture's times.
        reference: the reference architecture's times, same length.

    Returns:
        the median ratio.

    Raises:
        ValueError: for empty or unequal sequences or a non-positive reference time.

    Example:
        >>> paired_ratio([2.0, 3.0, 10.0], [1.0, 2.0, 4.0])
        2.0
    """
    if not times or len(times) != len(reference):
        raise ValueError(f"need two equally long, non-empty series, got {len(times)} and {len(reference)}")
    if min(reference) <= 0:
        raise ValueError("reference times must be positive")
    return statistics.median(t / r for t, r in zip(times, reference))


def _summary(times: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(times)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "q1": quartiles[0],
        "q3": quartiles[2],
        "times": list(times),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ the models
def synthetic_batch(setting: BenchmarkSetting, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch in the package's batch convention for the setting's tasks (on the CPU).

    Segmentation labels are random class indices with every class annotated; dose targets lie in 0..70 Gy with a
    dose mask covering about two thirds of each image; image-level labels are random classes (0/1 for binary
    tasks). Every label is present.

    Args:
        setting: the setting.
        seed: random seed.

    Returns:
        ``{"image": [B, C, S, S], <task>: label, <task>_present, ...}``.

    Example:
        >>> sorted(synthetic_batch(replace(SETTINGS["openkbp"], batch=2, size=32)))
        ['dose', 'dose_mask', 'dose_present', 'image', 'seg', 'seg_class_present', 'seg_present']
    """
    gen = torch.Generator().manual_seed(seed)
    b, s = setting.batch, setting.size
    batch = {"image": torch.rand(b, setting.in_channels, s, s, generator=gen)}
    for task in setting.task_specs():
        if task.kind == "segmentation":
            batch[task.name] = torch.randint(0, task.out_channels, (b, 1, s, s), generator=gen)
            batch[f"{task.name}_class_present"] = torch.ones(b, task.out_channels)
        elif task.kind == "regression":
            batch[task.name] = torch.rand(b, task.out_channels, s, s, generator=gen) * 70.0
            batch[f"{task.name}_mask"] = (torch.rand(b, task.out_channels, s, s, generator=gen) < 0.66).float()
        elif task.is_binary:
            batch[task.name] = torch.randint(0, 2, (b,), generator=gen).float()
        else:
            batch[task.name] = torch.randint(0, task.out_channels, (b,), generator=gen)
        batch[f"{task.name}_present"] = torch.ones(b)
    return batch


def _memory_format(options: BenchmarkOptions) -> torch.memory_format:
    return torch.channels_last if options.channels_last else torch.contiguous_format


class ArchBench:
    """One architecture ready to be timed: network, ``MultiTaskLoss`` (DWA), Adam (lr 1e-4, weight decay 1e-5, as
    the bundles) and a batch on the device, in the chosen precision and memory format.

    Args:
        arch: ``"stl"``, ``"hps"``, ``"mtan"`` or ``"ctan"``.
        setting: the setting.
        options: device, precision, memory format.
        batch: the CPU batch (default: ``synthetic_batch(setting)``).

    Example:
        >>> bench = ArchBench("hps", replace(SETTINGS["openkbp"], backbone="resnet18", size=64, batch=2),
        ...                   BenchmarkOptions())
        >>> bench.train_step(); bench.infer()
    """

    def __init__(
        self,
        arch: str,
        setting: BenchmarkSetting,
        options: BenchmarkOptions,
        batch: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.arch = arch
        self.setting = setting
        self.device = options.torch_device
        self.amp = options.amp == "bf16"
        self.memory_format = _memory_format(options)
        torch.manual_seed(0)
        net = build_network(arch, setting.tasks, setting.backbone, spatial_dims=2, in_channels=setting.in_channels)
        self.net = net.to(device=self.device, memory_format=self.memory_format)
        self.loss = MultiTaskLoss(setting.tasks, weighting="dwa").to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-4, weight_decay=1e-5)
        source = synthetic_batch(setting) if batch is None else batch
        self.batch = {k: v.to(self.device) for k, v in source.items()}
        self.batch["image"] = self.batch["image"].contiguous(memory_format=self.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the chosen precision (disabled for float32).

        Returns:
            ``torch.autocast(device_type, dtype=torch.bfloat16, enabled=...)``.
        """
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def train_step(self) -> None:
        """One training step: forward and loss under autocast, backward, Adam step."""
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss(self.net(self.batch["image"]), self.batch)
        loss.backward()
        self.optimizer.step()

    def infer(self) -> None:
        """One inference pass over the batch (eval mode, ``inference_mode``, autocast)."""
        self.net.eval()
        with torch.inference_mode(), self.autocast():
            self.net(self.batch["image"])

    def parameters_m(self) -> float:
        """Parameters in millions.

        Returns:
            the count / 1e6.
        """
        return sum(p.numel() for p in self.net.parameters()) / 1e6

    def state_bytes(self) -> int:
        """Bytes of the weights and the optimiser state this architecture keeps between steps.

        Returns:
            the sum of the parameter, buffer and Adam state tensors' sizes.
        """
        total = sum(t.numel() * t.element_size() for t in (*self.net.parameters(), *self.net.buffers()))
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        return total

    def weight_bytes(self) -> int:
        """Bytes of the weights and buffers alone (what inference needs to hold).

        Returns:
            the size in bytes.
        """
        return sum(t.numel() * t.element_size() for t in (*self.net.parameters(), *self.net.buffers()))

    def flops(self) -> dict[str, float]:
        """FLOPs counted by ``torch.utils.flop_counter`` in float32 (the count does not depend on the precision).

        Returns:
            ``{"gflops_forward_per_sample", "gflops_train_step_per_sample"}`` (training: forward + loss + backward).
        """
        image = self.batch["image"]
        self.net.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.net(image)
        forward = counter.get_total_flops()
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            self.loss(self.net(image), self.batch).backward()
        self.optimizer.zero_grad(set_to_none=True)
        train = counter.get_total_flops()
        b = image.shape[0]
        return {"gflops_forward_per_sample": forward / b / 1e9, "gflops_train_step_per_sample": train / b / 1e9}

    def volume_inferer(self) -> Callable[[torch.Tensor], Any]:
        """Slice-wise inference of one whole volume with MONAI's ``SliceInferer``, as the OpenKBP evaluation runs it.

        Returns:
            a function of the volume ``[1, C, S, S, slices]`` returning the output dict.
        """
        from monai.inferers import SliceInferer

        size = self.setting.size
        inferer = SliceInferer(
            roi_size=(size, size), spatial_dim=2, sw_batch_size=self.setting.sw_batch_size, progress=False
        )

        def network(slices: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.net(slices.contiguous(memory_format=self.memory_format))

        def run_volume(volume: torch.Tensor) -> Any:
            self.net.eval()
            with torch.inference_mode(), self.autocast():
                return inferer(volume, network)

        return run_volume

    def release(self) -> None:
        """Drop the model, optimiser and batch (frees device memory for the next setting)."""
        del self.net, self.optimizer, self.loss, self.batch


# ----------------------------------------------------------------------------------------------------------- memory
class ResidentPeak:
    """Peak resident memory of this process over a block of code (Linux).

    Before the block, freed heap memory is handed back to the kernel (glibc ``malloc_trim``) and the kernel's
    high-water mark is reset (``/proc/self/clear_refs``, value 5), so that ``VmHWM`` after the block minus ``VmRSS``
    before it is what the block needed above what was live.

    Raises:
        OSError: on entry, where ``/proc/self/clear_refs`` or glibc is not available (use ``available()`` first).

    Example:
        >>> if ResidentPeak.available():
        ...     with ResidentPeak() as peak:
        ...         buffer = torch.ones(2**24)
        ...     assert peak.bytes >= 2**26 * 0.9
    """

    def __init__(self) -> None:
        self.bytes = 0
        self._start = 0

    @staticmethod
    def available() -> bool:
        """Whether the peak can be reset and read here.

        Returns:
            True on Linux with glibc and a writable ``/proc/self/clear_refs``.
        """
        try:
            ResidentPeak._reset()
            return ResidentPeak._status("VmHWM") > 0
        except (OSError, AttributeError):
            return False

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"/proc/self/status has no {key}")

    @staticmethod
    def _reset() -> None:
        import ctypes

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    def __enter__(self) -> ResidentPeak:
        self._reset()
        self._start = self._status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = self._status("VmHWM") - self._start


@contextlib.contextmanager
def _device_peak(device: torch.device) -> Iterator[dict[str, int]]:
    """Yield a dict whose ``"bytes"`` is, after the block, its peak memory above what was allocated before it."""
    found = {"bytes": 0}
    if device.type == "cuda":
        gc.collect()
        _synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield found
        _synchronize(device)
        found["bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        with ResidentPeak() as peak:
            yield found
        found["bytes"] = peak.bytes


def peak_memory(bench: ArchBench) -> dict[str, float]:
    """Peak memory of one architecture's training step and inference, as if it were alone on the device.

    The gradients are dropped first; the peak above the memory then allocated (the other models included) is
    measured over one training step (one inference pass), and the architecture's own weights and Adam state
    (weights alone for inference) are added.

    Args:
        bench: the architecture, after at least one training step (so that the Adam state exists).

    Returns:
        ``{"train_peak_mib", "inference_peak_mib"}``.
    """
    bench.optimizer.zero_grad(set_to_none=True)
    with _device_peak(bench.device) as train:
        bench.train_step()
    bench.optimizer.zero_grad(set_to_none=True)
    with _device_peak(bench.device) as inference:
        bench.infer()
    return {
        "train_peak_mib": (train["bytes"] + bench.state_bytes()) / MIB,
        "inference_peak_mib": (inference["bytes"] + bench.weight_bytes()) / MIB,
    }


def _maxrss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def cpu_memory_probe(setting: BenchmarkSetting, arch: str, options: BenchmarkOptions) -> dict[str, float | None]:
    """Peak resident memory of one architecture in this (fresh) process, where the peak cannot be reset.

    Meant to run in a subprocess of its own (``--memory_probe``): ``ru_maxrss`` only grows, so each architecture
    needs a fresh process; inference runs first, then two training steps.

    Args:
        setting: the setting.
        arch: the architecture.
        options: precision and memory format (the device must be the CPU).

    Returns:
        ``{"inference_peak_mib", "train_peak_mib"}`` above the peak after the imports and the input batch; None
        where the model stayed below that peak (small models: the imports' transient peak hides them).
    """
    if options.threads:
        torch.set_num_threads(options.threads)
    batch = synthetic_batch(setting)
    base = _maxrss_mib()
    bench = ArchBench(arch, setting, options, batch)
    bench.infer()
    inference = _maxrss_mib()
    bench.train_step()
    bench.train_step()
    train = _maxrss_mib()
    return {
        "inference_peak_mib": inference - base if inference > base else None,
        "train_peak_mib": train - base if train > base else None,
    }


def _probe_in_subprocess(setting: BenchmarkSetting, arch: str, options: BenchmarkOptions) -> dict[str, Any]:
    payload = json.dumps({"setting": asdict(setting), "arch": arch, "options": asdict(options)})
    command = [sys.executable, os.path.abspath(__file__), "--memory_probe", payload]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {arch} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------- profiling
def profile_train_step(bench: ArchBench, top: int) -> dict[str, Any]:
    """Profile one training step with ``torch.profiler`` and return the ``top`` operators by self time.

    The top-level modules (encoder, attention stages, CTAB, decoders) are marked with ``record_function`` ranges
    named ``module:<name>``, so that their inclusive forward time appears next to the operators.

    Args:
        bench: the architecture.
        top: number of rows.

    Returns:
        ``{"step_s" (the profiled step, profiler overhead included), "total_self_cpu_ms", "total_self_device_ms"
        (sums over all operators), "operators": the ``top`` operators by self time (device time on CUDA),
        "modules": the modules' rows}``; rows are ``{"name", "calls", "self_cpu_ms", "cpu_total_ms",
        "self_device_ms"}``.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    ranges: dict[int, Any] = {}
    handles = []
    modules = [
        (n, m) for n, m in bench.net.named_children() if isinstance(m, torch.nn.ModuleDict | torch.nn.ModuleList)
    ]
    named = [(f"{n}.{c}", child) for n, m in modules for c, child in m.named_children()]
    named += [
        (n, m) for n, m in bench.net.named_children() if not isinstance(m, torch.nn.ModuleDict | torch.nn.ModuleList)
    ]
    for name, module in named:

        def enter(_module: torch.nn.Module, _args: Any, label: str = f"module:{name}") -> None:
            ranges[id(_module)] = record_function(label).__enter__()

        def leave(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            ranges.pop(id(_module)).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        bench.train_step()
        _synchronize(bench.device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            bench.train_step()
            _synchronize(bench.device)
        step = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for event in prof.key_averages():
        self_device = getattr(event, "self_device_time_total", None)
        if self_device is None:  # older PyTorch
            self_device = getattr(event, "self_cuda_time_total", 0.0)
        rows.append(
            {
                "name": event.key,
                "calls": int(event.count),
                "self_cpu_ms": event.self_cpu_time_total / 1e3,
                "cpu_total_ms": event.cpu_time_total / 1e3,
                "self_device_ms": float(self_device or 0.0) / 1e3,
            }
        )
    operators = [r for r in rows if not r["name"].startswith("module:")]
    key = "self_device_ms" if bench.device.type == "cuda" else "self_cpu_ms"
    return {
        "step_s": step,
        "total_self_cpu_ms": sum(r["self_cpu_ms"] for r in operators),
        "total_self_device_ms": sum(r["self_device_ms"] for r in operators),
        "operators": sorted(operators, key=lambda r: -r[key])[:top],
        "modules": sorted((r for r in rows if r["name"].startswith("module:")), key=lambda r: -r["cpu_total_ms"]),
    }


# ------------------------------------------------------------------------------------------------- model benchmark
def _round_robin(
    benches: Mapping[str, ArchBench],
    action: Callable[[ArchBench], Any],
    warmup: int,
    repeats: int,
    device: torch.device,
) -> dict[str, list[float]]:
    archs = list(benches)
    for order in round_robin_orders(archs, warmup):
        for arch in order:
            action(benches[arch])
    times: dict[str, list[float]] = {arch: [] for arch in archs}
    for repeat, order in enumerate(round_robin_orders(archs, repeats)):
        for arch in order:
            times[arch].append(_timed(lambda b=benches[arch]: action(b), device))
        if device.type == "cpu":  # slow enough to want progress; on a GPU the log would cost more than a step
            _log(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(f"{a} {times[a][-1]:.3f} s" for a in order))
    return times


def benchmark_setting(setting: BenchmarkSetting, archs: Sequence[str], options: BenchmarkOptions) -> dict[str, Any]:
    """Measure every architecture on one setting (interleaved), with ratios to HPS when HPS is among them.

    Args:
        setting: the setting.
        archs: the architectures.
        options: how to measure.

    Returns:
        ``{"setting": ..., "archs": {arch: figures}, "volume_inference": ..., "profile": ...}``; times in seconds.
    """
    device = options.torch_device
    batch = synthetic_batch(setting)
    benches: dict[str, ArchBench] = {}
    results: dict[str, dict[str, Any]] = {}
    for arch in archs:
        _log(f"{setting.name}: building {arch}")
        bench = ArchBench(arch, setting, options, batch)
        benches[arch] = bench
        results[arch] = {"params_m": bench.parameters_m(), **bench.flops()}
    _log(f"{setting.name}: training steps ({options.warmup} warm-up + {options.repeats} timed each, round-robin)")
    train = _round_robin(benches, ArchBench.train_step, options.warmup, options.repeats, device)
    _log(f"{setting.name}: inference ({options.warmup} warm-up + {options.repeats} timed each, round-robin)")
    infer = _round_robin(benches, ArchBench.infer, options.warmup, options.repeats, device)
    volume: dict[str, Any] | None = None
    volume_times: dict[str, list[float]] = {}
    if setting.volume_slices and options.volume_repeats:
        _log(f"{setting.name}: whole-patient inference ({setting.volume_slices} slices), {options.volume_repeats} each")
        gen = torch.Generator().manual_seed(1)
        shape = (1, setting.in_channels, setting.size, setting.size, setting.volume_slices)
        patient = torch.rand(shape, generator=gen).to(device)
        runners = {arch: bench.volume_inferer() for arch, bench in benches.items()}
        volume_times = _round_robin(
            benches, lambda b: runners[b.arch](patient), min(1, options.warmup), options.volume_repeats, device
        )
        volume = {
            "method": "monai.inferers.SliceInferer (slice-wise 2D), inference_mode, same precision and memory format",
            "slices": setting.volume_slices,
            "slice_size": [setting.size, setting.size],
            "sw_batch_size": setting.sw_batch_size,
            "repeats": options.volume_repeats,
        }
    for arch in archs:
        r = results[arch]
        r["train_step_s"] = _summary(train[arch])
        r["train_samples_per_s"] = setting.batch / r["train_step_s"]["median"]
        r["train_tflops_per_s"] = r["gflops_train_step_per_sample"] * r["train_samples_per_s"] / 1e3
        r["inference_batch_s"] = _summary(infer[arch])
        r["inference_ms_per_sample"] = 1e3 * r["inference_batch_s"]["median"] / setting.batch
        if arch in volume_times:
            r["volume_inference_s"] = _summary(volume_times[arch])
    if "hps" in archs:
        for arch in archs:
            r = results[arch]
            r["train_step_x_hps"] = paired_ratio(train[arch], train["hps"])
            r["inference_x_hps"] = paired_ratio(infer[arch], infer["hps"])
            if arch in volume_times:
                r["volume_inference_x_hps"] = paired_ratio(volume_times[arch], volume_times["hps"])
    if "mtan" in archs and "ctan" in archs:
        results["ctan"]["train_step_x_mtan"] = paired_ratio(train["ctan"], train["mtan"])
    # the timings above must survive a failure of the optional measurements below: record it and go on
    try:
        memory_method = _measure_memory(setting, benches, results, options)
    except Exception as err:
        _log(f"{setting.name}: peak memory failed:\n{traceback.format_exc()}")
        memory_method = f"failed: {type(err).__name__}: {err}"
    profiles = {}
    if options.profile:
        for arch, bench in benches.items():
            _log(f"{setting.name}: profiling one training step of {arch}")
            try:
                profiles[arch] = profile_train_step(bench, options.profile)
            except Exception as err:
                _log(f"{setting.name}: profiling {arch} failed:\n{traceback.format_exc()}")
                profiles[arch] = {"error": f"{type(err).__name__}: {err}"}
    for bench in benches.values():
        bench.release()
    benches.clear()
    gc.collect()
    if options.is_cuda:
        torch.cuda.empty_cache()
    return {
        "setting": asdict(setting),
        "summary": setting.summary(),
        "status": "measured",
        "archs": results,
        "volume_inference": volume,
        "memory_method": memory_method,
        "profile": profiles,
    }


def _measure_memory(
    setting: BenchmarkSetting,
    benches: Mapping[str, ArchBench],
    results: dict[str, dict[str, Any]],
    options: BenchmarkOptions,
) -> str:
    method = options.cpu_memory
    if options.is_cuda or (method == "auto" and ResidentPeak.available()) or method == "peak":
        _log(f"{setting.name}: peak memory per architecture")
        for arch, bench in benches.items():
            results[arch].update(peak_memory(bench))
        source = (
            "torch.cuda.max_memory_allocated"
            if options.is_cuda
            else "resident set (VmHWM after malloc_trim and a high-water-mark reset, Linux)"
        )
        return (
            f"peak {source} during one step above what was allocated before it (the other models included), plus "
            "the architecture's own weights and Adam state (weights alone for inference), as tensor bytes"
        )
    if method == "off":
        return "not measured (--cpu_memory off)"
    for arch in benches:
        _log(f"{setting.name}: peak RSS of {arch} in a fresh subprocess")
        results[arch].update(_probe_in_subprocess(setting, arch, options))
    return (
        "peak RSS (getrusage ru_maxrss) of a fresh subprocess per architecture that builds the model, runs inference "
        "(inference peak), then two training steps (training peak), above its peak after the imports and the batch"
    )


# --------------------------------------------------------------------------------------------------- data pipelines
class PipelineUnavailableError(RuntimeError):
    """A bundle's data pipeline cannot run here (a package or module it needs is missing)."""


@dataclass
class PipelineSpec:
    """A bundle's training dataset ready for a ``DataLoader``.

    Args:
        dataset: the training dataset with its augmentation.
        description: what it is, for the report.
        task_names: the tasks of the batches.
        items_per_batch: dataset items per batch (STOIC: patients, each giving several slices).
        monai_loader: use ``monai.data.DataLoader`` (its collate flattens per-patient lists, handles MetaTensor).
        data: ``"demo"`` or the real data folder.
    """

    dataset: torch.utils.data.Dataset
    description: str
    task_names: list[str]
    items_per_batch: int
    monai_loader: bool = False
    data: str = "demo"


def _reuse_or_run(
    marker: Path, params: Mapping[str, Any], action: Callable[[], Any], valid: Callable[[Any], bool]
) -> Any:
    """Run ``action`` once per ``params``: its JSON result is kept in ``marker`` and returned again next time, as
    long as ``valid(result)`` (e.g. the files it wrote still exist)."""
    if marker.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            saved = json.loads(marker.read_text(encoding="utf-8"))
            if saved.get("params") == dict(params) and valid(saved["result"]):
                return saved["result"]
    result = action()
    atomic_write_json(marker, {"params": dict(params), "result": result})
    return result


def _real_or_demo_dir(setting: str, options: BenchmarkOptions) -> tuple[Path, Path, bool]:
    """(data folder, cache folder, is_demo) of a setting under the data root."""
    root = Path(options.data_root) / setting
    given = options.dataset_dirs.get(setting)
    if given is None:
        return root / "demo", root / "demo_cache", True
    tag = hashlib.sha1(str(Path(given).resolve()).encode()).hexdigest()[:10]
    return Path(given), root / f"cache_{tag}", False


def _require(module: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as err:
        raise PipelineUnavailableError(f"{module} cannot be imported ({err})") from None


def _openkbp_pipeline(setting: BenchmarkSetting, options: BenchmarkOptions) -> PipelineSpec:
    _require("nibabel")
    from ctan_monai.apps.openkbp.prepare import prepare_openkbp
    from ctan_monai.data.slices import AxialSliceDataset, slice_augmentation

    data_dir, cache_dir, demo = _real_or_demo_dir("openkbp", options)
    n = options.pipeline_patients
    if (data_dir / "manifest.json").is_file():  # an existing NIfTI cache (the CSVs need not be there)
        from ctan_monai.apps.openkbp.conversion import load_manifest

        entries = load_manifest(data_dir, "train-pats")[:n]
    else:
        splits = prepare_openkbp(data_dir, cache_dir, write_demo_if_missing=demo, demo_patients=(max(2, n), 0))
        entries = splits["train-pats"][:n]
    seg, dose = (t.name for t in setting.task_specs())
    dataset = AxialSliceDataset(
        entries,
        seg_task=seg,
        dose_task=dose,
        num_classes=setting.task_specs()[0].out_channels,
        slice_rule="dose_mask",
        spatial_size=(setting.size, setting.size),
        transform=slice_augmentation(seg, dose),
    )
    return PipelineSpec(
        dataset,
        f"ctan_monai.data.slices.AxialSliceDataset over the NIfTI cache of {len(entries)} "
        f"{'synthetic demo' if demo else 'real'} patient(s) ({len(dataset)} slices, rule dose_mask, in memory) + "
        "slice_augmentation (RandAffined, intensity), torch DataLoader",
        [seg, dose],
        setting.batch,
        data="demo" if demo else str(data_dir),
    )


def _ham10000_pipeline(setting: BenchmarkSetting, options: BenchmarkOptions) -> PipelineSpec:
    _require("PIL")
    from monai.data import Dataset

    from ctan_monai.apps.ham10000.transforms import train_transforms
    from ctan_monai.apps.ham10000.validation import build_datalist

    data_dir, _, demo = _real_or_demo_dir("ham10000", options)
    images = max(7, 20 * options.pipeline_patients)
    if demo:
        from ctan_monai.apps.ham10000.demo import write_ham10000_demo

        _reuse_or_run(
            data_dir.parent / "demo.json",
            {"n_images": images, "seed": 0},
            lambda: str(write_ham10000_demo(data_dir, n_images=images, seed=0)),
            lambda folder: (Path(folder) / "HAM10000_metadata.csv").is_file(),
        )
    datalist = build_datalist(data_dir)[:images]
    dataset = Dataset(datalist, transform=train_transforms(setting.size))
    return PipelineSpec(
        dataset,
        f"monai.data.Dataset of {len(datalist)} {'synthetic demo' if demo else 'real'} JPEG images + PNG masks "
        "with ctan_monai.apps.ham10000.transforms.train_transforms (decode, resize, flips, affine, colour), "
        "monai DataLoader",
        [t.name for t in setting.task_specs()],
        setting.batch,
        monai_loader=True,
        data="demo" if demo else str(data_dir),
    )


STOIC_SLICES_PER_PATIENT = 4


def _stoic_pipeline(setting: BenchmarkSetting, options: BenchmarkOptions) -> PipelineSpec:
    _require("SimpleITK")
    from ctan_monai.apps.stoic import Stoic25DDataset, convert_dataset

    data_dir, cache_dir, demo = _real_or_demo_dir("stoic", options)
    patients = max(3, options.pipeline_patients)
    if demo:
        from ctan_monai.apps.stoic.demo import write_stoic_demo

        _reuse_or_run(
            data_dir.parent / "demo.json",
            {"n_patients": patients, "seed": 0},
            lambda: str(write_stoic_demo(data_dir, n_patients=patients, seed=0)),
            lambda folder: (Path(folder) / "metadata" / "reference.csv").is_file(),
        )
    cases = convert_dataset(data_dir, cache_dir)["cases"][:patients]
    dataset = Stoic25DDataset(
        cases, training=True, image_size=setting.size, slices_per_patient=STOIC_SLICES_PER_PATIENT
    )
    return PipelineSpec(
        dataset,
        f"ctan_monai.apps.stoic.Stoic25DDataset over the NIfTI cache of {len(cases)} "
        f"{'synthetic demo' if demo else 'real'} patient(s): volume read, lung window, {STOIC_SLICES_PER_PATIENT} "
        "random 3-slice slabs per patient, resize; monai DataLoader",
        [t.name for t in setting.task_specs()],
        max(1, setting.batch // STOIC_SLICES_PER_PATIENT),
        monai_loader=True,
        data="demo" if demo else str(data_dir),
    )


def _prostate_pipeline(setting: BenchmarkSetting, options: BenchmarkOptions) -> PipelineSpec:
    for module in ("pydicom", "SimpleITK", "nibabel"):
        _require(module)
    from ctan_monai.data.dicom_rt.convert import convert_dicom_rt
    from ctan_monai.data.slices import AxialSliceDataset, slice_augmentation

    data_dir, cache_dir, demo = _real_or_demo_dir("prostate", options)
    patients = max(1, options.pipeline_patients)
    if demo:
        from ctan_monai.apps.prostate.demo import write_prostate_demo

        def write_demo() -> int:
            if data_dir.exists():  # a demo of another size: its randomly named files would mix with the new ones
                shutil.rmtree(data_dir)
            return len(write_prostate_demo(data_dir, n_patients=patients, seed=0))

        _reuse_or_run(
            data_dir.parent / "demo.json",
            {"n_patients": patients, "seed": 0},
            write_demo,
            lambda _: (data_dir / "README.txt").is_file(),
        )
    entries = _reuse_or_run(
        cache_dir / "benchmark_conversion.json",
        {"source": str(data_dir.resolve()), "demo_patients": patients if demo else None},
        lambda: convert_dicom_rt(data_dir, cache_dir).entries,
        lambda found: all((cache_dir / e["image"]).is_file() for e in found),
    )[:patients]
    seg, dose = (t.name for t in setting.task_specs())
    dataset = AxialSliceDataset(
        entries,
        seg_task=seg,
        dose_task=dose,
        num_classes=setting.task_specs()[0].out_channels,
        slice_rule="dose_mask",
        spatial_size=(setting.size, setting.size),
        base_dir=cache_dir,
        axcodes="PLI",  # as the prostate bundle (the OpenKBP cache's orientation)
        image_range=(-1024.0, 3071.0),
        transform=slice_augmentation(seg, dose),
    )
    return PipelineSpec(
        dataset,
        f"DICOM-RT ({'synthetic demo' if demo else 'real'}, {len(entries)} patient(s)) converted once to NIfTI by "
        f"ctan_monai.data.dicom_rt, then AxialSliceDataset ({len(dataset)} slices, in memory) + slice_augmentation, "
        "torch DataLoader",
        [seg, dose],
        setting.batch,
        data="demo" if demo else str(data_dir),
    )


PIPELINES: dict[str, Callable[[BenchmarkSetting, BenchmarkOptions], PipelineSpec]] = {
    "openkbp": _openkbp_pipeline,
    "ham10000": _ham10000_pipeline,
    "stoic": _stoic_pipeline,
    "prostate": _prostate_pipeline,
}


def _loader(spec: PipelineSpec, options: BenchmarkOptions, batches: int) -> torch.utils.data.DataLoader:
    sampler = torch.utils.data.RandomSampler(
        spec.dataset,
        replacement=True,
        num_samples=batches * spec.items_per_batch,
        generator=torch.Generator().manual_seed(0),
    )
    kwargs = dict(
        batch_size=spec.items_per_batch,
        sampler=sampler,
        num_workers=options.pipeline_workers,
        pin_memory=options.is_cuda,
        drop_last=True,
    )
    if spec.monai_loader:
        from monai.data import DataLoader as MonaiDataLoader

        return MonaiDataLoader(spec.dataset, **kwargs)
    return torch.utils.data.DataLoader(spec.dataset, **kwargs)


def _time_pipeline(
    setting: BenchmarkSetting,
    builder: Callable[[BenchmarkSetting, BenchmarkOptions], PipelineSpec],
    options: BenchmarkOptions,
) -> dict[str, Any]:
    """Build the pipeline (timed as set-up), then time its start-up batches and its timed batches."""
    start = time.perf_counter()
    spec = builder(setting, options)
    setup = time.perf_counter() - start
    from ctan_monai.engines.prepare_batch import MultiTaskPrepareBatch

    prepare = MultiTaskPrepareBatch(task_names=spec.task_names, channels_last=options.channels_last)
    device = options.torch_device
    loader = _loader(spec, options, options.pipeline_warmup + options.pipeline_batches)
    _log(
        f"{setting.name}: pipeline, {options.pipeline_workers} worker(s), "
        f"{options.pipeline_warmup} + {options.pipeline_batches} batches"
    )
    samples = 0
    batches = iter(loader)
    start = time.perf_counter()
    for _ in range(options.pipeline_warmup):
        prepare(next(batches), device, non_blocking=True)
    _synchronize(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(options.pipeline_batches):
        image, _targets = prepare(next(batches), device, non_blocking=True)
        samples += int(image.shape[0])
    _synchronize(device)
    elapsed = time.perf_counter() - start
    del batches
    return {
        "status": "measured",
        "description": spec.description,
        "data": spec.data,
        "workers": options.pipeline_workers,
        "pin_memory": options.is_cuda,
        "batch_size_samples": samples // options.pipeline_batches,
        "setup_s": setup,
        "warmup_batches": options.pipeline_warmup,
        "warmup_s": first,
        "timed_batches": options.pipeline_batches,
        "timed_s": elapsed,
        "samples_per_s": samples / elapsed,
    }


def benchmark_pipeline(
    setting: BenchmarkSetting, options: BenchmarkOptions, model: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Time a bundle's training data pipeline and compare it with the models' consumption.

    The loader's batches are moved to the device as the trainer does (``MultiTaskPrepareBatch``, pinned memory and
    non-blocking copies on CUDA, channels-last when asked). The first ``pipeline_warmup`` batches (worker start-up)
    are timed separately.

    Args:
        setting: the setting (its name selects the pipeline; its batch size is used).
        options: workers, batches, data folders.
        model: the setting's result of ``benchmark_setting``; its training samples/s give the ratios.

    Returns:
        ``{"status": "measured", "samples_per_s", "ratio_to_model": {arch: x}, "min_ratio", ...}``, or
        ``{"status": "skipped" | "failed", "note"}``.
    """
    builder = PIPELINES.get(setting.name)
    if builder is None:
        return {"status": "skipped", "note": f"no data pipeline is defined for setting {setting.name!r}"}
    try:
        result = _time_pipeline(setting, builder, options)
    except (PipelineUnavailableError, ImportError) as err:
        _log(f"{setting.name} pipeline skipped: {err}")
        return {"status": "skipped", "note": f"{type(err).__name__}: {err}"}
    except Exception as err:  # the model figures must survive a broken pipeline: record and go on
        _log(f"{setting.name} pipeline failed:\n{traceback.format_exc()}")
        return {"status": "failed", "note": f"{type(err).__name__}: {err}"}
    consumption = {a: r["train_samples_per_s"] for a, r in (model or {}).get("archs", {}).items()}
    if consumption:
        ratios = {arch: result["samples_per_s"] / sps for arch, sps in consumption.items()}
        fastest = max(consumption, key=consumption.get)
        result.update(
            ratio_to_model=ratios,
            min_ratio=ratios[fastest],
            min_ratio_arch=fastest,
            target=TARGETS["pipeline_vs_model"],
            meets_target=ratios[fastest] >= TARGETS["pipeline_vs_model"],
        )
    return result


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
    """
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise ValueError(f"unknown or no architecture(s) {unknown}; choose from {list(ARCHS)}")
    if len(set(archs)) != len(archs):
        raise ValueError(f"an architecture is named twice in {list(archs)}")


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
    p.add_argument("--archs", nargs="+", default=list(ARCHS), help="architectures (default: all four)")
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
        options.check()
        check_archs(args.archs)
    except ValueError as err:
        print(f"throughput.py: error: {err}", file=sys.stderr)
        return 2
    report = run(settings, args.archs, options, args.output)
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
