"""Keep a long comparison's finished runs as small records, restore them on a new machine, and tabulate them per run.

A comparison of the fixed recipe (``docs/comparison.md``) takes longer on a 2-core CPU than one working session,
and a session's machine can be replaced between sessions, taking the runs' folders with it. Only what the table,
the learning curves and the per-run rows need is kept: each finished run's ``run.json`` (the record
``python -m ctan_monai.compare`` writes: settings, commands, versions, metrics, timings), its
``metrics_history.json`` and the ``summary`` of its evaluation report (no checkpoints). Restored into a run folder at
the same path, a record makes ``compare`` skip that run, as it would on the machine that ran it; a run folder that
already holds a finished ``run.json`` is left alone.

Usage::

    python benchmarks/comparison_records.py save --runs_dir /work/runs/cmp_openkbp/runs \\
        --records docs/records/compare_openkbp_fixed
    python benchmarks/comparison_records.py restore --records docs/records/compare_openkbp_fixed \\
        --runs_dir /work/runs/cmp_openkbp/runs
    python benchmarks/comparison_records.py rows --records docs/records/compare_openkbp_fixed --kind openkbp
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctan_monai.apps.ham10000.validation import HAM10000_CLASSES
from ctan_monai.apps.openkbp.reader import DEFAULT_STRUCTURES
from ctan_monai.utils.atomic import atomic_write_json

RECORD_FILES = ("run.json", "metrics_history.json")
REPORT_SUMMARY = "report_summary.json"
ARCH_ORDER = ("stl", "hps", "mtan", "ctan")


def _finished_record(path: Path) -> dict[str, Any] | None:
    """The parsed ``run.json`` at ``path`` when it records a finished run, else None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("status") == "finished" else None


def save(runs_dir: Path, records: Path, report: str = "evaluation/report.json") -> list[str]:
    """Copy the small files of every finished run under ``runs_dir`` into ``records/<run>/``.

    Args:
        runs_dir: the comparison's ``runs`` folder (one sub-folder per run).
        records: where the records go (created).
        report: the evaluation report of a run, relative to its folder (its ``summary`` is kept).

    Returns:
        the names of the runs saved.

    Raises:
        FileNotFoundError: when ``runs_dir`` is not a folder.

    Example:
        >>> save(Path("/work/runs/cmp_openkbp/runs"), Path("docs/records/x"))  # doctest: +SKIP
        ['ctan_seed0', 'stl_seed1']
    """
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: no such folder of runs")
    saved = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if _finished_record(run_dir / "run.json") is None:
            continue
        target = records / run_dir.name
        for name in RECORD_FILES:
            if (run_dir / name).is_file():
                atomic_write_json(target / name, json.loads((run_dir / name).read_text()))
        if (run_dir / report).is_file():
            summary = json.loads((run_dir / report).read_text()).get("summary", {})
            atomic_write_json(target / REPORT_SUMMARY, {"source": str(run_dir / report), "summary": summary})
        saved.append(run_dir.name)
    return saved


def restore(records: Path, runs_dir: Path) -> list[str]:
    """Write each record's ``run.json`` and ``metrics_history.json`` back into ``runs_dir/<run>/``.

    Args:
        records: a folder written by :func:`save`.
        runs_dir: the comparison's ``runs`` folder on this machine (same path as where the runs were made, since
            the records' settings name their output folders).

    Returns:
        the names of the runs restored (runs already finished in ``runs_dir`` are skipped).

    Raises:
        FileNotFoundError: when ``records`` is not a folder.
        ValueError: when a record's ``output_dir`` is not the folder it would be restored into.

    Example:
        >>> restore(Path("docs/records/x"), Path("/work/runs/cmp_openkbp/runs"))  # doctest: +SKIP
        ['ctan_seed0']
    """
    if not records.is_dir():
        raise FileNotFoundError(f"{records}: no such folder of records")
    restored = []
    for record_dir in sorted(p for p in records.iterdir() if p.is_dir()):
        record = _finished_record(record_dir / "run.json")
        if record is None:
            continue
        target = runs_dir / record_dir.name
        expected = Path(record["overrides"]["output_dir"])
        if expected.resolve() != target.resolve():
            raise ValueError(
                f"{record_dir / 'run.json'}: the run was made in {expected}, not {target}; restore it into "
                f"{expected.parent} so that the comparison recognises its settings"
            )
        if _finished_record(target / "run.json") is not None:
            continue
        for name in RECORD_FILES:
            if (record_dir / name).is_file():
                atomic_write_json(target / name, json.loads((record_dir / name).read_text()))
        restored.append(record_dir.name)
    return restored


