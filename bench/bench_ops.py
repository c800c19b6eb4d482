"""Benchmark one per-tensor op on CIFAR VGG-16 shapes against its plain-PyTorch peers.

Each op runs its case from ``workloads.py`` (shapes, peers, bytes), checked for correctness
first, then timed side by side with its peers: the naive loop and the best plain variant.

* ``--op slice_channels``: every client's compact tensor per conv layer, clients pruned
  50 % / 75 %. Peers: per client ``w[rows][:, cols].contiguous()``; per client
  ``index_select`` on dim 0 then dim 1. Bytes: every compact element read and written.
* ``--op topk_channel_masks``: K clients x C channels per layer (13 layers), keep 50 % /
  25 %. Peers: per client and layer a stable sort with NaN handling; the batched sort.
* ``--op curvature_scores``: per-client scores from a global weight and K per-client
  gradient and curvature proxies, per filter. Peers: per client, elementwise then sum; one
  broadcast expression and one reduction. Bytes: every input element read once.

    python bench/bench_ops.py --op slice_channels --clients 10 100
    python bench/bench_ops.py --op topk_channel_masks --clients 10 100
    python bench/bench_ops.py --op curvature_scores --clients 1 10 --device cuda
"""

from __future__ import annotations

from pathlib import Path

import torch
import workloads

from common import bench_parser, measure, print_table, speed_columns, start, write_json

#: op -> (default clients, table title, the plain peer's label, the MB column's header)
OPS = {
    "slice_channels": ([10, 100], "slice_channels, VGG-16 (CIFAR) conv layers, float32, clients pruned 50 % / 75 %",
                       "index_select", "MB moved"),
    "topk_channel_masks": ([10, 100], "topk_channel_masks, 13 VGG-16 layers, (K, C) float32 scores, keep 50 % / 25 %",
                           "batched sort", "MB moved"),
    "curvature_scores": ([1, 10], "curvature_scores, VGG-16 (CIFAR) conv weights, float32, per-client g and h",
                         "broadcast", "MB read"),
}  # fmt: skip


def run(op: str, K: int, dev: torch.device, repeat: int) -> dict:
    case = getattr(workloads, op)(K, dev)  # shapes and peers: workloads.py
    case.check()
    fns = {"ours": case.ours(), "naive": case.impls["naive"], "plain": case.impls["plain"]}
    return measure(K, dev, case.nbytes, fns, repeat)


def main() -> None:
    p = bench_parser(__doc__, clients=None)
    p.add_argument("--op", required=True, choices=sorted(OPS), help="the op to benchmark")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    clients, title, plain, mb = OPS[args.op]
    dev = start(args)
    rows = [run(args.op, K, dev, args.repeat) for K in (args.clients or clients)]
    print_table(title, rows, speed_columns({"naive": "naive", "plain": plain}, mb_header=mb))
    write_json(args.json, dev, rows)


if __name__ == "__main__":
    main()
