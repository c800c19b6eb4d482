"""The per-round layout: packed slicing, aggregation with fused reply statistics, streaming
accumulation; each against the per-tensor ops and the reference, on every backend."""

import math

import pytest
import torch

import cahfp_ops
from cahfp_ops import PackedModel, RoundLayout, accumulate_packed, aggregate_packed, finish_partials, fold_packed
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



def _partial_sums(gen, model, dtype=torch.float32):
    """Random (not zero) running partial sums for ``model``: ``(sums, cover)``."""
    weights = list(model.values())
    total = sum(w.numel() for w in weights)
    cover_n = sum(w.shape[0] if w.dim() == 1 else w.shape[0] * w.shape[1] for w in weights)
    return torch.randn(total, generator=gen, dtype=dtype), torch.rand(cover_n, generator=gen, dtype=dtype)


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize(
    ("dtype", "form", "K"),
    [(torch.float32, "packed", 1), (torch.float32, "separate", 5), (torch.float32, "mixed", 5),
     (torch.float64, "packed", 5), (torch.float16, "separate", 1), (torch.bfloat16, "mixed", 5)],
)  # every form, every dtype, K = 1 and more  # fmt: skip
def test_fold_packed_equals_accumulate_calls_bit_for_bit(backend, gen, mode, form, K, dtype):
    """K clients folded in one pass give, bit for bit, the partial sums of K one-client
    accumulations in order (same backend), and the reply statistics of aggregate_packed;
    the inputs stay untouched and a coefficient of 0 adds nothing (even for a NaN client)."""
    model, rows, cols, layout = _case(gen, K, dtype)
    clients = compact_models(gen, model, rows, cols, K)
    if K > 1:
        clients[1] = {n: torch.full_like(t, float("nan")) for n, t in clients[1].items()}
    weights = list(model.values())
    packed = [torch.cat([c[n].reshape(-1) for n in model]) for c in clients]
    data = {
        "packed": packed,
        "separate": [list(c.values()) for c in clients],
        "mixed": [packed[0], *[list(c.values()) for c in clients[1:]]],
    }[form]
    coef = torch.rand(K, generator=gen, dtype=torch.float64) + 0.25
    if K > 1:
        coef[1] = 0.0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sums, cover = _partial_sums(gen, model, acc)
    before = (sums.clone(), cover.clone())
    with poison_outputs():
        s_out, c_out, stats = fold_packed(layout, weights, data, coef, mode, sums, cover)
    assert torch.equal(sums, before[0]) and torch.equal(cover, before[1])
    one_s, one_c = sums.clone(), cover.clone()
    for k in range(K):
        if coef[k] > 0:
            accumulate_packed(layout.client(k), weights, list(clients[k].values()), float(coef[k]), mode, one_s, one_c)
    assert torch.equal(s_out, one_s) and torch.equal(c_out, one_c)
    assert bool(torch.isfinite(s_out).all())
    # from zeros (no input sums): what folding into zeroed buffers gives, bit for bit
    with poison_outputs():
        z_s, z_c, z_stats = fold_packed(layout, weights, data, coef, mode, None, None)
    zero_s, zero_c, _ = fold_packed(layout, weights, data, coef, mode, torch.zeros_like(sums), torch.zeros_like(cover))
    assert torch.equal(z_s, zero_s) and torch.equal(z_c, zero_c)
    torch.testing.assert_close(z_stats, stats, rtol=0, atol=0, equal_nan=True)
    _, agg_stats = aggregate_packed(layout, weights, data, torch.full((K,), 1 / K, dtype=torch.float64), mode)
    torch.testing.assert_close(stats, agg_stats, rtol=0, atol=0, equal_nan=True)  # the NaN client's sum is NaN
    if K > 1:
        assert stats[1, 0] == 1 and stats[0, 0] == 0
    with cahfp_ops.use_backend("torch"):
        ref_s, ref_c, ref_stats = fold_packed(layout, weights, data, coef, mode, sums, cover)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(s_out, ref_s, rtol=tol, atol=tol)
    torch.testing.assert_close(c_out, ref_c, rtol=1e-6, atol=1e-6)
    assert torch.equal(stats[:, 0], ref_stats[:, 0])
    torch.testing.assert_close(stats[:, 1], ref_stats[:, 1], rtol=1e-5, atol=1e-3, equal_nan=True)


