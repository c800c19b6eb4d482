"""The per-round C++ engine behind aggregate_packed / fold_packed (csrc/cpu/packed_engine.h) on
ragged layouts: tensors tiled and tensors grouped, one-element tensors, clients holding nothing
of a tile or of a tensor, K = 1 and K = 1,000. Against the previous engine (the single-tensor
kernel, same per-element order: bit for bit) and the reference; the layout's cached plan
against a plan made for the call; plans that do not fit are refused."""

import pytest
import torch

import cahfp_ops
from cahfp_ops import _operators
from cahfp_ops.layout import RoundLayout, aggregate_packed, fold_packed, packed_views

pytestmark = pytest.mark.skipif(not cahfp_ops.cpp.load_cpp(), reason="the C++ kernels are not available")

# (name, shape): a wide tensor tiled in several row blocks (> 16 K elements), small ones grouped,
# one-element tensors, a 1-D bias, a linear layer (T = 1) and 3x3 and 1x1 convolutions.
SHAPES = [
    ("conv", (40, 24, 3, 3)),
    ("bias", (40,)),
    ("one", (1,)),
    ("wide", (300, 200)),
    ("pw", (7, 40, 1, 1)),
    ("single", (1, 1, 3, 3)),
    ("lin", (13, 300)),
]


def _keep(gen, size, frac):
    """A random sorted keep set of about ``frac`` of ``size`` channels (possibly empty)."""
    n = int(round(frac * size))
    return torch.randperm(size, generator=gen)[:n].sort().values.tolist()


def _case(K, seed, empty_every=0, shapes=SHAPES, dtype=torch.float32, fracs=(0.05, 0.9)):
    """Weights, rows/cols keep sets (client k keeps nothing when empty_every divides k + 1;
    else a fraction in [fracs[0], fracs[0] + fracs[1]); a tensor named "prefix..." keeps its
    first columns), clients' packed buffers of random values, and weights."""
    gen = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=gen, dtype=dtype) for n, s in shapes}
    rows, cols = {n: [] for n, _ in shapes}, {n: [] for n, s in shapes if len(s) > 1}
    for k in range(K):
        empty = empty_every and (k + 1) % empty_every == 0
        frac = 0.0 if empty else float(torch.rand(1, generator=gen)) * fracs[1] + fracs[0]
        for n, s in shapes:
            rows[n].append(_keep(gen, s[0], frac))
            if len(s) > 1:
                cols[n].append(list(range(int(frac * s[1]))) if n.startswith("prefix") else _keep(gen, s[1], frac))
    layout = RoundLayout.from_keep_sets(weights, rows, cols, num_clients=K)
    layout.names = tuple(weights)
    bufs = [torch.randn(int(layout.numels[k]), generator=gen, dtype=dtype) for k in range(K)]
    coef = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    return weights, rows, cols, layout, bufs, coef


def _per_tensor(weights, rows, cols, layout, bufs, coef, mode="reconstruct"):
    """The previous engine: one single-tensor kernel call per tensor (same per-element order)."""
    out = {}
    for i, (n, w) in enumerate(weights.items()):
        shapes = [layout.compact_shapes(k)[i] for k in range(len(bufs))]
        offs = [int(layout.offsets_host[k, i]) for k in range(len(bufs))]
        clients = [b[o : o + torch.Size(s).numel()].view(s) for b, o, s in zip(bufs, offs, shapes)]
        out[n] = cahfp_ops.reconstruct_aggregate(w, clients, rows[n], cols.get(n), coef, mode=mode)
    return out


@pytest.mark.parametrize("K,seed,empty_every", [(1, 0, 0), (5, 1, 2), (9, 2, 3), (1000, 3, 7)])
@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_engine_equals_previous_engine_bit_for_bit(K, seed, empty_every, mode):
    if K == 1000 and mode == "overlap":
        pytest.skip("one K = 1,000 case is enough")
    weights, rows, cols, layout, bufs, coef = _case(K, seed, empty_every)
    out, stats = aggregate_packed(layout, list(weights.values()), bufs, coef, mode)
    expect = _per_tensor(weights, rows, cols, layout, bufs, coef, mode)
    got = packed_views(out, [tuple(w.shape) for w in weights.values()])
    for (n, e), g in zip(expect.items(), got):
        assert torch.equal(g, e), n
    with cahfp_ops.use_backend("torch"):
        ref_out, ref_stats = aggregate_packed(layout, list(weights.values()), bufs, coef, mode)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats[:, 0], ref_stats[:, 0])
    torch.testing.assert_close(stats[:, 1], ref_stats[:, 1], rtol=1e-5, atol=1e-9)  # float32 lanes


