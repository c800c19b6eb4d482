"""The per-round layout ops on the Triton backend: slicing every client's compact model into
one buffer per client, and the batch aggregation with fused reply statistics.

Both take the layout's tables as they are on the device (``meta`` (N, 5): R, Cin, T, row
offset, column offset; ``row_inv`` (K, SR); ``col_keep`` (K, SC); ``counts`` (K, N, 2);
``starts`` / ``offsets`` (K, N)) and launch a constant number of kernels and table ops,
whatever N and K, with no host synchronisation: the launch grids come from the weights'
shapes (host values), never from table contents. Every table entry a kernel follows is
masked against the extent it indexes (the tables' shapes, the weights' sizes, each client
buffer's or tensor's extent ``[lo, end)``, so an offset that is negative or overflows reads
nothing), and the host checks what the grid and the tables' strides rest on (the tables'
shapes and dtypes, one form per client and as many client tensors as the forms say, the
sizes of ``out``, ``coef``, ``stats`` and the partial sums: shapes only, no sync), so
hand-made or stale tables and client lists cannot make a kernel read or write out of bounds,
whatever the validation switch says.

- ``slice_packed``: one program per (tensor, full row, block of the row's ``Cin * T``
  elements) and client (a 2-D grid); a program whose client does not keep the row exits.
- ``aggregate_packed``: one program per (tensor, output row, block), walking the clients in
  order 0..K-1 as the many-op kernel does (float32 accumulation, float64 for float64, no
  atomics: deterministic). Clients are one packed buffer or N separate tensors each, read in
  place as ``base + offset`` from one pointer. Each program writes its per-client partial
  statistics (squared deltas in float64, a non-finite flag) to a ``(programs, K)`` table,
  reduced afterwards in a fixed order; a client with coefficient 0 is read for its statistics
  and adds nothing, so recomputing with a rejected client's coefficient set to 0 is its
  absence, bit for bit, and a checked round stays capturable in a CUDA graph.

- ``accumulate_packed`` (streaming, one client per call): a statistics launch, its
  reduction and the accept decision on the device (finite and within ``max_ssq``), then an
  accumulation launch that reads the decision and adds nothing when it is false: a rejected
  client leaves no trace, and nothing waits for the device.
- ``fold_packed`` (streaming, K clients per call): the aggregation kernel's walk over the
  clients, starting from the running partial sums instead of zero and writing them out
  (sums and cover weights) instead of a result; the statistics as ``aggregate_packed``.
  Each element receives its clients' terms in order, as K ``accumulate_packed`` calls do.
- ``finish_partials``: the new global model from the partial sums, one program per (tensor,
  row, block), elementwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dtypes import acc_dtype
from .._layout_tables import LayoutTables
from ._common import block_size, element_offsets, to_device_table
from .aggregate import _cached, _work_table

__all__ = ["accumulate_packed", "aggregate_packed", "finish_partials", "fold_packed", "slice_packed"]


@triton.jit
def _in_range(idx, hi):
    return (idx >= 0) & (idx < hi)


@triton.jit
def _compact_row(row_inv_k, rpos, SR):
    """A client's compact position of row ``rpos`` of the row space (its ``row_inv`` row
    ``row_inv_k``), or -1: not kept, or ``rpos`` outside the table."""
    ok = _in_range(rpos, SR)
    i = tl.load(row_inv_k + tl.where(ok, rpos, 0)).to(tl.int64)
    return tl.where(ok, i, -1)


@triton.jit
def _client_entry(cm):
    """One row of the client address table: offset, row stride, column stride, rows, columns,
    and the readable extent ``[lo, end)`` of the client's buffer or tensor."""
    return (tl.load(cm), tl.load(cm + 1), tl.load(cm + 2), tl.load(cm + 3), tl.load(cm + 4), tl.load(cm + 5),
            tl.load(cm + 6))  # fmt: skip


@triton.jit
def _to_acc(x, ACC64: tl.constexpr):
    # One return: the compiler types every return of a function, constexpr branch or not.
    if ACC64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _in_global_dtype(x_raw, w_raw):
    """An upload's values in the global model's dtype; float64 to bfloat16 goes through float32
    (Triton's interpreter converts float64 to bfloat16 wrongly; the double rounding can only
    move a value at bfloat16's overflow boundary)."""
    if x_raw.dtype == tl.float64 and w_raw.dtype == tl.bfloat16:
        y = x_raw.to(tl.float32).to(w_raw.dtype)
    else:
        y = x_raw.to(w_raw.dtype)
    return y


@triton.jit
def _nonfinite(d, xw):
    """A delta not finite in the accumulation dtype, or a value not finite once in the global dtype."""
    return (d != d) | (tl.abs(d) == float("inf")) | (xw != xw) | (tl.abs(xw) == float("inf"))