def test_fold_packed_in_place_and_bad_input(backend, gen):
    K = 3
    model, rows, cols, layout = _case(gen, K)
    clients = [list(c.values()) for c in compact_models(gen, model, rows, cols, K)]
    weights = list(model.values())
    coef = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    sums, cover = _partial_sums(gen, model)
    expected = fold_packed(layout, weights, clients, coef, "reconstruct", sums, cover)
    s, c = sums.clone(), cover.clone()
    out = fold_packed(layout, weights, clients, coef, "reconstruct", s, c, out=(s, c))
    assert out[0] is s and torch.equal(s, expected[0]) and torch.equal(c, expected[1])
    for bad, match in [
        (dict(sums=sums[:-1]), "sums must be a contiguous"),
        (dict(cover=cover.double()), "cover must be a contiguous"),
        (dict(coef=-coef), r"coef\[0\] = -0.5 is negative or not finite"),
        (dict(coef=coef[:2]), "coef must hold 3 values"),
        (dict(clients=clients[:2]), "2 clients for a layout of 3"),
        (dict(mode="median"), "mode must be"),
        (dict(out=(sums.clone(), cover[:-1].clone())), "cover_out must be"),
    ]:
        kw = dict(clients=clients, coef=coef, mode="reconstruct", sums=sums, cover=cover) | bad
        out_arg = kw.pop("out", None)
        keep = (sums.clone(), cover.clone())
        with pytest.raises(ValueError, match=match):
            fold_packed(layout, weights, kw["clients"], kw["coef"], kw["mode"], kw["sums"], kw["cover"], out=out_arg)
        assert torch.equal(sums, keep[0]) and torch.equal(cover, keep[1])
    with pytest.raises(TypeError, match="pass sums and cover together"):
        fold_packed(layout, weights, clients, coef, "reconstruct", None, cover)
    with pytest.raises(ValueError, match="sums must be a contiguous"):
        accumulate_packed(layout.client(0), weights, clients[0], 1.0, "reconstruct", sums[:-1], cover)
    if backend == "cpp":  # the compiled kernel checks for itself when validation is off
        with cahfp_ops.validation(False), pytest.raises(RuntimeError, match="coef must be finite and >= 0"):
            fold_packed(layout, weights, clients, -coef, "reconstruct", sums, cover)


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_finish_partials_matches_reference_and_keeps_uncovered_bits(backend, gen, mode, dtype):
    """Covered elements get the mean; uncovered ones (cover 0, including -0.0 and NaN
    weights) are the global's bits; every output element is written (poisoned outputs)."""
    model = random_model(gen, dtype)
    weights = list(model.values())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sums, cover = _partial_sums(gen, model, acc)
    cover[torch.rand(cover.shape, generator=gen) < 0.4] = 0.0
    weights[0].view(-1)[:3] = torch.tensor([-0.0, float("nan"), 1.5]).to(dtype)
    cover[0] = 0.0  # conv1.weight row 0, column 0: the three values above stay as they are
    with poison_outputs():
        out = finish_partials(weights, sums, cover, 2.5, mode)
    with cahfp_ops.use_backend("torch"):
        ref = finish_partials(weights, sums, cover, 2.5, mode)
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol, equal_nan=True)
    flat_w = torch.cat([w.reshape(-1) for w in weights])
    at = coff = 0
    for w in weights:
        R, Cin = (1, w.shape[0]) if w.dim() == 1 else w.shape[:2]
        T = w.numel() // (R * Cin)
        unc = (cover[coff : coff + R * Cin] == 0).repeat_interleave(T)
        a = out[at : at + w.numel()][unc].view(torch.int16 if w.element_size() == 2 else torch.int32
                                                  if w.element_size() == 4 else torch.int64)  # fmt: skip
        b = flat_w[at : at + w.numel()][unc].view(a.dtype)
        assert torch.equal(a, b)
        at, coff = at + w.numel(), coff + R * Cin
    assert torch.isfinite(out[~torch.isnan(flat_w)]).all()


