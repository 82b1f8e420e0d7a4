"""Parameters, FLOPs, training-step and inference time of STL, HPS, MTAN and CTAN at the paper's setting.

A thin front end of ``benchmarks/throughput.py`` (which also measures peak memory, whole-patient inference, the data
pipelines, the other bundles' settings and the GPU mode): the model part only, on the OpenKBP/paper setting
(ResNet-50 with the stride-2 stem, 2D 128x128, batch 8, 5-class segmentation + dose), architectures interleaved
round-robin, median over repeats, ratios to HPS from the same run. Prints the Markdown table.

Usage:
    python benchmarks/model_stats.py [--backbone resnet50] [--size 128] [--batch 8] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import throughput  # benchmarks/ is on sys.path when this file runs as a script


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the models and print the table.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        the exit status (2 for invalid arguments).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave PyTorch's default)")
    parser.add_argument("--archs", nargs="+", default=list(throughput.ARCHS))
    args = parser.parse_args(argv)
    options = throughput.BenchmarkOptions(
        warmup=args.warmup,
        repeats=args.repeats,
        volume_repeats=0,
        cpu_memory="off",
        pipelines=False,
        threads=args.threads,
    )
    try:
        settings = throughput.resolve_settings(["openkbp"], args.backbone, args.size, args.batch)
        options.check()
        throughput.check_archs(args.archs)
    except ValueError as err:
        print(f"model_stats.py: error: {err}", file=sys.stderr)
        return 2
    report = throughput.run(settings, args.archs, options, output=None)
    print(throughput.markdown_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
