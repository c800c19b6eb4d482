"""Triton robust reducers: the weighted median or trimmed mean of each element's participants.

Canonical inputs as for ``reconstruct_aggregate`` (see ``cahfp_ops/_operators.py``), with
``coef`` ``(K,)`` float64 as given (not normalised). A program owns one block of one row of
the ``(R, Cin, T)`` view and holds every client's delta for it in a ``(KP, BLOCK)`` tile
(``KP``: K rounded up to a power of two). There is no sort: participant i's place in the
order (ascending, ties by client index) is the weight of the participants before it,
``less_i``, summed over the tile, so an element costs O(K^2) comparisons, all in registers,
with no host sync and no data-dependent launch. Cumulative weights are float64, summed in
client order (the C++ kernel and the reference sum in sorted order: the same numbers up to
float64 rounding, identical for integer sample counts). Every index is masked against the
extents it addresses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._debug import poison_
from .._dtypes import acc_dtype
from .._views import as_3d
from ._common import batched_inverse_maps, block_size, element_offsets, next_pow2, to_device_table
from .aggregate import _as_row_view


@triton.jit
def _robust_kernel(
    w_ptr,
    out_ptr,
    c_base,
    c_meta,
    inv_rows,
    inv_cols,
    coef_ptr,
    K,
    R,
    Cin,
    T,
    trim,
    MEDIAN: tl.constexpr,
    OVERLAP: tl.constexpr,
    ACC64: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    CT = Cin * T
    e = b * BLOCK + tl.arange(0, BLOCK)
    em = e < CT
    c = e // T
    t = e % T
    w_raw = tl.load(w_ptr + r * CT + e, mask=em, other=0.0)
    if ACC64:
        w = w_raw.to(tl.float64)
    else:
        w = w_raw.to(tl.float32)
    ks = tl.arange(0, KP)
    km = ks < K
    pk = tl.load(coef_ptr + ks, mask=km, other=0.0)
    i = tl.load(inv_rows + ks * R + r, mask=km, other=-1).to(tl.int64)
    meta = c_meta + ks * 6
    off = tl.load(meta, mask=km, other=0)
    s0 = tl.load(meta + 1, mask=km, other=0)
    s1 = tl.load(meta + 2, mask=km, other=0)
    n0 = tl.load(meta + 3, mask=km, other=0)
    n1 = tl.load(meta + 4, mask=km, other=0)
    n2 = tl.load(meta + 5, mask=km, other=0)
    row_ok = km & (pk > 0) & (i >= 0) & (i < n0)
    full = row_ok[:, None] & em[None, :]
    j = tl.load(inv_cols + ks[:, None] * Cin + c[None, :], mask=full, other=-1).to(tl.int64)
    keep = full & (j >= 0) & (j < n1[:, None]) & (t[None, :] < n2[:, None])
    addr = off[:, None] + i[:, None] * s0[:, None] + j * s1[:, None] + t[None, :]
    x = tl.load(c_base + addr, mask=keep, other=0.0).to(w.dtype)
    d = tl.where(keep, x - w[None, :], 0.0)
    if OVERLAP:
        part = keep
    else:
        part = (km & (pk > 0))[:, None] & em[None, :]
    wts = tl.where(part, pk[:, None], 0.0)
    total = tl.sum(wts, axis=0)
    nan = tl.sum(tl.where(keep & (d != d), 1, 0), axis=0) > 0
    covered = tl.sum(tl.where(keep, 1, 0), axis=0) > 0
    res = tl.zeros_like(w)
    num = tl.zeros_like(w)
    den = tl.zeros_like(total)
    lo = trim * total
    hi = total - lo
    for q in range(K):
        sel = ks[:, None] == q
        v = tl.sum(tl.where(sel, d, 0.0), axis=0)
        p_q = tl.sum(tl.where(sel, part, 0), axis=0) > 0
        w_q = tl.load(coef_ptr + q)
        before = ((d < v[None, :]) | ((d == v[None, :]) & (ks[:, None] < q))) & part
        less = tl.sum(tl.where(before, wts, 0.0), axis=0)
        cum = less + w_q
        if MEDIAN:
            chosen = p_q & (2 * less < total) & (2 * cum >= total)
            after = part & ~before & ~sel
            nxt = tl.min(tl.where(after, d, float("inf")), axis=0)
            value = tl.where((2 * cum == total) & (nxt < float("inf")), v + (nxt - v) / 2, v)
            res = tl.where(chosen, value, res)
        else:
            share = tl.minimum(cum, hi) - tl.maximum(less, lo)
            share = tl.where(p_q & (share > 0), share / total, 0.0)  # a fraction: no float32 overflow
            num += tl.where(share > 0, share.to(w.dtype) * v, 0.0)
            den += share
    if not MEDIAN:
        res = num / tl.where(den > 0, den, 1.0).to(w.dtype)
    res = tl.where(nan, float("nan"), res)
    out = tl.where(covered, (w + res).to(w_raw.dtype), w_raw)
    tl.store(out_ptr + r * CT + e, out, mask=em)


def robust_aggregate(
    weight: Tensor,
    clients: list[Tensor],
    rows: Tensor,
    cols: Tensor,
    coef: Tensor,
    mode: str,
    reduce: str,
    trim: float,
) -> Tensor:
    """The robust reducers on one tensor; one launch. Returns a tensor shaped like ``weight``."""
    shape = weight.shape
    device = weight.device
    K = len(clients)
    w3 = as_3d(weight.contiguous())
    w3, cls, rows, cols = _as_row_view(w3, [as_3d(c) for c in clients], rows, cols)
    cls = [c if c.stride(2) == 1 or c.shape[2] == 1 else c.contiguous() for c in cls]
    R, Cin, T = w3.shape
    c_base = min(cls, key=lambda c: c.data_ptr())
    offs = element_offsets(cls, c_base)
    meta = []
    for n, c in enumerate(cls):
        meta += [offs[n], c.stride(0), c.stride(1), c.shape[0], c.shape[1], c.shape[2]]
    c_meta = to_device_table(meta, device)
    inv_rows = batched_inverse_maps([rows], [R])
    inv_cols = batched_inverse_maps([cols], [Cin])
    out = poison_(torch.empty(w3.shape, dtype=w3.dtype, device=device))
    KP = next_pow2(max(K, 2))
    block = max(16, min(block_size(Cin * T, gpu_cap=128), max(16, 8192 // KP)))
    grid = (R, triton.cdiv(Cin * T, block))
    if R and Cin * T:
        _robust_kernel[grid](
            w3, out, c_base, c_meta, inv_rows, inv_cols, coef.to(device=device, dtype=torch.float64),
            K, R, Cin, T, float(trim),
            MEDIAN=reduce == "median", OVERLAP=mode == "overlap", ACC64=acc_dtype(w3.dtype) == torch.float64,
            KP=KP, BLOCK=block,
        )  # fmt: skip
    return out.view(shape)
