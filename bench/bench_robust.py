"""Robust reducers on a whole model: ``reconstruct_aggregate_many(..., reduce="median" |
"trimmed_mean")`` on CIFAR VGG-16 (with BatchNorm) against the plain-PyTorch peer.

K clients, half pruned 50 % and half 75 %, equal weights (so the peer's ``torch.sort`` ranks
agree with the weighted definition), mode ``reconstruct``. The peer works one tensor at a
time, as any plain implementation must (a whole-model stack does not fit in memory at
K = 100): stack the tensor's K reconstructed full-size copies (the global tensor with the
client's kept entries written in), sort along the client axis, take the middle value(s)
(median: the midpoint of the two middles for an even K, as ``numpy.median``) or the mean of
the kept ranks (trimmed mean, ``trim * K`` an integer, as ``scipy.stats.trim_mean``).

Correctness first: ours is compared with the peer on every tensor before anything is timed.
Then median times (ms), the speedup over the peer, and the peak extra memory of each call
(bytes allocated above what was held before the call, output included): on CUDA the
allocator's peak, on CPU the peak resident set sampled every 0.2 ms (with glibc's mmap
threshold pinned low so freed blocks return to the system; the peer's stacks are far above
it). The model itself is given for scale.

    python bench/bench_robust.py [--clients 10 100] [--reduce median trimmed_mean] [--trim 0.1]
    python bench/bench_robust.py --device cuda
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from pathlib import Path

import torch
from models import channel_plan, make_client_models, make_model

import cahfp_ops  # noqa: E402
from common import bench_ms, bench_parser, device_name, half_and_half, print_table, start


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """glibc: serve every block above ``nbytes`` with its own mmap, returned to the system on free
    (disables the dynamic threshold that would keep freed blocks resident), so the resident
    set tracks live allocations. False where that is not possible (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_mb(fn, device: torch.device) -> float:
    """Peak memory ``fn()`` allocates above what is held before the call, in MB (output included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - base) / 1e6
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(2e-4)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = fn()
    peak[0] = max(peak[0], _rss_bytes())
    done.set()
    t.join()
    del out
    return max(0, peak[0] - base) / 1e6


def reconstructed_stack(weight: torch.Tensor, clients: list[torch.Tensor], rows: list, cols: list) -> torch.Tensor:
    """(K, *weight.shape): client k's full-size tensor, the global one with its kept entries written in."""
    K = len(clients)
    full = weight.unsqueeze(0).repeat(K, *([1] * weight.dim()))
    for k in range(K):
        r = torch.arange(weight.shape[0], device=weight.device) if rows[k] is None else rows[k]
        if weight.dim() == 1:
            full[k, r] = clients[k]
        else:
            c = torch.arange(weight.shape[1], device=weight.device) if cols[k] is None else cols[k]
            full[k][r.unsqueeze(1), c.unsqueeze(0)] = clients[k]
    return full


def peer_reduce(stack: torch.Tensor, reduce: str, trim: float) -> torch.Tensor:
    K = stack.shape[0]
    s = stack.sort(dim=0).values
    if reduce == "median":
        if K % 2:
            return s[K // 2].clone()
        a, b = s[K // 2 - 1], s[K // 2]
        return a + (b - a) / 2
    g = round(trim * K)
    return s[g : K - g].mean(dim=0)


def peer_many(model, clients, rows, cols, reduce: str, trim: float) -> dict[str, torch.Tensor]:
    """The plain-PyTorch peer: one tensor at a time, stack, sort, reduce."""
    K = len(clients)
    out = {}
    for key, w in model.items():
        stack = reconstructed_stack(w, [c[key] for c in clients], rows.get(key, [None] * K), cols.get(key, [None] * K))
        out[key] = peer_reduce(stack, reduce, trim)
        del stack
    return out


def run(K: int, reduce: str, args, dev: torch.device) -> dict:
    gen = torch.Generator().manual_seed(K)
    shapes, rows, cols = channel_plan("vgg16", K, half_and_half(K), gen, device=dev)
    model = make_model(shapes, gen, device=dev)
    clients = make_client_models(shapes, rows, cols, K, gen, device=dev)
    if reduce == "trimmed_mean" and abs(args.trim * K - round(args.trim * K)) > 1e-9:
        raise SystemExit(f"--trim {args.trim} * K={K} must be an integer for the sort-and-trim peer")

    def ours():
        return cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, None, reduce=reduce, trim=args.trim)

    def peer():
        return peer_many(model, clients, rows, cols, reduce, args.trim)

    got, want = ours(), peer()
    for key in model:  # midpoint and mean round differently (delta form vs values): a few ulps
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    del got, want

    model_mb = sum(w.numel() * w.element_size() for w in model.values()) / 1e6
    t_ours = bench_ms(ours, dev, args.repeat)
    t_peer = bench_ms(peer, dev, args.repeat_peer)
    mem_ours = peak_extra_mb(ours, dev)
    mem_peer = peak_extra_mb(peer, dev)
    return {
        "K": K,
        "reduce": reduce if reduce == "median" else f"trimmed {args.trim:g}",
        "model_MB": model_mb,
        "ours_ms": t_ours,
        "peer_ms": t_peer,
        "speedup": t_peer / t_ours,
        "ours_MB": mem_ours,
        "peer_MB": mem_peer,
    }


COLUMNS = [
    ("K", "K", "d"),
    ("reduce", "reduce", "s"),
    ("model_MB", "model MB", ".1f"),
    ("ours_ms", "cahfp ms", ".1f"),
    ("peer_ms", "peer ms", ".1f"),
    ("speedup", "vs peer", ".1f"),
    ("ours_MB", "cahfp peak extra MB", ".1f"),
    ("peer_MB", "peer peak extra MB", ".1f"),
]


def main() -> None:
    p = bench_parser(__doc__, clients=[10, 100], repeat=5)
    p.add_argument("--reduce", nargs="+", default=["median", "trimmed_mean"], choices=["median", "trimmed_mean"])
    p.add_argument("--trim", type=float, default=0.1)
    p.add_argument("--repeat-peer", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    pinned = pin_mmap_threshold()
    dev = start(args)
    if dev.type == "cpu" and not pinned:
        print("note: could not pin the mmap threshold; CPU peak-memory figures may read low")
    rows = [run(K, r, args, dev) for K in args.clients for r in args.reduce]
    print_table("VGG-16 state_dict, robust reducers (reconstruct, equal weights), clients pruned 50 % / 75 %",
                rows, COLUMNS)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": device_name(dev), "torch": torch.__version__}
        args.json.write_text(json.dumps({**meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
