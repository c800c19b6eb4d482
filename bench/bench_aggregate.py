"""Benchmark reconstruct_aggregate on CIFAR VGG-16 conv shapes.

K clients, half pruned 50 % and half 75 % (random keep sets, channel-coupled across
layers). Correctness is checked first against the reference; then the median time
of a whole-model aggregation (13 layers) is printed for:

* cahfp (validation on, the default) and cahfp (validation off),
* the naive loop (per client: clone the global, assign the compact tensor, accumulate),
* the best plain-PyTorch variant (per client: widen the delta to full rows, index_add_),

with GB/s (bytes that must move: weight read + output write + client data read), the
fraction of the warm copy roofline (``dst.copy_(src)`` moving the same bytes between
preallocated buffers), and the speedups, all measured side by side in one run.

    python bench/bench_aggregate.py --threads 2 --clients 10 100
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cahfp_ops  # noqa: E402
from cahfp_ops import reference  # noqa: E402
from common import copy_roofline_ms, make_clients, time_fn, vgg16_conv_shapes  # noqa: E402


def run(K: int, args) -> dict:
    gen = torch.Generator().manual_seed(K)
    shapes = vgg16_conv_shapes()
    weights = [torch.randn(s, generator=gen) for s in shapes]
    ratios = [0.5 if k < K // 2 else 0.75 for k in range(K)]
    layers = make_clients(shapes, K, ratios, gen)
    coef = (torch.rand(K, generator=gen) + 0.5).tolist()

    def ours():
        return [cahfp_ops.reconstruct_aggregate(w, c, r, cc, coef) for w, (r, cc, c) in zip(weights, layers)]

    def ours_fast():
        with cahfp_ops.validation(False):
            return ours()

    def naive():
        return [reference.naive_reconstruct_aggregate(w, c, r, cc, coef) for w, (r, cc, c) in zip(weights, layers)]

    def indexadd():
        return [reference.indexadd_reconstruct_aggregate(w, c, r, cc, coef) for w, (r, cc, c) in zip(weights, layers)]

    # correctness first
    got, exp = ours(), indexadd()
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    naive_out = naive()
    for g, e in zip(got, naive_out):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    del got, exp, naive_out

    params = sum(w.numel() for w in weights)
    client_elems = sum(c.numel() for _, _, cl in layers for c in cl)
    nbytes = 4 * (2 * params + client_elems)
    t_copy = copy_roofline_ms(nbytes, repeat=args.repeat * 2)
    t = {
        "cahfp": time_fn(ours, args.repeat),
        "cahfp_novalidate": time_fn(ours_fast, args.repeat),
        "indexadd": time_fn(indexadd, args.repeat_peers),
        "naive": time_fn(naive, args.repeat_peers),
    }
    res = {
        "K": K,
        "params": params,
        "client_elems": client_elems,
        "bytes": nbytes,
        "copy_ms": t_copy,
        "copy_GBps": nbytes / t_copy / 1e6,
        **{f"{k}_ms": v for k, v in t.items()},
    }
    for key in ("cahfp", "cahfp_novalidate"):
        res[f"{key}_GBps"] = nbytes / t[key] / 1e6
        res[f"{key}_roofline"] = t_copy / t[key]
        res[f"{key}_vs_naive"] = t["naive"] / t[key]
        res[f"{key}_vs_indexadd"] = t["indexadd"] / t[key]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--repeat-peers", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    assert cahfp_ops.resolve_backend(torch.device("cpu")) == "cpp", "C++ kernels not loaded"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("VGG-16 (CIFAR) conv layers, float32, half the clients pruned 50 %, half 75 %\n")
    header = (
        f"{'K':>4} {'MB moved':>9} {'copy ms':>8} {'cahfp ms':>9} {'(no val)':>9} {'GB/s':>6} {'roofline':>9} "
        f"{'naive ms':>9} {'index_add ms':>12} {'vs naive':>9} {'vs index_add':>12}"
    )
    print(header)
    rows = []
    for K in args.clients:
        r = run(K, args)
        rows.append(r)
        print(
            f"{K:>4} {r['bytes'] / 1e6:>9.1f} {r['copy_ms']:>8.2f} {r['cahfp_ms']:>9.2f} "
            f"{r['cahfp_novalidate_ms']:>9.2f} {r['cahfp_GBps']:>6.2f} {r['cahfp_roofline']:>8.1%} "
            f"{r['naive_ms']:>9.1f} {r['indexadd_ms']:>12.1f} {r['cahfp_vs_naive']:>8.1f}x "
            f"{r['cahfp_vs_indexadd']:>11.1f}x",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"threads": args.threads, "torch": torch.__version__, "results": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