def test_finish_partials_bad_input_names_the_argument(backend, gen):
    model = random_model(gen)
    weights = list(model.values())
    sums, cover = _partial_sums(gen, model)
    for kw, match in [
        (dict(sums=sums[:-1]), "sums must be"),
        (dict(cover=cover.double()), "cover must be"),
        (dict(weight_sum=float("nan")), "weight_sum must be"),
        (dict(weight_sum=-1.0), "weight_sum must be"),
        (dict(mode="mean"), "mode must be"),
        (dict(out=torch.empty(3)), "out must be"),
    ]:
        args = dict(sums=sums, cover=cover, weight_sum=1.0, mode="reconstruct", out=None) | kw
        with pytest.raises(ValueError, match=match):
            finish_partials(weights, args["sums"], args["cover"], args["weight_sum"], args["mode"], out=args["out"])
    other = RoundLayout.from_keep_sets(model, None, None, num_clients=1)
    with pytest.raises(TypeError, match="finish_partials: layout must be a RoundLayout"):
        finish_partials(weights, sums, cover, 1.0, "reconstruct", layout="not a layout")
    with pytest.raises(ValueError, match="finish_partials: 2 weights for a layout of"):
        finish_partials(weights[:2], sums, cover, 1.0, "reconstruct", layout=other)
    want = finish_partials(weights, sums, cover, 1.0, "reconstruct")
    assert torch.equal(finish_partials(weights, sums, cover, 1.0, "reconstruct", layout=other), want)


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

    sums, cover = _partial_sums(gen, model)
    s_out, c_out = torch.empty_like(sums), torch.empty_like(cover)
    torch.library.opcheck(
        torch.ops.cahfp.fold_packed, (*args, coef, "overlap", sums, cover, s_out, c_out, stats)
    )
    torch.library.opcheck(  # from zeros
        torch.ops.cahfp.fold_packed, (*args, coef, "overlap", None, None, s_out, c_out, stats)
    )
    one = layout.client(1).tables()
    st3 = torch.empty(3, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.cahfp.accumulate_packed,
        (weights, list(clients[1].values()), [len(model)], one["meta"], one["row_inv"], one["col_keep"],
         one["counts"], one["offsets"], 0.5, math.inf, "reconstruct", sums.clone(), cover.clone(), st3),
    )  # fmt: skip

    torch.library.opcheck(
        torch.ops.cahfp.finish_partials, (weights, sums, cover, 1.5, "overlap", torch.empty_like(res))
    )

    def fold_fn(ws, cl, s_in, c_in):
        so, co = torch.empty_like(s_in), torch.empty_like(c_in)
        st = torch.empty(K, 2, dtype=torch.float64)
        torch.ops.cahfp.fold_packed(ws, cl, [len(model)] * K, *args[3:], coef, "reconstruct", s_in, c_in, so, co, st)
        return so, co, st

    def fold_and_finish(ws, cl, s_in, c_in):
        so, co, st = fold_fn(ws, cl, s_in, c_in)
        o = torch.empty(sum(w.numel() for w in ws))
        torch.ops.cahfp.finish_partials(ws, so, co, 2.0, "reconstruct", o)
        return so, co, st, o

    eager = fold_and_finish(weights, flat, sums, cover)
    compiled = torch.compile(fold_and_finish, fullgraph=True, backend="aot_eager")(weights, flat, sums, cover)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_layout_ops_deterministic_across_threads(gen):
    K = 6
    model, rows, cols, layout = _case(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    coef = torch.full((K,), 1 / K, dtype=torch.float64)
    sums, cover = _partial_sums(gen, model)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            data = [list(c.values()) for c in clients]
            results.append(aggregate_packed(layout, list(model.values()), data, coef)
                           + fold_packed(layout, list(model.values()), data, coef, "reconstruct", sums, cover))
    finally:
        torch.set_num_threads(threads)
    for res in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(res, results[0]))


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
            weights, clients, [0] * K, t["meta"], t["row_inv"], bad_keep, t["counts"], t["offsets"], coef,
            "reconstruct", out, stats,
        )  # fmt: skip
    with cahfp_ops.use_backend("cpp"), pytest.raises(RuntimeError, match="too few"):
        short = [clients[0][:-1] if clients[0].numel() else clients[0], clients[1][: max(0, clients[1].numel() - 1)]]
        torch.ops.cahfp.aggregate_packed(
            weights, short, [0] * K, t["meta"], t["row_inv"], t["col_keep"], t["counts"], t["offsets"], coef,
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
            weights, [c[1] for c in clients], [0] * K, scrambled["meta"], scrambled["row_inv"],
            scrambled["col_keep"], scrambled["counts"], scrambled["offsets"],
            torch.full((K,), 1 / K, dtype=torch.float64), "reconstruct", agg, stats,
        )  # fmt: skip
        sums, cover = _partial_sums(gen, model)
        fold_whole, fold_s = guarded(torch.zeros(sums.numel()))
        cov_whole, fold_c = guarded(torch.zeros(cover.numel()))
        torch.ops.cahfp.fold_packed(
            weights, [c[1] for c in clients], [0] * K, scrambled["meta"], scrambled["row_inv"],
            scrambled["col_keep"], scrambled["counts"], scrambled["offsets"],
            torch.full((K,), 0.5, dtype=torch.float64), "reconstruct", sums, cover, fold_s, fold_c,
            torch.zeros(K, 2, dtype=torch.float64),
        )  # fmt: skip
    assert torch.isnan(out_whole[:guard]).all() and torch.isnan(out_whole[-guard:]).all()
    assert torch.isnan(agg_whole[:guard]).all() and torch.isnan(agg_whole[-guard:]).all()
    for whole in (fold_whole, cov_whole):
        assert torch.isnan(whole[:guard]).all() and torch.isnan(whole[-guard:]).all()
    assert torch.isfinite(fold_s).all() and torch.isfinite(fold_c).all()
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
    # The same objects again (their form was checked when first seen): the same layout. One
    # of them changed in place through numpy (no version bump): the contents decide.
    assert RoundLayout.from_keep_sets(model, rows, cols) is first
    keep = rows["a.weight"][2]  # 3 of the 7 rows
    keep.numpy()[:] = [4, 5, 6] if keep.tolist() != [4, 5, 6] else [0, 1, 2]
    moved = RoundLayout.from_keep_sets(model, rows, cols)
    assert moved is not first
    assert torch.equal(PackedModel(moved.slice(list(model.values()))[2], moved, 2)["a.bias"], model["a.bias"][keep])


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


