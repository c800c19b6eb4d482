"""Autograd: slicing and mean aggregation (single and whole-model forms) have backward formulas,
checked by ``gradcheck`` in float64 on every backend; every other op returns results that do
not require grad, in its single and whole-model forms alike."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import cahfp_ops
from helpers import random_keep

F64 = torch.float64


def check_grads(fn, inputs) -> bool:
    """``gradcheck``: the full Jacobian on the compiled and reference backends; through the
    Triton interpreter (about 0.1 s per call) its fast mode, random projections of it."""
    return gradcheck(fn, inputs, fast_mode=cahfp_ops.get_backend() == "triton")


def _keeps(gen, size: int, K: int) -> list:
    """K keep sets, one of them None (all) and one a single channel."""
    out = [random_keep(gen, size, min_keep=1) for _ in range(K)]
    out[0] = None
    out[-1] = torch.tensor([size - 1])
    return out


def _leaf(gen, *shape, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()


# (weight shape, K): odd sizes, K = 1, 1-D tensors and conv tails
SHAPES = [((5, 4, 3), 3), ((7, 3), 1), ((6,), 2)]


@pytest.mark.parametrize("shape,K", SHAPES)
def test_slice_channels_gradcheck(backend, gen, shape, K):
    w = _leaf(gen, *shape)
    rows = _keeps(gen, shape[0], K)
    cols = _keeps(gen, shape[1], K) if len(shape) > 1 else None
    assert check_grads(lambda w: tuple(cahfp_ops.slice_channels(w, rows, cols)), (w,))


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("shape,K", SHAPES)
def test_reconstruct_aggregate_gradcheck(backend, gen, shape, K, mode):
    w = _leaf(gen, *shape)
    rows = _keeps(gen, shape[0], K)
    cols = _keeps(gen, shape[1], K) if len(shape) > 1 else None
    clients = [_leaf(gen, *c.shape) for c in cahfp_ops.slice_channels(w.detach(), rows, cols)]
    coef = [float(k + 1) for k in range(K)]

    def f(w, *clients):
        return cahfp_ops.reconstruct_aggregate(w, list(clients), rows, cols, coef, mode=mode)

    assert check_grads(f, (w, *clients))


def test_stacked_clients_gradient_leaves_the_padding_out(backend, gen):
    w = _leaf(gen, 5, 4, 3)
    rows = torch.tensor([[0, 2, 3, -1], [1, 4, -1, -1]])
    cols = torch.tensor([[1, 3, -1, -1], [0, 1, 2, 3]])
    stacked = _leaf(gen, 2, 4, 4, 3)
    assert check_grads(lambda w, s: cahfp_ops.reconstruct_aggregate(w, s, rows, cols), (w, stacked))
    cahfp_ops.reconstruct_aggregate(w, stacked, rows, cols).sum().backward()
    assert stacked.grad[0, 3:].abs().sum() == 0 and stacked.grad[0, :, 2:].abs().sum() == 0


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_whole_model_forms_gradcheck(backend, gen, mode):
    K = 3
    weights = {"w": _leaf(gen, 5, 4, 3), "b": _leaf(gen, 5), "fc": _leaf(gen, 2, 4)}
    r, c = _keeps(gen, 5, K), _keeps(gen, 4, K)
    rows, cols = {"w": r, "b": r}, {"fc": c}
    names = list(weights)

    def sliced(*ws):
        models = cahfp_ops.slice_channels_many(dict(zip(names, ws)), rows, cols)
        return tuple(m[n] for m in models for n in names)

    assert check_grads(sliced, tuple(weights.values()))
    compact = cahfp_ops.slice_channels_many({n: t.detach() for n, t in weights.items()}, rows, cols)
    leaves = [_leaf(gen, *m[n].shape) for m in compact for n in names]

    def aggregated(*ts):
        ws, cl = ts[: len(names)], ts[len(names) :]
        clients = [dict(zip(names, cl[k * len(names) : (k + 1) * len(names)])) for k in range(K)]
        out = cahfp_ops.reconstruct_aggregate_many(dict(zip(names, ws)), clients, rows, cols, [1, 2, 0.5], mode=mode)
        return tuple(out.values())

    assert check_grads(aggregated, (*weights.values(), *leaves))


def test_gradients_equal_across_single_and_whole_model_forms(gen):
    w = _leaf(gen, 6, 5)
    rows = _keeps(gen, 6, 3)
    clients = [_leaf(gen, *c.shape) for c in cahfp_ops.slice_channels(w.detach(), rows)]
    g = torch.randn(6, 5, generator=gen, dtype=F64)
    single = torch.autograd.grad(cahfp_ops.reconstruct_aggregate(w, clients, rows, coef=[1, 2, 3]), [w, *clients], g)
    many = cahfp_ops.reconstruct_aggregate_many({"w": w}, [{"w": c} for c in clients], {"w": rows}, coef=[1, 2, 3])
    whole = torch.autograd.grad(many["w"], [w, *clients], g)
    for a, b in zip(single, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_other_ops_return_results_that_do_not_require_grad(backend, gen):
    w = _leaf(gen, 6, 4, dtype=torch.float32)
    rows = [torch.tensor([0, 2]), None, torch.tensor([5])]
    clients = [_leaf(gen, *c.shape, dtype=torch.float32) for c in cahfp_ops.slice_channels(w.detach(), rows)]
    assert not cahfp_ops.curvature_scores(w, grad=torch.randn_like(w), hess=w).requires_grad
    assert not any(t.requires_grad for t in cahfp_ops.topk_channel_masks(w.sum(1), 3))
    for reduce in ("median", "trimmed_mean"):
        assert not cahfp_ops.reconstruct_aggregate(w, clients, rows, reduce=reduce).requires_grad
        many = cahfp_ops.reconstruct_aggregate_many({"w": w}, [{"w": c} for c in clients], {"w": rows}, reduce=reduce)
        assert not many["w"].requires_grad
    layout = cahfp_ops.RoundLayout.from_keep_sets({"w": w.detach()}, {"w": rows}, None)
    buffers = cahfp_ops.slice_packed(layout, [w])
    assert not any(b.requires_grad for b in buffers)
    out, stats = cahfp_ops.aggregate_packed(layout, [w], [b.requires_grad_() for b in buffers],
                                            torch.full((3,), 1 / 3, dtype=F64))  # fmt: skip
    assert not out.requires_grad and not stats.requires_grad


def test_coefficients_requiring_grad_are_refused():
    w = torch.randn(4, 3, requires_grad=True)
    coef = torch.tensor([1.0, 2.0], requires_grad=True)
    clients = [torch.randn(4, 3), torch.randn(4, 3)]
    with pytest.raises(ValueError, match=r"coef requires grad.*coef.detach\(\)"):
        cahfp_ops.reconstruct_aggregate(w, clients, coef=coef)
    with pytest.raises(ValueError, match="coef requires grad"):
        cahfp_ops.reconstruct_aggregate_many({"w": w}, [{"w": c} for c in clients], coef=coef)
    assert not cahfp_ops.reconstruct_aggregate(w.detach(), clients, coef=coef.detach()).requires_grad


@pytest.mark.parametrize("validate", [True, False])
def test_whole_model_gradient_to_the_clients_alone(gen, validate):
    """Only the uploads require grad (a constant global model): the whole-model call still
    records a graph, for named tensors and for packed buffers, with validation on or off."""
    w = torch.randn(6, 5, generator=gen, dtype=F64)
    rows = _keeps(gen, 6, 3)
    packed = cahfp_ops.slice_channels_many({"w": w}, {"w": rows})
    named = [{"w": _leaf(gen, *m["w"].shape)} for m in packed]
    buffers = [cahfp_ops.PackedModel(_leaf(gen, m.buffer.numel()), m.layout, m.client) for m in packed]
    g = torch.randn(6, 5, generator=gen, dtype=F64)
    with cahfp_ops.validation(validate):
        for clients, leaves in ((named, [c["w"] for c in named]), (buffers, [b.buffer for b in buffers])):
            out = cahfp_ops.reconstruct_aggregate_many({"w": w}, clients, {"w": rows}, coef=[1, 2, 3])["w"]
            assert out.requires_grad
            grads = torch.autograd.grad(out, leaves, g)
            single = cahfp_ops.reconstruct_aggregate(w, [c["w"] for c in clients], rows, coef=[1, 2, 3])
            want = torch.autograd.grad(single, leaves, g)
            for a, b in zip(grads, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
