"""Benchmark topk_channel_masks: K clients x C channels per layer of CIFAR VGG-16.

Peers after a correctness check: the naive loop (per client and layer, a stable sort
with NaN handling) and the best plain variant (the batched sort-based reference).

    python bench/bench_topk.py --clients 10 100
    python bench/bench_topk.py --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cahfp_ops  # noqa: E402
from cahfp_ops import reference  # noqa: E402
from common import (  # noqa: E402
    VGG16_WIDTHS,
    bench_parser,
    check_close,
    half_and_half,
    kept_count,
    measure,
    print_table,
    speed_columns,
    start,
)


def run(K: int, dev: torch.device, args) -> dict:
    gen = torch.Generator().manual_seed(K)
    ratios = half_and_half(K)
    scores = [torch.randn(K, C, generator=gen).to(dev) for C in VGG16_WIDTHS]
    keeps = [torch.tensor([kept_count(r, C) for r in ratios], device=dev) for C in VGG16_WIDTHS]
    maxk = [int(k.max()) for k in keeps]

    def ours():
        return [cahfp_ops.topk_channel_masks(s, k) for s, k in zip(scores, keeps)]

    def plain():
        return [reference.topk_channel_masks(s, k, m) for s, k, m in zip(scores, keeps, maxk)]

    def naive():
        out = []
        for s, k in zip(scores, keeps):
            rows = []
            for i in range(K):
                order = torch.sort(s[i], descending=True, stable=True).indices[: int(k[i])]
                rows.append(order.sort().values)
            out.append(rows)
        return out

    got = ours()
    check_close([g[0] for g in got], [p[0] for p in plain()], 0, 0)
    for (_, idx), rows in zip(got, naive()):
        for i, r in enumerate(rows):
            assert torch.equal(idx[i, : r.numel()], r)
    nbytes = sum(s.numel() * (s.element_size() + 1) for s in scores)  # scores read, mask written
    return measure(K, dev, nbytes, {"ours": ours, "naive": naive, "plain": plain}, args.repeat)


def main() -> None:
    args = bench_parser(__doc__, clients=[10, 100]).parse_args()
    dev = start(args)
    print_table(
        "topk_channel_masks, 13 VGG-16 layers, (K, C) float32 scores, keep 50 % / 25 %",
        [run(K, dev, args) for K in args.clients],
        speed_columns({"naive": "naive", "plain": "batched sort"}),
    )


if __name__ == "__main__":
    main()
