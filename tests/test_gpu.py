"""Triton kernels on device tensors against the C++ kernels on the same data: every op, the
per-round layout ops, the robust reducers, whole models and a server round; bit-identical
across runs; CUDA-graph capture of an aggregation and of a validation-off round.

On CUDA (skipped without a GPU). ``CAHFP_GPU_TEST_DEVICE=cpu`` with ``TRITON_INTERPRET=1``
runs the same tests on CPU tensors through Triton's interpreter, with the Triton backend
named explicitly (``bench/gpu_suite.py --dry-run`` does, so that the suite's test step
cannot rot); the CUDA-graph tests need a GPU.
"""

import importlib.util
import os

import pytest
import torch

import cahfp_ops
from helpers import DTYPES, TOL, make_keeps, to_padded

DEVICE = torch.device(os.environ.get("CAHFP_GPU_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda" and torch.cuda.is_available()
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETED = INTERPRETED and importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not (ON_CUDA or INTERPRETED), reason="needs a CUDA GPU (or CAHFP_GPU_TEST_DEVICE=cpu "
                                "with TRITON_INTERPRET=1)")  # fmt: skip
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
# In the interpreter (the suite's dry run) fewer cases: the op suite already runs every dtype there.
CASE_DTYPES = DTYPES if ON_CUDA else [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _on_triton():
    """On CUDA tensors the dispatcher picks Triton; on CPU tensors it is named."""
    if ON_CUDA:
        yield
    else:
        with cahfp_ops.use_backend("triton"):
            yield


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
    """``x`` (a tensor, None, or a list or dict of them) on the device under test."""
    if isinstance(x, list):
        return [_cuda(t) for t in x]
    if isinstance(x, dict):
        return {k: _cuda(v) for k, v in x.items()}
    return None if x is None else x.to(DEVICE)


@pytest.mark.parametrize("dtype", CASE_DTYPES)
@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("K", [1, 7, 100] if ON_CUDA else [1, 7])  # K = 100: minutes in the interpreter
def test_aggregate_cuda_matches_cpu(gen, dtype, mode, K):
    weight, clients, rows, cols = _case(gen, 67, 45, (3, 3), K, dtype)
    coef = (torch.rand(K, generator=gen) + 0.1).tolist()
    with cahfp_ops.use_backend("cpp"):
        expected = cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols, coef, mode=mode)
    if ON_CUDA:
        assert cahfp_ops.resolve_backend(DEVICE) == "triton"
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
    parts_gpu = cahfp_ops.slice_channels(w.to(DEVICE), _cuda(rows), _cuda(cols))
    for a, b in zip(parts, parts_gpu):
        assert torch.equal(a, b.cpu())
    s_gpu = cahfp_ops.curvature_scores(w.to(DEVICE), g.to(DEVICE), w.abs().to(DEVICE), dim=1)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-5, atol=1e-5)
    m_gpu = cahfp_ops.topk_channel_masks(s_cpu.to(DEVICE), [1, 5, 17, 33])
    assert torch.equal(m_gpu[0].cpu(), m_cpu[0]) and torch.equal(m_gpu[1].cpu(), m_cpu[1])


def test_whole_model_cuda(gen):
    from helpers import compact_models, random_model, random_plan

    model = random_model(gen)
    rows, cols = random_plan(gen, 6)
    clients = compact_models(gen, model, rows, cols, 6)
    with cahfp_ops.use_backend("cpp"):
        expected = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols)
    to = {k: v.to(DEVICE) for k, v in model.items()}
    tc = [{k: v.to(DEVICE) for k, v in c.items()} for c in clients]
    tr = {k: _cuda(v) if isinstance(v, list) else v.to(DEVICE) for k, v in rows.items()}
    tcols = {k: _cuda(v) if isinstance(v, list) else v.to(DEVICE) for k, v in cols.items()}
    got = cahfp_ops.reconstruct_aggregate_many(to, tc, tr, tcols)
    for k in model:
        torch.testing.assert_close(got[k].cpu(), expected[k], rtol=2e-5, atol=2e-5)
    sliced = cahfp_ops.slice_channels_many(to, tr, tcols)
    back = cahfp_ops.reconstruct_aggregate_many(to, sliced, tr, tcols)
    for k in model:
        assert torch.equal(back[k], to[k])


