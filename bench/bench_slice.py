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
    case = workloads.slice_channels(K, dev)  # shapes and peers: workloads.py
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
        "slice_channels, VGG-16 (CIFAR) conv layers, float32, clients pruned 50 % / 75 %",
        rows,
        speed_columns({"naive": "naive", "plain": "index_select"}),
    )
    write_json(args.json, dev, rows)


if __name__ == "__main__":
    main()
