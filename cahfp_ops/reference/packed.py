"""The per-round layout ops (``cahfp::slice_packed``, ``aggregate_packed``, ``accumulate_packed``,
``fold_packed``, ``finish_partials``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._dtypes import acc_dtype
from .._layout_tables import LayoutTables
from .aggregate import reconstruct_aggregate


def _layout_entry(meta: Tensor, counts: Tensor, n: int, k: int) -> tuple[int, int, int, int, int, int, int]:
    R, Cin, T, roff, coff = (int(x) for x in meta[n])
    rc, cc = (int(x) for x in counts[k, n])
    return R, Cin, T, roff, coff, rc, cc


def _layout_keeps(row_inv: Tensor, col_keep: Tensor, k: int, R: int, roff: int, coff: int, cc: int):
    """Client k's kept rows (ascending) and columns of one tensor, from the layout tables."""
    inv = row_inv[k, roff : roff + R].to(torch.int64)
    rows = inv.ge(0).nonzero().flatten()
    rows = rows[torch.argsort(inv[rows])]
    cols = col_keep[k, coff : coff + cc].to(torch.int64)
    return rows, cols


def slice_packed(
    weights: list[Tensor], tables: LayoutTables, out: Tensor
) -> None:
    """Client k's ``weight_n[rows][:, cols]`` (the ``(R, Cin, T)`` view) into ``out[starts[k, n]:]``.
    Written into a copy first, so a call that raises on bad tables leaves ``out`` as it was."""
    meta, row_inv, col_keep, counts, starts = tables
    K = row_inv.shape[0]
    buf = out.clone()
    for n, w in enumerate(weights):
        w3 = w.reshape(*(int(x) for x in meta[n, :3]))
        for k in range(K):
            R, Cin, T, roff, coff, rc, cc = _layout_entry(meta, counts, n, k)
            rows, cols = _layout_keeps(row_inv, col_keep, k, R, roff, coff, cc)
            s = int(starts[k, n])
            if s < 0 or s + rc * cc * T > buf.numel():
                raise ValueError(f"slice_packed: the layout's starts of client {k}, tensor {n} are out of range")
            buf[s : s + rc * cc * T] = w3[rows][:, cols].reshape(-1)
    out.copy_(buf)


def _client_tensors(clients: list[Tensor], parts: list[int], meta: Tensor, counts: Tensor, offsets: Tensor, k: int):
    """Client k's N compact tensors as ``(rows, cols, T)`` views, from its packed buffer
    (``parts[k] == 0``) or its N tensors (``parts[k] == N``)."""
    N = meta.shape[0]
    if len(parts) != counts.shape[0] or any(p not in (0, N) for p in parts):
        raise ValueError(f"the client forms {list(parts)} do not fit {counts.shape[0]} clients of {N} tensors")
    start = sum(1 if p == 0 else p for p in parts[:k])
    out = []
    for n in range(N):
        R, Cin, T, roff, coff, rc, cc = _layout_entry(meta, counts, n, k)
        if parts[k] == 0:
            off = int(offsets[k, n])
            if off < 0 or off + rc * cc * T > clients[start].numel():
                raise ValueError(f"the buffer of client {k} is too short for tensor {n} at offset {off}")
            out.append(clients[start][off : off + rc * cc * T].reshape(rc, cc, T))
        else:
            c = clients[start + n]
            c3 = c.reshape(1, c.shape[0], 1) if c.dim() == 1 else c.reshape(c.shape[0], c.shape[1], T)
            out.append(c3[:rc, :cc])
    return out


def _delta_stats(compact: Tensor, w_kept: Tensor, wdtype: torch.dtype) -> tuple[bool, float]:
    """(non-finite, sum of squared deltas) of one compact tensor against the global's kept entries."""
    acc = acc_dtype(wdtype)
    d = compact.to(acc) - w_kept.to(acc)
    bad = not bool(torch.isfinite(d).all()) or not bool(torch.isfinite(compact.to(wdtype)).all())
    return bad, float(d.double().square().sum())