@needs_cuda
def test_aggregate_captures_in_cuda_graph(gen):
    """Validation off, padded keep sets, stacked clients, tensor coef: no host sync, so the
    aggregation can be captured in a CUDA graph and replayed."""
    K, R, Cin = 8, 64, 32
    weight = torch.randn(R, Cin, 3, 3, generator=gen).to(DEVICE)
    rows = to_padded(make_keeps(gen, R, K, "random"), R).to(DEVICE)
    cols = to_padded(make_keeps(gen, Cin, K, "random"), Cin).to(DEVICE)
    stacked = torch.randn(K, rows.shape[1], cols.shape[1], 3, 3, generator=gen).to(DEVICE)
    coef = torch.rand(K, generator=gen).to(DEVICE) + 0.1
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


def _layout_case(gen, K, dtype=torch.float32):
    from helpers import compact_models, random_model, random_plan

    model = random_model(gen, dtype)
    rows, cols = random_plan(gen, K)
    layout = cahfp_ops.RoundLayout.from_keep_sets(model, rows, cols)
    clients = compact_models(gen, model, rows, cols, K)
    packed = [torch.cat([c[n].reshape(-1) for n in model]) for c in clients]
    return model, layout, clients, packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16] if ON_CUDA else CASE_DTYPES)
@pytest.mark.parametrize("K", [1, 6])
def test_layout_ops_match_cpu_bit_for_bit_where_exact(gen, dtype, K):
    """slice_packed (bit-exact), aggregate_packed with its reply statistics, fold_packed,
    accumulate_packed and finish_partials on the device against C++ on the same data; the
    device results are bit-identical from one run to the next."""
    model, layout, clients, packed = _layout_case(gen, K, dtype)
    weights = list(model.values())
    coef = torch.rand(K, generator=gen, dtype=torch.float64) + 0.2
    coef /= coef.sum()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    total = sum(w.numel() for w in weights)
    cover_n = sum(w.shape[0] if w.dim() == 1 else w.shape[0] * w.shape[1] for w in weights)
    sums, cover = torch.randn(total, generator=gen, dtype=acc), torch.rand(cover_n, generator=gen, dtype=acc)
    with cahfp_ops.use_backend("cpp"):
        want_slice = layout.slice(weights)
        want_out, want_stats = cahfp_ops.aggregate_packed(layout, weights, packed, coef)
        want_fold = cahfp_ops.fold_packed(layout, weights, packed, coef * 3, "overlap", sums, cover)
        s1, c1 = sums.clone(), cover.clone()
        cahfp_ops.accumulate_packed(layout.client(0), weights, packed[0], 2.0, "reconstruct", s1, c1)
        want_finish = cahfp_ops.finish_partials(weights, s1, c1, 2.0, "reconstruct")
    w_d, p_d = _cuda(weights), _cuda(packed)
    got_slice = layout.slice(w_d)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(want_slice, got_slice))
    rtol, atol = TOL[dtype]
    runs = [cahfp_ops.aggregate_packed(layout, w_d, p_d, coef.to(DEVICE)) for _ in range(2)]
    assert torch.equal(runs[0][0].view(torch.uint8), runs[1][0].view(torch.uint8))
    torch.testing.assert_close(runs[0][0].cpu().double(), want_out.double(), rtol=rtol, atol=atol * 4)
    assert torch.equal(runs[0][1][:, 0].cpu(), want_stats[:, 0])
    torch.testing.assert_close(runs[0][1][:, 1].cpu(), want_stats[:, 1], rtol=1e-4, atol=1e-6)
    got_fold = cahfp_ops.fold_packed(layout, w_d, p_d, (coef * 3).to(DEVICE), "overlap", _cuda(sums), _cuda(cover))
    for a, b in zip(got_fold[:2], want_fold[:2]):
        torch.testing.assert_close(a.cpu().double(), b.double(), rtol=rtol, atol=atol * 8)
    s_d, c_d = _cuda(sums), _cuda(cover)
    cahfp_ops.accumulate_packed(layout.client(0), w_d, p_d[0], 2.0, "reconstruct", s_d, c_d)
    torch.testing.assert_close(s_d.cpu(), s1, rtol=rtol, atol=atol * 4)
    got_finish = cahfp_ops.finish_partials(w_d, s_d, c_d, 2.0, "reconstruct")
    torch.testing.assert_close(got_finish.cpu().double(), want_finish.double(), rtol=rtol * 4, atol=atol * 8)


