"""Bit-identical results whatever the thread count (C++ kernels use at::parallel_for)."""

import pytest
import torch

import cahfp_ops
from helpers import make_keeps


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_aggregate_bit_identical_across_threads(threads, gen, dtype, mode):
    weight = torch.randn(97, 45, 3, 3, generator=gen).to(dtype)
    K = 12
    rows = make_keeps(gen, 97, K, "random")
    cols = make_keeps(gen, 45, K, "random")
    clients = [torch.randn(r.numel(), c.numel(), 3, 3, generator=gen).to(dtype) for r, c in zip(rows, cols)]
    coef = torch.rand(K, generator=gen).tolist()
    results = []
    with cahfp_ops.use_backend("cpp"):
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            results.append(cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols, coef, mode=mode))
    for r in results[1:]:
        assert torch.equal(r.view(torch.uint8), results[0].view(torch.uint8))


def test_scores_slice_topk_bit_identical_across_threads(threads, gen):
    w = torch.randn(33, 70, 3, 3, generator=gen)
    g = torch.randn(4, *w.shape, generator=gen)
    h = torch.randn_like(w)
    rows = make_keeps(gen, 33, 6, "random")
    results = []
    with cahfp_ops.use_backend("cpp"):
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            s0 = cahfp_ops.curvature_scores(w, g, h, dim=0)
            s1 = cahfp_ops.curvature_scores(w, g, h, dim=1)
            m = cahfp_ops.topk_channel_masks(s1, [7, 20, 70, 1])
            parts = cahfp_ops.slice_channels(w, rows)
            results.append((s0, s1, m[0], m[1], torch.cat([p.flatten() for p in parts])))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_curvature_scores_of_mixed_dtypes_bit_identical_across_threads(threads, gen, backend_name):
    """float32 weight, non-contiguous float64 grad, float16 hess, long rows: every backend
    (the reference included) reduces in a fixed order whatever the thread count."""
    w = torch.randn(3, 50_001, generator=gen)
    g = torch.randn(2, 50_001, 3, generator=gen, dtype=torch.float64).transpose(1, 2)
    h = torch.randn(3, 50_001, generator=gen).half()
    results = []
    with cahfp_ops.use_backend(backend_name):
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append([cahfp_ops.curvature_scores(w, g, h, dim=d) for d in (0, 1)])
    for a, b in zip(*results):
        assert torch.equal(a, b)