@triton.jit
def _work_item(work, w_meta, pid, WM: tl.constexpr):
    """This program's work item: tensor n, row r, block b, and from the tensor's ``w_meta`` row
    (WM columns) its weight offset, Cin and T."""
    n = tl.load(work + pid * 3)
    r = tl.load(work + pid * 3 + 1).to(tl.int64)
    b = tl.load(work + pid * 3 + 2)
    return n, r, b, tl.load(w_meta + n * WM), tl.load(w_meta + n * WM + 1), tl.load(w_meta + n * WM + 2)


@triton.jit
def _client_deltas(col_inv, c_base, k, K, i, cpos, c_ok, t, off, s0, s1, n1, lo, end, w, w_raw, SC, ssq_part,
                   bad_part, pid):  # fmt: skip
    """Client k's lanes of this program's block (it keeps the row, at compact row ``i``): the
    kept mask, its values in the accumulation dtype and their deltas to ``w``; stores its
    statistics partials (squared deltas in float64, a non-finite flag) at ``[pid, k]``."""
    j = tl.load(col_inv + k * (SC + 1) + cpos, mask=c_ok, other=-1).to(tl.int64)
    src = off + i * s0 + j * s1 + t
    m = c_ok & (j >= 0) & (j < n1) & (src >= lo) & (src < end)  # any table entry: inside the client's data
    x_raw = tl.load(c_base + src, mask=m, other=0.0)
    x = x_raw.to(w.dtype)
    d = x - w
    dd = tl.where(m, d.to(tl.float64), 0.0)
    tl.store(ssq_part + pid * K + k, tl.sum(dd * dd, axis=0))  # untouched (zero) where k keeps nothing here
    nonfinite = _nonfinite(d, _in_global_dtype(x_raw, w_raw).to(w.dtype))
    tl.store(bad_part + pid * K + k, tl.max(tl.where(m & nonfinite, 1, 0), axis=0).to(tl.int8))
    return m, x, d


