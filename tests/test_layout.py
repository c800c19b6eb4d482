"""The per-round layout: packed slicing, aggregation with fused reply statistics, streaming
accumulation; each against the per-tensor ops and the reference, on every backend."""

import math

import pytest
import torch

import cahfp_ops
from cahfp_ops import PackedModel, RoundLayout, accumulate_packed, aggregate_packed
from cahfp_ops._debug import poison_outputs
from cahfp_ops.fl import Server, StreamingAggregator
from helpers import backends_under_test, compact_models, fl_round_setup, random_model, random_plan


def _case(gen, K, dtype=torch.float32):
    model = random_model(gen, dtype)
    rows, cols = random_plan(gen, K)
    layout = RoundLayout.from_keep_sets(model, rows, cols)
    return model, rows, cols, layout


@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_slice_packed_equals_per_tensor_slicing(backend, gen, K, dtype):
    model, rows, cols, layout = _case(gen, K, dtype)
    with poison_outputs():
        buffers = layout.slice(list(model.values()))
    assert [b.numel() for b in buffers] == layout.numels.tolist()
    for k, buf in enumerate(buffers):
        packed = PackedModel(buf, layout, k)
        for name, w in model.items():
            expected = cahfp_ops.slice_channels(w, rows.get(name, [None] * K), cols.get(name) if w.dim() > 1 else None)
            assert torch.equal(packed[name], expected[k]), (k, name)


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("form", ["packed", "separate", "mixed"])
def test_aggregate_packed_equals_the_many_op_bit_for_bit(backend, gen, mode, form):
    K = 4
    model, rows, cols, layout = _case(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    packed = [torch.cat([c[n].reshape(-1) for n in model]) for c in clients]
    data = {
        "packed": packed,
        "separate": [list(c.values()) for c in clients],
        "mixed": [packed[0], *[list(c.values()) for c in clients[1:]]],
    }[form]
    coef = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    with poison_outputs():
        out, stats = aggregate_packed(layout, list(model.values()), data, coef / coef.sum(), mode)
    expected = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, coef, mode=mode)
    for name, view in zip(model, layout.full_views(out)):
        assert torch.equal(view, expected[name]), name
    # statistics: the squared deltas over each client's kept entries (the global sliced alike);
    # float32 data square and add in float32 lanes per tile (relative error ~ n * 2**-24)
    with cahfp_ops.use_backend("torch"):
        kept = layout.slice(list(model.values()))
    for k, _c in enumerate(clients):
        want = float((packed[k].double() - kept[k].double()).square().sum())
        assert stats[k, 0] == 0
        assert math.isclose(float(stats[k, 1]), want, rel_tol=1e-5), k


