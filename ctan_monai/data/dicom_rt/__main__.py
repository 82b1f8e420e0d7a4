"""Command line: ``python -m ctan_monai.data.dicom_rt convert --input DIR --output DIR [--organs ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ctan_monai.data.dicom_rt.convert import convert_dicom_rt
from ctan_monai.data.dicom_rt.synonyms import PROSTATE_ORGANS, load_synonyms
from ctan_monai.data.validation import DatasetValidationError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).

    Returns:
        the exit status: 0 when the manifest was written, 1 when studies failed (see ``report.json``).

    Example:
        >>> import tempfile
        >>> from ctan_monai.apps.prostate.demo import write_prostate_demo
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> _ = write_prostate_demo(src, n_patients=1, shape=(32, 32, 12))
        >>> main(["convert", "--input", src, "--output", dst])  # doctest: +ELLIPSIS
        converted 1 case(s), 0 failed, 0 warning(s); manifest ...
        0
    """
    parser = argparse.ArgumentParser(prog="python -m ctan_monai.data.dicom_rt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert DICOM-RT studies to NIfTI + manifest.json + report.json")
    convert.add_argument("--input", required=True, help="folder tree of DICOM files (any layout)")
    convert.add_argument("--output", required=True, help="output folder")
    convert.add_argument("--organs", nargs="+", default=list(PROSTATE_ORGANS), help="organs, in label order")
    convert.add_argument("--synonyms", default=None, help="YAML file: organ -> list of extra ROI names")
    convert.add_argument("--require-dose", action="store_true", help="fail studies without RTDOSE")
    convert.add_argument("--skip-bad", action="store_true", help="convert the good studies, list the bad ones")
    convert.add_argument("--body-threshold-hu", type=float, default=-400.0, help="body mask threshold (HU)")
    args = parser.parse_args(argv)
    try:
        result = convert_dicom_rt(
            args.input,
            args.output,
            organs=args.organs,
            synonyms=load_synonyms(args.synonyms) if args.synonyms else None,
            require_dose=args.require_dose,
            skip_bad=args.skip_bad,
            body_threshold_hu=args.body_threshold_hu,
        )
    except DatasetValidationError as err:
        print(f"{err}\nreport: {args.output}/report.json", file=sys.stderr)
        return 1
    for problem in result.warnings:
        print(f"warning: {problem}", file=sys.stderr)
    for problem in result.report.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(
        f"converted {len(result.entries)} case(s), {len(result.report.bad_cases())} failed, "
        f"{len(result.warnings)} warning(s); manifest {result.manifest_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