def test_cached_plan_equals_a_call_plan_and_zero_coefficient_is_absence():
    weights, rows, cols, layout, bufs, coef = _case(12, 4, 5)
    ws = list(weights.values())
    total = sum(w.numel() for w in ws)
    t = layout._device_tables(torch.device("cpu"))
    plan = layout._plan(torch.device("cpu"))
    assert plan >= 0 and layout._plan(torch.device("cpu")) == plan  # made once, kept
    results = []
    for p in (plan, -1):
        out, stats = torch.empty(total), torch.empty(12, 2, dtype=torch.float64)
        _operators.aggregate_packed_op(ws, bufs, [0] * 12, *t, coef / coef.sum(), "reconstruct", out, stats, p)
        results.append((out, stats))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # a client with coefficient 0 is the client left out, bit for bit
    zero = coef.clone()
    zero[3] = 0
    out0, _ = aggregate_packed(layout, ws, bufs, zero)
    keep = [k for k in range(12) if k != 3]
    out1, _ = aggregate_packed(layout.subset(keep), ws, [bufs[k] for k in keep], coef[keep])
    assert torch.equal(out0, out1)


def test_fold_in_windows_equals_one_fold_and_the_batch_statistics():
    weights, rows, cols, layout, bufs, coef = _case(10, 5, 4)
    ws = list(weights.values())
    sums = torch.zeros(sum(w.numel() for w in ws))
    cover = torch.zeros(layout._st.partial_sizes[1])
    s1, c1, st1 = fold_packed(layout, ws, bufs, coef, "reconstruct", sums, cover)
    s2, c2 = sums.clone(), cover.clone()
    stats = []
    for idx in ([0, 1, 2], [3], [4, 5, 6, 7, 8, 9]):
        s2, c2, st = fold_packed(layout.subset(idx), ws, [bufs[k] for k in idx], coef[idx], "reconstruct", s2, c2)
        stats.append(st)
    assert torch.equal(s1, s2) and torch.equal(c1, c2)
    assert torch.equal(st1[:, 0], torch.cat(stats)[:, 0])
    _, batch_stats = aggregate_packed(layout, ws, bufs, coef)
    assert torch.equal(st1, batch_stats)


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_window_plans_cut_from_the_round_plan_equal_plans_of_their_own_tables(mode):
    weights, rows, cols, layout, bufs, coef = _case(9, 8, 4)
    ws = list(weights.values())
    fresh = RoundLayout.from_keep_sets(weights, rows, cols, num_clients=9)  # same round, never planned
    fresh.names = layout.names
    assert layout._plan(torch.device("cpu")) >= 0
    results = []
    for lay in (layout, fresh):
        s = torch.randn(sum(w.numel() for w in ws), generator=torch.Generator().manual_seed(1))
        c = torch.rand(layout._st.partial_sizes[1], generator=torch.Generator().manual_seed(2))
        stats = []
        # out of order (client j of a window is any client: copied table rows) and consecutive
        # windows (views of the round's table rows)
        for idx in ([4, 0, 7], [8], [1, 2, 3], [5, 6]):
            window = lay.subset(idx)
            assert (window._parent[0]._plans != {}) == (lay is layout)
            shared = window._row_inv.untyped_storage().data_ptr() == lay._row_inv.untyped_storage().data_ptr()
            assert shared == (idx != [4, 0, 7])
            s, c, st = fold_packed(window, ws, [bufs[k] for k in idx], coef[idx], mode, s, c)
            stats.append(st)
        one = lay.client(5)  # one client, as streaming ``add`` folds it
        out, st = aggregate_packed(one, ws, [bufs[5]], coef[5:6], mode)
        results.append((s, c, torch.cat(stats), out, st))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="not a client"):
        cahfp_ops.cpp.plan_subset(layout._plan(torch.device("cpu")), [0, 9])
    with pytest.raises(RuntimeError, match="no layout plan"):
        cahfp_ops.cpp.plan_subset(10**9, [0])


