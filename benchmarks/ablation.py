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
    with open(run_dir / "ablation_log.txt", "a") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    summary = json.loads(report.read_text())
    summary = summary.get("summary", summary)
    result = {
        "name": name,
        "overrides": overrides,
        "seconds": round(time.time() - start, 1),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "summary": summary,
    }
    record.write_text(json.dumps(result, indent=2))
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


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--variants", type=Path, required=True, help="YAML: name -> overrides")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE applied to every variant (YAML value)")
    parser.add_argument("--only", nargs="*", help="run only these variants")
    args = parser.parse_args(argv)
    variants = yaml.safe_load(args.variants.read_text()) or {}
    shared = {}
    for item in args.set:
        key, _, value = item.partition("=")
        shared[key] = yaml.safe_load(value)
    results = []
    for name, overrides in variants.items():
        if args.only and name not in args.only:
            continue
        results.append(run_variant(args.bundle, name, overrides or {}, args.out, shared))
        (args.out / "table.md").write_text(table(results))
        print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