def aggregate_packed(
    weights: list[Tensor],
    clients: list[Tensor],
    parts: list[int],
    tables: LayoutTables,
    coef: Tensor,
    mode: str,
    out: Tensor,
    stats: Tensor,
    plan: int = -1,
) -> None:
    """:func:`reconstruct_aggregate` per tensor on the layout's keep sets, packed into ``out``;
    ``stats[k]`` = (non-finite flag, sum of squared deltas over client k's kept elements)."""
    meta, row_inv, col_keep, counts, offsets = tables
    K = row_inv.shape[0]
    per_client = [_client_tensors(clients, parts, meta, counts, offsets, k) for k in range(K)]
    bad = [False] * K
    ssq = [0.0] * K
    offset = 0
    result = out.clone()  # written whole at the end: a call that raises leaves out as it was
    for n, w in enumerate(weights):
        R, Cin, T = (int(x) for x in meta[n, :3])
        w3 = w.reshape(R, Cin, T)
        rows = torch.full((K, max(R, 1)), -1, dtype=torch.int64, device=w.device)
        cols = torch.full((K, max(Cin, 1)), -1, dtype=torch.int64, device=w.device)
        for k in range(K):
            _, _, _, roff, coff, rc, cc = _layout_entry(meta, counts, n, k)
            r, c = _layout_keeps(row_inv, col_keep, k, R, roff, coff, cc)
            rows[k, : r.numel()] = r
            cols[k, : c.numel()] = c
            b, q = _delta_stats(per_client[k][n], w3[r][:, c], w.dtype)
            bad[k] |= b
            ssq[k] += q
        res = reconstruct_aggregate(w3, [per_client[k][n] for k in range(K)], rows, cols, coef, mode)
        result[offset : offset + w.numel()] = res.reshape(-1)
        offset += w.numel()
    out.copy_(result)
    stats[:, 0] = torch.tensor([float(b) for b in bad], dtype=torch.float64)
    stats[:, 1] = torch.tensor(ssq, dtype=torch.float64)


def _client_entries(weights: list[Tensor], tensors: list[Tensor], meta, counts, row_inv, col_keep, k: int):
    """Per tensor: its ``(R, Cin, T)`` view, client k's kept rows and columns; and client k's
    (non-finite, squared delta sum) over all its tensors."""
    entries = []
    bad, ssq = False, 0.0
    for n, w in enumerate(weights):
        R, Cin, T, roff, coff, rc, cc = _layout_entry(meta, counts, n, k)
        w3 = w.reshape(R, Cin, T)
        r, c = _layout_keeps(row_inv, col_keep, k, R, roff, coff, cc)
        b, q = _delta_stats(tensors[n], w3[r][:, c], w.dtype)
        bad, ssq = bad or b, ssq + q
        entries.append((w3, r, c))
    return entries, bad, ssq


def _fold_client(entries, tensors: list[Tensor], weight: float, mode: str, sums: Tensor, cover: Tensor) -> None:
    """``sums += weight * (c - w)`` (reconstruct) or ``weight * c`` (overlap) at the client's
    kept elements, ``cover += weight`` at its kept (row, column) pairs, in place."""
    acc = sums.dtype
    offset = coffset = 0
    for n, (w3, r, c) in enumerate(entries):
        R, Cin, T = w3.shape
        s3 = sums[offset : offset + R * Cin * T].view(R, Cin, T)
        cov = cover[coffset : coffset + R * Cin].view(R, Cin)
        compact = tensors[n]
        value = compact.to(acc) - w3[r][:, c].to(acc) if mode == "reconstruct" else compact.to(acc)
        idx = (r.view(-1, 1), c.view(1, -1))
        s3.index_put_(idx, s3[idx] + torch.tensor(weight, dtype=acc) * value)
        cov.index_put_(idx, cov[idx] + torch.tensor(weight, dtype=acc))
        offset += R * Cin * T
        coffset += R * Cin