def _format(value: Any, digits: int) -> str:
    """A number with ``digits`` decimals, or n/a."""
    if not isinstance(value, (int, float)) or math.isnan(float(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _openkbp_row(record: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Dice, dose score, DVH score, whole-volume MAE, Dice per structure."""
    dice = summary.get("dice", {})
    organs = " / ".join(_format(dice.get(name), 1) for name in DEFAULT_STRUCTURES)
    return [
        _format(summary.get("mean_dice", record["metrics"].get("seg")), 2),
        _format(summary.get("dose_score", record["metrics"].get("dose")), 2),
        _format(summary.get("dvh_score"), 2),
        _format(summary.get("whole_volume_mae", record["extra_metrics"].get("whole_volume_mae")), 3),
        organs if dice else "n/a",
    ]


def _ham_row(record: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Dice, balanced accuracy, accuracy, recall per class."""
    seg, cls = summary.get("segmentation", {}), summary.get("classification", {})
    recall = cls.get("recall", {})
    return [
        _format(seg.get("mean_dice", record["metrics"].get("seg")), 2),
        _format(cls.get("balanced_accuracy", record["metrics"].get("dx")), 2),
        _format(cls.get("accuracy"), 2),
        " / ".join(_format(recall.get(name), 0) for name in HAM10000_CLASSES) if recall else "n/a",
    ]


KINDS = {
    "openkbp": (
        [
            "mean Dice (%)",
            "dose score (Gy)",
            "DVH score (Gy)",
            "whole-volume MAE (Gy)",
            "Dice " + " / ".join(DEFAULT_STRUCTURES),
        ],
        _openkbp_row,
    ),
    "ham10000": (
        ["Dice (%)", "balanced accuracy (%)", "accuracy (%)", "recall " + " / ".join(HAM10000_CLASSES) + " (%)"],
        _ham_row,
    ),
}


def rows(records: Path, kind: str) -> str:
    """A markdown table with one row per recorded run (architecture order, then seed) and its training time.

    Args:
        records: a folder written by :func:`save`.
        kind: ``openkbp`` or ``ham10000`` (which report fields make the columns).

    Returns:
        the table.

    Raises:
        KeyError: for an unknown ``kind``.

    Example:
        >>> print(rows(Path("docs/records/compare_openkbp_fixed"), "openkbp"))  # doctest: +SKIP
    """
    titles, make_row = KINDS[kind]
    entries = []
    for record_dir in sorted(p for p in records.iterdir() if p.is_dir()):
        record = _finished_record(record_dir / "run.json")
        if record is None:
            continue
        summary_path = record_dir / REPORT_SUMMARY
        summary = json.loads(summary_path.read_text())["summary"] if summary_path.is_file() else {}
        rank = ARCH_ORDER.index(record["arch"]) if record["arch"] in ARCH_ORDER else len(ARCH_ORDER)
        entries.append((rank, record["seed"], record, summary))
    lines = ["| run | " + " | ".join(titles) + " | train (s) |", "|---|" + "---:|" * len(titles) + "---:|"]
    for _, seed, record, summary in sorted(entries, key=lambda e: (e[0], e[1])):
        train_s = record.get("timings", {}).get("train_s")
        cells = make_row(record, summary)
        lines.append(f"| {record['arch'].upper()} seed {seed} | " + " | ".join(cells) + f" | {_format(train_s, 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``save``, ``restore`` or ``rows``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    save_parser = commands.add_parser("save", help="keep the finished runs' records")
    save_parser.add_argument("--runs_dir", type=Path, required=True)
    save_parser.add_argument("--records", type=Path, required=True)
    save_parser.add_argument("--report", default="evaluation/report.json")
    restore_parser = commands.add_parser("restore", help="write records back into a runs folder")
    restore_parser.add_argument("--records", type=Path, required=True)
    restore_parser.add_argument("--runs_dir", type=Path, required=True)
    rows_parser = commands.add_parser("rows", help="per-run markdown table of the records")
    rows_parser.add_argument("--records", type=Path, required=True)
    rows_parser.add_argument("--kind", choices=sorted(KINDS), required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "save":
            print("saved:", " ".join(save(args.runs_dir, args.records, args.report)) or "nothing finished")
        elif args.command == "restore":
            print("restored:", " ".join(restore(args.records, args.runs_dir)) or "nothing to restore")
        else:
            print(rows(args.records, args.kind), end="")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
