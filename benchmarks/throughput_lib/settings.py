"""The benchmark settings (one per bundle: backbone, input, batch, tasks) and the run's options."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ctan_monai.tasks import TaskSpec, parse_tasks

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
        from throughput_lib.models import ResidentPeak  # local: models imports this module

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
