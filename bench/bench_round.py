"""Whole-model and whole-round speed: state_dict aggregation, slicing, streaming and a server round.

    python bench/bench_round.py [--models vgg16 resnet56 resnet50 vit_small] [--clients 10 100] [--stream-clients 1000]
        [--stream-window 8] [--server-clients 1000] [--server-window 64] [--threads 2] [--device cuda] [--json out.json]

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
import json
import statistics
import time
from pathlib import Path

import peers  # noqa: E402
import torch
from models import MODELS, example_input
from workloads import _model_case, _plain_slice

import cahfp_ops  # noqa: E402
from cahfp_ops.fl import Server, StreamingAggregator, trace_plan  # noqa: E402
from common import TINY, device_name, half_and_half

DEV = torch.device("cpu")  # --device
RECORDS: list[dict] = []  # every figure printed, for --json


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


def _now() -> float:
    """Wall time with the device's queued work finished (the kernels run asynchronously on CUDA)."""
    _sync()
    return time.perf_counter()


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = _now()
        fn()
        best = min(best, _now() - t0)
    return best * 1e3


def paired_ms(fn, ref, repeat: int) -> tuple[float, float, float]:
    """``fn`` timed right after ``ref`` in each of ``repeat`` rounds: its best ms, the median
    of its per-round ratios to ``ref`` (this machine's bandwidth drifts between runs, so a
    ratio of two best-of-N taken apart moves with it) and the median ms of ``ref`` itself."""
    fn(), ref()
    best, ratios, refs = float("inf"), [], []
    for _ in range(repeat):
        t0 = _now()
        ref()
        t1 = _now()
        fn()
        t2 = _now()
        best = min(best, t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
        refs.append(t1 - t0)
    return best * 1e3, statistics.median(ratios), statistics.median(refs) * 1e3


_COPY: list = []  # the copy the paired measurements time: (fn, bytes moved)


def _copy():
    """``dst.copy_(src)`` of 256 MB (1 GB on CUDA: several times the L2) between preallocated
    buffers, allocated once; and the bytes it moves (read + write)."""
    if not _COPY:
        n = (1 << 30 if DEV.type == "cuda" else 256 << 20) >> (6 if TINY else 0)
        src = torch.empty(n, dtype=torch.uint8, device=DEV)
        dst = torch.empty_like(src)
        _COPY.append((lambda: dst.copy_(src), 2 * n))
    return _COPY[0]


def copy_bandwidth() -> float:
    """GB/s (read + write) of the copy of :func:`_copy` on the device, best of 5."""
    copy, nbytes = _copy()
    return nbytes / best_ms(copy, 5) / 1e6  # GB/s, read + write


def paired_fraction(fn, nbytes: int, repeat: int) -> tuple[float, float, float]:
    """``fn`` timed right after the copy in each of ``repeat`` pairs: its best ms and its
    fraction of the copy bandwidth from the median of its per-pair time ratios to the copy
    (``nbytes`` / copy bytes / ratio); and the copy's GB/s in those pairs (median). The
    bandwidth of this machine swings 2x within a minute; a fraction taken against a copy
    measured minutes apart moves with it, one paired with each call does not."""
    copy, copy_bytes = _copy()
    best, ratio, copy_ms = paired_ms(fn, copy, repeat)
    return best, nbytes / copy_bytes / ratio, copy_bytes / copy_ms / 1e6


def row_paired(what: str, fn, nbytes: int, repeat: int, peer: float | None = None, case: str = "") -> str:
    """A figure whose fraction of copy is paired call by call (:func:`paired_fraction`)."""
    ms, frac, copy_gbps = paired_fraction(fn, nbytes, repeat)
    vs = f"{peer / ms:6.2f}x" if peer else "      "
    RECORDS.append({"case": case, "what": what.strip(), "ms": ms, "GBps": nbytes / ms / 1e6, "of_copy": frac,
                    "of_copy_paired": True, "copy_GBps_paired": copy_gbps,
                    "speedup": peer / ms if peer else None})  # fmt: skip
    return (f"  {what:<44} {ms:9.3f} ms  {nbytes / ms / 1e6:6.1f} GB/s  {frac:5.2f} of copy* {vs}"
            f"  (copy {copy_gbps:.0f} GB/s)")  # fmt: skip


def row(what: str, ms: float, nbytes: int, bw: float, peer: float | None = None, case: str = "") -> str:
    frac = nbytes / (bw * 1e6) / ms
    vs = f"{peer / ms:6.2f}x" if peer else "      "
    RECORDS.append({"case": case, "what": what.strip(), "ms": ms, "GBps": nbytes / ms / 1e6, "of_copy": frac,
                    "speedup": peer / ms if peer else None})  # fmt: skip
    return f"  {what:<44} {ms:9.3f} ms  {nbytes / ms / 1e6:6.1f} GB/s  {frac:5.2f} of copy  {vs}"


def bench_model(name: str, K: int, bw: float, repeat: int) -> None:
    model, clients, rows, cols, coef = _model_case(name, K, DEV)
    case = f"{name} K={K}"
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

    print(row_paired("aggregate state_dicts (separate tensors)", agg_sd, agg_bytes, repeat, peer_agg, case))
    with cahfp_ops.validation(False):
        print(row_paired("  same, validation off", agg_sd, agg_bytes, repeat, peer_agg, case))
    print(row_paired("aggregate packed clients (one buffer each)",
                     lambda: cahfp_ops.reconstruct_aggregate_many(model, pclients, rows, cols, coef), agg_bytes, repeat,
                     peer_agg, case))  # fmt: skip
    layout0 = packed[0].layout
    floats = [model[n] for n in model]
    bufs = [p.buffer for p in pclients]
    coef_t = torch.tensor(coef, dtype=torch.float64, device=DEV)
    out = torch.empty(params, dtype=floats[0].dtype, device=DEV)
    with cahfp_ops.validation(False):
        print(row_paired("aggregate_packed, reused output", lambda: cahfp_ops.aggregate_packed(
            layout0, floats, bufs, coef_t, out=out), agg_bytes, repeat, peer_agg, case))  # fmt: skip
        # What bounds it: the same call with every client of a size pointing at one buffer
        # (same instructions, client data in cache), and a read-only pass over the clients.
        first: dict = {}
        cached = [first.setdefault(b.numel(), b) for b in bufs]
        print(row_paired("  same, clients' data in cache (bound)", lambda: cahfp_ops.aggregate_packed(
            layout0, floats, cached, coef_t, out=out), agg_bytes, repeat, None, case))  # fmt: skip
        print(row_paired("  touch-only pass over the clients (bound)", lambda: [b.sum() for b in bufs],
                         4 * client_elems, repeat, None, case))  # fmt: skip
        # What separate tensors cost at the operator boundary: the same call on the state_dicts'
        # tensors (no Python checks: validation is off).
        lists = [[c[n] for n in model] for c in clients]
        print(row_paired("  same, separate tensors (the boundary's cost)", lambda: cahfp_ops.aggregate_packed(
            layout0, floats, lists, coef_t, out=out), agg_bytes, repeat, None, case))  # fmt: skip
    print(row("index_add peer (per tensor)", peer_agg, agg_bytes, bw, case=case))
    print("  (* of copy: the median over calls of each call's fraction of a copy timed just before it; in"
          " parentheses the copy's median speed in those pairs, which the fraction of a partly compute-bound"
          " call depends on)")  # fmt: skip

    slice_bytes = 4 * 2 * client_elems
    peer_slice = best_ms(lambda: [_plain_slice(model, rows, cols, k) for k in range(K)], max(1, repeat // 2))
    print(row("slice_channels_many", best_ms(lambda: cahfp_ops.slice_channels_many(model, rows, cols), repeat),
              slice_bytes, bw, peer_slice, case))  # fmt: skip
    print(row("per-client index_select peer", peer_slice, slice_bytes, bw, case=case))

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

    s1, r1, _ = paired_ms(stream_keep_sets, batch, max(1, repeat // 2))
    s2, r2, _ = paired_ms(stream_layout, batch, max(1, repeat // 2))
    print(f"  streaming (x: median ratio to the batch call, timed in pairs): keep-set dicts {s1:.1f} ms ({r1:.2f}x), "
          f"round layout, one client per call {s2:.1f} ms ({r2:.2f}x)")  # fmt: skip
    sw = {w: paired_ms(lambda w=w: stream_windows(w), batch, repeat)[:2] for w in windows}
    RECORDS.append({"case": case, "what": "streaming", "keep_set_dicts_ms": s1, "keep_set_dicts_x": r1,
                    "one_per_call_ms": s2, "one_per_call_x": r2,
                    "windows": {str(w): {"ms": t, "x_batch": r} for w, (t, r) in sw.items()}})  # fmt: skip
    print("  streaming, windows of clients per call (add_many, partial sums in a reused Workspace): "
          + ", ".join(f"{w}: {t:.1f} ms ({r:.2f}x)" for w, (t, r) in sw.items()))  # fmt: skip


def bench_server(name: str, K: int, repeat: int, window: int | None = None) -> None:
    """Whole server rounds, ``Server(model, x, criterion="l1")``: assign (keep sets, layout,
    slicing into the reused buffers; with ``window``, the compact models handed out that many
    clients at a time) and aggregate (the replies are the compact models, unchanged). Median
    and spread over ``repeat`` rounds after one untimed warm-up round; plus, at K = 100, the
    round's two kernel calls alone."""
    torch.manual_seed(K)
    net = MODELS[name]().to(DEV)
    x = example_input(name, DEV)
    ratios = dict(enumerate(half_and_half(K)))
    traced = []
    for _ in range(3):  # trace_plan alone (torch.fx trace, shape propagation, the compact check)
        t0 = time.perf_counter()
        trace_plan(net, x)
        traced.append((time.perf_counter() - t0) * 1e3)
    RECORDS.append({"case": name, "what": "trace_plan", "ms": statistics.median(traced)})
    print(f"  trace_plan: {statistics.median(traced):.0f} ms (median of 3)")
    server = Server(net, x, criterion="l1", warmup_rounds=0)
    state0 = {k: v.clone() for k, v in server.state.items()}
    times = {"assign": [], "aggregate": [], "slice kernel": [], "aggregate kernel": []}
    for i in range(repeat + 1):  # round 0 warms up (tracing, FLOP counts, caches) and is not timed
        server.state = {k: v.clone() for k, v in state0.items()}
        server.round = 1
        t0 = _now()
        assigned = server.assign(ratios, window=window)
        assign_s = _now() - t0
        if window:  # hand the models out window by window (the server's time); the "clients" copy theirs
            replies, windows = {}, server.windows(window)
            while True:
                ta = _now()
                part = next(windows, None)
                assign_s += _now() - ta
                if part is None:
                    break
                for c, a in part.items():
                    st = a.state
                    replies[c] = cahfp_ops.PackedModel(st.buffer.clone(), st.layout, st.client, extras=dict(st.extras))
        else:
            replies = {c: a.state for c, a in assigned.items()}
        t1 = _now()
        server.aggregate(replies)
        t2 = _now()
        if window is None and K <= 100:
            floats = [state0[n] for n in server.layout.names]
            t3 = _now()
            bufs = server.layout.slice(floats)
            t4 = _now()
            coef = torch.full((K,), 1 / K, dtype=torch.float64, device=DEV)
            cahfp_ops.aggregate_packed(server.layout, floats, bufs, coef)
            t5 = _now()
        else:
            t3 = t4 = t5 = t2
        del replies
        for key, v in zip(times, (assign_s, t2 - t1, t4 - t3, t5 - t4)):
            if i:
                times[key].append(v * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    how = f", windows of {window}" if window else ""
    RECORDS.append({"case": f"{name} K={K}", "what": f"server round{how}", "rounds": repeat,
                    **{f"{k}_ms_median": v for k, v in med.items()},
                    **{f"{k}_ms_range": spread[k] for k in med}})  # fmt: skip
    print(f"  server round{how} (median [min-max] of {repeat} rounds): "
          f"assign {med['assign']:.1f} [{spread['assign'][0]:.1f}-{spread['assign'][1]:.1f}] ms, "
          f"aggregate {med['aggregate']:.1f} [{spread['aggregate'][0]:.1f}-{spread['aggregate'][1]:.1f}] ms"
          + (f"; its kernel calls: slice {med['slice kernel']:.1f} ms, aggregate {med['aggregate kernel']:.1f} ms"
             if window is None and K <= 100 else ""))  # fmt: skip


def bench_stream_many(name: str, K: int, window: int) -> None:
    """K clients folded in as they arrive, each generated just before: one per call, and
    windows of ``window`` clients per call (held until their window is folded)."""
    model, _, _, _, _ = _model_case(name, 2, DEV)
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
            pending.append(torch.randn(int(layout.numels[0]), generator=gen).to(DEV))
            if len(pending) < w and i + 1 < K:
                continue
            t0 = _now()
            if w == 1:
                agg.add(cahfp_ops.PackedModel(pending[0], layout, 0, keys), weight=1.0, layout=layout, client=0)
            else:
                agg.add_many([cahfp_ops.PackedModel(b, sub, j, keys) for j, b in enumerate(pending)],
                             [1.0] * len(pending), layout=sub, clients=list(range(len(pending))))  # fmt: skip
            t_add += _now() - t0
            pending = []
        t0 = _now()
        results.append(agg.result())
        t_res = _now() - t0
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
    ap.add_argument("--clients", nargs="*", type=int, default=[10, 100])
    ap.add_argument("--stream-clients", type=int, default=1000)
    ap.add_argument("--stream-window", type=int, default=8, help="clients per call in the K = 1,000 streaming run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-clients", nargs="*", type=int, default=[],
                    help="server rounds alone at these K (e.g. 1000), handing models out in windows")
    ap.add_argument("--server-window", type=int, default=64,
                    help="clients per window in the server rounds at K > 100 (assignment memory O(window))")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    torch.set_num_threads(args.threads)
    bw = copy_bandwidth()
    print(f"{device_name(DEV)}, backend {cahfp_ops.resolve_backend(DEV)}, threads {args.threads}, "
          f"copy bandwidth {bw:.1f} GB/s, kernels {cahfp_ops.cpp.kernel_status().source}")  # fmt: skip
    for name in args.models:
        for K in args.clients:
            bench_model(name, K, bw, args.repeat)
            bench_server(name, K, args.repeat, None if K <= 100 else args.server_window)
        for K in args.server_clients:
            print(f"{name} K={K}:")
            bench_server(name, K, args.repeat, args.server_window)
        if args.stream_clients:
            bench_stream_many(name, args.stream_clients, args.stream_window)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name(DEV), "torch": torch.__version__, "copy_GBps": bw,
                                         "results": RECORDS}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
