"""Curvature-aware channel scores (the reference of ``cahfp::curvature_scores``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._dtypes import acc_dtype


def curvature_scores(weight: Tensor, grad: Tensor | None, hess: Tensor | None, dim: int) -> Tensor:
    """``|g*w| + 0.5*max(h,0)*w**2`` summed over all dims of S but ``dim``.

    weight / grad / hess: ``(K_i, *S)`` with K_i in {1, K}, one floating dtype.
    Returns ``(K, S[dim])`` float32 (float64 for float64 inputs).
    """
    acc = acc_dtype(weight.dtype)
    w = weight.to(acc)
    terms = []
    if grad is not None:
        terms.append((grad.to(acc) * w).abs())
    if hess is not None:
        terms.append(0.5 * hess.to(acc).clamp(min=0) * w * w)
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    dims = [d for d in range(1, total.dim()) if d != dim + 1]
    return _sum_fixed_order(total, dims) if dims else total


# torch's CPU sum of many elements into one output splits them over the threads (two-pass
# reduction), so its bits depend on the thread count; a reduction with several outputs runs
# each output on one thread. Below this many elements a reduction runs on one thread.
_ONE_THREAD = 32768


def _sum_fixed_order(x: Tensor, dims: list[int]) -> Tensor:
    """``x.sum(dim=dims)`` whose bits do not depend on the thread count: a reduction into
    one element is first cut into rows of 1024 (zero padded), summed row by row."""
    out = x.sum(dim=dims)
    if out.numel() != 1 or x.numel() < _ONE_THREAD:
        return out
    flat = x.reshape(-1)
    while flat.numel() >= _ONE_THREAD:
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 1024)]).view(-1, 1024).sum(dim=1)
    return flat.sum().reshape(out.shape)
