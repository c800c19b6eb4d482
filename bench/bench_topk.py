"""Benchmark topk_channel_masks: K clients x C channels per layer of CIFAR VGG-16.

Peers after a correctness check: the naive loop (per client and layer, a stable sort
with NaN handling) and the best plain variant (the batched sort-based reference).

    python bench/bench_topk.py --clients 10 100
    python bench/bench_topk.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cahfp_ops  # noqa: E402
from cahfp_ops import reference  # noqa: E402
from common import (  # noqa: E402
    VGG16_WIDTHS,  # noqa: E402
    bench_ms,
    check_close,
    device_name,
    half_and_half,
    keep_count,
    print_table,
)


def run(K: int, args) -> dict:
    dev = args.device
    gen = torch.Generator().manual_seed(K)
    ratios = half_and_half(K)
    scores = [torch.randn(K, C, generator=gen).to(dev) for C in VGG16_WIDTHS]
    keeps = [torch.tensor([keep_count(r, C) for r in ratios], device=dev) for C in VGG16_WIDTHS]
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
    t = {
        "ours": bench_ms(ours, dev, args.repeat),
        "plain": bench_ms(plain, dev, args.repeat),
        "naive": bench_ms(naive, dev, args.repeat),
    }
    nbytes = sum(s.numel() * (4 + 1) for s in scores)
    return {
        "K": K,
        **{f"{k}_ms": v for k, v in t.items()},
        "GBps": nbytes / t["ours"] / 1e6,
        "vs_naive": t["naive"] / t["ours"],
        "vs_plain": t["plain"] / t["ours"],
    }


COLUMNS = [
    ("K", "K", "d"),
    ("ours_ms", "cahfp ms", ".3f"),
    ("GBps", "GB/s", ".2f"),
    ("naive_ms", "naive ms", ".3f"),
    ("plain_ms", "batched sort ms", ".3f"),
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
        "topk_channel_masks, 13 VGG-16 layers, (K, C) float32 scores, keep 50 % / 25 %",
        [run(K, args) for K in args.clients],
        COLUMNS,
    )


if __name__ == "__main__":
    main()
