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
import workloads  # noqa: E402

from common import (  # noqa: E402
    bench_parser,
    measure,
    print_table,
    speed_columns,
    start,
    write_json,
)


def run(K: int, dev: torch.device, args) -> dict:
    case = workloads.topk_channel_masks(K, dev)  # shapes and peers: workloads.py
    case.check()
    fns = {"ours": case.ours(), "naive": case.impls["naive"], "plain": case.impls["plain"]}
    return measure(K, dev, case.nbytes, fns, args.repeat)


def main() -> None:
    p = bench_parser(__doc__, clients=[10, 100])
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    dev = start(args)
    rows = [run(K, dev, args) for K in args.clients]
    print_table(
        "topk_channel_masks, 13 VGG-16 layers, (K, C) float32 scores, keep 50 % / 25 %",
        rows,
        speed_columns({"naive": "naive", "plain": "batched sort"}),
    )
    write_json(args.json, dev, rows)


if __name__ == "__main__":
    main()
