"""The model benchmark: one architecture's training and inference step, FLOPs, peak memory (device or resident),
the profile of a training step, and the interleaved benchmark of every architecture of a setting."""

from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ctan_monai.losses import MultiTaskLoss
from ctan_monai.networks import build_network
from throughput_lib.settings import MIB, BenchmarkOptions, BenchmarkSetting
from throughput_lib.timing import _log, _summary, _synchronize, _timed, paired_ratio, round_robin_orders


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
        self.net = self.build_network().to(device=self.device, memory_format=self.memory_format)
        self.loss = MultiTaskLoss(setting.tasks, weighting="dwa").to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-4, weight_decay=1e-5)
        source = synthetic_batch(setting) if batch is None else batch
        self.batch = {k: v.to(self.device) for k, v in source.items()}
        self.batch["image"] = self.batch["image"].contiguous(memory_format=self.memory_format)

    def build_network(self) -> torch.nn.Module:
        """The network of ``self.arch`` for the setting (a peer's bench builds its library's network instead).

        Returns:
            the module, on the CPU, returning ``{task_name: output}``.
        """
        s = self.setting
        return build_network(self.arch, s.tasks, s.backbone, spatial_dims=2, in_channels=s.in_channels)

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
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "throughput.py"), "--memory_probe", payload]
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
    """Measure every architecture on one setting (interleaved), with ratios to HPS when HPS is among them and to
    every peer (LibMTL's architectures, ``throughput_lib.peers``) among them.

    Args:
        setting: the setting.
        archs: the architectures, ours and peers.
        options: how to measure.

    Returns:
        ``{"setting": ..., "archs": {arch: figures}, "volume_inference": ..., "profile": ...}``; times in seconds.
    """
    from throughput_lib.peers import PEER_ARCHS, make_bench  # here: peers builds on this module's ArchBench

    device = options.torch_device
    batch = synthetic_batch(setting)
    benches: dict[str, ArchBench] = {}
    results: dict[str, dict[str, Any]] = {}
    for arch in archs:
        _log(f"{setting.name}: building {arch}")
        bench = make_bench(arch, setting, options, batch)
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
    # every architecture against every peer measured beside it (the side-by-side table)
    for peer in (a for a in archs if a in PEER_ARCHS):
        for arch in archs:
            r = results[arch]
            r[f"train_step_x_{peer}"] = paired_ratio(train[arch], train[peer])
            r[f"inference_x_{peer}"] = paired_ratio(infer[arch], infer[peer])
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
