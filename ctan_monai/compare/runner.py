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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ctan_monai.compare.spec import ComparisonSpec, read_metric
from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text

__all__ = ["RunPlan", "environment_record", "execute_run", "load_finished_run"]

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


def load_finished_run(plan: RunPlan) -> dict[str, Any] | None:
    """The record of a finished run, or None when the run has not finished.

    Raises:
        ValueError: when the finished run was made with other settings than ``plan`` (mixing them would make the
            table compare unlike runs).
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
    return record


def execute_run(
    plan: RunPlan, spec: ComparisonSpec, python: str = sys.executable, timeout_s: float | None = None
) -> dict[str, Any]:
    """Train, evaluate and record one run; return its record.

    Args:
        plan: the run.
        spec: the bundle's comparison settings.
        python: the interpreter that runs the bundle.
        timeout_s: limit for each of the two subprocesses.

    Returns:
        the record written to ``run.json``: arch, seed, overrides, metrics per task, timings (s), environment.

    Raises:
        RuntimeError: when training or evaluation fails (the message names the log file and ends with its tail).
    """
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    override_file = plan.run_dir / "overrides.yaml"
    atomic_write_text(override_file, yaml.safe_dump(_plain(plan.overrides), sort_keys=True))
    train_config = str(spec.bundle / spec.train_config)
    evaluate_config = str(spec.bundle / spec.evaluate_config)
    record: dict[str, Any] = {
        "arch": plan.arch,
        "seed": plan.seed,
        "status": "running",
        "overrides": _plain(plan.overrides),
        "environment": environment_record(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(plan.run_dir / "run.json", record)
    timings = {}
    for stage, run_id, configs in (
        ("train", "training", [train_config, str(override_file)]),
        ("evaluate", spec.evaluate_id, [train_config, evaluate_config, str(override_file)]),
    ):
        command = [python, "-m", "monai.bundle", "run", run_id, "--config_file", repr(configs)]
        record[f"{stage}_command"] = command
        start = time.perf_counter()
        _run_logged(command, plan.run_dir / f"{stage}.log", cwd=spec.bundle, timeout_s=timeout_s)
        timings[f"{stage}_s"] = round(time.perf_counter() - start, 2)
        logger.info("%s: %s finished in %.1f s", plan.name, stage, timings[f"{stage}_s"])
    report_path = plan.run_dir / spec.report
    if not report_path.is_file():
        raise RuntimeError(f"{plan.name}: evaluation wrote no report at {report_path}")
    report = json.loads(report_path.read_text())
    record["metrics"] = {m.task: read_metric(report, m, str(report_path)) for m in spec.metrics}
    record["timings"] = timings
    record["status"] = "finished"
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(plan.run_dir / "run.json", record)
    return record


def _run_logged(command: list[str], log_path: Path, cwd: Path, timeout_s: float | None) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
