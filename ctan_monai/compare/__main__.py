"""Compare architectures on one bundle (the paper's Table 2), everything else equal.

Example (the OpenKBP demo, two seeds, two epochs each)::

    python -m ctan_monai.compare --bundle bundles/ctan_openkbp --archs stl hps mtan ctan --seeds 0 1 \\
        --output_dir comparisons/openkbp_demo --set epochs=2

Every (architecture, seed) run trains with the bundle's ``train.yaml`` and evaluates with its ``evaluate.yaml`` (the
same data, split, epochs, hyper-parameters; only ``arch`` and ``seed`` differ), in its own folder under
``<output_dir>/runs``. Rerunning the same command skips finished runs and resumes an interrupted one from its last
checkpoint. Outputs: ``table.md`` and ``table.csv`` (M and Delta vs STL per task, the bundle's extra metrics,
Delta_mean, rank; mean +- std over seeds; a floor row: the trivial predictors from the training split that every
report carries, with a marker and a warning where a method does not beat it), ``runs.json`` (every run's metrics,
timings, versions, settings), ``learning_curves.png``, ``metrics.png`` (both with the floor as a dashed line).
``--jobs N`` runs N at a time (equal shares of the CPU threads; ``--gpus 0 1 ...`` gives each its own GPU), after
preparing the bundle's data once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ctan_monai.compare.plots import plot_learning_curves, plot_metric_bars
from ctan_monai.compare.runner import (
    RunPlan,
    environment_record,
    execute_run,
    job_environments,
    load_finished_run,
    prepare_data,
    run_plans,
)
from ctan_monai.compare.spec import ComparisonSpec, load_comparison_spec
from ctan_monai.compare.table import (
    BELOW_FLOOR,
    below_floor_messages,
    format_markdown,
    summarise,
    summarise_floor,
    to_csv,
)
from ctan_monai.networks import ARCHITECTURES
from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text
from ctan_monai.utils.json_safe import json_safe

logger = logging.getLogger("ctan_monai.compare")


COMPARISON_KEYS = ("arch", "seed", "output_dir", "model_dir")


def parse_overrides(items: Sequence[str], reserved: Sequence[str] = COMPARISON_KEYS) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict, values read as YAML (``null`` is None, ``false`` is False, ``[a, b]`` a list).

    Args:
        items: the ``--set`` arguments.
        reserved: keys the caller sets itself, refused here (default: those the comparison sets per run).

    Returns:
        ``{key: value}``.

    Raises:
        ValueError: on an item without ``=`` or a ``reserved`` key.

    Example:
        >>> parse_overrides(["epochs=2", "train_slices_per_epoch=null", "backbone=resnet18"])
        {'epochs': 2, 'train_slices_per_epoch': None, 'backbone': 'resnet18'}
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        if key in reserved:
            raise ValueError(f"--set {key}=...: the command sets {key!r} itself, per run")
        overrides[key] = yaml.safe_load(value)
    return overrides


def plan_runs(
    spec: ComparisonSpec, archs: Sequence[str], seeds: Sequence[int], output_dir: Path, overrides: dict[str, Any]
) -> list[RunPlan]:
    """One plan per (arch, seed): the bundle's comparison overrides, then the user's, then arch/seed/folders."""
    plans = []
    for seed in seeds:
        for arch in archs:
            run_dir = (output_dir / "runs" / f"{arch}_seed{seed}").resolve()
            values = {
                **spec.overrides,
                **overrides,
                "arch": arch,
                "seed": int(seed),
                "output_dir": str(run_dir),
                "model_dir": str(run_dir / "models"),
                "progress_bar": False,
            }
            plans.append(RunPlan(arch=arch, seed=int(seed), run_dir=run_dir, overrides=values))
    return plans


def write_outputs(
    spec: ComparisonSpec, records: list[dict[str, Any]], plans: Sequence[RunPlan], output_dir: Path, settings: dict
) -> str:
    """Write the table (Markdown + CSV, with the floor row), the run records and the figures; log a WARNING for each
    method mean that does not beat the floor and for floors that differ between runs.

    Args:
        spec: the bundle's comparison settings.
        records: the finished runs' records.
        plans: every planned run (their folders hold the learning-curve histories).
        output_dir: the comparison's folder.
        settings: what the comparison was run with (archs, seeds, overrides), for the text and ``runs.json``.

    Returns:
        the Markdown written to ``table.md``.

    Example:
        >>> print(write_outputs(spec, records, plans, Path("comparisons/openkbp"), settings))  # doctest: +SKIP
    """
    floor = summarise_floor(records, spec)
    if floor is None and any(m.floor_path for m in spec.reported_metrics):
        logger.warning("no run's report has a floor: the table has no floor row")
    for message in (floor or {}).get("warnings", []):
        logger.warning("%s", message)
    rows = summarise(records, spec, floor=floor)
    for message in below_floor_messages(rows, spec, floor):
        logger.warning("%s", message)
    table = format_markdown(rows, spec, floor=floor)
    env = environment_record()
    lines = [
        f"# Comparison on `{spec.bundle.name}`",
        "",
        f"Runs: archs {settings['archs']}, seeds {settings['seeds']}; every run with the same settings "
        f"`{json.dumps(settings['overrides'])}` (bundle defaults otherwise). Evaluation: `{spec.evaluate_config}`.",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs, GPU {env['gpu']}; torch {env['torch']}, "
        f"monai {env['monai']}, ctan_monai {env['ctan_monai']} ({env['git_commit']}).",
        "",
        table,
        "M: mean ± std over seeds (no ± with one seed). Δ (paper Eq. 3) is computed per seed against the STL run of "
        "the same seed; positive means better than STL. `*`: the two means differ by more than two standard errors of "
        "their difference over seeds (a screening rule over seeds, not a significance test). Rank: by Δ mean.",
    ]
    if spec.extra_metrics:
        names = ", ".join(f"{m.task}: {m.label}" for m in spec.extra_metrics)
        lines += ["", f"Extra reported metrics ({names}): shown beside the task metrics, not part of Δ or the rank."]
    if floor is not None:
        lines += [
            "",
            f"{floor['label']}: the trivial predictors built from the training split only, scored by the same code on "
            "the same evaluation cases as the models (the report's `floor` block); the same for every run of one "
            "split (± only where the runs' splits differ: mean over seeds). No Δ or rank for the floor.",
            f"`{BELOW_FLOOR}`: the method's mean does not beat the floor on that metric (it is not strictly better in "
            "the metric's direction).",
        ]
    if spec.paper:
        lines += ["", "Paper (Table 2):", "", "| Method | " + " | ".join(m.task for m in spec.metrics) + " |"]
        lines.append("|---|" + "---:|" * len(spec.metrics))
        for arch, values in spec.paper.items():
            lines.append(
                f"| {arch.upper()} | "
                + " | ".join(f"{values.get(m.task, float('nan')):g}" for m in spec.metrics)
                + " |"
            )
        if spec.paper_note:
            lines += ["", spec.paper_note]
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(output_dir / "table.md", markdown)
    atomic_write_text(output_dir / "table.csv", to_csv(rows, spec, floor))
    summary = {"settings": settings, "runs": records, "summary": rows, "floor": floor}
    atomic_write_json(output_dir / "runs.json", json_safe(summary))
    run_dirs: dict[str, list[Path]] = {}
    for plan in plans:
        run_dirs.setdefault(plan.arch, []).append(plan.run_dir)
    plot_learning_curves(run_dirs, spec.curves, output_dir / "learning_curves.png")
    plot_metric_bars(rows, spec, output_dir / "metrics.png", floor)
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; returns the exit status (0: every run finished)."""
    parser = argparse.ArgumentParser(
        prog="python -m ctan_monai.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True, help="bundle folder (with configs/compare.yaml)")
    parser.add_argument("--archs", nargs="+", default=["stl", "hps", "mtan", "ctan"], choices=sorted(ARCHITECTURES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", default=None, help="default: comparisons/<bundle name>")
    parser.add_argument("--dataset_dir", default=None, help="the bundle's dataset_dir (default: its demo data)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config value for every run, e.g. --set epochs=10 --set backbone=resnet18 (YAML values)",
    )
    parser.add_argument("--timeout_min", type=float, default=None, help="limit per training or evaluation")
    parser.add_argument("--keep_going", action="store_true", help="after a failed run, go on with the others")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at the same time, each with an equal share of the CPU threads"
    )
    parser.add_argument(
        "--gpus", nargs="+", default=[], metavar="ID", help="spread the jobs over these GPUs (CUDA_VISIBLE_DEVICES)"
    )
    parser.add_argument(
        "--table_only", action="store_true", help="run nothing: write the table from the runs finished so far"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    try:
        spec = load_comparison_spec(args.bundle)
        overrides = parse_overrides(args.overrides)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    try:
        environments = job_environments(args.jobs, args.gpus)
    except ValueError as error:
        parser.error(str(error))
    if "stl" not in args.archs:
        parser.error("--archs must include stl: Delta (paper Eq. 3) is relative to it")
    if args.dataset_dir is not None:
        dataset_dir = Path(args.dataset_dir).resolve()
        if not dataset_dir.exists():
            parser.error(f"--dataset_dir {dataset_dir} does not exist")
        overrides["dataset_dir"] = str(dataset_dir)
    output_dir = Path(args.output_dir or Path("comparisons") / spec.bundle.name).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"bundle": str(spec.bundle), "archs": args.archs, "seeds": args.seeds, "overrides": overrides}
    plans = plan_runs(spec, args.archs, args.seeds, output_dir, overrides)

    finished: dict[str, dict[str, Any]] = {}
    to_run: list[RunPlan] = []
    for index, plan in enumerate(plans, start=1):
        try:
            record = load_finished_run(plan, spec)
        except ValueError as error:
            parser.error(str(error))
        if record is not None:
            logger.info("[%d/%d] %s: finished earlier, kept", index, len(plans), plan.name)
            finished[plan.name] = record
        elif args.table_only:
            logger.warning("[%d/%d] %s: not finished, left out of the table", index, len(plans), plan.name)
        else:
            to_run.append(plan)
    timeout = None if args.timeout_min is None else args.timeout_min * 60

    def execute(plan: RunPlan, env: dict[str, str]) -> dict[str, Any]:
        logger.info("%s: training and evaluating in %s %s", plan.name, plan.run_dir, env or "")
        return execute_run(plan, spec, timeout_s=timeout, env=env)

    start = time.perf_counter()
    if len(environments) > 1 and len(to_run) > 1:
        try:
            prepare_data(to_run[0], spec, timeout_s=timeout, env=environments[0])
        except RuntimeError as error:
            logger.error("data preparation failed: %s", error)
            return 1
    new_records, failures = run_plans(to_run, execute, environments, keep_going=args.keep_going)
    finished.update(new_records)
    records = [finished[plan.name] for plan in plans if plan.name in finished]
    if failures and not args.keep_going:
        return 1
    logger.info("all runs done in %.1f min", (time.perf_counter() - start) / 60)
    if not any(r["arch"] == "stl" for r in records):
        logger.error("no STL run finished: no table")
        return 1
    print(write_outputs(spec, records, plans, output_dir, settings))
    logger.info("wrote %s", output_dir / "table.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