@triton.jit
def _slice_packed_kernel(
    w_base,
    w_meta,
    meta,
    row_inv,
    col_keep,
    counts,
    starts,
    out,
    work,
    N,
    SR,
    SC,
    out_numel,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    n, r, b, w_off, Cin, T = _work_item(work, w_meta, pid, 4)
    w_numel = tl.load(w_meta + n * 4 + 3)
    roff = tl.load(meta + n * 5 + 3)
    coff = tl.load(meta + n * 5 + 4)
    i = _compact_row(row_inv + k * SR, roff + r, SR)
    rc = tl.load(counts + (k * N + n) * 2)
    cc = tl.load(counts + (k * N + n) * 2 + 1)
    if (i >= 0) & (i < rc):
        e = b * BLOCK + tl.arange(0, BLOCK)
        m = (e < cc * T) & (e < Cin * T)
        j = e // T
        t = e % T
        cpos = coff + j
        m = m & _in_range(cpos, SC)
        c = tl.load(col_keep + k * SC + cpos, mask=m, other=-1).to(tl.int64)
        m = m & _in_range(c, Cin)
        src = r * Cin * T + c * T + t
        m = m & _in_range(src, w_numel)
        x = tl.load(w_base + w_off + src, mask=m)
        dst = tl.load(starts + k * N + n) + i * cc * T + e
        m = m & _in_range(dst, out_numel)
        tl.store(out + dst, x, mask=m)


@triton.jit
def _row_block(work, w_meta, meta, w_base, pid, WM: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of one row: tensor ``n``, row ``r``, the tensor's row and column
    offsets in the layout's tables, its Cin and row length ``CT``, the block's element indices
    ``e`` (``em``: within the row), their column ``c`` and tap ``t``, the global's values there."""
    n, r, b, w_off, Cin, T = _work_item(work, w_meta, pid, WM)
    roff = tl.load(meta + n * 5 + 3)
    coff = tl.load(meta + n * 5 + 4)
    CT = Cin * T
    e = b * BLOCK + tl.arange(0, BLOCK)
    em = e < CT
    w_raw = tl.load(w_base + w_off + r * CT + e, mask=em, other=0.0)
    return n, r, roff, coff, Cin, CT, e, em, e // T, e % T, w_raw


@triton.jit
def _add_clients(s, den, cov, w, w_raw, n, r, roff, cpos, c_ok, t, c_base, c_meta, row_inv, col_inv, p_ptr,
                 ssq_part, bad_part, pid, K, SR, SC, OVERLAP: tl.constexpr, DEN: tl.constexpr):  # fmt: skip
    """The clients' terms of one block, in order 0..K-1 (the aggregation's and the fold's
    walk): ``s`` gains ``p_k * c`` (overlap) or ``p_k * (c - w)`` at each client's kept lanes,
    ``den`` (DEN) its weight, ``cov`` marks them; a client with weight 0 is read for its
    statistics and adds nothing."""
    for k in range(K):
        i = _compact_row(row_inv + k * SR, roff + r, SR)
        off, s0, s1, n0, n1, lo, end = _client_entry(c_meta + (n * K + k) * 7)
        if (i >= 0) & (i < n0):
            pk = tl.load(p_ptr + k)
            m, x, d = _client_deltas(col_inv, c_base, k, K, i, cpos, c_ok, t, off, s0, s1, n1, lo, end, w, w_raw,
                                     SC, ssq_part, bad_part, pid)  # fmt: skip
            if pk != 0:
                if OVERLAP:
                    s = tl.where(m, s + pk * x, s)
                else:
                    s = tl.where(m, s + pk * d, s)
                if DEN:
                    den = tl.where(m, den + pk, den)
                cov = cov | m
    return s, den, cov


@triton.jit
def _aggregate_packed_kernel(
    w_base,
    w_meta,
    meta,
    out,
    c_base,
    c_meta,
    work,
    row_inv,
    col_inv,
    p_ptr,
    ssq_part,
    bad_part,
    K,
    SR,
    SC,
    OVERLAP: tl.constexpr,
    ACC64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n, r, roff, coff, Cin, CT, e, em, c, t, w_raw = _row_block(work, w_meta, meta, w_base, pid, 4, BLOCK)
    w = _to_acc(w_raw, ACC64)
    cpos = coff + c
    s, den, cov = _add_clients(tl.zeros_like(w), tl.zeros_like(w), e < 0, w, w_raw, n, r, roff, cpos,
                               em & _in_range(cpos, SC), t, c_base, c_meta, row_inv, col_inv, p_ptr, ssq_part,
                               bad_part, pid, K, SR, SC, OVERLAP, OVERLAP)  # fmt: skip
    if OVERLAP:
        res = s / tl.where(cov, den, 1.0)
    else:
        res = w + s
    o_off = tl.load(w_meta + n * 4 + 3)
    tl.store(out + o_off + r * CT + e, tl.where(cov, res.to(w_raw.dtype), w_raw), mask=em)


@triton.jit
def _accumulate_packed_kernel(
    w_base,
    w_meta,
    meta,
    c_base,
    c_meta,
    work,
    row_inv,
    col_inv,
    sums,
    cover,
    accept,
    weight,
    ssq_part,
    bad_part,
    SR,
    SC,
    ADD: tl.constexpr,
    OVERLAP: tl.constexpr,
    ACC64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """ADD False: client 0's statistics partials; ADD True: fold it in when ``accept`` holds."""
    pid = tl.program_id(0)
    n, r, b, w_off, Cin, T = _work_item(work, w_meta, pid, 5)
    s_off = tl.load(w_meta + n * 5 + 3)
    v_off = tl.load(w_meta + n * 5 + 4)
    roff = tl.load(meta + n * 5 + 3)
    coff = tl.load(meta + n * 5 + 4)
    CT = Cin * T
    e = b * BLOCK + tl.arange(0, BLOCK)
    em = e < CT
    c = e // T
    t = e % T
    i = _compact_row(row_inv, roff + r, SR)
    off, s0, s1, n0, n1, lo, end = _client_entry(c_meta + n * 7)
    go = (i >= 0) & (i < n0)
    if ADD:
        go = go & (tl.load(accept) != 0)
    if go:
        cpos = coff + c
        c_ok = em & _in_range(cpos, SC)
        j = tl.load(col_inv + cpos, mask=c_ok, other=-1).to(tl.int64)
        src = off + i * s0 + j * s1 + t
        m = c_ok & (j >= 0) & (j < n1) & (src >= lo) & (src < end)
        w_raw = tl.load(w_base + w_off + r * CT + e, mask=m, other=0.0)
        w = _to_acc(w_raw, ACC64)
        x_raw = tl.load(c_base + src, mask=m, other=0.0)
        x = x_raw.to(w.dtype)
        d = x - w
        if ADD:
            pk = tl.load(weight).to(w.dtype)
            dst = sums + s_off + r * CT + e
            if OVERLAP:
                tl.store(dst, tl.load(dst, mask=m) + pk * x, mask=m)
            else:
                tl.store(dst, tl.load(dst, mask=m) + pk * d, mask=m)
            first = m & (t == 0)  # one lane per (row, column): its cover weight
            cdst = cover + v_off + r * Cin + c
            tl.store(cdst, tl.load(cdst, mask=first) + pk, mask=first)
        else:
            dd = tl.where(m, d.to(tl.float64), 0.0)
            tl.store(ssq_part + pid, tl.sum(dd * dd, axis=0))
            nonfinite = _nonfinite(d, _in_global_dtype(x_raw, w_raw).to(w.dtype))
            tl.store(bad_part + pid, tl.max(tl.where(m & nonfinite, 1, 0), axis=0).to(tl.int8))


@triton.jit
def _fold_packed_kernel(
    w_base,
    w_meta,
    meta,
    c_base,
    c_meta,
    work,
    row_inv,
    col_inv,
    p_ptr,
    sums_in,
    cover_in,
    sums_out,
    cover_out,
    ssq_part,
    bad_part,
    K,
    SR,
    SC,
    OVERLAP: tl.constexpr,
    ACC64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n, r, roff, coff, Cin, CT, e, em, c, t, w_raw = _row_block(work, w_meta, meta, w_base, pid, 5, BLOCK)
    w = _to_acc(w_raw, ACC64)
    s_off = tl.load(w_meta + n * 5 + 3)
    v_off = tl.load(w_meta + n * 5 + 4)
    s = tl.load(sums_in + s_off + r * CT + e, mask=em, other=0.0)
    den = tl.load(cover_in + v_off + r * Cin + c, mask=em, other=0.0)
    cpos = coff + c
    s, den, cov = _add_clients(s, den, e < 0, w, w_raw, n, r, roff, cpos, em & _in_range(cpos, SC), t, c_base,
                               c_meta, row_inv, col_inv, p_ptr, ssq_part, bad_part, pid, K, SR, SC, OVERLAP,
                               True)  # fmt: skip
    tl.store(sums_out + s_off + r * CT + e, s, mask=em)
    tl.store(cover_out + v_off + r * Cin + c, den, mask=em & (t == 0))  # one lane per (row, column)


@triton.jit
def _finish_partials_kernel(
    w_base, w_meta, work, sums, cover, out, wsum, OVERLAP: tl.constexpr, ACC64: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    n, r, b, w_off, Cin, T = _work_item(work, w_meta, pid, 5)
    s_off = tl.load(w_meta + n * 5 + 3)
    v_off = tl.load(w_meta + n * 5 + 4)
    CT = Cin * T
    e = b * BLOCK + tl.arange(0, BLOCK)
    em = e < CT
    c = e // T
    w_raw = tl.load(w_base + w_off + r * CT + e, mask=em, other=0.0)
    s = tl.load(sums + s_off + r * CT + e, mask=em, other=0.0)
    cw = tl.load(cover + v_off + r * Cin + c, mask=em, other=0.0)
    covered = cw > 0
    if OVERLAP:
        value = s / tl.where(covered, cw, 1.0)
    else:
        value = s / tl.load(wsum) + _to_acc(w_raw, ACC64)
    tl.store(out + s_off + r * CT + e, tl.where(covered, value.to(w_raw.dtype), w_raw), mask=em)


def _view3(w: Tensor) -> tuple[int, int, int]:
    """The ``(R, Cin, T)`` view a layout gives a weight (1-D: one row of channels)."""
    if w.dim() == 1:
        return 1, int(w.shape[0]), 1
    T = 1
    for d in w.shape[2:]:
        T *= int(d)
    return int(w.shape[0]), int(w.shape[1]), T


def _trailing_dense(c: Tensor) -> bool:
    """Whether dims 2.. of ``c`` are packed densely (a (row, column) block is contiguous)."""
    expected = 1
    for d in range(c.dim() - 1, 1, -1):
        if c.shape[d] != 1 and c.stride(d) != expected:
            return False
        expected *= c.shape[d]
    return True


def _weights_meta(
    ws: list[Tensor], views: list[tuple[int, int, int]], extra: list[list[int]], device: torch.device
) -> Tensor:
    """(N, 3 + len(extra)) int64: per weight its offset from ``ws[0]``, Cin, T, then the
    given columns (``extra[j][n]``)."""
    offs = element_offsets(ws, ws[0])
    rows = [v for n, (_, Cin, T) in enumerate(views) for v in (offs[n], Cin, T, *(col[n] for col in extra))]
    key = ("packed-wmeta", tuple(rows), ws[0].data_ptr(), str(device))
    return _cached(key, lambda: to_device_table(rows, device))


def _starts(sizes: list[int]) -> list[int]:
    """Where each of consecutive blocks of ``sizes`` starts."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist() if sizes else []


def _check_tables(op: str, weights: Sequence[Tensor], tables: dict[str, Tensor], device: torch.device) -> int:
    """The layout tables' shapes, dtypes and device (host facts, no sync), whatever the
    validation switch says: the kernels index them by K and N from these shapes. Returns K."""
    N = len(weights)
    if N == 0:
        raise ValueError(f"{op}: weights must not be empty")
    if any(w.dtype != weights[0].dtype or w.device != device for w in weights):  # read as one base pointer
        raise ValueError(f"{op}: the weights must share one dtype and be on {device}")
    K = tables["row_inv"].shape[0] if tables["row_inv"].dim() == 2 else -1
    want = {"meta": ((N, 5), torch.int64), "row_inv": ((K, None), torch.int32),
            "col_keep": ((K, None), torch.int32), "counts": ((K, N, 2), torch.int64)}  # fmt: skip
    if "offsets" in tables:
        want["offsets"] = ((K, N), torch.int64)
    for name, (shape, dtype) in want.items():
        t = tables[name]
        ok = t.dim() == len(shape) and all(w is None or d == w for d, w in zip(t.shape, shape))
        if not ok or t.dtype != dtype or t.device != device or not t.is_contiguous():
            raise ValueError(
                f"{op}: the layout table {name} must be a contiguous {dtype} tensor on {device} shaped "
                f"{tuple('*' if w is None else w for w in shape)}, got {tuple(t.shape)} {t.dtype} on {t.device}"
            )
    return K


def _check_clients(op: str, clients: Sequence[Tensor], parts: Sequence[int], K: int, N: int,
                   device: torch.device) -> None:  # fmt: skip
    """One form per client (``parts[k]``: 0 one buffer, N its tensors) and as many client
    tensors as the forms say, on the device: the kernels' client table has a row per
    (tensor, client) of the layout."""
    if len(parts) != K or any(p not in (0, N) for p in parts):
        raise ValueError(f"{op}: parts must hold {K} entries, each 0 (one buffer) or {N} (separate tensors)")
    if len(clients) != sum(1 if p == 0 else N for p in parts):
        raise ValueError(f"{op}: clients holds {len(clients)} tensors but parts says {list(parts)}")
    if any(not isinstance(c, Tensor) or c.device != device for c in clients):
        raise ValueError(f"{op}: every client tensor must be on {device}")


def _check_flat(op: str, name: str, t: Tensor, numel: int, dtype: torch.dtype, device: torch.device) -> None:
    if t.shape != (numel,) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous ({numel},) {dtype} tensor on {device}")


def _clients_in_place(
    op: str, clients: Sequence[Tensor], parts: list[int], views: list, counts: Tensor, offsets: Tensor
) -> tuple[Tensor, Tensor]:
    """``(base, c_meta)``: the lowest-addressed client tensor (the kernels read every client as
    ``base + offset``) and the client address table; trailing dims made dense where they are not."""
    flat = [c if _trailing_dense(c) else c.contiguous() for c in clients]
    cdtype = flat[0].dtype
    if any(c.dtype != cdtype for c in flat):
        raise ValueError(f"{op}: all client data must share one dtype")
    base = min(flat, key=lambda c: c.data_ptr())
    return base, _client_meta(flat, parts, [T for _, _, T in views], counts, offsets, base)


def slice_packed(
    weights: Sequence[Tensor],
    tables: LayoutTables,
    out: Tensor,
) -> None:
    """Client k's compact tensor n -> ``out[starts[k, n]:]``; see the module docs."""
    meta, row_inv, col_keep, counts, starts = tables
    ws = [w.contiguous() for w in weights]
    device = out.device
    _check_tables("slice_packed", ws, {"meta": meta, "row_inv": row_inv, "col_keep": col_keep, "counts": counts,
                                       "offsets": starts}, device)  # fmt: skip
    if out.dim() != 1 or not out.is_contiguous() or any(w.device != device or w.dtype != out.dtype for w in ws):
        raise ValueError(f"slice_packed: out must be a contiguous 1-D tensor of the weights' dtype on {device}")
    if out.numel() == 0:
        return
    K, SR = row_inv.shape
    SC = col_keep.shape[1]
    views = [_view3(w) for w in ws]
    shapes = tuple((R, Cin * T) for R, Cin, T in views)
    block = block_size(max(ct for _, ct in shapes), gpu_cap=1024)
    work = _work_table(shapes, block, device)
    grid = (work.shape[0] // 3, K)
    if grid[0] and K:
        w_meta = _weights_meta(ws, views, [[w.numel() for w in ws]], device)
        _slice_packed_kernel[grid](
            ws[0], w_meta, meta, row_inv, col_keep, counts, starts, out, work,
            len(ws), SR, SC, out.numel(), BLOCK=block,
        )  # fmt: skip


def _col_inverse(meta: Tensor, col_keep: Tensor, counts: Tensor, cins: tuple[int, ...]) -> Tensor:
    """(K, SC + 1) int32: client k's compact position of column ``meta[n, 4] + c`` (or -1);
    column SC collects entries that point nowhere. Device ops only (no host sync)."""
    K, SC = col_keep.shape
    device = col_keep.device
    N = len(cins)

    def build():
        seg = np.repeat(np.arange(N), cins)
        local = np.concatenate([np.arange(c) for c in cins]) if cins else np.zeros(0, np.int64)
        table = to_device_table(np.concatenate([seg, local]).astype(np.int64).tolist(), device)
        return table.view(2, -1)

    seg, local = _cached(("packed-colseg", cins, str(device)), build)
    inv = torch.full((K, SC + 1), -1, dtype=torch.int32, device=device)
    if seg.numel() == 0:
        return inv
    pos = meta[:, 4].index_select(0, seg) + local  # column position of (n, local)
    pos_ok = (pos >= 0) & (pos < SC)
    safe = torch.where(pos_ok, pos, torch.zeros_like(pos))
    kept = col_keep.index_select(1, safe).to(torch.int64)  # (K, sum Cin): col_keep[k, pos]
    cc = counts[:, :, 1].index_select(1, seg)  # (K, sum Cin)
    cin = _cached(("packed-cin", cins, str(device)), lambda: to_device_table(list(cins), device)).index_select(0, seg)
    target = meta[:, 4].index_select(0, seg) + kept
    ok = pos_ok & (local < cc) & (kept >= 0) & (kept < cin) & (target >= 0) & (target < SC)
    target = torch.where(ok, target, torch.full_like(kept, SC))
    inv.scatter_(1, target, local.to(torch.int32).expand(K, -1).contiguous())
    inv[:, SC] = -1
    return inv


def _client_meta(
    clients: list[Tensor], parts: list[int], Ts: list[int], counts: Tensor, offsets: Tensor, base: Tensor
) -> Tensor:
    """(N * K, 7) int64 rows (n, k): offset from ``base``, row stride, column stride, rows,
    columns, and the readable extent ``[lo, end)`` of the client's buffer or tensor (every
    read is masked to it, whatever the layout's counts and offsets hold). Packed clients'
    rows (``parts[k] == 0``) come from the device tables; separate tensors' from their shapes
    and strides."""
    N, K = len(Ts), len(parts)
    device = counts.device
    starts, packed = [], []
    i = 0
    for k in range(K):
        starts.append(i)
        packed.append(parts[k] == 0)
        i += 1 if parts[k] == 0 else N
    host = []
    for n in range(N):
        for k in range(K):
            if packed[k]:
                host += [0, 0, 0, 0, 0, 0, 0]
                continue
            c = clients[starts[k] + n]
            off = element_offsets([c], base)[0]
            if c.numel() == 0:
                host += [off, 0, 0, 0, 0, off, off]
            elif c.dim() == 1:
                host += [off, 0, c.stride(0), 1, c.shape[0], off, off + (c.shape[0] - 1) * c.stride(0) + 1]
            else:
                span = 1 + sum((s - 1) * st for s, st in zip(c.shape, c.stride()))
                host += [off, c.stride(0), c.stride(1), c.shape[0], c.shape[1], off, off + span]
    table = to_device_table(host, device).view(N, K, 7)
    if any(packed):
        pk = [k for k in range(K) if packed[k]]
        bufs = [clients[starts[k]] for k in pk]
        buf_off = to_device_table(element_offsets(bufs, base), device)  # (P,)
        buf_end = buf_off + to_device_table([b.numel() for b in bufs], device)
        sel = to_device_table(pk, device)
        T = to_device_table(Ts, device)  # (N,)
        rc = counts[:, :, 0].index_select(0, sel).T  # (N, P)
        cc = counts[:, :, 1].index_select(0, sel).T
        off = buf_off.unsqueeze(0) + offsets.index_select(0, sel).T
        rows = torch.stack(
            [off, cc * T.unsqueeze(1), T.unsqueeze(1).expand_as(cc), rc, cc, buf_off.unsqueeze(0).expand_as(cc),
             buf_end.unsqueeze(0).expand_as(cc)], dim=2,
        )  # fmt: skip
        table[:, sel] = rows
    return table.view(N * K, 7)


def aggregate_packed(
    weights: Sequence[Tensor],
    clients: Sequence[Tensor],
    parts: Sequence[int],
    tables: LayoutTables,
    coef: Tensor,
    mode: str,
    out: Tensor,
    stats: Tensor,
    plan: int = -1,
) -> None:
    """Aggregate into ``out`` (the N results packed); ``stats`` (K, 2): non-finite flag, sum of
    squared deltas. See the module docs."""
    meta, row_inv, col_keep, counts, offsets = tables
    op = "aggregate_packed"
    ws = [w.contiguous() for w in weights]
    device = out.device
    K = _check_tables(op, ws, {"meta": meta, "row_inv": row_inv, "col_keep": col_keep, "counts": counts,
                               "offsets": offsets}, device)  # fmt: skip
    _check_clients(op, clients, parts, K, len(ws), device)
    _check_flat(op, "out", out, sum(w.numel() for w in ws), ws[0].dtype, device)
    _check_flat(op, "coef", coef, K, torch.float64, device)
    _check_flat(op, "stats", stats.view(-1), 2 * K, torch.float64, device)
    SR = row_inv.shape[1]
    SC = col_keep.shape[1]
    views = [_view3(w) for w in ws]
    base, c_meta = _clients_in_place(op, clients, list(parts), views, counts, offsets)
    shapes = tuple((R, Cin * T) for R, Cin, T in views)
    w_meta = _weights_meta(ws, views, [_starts([w.numel() for w in ws])], device)
    col_inv = _col_inverse(meta, col_keep, counts, tuple(Cin for _, Cin, _ in views))
    acc = acc_dtype(ws[0].dtype)
    p = coef.to(device=device, dtype=acc)
    block = block_size(max(ct for _, ct in shapes), gpu_cap=1024)
    work = _work_table(shapes, block, device)
    P = work.shape[0] // 3
    ssq_part = torch.zeros((P, K), dtype=torch.float64, device=device)
    bad_part = torch.zeros((P, K), dtype=torch.int8, device=device)
    if P and K:
        _aggregate_packed_kernel[(P,)](
            ws[0], w_meta, meta, out, base, c_meta, work, row_inv, col_inv, p, ssq_part, bad_part,
            K, SR, SC, OVERLAP=mode == "overlap", ACC64=acc == torch.float64, BLOCK=block,
        )  # fmt: skip
    stats[:, 0] = bad_part.amax(0).to(torch.float64) if P else 0.0
    stats[:, 1] = ssq_part.sum(0) if P else 0.0


def _partials_grid(op: str, ws: list[Tensor], views: list, sums: Sequence[Tensor], covers: Sequence[Tensor],
                   device: torch.device) -> tuple[Tensor, int, Tensor, int]:  # fmt: skip
    """What the streaming kernels share: the partial-sum buffers checked against the weights,
    and ``(w_meta, block, work, programs)``: per weight its offset, Cin, T and where its
    sums and cover weights start; the work table of (tensor, row, block) programs."""
    if any(w.dtype != ws[0].dtype or w.device != device for w in ws):  # read as one base pointer
        raise ValueError(f"{op}: the weights must share one dtype and be on {device}")
    if any(t.numel() != sum(w.numel() for w in ws) for t in sums) or any(
        t.numel() != sum(R * Cin for R, Cin, _ in views) for t in covers
    ):
        raise ValueError(f"{op}: the partial sums do not match the weights")
    if any(not t.is_contiguous() or t.device != device for t in (*sums, *covers)):
        raise ValueError(f"{op}: the partial sums must be contiguous tensors on {device}")
    extra = [_starts([w.numel() for w in ws]), _starts([R * Cin for R, Cin, _ in views])]
    w_meta = _weights_meta(ws, views, extra, device)
    shapes = tuple((R, Cin * T) for R, Cin, T in views)
    block = block_size(max(ct for _, ct in shapes), gpu_cap=1024)
    work = _work_table(shapes, block, device)
    return w_meta, block, work, work.shape[0] // 3


def accumulate_packed(
    weights: Sequence[Tensor],
    client: Sequence[Tensor],
    parts: Sequence[int],
    tables: LayoutTables,
    weight: float,
    max_ssq: float,
    mode: str,
    sums: Tensor,
    cover: Tensor,
    stats: Tensor,
) -> None:
    """Check client 0 of the layout, then fold it into ``sums`` / ``cover`` only when it is
    finite and within ``max_ssq``; ``stats`` (3,): non-finite flag, squared delta sum,
    accepted. See the module docs."""
    meta, row_inv, col_keep, counts, offsets = tables
    op = "accumulate_packed"
    ws = [w.contiguous() for w in weights]
    device = sums.device
    K = _check_tables(op, ws, {"meta": meta, "row_inv": row_inv, "col_keep": col_keep, "counts": counts,
                               "offsets": offsets}, device)  # fmt: skip
    if K != 1:
        raise ValueError(f"{op}: the layout must hold one client, got {K}")
    _check_clients(op, client, parts, 1, len(ws), device)
    _check_flat(op, "stats", stats, 3, torch.float64, device)
    SR = row_inv.shape[1]
    SC = col_keep.shape[1]
    views = [_view3(w) for w in ws]
    base, c_meta = _clients_in_place(op, client, list(parts), views, counts, offsets)
    w_meta, block, work, P = _partials_grid("accumulate_packed", ws, views, [sums], [cover], device)
    col_inv = _col_inverse(meta, col_keep, counts, tuple(Cin for _, Cin, _ in views))
    acc = sums.dtype
    ssq_part = torch.zeros(P, dtype=torch.float64, device=device)
    bad_part = torch.zeros(P, dtype=torch.int8, device=device)
    accept = torch.zeros(1, dtype=torch.int8, device=device)
    w_scalar = torch.tensor(float(weight), dtype=acc, device=device)
    args = (ws[0], w_meta, meta, base, c_meta, work, row_inv, col_inv, sums, cover, accept, w_scalar, ssq_part,
            bad_part, SR, SC)  # fmt: skip
    flags = dict(OVERLAP=mode == "overlap", ACC64=acc == torch.float64, BLOCK=block)
    if P:
        _accumulate_packed_kernel[(P,)](*args, ADD=False, **flags)
    bad = bad_part.amax().to(torch.float64) if P else torch.zeros((), dtype=torch.float64, device=device)
    ssq = ssq_part.sum() if P else torch.zeros((), dtype=torch.float64, device=device)
    ok = (bad == 0) & (ssq <= max_ssq)
    accept.copy_(ok.to(torch.int8).reshape(1))
    if P and weight > 0:
        _accumulate_packed_kernel[(P,)](*args, ADD=True, **flags)
    stats[0] = bad
    stats[1] = ssq
    stats[2] = ok.to(torch.float64)


def fold_packed(
    weights: Sequence[Tensor],
    clients: Sequence[Tensor],
    parts: Sequence[int],
    tables: LayoutTables,
    coef: Tensor,
    mode: str,
    sums_in: Tensor | None,
    cover_in: Tensor | None,
    sums_out: Tensor,
    cover_out: Tensor,
    stats: Tensor,
    plan: int = -1,
) -> None:
    """Fold the K clients into the partial sums (``*_in`` -> ``*_out``; None: from zeros, the
    outputs zeroed and folded in place); ``stats`` (K, 2) as ``aggregate_packed``. See the
    module docs."""
    meta, row_inv, col_keep, counts, offsets = tables
    op = "fold_packed"
    ws = [w.contiguous() for w in weights]
    device = sums_out.device
    K = _check_tables(op, ws, {"meta": meta, "row_inv": row_inv, "col_keep": col_keep, "counts": counts,
                               "offsets": offsets}, device)  # fmt: skip
    _check_clients(op, clients, parts, K, len(ws), device)
    _check_flat(op, "coef", coef, K, torch.float64, device)
    _check_flat(op, "stats", stats.view(-1), 2 * K, torch.float64, device)
    SR = row_inv.shape[1]
    SC = col_keep.shape[1]
    views = [_view3(w) for w in ws]
    base, c_meta = _clients_in_place(op, clients, list(parts), views, counts, offsets)
    w_meta, block, work, P = _partials_grid(
        "fold_packed", ws, views, [t for t in (sums_in, sums_out) if t is not None],
        [t for t in (cover_in, cover_out) if t is not None], device,
    )  # fmt: skip
    if sums_in is None:  # from zeros: the outputs zeroed (once checked), then folded in place
        sums_in, cover_in = sums_out.zero_(), cover_out.zero_()
    col_inv = _col_inverse(meta, col_keep, counts, tuple(Cin for _, Cin, _ in views))
    acc = sums_out.dtype
    p = coef.to(device=device, dtype=acc)
    ssq_part = torch.zeros((P, K), dtype=torch.float64, device=device)
    bad_part = torch.zeros((P, K), dtype=torch.int8, device=device)
    if P and K:
        _fold_packed_kernel[(P,)](
            ws[0], w_meta, meta, base, c_meta, work, row_inv, col_inv, p, sums_in, cover_in, sums_out, cover_out,
            ssq_part, bad_part, K, SR, SC, OVERLAP=mode == "overlap", ACC64=acc == torch.float64, BLOCK=block,
        )  # fmt: skip
    elif sums_out.data_ptr() != sums_in.data_ptr():
        sums_out.copy_(sums_in)
        cover_out.copy_(cover_in)
    stats[:, 0] = bad_part.amax(0).to(torch.float64) if P else 0.0
    stats[:, 1] = ssq_part.sum(0) if P else 0.0


def finish_partials(
    weights: Sequence[Tensor], sums: Tensor, cover: Tensor, weight_sum: float, mode: str, out: Tensor
) -> None:
    """The new global model from the partial sums, packed into ``out``. See the module docs."""
    ws = [w.contiguous() for w in weights]
    device = out.device
    views = [_view3(w) for w in ws]
    w_meta, block, work, P = _partials_grid("finish_partials", ws, views, [sums, out], [cover], device)
    acc = sums.dtype
    if P:
        wsum = torch.tensor(float(weight_sum), dtype=acc, device=device)
        _finish_partials_kernel[(P,)](
            ws[0], w_meta, work, sums, cover, out, wsum, OVERLAP=mode == "overlap", ACC64=acc == torch.float64,
            BLOCK=block,
        )  # fmt: skip
