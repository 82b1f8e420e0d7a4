"""Shared fixtures: the real public data in ../shared/data, extracted once per test run into a cache."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import numpy as np
    import torch
    from ignite.engine import Engine

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTAN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# Extraction cache: reused across runs of the suite on one machine; CI points it at a fresh folder.
CACHE_ROOT = Path(os.environ.get("CTAN_TEST_CACHE", REPO_ROOT / ".cache" / "test-data"))


def _share_threads_between_workers() -> None:
    """Under pytest-xdist (``-n``), give each worker its share of the cores: the workers' torch threads and the
    commands they start (``OMP_NUM_THREADS``) would otherwise oversubscribe the CPU. An explicit
    ``OMP_NUM_THREADS`` is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


_share_threads_between_workers()


def _require_shared() -> bool:
    return os.environ.get("CTAN_REQUIRE_SHARED_DATA", "") not in ("", "0", "false", "False")


def shared_file(relative: str) -> Path:
    """Path of a file under ../shared/data; skip (or fail with CTAN_REQUIRE_SHARED_DATA=1) when absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        reason = f"real data not found: {path} (set CTAN_SHARED_DATA or place ../shared/data beside the repo)"
        if _require_shared():
            pytest.fail(reason + "; CTAN_REQUIRE_SHARED_DATA=1 makes this a failure")
        pytest.skip(reason)
    return path


def extract_shared_archive(relative: str) -> Path:
    """Extract an archive of ../shared/data once into the cache and return the extraction folder.

    A marker file is written last, so an interrupted extraction is redone rather than trusted.
    """
    archive = shared_file(relative)
    target = CACHE_ROOT / Path(relative).name.split(".")[0]
    marker = target / ".extracted"
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    # one extraction at a time: pytest-xdist workers share the cache and may ask for one archive at once
    with open(CACHE_ROOT / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == f"{archive.stat().st_size}":
            return target
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        marker.write_text(f"{archive.stat().st_size}")
    return target


def run_command(
    command: list[str],
    cwd: Path,
    timeout: float = 600,
    expect_ok: bool = True,
    threads: int | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command in ``cwd`` with ``threads`` OpenMP threads (default: the suite's own ``OMP_NUM_THREADS``, else
    2) in the environment ``env`` (default: this process's); return its output (stdout and stderr) after asserting
    that it succeeded (``expect_ok``) or failed."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "2")) if threads is None else threads
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-4000:]
    return proc.stdout


def run_bundle(args: list[str], cwd: Path, **kwargs) -> str:
    """``python -m monai.bundle <args>`` through :func:`run_command`."""
    return run_command([sys.executable, "-m", "monai.bundle", *args], cwd, **kwargs)


def compare_metrics(bundle: Path, output_dir: Path, validated: bool = True) -> dict[str, float]:
    """Check a bundle's ``configs/compare.yaml`` against a real run: its report is where the spec says, every task
    metric is in it (finite or NaN), and every learning curve is in ``metrics_history.json`` (``val_*`` ones only
    when the run ``validated``). Returns the metrics by task."""
    from ctan_monai.compare.spec import load_comparison_spec, read_metric

    spec = load_comparison_spec(bundle)
    report_path = output_dir / spec.report
    assert report_path.is_file(), f"compare.yaml names {spec.report}, evaluation wrote no such file"
    metrics = {m.task: read_metric(json.loads(report_path.read_text()), m, str(report_path)) for m in spec.metrics}
    assert all(math.isnan(v) or math.isfinite(v) for v in metrics.values())
    history = json.loads((output_dir / "metrics_history.json").read_text())
    expected = [c for c in spec.curves if validated or not c.startswith("val_")]
    assert set(expected) <= set(history), f"curves missing from metrics_history.json: {set(expected) - set(history)}"
    return metrics


def run_handler(handler: Any, batches: list[tuple[dict, dict]]) -> Engine:
    """Attach ``handler`` to an Ignite engine whose iterations return the given evaluator outputs, run one epoch over
    the batches and return the engine.

    Args:
        handler: an object with ``attach(engine)`` (an evaluation handler).
        batches: (batch, evaluator output) pairs; the engine's iteration ``i`` returns output ``i``.

    Returns:
        the engine after the run (its ``state.metrics`` hold what the handler computed).
    """
    from ignite.engine import Engine

    outputs = iter([out for _, out in batches])
    engine = Engine(lambda e, batch: next(outputs))
    handler.attach(engine)
    engine.run([b for b, _ in batches], max_epochs=1)
    return engine


def one_hot_logits(labels: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits ``[N, C, ...]`` whose argmax over axis 1 is ``labels`` ``[N, ...]``."""
    import torch

    return torch.nn.functional.one_hot(torch.as_tensor(labels).long(), num_classes).movedim(-1, 1).float() * 5


@pytest.fixture(scope="session")
def openkbp_root() -> Path:
    """Extracted OpenKBP subset (folder that contains the patient folders' parents)."""
    return extract_shared_archive("openkbp/openkbp-subset.tar.gz")


@pytest.fixture(scope="session")
def ham10000_root() -> Path:
    """Extracted HAM10000 subset."""
    return extract_shared_archive("ham10000/ham10000-subset.tar")


@pytest.fixture(scope="session")
def stoic_root() -> Path:
    """Extracted STOIC-format sample."""
    return extract_shared_archive("stoic/stoic-sample.tar")


@pytest.fixture(scope="session")
def dicom_rt_root() -> Path:
    """Extracted real thorax DICOM-RT patient."""
    return extract_shared_archive("dicom_rt/onkodicom-thorax-rt.tar.gz")


OPENKBP_BUNDLE = REPO_ROOT / "bundles" / "ctan_openkbp"
# a small, fast training budget for bundle tests: resnet18, 16 random slices (2 iterations) per epoch, no evaluation
# of the untrained network (the demo-learns test covers the summary)
QUICK_TRAIN_ARGS = [
    "--backbone",
    "resnet18",
    "--batch_size",
    "8",
    "--train_slices_per_epoch",
    "16",
    "--progress_bar",
    "False",
    "--num_workers",
    "0",
    "--summary_untrained",
    "False",
]


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory) -> Path:
    """A copy of the OpenKBP bundle's configs in a temp folder, one per test module (the demo data and cache are
    written there on first use)."""
    root = tmp_path_factory.mktemp("bundle") / "ctan_openkbp"
    shutil.copytree(OPENKBP_BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    return root


# the longest test files, run first so that pytest-xdist (``-n auto --dist loadfile``) has the short ones left to
# balance the workers at the end (measured on the 2-core CI machine; order only, nothing is skipped)
LONG_TEST_FILES = (
    "test_zoo_portability_ct.py",
    "test_zoo_portability_2d.py",
    "test_compare.py",
    "test_openkbp_bundle.py",
    "test_prostate_bundle.py",
    "test_ham10000_bundle.py",
    "test_monailabel_server.py",
    "test_openkbp_inference.py",
    "test_stoic_bundle.py",
    "test_reliability_kill_loop.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Put the long test files first (stable: the order within a file is kept)."""
    rank = {name: i for i, name in enumerate(LONG_TEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
