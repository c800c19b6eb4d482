"""Benchmark slice_channels on CIFAR VGG-16 conv shapes: every client's compact tensor per layer.

Peers, measured side by side after a correctness check: the naive loop (per client,
``w[rows][:, cols].contiguous()``) and the best plain variant (per client,
``index_select`` on dim 0 then dim 1). Bytes: every compact element read and written.

    python bench/bench_slice.py --clients 10 100
    python bench/bench_slice.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cahfp_ops  # noqa: E402
from common import (  # noqa: E402  # noqa: E402
    bench_ms,
    check_close,
    copy_roofline_ms,
    device_name,
    half_and_half,
    print_table,
    random_keep,
    vgg16_conv_shapes,
)


def run(K: int, args) -> dict:
    dev = args.device
    gen = torch.Generator().manual_seed(K)
    shapes = vgg16_conv_shapes()
    weights = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    ratios = half_and_half(K)
    rows = [[random_keep(s[0], ratios[k], gen).to(dev) for k in range(K)] for s in shapes]
    cols = [[None] * K] + rows[:-1]

    def ours():
        return [cahfp_ops.slice_channels(w, r, c) for w, r, c in zip(weights, rows, cols)]

    def naive():
        return [
            [w[r][:, c].contiguous() if c is not None else w[r].contiguous() for r, c in zip(rs, cs)]
            for w, rs, cs in zip(weights, rows, cols)
        ]

    def plain():
        return [
            [w.index_select(0, r) if c is None else w.index_select(0, r).index_select(1, c) for r, c in zip(rs, cs)]
            for w, rs, cs in zip(weights, rows, cols)
        ]

    got = ours()
    check_close(got, plain(), 0, 0)
    check_close(got, naive(), 0, 0)
    elems = sum(p.numel() for layer in got for p in layer)
    del got
    nbytes = 4 * 2 * elems
    t_copy = copy_roofline_ms(nbytes, device=dev)
    t = {
        "ours": bench_ms(ours, dev, args.repeat),
        "naive": bench_ms(naive, dev, args.repeat),
        "plain": bench_ms(plain, dev, args.repeat),
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
    ("MB", "MB moved", ".1f"),
    ("copy_ms", "copy ms", ".3f"),
    ("ours_ms", "cahfp ms", ".3f"),
    ("GBps", "GB/s", ".1f"),
    ("roofline", "of copy", ".1%"),
    ("naive_ms", "naive ms", ".3f"),
    ("plain_ms", "index_select ms", ".3f"),
    ("vs_naive", "vs naive", ".1f"),
    ("vs_plain", "vs plain", ".1f"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, {device_name(dev)}, backend {cahfp_ops.resolve_backend(dev)}")
    print_table(
        "slice_channels, VGG-16 (CIFAR) conv layers, float32, clients pruned 50 % / 75 %",
        [run(K, args) for K in args.clients],
        COLUMNS,
    )


if __name__ == "__main__":
    main()
