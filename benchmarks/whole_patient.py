"""Whole-patient inference time of a CT bundle, and the agreement of its fast settings with the float32 path.

Each variant is the bundle's own ``configs/inference.yaml`` (its loader, preprocessing, ``SliceInferer``,
postprocessing and writers, with the checkpoint loaded) under a few overrides, built once in this process; the
variants then predict the same patients in turns (round-robin, one warm-up each), so that load from other processes
falls on all of them alike. The time of a patient is that of the evaluator's run over it: reading the CT, every
slice through the network, writing ``seg.nii.gz`` and ``dose.nii.gz``: what a user waits for with the model loaded
(a MONAI Label server, a batch job); Python's and MONAI's start-up are not in it.

Variants (``--variants``):

- ``float32``: float32, contiguous memory format: the reference.
- ``channels_last``: float32 with channels-last weights (the bundle's default since it is faster and equal).
- ``bf16``: channels-last and bfloat16 autocast (fast on CPUs with native bf16 and on GPUs; emulated on AVX2).

Agreement with the reference, per patient: Dice between the two label maps for every structure present in either,
and the mean and largest absolute difference of the dose over the voxels where either is positive (the written dose
is 0 outside the possible-dose mask). Targets: Dice >= 0.99 for every structure and patient, mean dose difference
<= 0.5 Gy.

Usage:
    python benchmarks/whole_patient.py --input_dir /data/open-kbp/provided-data/validation-pats --patients 3 \\
        --ckpt_path bundles/ctan_openkbp/models/model.pt --output runs/whole_patient.json \\
        --markdown runs/whole_patient.md
    python benchmarks/whole_patient.py --ckpt_path none --patients 1 --repeats 1   # untrained weights (a smoke run)

Output: a Markdown report on stdout (``--markdown`` also writes it) and a JSON file, both written atomically.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from ctan_monai.compare.__main__ import parse_overrides
from ctan_monai.utils.atomic import atomic_write_json, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput_lib, when run as a script

from throughput_lib.report import machine_info  # noqa: E402
from throughput_lib.settings import BenchmarkOptions  # noqa: E402
from throughput_lib.timing import _log, _summary, paired_ratio, round_robin_orders  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {"channels_last": False, "amp": "none"},
    "channels_last": {"channels_last": True, "amp": "none"},
    "bf16": {"channels_last": True, "amp": "bf16"},
}
DICE_TARGET = 0.99
DOSE_TARGET_GY = 0.5
SCHEMA = "ctan_monai.whole_patient/1"


class BundleInference:
    """The bundle's inference workflow built from its config with overrides, ready to predict patients.

    Args:
        bundle: the bundle folder.
        overrides: config keys to set (``input_dir``, ``output_dir``, ``channels_last``, ``amp``, ...).
        ckpt_path: the trained weights, or None to keep the untrained network (seeded).

    Raises:
        FileNotFoundError: when the bundle has no ``configs/inference.yaml`` or the checkpoint does not exist.

    Example:
        >>> run = BundleInference("bundles/ctan_openkbp", {"input_dir": "pats", "output_dir": "out"}, None)
        >>> seconds = run.predict()  # doctest: +SKIP
    """

    def __init__(self, bundle: str | os.PathLike[str], overrides: Mapping[str, Any], ckpt_path: str | None) -> None:
        from monai.bundle import ConfigParser

        config = Path(bundle) / "configs" / "inference.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{config} not found: --bundle must be a bundle folder with configs/inference.yaml")
        self.parser = ConfigParser()
        self.parser.read_config(str(config))
        self.parser.update(dict(overrides))
        self.parser.get_parsed_content("imports")
        torch.manual_seed(0)
        self.network = self.parser.get_parsed_content("network")
        if ckpt_path is not None:
            from ctan_monai.apps.bundle import load_weights

            load_weights(self.network, ckpt_path, self.parser.get_parsed_content("device"))
        self.network.eval()
        self.evaluator = self.parser.get_parsed_content("evaluator")
        self.output_dir = Path(self.parser.get_parsed_content("output_dir"))

    def predict(self) -> float:
        """Predict every patient of ``input_dir`` (the evaluator's run).

        Returns:
            the seconds it took.
        """
        start = time.perf_counter()
        self.evaluator.run()
        return time.perf_counter() - start


def agreement(reference_dir: Path, other_dir: Path, case_ids: Sequence[str]) -> dict[str, Any]:
    """Dice per structure and dose differences between two variants' written predictions.

    Args:
        reference_dir: the reference variant's output folder (``<case_id>/seg.nii.gz``, ``dose.nii.gz``).
        other_dir: the other variant's output folder.
        case_ids: the patients.

    Returns:
        ``{"structures_compared" (Dice values computed; 0 means the Dice check was vacuous), "min_dice",
        "dose_mean_abs_gy" (the largest mean over patients), "dose_max_abs_gy", "patients": {case: {"dice": {label:
        value}, "dose_mean_abs_gy", "dose_max_abs_gy"}}}``.

    Raises:
        FileNotFoundError: naming a prediction that was not written.
    """
    patients: dict[str, Any] = {}
    for case in case_ids:
        files = {}
        for name in ("seg", "dose"):
            paths = [folder / case / f"{name}.nii.gz" for folder in (reference_dir, other_dir)]
            missing = [str(path) for path in paths if not path.is_file()]
            if missing:
                raise FileNotFoundError(f"{missing} not written")
            files[name] = [np.asarray(nib.load(str(path)).dataobj) for path in paths]
        seg_a, seg_b = files["seg"]
        dice = {}
        for label in sorted((set(np.unique(seg_a)) | set(np.unique(seg_b))) - {0}):  # structures, not background
            a, b = seg_a == label, seg_b == label
            dice[int(label)] = float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
        dose_a, dose_b = (d.astype(np.float64) for d in files["dose"])
        inside = (dose_a > 0) | (dose_b > 0)
        diff = np.abs(dose_a - dose_b)[inside] if inside.any() else np.zeros(1)
        patients[case] = {"dice": dice, "dose_mean_abs_gy": float(diff.mean()), "dose_max_abs_gy": float(diff.max())}
    return {
        "structures_compared": sum(len(p["dice"]) for p in patients.values()),  # 0: the Dice check was vacuous
        "min_dice": min((v for p in patients.values() for v in p["dice"].values()), default=1.0),
        "dose_mean_abs_gy": max(p["dose_mean_abs_gy"] for p in patients.values()),
        "dose_max_abs_gy": max(p["dose_max_abs_gy"] for p in patients.values()),
        "patients": patients,
    }


def _patient_folders(input_dir: Path, patients: int) -> list[Path]:
    from ctan_monai.apps.openkbp.inference import find_inference_cases

    cases = find_inference_cases(input_dir)
    return [Path(c["image"]) for c in cases[:patients]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the variants, time them round-robin and compare their predictions with the first variant's.

    Args:
        args: the parsed command line.

    Returns:
        the report.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    folders = _patient_folders(Path(args.input_dir), args.patients)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="whole_patient_"))
    inputs = work / "patients"
    inputs.mkdir(parents=True, exist_ok=True)
    for folder in folders:  # only the chosen patients, seen by every variant alike
        link = inputs / folder.name
        if not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
    case_ids = [f.name for f in folders]
    ckpt = None if args.ckpt_path.lower() == "none" else args.ckpt_path
    runs: dict[str, BundleInference] = {}
    for variant in args.variants:
        _log(f"building {variant}")
        overrides = {**args.set, **VARIANTS[variant], "input_dir": str(inputs), "output_dir": str(work / variant)}
        runs[variant] = BundleInference(args.bundle, overrides, ckpt)
    for order in round_robin_orders(list(runs), 1):  # warm-up: first-call allocations, oneDNN primitive caches
        for variant in order:
            runs[variant].predict()
    times: dict[str, list[float]] = {v: [] for v in runs}
    for repeat, order in enumerate(round_robin_orders(list(runs), args.repeats)):
        for variant in order:
            times[variant].append(runs[variant].predict() / len(case_ids))
        _log(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in order))
    reference = args.variants[0]
    results: dict[str, Any] = {}
    for variant in runs:
        found = {**VARIANTS[variant], "seconds_per_patient": _summary(times[variant])}
        found["x_reference"] = paired_ratio(times[variant], times[reference])
        if variant != reference:
            found["agreement"] = agreement(work / reference, work / variant, case_ids)
            found["meets_tolerance"] = (
                found["agreement"]["min_dice"] >= DICE_TARGET
                and found["agreement"]["dose_mean_abs_gy"] <= DOSE_TARGET_GY
            )
        results[variant] = found
    options = BenchmarkOptions()
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(options), "load_average_at_end": list(os.getloadavg())},
        "bundle": str(args.bundle),
        "ckpt_path": ckpt,
        "overrides": args.set,
        "patients": case_ids,
        "repeats": args.repeats,
        "reference": reference,
        "targets": {"min_dice": DICE_TARGET, "dose_mean_abs_gy": DOSE_TARGET_GY, "seconds_per_patient": 10.0},
        "variants": results,
    }


def markdown_report(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the machine, then one row per variant.

    Args:
        report: the report built by ``run``.

    Returns:
        Markdown text.
    """
    m = report["machine"]
    start, end = m["load_average_at_start"], m["load_average_at_end"]
    lines = [
        f"Machine: CPU {m['cpu_model']}, {m['cpu_affinity']} core(s), {m['torch_threads']} torch thread(s); torch "
        f"{m['torch']}, MONAI {m['monai']}; 1-min load average {start[0]:.2f} at start, {end[0]:.2f} at end.",
        f"Bundle {report['bundle']}, weights {report['ckpt_path'] or 'untrained (seeded)'}, overrides "
        f"{report['overrides'] or 'none'}; patients {', '.join(report['patients'])}; median of {report['repeats']} "
        "round-robin repeats after one warm-up.",
        "",
        "| variant | channels-last | amp | s / patient, median [min, max] | x float32 | min Dice vs float32 | "
        "dose mean abs diff (Gy) | dose max abs diff (Gy) | within tolerance |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in report["variants"].items():
        t = r["seconds_per_patient"]
        a = r.get("agreement")
        agree = (
            f"{a['min_dice']:.4f} | {a['dose_mean_abs_gy']:.2g} | {a['dose_max_abs_gy']:.2g} | "
            f"{'yes' if r['meets_tolerance'] else '**no**'}"
            if a
            else "(reference) | - | - | -"
        )
        lines.append(
            f"| {name} | {'yes' if r['channels_last'] else 'no'} | {r['amp']} | {t['median']:.2f} [{t['min']:.2f}, "
            f"{max(t['times']):.2f}] | {r['x_reference']:.2f} | {agree} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        the namespace, ``set`` as a dict.

    Raises:
        ValueError: for an unknown variant, a missing input folder or checkpoint, or a bad ``--set``.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(REPO_ROOT / "bundles" / "ctan_openkbp"))
    p.add_argument(
        "--input_dir",
        default=str(
            REPO_ROOT / "bundles" / "ctan_openkbp" / "demo_data" / "openkbp" / "provided-data" / "validation-pats"
        ),
        help="OpenKBP patients (default: the bundle's demo validation patients)",
    )
    p.add_argument("--patients", type=int, default=1, help="how many of them")
    p.add_argument("--ckpt_path", required=True, help="trained weights, or 'none' for the untrained network")
    p.add_argument("--variants", nargs="+", default=["float32", "channels_last"], help=f"{list(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value)")
    p.add_argument("--work_dir", help="where the predictions go (default: a new temporary folder)")
    p.add_argument("--output", default="whole_patient.json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or len(set(args.variants)) != len(args.variants):
        raise ValueError(f"unknown or repeated variant(s) in {args.variants}; choose from {list(VARIANTS)}")
    if not Path(args.input_dir).exists():
        raise ValueError(f"--input_dir {args.input_dir} does not exist")
    if args.ckpt_path.lower() != "none" and not Path(args.ckpt_path).is_file():
        raise ValueError(f"--ckpt_path {args.ckpt_path} is not a file (or pass 'none')")
    if args.patients < 1 or args.repeats < 1:
        raise ValueError("--patients and --repeats must be >= 1")
    args.set = parse_overrides(args.set, reserved=())  # any config key; the variants' own keys win
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        0; 1 when a variant is outside the tolerance; 2 for invalid arguments.
    """
    try:
        args = parse_args(argv)
    except ValueError as err:
        print(f"whole_patient.py: error: {err}", file=sys.stderr)
        return 2
    report = run(args)
    atomic_write_json(args.output, report)
    text = markdown_report(report)
    print(text)
    if args.markdown:
        atomic_write_text(args.markdown, text)
    outside = [v for v, r in report["variants"].items() if r.get("meets_tolerance") is False]
    if outside:
        _log(f"outside the tolerance: {', '.join(outside)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
