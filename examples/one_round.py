"""One CA-HFP server round on CPU, end to end, with the cahfp ops.

A small CNN's conv stack (embedded, random weights) plays the global model. The
server scores every conv filter with curvature_scores (gradient and secant
curvature proxies from the last global models, each filter scored together with
the input-channel slice of the layer that consumes it), picks each client's
channels with topk_channel_masks, slices compact submodels with slice_channels,
lets each client apply a fake local update, and aggregates the heterogeneous
replies with reconstruct_aggregate (both modes). It prints what it did.

    python examples/one_round.py [--clients 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import cahfp_ops
from cahfp_ops.fl.masks import kept_count

WIDTHS = [32, 32, 64, 64, 128, 128]  # conv widths of the embedded model (3x3 kernels, 3 input channels)


def make_global(gen: torch.Generator) -> list[torch.Tensor]:
    weights, cin = [], 3
    for w in WIDTHS:
        weights.append(torch.randn(w, cin, 3, 3, generator=gen) * math.sqrt(2.0 / (cin * 9)))
        cin = w
    return weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    K, lr, steps = args.clients, 0.1, 5
    ratios = [0.25 if k < K // 2 else 0.5 for k in range(K)]  # system heterogeneity
    n_samples = torch.randint(50, 500, (K,), generator=gen).tolist()

    # The server's history: the global models of rounds t-2, t-1 and t.
    w_t = make_global(gen)
    w_prev = [w + 0.01 * torch.randn(w.shape, generator=gen) for w in w_t]
    w_prev2 = [w + 0.01 * torch.randn(w.shape, generator=gen) for w in w_prev]
    # Warm-up before timing: loads (on the very first run, compiles) the C++ kernels, and
    # the first custom-op call of a process imports torch's compiler stack (~2 s, once).
    cahfp_ops.reconstruct_aggregate(torch.zeros(1), [torch.ones(1)], [torch.tensor([0])])
    t0 = time.perf_counter()

    # 1. Score: pseudo-gradients and a secant curvature estimate, from model variations only.
    g_t = [(a - b) / (lr * steps) for a, b in zip(w_prev, w_t)]
    g_prev = [(a - b) / (lr * steps) for a, b in zip(w_prev2, w_prev)]
    h_t = [(g1 - g0).abs() / ((a - b).abs() + 1e-8) for g1, g0, a, b in zip(g_t, g_prev, w_t, w_prev)]
    scores = []
    for layer, (w, g, h) in enumerate(zip(w_t, g_t, h_t)):
        s = cahfp_ops.curvature_scores(w, g, h, dim=0)  # the filters themselves
        if layer + 1 < len(w_t):  # plus the input slice of the consumer layer
            s = s + cahfp_ops.curvature_scores(w_t[layer + 1], g_t[layer + 1], h_t[layer + 1], dim=1)
        scores.append(s)

    # 2. Mask: each client keeps its top channels of every layer (the last layer stays whole).
    rows = []
    for layer, s in enumerate(scores):
        if layer + 1 == len(scores):
            rows.append([None] * K)
            continue
        keep = [kept_count(r, s.numel()) for r in ratios]
        _, idx = cahfp_ops.topk_channel_masks(s.expand(K, -1), keep)
        rows.append([idx[k, : keep[k]] for k in range(K)])
    cols = [[None] * K] + rows[:-1]  # a layer's inputs are the previous layer's kept outputs

    # 3. Slice: one pass per layer gives every client's compact tensor.
    compact = [cahfp_ops.slice_channels(w, r, c) for w, r, c in zip(w_t, rows, cols)]

    # Clients train (here: a fake local update of the compact tensors).
    updated = [[c - lr * torch.randn(c.shape, generator=gen) * 0.01 for c in layer] for layer in compact]

    # 4. Reconstruct and aggregate, weighted by data size.
    new_global = [
        cahfp_ops.reconstruct_aggregate(w, u, r, c, n_samples) for w, u, r, c in zip(w_t, updated, rows, cols)
    ]
    overlap = [
        cahfp_ops.reconstruct_aggregate(w, u, r, c, n_samples, mode="overlap")
        for w, u, r, c in zip(w_t, updated, rows, cols)
    ]
    elapsed = (time.perf_counter() - t0) * 1e3

    full = sum(w.numel() for w in w_t)
    print(
        f"cahfp-ops one server round: {len(WIDTHS)} conv layers, {full:,} parameters, {K} clients, "
        f"backend {cahfp_ops.resolve_backend(torch.device('cpu'))}\n"
    )
    print(f"{'client':>6} {'ratio':>6} {'samples':>8} {'params down/up':>15} {'of full':>8}")
    for k in range(K):
        n = sum(layer[k].numel() for layer in compact)
        print(f"{k:>6} {ratios[k]:>6.2f} {n_samples[k]:>8} {n:>15,} {n / full:>8.1%}")
    delta = sum(float((a - b).abs().sum()) for a, b in zip(new_global, w_t))
    untouched = sum(int((a == b).sum()) for a, b in zip(new_global, w_t))
    gap = max(float((a - b).abs().max()) for a, b in zip(new_global, overlap))
    print(
        f"\nreconstruct: total |change| of the global model {delta:.4f}; {untouched:,} entries unchanged "
        f"(kept by no client)"
    )
    print(f"overlap (HeteroFL) differs from reconstruct by at most {gap:.2e} per entry")
    print(f"round time (score, mask, slice, aggregate x2): {elapsed:.1f} ms")


if __name__ == "__main__":
    main()
