"""Robust reducers (SPEC, "Robust reducers"): reduce="median" | "trimmed_mean" against an exact
element-by-element reference in rational arithmetic, on ragged inputs, both modes, every
backend; equal weights against numpy.median / scipy.stats.trim_mean; ties, boundaries, the
NaN rule, infinities, untouched elements, the whole-model form, registration."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

import cahfp_ops
from helpers import make_keeps


def _exact(weight, clients, rows, cols, coef, mode, reduce, trim):
    """The SPEC's definition, element by element: float64 deltas, Fraction weights."""
    w3 = weight.double().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1)
    R, C, T = w3.shape
    out = w3.clone()
    keep = []
    for r, c, cl in zip(rows, cols, clients):
        r = list(range(R)) if r is None else r.tolist()
        c = list(range(C)) if c is None else c.tolist()
        keep.append((r, c, cl.double().reshape(len(r), len(c), T)))
    for i in range(R):
        for j in range(C):
            for t in range(T):
                w = float(w3[i, j, t])
                vals, any_keep = [], False
                for k, (r, c, cl) in enumerate(keep):
                    if not coef[k] > 0:
                        continue
                    if i in r and j in c:
                        any_keep = True
                        vals.append((float(cl[r.index(i), c.index(j), t]) - w, k, Fraction(coef[k])))
                    elif mode == "reconstruct":
                        vals.append((0.0, k, Fraction(coef[k])))
                if not any_keep:
                    continue
                if any(math.isnan(v) for v, _, _ in vals):
                    out[i, j, t] = math.nan
                    continue
                vals.sort(key=lambda x: (x[0], x[1]))
                W = sum(p for _, _, p in vals)
                if reduce == "median":
                    run = Fraction(0)
                    for n, (v, _, p) in enumerate(vals):
                        run += p
                        if 2 * run >= W:
                            res = v + (vals[n + 1][0] - v) / 2 if 2 * run == W else v
                            break
                else:
                    lo, hi = Fraction(trim) * W, W - Fraction(trim) * W
                    run, den = Fraction(0), Fraction(0)
                    parts = []
                    for v, _, p in vals:
                        share = min(run + p, hi) - max(run, lo)
                        run += p
                        if share > 0:
                            parts.append((v, share))
                            den += share
                    res = sum(float(s / den) * v for v, s in parts)
                out[i, j, t] = w + res
    return out.reshape(weight.shape)


def _case(gen, K, shape, integer_weights):
    w = torch.randn(*shape, generator=gen)
    R = shape[0]
    C = shape[1] if len(shape) > 1 else 1
    rows = make_keeps(gen, R, K, "random")
    cols = make_keeps(gen, C, K, "mixed") if len(shape) > 1 else [None] * K
    clients = []
    for r, c in zip(rows, cols):
        nr = R if r is None else len(r)
        nc = C if c is None else len(c)
        size = (nr, nc, *shape[2:]) if len(shape) > 1 else (nr,)
        clients.append(torch.randn(size, generator=gen))
    if integer_weights:
        coef = torch.randint(0, 5, (K,), generator=gen).double()
        coef[int(torch.randint(0, K, (1,), generator=gen))] = 3.0
    else:
        coef = torch.rand(K, generator=gen, dtype=torch.float64) + 0.05
    return w, clients, rows, cols, coef