def test_plans_that_do_not_fit_are_refused():
    weights, rows, cols, layout, bufs, coef = _case(4, 6)
    ws = list(weights.values())
    t = layout._device_tables(torch.device("cpu"))
    out, stats = torch.empty(sum(w.numel() for w in ws)), torch.empty(4, 2, dtype=torch.float64)
    other = _case(3, 7)[3]
    wrong = other._plan(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="client"):
        _operators.aggregate_packed_op(ws, bufs, [0] * 4, *t, coef / coef.sum(), "reconstruct", out, stats, wrong)
    with pytest.raises(RuntimeError, match="no layout plan"):
        _operators.aggregate_packed_op(ws, bufs, [0] * 4, *t, coef / coef.sum(), "reconstruct", out, stats, 10**9)
    short = [b[:-1] if k == 2 else b for k, b in enumerate(bufs)]  # a buffer too short for the plan
    plan = layout._plan(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="too few"):
        _operators.aggregate_packed_op(ws, short, [0] * 4, *t, coef / coef.sum(), "reconstruct", out, stats, plan)
    cahfp_ops.cpp.release_layout_plan(plan)
    with pytest.raises(RuntimeError, match="no layout plan"):
        _operators.aggregate_packed_op(ws, bufs, [0] * 4, *t, coef / coef.sum(), "reconstruct", out, stats, plan)


# Rows of 128 columns and more with T > 1 (csrc/cpu/packed_engine.h, kInterleave): random keep
# sets (runs of about two columns) take the interleaved scratch and the walk column by column;
# prefix keep sets (one run per row) the walk run by run; a 5x5 convolution the generic tap
# count; a 1-D tensor T = 1.
WIDE_SHAPES = [("wide3x3", (20, 130, 3, 3)), ("prefix3x3", (9, 140, 3, 3)), ("wide5x5", (5, 129, 5, 5)), ("bn", (20,))]


