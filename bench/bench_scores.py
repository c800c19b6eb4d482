"""Benchmark curvature_scores on CIFAR VGG-16 conv weights: per-client scores from a global
weight and K per-client gradient and curvature proxies, per filter (dim 0).

Peers after a correctness check: the naive loop (per client, elementwise then sum) and
the best plain variant (one broadcast expression and one reduction). Bytes: every input
element read once.

    python bench/bench_scores.py --clients 1 10
    python bench/bench_scores.py --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cahfp_ops  # noqa: E402
from common import bench_parser, check_close, measure, print_table, speed_columns, start, vgg16_conv_shapes  # noqa: E402


def run(K: int, dev: torch.device, args) -> dict:
    gen = torch.Generator().manual_seed(K)
    shapes = vgg16_conv_shapes()
    ws = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    gs = [torch.randn((K, *s), generator=gen).to(dev) for s in shapes]
    hs = [torch.randn((K, *s), generator=gen).to(dev) for s in shapes]

    def ours():
        return [cahfp_ops.curvature_scores(w, g, h) for w, g, h in zip(ws, gs, hs)]

    def plain():
        return [((g * w).abs() + 0.5 * h.clamp(min=0) * w * w).sum(dim=(2, 3, 4)) for w, g, h in zip(ws, gs, hs)]

    def naive():
        return [
            torch.stack([((g[k] * w).abs() + 0.5 * h[k].clamp(min=0) * w * w).sum(dim=(1, 2, 3)) for k in range(K)])
            for w, g, h in zip(ws, gs, hs)
        ]

    got = ours()
    check_close(got, plain(), rtol=1e-4, atol=1e-3)
    check_close(got, naive(), rtol=1e-4, atol=1e-3)
    nbytes = 4 * sum(w.numel() + g.numel() + h.numel() for w, g, h in zip(ws, gs, hs))
    return measure(K, dev, nbytes, {"ours": ours, "naive": naive, "plain": plain}, args.repeat)


def main() -> None:
    args = bench_parser(__doc__, clients=[1, 10]).parse_args()
    dev = start(args)
    print_table(
        "curvature_scores, VGG-16 (CIFAR) conv weights, float32, per-client g and h",
        [run(K, dev, args) for K in args.clients],
        speed_columns({"naive": "naive", "plain": "broadcast"}, mb_header="MB read"),
    )


if __name__ == "__main__":
    main()
