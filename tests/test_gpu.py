"""Triton kernels on CUDA tensors (skipped without a GPU): against the C++ kernels on the
same data, bit-identical across runs, whole models, and a CUDA-graph-captured aggregation."""

import pytest
import torch

import cahfp_ops
from helpers import DTYPES, TOL, make_keeps, to_padded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _case(gen, R, Cin, tail, K, dtype):
    weight = torch.randn(R, Cin, *tail, generator=gen).to(dtype)
    rows = make_keeps(gen, R, K, "random")
    cols = make_keeps(gen, Cin, K, "mixed")
    clients = [
        torch.randn(r.numel(), Cin if c is None else c.numel(), *tail, generator=gen).to(dtype)
        for r, c in zip(rows, cols)
    ]
    return weight, clients, rows, cols


def _cuda(x):
    if isinstance(x, list):
        return [_cuda(t) for t in x]
    return None if x is None else x.cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("K", [1, 7, 100])
def test_aggregate_cuda_matches_cpu(gen, dtype, mode, K):
    weight, clients, rows, cols = _case(gen, 67, 45, (3, 3), K, dtype)
    coef = (torch.rand(K, generator=gen) + 0.1).tolist()
    with cahfp_ops.use_backend("cpp"):
        expected = cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols, coef, mode=mode)
    assert cahfp_ops.resolve_backend(torch.device("cuda")) == "triton"
    got = cahfp_ops.reconstruct_aggregate(_cuda(weight), _cuda(clients), _cuda(rows), _cuda(cols), coef, mode=mode)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.cpu().double(), expected.double(), rtol=rtol, atol=atol * 4)
    again = cahfp_ops.reconstruct_aggregate(_cuda(weight), _cuda(clients), _cuda(rows), _cuda(cols), coef, mode=mode)
    assert torch.equal(got.view(torch.uint8), again.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slice_topk_scores_cuda_match_cpu(gen, dtype):
    w = torch.randn(70, 33, 3, 3, generator=gen).to(dtype)
    rows = make_keeps(gen, 70, 9, "random")
    cols = make_keeps(gen, 33, 9, "mixed")
    with cahfp_ops.use_backend("cpp"):
        parts = cahfp_ops.slice_channels(w, rows, cols)
        g = torch.randn(4, *w.shape, generator=gen).to(dtype)
        s_cpu = cahfp_ops.curvature_scores(w, g, w.abs(), dim=1)
        m_cpu = cahfp_ops.topk_channel_masks(s_cpu, [1, 5, 17, 33])
    parts_gpu = cahfp_ops.slice_channels(w.cuda(), _cuda(rows), _cuda(cols))
    for a, b in zip(parts, parts_gpu):
        assert torch.equal(a, b.cpu())
    s_gpu = cahfp_ops.curvature_scores(w.cuda(), g.cuda(), w.abs().cuda(), dim=1)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-5, atol=1e-5)
    m_gpu = cahfp_ops.topk_channel_masks(s_cpu.cuda(), [1, 5, 17, 33])
    assert torch.equal(m_gpu[0].cpu(), m_cpu[0]) and torch.equal(m_gpu[1].cpu(), m_cpu[1])


def test_whole_model_cuda(gen):
    from helpers import compact_models, random_model, random_plan

    model = random_model(gen)
    rows, cols = random_plan(gen, 6)
    clients = compact_models(gen, model, rows, cols, 6)
    with cahfp_ops.use_backend("cpp"):
        expected = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols)
    to = {k: v.cuda() for k, v in model.items()}
    tc = [{k: v.cuda() for k, v in c.items()} for c in clients]
    tr = {k: _cuda(v) if isinstance(v, list) else v.cuda() for k, v in rows.items()}
    tcols = {k: _cuda(v) if isinstance(v, list) else v.cuda() for k, v in cols.items()}
    got = cahfp_ops.reconstruct_aggregate_many(to, tc, tr, tcols)
    for k in model:
        torch.testing.assert_close(got[k].cpu(), expected[k], rtol=2e-5, atol=2e-5)
    sliced = cahfp_ops.slice_channels_many(to, tr, tcols)
    back = cahfp_ops.reconstruct_aggregate_many(to, sliced, tr, tcols)
    for k in model:
        assert torch.equal(back[k], to[k])


def test_aggregate_captures_in_cuda_graph(gen):
    """Validation off, padded keep sets, stacked clients, tensor coef: no host sync, so the
    aggregation can be captured in a CUDA graph and replayed."""
    K, R, Cin = 8, 64, 32
    weight = torch.randn(R, Cin, 3, 3, generator=gen).cuda()
    rows = to_padded(make_keeps(gen, R, K, "random"), R).cuda()
    cols = to_padded(make_keeps(gen, Cin, K, "random"), Cin).cuda()
    stacked = torch.randn(K, rows.shape[1], cols.shape[1], 3, 3, generator=gen).cuda()
    coef = torch.rand(K, generator=gen).cuda() + 0.1
    with cahfp_ops.validation(False):
        eager = cahfp_ops.reconstruct_aggregate(weight, stacked, rows, cols, coef)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = cahfp_ops.reconstruct_aggregate(weight, stacked, rows, cols, coef)
    stacked.mul_(2.0)
    graph.replay()
    with cahfp_ops.validation(False):
        expected = cahfp_ops.reconstruct_aggregate(weight, stacked, rows, cols, coef)
    assert torch.equal(captured, expected) and not torch.equal(captured, eager)