def _wide_case(K, seed, dtype=torch.float32):
    return _case(K, seed, shapes=WIDE_SHAPES, dtype=dtype, fracs=(0.2, 0.6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("K", [1, 6])
def test_wide_rows_equal_the_previous_engine_bit_for_bit(K, mode, dtype):
    weights, rows, cols, layout, bufs, coef = _wide_case(K, 10 + K, dtype)
    ws = list(weights.values())
    out, stats = aggregate_packed(layout, ws, bufs, coef, mode)
    expect = _per_tensor(weights, rows, cols, layout, bufs, coef, mode)
    for (n, e), g in zip(expect.items(), packed_views(out, [tuple(w.shape) for w in ws])):
        assert torch.equal(g, e), n
    with cahfp_ops.use_backend("torch"):
        _, ref_stats = aggregate_packed(layout, ws, bufs, coef, mode)
    assert torch.equal(stats[:, 0], ref_stats[:, 0])
    torch.testing.assert_close(stats[:, 1], ref_stats[:, 1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_wide_rows_fold_windows_finish_and_one_client_equal_the_batch_call(mode):
    """Folds in windows (through the interleaved scratch too), their finish and one-client
    calls give the batch call's result and every client's statistics bit for bit."""
    K = 12
    weights, rows, cols, layout, bufs, _ = _wide_case(K, 20)
    ws = list(weights.values())
    # sums to 1 exactly: aggregate_packed's normalisation changes no coefficient
    coef = torch.tensor([2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64) / 16
    out, stats = aggregate_packed(layout, ws, bufs, coef, mode)
    s, c, st = fold_packed(layout, ws, bufs, coef, mode, None, None)
    s2 = c2 = None
    window_stats = []
    # windows of fewer than 8 clients fold in place, of 8 and more through the scratch
    for idx in ([0, 1], list(range(2, 11)), [11]):
        s2, c2, w_st = fold_packed(layout.subset(idx), ws, [bufs[k] for k in idx], coef[idx], mode, s2, c2)
        window_stats.append(w_st)
    assert torch.equal(s, s2) and torch.equal(c, c2)
    assert torch.equal(st, stats) and torch.equal(torch.cat(window_stats), stats)
    if mode == "reconstruct":
        assert torch.equal(cahfp_ops.finish_partials(ws, s, c, 1.0, mode), out)
    for k in (0, 4):  # a client folded on its own (streaming ``add``): plan of its own tables
        fresh = RoundLayout.from_keep_sets(weights, {n: [v[k]] for n, v in rows.items()},
                                           {n: [v[k]] for n, v in cols.items()}, num_clients=1)  # fmt: skip
        fresh.names = layout.names
        _, one = aggregate_packed(fresh, ws, [bufs[k]], coef[k : k + 1], mode)
        assert torch.equal(one[0], stats[k])


def test_wide_rows_zero_coefficient_huge_and_nonfinite_deltas():
    K = 5
    weights, rows, cols, layout, bufs, coef = _wide_case(K, 30)
    ws = list(weights.values())
    zero = coef.clone()
    zero[2] = 0
    keep = [0, 1, 3, 4]
    out0, _ = aggregate_packed(layout, ws, bufs, zero)
    out1, _ = aggregate_packed(layout.subset(keep), ws, [bufs[k] for k in keep], coef[keep])
    assert torch.equal(out0, out1)
    huge = [b.clone() for b in bufs]
    huge[1][:9] = 3e30  # wide3x3 comes first: finite, its square is not in float32
    huge[3][-1] = float("nan")
    _, stats = aggregate_packed(layout, ws, huge, coef)
    assert stats[:, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert 9 * 9e60 * 0.99 < float(stats[1, 1]) < float("inf")


def _separate_case(seed=40, K=4):
    """Tensors whose columns are dim 1 (a conv), a later dim (dims 2 and 3) and none (1-D),
    each client's tensors in its packed buffer and as separate tensors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5, 3, 3), (4, 2, 7, 3), (3, 2, 2, 5), (6,)]
    rows = [(0, 1), None, None, (0, 1)]
    cols = [(1, 1), (2, 1, 0, 1, 2), (1, 1, 0, 1, 3), None]
    sizes = [6, 5, 7]
    keeps = [[torch.tensor(_keep(gen, size, 0.6), dtype=torch.int64) for _ in range(K)] for size in sizes]
    keeps[2][-1] = torch.zeros(0, dtype=torch.int64)  # keeps nothing of a later-dim group
    layout = RoundLayout.from_groups(shapes, rows, cols, sizes, keeps, K)
    weights = [torch.randn(s, generator=gen) for s in shapes]
    separate = [[torch.randn(s, generator=gen) for s in layout.compact_shapes(k)] for k in range(K)]
    bufs = [torch.cat([t.reshape(-1) for t in sep]) for sep in separate]
    coef = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    return layout, weights, separate, bufs, coef


@pytest.mark.parametrize("validate", [True, False])
def test_separate_tensors_on_any_column_dim_equal_packed_buffers(validate):
    """Separate client tensors (contiguous or not; columns on dim 1 or a later dim) give what
    the packed buffers give, bit for bit."""
    layout, weights, separate, bufs, coef = _separate_case()
    strided = [[t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() > 1 else t for t in sep]
               for sep in separate]  # fmt: skip
    with cahfp_ops.validation(validate):
        want = aggregate_packed(layout, weights, bufs, coef)
        for form in (separate, strided):
            got = aggregate_packed(layout, weights, form, coef)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "bad",
    [
        lambda t: torch.randn(t.shape[0] + 1, *t.shape[1:]),  # more rows than kept: enough elements
        lambda t: torch.randn(t.numel()).reshape(t.shape[0], -1),  # the right elements, flattened
        lambda t: torch.randn(*t.shape, 1),  # the right elements, one more dim
    ],
)
def test_separate_tensors_must_have_exactly_their_compact_shape(bad):
    """The kernel takes a separate client tensor only in exactly its compact shape, checks on or
    off; reconstruct_aggregate_many (which leaves those checks to the kernel) words the error
    with the tensor's name."""
    layout, weights, separate, bufs, coef = _separate_case()
    for n in (0, 1):  # columns on dim 1, on dim 2
        broken = [list(sep) for sep in separate]
        broken[2][n] = bad(separate[2][n])
        with cahfp_ops.validation(False), pytest.raises(RuntimeError, match="compact shape"):
            aggregate_packed(layout, weights, broken, coef)
    sd = {"conv": torch.randn(6, 5, 3, 3), "bn": torch.randn(6)}
    keep = [torch.tensor([0, 2, 3]), torch.tensor([1])]
    rows, cols = {"conv": keep, "bn": keep}, {"conv": [None, torch.tensor([0, 4])]}
    clients = [dict(c) for c in cahfp_ops.slice_channels_many(sd, rows, cols)]
    clients[1]["conv"] = bad(clients[1]["conv"])
    before = [t.clone() for t in sd.values()]
    with pytest.raises(ValueError, match=r"clients\[1\] for 'conv' has shape"):
        cahfp_ops.reconstruct_aggregate_many(sd, clients, rows, cols)
    assert all(torch.equal(a, b) for a, b in zip(before, sd.values()))


def test_streaming_aggregator_on_a_layout_with_later_column_dims():
    """StreamingAggregator lays its partial sums out as its first layout lays out the columns
    (a later dim: that tensor's view): one by one and in windows it gives the same partial sums
    bit for bit, and the batch call's result within rounding; a call laying a tensor's
    columns out otherwise afterwards (keep sets: dim 1) is refused, nothing changed."""
    from cahfp_ops.fl import StreamingAggregator
    from cahfp_ops.layout import PackedModel

    layout, weights, _, bufs, coef = _separate_case()
    K = layout.num_clients
    names = [f"t{n}" for n in range(len(weights))]
    layout.names = tuple(names)
    model = dict(zip(names, weights))
    ws = [float(c) for c in coef]
    want, _ = aggregate_packed(layout, weights, bufs, coef)
    one, many = StreamingAggregator(model), StreamingAggregator(model, workspace=cahfp_ops.Workspace())
    assert all(one.add(PackedModel(bufs[k], layout, k), weight=ws[k], layout=layout, client=k).accepted
               for k in range(K))  # fmt: skip
    for idx in ([0, 1, 2], [3]):
        many.add_many([PackedModel(bufs[k], layout, k) for k in idx], [ws[k] for k in idx], layout=layout, clients=idx)
    a, b = one.partials(), many.partials()
    assert a.views == b.views == {"t1": (8, 7, 3), "t2": (12, 5, 1)}
    handed = layout.later_column_views  # what the aggregator reads from the layout: a copy
    assert handed == {1: (8, 7, 3), 2: (12, 5, 1)}
    handed.clear()
    assert layout.later_column_views == {1: (8, 7, 3), 2: (12, 5, 1)}
    assert all(torch.equal(a.sums[n], b.sums[n]) and torch.equal(a.cover[n], b.cover[n]) for n in names)
    assert tuple(a.cover["t1"].shape) == (8, 7)
    got = one.result()
    torch.testing.assert_close(torch.cat([got[n].reshape(-1) for n in names]), want, rtol=1e-5, atol=1e-6)
    sums = {n: t.clone() for n, t in a.sums.items()}
    with pytest.raises(ValueError, match="'t1' with its columns on a later dim"):
        one.add({n: torch.randn(w.shape) for n, w in model.items()}, weight=1.0)
    assert all(torch.equal(sums[n], one.partials().sums[n]) for n in names)
    plain = StreamingAggregator(model)
    assert plain.add({n: torch.randn(w.shape) for n, w in model.items()}, weight=1.0).accepted
    with pytest.raises(ValueError, match="'t1' with its columns on dim 1"):
        plain.add(PackedModel(bufs[0], layout, 0), weight=1.0, layout=layout, client=0)
    with pytest.raises(ValueError, match="columns differently"):
        plain.merge(one)