@pytest.mark.parametrize("reduce", ["median", "trimmed_mean"])
@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("K, shape", [(1, (5, 3)), (4, (7, 5, 2)), (6, (9,)), (9, (4, 6, 3)), (3, (1, 1))])
@pytest.mark.parametrize("integer_weights", [True, False])
def test_against_the_exact_definition(backend, gen, reduce, mode, K, shape, integer_weights):
    w, clients, rows, cols, coef = _case(gen, K, shape, integer_weights)
    trim = 0.2
    if shape == (9,):  # a 1-D weight: the row keep sets are its channels
        cols = None
    out = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef, mode=mode, reduce=reduce, trim=trim)
    exact = _exact(w, clients, rows, [None] * K if cols is None else cols, coef.tolist(), mode, reduce, trim)
    torch.testing.assert_close(out.double(), exact, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("K", [7, 33, 40])
@pytest.mark.parametrize("integer_weights", [True, False])
def test_many_keepers_ties_and_zero_deltas(backend, gen, K, integer_weights):
    """Elements kept by up to K clients (past the 4-keeper weight tables and the 32-keeper bit
    masks of the C++ kernel), with values equal to the global one (zero deltas) and repeated
    values (ties across clients)."""
    w = torch.randn(5, 4, 3, generator=gen).round()
    rows = [None if k % 3 else torch.tensor([0, 2, 3]) for k in range(K)]
    cols = [None if k % 4 else torch.tensor([1, 3]) for k in range(K)]
    clients = []
    for r, c in zip(rows, cols):
        full = torch.randint(-2, 3, (5, 4, 3), generator=gen).float()  # few distinct values: ties, zeros
        full = torch.where(torch.rand(5, 4, 3, generator=gen) < 0.3, w, full)
        full = full if r is None else full[r]
        clients.append(full if c is None else full[:, c])
    coef = (
        torch.randint(0, 4, (K,), generator=gen).double()
        if integer_weights
        else torch.rand(K, generator=gen, dtype=torch.float64)
    )
    coef[0] = 2.0
    for mode in ("reconstruct", "overlap"):
        for reduce in ("median", "trimmed_mean"):
            out = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef, mode=mode, reduce=reduce, trim=0.15)
            exact = _exact(w, clients, rows, cols, coef.tolist(), mode, reduce, 0.15)
            torch.testing.assert_close(out.double(), exact, rtol=2e-6, atol=2e-6, msg=f"{mode} {reduce}")


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_dtypes(backend, gen, dtype, tol):
    w, clients, rows, cols, coef = _case(gen, 5, (6, 4, 3), True)
    w, clients = w.to(dtype), [c.to(dtype) for c in clients]
    for reduce in ("median", "trimmed_mean"):
        out = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef, reduce=reduce, trim=0.25)
        assert out.dtype == dtype
        exact = _exact(w, clients, rows, cols, coef.tolist(), "reconstruct", reduce, 0.25)
        torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("K", [1, 2, 5, 10])
def test_equal_weights_match_numpy_and_scipy(backend, gen, K):
    """Every client keeps everything: the per-element median is numpy.median (midpoints
    for even K), the trimmed mean scipy.stats.trim_mean where trim * K is an integer."""
    w = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    clients = [torch.randn(3, 4, 2, generator=gen, dtype=torch.float64) for _ in range(K)]
    values = torch.stack(clients).numpy()
    median = cahfp_ops.reconstruct_aggregate(w, clients, mode="overlap", reduce="median")
    np.testing.assert_allclose(median.numpy(), np.median(values, axis=0), rtol=1e-12, atol=1e-12)
    trim = 0.2 if K in (5, 10) else 0.0
    trimmed = cahfp_ops.reconstruct_aggregate(w, clients, reduce="trimmed_mean", trim=trim)
    np.testing.assert_allclose(trimmed.numpy(), stats.trim_mean(values, trim, axis=0), rtol=1e-12, atol=1e-12)


def test_ties_boundaries_nan_and_infinities(backend):
    w = torch.zeros(1, 6)
    clients = [
        torch.tensor([[1.0, 5.0, 2.0, float("nan"), -math.inf, math.inf]]),
        torch.tensor([[1.0, 7.0, 4.0, 1.0, 3.0, 3.0]]),
        torch.tensor([[1.0, 9.0, 2.0, 1.0, 3.0, 3.0]]),
        torch.tensor([[3.0, 1.0, 4.0, 1.0, 3.0, 3.0]]),
    ]
    med = cahfp_ops.reconstruct_aggregate(w, clients, coef=[1, 1, 1, 1], mode="overlap", reduce="median")
    assert med[0, :3].tolist() == [1.0, 6.0, 3.0]  # ties; the boundary gives midpoints
    assert math.isnan(med[0, 3]) and med[0, 4] == 3.0 and med[0, 5] == 3.0
    weighted = cahfp_ops.reconstruct_aggregate(w, clients, coef=[1, 1, 1, 3], mode="overlap", reduce="median")
    assert weighted[0, 1] == 3.0  # sorted 1 (weight 3), 5, 7, 9: cum 3 == W / 2 -> midpoint of 1 and 5
    trimmed = cahfp_ops.reconstruct_aggregate(w, clients, coef=[1, 1, 1, 1], reduce="trimmed_mean", trim=0.25)
    assert trimmed[0, 4] == 3.0 and trimmed[0, 5] == 3.0  # the infinities are cut, no 0 * inf


def test_unkept_elements_are_the_weight_bit_for_bit(backend, gen):
    w = torch.randn(6, 5, generator=gen)
    w[0, 0] = -0.0
    rows = [torch.tensor([1, 3]), torch.tensor([3, 4])]
    cols = [torch.tensor([1, 2]), torch.tensor([2])]
    clients = [torch.randn(2, 2, generator=gen), torch.randn(2, 1, generator=gen)]
    for reduce in ("median", "trimmed_mean"):
        for mode in ("reconstruct", "overlap"):
            out = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, reduce=reduce, mode=mode)
            untouched = torch.ones(6, 5, dtype=torch.bool)
            untouched[1, 1:3] = untouched[3, 1:3] = untouched[4, 2] = False
            assert torch.equal(out[untouched], w[untouched]) and torch.signbit(out[0, 0])