def test_fused_statistics_of_huge_finite_deltas_stay_finite(backend, gen):
    """A delta whose square overflows float32 is large, not non-finite: the statistic is
    counted again in float64."""
    K = 3
    model, rows, cols, layout = _case(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    name = next(n for n in model if clients[1][n].numel() > 9)
    clients[1][name].view(-1)[:9] = 3e30  # finite; its square is not, in float32
    packed = [torch.cat([c[n].reshape(-1) for n in model]) for c in clients]
    coef = torch.full((K,), 1 / K, dtype=torch.float64)
    _, stats = aggregate_packed(layout, list(model.values()), packed, coef)
    assert stats[:, 0].tolist() == [0.0, 0.0, 0.0]
    assert 9 * 9e60 * 0.99 < float(stats[1, 1]) < math.inf
    total = sum(w.numel() for w in model.values())
    cover_n = sum(w.shape[0] if w.dim() == 1 else w.shape[0] * w.shape[1] for w in model.values())
    st = accumulate_packed(layout.client(1), list(model.values()), list(clients[1].values()), 1.0, "reconstruct",
                           torch.zeros(total), torch.zeros(cover_n))  # fmt: skip
    assert st[0] == 0 and st[2] == 1 and 9 * 9e60 * 0.99 < float(st[1]) < math.inf


def test_fused_statistics_flag_nonfinite_and_narrowing(backend, gen):
    K = 3
    model, rows, cols, layout = _case(gen, K, torch.float16)
    clients = compact_models(gen, model, rows, cols, K, dtype=torch.float32)
    first = next(n for n in model if clients[1][n].numel())
    clients[1][first].view(-1)[0] = 1e6  # finite in float32, inf in the float16 global
    last = [n for n in model if clients[2][n].numel()][-1]
    clients[2][last].view(-1)[-1] = float("nan")
    coef = torch.full((K,), 1 / K, dtype=torch.float64)
    _, stats = aggregate_packed(layout, list(model.values()), [list(c.values()) for c in clients], coef)
    assert stats[:, 0].tolist() == [0.0, 1.0, 1.0]


def test_zero_coefficient_equals_leaving_the_client_out(backend, gen):
    """What the server's recomputation relies on: coefficient 0 is bit for bit absence."""
    K = 4
    model, rows, cols, layout = _case(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    clients[2] = {n: torch.full_like(t, float("nan")) for n, t in clients[2].items()}
    coef = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    out, _ = aggregate_packed(layout, list(model.values()), [list(c.values()) for c in clients], coef / coef.sum())
    sub = layout.subset([0, 1, 3])
    keep = [clients[k] for k in (0, 1, 3)]
    coef3 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out3, _ = aggregate_packed(sub, list(model.values()), [list(c.values()) for c in keep], coef3 / coef3.sum())
    assert torch.equal(out, out3) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_accumulate_packed_matches_reference_and_rejects_without_trace(backend, gen, mode):
    K = 3
    model, rows, cols, layout = _case(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    weights = list(model.values())
    total = sum(w.numel() for w in weights)
    cover_n = sum(1 * w.shape[0] if w.dim() == 1 else w.shape[0] * w.shape[1] for w in weights)
    sums, cover = torch.zeros(total), torch.zeros(cover_n)
    with cahfp_ops.use_backend("torch"):
        ref_s, ref_c = torch.zeros(total), torch.zeros(cover_n)
        for k in range(K):
            accumulate_packed(layout.client(k), weights, list(clients[k].values()), k + 1.0, mode, ref_s, ref_c)
    for k in range(K):
        st = accumulate_packed(layout.client(k), weights, list(clients[k].values()), k + 1.0, mode, sums, cover)
        assert st[2] == 1
    torch.testing.assert_close(sums, ref_s, rtol=1e-6, atol=1e-6)
    assert torch.equal(cover, ref_c)
    before = (sums.clone(), cover.clone())
    bad = {n: t.clone() for n, t in clients[0].items()}
    name = next(n for n in model if bad[n].numel())
    bad[name].view(-1)[-1] = float("inf")
    st = accumulate_packed(layout.client(0), weights, list(bad.values()), 1.0, mode, sums, cover)
    assert st[0] == 1 and st[2] == 0
    st = accumulate_packed(layout.client(1), weights, list(clients[1].values()), 1.0, mode, sums, cover, max_ssq=0.0)
    assert st[0] == 0 and st[2] == 0
    assert torch.equal(sums, before[0]) and torch.equal(cover, before[1])


def test_layout_ops_opcheck_and_compile(backend, gen):
    K = 3
    model, rows, cols, layout = _case(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    weights = list(model.values())
    t = layout.tables()
    import numpy as np

    starts = torch.from_numpy(layout.offsets_host + (np.cumsum(layout.numels) - layout.numels)[:, None])
    out = torch.empty(int(layout.numels.sum()))
    torch.library.opcheck(
        torch.ops.cahfp.slice_packed, (weights, t["meta"], t["row_inv"], t["col_keep"], t["counts"], starts, out)
    )
    coef = torch.full((K,), 1 / K, dtype=torch.float64)
    flat = [x for c in clients for x in c.values()]
    args = (weights, flat, [len(model)] * K, t["meta"], t["row_inv"], t["col_keep"], t["counts"], t["offsets"])
    res = torch.empty(sum(w.numel() for w in weights))
    stats = torch.empty(K, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.cahfp.aggregate_packed, (*args, coef, "reconstruct", res, stats))

    def fn(ws, cl):
        o = torch.empty(sum(w.numel() for w in ws))
        s = torch.empty(K, 2, dtype=torch.float64)
        torch.ops.cahfp.aggregate_packed(ws, cl, [len(model)] * K, *args[3:], coef, "reconstruct", o, s)
        return o, s

    eager = fn(weights, flat)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(weights, flat)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def test_layout_ops_deterministic_across_threads(gen):
    K = 6
    model, rows, cols, layout = _case(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    coef = torch.full((K,), 1 / K, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(aggregate_packed(layout, list(model.values()), [list(c.values()) for c in clients], coef))
    finally:
        torch.set_num_threads(threads)
    for out, stats in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(stats, results[0][1])


def test_hand_made_layout_tables_cannot_reach_out_of_bounds(gen):
    K = 2
    model, rows, cols, layout = _case(gen, K)
    weights = list(model.values())
    t = dict(layout.tables())
    bad_keep = t["col_keep"].clone()
    bad_keep[0, 0] = 10_000
    coef = torch.full((K,), 0.5, dtype=torch.float64)
    clients = [torch.zeros(int(n)) for n in layout.numels]
    out = torch.empty(sum(w.numel() for w in weights))
    stats = torch.empty(K, 2, dtype=torch.float64)
    with cahfp_ops.use_backend("cpp"), pytest.raises(RuntimeError, match="out of range"):
        torch.ops.cahfp.aggregate_packed(
            weights, clients, [1] * K, t["meta"], t["row_inv"], bad_keep, t["counts"], t["offsets"], coef,
            "reconstruct", out, stats,
        )  # fmt: skip
    with cahfp_ops.use_backend("cpp"), pytest.raises(RuntimeError, match="too few"):
        short = [clients[0][:-1] if clients[0].numel() else clients[0], clients[1][: max(0, clients[1].numel() - 1)]]
        torch.ops.cahfp.aggregate_packed(
            weights, short, [1] * K, t["meta"], t["row_inv"], t["col_keep"], t["counts"], t["offsets"], coef,
            "reconstruct", out, stats,
        )  # fmt: skip


@pytest.mark.skipif("triton" not in backends_under_test(), reason="the Triton kernels cannot run here")
def test_triton_layout_kernels_stay_in_bounds_with_corrupted_tables(gen):
    """Every table entry the Triton kernels follow is masked against what it indexes: with
    scrambled tables, nothing outside the weights, the client buffers and the output is read
    or written (all of them sit inside NaN guard regions that must stay untouched and unread)."""
    K = 3
    model, rows, cols, layout = _case(gen, K)
    t = layout.tables()
    guard = 64

    def guarded(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        whole = torch.full((values.numel() + 2 * guard,), float("nan"), dtype=values.dtype)
        inner = whole[guard : guard + values.numel()]
        inner.copy_(values.reshape(-1))
        return whole, inner

    w_whole, w_flat = guarded(torch.cat([w.reshape(-1) for w in model.values()]))
    weights, at = [], 0
    for w in model.values():
        weights.append(w_flat[at : at + w.numel()].view(w.shape))
        at += w.numel()
    scrambled = {
        "meta": t["meta"].clone(),
        "row_inv": torch.randint(-2, 40, t["row_inv"].shape, generator=gen, dtype=torch.int32),
        "col_keep": torch.randint(-2, 60, t["col_keep"].shape, generator=gen, dtype=torch.int32),
        "counts": torch.randint(0, 50, t["counts"].shape, generator=gen),
        "offsets": torch.randint(-5, 3000, t["offsets"].shape, generator=gen),
    }
    scrambled["meta"][:, 3:] += torch.randint(-3, 4, scrambled["meta"][:, 3:].shape, generator=gen)
    clients = [guarded(torch.randn(int(n), generator=gen)) for n in layout.numels]
    out_whole, out = guarded(torch.zeros(int(layout.numels.sum())))
    with cahfp_ops.use_backend("triton"):
        torch.ops.cahfp.slice_packed(
            weights, scrambled["meta"], scrambled["row_inv"], scrambled["col_keep"], scrambled["counts"],
            scrambled["offsets"], out,
        )  # fmt: skip
        agg_whole, agg = guarded(torch.zeros(w_flat.numel()))
        stats = torch.zeros(K, 2, dtype=torch.float64)
        torch.ops.cahfp.aggregate_packed(
            weights, [c[1] for c in clients], [1] * K, scrambled["meta"], scrambled["row_inv"],
            scrambled["col_keep"], scrambled["counts"], scrambled["offsets"],
            torch.full((K,), 1 / K, dtype=torch.float64), "reconstruct", agg, stats,
        )  # fmt: skip
    assert torch.isnan(out_whole[:guard]).all() and torch.isnan(out_whole[-guard:]).all()
    assert torch.isnan(agg_whole[:guard]).all() and torch.isnan(agg_whole[-guard:]).all()
    assert not torch.isnan(out).any()
    assert torch.isfinite(agg).all() and torch.isfinite(stats).all() and stats[:, 0].eq(0).all()
    assert torch.isnan(w_whole[:guard]).all() and all(torch.isnan(c[0][:guard]).all() for c in clients)


def test_server_rejects_nonfinite_and_oversized_replies_bit_for_bit(gen):
    model, *_ = fl_round_setup(gen, K=4)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    server = Server(model, x, criterion="random", update_bound=10.0)
    assigned = server.assign({c: 0.5 for c in range(5)})
    assert isinstance(assigned[0].state, PackedModel)
    replies = {c: {n: t.clone() + 0.01 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t.clone()
                   for n, t in a.state.items()} for c, a in assigned.items()}  # fmt: skip
    name = next(n for n, t in replies[1].items() if t.is_floating_point() and t.numel())
    replies[1][name].view(-1)[0] = float("nan")
    for t in replies[2].values():
        if t.is_floating_point():
            t.add_(1e3)
    state0 = {k: v.clone() for k, v in server.state.items()}
    report = server.aggregate(replies)
    assert "non-finite" in report.rejected[1] and "exceeds the bound" in report.rejected[2]
    assert report.update_bound is not None and report.clients[0].update_size > 0
    # the same round with only the accepted replies
    other = Server(model, x, criterion="random", update_bound=None)
    other.state = state0
    other.assign({c: 0.5 for c in range(5)})
    other.assignments = server.assignments  # the same keep sets
    other.layout, other._slots = server.layout, server._slots
    alone = other.aggregate({c: replies[c] for c in (0, 3, 4)})
    assert alone.accepted == [0, 3, 4]
    for n in server.state:
        assert torch.equal(server.state[n], other.state[n]), n


def test_streaming_server_round_matches_batch(gen):
    model, *_ = fl_round_setup(gen, K=4)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    results = []
    for streaming in (False, True):
        server = Server(model, x, criterion="random")
        assigned = server.assign({c: 0.5 for c in range(4)})
        replies = {c: a.state for c, a in assigned.items()}
        server.aggregate(replies, {c: float(c + 1) for c in range(4)}, streaming=streaming)
        results.append(server.state)
    for n, t in results[0].items():
        torch.testing.assert_close(results[1][n], t, rtol=1e-5, atol=1e-6)


def test_streaming_aggregator_layout_path_equals_keep_set_path(gen):
    K = 3
    model, rows, cols, layout = _case(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    a, b = StreamingAggregator(model), StreamingAggregator(model)
    for k, c in enumerate(clients):
        def one(v, k=k):
            x = v[k]
            return x[x >= 0] if isinstance(x, torch.Tensor) else x

        r = {n: one(v) for n, v in rows.items()}
        cc = {n: one(v) for n, v in cols.items()}
        assert a.add(c, r, cc, weight=k + 1.0).accepted
        assert b.add(c, weight=k + 1.0, layout=layout, client=k).accepted
    for n, t in a.result().items():
        assert torch.equal(t, b.result()[n])


def _list_plan(gen, K):
    def keeps(size):
        return [torch.sort(torch.randperm(size, generator=gen)[: 1 + k % size]).values for k in range(K)]

    model = {"a.weight": torch.randn(7, 5, 3, 3, generator=gen), "a.bias": torch.randn(7, generator=gen),
             "b.weight": torch.randn(4, 7, generator=gen)}  # fmt: skip
    r, c = keeps(7), keeps(5)
    return model, {"a.weight": r, "a.bias": r}, {"a.weight": c, "b.weight": [t.clone() for t in r]}


def test_layouts_are_reused_for_equal_keep_sets_and_rebuilt_when_they_change(gen):
    """Fresh keep-set objects with the same contents give the same layout (sliced in one
    call, aggregated in another); a keep set changed in place, or validation switched on,
    does not reuse it."""
    K = 3
    model, rows, cols = _list_plan(gen, K)
    first = RoundLayout.from_keep_sets(model, rows, cols)
    memo: dict = {}

    def copy(d):  # fresh objects, the same sharing between tensors (as ChannelPlan.tensor_keep_sets gives)
        return {n: memo.setdefault((id(d), id(v)), [t.clone() for t in v]) for n, v in d.items()}

    again = RoundLayout.from_keep_sets(model, copy(rows), copy(cols))
    assert again is first
    memo.clear()
    changed = copy(cols)
    changed["a.weight"][1][0] = (changed["a.weight"][1][0] + 1) % 5 if changed["a.weight"][1].numel() == 1 else 4
    changed["a.weight"][1] = torch.unique(changed["a.weight"][1])
    other = RoundLayout.from_keep_sets(model, rows, changed)
    assert other is not first
    # results follow the contents: slicing on the rebuilt layout equals the per-tensor op
    buf = other.slice(list(model.values()))[1]
    expected = cahfp_ops.slice_channels(model["a.weight"], rows["a.weight"], changed["a.weight"])[1]
    assert torch.equal(PackedModel(buf, other, 1)["a.weight"], expected)
    memo.clear()
    with cahfp_ops.validation(False):
        unchecked = RoundLayout.from_keep_sets(model, copy(rows), copy(cols))
    assert unchecked is not first
    memo.clear()
    bad = copy(cols)
    bad["b.weight"][0] = torch.tensor([3, 1])  # not ascending: must raise although equal-length sets were seen
    with pytest.raises(ValueError, match="ascending"):
        RoundLayout.from_keep_sets(model, rows, bad)


def test_packed_scalars_views_write_through():
    from cahfp_ops import PackedScalars

    values = torch.tensor([3, 5, 7])
    s = PackedScalars(["a", "b", "c"], values)
    assert list(s) == ["a", "b", "c"] and len(s) == 3 and "b" in s and "z" not in s
    assert s["b"] is s["b"] and int(s["b"]) == 5  # one view per name, made once
    s["b"].add_(10)
    assert values.tolist() == [3, 15, 7] and dict(s)["b"].dim() == 0
    with pytest.raises(KeyError):
        s["z"]
    with pytest.raises(ValueError, match="3 names"):
        PackedScalars(["a", "b", "c"], torch.zeros(2))
