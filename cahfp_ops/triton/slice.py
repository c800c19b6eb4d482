"""Triton slice_channels: every client's compact tensor (of every tensor) in one launch.

Canonical inputs (see ``cahfp_ops/_operators.py``): N-D weights, viewed here as
``(R, Cin, T)``; keep sets ``(K, m)`` int64, -1 padded. Output: one packed buffer,
client-major; segment (client k, tensor n) holds ``weight_n[rows_nk][:, cols_nk]``
flattened. A program copies one block of one kept row of one client's tensor, reading the
kept columns through the keep set. Kept counts come from the host (they size the output
anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from .._debug import poison_
from .._views import as_3d
from ._common import block_size, element_offsets, to_device_table

# Segment table (int64), 8 entries per (client, tensor): weight offset, rows offset, cols
# offset, kept cols, Cin, T, output offset, R. Kept indices outside [0, R) / [0, Cin) (possible
# only with validation off) are masked: their elements read as 0, nothing outside the weight
# is read.


@triton.jit
def _slice_kernel(w_base, out_ptr, keep_base, seg, work, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    sidx = tl.load(work + pid * 3)
    i = tl.load(work + pid * 3 + 1).to(tl.int64)
    b = tl.load(work + pid * 3 + 2)
    sm = seg + sidx * 8
    w_off = tl.load(sm)
    rows_off = tl.load(sm + 1)
    cols_off = tl.load(sm + 2)
    cc = tl.load(sm + 3)
    Cin = tl.load(sm + 4)
    T = tl.load(sm + 5)
    out_off = tl.load(sm + 6)
    R = tl.load(sm + 7)
    r = tl.load(keep_base + rows_off + i)
    e = b * BLOCK + tl.arange(0, BLOCK)
    j = e // T
    t = e % T
    m = j < cc
    c = tl.load(keep_base + cols_off + j, mask=m, other=0)
    rv = r + 0 * j  # the row as a block: masks are built from blocks only
    ok = m & (rv >= 0) & (rv < R) & (c >= 0) & (c < Cin)
    x = tl.load(w_base + w_off + (rv * Cin + c) * T + t, mask=ok, other=0.0)
    tl.store(out_ptr + out_off + (i * cc + j) * T + t, x, mask=m)


def slice_channels_many(
    weights: Sequence[Tensor],
    rows: Sequence[Tensor],
    cols: Sequence[Tensor],
    row_counts: Sequence[int],
    col_counts: Sequence[int],
) -> Tensor:
    """Packed compact tensors, client-major: client 0's tensors 0..N-1, then client 1's, ...

    ``row_counts[n * K + k]`` / ``col_counts[n * K + k]``: kept counts (host ints; they size the output).
    """
    N = len(weights)
    device = weights[0].device
    K = rows[0].shape[0]
    row_counts = [row_counts[n * K : (n + 1) * K] for n in range(N)]
    col_counts = [col_counts[n * K : (n + 1) * K] for n in range(N)]
    ws = [as_3d(w.contiguous()) for w in weights]
    keeps = [t.contiguous() for pair in zip(rows, cols) for t in pair]
    keep_base = min(keeps, key=lambda t: t.data_ptr())
    keep_offs = element_offsets(keeps, keep_base)
    w_base = ws[0]
    w_offs = element_offsets(ws, w_base)
    flat = [row_counts[n][k] * col_counts[n][k] * ws[n].shape[2] for k in range(K) for n in range(N)]
    out_offs = np.concatenate([[0], np.cumsum(flat)[:-1]]).astype(np.int64) if flat else np.zeros(0, np.int64)
    max_ct = max(w.shape[1] * w.shape[2] for w in ws)
    block = block_size(max_ct, gpu_cap=1024)
    seg, work = [], []
    for k in range(K):
        for n in range(N):
            sidx = k * N + n
            mr, mc = rows[n].shape[1], cols[n].shape[1]
            seg += [
                w_offs[n],
                keep_offs[2 * n] + k * mr,
                keep_offs[2 * n + 1] + k * mc,
                col_counts[n][k],
                ws[n].shape[1],
                ws[n].shape[2],
                int(out_offs[sidx]),
                ws[n].shape[0],
            ]
            nb = -(-(col_counts[n][k] * ws[n].shape[2]) // block)
            rc = row_counts[n][k]
            if rc and nb:
                ii, bb = np.meshgrid(np.arange(rc), np.arange(nb), indexing="ij")
                work.append(np.stack([np.full(ii.size, sidx), ii.ravel(), bb.ravel()], axis=1))
    out = poison_(torch.empty(int(sum(flat)), dtype=ws[0].dtype, device=device))
    if work:
        table = np.concatenate(work).astype(np.int64)
        work_t = to_device_table(table.ravel().tolist(), device)
        seg_t = to_device_table(seg, device)
        _slice_kernel[(table.shape[0],)](w_base, out, keep_base, seg_t, work_t, BLOCK=block)
    return out


def slice_channels(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    """Single tensor: packed (client order) buffer of ``total`` elements."""
    rc = (rows >= 0).sum(dim=1).tolist()
    cc = (cols >= 0).sum(dim=1).tolist()
    out = slice_channels_many([weight], [rows], [cols], rc, cc)
    if out.numel() != total:
        raise ValueError(f"slice_channels: total must be {out.numel()}, got {total}")
    return out