@pytest.mark.parametrize("reduce", ["median", "trimmed_mean"])
def test_robust_reducers_match_cpu(gen, reduce):
    weight, clients, rows, cols = _case(gen, 23, 11, (3,), 7, torch.float32)
    coef = [float(k % 3 + 1) for k in range(7)]  # integer weights: exact boundaries agree across backends
    with cahfp_ops.use_backend("cpp"):
        want = cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols, coef, reduce=reduce, trim=0.2)
    args = (_cuda(weight), _cuda(clients), _cuda(rows), _cuda(cols), coef)
    got = [cahfp_ops.reconstruct_aggregate(*args, reduce=reduce, trim=0.2) for _ in range(2)]
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0].cpu(), want, rtol=2e-5, atol=2e-5)


def test_server_round_on_the_device_matches_cpu(gen):
    """A whole round (assign, hostile replies, aggregate) with the model on the device: the
    same accepted clients and the same new model as on CPU."""
    from cahfp_ops.fl import Server, zoo

    x = torch.randn(2, 1, 8, 8, generator=gen)
    rounds = []
    for dev in (torch.device("cpu"), DEVICE):
        torch.manual_seed(0)
        net = zoo.small_cnn(8).to(dev)
        with cahfp_ops.use_backend("cpp" if dev.type == "cpu" else ("auto" if ON_CUDA else "triton")):
            server = Server(net, x.to(dev), criterion="random", seed=0)
            assigned = server.assign({c: 0.3 + 0.1 * c for c in range(5)})
            g = torch.Generator().manual_seed(1)
            replies = {}
            for c, a in assigned.items():
                replies[c] = {n: t + 0.01 * torch.randn(t.shape, generator=g).to(dev) if t.is_floating_point() else t
                              for n, t in a.state.items()}  # fmt: skip
            name = next(n for n, t in replies[3].items() if t.is_floating_point())
            replies[3][name] = torch.full_like(replies[3][name], float("nan"))
            report = server.aggregate(replies)
        rounds.append((report, {n: v.cpu() for n, v in server.state.items()}))
    (r_cpu, s_cpu), (r_dev, s_dev) = rounds
    assert r_dev.accepted == r_cpu.accepted == [0, 1, 2, 4] and list(r_dev.rejected) == [3]
    for n in s_cpu:
        torch.testing.assert_close(s_dev[n], s_cpu[n], rtol=2e-5, atol=2e-5)


@needs_cuda
def test_validation_off_round_captures_in_cuda_graph(gen):
    """The per-round aggregation on its layout (tables on the device, coef a device tensor,
    validation off) has no host sync: captured once, replayed on new client data."""
    model, layout, clients, packed = _layout_case(gen, 5)
    w_d, p_d = _cuda(list(model.values())), _cuda(packed)
    coef = torch.full((5,), 0.2, dtype=torch.float64, device=DEVICE)
    with cahfp_ops.validation(False):
        out, stats = cahfp_ops.aggregate_packed(layout, w_d, p_d, coef)  # warm-up: tables on the device
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, g_stats = cahfp_ops.aggregate_packed(layout, w_d, p_d, coef)
        for p in p_d:
            p.mul_(1.5)
        graph.replay()
        want, want_stats = cahfp_ops.aggregate_packed(layout, w_d, p_d, coef)
    assert torch.equal(g_out, want) and torch.equal(g_stats, want_stats) and not torch.equal(g_out, out)
