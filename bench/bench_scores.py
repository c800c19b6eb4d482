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
import workloads  # noqa: E402

from common import bench_parser, measure, print_table, speed_columns, start, write_json  # noqa: E402


def run(K: int, dev: torch.device, args) -> dict:
    case = workloads.curvature_scores(K, dev)  # shapes and peers: workloads.py
    case.check()
    fns = {"ours": case.ours(), "naive": case.impls["naive"], "plain": case.impls["plain"]}
    return measure(K, dev, case.nbytes, fns, args.repeat)


def main() -> None:
    p = bench_parser(__doc__, clients=[1, 10])
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    dev = start(args)
    rows = [run(K, dev, args) for K in args.clients]
    print_table(
        "curvature_scores, VGG-16 (CIFAR) conv weights, float32, per-client g and h",
        rows,
        speed_columns({"naive": "naive", "plain": "broadcast"}, mb_header="MB read"),
    )
    write_json(args.json, dev, rows)


if __name__ == "__main__":
    main()
