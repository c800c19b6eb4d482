"""Whole-model (state_dict) slicing and aggregation: reconstruct_aggregate_many and
slice_channels_many on CIFAR VGG-16 (with BatchNorm) and ResNet-56.

K clients, half pruned 50 % and half 75 %. Correctness is checked first against the
per-tensor plain-PyTorch peers; then median times for: cahfp whole-model aggregation
(validation on / off), the naive loop and the index_add variant over every tensor, and
whole-model slicing against per-client, per-tensor indexing. GB/s counts the bytes
that must move; "of copy" is the copy roofline fraction.

    python bench/bench_model.py --model vgg16 resnet56 --clients 10 100
    python bench/bench_model.py --device cuda
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import workloads

from common import (
    bench_ms,
    bench_parser,
    device_name,
    paired_copy_fraction,
    print_table,
    start,
)


def run(name: str, K: int, args) -> dict:
    dev = torch.device(args.device)
    agg = workloads.model_aggregate(name, K, dev)  # shapes and peers: workloads.py
    sl = workloads.model_slice(name, K, dev)
    agg.check()
    sl.check()
    ours, ours_fast = agg.ours(), agg.ours(novalidate=True)
    naive, indexadd = agg.impls["naive"], agg.impls["index_add"]
    slice_ours, slice_plain = sl.ours(), sl.impls["plain"]
    result = agg.ours()()
    tensors, params = len(result), sum(t.numel() for t in result.values())
    del result

    agg_bytes, slice_bytes = agg.nbytes, sl.nbytes
    t = {
        "agg": bench_ms(ours, dev, args.repeat),
        "agg_novalidate": bench_ms(ours_fast, dev, args.repeat),
        "naive": bench_ms(naive, dev, args.repeat_peers),
        "indexadd": bench_ms(indexadd, dev, args.repeat_peers),
        "slice": bench_ms(slice_ours, dev, args.repeat),
        "slice_plain": bench_ms(slice_plain, dev, args.repeat_peers),
    }
    return {
        "model": name,
        "K": K,
        "tensors": tensors,
        "params_M": params / 1e6,
        **{f"{k}_ms": v for k, v in t.items()},
        "agg_GBps": agg_bytes / t["agg_novalidate"] / 1e6,
        "agg_roofline": paired_copy_fraction(ours_fast, agg_bytes, dev, args.repeat),
        "agg_vs_naive": t["naive"] / t["agg"],
        "agg_vs_indexadd": t["indexadd"] / t["agg"],
        "slice_GBps": slice_bytes / t["slice"] / 1e6,
        "slice_roofline": paired_copy_fraction(slice_ours, slice_bytes, dev, args.repeat),
        "slice_vs_plain": t["slice_plain"] / t["slice"],
    }


COLUMNS = [
    ("model", "model", "s"),
    ("K", "K", "d"),
    ("tensors", "tensors", "d"),
    ("agg_ms", "agg ms", ".3f"),
    ("agg_novalidate_ms", "(no valid.)", ".3f"),
    ("agg_GBps", "GB/s", ".1f"),
    ("agg_roofline", "of copy (paired)", ".1%"),
    ("naive_ms", "naive ms", ".2f"),
    ("indexadd_ms", "index_add ms", ".2f"),
    ("agg_vs_naive", "vs naive", ".1f"),
    ("agg_vs_indexadd", "vs index_add", ".1f"),
    ("slice_ms", "slice ms", ".3f"),
    ("slice_roofline", "slice of copy", ".1%"),
    ("slice_plain_ms", "plain slice ms", ".2f"),
    ("slice_vs_plain", "vs plain", ".1f"),
]


def main() -> None:
    p = bench_parser(__doc__, clients=[10, 100], repeat=7)
    p.add_argument("--model", nargs="+", default=["vgg16", "resnet56"])
    p.add_argument("--repeat-peers", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    dev = start(args)
    rows = [run(m, K, args) for m in args.model for K in args.clients]
    print_table(
        "whole state_dict: aggregation (reconstruct) and slicing, float32, clients pruned 50 % / 75 %", rows, COLUMNS
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"device": device_name(dev), "torch": torch.__version__, "results": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
