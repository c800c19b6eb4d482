"""Triton topk_channel_masks: one program per row, all rows in one launch.

Each channel's rank is the number of channels that beat it (higher score; equal
scores: lower index; NaN below every number), counted in chunks; a channel is kept
when its rank is below the row's keep count. Exact and deterministic, no sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._debug import poison_
from .._interpreter import triton_interpreted
from ._common import next_pow2


@triton.jit
def _topk_kernel(
    s_ptr, keep_ptr, mask_ptr, idx_ptr, C, max_keep, ACC64: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr
):
    k = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    valid = cs < C
    x_raw = tl.load(s_ptr + k * C + cs, mask=valid, other=0.0)
    if ACC64:
        x = x_raw.to(tl.float64)
    else:
        x = x_raw.to(tl.float32)
    xn = x != x
    rank = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, C, CHUNK):
        o = start + tl.arange(0, CHUNK)
        ov = o < C
        y = tl.load(s_ptr + k * C + o, mask=ov, other=0.0).to(x.dtype)
        yn = y != y
        Y = y[:, None]
        X = x[None, :]
        YN = yn[:, None]
        XN = xn[None, :]
        higher = ((YN == 0) & XN) | ((YN == 0) & (XN == 0) & (Y > X))
        same = (YN & XN) | ((YN == 0) & (XN == 0) & (Y == X))
        beats = (higher | (same & (o[:, None] < cs[None, :]))) & ov[:, None]
        rank += tl.sum(beats.to(tl.int32), axis=0)
    kp = tl.load(keep_ptr + k)
    kept = valid & (rank < kp)
    tl.store(mask_ptr + k * C + cs, kept, mask=valid)
    pos = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + k * max_keep + pos, cs.to(tl.int64), mask=kept)
    tl.store(idx_ptr + k * max_keep + cs, tl.full([BLOCK_C], -1, tl.int64), mask=(cs >= kp) & (cs < max_keep))


def topk_channel_masks(scores: Tensor, keep: Tensor, max_keep: int) -> tuple[Tensor, Tensor]:
    """scores ``(K, C)``, keep ``(K,)`` int64 -> mask ``(K, C)`` bool, indices ``(K, max_keep)`` int64."""
    K, C = scores.shape
    scores = scores.contiguous()
    mask = poison_(torch.empty(K, C, dtype=torch.bool, device=scores.device))
    indices = poison_(torch.empty(K, max_keep, dtype=torch.int64, device=scores.device))
    if K and C:
        block_c = next_pow2(C)
        budget = (1 << 16) if triton_interpreted() else (1 << 13)
        chunk = max(1, min(block_c, budget // block_c))
        _topk_kernel[(K,)](
            scores,
            keep.contiguous(),
            mask,
            indices,
            C,
            max_keep,
            ACC64=scores.dtype == torch.float64,
            BLOCK_C=block_c,
            CHUNK=chunk,
        )
    return mask, indices
