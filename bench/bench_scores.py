"""Benchmark curvature_scores on CIFAR VGG-16 conv weights: per-client scores from a global
weight and K per-client gradient and curvature proxies, per filter (dim 0).

Peers after a correctness check: the naive loop (per client, elementwise then sum) and
the best plain variant (one broadcast expression and one reduction). Bytes: every input
element read once.

    python bench/bench_scores.py --clients 1 10
    python bench/bench_scores.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cahfp_ops  # noqa: E402
from common import bench_ms, check_close, copy_roofline_ms, device_name, print_table, vgg16_conv_shapes  # noqa: E402


def run(K: int, args) -> dict:
    dev = args.device
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
    t_copy = copy_roofline_ms(nbytes, device=dev)
    t = {
        "ours": bench_ms(ours, dev, args.repeat),
        "plain": bench_ms(plain, dev, args.repeat),
        "naive": bench_ms(naive, dev, args.repeat),
    }
    return {
        "K": K,
        "MB": nbytes / 1e6,
        "copy_ms": t_copy,
        **{f"{k}_ms": v for k, v in t.items()},
        "GBps": nbytes / t["ours"] / 1e6,
        "roofline": t_copy / t["ours"],
        "vs_naive": t["naive"] / t["ours"],
        "vs_plain": t["plain"] / t["ours"],
    }


COLUMNS = [
    ("K", "K", "d"),
    ("MB", "MB read", ".1f"),
    ("copy_ms", "copy ms", ".3f"),
    ("ours_ms", "cahfp ms", ".3f"),
    ("GBps", "GB/s", ".1f"),
    ("roofline", "of copy", ".1%"),
    ("naive_ms", "naive ms", ".3f"),
    ("plain_ms", "broadcast ms", ".3f"),
    ("vs_naive", "vs naive", ".1f"),
    ("vs_plain", "vs plain", ".1f"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 10])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, {device_name(dev)}, backend {cahfp_ops.resolve_backend(dev)}")
    print_table(
        "curvature_scores, VGG-16 (CIFAR) conv weights, float32, per-client g and h",
        [run(K, args) for K in args.clients],
        COLUMNS,
    )


if __name__ == "__main__":
    main()
