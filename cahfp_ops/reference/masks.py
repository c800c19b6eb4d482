"""Top-k channel masks (the reference of ``cahfp::topk_channel_masks``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._dtypes import acc_dtype


def topk_channel_masks(scores: Tensor, keep: Tensor, max_keep: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-``keep[k]`` of ``(K, C)`` scores; ties to the lower index, NaN lowest.

    Returns ``mask`` (K, C) bool and ``indices`` (K, max_keep) int64, ascending, -1 padded.
    """
    K, C = scores.shape
    s = scores.to(acc_dtype(scores.dtype))
    nan = torch.isnan(s)
    filled = torch.where(nan, torch.full_like(s, float("-inf")), s)
    # Stable sorts: by score (descending), then NaN last; equal keys keep index order.
    order = torch.sort(filled, dim=1, descending=True, stable=True).indices
    nan_last = torch.sort(torch.gather(nan, 1, order).to(torch.int8), dim=1, stable=True).indices
    order = torch.gather(order, 1, nan_last)
    ranks = torch.arange(C, device=scores.device).expand(K, C)
    selected = ranks < keep.view(K, 1)
    mask = torch.zeros(K, C, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order, selected)
    indices = torch.full((K, max_keep), -1, dtype=torch.int64, device=scores.device)
    for k in range(K):
        kept = mask[k].nonzero().flatten()
        indices[k, : kept.numel()] = kept
    return mask, indices
