"""The data-pipeline benchmark: each bundle's training dataset, augmentation and DataLoader, in samples/s against
what the model consumes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctan_monai.utils.atomic import atomic_write_json
from throughput_lib.settings import TARGETS, BenchmarkOptions, BenchmarkSetting
from throughput_lib.timing import _log, _synchronize


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
