"""curvature_scores against a float64 oracle, with and without a client dim."""

import pytest
import torch

import cahfp_ops
from helpers import DTYPES, TOL


def oracle(w, g, h, dim, s_rank):
    w = w.double()
    v = torch.zeros(torch.broadcast_shapes(*[t.shape for t in (w, g, h) if t is not None]), dtype=torch.float64)
    if g is not None:
        v = v + (g.double() * w).abs()
    if h is not None:
        v = v + 0.5 * h.double().clamp(min=0) * w * w
    lead = v.dim() - s_rank
    dims = [d for d in range(lead, v.dim()) if d != lead + dim]
    return v.sum(dim=dims) if dims else v


def check(out, exp, dtype):
    rtol, atol = TOL[dtype]
    # float32 accumulation of positive terms: relative error bound
    rtol = max(rtol, 1e-5) if dtype != torch.float64 else 1e-12
    torch.testing.assert_close(out.double(), exp, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,dim",
    [
        ((7,), 0),
        ((5, 3), 0),
        ((5, 3), 1),
        ((9, 6, 3, 3), 0),
        ((9, 6, 3, 3), 1),
        ((4, 5, 6), 2),
        ((4, 5, 6), -1),
        ((3, 2000), 0),
    ],
)
@pytest.mark.parametrize("terms", ["both", "grad", "hess"])
def test_unbatched(backend, gen, dtype, shape, dim, terms):
    w = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype) if terms != "hess" else None
    h = torch.randn(shape, generator=gen).to(dtype) if terms != "grad" else None
    inputs = [t.clone() if t is not None else None for t in (w, g, h)]
    out = cahfp_ops.curvature_scores(w, g, h, dim=dim)
    exp_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == exp_dtype and out.shape == (shape[dim],)
    check(out, oracle(w, g, h, dim % len(shape), len(shape)), dtype)
    for a, b in zip(inputs, (w, g, h)):
        assert a is None or torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("who", ["grad", "hess", "weight", "all"])
def test_client_dim_broadcasts(backend, gen, dtype, who):
    K, shape, dim = 3, (6, 5, 3), 0

    def make(name):
        batched = who in (name, "all")
        return torch.randn(((K,) if batched else ()) + shape, generator=gen).to(dtype)

    w, g, h = make("weight"), make("grad"), make("hess")
    out = cahfp_ops.curvature_scores(w, g, h, dim=dim, batched=True if who == "all" else None)
    assert out.shape == (K, shape[dim])
    check(out, oracle(w, g, h, dim, len(shape)), dtype)


def test_mixed_dtypes_promote(backend, gen):
    w = torch.randn(4, 3, generator=gen).half()
    h = torch.randn(4, 3, generator=gen).double()
    out = cahfp_ops.curvature_scores(w, hess=h)
    assert out.dtype == torch.float64
    check(out, oracle(w, None, h, 0, 2), torch.float32)


def test_all_same_rank_without_batched_means_no_client_dim(backend, gen):
    w = torch.randn(4, 6, generator=gen)
    assert cahfp_ops.curvature_scores(w, w, w).shape == (4,)
    assert cahfp_ops.curvature_scores(w, w, w, batched=True).shape == (4, 6)
