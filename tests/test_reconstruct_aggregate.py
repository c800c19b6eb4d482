"""reconstruct_aggregate against the dense oracle and the reference, on every backend under test."""

import pytest
import torch

import cahfp_ops
from helpers import DTYPES, assert_close, bench_module, make_keeps, oracle_aggregate, random_keep, to_padded

SHAPES = [(7,), (5, 3), (9, 6, 3, 3), (1, 1), (13, 7, 2), (3, 11, 1, 5)]


def compact_clients(g, weight, rows, cols, dtype=None):
    """Random compact tensors (not derived from weight: real updates differ everywhere)."""
    out = []
    for r, c in zip(rows, cols):
        nr = weight.shape[0] if r is None else r.numel()
        shape = (nr,) if weight.dim() == 1 else (nr, weight.shape[1] if c is None else c.numel(), *weight.shape[2:])
        out.append(torch.randn(shape, generator=g).to(dtype or weight.dtype))
    return out


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["random", "disjoint", "full", "mixed"])
@pytest.mark.parametrize("K", [1, 4])
def test_matches_oracle(backend, gen, mode, dtype, shape, kind, K):
    weight = torch.randn(shape, generator=gen).to(dtype)
    rows = make_keeps(gen, shape[0], K, kind)
    cols = None if len(shape) == 1 else make_keeps(gen, shape[1], K, kind)
    clients = compact_clients(gen, weight, rows, cols or [None] * K)
    coef = (torch.rand(K, generator=gen) + 0.1).tolist()
    before = [c.clone() for c in clients], weight.clone()
    out = cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols, coef, mode=mode)
    expected = oracle_aggregate(weight, clients, rows, cols, coef, mode)
    assert out.shape == weight.shape and out.dtype == dtype
    assert_close(out, expected, dtype, scale=4.0)
    # inputs untouched
    assert torch.equal(weight, before[1]) and all(torch.equal(a, b) for a, b in zip(clients, before[0]))


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_uncovered_elements_are_bit_identical(backend, gen, mode):
    weight = torch.randn(11, 9, 3, generator=gen)
    weight[0, 0, 0] = -0.0
    weight[1, 1, 1] = float("nan")
    rows = [torch.tensor([2, 5, 7]), torch.tensor([5, 8])]
    cols = [torch.tensor([1, 2]), torch.tensor([0, 2, 8])]
    clients = compact_clients(gen, weight, rows, cols)
    out = cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols, mode=mode)
    covered = torch.zeros(11, 9, dtype=torch.bool)
    for r, c in zip(rows, cols):
        covered[r.unsqueeze(1), c.unsqueeze(0)] = True
    bits_out = out.view(torch.int32)[~covered]
    bits_w = weight.view(torch.int32)[~covered]
    assert torch.equal(bits_out, bits_w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_slice_then_aggregate_returns_global(backend, gen, dtype, mode):
    weight = torch.randn(17, 10, 3, 3, generator=gen).to(dtype)
    K = 5
    rows = make_keeps(gen, 17, K, "random")
    cols = make_keeps(gen, 10, K, "mixed")
    parts = cahfp_ops.slice_channels(weight, rows, cols)
    out = cahfp_ops.reconstruct_aggregate(weight, parts, rows, cols, torch.rand(K, generator=gen) + 0.5, mode=mode)
    if mode == "reconstruct":
        assert torch.equal(out, weight)  # c - w == 0 exactly
    else:
        assert_close(out, weight, dtype)


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_padded_and_stacked_forms(backend, gen, mode, index_dtype):
    weight = torch.randn(9, 7, 2, generator=gen)
    K = 4
    rows = make_keeps(gen, 9, K, "random")
    cols = make_keeps(gen, 7, K, "mixed")
    clients = compact_clients(gen, weight, rows, cols)
    expected = cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols, mode=mode)
    # padded keep sets
    prow, pcol = to_padded(rows, 9, index_dtype), to_padded(cols, 7, index_dtype)
    assert torch.equal(cahfp_ops.reconstruct_aggregate(weight, clients, prow, pcol, mode=mode), expected)
    # stacked clients with a poisoned padding region
    mr, mc = prow.shape[1] + 1, pcol.shape[1] + 2
    stacked = torch.full((K, mr, mc, 2), float("nan"))
    for k, c in enumerate(clients):
        stacked[k, : c.shape[0], : c.shape[1]] = c
    assert torch.equal(cahfp_ops.reconstruct_aggregate(weight, stacked, prow, pcol, mode=mode), expected)
    # tensor coefficients give the same as the default equal weights
    coef = torch.full((K,), 3.0)
    assert torch.equal(cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols, coef, mode=mode), expected)


