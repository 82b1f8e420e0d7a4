"""``python -m ctan_monai.zoo export BUNDLE_DIR --out DIR [--model PATH] [--report PATH] [--zip]``.

Example:
    python -m ctan_monai.zoo export bundles/ctan_openkbp --model bundles/ctan_openkbp/models/model.pt \\
        --report bundles/ctan_openkbp/runs/ctan/evaluation/report.json --out dist/ctan_openkbp --zip
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        the exit status: 0 on success, 2 when the bundle cannot be exported (the reason is printed).
    """
    parser = argparse.ArgumentParser(prog="python -m ctan_monai.zoo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a self-contained model-zoo bundle")
    export.add_argument("bundle_dir", help="the source bundle, e.g. bundles/ctan_openkbp")
    export.add_argument("--out", required=True, help="the folder to write (its name is the bundle's name)")
    export.add_argument("--model", help="trained weights (state dict or training checkpoint); default models/model.pt")
    export.add_argument("--report", help="that model's evaluation report.json, for metadata eval_metrics")
    export.add_argument("--weights-url", help="where models/model.pt will be hosted (large_files.yml)")
    export.add_argument("--zip", action="store_true", help="also write <out>.zip")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)

    from ctan_monai.zoo.export import ZooExportError, export_bundle

    try:
        result = export_bundle(
            args.bundle_dir,
            args.out,
            model=args.model,
            report=args.report,
            weights_url=args.weights_url,
            write_zip=args.zip,
            overwrite=args.overwrite,
        )
    except (ZooExportError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {result.out_dir}: {len(result.modules)} modules ({result.lines} lines) in scripts/")
    print("requirements: " + ", ".join(f"{k}=={v}" for k, v in result.requirements.items()))
    if result.large_files:
        print(f"large_files.yml lists {result.large_files}: fill in the address where they are hosted")
    if result.zip_path:
        print(f"archive: {result.zip_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
