"""Triton curvature_scores: fused |g*w| + 0.5*max(h,0)*w^2 and the per-channel reduction.

One program per (client, channel); it walks the channel's elements in blocks and
reduces with tl.sum (a fixed tree), so results are deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._debug import poison_
from .._dtypes import acc_dtype
from ._common import block_size


@triton.jit
def _scores_kernel(
    w_ptr,
    g_ptr,
    h_ptr,
    out_ptr,
    wk,
    gk,
    hk,
    C,
    pre,
    post,
    HAS_G: tl.constexpr,
    HAS_H: tl.constexpr,
    ACC64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)
    k = q // C
    c = q % C
    n = pre * post
    if ACC64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        e = start + tl.arange(0, BLOCK)
        m = e < n
        p = e // post
        t = e % post
        off = (p * C + c) * post + t
        w = tl.load(w_ptr + k * wk + off, mask=m, other=0.0).to(acc.dtype)
        v = tl.zeros_like(acc)
        if HAS_G:
            g = tl.load(g_ptr + k * gk + off, mask=m, other=0.0).to(acc.dtype)
            v += tl.abs(g * w)
        if HAS_H:
            h = tl.load(h_ptr + k * hk + off, mask=m, other=0.0).to(acc.dtype)
            v += 0.5 * tl.where(h < 0.0, 0.0, h) * w * w  # clamp(min=0): NaN passes
        acc += v
    tl.store(out_ptr + q, tl.sum(acc, axis=0))


def curvature_scores(weight: Tensor, grad: Tensor | None, hess: Tensor | None, dim: int) -> Tensor:
    """weight / grad / hess: ``(K_i, *S)`` with K_i in {1, K}, one dtype -> ``(K, S[dim])``."""
    shape = weight.shape[1:]
    K = max(t.shape[0] for t in (weight, grad, hess) if t is not None)
    C = shape[dim]
    pre = math.prod(shape[:dim])
    post = math.prod(shape[dim + 1 :])
    numel = pre * C * post
    acc = acc_dtype(weight.dtype)
    out = poison_(torch.empty(K, C, dtype=acc, device=weight.device))
    tensors = [t.contiguous() if t is not None else None for t in (weight, grad, hess)]
    strides = [0 if t is None or t.shape[0] == 1 else numel for t in tensors]
    w, g, h = tensors
    if K * C:
        block = block_size(pre * post, gpu_cap=1024)
        _scores_kernel[(K * C,)](
            w,
            g if g is not None else w,
            h if h is not None else w,
            out,
            *strides,
            C,
            pre,
            post,
            HAS_G=g is not None,
            HAS_H=h is not None,
            ACC64=acc == torch.float64,
            BLOCK=block,
        )
    return out