def test_stacked_1d(backend, gen):
    weight = torch.randn(10, generator=gen)
    rows = [random_keep(gen, 10, min_keep=1) for _ in range(3)]
    stacked = torch.full((3, 10), float("nan"))
    clients = []
    for k, r in enumerate(rows):
        c = torch.randn(r.numel(), generator=gen)
        stacked[k, : r.numel()] = c
        clients.append(c)
    expected = oracle_aggregate(weight, clients, rows, None, None, "reconstruct")
    assert_close(cahfp_ops.reconstruct_aggregate(weight, stacked, rows), expected, torch.float32)


@pytest.mark.parametrize("client_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_client_dtype_differs_from_global(backend, gen, client_dtype):
    weight = torch.randn(8, 6, 3, generator=gen)
    rows = make_keeps(gen, 8, 3, "random")
    cols = make_keeps(gen, 6, 3, "random")
    clients = compact_clients(gen, weight, rows, cols, dtype=client_dtype)
    out = cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols)
    assert out.dtype == torch.float32
    assert_close(out, oracle_aggregate(weight, clients, rows, cols, None, "reconstruct"), torch.float32)


def test_mixed_client_dtypes_cast_to_weight(backend, gen):
    weight = torch.randn(6, 4, generator=gen)
    rows = [torch.tensor([0, 3]), torch.tensor([1, 3, 5])]
    clients = [torch.randn(2, 4, generator=gen).half(), torch.randn(3, 4, generator=gen).double()]
    out = cahfp_ops.reconstruct_aggregate(weight, clients, rows)
    assert_close(out, oracle_aggregate(weight, clients, rows, None, None, "reconstruct"), torch.float32)


def test_zero_weight_client_is_ignored(backend, gen):
    weight = torch.randn(5, 4, generator=gen)
    rows = [torch.tensor([0, 1]), torch.tensor([1, 4])]
    clients = [torch.randn(2, 4, generator=gen), torch.full((2, 4), float("nan"))]
    for mode in ("reconstruct", "overlap"):
        out = cahfp_ops.reconstruct_aggregate(weight, clients, rows, coef=[1.0, 0.0], mode=mode)
        assert torch.isfinite(out).all()
        assert torch.equal(out[4], weight[4])


def test_nonfinite_client_values_propagate(backend, gen):
    weight = torch.randn(4, 3, generator=gen)
    clients = [torch.tensor([[float("inf"), 1.0, 2.0]])]
    out = cahfp_ops.reconstruct_aggregate(weight, clients, [torch.tensor([2])])
    assert torch.isinf(out[2, 0]) and torch.equal(out[:2], weight[:2])


def test_empty_keep_sets(backend, gen):
    weight = torch.randn(6, 5, generator=gen)
    rows = [torch.empty(0, dtype=torch.int64), torch.tensor([2])]
    cols = [torch.tensor([1]), torch.empty(0, dtype=torch.int64)]
    clients = [torch.randn(0, 1), torch.randn(1, 0)]
    for mode in ("reconstruct", "overlap"):
        assert torch.equal(cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols, mode=mode), weight)


def test_reference_peers_agree(gen):
    """The benchmark peers compute the same reconstruct aggregation."""
    weight = torch.randn(12, 8, 3, 3, generator=gen)
    rows = make_keeps(gen, 12, 5, "random")
    cols = make_keeps(gen, 8, 5, "mixed")
    clients = compact_clients(gen, weight, rows, cols)
    coef = [1.0, 2.0, 3.0, 0.5, 1.5]
    expected = oracle_aggregate(weight, clients, rows, cols, coef, "reconstruct")
    peers = bench_module("peers")
    assert_close(peers.naive_reconstruct_aggregate(weight, clients, rows, cols, coef), expected, torch.float32)
    assert_close(peers.indexadd_reconstruct_aggregate(weight, clients, rows, cols, coef), expected, torch.float32)
