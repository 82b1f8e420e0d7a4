"""Ablation of training choices on one budget: train and evaluate a bundle once per variant, then tabulate.

Each variant is a set of bundle overrides (the bundle's own ``--key value`` arguments) applied on top of shared
ones, run with ``python -m monai.bundle run training`` exactly as a user would; the validation report that the
run's last validation wrote (``<output_dir>/validation/report.json``) gives the row. A variant whose report exists is
not rerun, so an interrupted ablation continues where it stopped.

Usage (the OpenKBP ablation in ``docs/ablation.md``)::

    python benchmarks/ablation.py --bundle bundles/ctan_openkbp --variants benchmarks/openkbp_ablation.yaml \\
        --out runs/ablation/openkbp --set dataset_dir=/data/openkbp-subset

The variants file maps names to overrides, in table order::

    paper: {learning_rate: 0.0001, lr_schedule: constant, dose_scale: 1.0, dose_initial: 0.0}
    default: {}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ctan_monai.compare.__main__ import parse_overrides
from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text

# what run_variant sets itself for every variant
RESERVED_KEYS = ("output_dir", "model_dir")

# summary keys reported per bundle kind, in column order: (report key, column title)
COLUMNS = (
    ("mean_dice", "mean Dice (%)"),
    ("dose_score", "dose score (Gy)"),
    ("dvh_score", "DVH score"),
    ("whole_volume_mae", "whole-volume MAE (Gy)"),
    ("balanced_accuracy", "balanced accuracy (%)"),
    ("accuracy", "accuracy (%)"),
)


def _arg(value: Any) -> str:
    """A value as the bundle CLI reads it (``monai.bundle`` parses the string as Python/YAML)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def run_variant(bundle: Path, name: str, overrides: dict[str, Any], out: Path, shared: dict[str, Any]) -> dict:
    """Train one variant (skipped when its report exists) and return its validation summary with timings."""
    run_dir = out / name
    report = run_dir / "validation" / "report.json"
    record = run_dir / "ablation_run.json"
    if report.is_file() and record.is_file():
        return json.loads(record.read_text())
    settings = {**shared, **overrides, "output_dir": str(run_dir), "model_dir": str(run_dir / "models")}
    command = [sys.executable, "-m", "monai.bundle", "run", "training"]
    command += ["--config_file", str(bundle / "configs" / "train.yaml")]
    for key, value in settings.items():
        command += [f"--{key}", _arg(value)]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log_path = run_dir / "ablation_log.txt"
    with open(log_path, "a") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise RuntimeError(f"variant {name!r}: the training exited with status {status}; its output is in {log_path}")
    if not report.is_file():
        raise RuntimeError(f"variant {name!r}: the training wrote no validation report ({report}); see {log_path}")
    summary = json.loads(report.read_text())
    summary = summary.get("summary", summary)
    result = {
        "name": name,
        "overrides": overrides,
        "seconds": round(time.time() - start, 1),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "summary": summary,
    }
    atomic_write_json(record, result)
    return result


def table(results: list[dict]) -> str:
    """A markdown table of the variants' validation summaries (columns present in any run)."""
    present = [(k, t) for k, t in COLUMNS if any(k in r["summary"] for r in results)]
    floors = [r["summary"].get("floor", {}) for r in results]
    lines = ["| variant | overrides | " + " | ".join(t for _, t in present) + " | wall (s) |"]
    lines.append("|---|---|" + "---:|" * len(present) + "---:|")
    for result in results:
        cells = []
        for key, _ in present:
            value = result["summary"].get(key)
            cells.append("" if value is None else f"{value:.2f}")
        overrides = ", ".join(f"{k}={v}" for k, v in result["overrides"].items()) or "(defaults)"
        lines.append(f"| {result['name']} | {overrides} | " + " | ".join(cells) + f" | {result['seconds']:.0f} |")
    floor = next((f for f in floors if f), None)
    if floor:
        metrics = floor.get("metrics", floor)
        cells = [f"{metrics[k]:.2f}" if isinstance(metrics.get(k), (int, float)) else "" for k, _ in present]
        lines.append("| floor (training split) | | " + " | ".join(cells) + " | |")
    return "\n".join(lines) + "\n"


def load_variants(path: Path) -> dict[str, dict[str, Any]]:
    """The variants file: a YAML mapping of variant names to override mappings (empty for the defaults).

    Args:
        path: the YAML file.

    Returns:
        ``{name: overrides}`` in file order.

    Raises:
        ValueError: naming the file, when it is not such a mapping or a variant sets a reserved key.

    Example:
        >>> load_variants(Path("benchmarks/openkbp_ablation.yaml"))  # doctest: +SKIP
        {'paper': {'learning_rate': 0.0001, ...}, 'default': {}}
    """
    variants = yaml.safe_load(path.read_text())
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{path}: expected a mapping of variant names to overrides, got {type(variants).__name__}")
    for name, overrides in variants.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise ValueError(f"{path}: variant {name!r} must map to overrides (key: value), got {overrides!r}")
        reserved = sorted(set(overrides or {}) & set(RESERVED_KEYS))
        if reserved:
            raise ValueError(f"{path}: variant {name!r} sets {reserved}, which the ablation sets per variant")
    return {str(name): dict(overrides or {}) for name, overrides in variants.items()}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--variants", type=Path, required=True, help="YAML: name -> overrides")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE applied to every variant (YAML value)")
    parser.add_argument("--only", nargs="*", help="run only these variants")
    args = parser.parse_args(argv)
    try:
        variants = load_variants(args.variants)
        shared = parse_overrides(args.set, reserved=RESERVED_KEYS)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    unknown = sorted(set(args.only or []) - set(variants))
    if unknown:
        parser.error(f"--only {unknown}: not in {args.variants} (variants: {sorted(variants)})")
    results = []
    for name, overrides in variants.items():
        if args.only and name not in args.only:
            continue
        results.append(run_variant(args.bundle, name, overrides, args.out, shared))
        atomic_write_text(args.out / "table.md", table(results))
        print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
