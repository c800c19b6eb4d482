"""Benchmark slice_channels on CIFAR VGG-16 conv shapes: every client's compact tensor per layer.

Peers, measured side by side after a correctness check: the naive loop (per client,
``w[rows][:, cols].contiguous()``) and the best plain variant (per client,
``index_select`` on dim 0 then dim 1). Bytes: every compact element read and written.

    python bench/bench_slice.py --clients 10 100
    python bench/bench_slice.py --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cahfp_ops  # noqa: E402
from common import (  # noqa: E402
    bench_parser,
    check_close,
    half_and_half,
    measure,
    print_table,
    random_keep,
    speed_columns,
    start,
    vgg16_conv_shapes,
)


def run(K: int, dev: torch.device, args) -> dict:
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
    return measure(K, dev, 4 * 2 * elems, {"ours": ours, "naive": naive, "plain": plain}, args.repeat)


def main() -> None:
    args = bench_parser(__doc__, clients=[10, 100]).parse_args()
    dev = start(args)
    print_table(
        "slice_channels, VGG-16 (CIFAR) conv layers, float32, clients pruned 50 % / 75 %",
        [run(K, dev, args) for K in args.clients],
        speed_columns({"naive": "naive", "plain": "index_select"}),
    )


if __name__ == "__main__":
    main()
