"""Train and evaluate one (architecture, seed) run of a comparison through the bundle's own commands, and record it.

Each run is a subprocess ``python -m monai.bundle run training`` then ``run evaluating`` over the bundle's configs
plus one generated override file, so a comparison trains exactly what a user's command would. A run is finished when
its ``run.json`` says so; an interrupted run is rerun, and the bundle's own resume continues its training from the
last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ctan_monai.compare.spec import ComparisonSpec, read_floor, read_metric
from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text

__all__ = [
    "RunPlan",
    "environment_record",
    "execute_run",
    "job_environments",
    "load_finished_run",
    "prepare_data",
    "report_values",
    "run_plans",
]

logger = logging.getLogger("ctan_monai.compare")


@dataclass(frozen=True)
class RunPlan:
    """One training + evaluation of the comparison.

    Args:
        arch: the architecture.
        seed: the seed (network initialisation, data order, augmentation).
        run_dir: the run's folder (its bundle ``output_dir``).
        overrides: every config value the run sets over the bundle's configs.
    """

    arch: str
    seed: int
    run_dir: Path
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        """``<arch>_seed<seed>``."""
        return f"{self.arch}_seed{self.seed}"


def environment_record() -> dict[str, Any]:
    """Versions and machine of this process, for the records of every run.

    Returns:
        python, torch, monai, ctan_monai versions, the git commit of the package (if any), CPU/GPU and thread count.
    """
    import monai
    import torch

    import ctan_monai

    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(ctan_monai.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "ctan_monai": getattr(ctan_monai, "__version__", "unknown"),
        "git_commit": commit,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def load_finished_run(plan: RunPlan, spec: ComparisonSpec | None = None) -> dict[str, Any] | None:
    """The record of a finished run, or None when the run has not finished.

    Args:
        plan: the run.
        spec: the bundle's comparison settings: when given and the run's report is still there, the record's extra
            metrics and floors are read again from it (so a spec that gained an extra metric or a floor applies to
            runs finished before); the task metrics stay as recorded.

    Returns:
        the record (``run.json``), or None.

    Raises:
        ValueError: when the finished run was made with other settings than ``plan`` (mixing them would make the
            table compare unlike runs).

    Example:
        >>> record = load_finished_run(plans[0], spec)  # doctest: +SKIP
    """
    path = plan.run_dir / "run.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("status") != "finished":
        return None
    if record.get("overrides") != _plain(plan.overrides):
        raise ValueError(
            f"{path}: this run finished with other settings ({record.get('overrides')}) than now "
            f"({_plain(plan.overrides)}); use a new --output_dir for a different comparison"
        )
    if spec is not None and (plan.run_dir / spec.report).is_file():
        report_path = plan.run_dir / spec.report
        values = report_values(json.loads(report_path.read_text()), spec, str(report_path), strict=False)
        record["extra_metrics"], record["floor"] = values["extra_metrics"], values["floor"]
    return record


def report_values(report: dict[str, Any], spec: ComparisonSpec, source: str, strict: bool = True) -> dict[str, Any]:
    """What a run's record keeps of its evaluation report: the task metrics, the extra metrics and the floors.

    Args:
        report: the parsed report.
        spec: the bundle's comparison settings.
        source: the report's name, for messages.
        strict: raise on a missing extra metric (a new run); otherwise record it as NaN with a WARNING (a run
            finished before the spec declared it).

    Returns:
        ``{"metrics": {task: M}, "extra_metrics": {name: value}, "floor": {key: value or None}}`` (a floor is None
        where the report has none).

    Raises:
        KeyError: when a task metric (or, with ``strict``, an extra metric) is not in the report.

    Example:
        >>> values = report_values(json.loads(Path("run/evaluation/report.json").read_text()), spec, "report")
        ... # doctest: +SKIP
        >>> sorted(values)  # doctest: +SKIP
        ['extra_metrics', 'floor', 'metrics']
    """
    extras: dict[str, float] = {}
    for metric in spec.extra_metrics:
        try:
            extras[metric.key] = read_metric(report, metric, source)
        except KeyError as error:
            if strict:
                raise
            logger.warning("%s (extra metric left out: n/a)", error.args[0])
            extras[metric.key] = float("nan")
    floors = {m.key: read_floor(report, m) for m in spec.reported_metrics}
    absent = [m.floor_path for m in spec.reported_metrics if m.floor_path is not None and floors[m.key] is None]
    if absent:
        logger.warning("%s: no floor at %s (the table's floor row leaves it out)", source, ", ".join(absent))
    return {
        "metrics": {m.task: read_metric(report, m, source) for m in spec.metrics},
        "extra_metrics": extras,
        "floor": floors,
    }


def execute_run(
    plan: RunPlan,
    spec: ComparisonSpec,
    python: str = sys.executable,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and record one run; return its record.

    Args:
        plan: the run.
        spec: the bundle's comparison settings.
        python: the interpreter that runs the bundle.
        timeout_s: limit for each of the two subprocesses.
        env: environment variables set for the run's subprocesses (its job slot: ``CUDA_VISIBLE_DEVICES``,
            ``OMP_NUM_THREADS``), recorded with the run.

    Returns:
        the record written to ``run.json``: arch, seed, overrides, metrics per task, extra metrics, floors (see
        :func:`report_values`), timings (s), environment.

    Raises:
        RuntimeError: when training or evaluation fails (the message names the log file and ends with its tail).
        KeyError: when the report lacks a declared task or extra metric.
    """
    override_file = _write_overrides(plan)
    train_config = str(spec.bundle / spec.train_config)
    evaluate_config = str(spec.bundle / spec.evaluate_config)
    record: dict[str, Any] = {
        "arch": plan.arch,
        "seed": plan.seed,
        "status": "running",
        "overrides": _plain(plan.overrides),
        "environment": environment_record(),
        "job_environment": dict(env or {}),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(plan.run_dir / "run.json", record)
    timings = {}
    for stage, run_id, configs in (
        ("train", "training", [train_config, str(override_file)]),
        ("evaluate", spec.evaluate_id, [train_config, evaluate_config, str(override_file)]),
    ):
        command = _bundle_command(python, run_id, configs)
        record[f"{stage}_command"] = command
        start = time.perf_counter()
        _run_logged(command, plan.run_dir / f"{stage}.log", cwd=spec.bundle, timeout_s=timeout_s, env=env)
        timings[f"{stage}_s"] = round(time.perf_counter() - start, 2)
        logger.info("%s: %s finished in %.1f s", plan.name, stage, timings[f"{stage}_s"])
    report_path = plan.run_dir / spec.report
    if not report_path.is_file():
        raise RuntimeError(f"{plan.name}: evaluation wrote no report at {report_path}")
    report = json.loads(report_path.read_text())
    record.update(report_values(report, spec, str(report_path)))
    record["timings"] = timings
    record["status"] = "finished"
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(plan.run_dir / "run.json", record)
    return record


def prepare_data(
    plan: RunPlan,
    spec: ComparisonSpec,
    python: str = sys.executable,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Prepare the bundle's data once, with ``plan``'s settings, before runs start in parallel: evaluate the
    bundle's ``spec.prepare_id`` (its ``data`` item: demo writing, validation, conversion to a cache, split), so that
    parallel runs find the cache made instead of each converting the same data at once. Logged to the run's
    ``prepare.log``.

    Args:
        plan: a run whose settings (dataset, cache) the others share.
        spec: the bundle's comparison settings.
        python: the interpreter that runs the bundle.
        timeout_s: limit for the subprocess.
        env: environment variables for the subprocess.

    Raises:
        RuntimeError: when the preparation fails (the message names the log file and ends with its tail).

    Example:
        >>> prepare_data(plans[0], spec)  # doctest: +SKIP
    """
    override_file = _write_overrides(plan)
    configs = [str(spec.bundle / spec.train_config), str(override_file)]
    command = _bundle_command(python, spec.prepare_id, configs)
    start = time.perf_counter()
    _run_logged(command, plan.run_dir / "prepare.log", cwd=spec.bundle, timeout_s=timeout_s, env=env)
    logger.info("data prepared in %.1f s (%s)", time.perf_counter() - start, plan.run_dir / "prepare.log")


def _bundle_command(python: str, run_id: str, configs: Sequence[str]) -> list[str]:
    # MONAI's CLI parses --config_file as a Python literal: a list of files is merged in order
    return [python, "-m", "monai.bundle", "run", run_id, "--config_file", repr(list(configs))]


def _write_overrides(plan: RunPlan) -> Path:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    override_file = plan.run_dir / "overrides.yaml"
    atomic_write_text(override_file, yaml.safe_dump(_plain(plan.overrides), sort_keys=True))
    return override_file


def _run_logged(
    command: list[str], log_path: Path, cwd: Path, timeout_s: float | None, env: Mapping[str, str] | None = None
) -> None:
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"{log_path}: timed out after {timeout_s} s") from error
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command[:5])} failed (exit {proc.returncode}); log {log_path}:\n{tail}")


def _plain(value: Any) -> Any:
    """Overrides as plain JSON/YAML types (tuples to lists, paths to strings), so records compare equal."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def job_environments(jobs: int, gpus: Sequence[str] = (), cpu_count: int | None = None) -> list[dict[str, str]]:
    """The environment variables of each of ``jobs`` parallel run slots.

    Each slot gets an equal share of the CPU threads (``OMP_NUM_THREADS``, only when ``jobs > 1``: more threads than
    cores make every OpenMP barrier wait) and, when ``gpus`` are given, one of them (``CUDA_VISIBLE_DEVICES``,
    round-robin, so two slots may share a large GPU).

    Args:
        jobs: runs at the same time, at least 1.
        gpus: GPU ids (as ``CUDA_VISIBLE_DEVICES`` spells them) to spread the slots over; empty: leave it unset.
        cpu_count: cores to share (default: ``os.cpu_count()``).

    Returns:
        one dict per slot.

    Raises:
        ValueError: when ``jobs`` is below 1.

    Example:
        >>> job_environments(2, gpus=["0", "1"], cpu_count=16)
        [{'OMP_NUM_THREADS': '8', 'CUDA_VISIBLE_DEVICES': '0'}, {'OMP_NUM_THREADS': '8', 'CUDA_VISIBLE_DEVICES': '1'}]
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    cores = cpu_count or os.cpu_count() or 1
    slots = []
    for slot in range(jobs):
        env = {"OMP_NUM_THREADS": str(max(1, cores // jobs))} if jobs > 1 else {}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
        slots.append(env)
    return slots


def run_plans(
    plans: Sequence[RunPlan],
    execute: Callable[[RunPlan, dict[str, str]], dict[str, Any]],
    environments: Sequence[dict[str, str]],
    keep_going: bool = False,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Run ``plans`` in their order, as many at a time as there are ``environments`` (job slots).

    A failed run (``execute`` raising, e.g. ``RuntimeError`` from a failed subprocess or ``KeyError`` from a report
    without the declared metric) is logged; without ``keep_going`` no further run starts,
    while the runs already going in other slots finish (their records are kept, so a rerun resumes from there).

    Args:
        plans: the runs still to do.
        execute: trains and evaluates one run in a slot's environment; returns its record.
        environments: one environment per slot (:func:`job_environments`).
        keep_going: start the remaining runs after a failure.

    Returns:
        the records of the finished runs by run name, and the names of the failed runs.

    Example:
        >>> records, failed = run_plans(plans, lambda p, env: execute_run(p, spec, env=env), job_environments(2))
        ... # doctest: +SKIP
    """
    pending = list(plans)
    lock = threading.Lock()
    stop = threading.Event()
    records: dict[str, dict[str, Any]] = {}
    failures: list[str] = []

    def work(env: dict[str, str]) -> None:
        while not stop.is_set():
            with lock:
                if not pending:
                    return
                plan = pending.pop(0)
            try:
                record = execute(plan, env)
            except Exception as error:  # in a worker thread an uncaught error would vanish: count it as a failure
                logger.error("%s failed: %s: %s", plan.name, type(error).__name__, error)
                with lock:
                    failures.append(plan.name)
                if not keep_going:
                    stop.set()
                continue
            with lock:
                records[plan.name] = record

    if len(environments) == 1:
        work(environments[0])
    else:
        workers = [threading.Thread(target=work, args=(env,), daemon=True) for env in environments]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return records, failures
