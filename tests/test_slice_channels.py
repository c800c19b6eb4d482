"""slice_channels against plain indexing, on every backend under test."""

import pytest
import torch

import cahfp_ops
from helpers import DTYPES, index_or_all, make_keeps, random_keep, to_padded

SHAPES = [(7,), (5, 3), (9, 6, 3, 3), (1, 1), (13, 7, 2)]


def expected_slice(weight, r, c):
    r = index_or_all(r, weight.shape[0])
    if weight.dim() == 1:
        return weight[r]
    return weight[r][:, index_or_all(c, weight.shape[1])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["random", "disjoint", "full", "mixed"])
@pytest.mark.parametrize("K", [1, 5])
def test_per_client_matches_indexing(backend, gen, dtype, shape, kind, K):
    weight = torch.randn(shape, generator=gen).to(dtype)
    before = weight.clone()
    rows = make_keeps(gen, shape[0], K, kind)
    cols = None if len(shape) == 1 else make_keeps(gen, shape[1], K, kind)
    parts = cahfp_ops.slice_channels(weight, rows, cols)
    assert isinstance(parts, list) and len(parts) == K
    for k, part in enumerate(parts):
        exp = expected_slice(weight, rows[k], None if cols is None else cols[k])
        assert part.shape == exp.shape and part.dtype == dtype and part.is_contiguous()
        assert torch.equal(part, exp)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("shape", SHAPES)
def test_single_keep_sets(backend, gen, shape):
    weight = torch.randn(shape, generator=gen)
    r = random_keep(gen, shape[0], min_keep=1)
    c = None if len(shape) == 1 else random_keep(gen, shape[1], min_keep=1)
    out = cahfp_ops.slice_channels(weight, r, c)
    assert torch.equal(out, expected_slice(weight, r, c)) and out.is_contiguous()
    full = cahfp_ops.slice_channels(weight)
    assert torch.equal(full, weight) and full.data_ptr() != weight.data_ptr()


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_padded_and_mixed_single(backend, gen, index_dtype):
    weight = torch.randn(10, 8, 3, generator=gen)
    rows = make_keeps(gen, 10, 4, "random")
    shared_cols = random_keep(gen, 8, min_keep=1).to(index_dtype)
    parts = cahfp_ops.slice_channels(weight, to_padded(rows, 10, index_dtype), shared_cols)
    for k in range(4):
        assert torch.equal(parts[k], expected_slice(weight, rows[k], shared_cols))
    # per-client cols only, rows None
    cols = make_keeps(gen, 8, 3, "random")
    parts = cahfp_ops.slice_channels(weight, None, cols)
    for k in range(3):
        assert torch.equal(parts[k], expected_slice(weight, None, cols[k]))


def test_parts_share_one_packed_buffer(backend, gen):
    weight = torch.randn(6, 5, generator=gen)
    parts = cahfp_ops.slice_channels(weight, [torch.tensor([0, 2]), torch.tensor([1, 3, 5])])
    assert parts[0].untyped_storage().data_ptr() == parts[1].untyped_storage().data_ptr()


def test_non_contiguous_weight(backend, gen):
    weight = torch.randn(8, 6, 4, generator=gen).transpose(0, 1)  # (6, 8, 4), not contiguous
    rows = make_keeps(gen, 6, 3, "random")
    cols = make_keeps(gen, 8, 3, "random")
    for k, part in enumerate(cahfp_ops.slice_channels(weight, rows, cols)):
        assert torch.equal(part, expected_slice(weight, rows[k], cols[k]))
