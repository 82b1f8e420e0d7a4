"""Parameters, FLOPs and training-step time of STL, HPS, MTAN and CTAN at the paper's setting.

Default: ResNet-50 encoder (stride-2 stem, output stride 32), 2D, batch 8 of 128x128 single-channel images, two
pixel-level tasks (5-class segmentation + dose), one training step = forward + backward + Adam step, with warm-up and
the median over repeats. Ratios are to HPS measured in the same run.

Usage:
    python benchmarks/model_stats.py [--backbone resnet50] [--size 128] [--batch 8] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ctan_monai.losses import MultiTaskLoss
from ctan_monai.networks import build_network

TASKS = [
    {"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 5},
    {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1},
]


def _batch(batch: int, size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(batch, 1, size, size, generator=gen),
        "seg": torch.randint(0, 5, (batch, 1, size, size), generator=gen),
        "dose": torch.rand(batch, 1, size, size, generator=gen) * 70,
    }


def measure(arch: str, backbone: str, size: int, batch: int, repeats: int, warmup: int) -> dict[str, float]:
    """Return parameters (M), forward GFLOPs per batch, and median step / inference times (s) for one arch."""
    torch.manual_seed(0)
    net = build_network(arch, TASKS, backbone=backbone, spatial_dims=2, in_channels=1)
    loss_fn = MultiTaskLoss(TASKS, weighting="dwa")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=1e-5)
    data = _batch(batch, size)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(data["image"])
    gflops = counter.get_total_flops() / 1e9
    net.train()
    step_times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(data["image"]), data)
        loss.backward()
        opt.step()
        if i >= warmup:
            step_times.append(time.perf_counter() - start)
    net.eval()
    infer_times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            net(data["image"])
            if i >= warmup:
                infer_times.append(time.perf_counter() - start)
    return {
        "params_m": params,
        "gflops": gflops,
        "step_s": statistics.median(step_times),
        "infer_s": statistics.median(infer_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave PyTorch's default)")
    parser.add_argument("--archs", nargs="+", default=["stl", "hps", "mtan", "ctan"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {a: measure(a, args.backbone, args.size, args.batch, args.repeats, args.warmup) for a in args.archs}
    base = results.get("hps")
    print(
        f"# {args.backbone}, 2D {args.size}x{args.size}, batch {args.batch}, tasks seg(5)+dose; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print("| arch | params (M) | GFLOPs fwd/batch | train step (s) | x HPS | inference (s) | x HPS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arch, r in results.items():
        step_ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        inf_ratio = f"{r['infer_s'] / base['infer_s']:.2f}" if base else "-"
        print(
            f"| {arch} | {r['params_m']:.1f} | {r['gflops']:.1f} | {r['step_s']:.3f} | {step_ratio} | "
            f"{r['infer_s']:.3f} | {inf_ratio} |"
        )


if __name__ == "__main__":
    main()
