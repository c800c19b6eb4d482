"""Benchmark reconstruct_aggregate on CIFAR VGG-16 conv shapes (one op call per layer).

K clients, half pruned 50 % and half 75 % (random keep sets, channel-coupled across
layers). Correctness is checked first against both peers; then the median time of a
whole-model aggregation (13 layers) is printed for:

* cahfp (validation on, the default) and cahfp (validation off),
* the naive loop (per client: clone the global, assign the compact tensor, accumulate),
* the best plain-PyTorch variant (per client: widen the delta to full rows, index_add_),

with GB/s (bytes that must move: weight read + output write + client data read), the
fraction of the copy roofline (``dst.copy_(src)`` moving the same bytes between
preallocated buffers), and the speedups, all measured side by side in one run.

    python bench/bench_aggregate.py --threads 2 --clients 10 100
    python bench/bench_aggregate.py --device cuda --clients 10 100
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import workloads

from common import (
    bench_ms,
    bench_parser,
    copy_roofline_ms,
    device_name,
    paired_copy_fraction,
    print_table,
    start,
)


def run(K: int, args) -> dict:
    dev = torch.device(args.device)
    case = workloads.reconstruct_aggregate(K, dev)  # shapes and peers: workloads.py
    case.check()
    ours, ours_fast = case.ours(), case.ours(novalidate=True)
    naive, indexadd = case.impls["naive"], case.impls["index_add"]

    nbytes = case.nbytes
    t_copy = copy_roofline_ms(nbytes, device=dev)
    t = {
        "cahfp": bench_ms(ours, dev, args.repeat),
        "cahfp_novalidate": bench_ms(ours_fast, dev, args.repeat),
        "indexadd": bench_ms(indexadd, dev, args.repeat_peers),
        "naive": bench_ms(naive, dev, args.repeat_peers),
    }
    res = {"K": K, "MB": nbytes / 1e6, "copy_ms": t_copy}
    res.update({f"{k}_ms": v for k, v in t.items()})
    for key in ("cahfp", "cahfp_novalidate"):
        res[f"{key}_GBps"] = nbytes / t[key] / 1e6
        res[f"{key}_roofline"] = paired_copy_fraction(ours if key == "cahfp" else ours_fast, nbytes, dev, args.repeat)
        res[f"{key}_vs_naive"] = t["naive"] / t[key]
        res[f"{key}_vs_indexadd"] = t["indexadd"] / t[key]
    return res


COLUMNS = [
    ("K", "K", "d"),
    ("MB", "MB moved", ".1f"),
    ("copy_ms", "copy ms", ".3f"),
    ("cahfp_ms", "cahfp ms", ".3f"),
    ("cahfp_novalidate_ms", "(no valid.)", ".3f"),
    ("cahfp_GBps", "GB/s", ".1f"),
    ("cahfp_roofline", "of copy (paired)", ".1%"),
    ("naive_ms", "naive ms", ".2f"),
    ("indexadd_ms", "index_add ms", ".2f"),
    ("cahfp_vs_naive", "vs naive", ".1f"),
    ("cahfp_vs_indexadd", "vs index_add", ".1f"),
]


def main() -> None:
    p = bench_parser(__doc__, clients=[10, 100], repeat=7)
    p.add_argument("--repeat-peers", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    dev = start(args)
    rows = [run(K, args) for K in args.clients]
    print_table("reconstruct_aggregate, VGG-16 (CIFAR) conv layers, float32, clients pruned 50 % / 75 %", rows, COLUMNS)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"device": device_name(dev), "torch": torch.__version__, "results": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