def test_zero_weight_clients_do_not_take_part(backend, gen):
    w, clients, rows, cols, _ = _case(gen, 4, (5, 4, 2), True)
    coef = torch.tensor([2.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    out = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef, reduce="median")
    sub = [0, 2, 3]
    alone = cahfp_ops.reconstruct_aggregate(
        w, [clients[k] for k in sub], [rows[k] for k in sub], [cols[k] for k in sub], coef[sub], reduce="median"
    )
    assert torch.equal(out, alone)


def test_trim_zero_is_the_weighted_mean(backend, gen):
    w, clients, rows, cols, coef = _case(gen, 5, (6, 5, 3), False)
    for mode in ("reconstruct", "overlap"):
        mean = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef, mode=mode)
        trimmed = cahfp_ops.reconstruct_aggregate(
            w, clients, rows, cols, coef, mode=mode, reduce="trimmed_mean", trim=0
        )
        torch.testing.assert_close(trimmed, mean, rtol=1e-5, atol=1e-6)


def test_huge_coefficients(backend, gen):
    w, clients, rows, cols, coef = _case(gen, 4, (5, 4), True)
    coef = coef.clamp(min=1)
    a = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef * 2.0**1000, reduce="trimmed_mean", trim=0.1)
    b = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef, reduce="trimmed_mean", trim=0.1)
    assert torch.equal(a, b)


def test_whole_model_equals_the_single_tensor_op(backend, gen):
    model = {"a": torch.randn(6, 4, 3, generator=gen), "b": torch.randn(6, generator=gen)}
    rows = {"a": make_keeps(gen, 6, 3, "random"), "b": make_keeps(gen, 6, 3, "random")}
    cols = {"a": make_keeps(gen, 4, 3, "mixed")}
    clients = []
    for k in range(3):
        ra, ca, rb = rows["a"][k], cols["a"][k], rows["b"][k]
        clients.append({
            "a": torch.randn(6 if ra is None else len(ra), 4 if ca is None else len(ca), 3, generator=gen),
            "b": torch.randn(6 if rb is None else len(rb), generator=gen),
        })  # fmt: skip
    out = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, [1, 2, 3], reduce="median")
    for name in model:
        single = cahfp_ops.reconstruct_aggregate(
            model[name], [c[name] for c in clients], rows[name], cols.get(name), [1, 2, 3], reduce="median"
        )
        assert torch.equal(out[name], single)


def test_deterministic_whatever_the_thread_count(gen):
    w, clients, rows, cols, coef = _case(gen, 7, (40, 30, 3), False)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef, reduce="trimmed_mean"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_bad_reduce_and_trim():
    w, c = torch.randn(3, 2), [torch.randn(3, 2)]
    with pytest.raises(ValueError, match="reduce must be one of"):
        cahfp_ops.reconstruct_aggregate(w, c, reduce="mode")
    with pytest.raises(ValueError, match="trim"):
        cahfp_ops.reconstruct_aggregate(w, c, reduce="trimmed_mean", trim=0.5)
    with pytest.raises(TypeError, match="trim"):
        cahfp_ops.reconstruct_aggregate(w, c, reduce="trimmed_mean", trim="0.1")
    with pytest.raises(ValueError, match="reduce"):
        cahfp_ops.reconstruct_aggregate_many([w], [c], reduce="max")


def test_registered_op_opcheck_and_compile(backend, gen):
    w, clients, rows, cols, coef = _case(gen, 3, (5, 4, 2), True)
    r = torch.nn.utils.rnn.pad_sequence([torch.arange(5) if x is None else x for x in rows], True, -1)
    c = torch.nn.utils.rnn.pad_sequence([torch.arange(4) if x is None else x for x in cols], True, -1)
    for reduce in ("median", "trimmed_mean"):
        torch.library.opcheck(torch.ops.cahfp.robust_aggregate, (w, clients, r, c, coef, "reconstruct", reduce, 0.1))
    with cahfp_ops.validation(False):
        eager = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef, reduce="median")
        compiled = torch.compile(
            lambda w_, cl: cahfp_ops.reconstruct_aggregate(w_, cl, rows, cols, coef, reduce="median"),
            fullgraph=True, backend="aot_eager",
        )(w, clients)  # fmt: skip
    assert torch.equal(eager, compiled)