def accumulate_packed(
    weights: list[Tensor],
    client: list[Tensor],
    parts: list[int],
    tables: LayoutTables,
    weight: float,
    max_ssq: float,
    mode: str,
    sums: Tensor,
    cover: Tensor,
    stats: Tensor,
) -> None:
    """Check one client, then fold it in: ``sums += weight * (c - w)`` (reconstruct) or
    ``weight * c`` (overlap) at its kept elements, ``cover += weight`` at its kept (row,
    column) pairs, only when it is finite and its squared delta sum is at most ``max_ssq``.
    ``stats`` (3,): non-finite flag, squared delta sum, accepted. The sums are folded in
    copies first, so a call that raises leaves them as they were."""
    meta, row_inv, col_keep, counts, offsets = tables
    tensors = _client_tensors(client, parts, meta, counts, offsets, 0)
    entries, bad, ssq = _client_entries(weights, tensors, meta, counts, row_inv, col_keep, 0)
    accept = not bad and ssq <= max_ssq
    if accept and weight > 0:
        s, c = sums.clone(), cover.clone()
        _fold_client(entries, tensors, weight, mode, s, c)
        sums.copy_(s)
        cover.copy_(c)
    stats[0] = float(bad)
    stats[1] = ssq
    stats[2] = float(accept)


def fold_packed(
    weights: list[Tensor],
    clients: list[Tensor],
    parts: list[int],
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
    """``sums_out, cover_out = sums_in, cover_in`` (zeros when None), then the layout's K
    clients folded in one by one in order (each as :func:`accumulate_packed` folds, with
    weight ``coef[k]``, none rejected; coefficient 0 adds nothing); ``stats[k]`` =
    (non-finite flag, squared delta sum)."""
    meta, row_inv, col_keep, counts, offsets = tables
    K = row_inv.shape[0]
    s = torch.zeros_like(sums_out) if sums_in is None else sums_in.clone()
    c = torch.zeros_like(cover_out) if cover_in is None else cover_in.clone()
    for k in range(K):
        tensors = _client_tensors(clients, parts, meta, counts, offsets, k)
        entries, bad, ssq = _client_entries(weights, tensors, meta, counts, row_inv, col_keep, k)
        if float(coef[k]) > 0:
            _fold_client(entries, tensors, float(coef[k]), mode, s, c)
        stats[k, 0] = float(bad)
        stats[k, 1] = ssq
    sums_out.copy_(s)
    cover_out.copy_(c)


def finish_partials(
    weights: list[Tensor], sums: Tensor, cover: Tensor, weight_sum: float, mode: str, out: Tensor
) -> None:
    """The new global model from partial sums, packed into ``out``: where an element's (row,
    column) cover weight is > 0, ``w + sums / weight_sum`` (reconstruct) or ``sums / cover``
    (overlap), computed in the accumulation dtype; elsewhere ``w``."""
    offset = coffset = 0
    result = out.clone()  # written whole at the end: a call that raises leaves out as it was
    for w in weights:
        R, Cin = (1, w.shape[0]) if w.dim() == 1 else (w.shape[0], w.shape[1])
        T = w.numel() // max(R * Cin, 1)
        s = sums[offset : offset + w.numel()].view(R, Cin, T)
        c = cover[coffset : coffset + R * Cin].view(R, Cin, 1)
        w3 = w.reshape(R, Cin, T)
        if mode == "reconstruct":
            value = s / torch.tensor(weight_sum, dtype=s.dtype) + w3.to(s.dtype)
        else:
            value = s / torch.where(c > 0, c, torch.ones_like(c))
        result[offset : offset + w.numel()] = torch.where(c > 0, value.to(w.dtype), w3).reshape(-1)
        offset += w.numel()
        coffset += R * Cin
    out.copy_(result)
