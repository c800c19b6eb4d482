"""Whole-model and whole-round speed: state_dict aggregation, slicing, streaming and a server round.

    python bench/bench_round.py [--models vgg16 resnet56] [--clients 10 100] [--stream-clients 1000]
        [--stream-window 8]

Every figure is checked against the per-tensor path first. Prints ms (best of --repeat), the
fraction of the measured copy bandwidth (bytes moved / copy bandwidth / time) and, side by
side in the same run, the plain-PyTorch peers: per-client, per-tensor ``index_select`` for
slicing, the per-tensor ``index_add`` aggregation for state_dicts. Streaming is timed one
client per call (``add``) and in windows of clients per call (``add_many``), whole rounds
(partial sums, folds, result) against the batch call. At K = 1,000 it folds clients
generated one at a time (peak extra memory O(model): the aggregator's partial sums and the
clients waiting for their window are printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from workloads import _model_case, _plain_slice  # noqa: E402

import cahfp_ops  # noqa: E402
from cahfp_ops.fl import Server, StreamingAggregator, resnet56, vgg16  # noqa: E402
from common import half_and_half  # noqa: E402


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def paired_ms(fn, ref, repeat: int) -> tuple[float, float]:
    """``fn`` timed right after ``ref`` in each of ``repeat`` rounds: its best ms and the
    median of its per-round ratios to ``ref`` (this machine's bandwidth drifts between runs,
    so a ratio of two best-of-N taken apart moves with it)."""
    fn(), ref()
    best, ratios = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ref()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        best = min(best, t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return best * 1e3, statistics.median(ratios)


def copy_bandwidth() -> float:
    src = torch.empty(256 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = best_ms(lambda: dst.copy_(src), 5)
    return 2 * src.numel() / ms / 1e6  # GB/s, read + write


def row(what: str, ms: float, nbytes: int, bw: float, peer: float | None = None) -> str:
    frac = nbytes / (bw * 1e6) / ms
    vs = f"{peer / ms:6.2f}x" if peer else "      "
    return f"  {what:<44} {ms:9.1f} ms  {nbytes / ms / 1e6:6.1f} GB/s  {frac:5.2f} of copy  {vs}"


def bench_model(name: str, K: int, bw: float, repeat: int) -> None:
    model, clients, rows, cols, coef = _model_case(name, K, torch.device("cpu"))
    params = sum(w.numel() for w in model.values())
    client_elems = sum(t.numel() for c in clients for t in c.values())
    agg_bytes = 4 * (2 * params + client_elems)
    sizes = f"{params / 1e6:.2f} M params, {client_elems / 1e6:.1f} M client elements"
    print(f"{name} K={K}: {len(model)} tensors, {sizes}")

    # correctness first
    ours = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, coef)
    with cahfp_ops.use_backend("torch"):
        ref = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, coef)
    assert all(torch.equal(ours[k], ref[k]) for k in model), "aggregation differs from the reference"
    packed = cahfp_ops.slice_channels_many(model, rows, cols)
    plain = [_plain_slice(model, rows, cols, k) for k in range(K)]
    assert all(torch.equal(packed[k][n], plain[k][n]) for k in range(K) for n in model), "slicing differs"
    pclients = [cahfp_ops.PackedModel(torch.cat([c[n].reshape(-1) for n in model]), p.layout, p.client)
                for c, p in zip(clients, packed)]  # fmt: skip

    def per_tensor_peer():
        add = peers.indexadd_reconstruct_aggregate
        return {k: add(model[k], [c[k] for c in clients], rows.get(k, [None] * K), cols.get(k), coef) for k in model}

    peer_agg = best_ms(per_tensor_peer, max(1, repeat // 2))
    def agg_sd():
        return cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, coef)

    print(row("aggregate state_dicts (separate tensors)", best_ms(agg_sd, repeat), agg_bytes, bw, peer_agg))
    with cahfp_ops.validation(False):
        print(row("  same, validation off", best_ms(
            lambda: cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, coef), repeat), agg_bytes, bw,
            peer_agg))  # fmt: skip
    print(row("aggregate packed clients (one buffer each)", best_ms(
        lambda: cahfp_ops.reconstruct_aggregate_many(model, pclients, rows, cols, coef), repeat), agg_bytes, bw,
        peer_agg))  # fmt: skip
    print(row("index_add peer (per tensor)", peer_agg, agg_bytes, bw))

    slice_bytes = 4 * 2 * client_elems
    peer_slice = best_ms(lambda: [_plain_slice(model, rows, cols, k) for k in range(K)], max(1, repeat // 2))
    print(row("slice_channels_many", best_ms(lambda: cahfp_ops.slice_channels_many(model, rows, cols), repeat),
              slice_bytes, bw, peer_slice))  # fmt: skip
    print(row("per-client index_select peer", peer_slice, slice_bytes, bw))

    layout = packed[0].layout
    per_client_keeps = [({n: v[k] for n, v in rows.items()}, {n: v[k] for n, v in cols.items()}) for k in range(K)]

    def stream_keep_sets():
        agg = StreamingAggregator(model)
        for k, c in enumerate(clients):
            agg.add(c, *per_client_keeps[k], weight=coef[k])
        return agg.result()

    def stream_layout():
        agg = StreamingAggregator(model)
        for k, c in enumerate(pclients):
            agg.add(c, weight=coef[k], layout=layout, client=k)
        return agg.result()

    workspace = cahfp_ops.Workspace()  # partial sums reused round after round, as the Server keeps them

    def stream_windows(window: int):
        agg = StreamingAggregator(model, workspace=workspace)
        for i in range(0, K, window):
            idx = list(range(i, min(K, i + window)))
            agg.add_many([pclients[k] for k in idx], [float(coef[k]) for k in idx], layout=layout, clients=idx)
        return agg.result()

    one_by_one = stream_layout()
    windows = sorted({w for w in (16, 64, K) if w <= K})
    for w in windows:  # correctness first: bit for bit the one-client-per-call result
        assert all(torch.equal(t, one_by_one[n]) for n, t in stream_windows(w).items()), "windows differ"
    assert all(torch.allclose(t, ours[n], rtol=1e-4, atol=1e-5) for n, t in one_by_one.items()), "streaming differs"
    def batch():
        return cahfp_ops.reconstruct_aggregate_many(model, pclients, rows, cols, coef)

    s1, r1 = paired_ms(stream_keep_sets, batch, max(1, repeat // 2))
    s2, r2 = paired_ms(stream_layout, batch, max(1, repeat // 2))
    print(f"  streaming (x: median ratio to the batch call, timed in pairs): keep-set dicts {s1:.1f} ms ({r1:.2f}x), "
          f"round layout, one client per call {s2:.1f} ms ({r2:.2f}x)")  # fmt: skip
    sw = {w: paired_ms(lambda w=w: stream_windows(w), batch, repeat) for w in windows}
    print("  streaming, windows of clients per call (add_many, partial sums in a reused Workspace): "
          + ", ".join(f"{w}: {t:.1f} ms ({r:.2f}x)" for w, (t, r) in sw.items()))  # fmt: skip


def bench_server(name: str, K: int, repeat: int) -> None:
    torch.manual_seed(K)
    net = {"vgg16": vgg16, "resnet56": resnet56}[name]()
    x = torch.randn(1, 3, 32, 32)
    ratios = dict(enumerate(half_and_half(K)))
    server = Server(net, x, criterion="l1", warmup_rounds=0)
    state0 = {k: v.clone() for k, v in server.state.items()}
    times = {"assign": [], "aggregate": [], "slice kernel": [], "aggregate kernel": []}
    for i in range(repeat + 1):  # round 0 warms up (tracing, FLOP counts, caches) and is not timed
        server.state = {k: v.clone() for k, v in state0.items()}
        server.round = 1
        t0 = time.perf_counter()
        assigned = server.assign(ratios)
        t1 = time.perf_counter()
        replies = {c: a.state for c, a in assigned.items()}
        server.aggregate(replies)
        t2 = time.perf_counter()
        floats = [state0[n] for n in server.layout.names]
        t3 = time.perf_counter()
        bufs = server.layout.slice(floats)
        t4 = time.perf_counter()
        coef = torch.full((K,), 1 / K, dtype=torch.float64)
        cahfp_ops.aggregate_packed(server.layout, floats, bufs, coef)
        t5 = time.perf_counter()
        for key, v in zip(times, (t1 - t0, t2 - t1, t4 - t3, t5 - t4)):
            if i:
                times[key].append(v * 1e3)
    b = {k: min(v) for k, v in times.items()}
    kern = b["slice kernel"] + b["aggregate kernel"]
    print(f"  server round: assign {b['assign']:.1f} ms + aggregate {b['aggregate']:.1f} ms = "
          f"{b['assign'] + b['aggregate']:.1f} ms; its kernel calls {kern:.1f} ms "
          f"({(b['assign'] + b['aggregate']) / kern:.2f}x)")  # fmt: skip


def bench_stream_many(name: str, K: int, window: int) -> None:
    """K clients folded in as they arrive, each generated just before: one per call, and
    windows of ``window`` clients per call (held until their window is folded)."""
    model, _, _, _, _ = _model_case(name, 2, torch.device("cpu"))
    keys = list(model)
    layout = cahfp_ops.slice_channels_many(model, None, None, num_clients=1)[0].layout
    model_mb = sum(w.numel() * 4 for w in model.values()) / 1e6
    results = []
    for w in (1, window):
        sub = layout.subset([0] * w)  # w copies of the one client's keep sets
        gen = torch.Generator().manual_seed(0)
        agg = StreamingAggregator(model)
        t_add, pending = 0.0, []
        for i in range(K):
            pending.append(torch.randn(int(layout.numels[0]), generator=gen))
            if len(pending) < w and i + 1 < K:
                continue
            t0 = time.perf_counter()
            if w == 1:
                agg.add(cahfp_ops.PackedModel(pending[0], layout, 0, keys), weight=1.0, layout=layout, client=0)
            else:
                agg.add_many([cahfp_ops.PackedModel(b, sub, j, keys) for j, b in enumerate(pending)],
                             [1.0] * len(pending), layout=sub, clients=list(range(len(pending))))  # fmt: skip
            t_add += time.perf_counter() - t0
            pending = []
        t0 = time.perf_counter()
        results.append(agg.result())
        t_res = time.perf_counter() - t0
        held = sum(t.untyped_storage().nbytes() for fl in agg.partials().flats.values() for t in fl)
        held += sum(t.untyped_storage().nbytes() for fl in agg._spare.values() for t in fl)
        clients_mb = (w - 1) * int(layout.numels[0]) * 4 / 1e6 if w > 1 else 0.0
        print(f"  streaming K={K} (full-size clients), {w} per call: {t_add * 1e3:.0f} ms in add, "
              f"{t_add / K * 1e3:.2f} ms per client, result {t_res * 1e3:.0f} ms; partial sums held: "
              f"{held / 1e6:.1f} MB, clients waiting for their window: up to {clients_mb:.0f} MB "
              f"(model: {model_mb:.1f} MB)")  # fmt: skip
    assert all(torch.equal(results[0][n], results[1][n]) for n in keys), "windows differ from one per call"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg16", "resnet56"])
    ap.add_argument("--clients", nargs="+", type=int, default=[10, 100])
    ap.add_argument("--stream-clients", type=int, default=1000)
    ap.add_argument("--stream-window", type=int, default=8, help="clients per call in the K = 1,000 streaming run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = copy_bandwidth()
    print(f"threads {args.threads}, copy bandwidth {bw:.1f} GB/s, kernels {cahfp_ops.cpp.kernel_status().source}")
    for name in args.models:
        for K in args.clients:
            bench_model(name, K, bw, args.repeat)
            bench_server(name, K, args.repeat)
        if args.stream_clients:
            bench_stream_many(name, args.stream_clients, args.stream_window)


if __name__ == "__main__":
    main()