def test_tables_handed_out_are_copies_and_host_tables_read_only(gen):
    """Editing what ``tables()``, ``row_inv`` or ``col_inv`` return changes nothing for this
    layout or a later one of the same shapes (the cached tables stay the layout's own); the
    numpy tables raise on an in-place edit."""
    model, rows, cols, layout = _case(gen, 3)
    weights = list(model.values())
    before = layout.slice(weights)
    for table in layout.tables().values():
        table.fill_(-(2**30))
    layout.row_inv.fill_(-7)
    layout.col_inv.fill_(-7)
    again = RoundLayout.from_keep_sets(model, rows, cols)  # the same shapes: cached tables
    for lay in (layout, again):
        assert all(torch.equal(a, b) for a, b in zip(lay.slice(weights), before))
    for arr in (layout.counts_host, layout.offsets_host, layout.sizes_host, layout.numels,
                layout.client(1).counts_host, layout.subset([0, 2]).offsets_host):  # fmt: skip
        with pytest.raises(ValueError, match="read-only"):
            arr[(0,) * arr.ndim] = 1


def test_workspace_views_are_kept_with_their_buffer_and_bad_shapes_refused():
    """Workspace.get_views: views of the shapes laid end to end in the role's buffer, the same
    view objects while the buffer is kept, new ones once get() replaces it; bad input refused
    before anything is allocated."""
    ws = cahfp_ops.Workspace()
    cpu = torch.device("cpu")
    shapes = [(3, 5, 3, 3), (7,), (1,), (0, 4)]
    flat, views = ws.get_views("sums", shapes, torch.float32, cpu)
    assert flat.shape == (3 * 5 * 9 + 7 + 1,) and [tuple(v.shape) for v in views] == shapes
    flat.copy_(torch.randn(flat.numel()))
    assert torch.equal(torch.cat([v.reshape(-1) for v in views]), flat)  # end to end, in order
    again_flat, again = ws.get_views("sums", [torch.Size(s) for s in shapes], torch.float32, cpu)
    assert again_flat.data_ptr() == flat.data_ptr() and all(a is b for a, b in zip(again, views))
    assert again is not views  # a new list: a caller's edits to it change nothing kept
    _, other = ws.get_views("sums", [(2, 2)], torch.float32, cpu)  # another set of views, same buffer
    assert other[0].data_ptr() == flat.data_ptr()
    ws.get("sums", 10_000, torch.float32, cpu)  # a larger buffer replaces the old one: views made anew
    new_flat, new = ws.get_views("sums", shapes, torch.float32, cpu)
    assert new_flat.data_ptr() != flat.data_ptr() and new[0].data_ptr() == new_flat.data_ptr()
    assert ws.get_views("none", [], torch.float64, cpu)[1] == []
    for bad, err in ((3, TypeError), ([(2, -1)], ValueError), ([(2.0, 1)], ValueError), ([(True,)], ValueError)):
        with pytest.raises(err, match="shapes"):
            ws.get_views("bad", bad, torch.float32, cpu)
    with pytest.raises(TypeError, match="role"):
        ws.get_views(1, shapes, torch.float32, cpu)
    assert "bad" not in ws._buffers
