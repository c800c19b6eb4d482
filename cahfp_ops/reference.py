"""The pure-PyTorch reference backend (backend ``torch``).

The functions take the canonical inputs every backend takes (see
``cahfp_ops/_operators.py``): N-D weights, ``(K, m)`` int64 keep sets padded with -1, a
normalised ``(K,)`` float64 coefficient tensor. They are written for clarity, not speed:
they define what the compiled backends must compute. Use them through the public API with
``cahfp_ops.use_backend("torch")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._dtypes import acc_dtype
from ._views import as_3d


def _kept(padded_row: Tensor) -> Tensor:
    """The kept indices of one -1-padded keep-set row."""
    return padded_row[padded_row >= 0]


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


def _client_slices(weight: Tensor, rows: Tensor, cols: Tensor) -> list[Tensor]:
    """Client k's ``weight[rows_k][:, cols_k]`` of the ``(R, Cin, T)`` view, flattened, for each k."""
    w3 = as_3d(weight)
    return [w3[_kept(rows[k])][:, _kept(cols[k])].reshape(-1) for k in range(rows.shape[0])]


def slice_channels(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    """Packed compact tensors: client k's ``weight[rows_k][:, cols_k]`` flattened, in client order.

    weight: N-D. Returns a 1-D tensor of ``total`` elements, weight's dtype.
    """
    parts = _client_slices(weight, rows, cols)
    out = torch.cat(parts) if parts else weight.new_empty(0)
    if out.numel() != total:
        raise ValueError(f"slice_channels: total must be {out.numel()}, got {total}")
    return out


def reconstruct_aggregate(
    weight: Tensor, clients: Sequence[Tensor], rows: Tensor, cols: Tensor, coef: Tensor, mode: str
) -> Tensor:
    """Aggregate K compact clients into a new tensor shaped like the N-D ``weight`` (see SPEC.md).

    ``reconstruct``: ``weight + sum_k p_k E_k(c_k - weight[rows_k][:, cols_k])``.
    ``overlap``: the coef-weighted mean of the clients that keep each element.
    Elements no client keeps (with a positive weight) are copied from ``weight``.
    Clients with weight 0 are skipped. Accumulates in float32 (float64 for float64).
    """
    shape = weight.shape
    weight = as_3d(weight)
    clients = [as_3d(c) for c in clients]
    acc = acc_dtype(weight.dtype)
    R, Cin, T = weight.shape
    w = weight.to(acc)
    total = torch.zeros_like(w)
    den = torch.zeros(R, Cin, dtype=acc, device=weight.device)
    covered = torch.zeros(R, Cin, dtype=torch.bool, device=weight.device)
    p = coef.to(acc)
    for k, client in enumerate(clients):
        r, c = _kept(rows[k]), _kept(cols[k])
        if r.numel() == 0 or c.numel() == 0 or float(coef[k]) == 0.0:
            continue
        compact = client[: r.numel(), : c.numel()].to(acc)
        if mode == "reconstruct":
            compact = compact - w[r][:, c]
        wide = torch.zeros(r.numel(), Cin, T, dtype=acc, device=weight.device)
        wide[:, c] = p[k] * compact
        total.index_add_(0, r, wide)
        if mode == "overlap":
            wide_den = torch.zeros(r.numel(), Cin, dtype=acc, device=weight.device)
            wide_den[:, c] = p[k]
            den.index_add_(0, r, wide_den)
        covered[r.unsqueeze(1), c.unsqueeze(0)] = True
    if mode == "reconstruct":
        result = w + total
    else:
        result = total / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)
    return torch.where(covered.unsqueeze(-1), result.to(weight.dtype), weight).view(shape)


def robust_aggregate(
    weight: Tensor,
    clients: Sequence[Tensor],
    rows: Tensor,
    cols: Tensor,
    coef: Tensor,
    mode: str,
    reduce: str,
    trim: float,
    *,
    chunk: int = 1 << 16,
) -> Tensor:
    """Robust reducers (SPEC, "Robust reducers"): per element, the weighted median
    (``reduce="median"``) or weighted trimmed mean (``"trimmed_mean"``, ``trim`` of the weight
    cut from each end) of the participants' deltas ``c_k - weight``, added to ``weight``.

    ``coef``: ``(K,)`` float64 as given (not normalised). Participants: clients with coef > 0;
    in ``reconstruct`` mode the ones that do not keep an element take part with delta 0, in
    ``overlap`` mode only keepers do. Values are sorted ascending with ties by client index
    (a stable sort); cumulative weights are float64 in sorted order. Elements no participant
    keeps are ``weight``; a NaN among an element's participants makes it NaN. Works through
    ``chunk`` elements at a time, so memory is O(K * chunk) beyond the output.
    """
    shape = weight.shape
    weight = as_3d(weight)
    clients = [as_3d(c) for c in clients]
    acc = acc_dtype(weight.dtype)
    R, Cin, T = weight.shape
    K = len(clients)
    device = weight.device
    coef = coef.to(device=device, dtype=torch.float64)
    out = torch.empty(R * Cin * T, dtype=weight.dtype, device=device)
    kept_sets = [(_kept(rows[k]), _kept(cols[k])) for k in range(K)]
    part_k = (coef > 0).unsqueeze(1)
    step = max(1, chunk // max(1, Cin * T))
    for r0 in range(0, R, step):  # a block of rows at a time: O(K * chunk) memory
        r1 = min(R, r0 + step)
        w = weight[r0:r1].to(acc).reshape(-1)
        d = torch.zeros(K, w.numel(), dtype=acc, device=device)
        kp = torch.zeros(K, w.numel(), dtype=torch.bool, device=device)
        for k, client in enumerate(clients):
            r, c = kept_sets[k]
            if r.numel() == 0 or c.numel() == 0 or not float(coef[k]) > 0:
                continue
            sel = ((r >= r0) & (r < r1)).nonzero().flatten()
            if sel.numel() == 0:
                continue
            local = ((r[sel] - r0)[:, None] * Cin + c[None, :])[..., None] * T + torch.arange(T, device=device)
            compact = client[sel][:, : c.numel()].to(acc).reshape(-1)
            pos = local.reshape(-1)
            d[k, pos] = compact - w[pos]
            kp[k, pos] = True
        part = kp if mode == "overlap" else part_k.expand_as(kp)
        wts = torch.where(part, coef.unsqueeze(1), 0.0)
        key = torch.where(part, d, torch.zeros_like(d))
        # non-participants last: sort by value, then (stably) by "not a participant"
        _, idx = torch.sort(torch.where(part, key, torch.full_like(key, float("inf"))), dim=0, stable=True)
        flag_order = torch.sort((~part.gather(0, idx)).to(torch.uint8), dim=0, stable=True).indices
        idx = idx.gather(0, flag_order)
        v = key.gather(0, idx)
        cum = wts.gather(0, idx).cumsum(0)
        total = cum[-1]
        if reduce == "median":
            first = (2 * cum >= total).to(torch.uint8).argmax(0)  # first i with cum_i >= W / 2
            a = v.gather(0, first.unsqueeze(0))[0]
            b = v.gather(0, (first + 1).clamp(max=K - 1).unsqueeze(0))[0]
            on_boundary = 2 * cum.gather(0, first.unsqueeze(0))[0] == total
            res = torch.where(on_boundary & (first + 1 < K), a + (b - a) / 2, a)
        else:
            lo, hi = trim * total, total - trim * total
            before = torch.cat([torch.zeros_like(cum[:1]), cum[:-1]])
            kept = (torch.minimum(cum, hi) - torch.maximum(before, lo)).clamp(min=0)
            share = (kept / kept.sum(0)).to(acc)
            res = torch.where(kept > 0, share * v, torch.zeros_like(v)).sum(0)
        res = torch.where((torch.isnan(d) & part).any(0), torch.full_like(res, float("nan")), res)
        covered = (kp & part_k).any(0)
        wr = weight[r0:r1].reshape(-1)
        out[r0 * Cin * T : r1 * Cin * T] = torch.where(covered, (w + res).to(weight.dtype), wr)
    return out.view(shape)


def slice_channels_many(
    weights: list[Tensor], rows: list[Tensor], cols: list[Tensor], row_counts: list[int], col_counts: list[int]
) -> Tensor:
    """Every client's compact tensors of N weights, packed client-major (client 0's N, then client 1's, ...)."""
    K = rows[0].shape[0]
    per_client: list[list[Tensor]] = [[] for _ in range(K)]
    for n, w in enumerate(weights):
        inner = as_3d(w).shape[2]
        for k, part in enumerate(_client_slices(w, rows[n], cols[n])):
            expected = row_counts[n * K + k] * col_counts[n * K + k] * inner
            if part.numel() != expected:
                raise ValueError(f"slice_channels_many: tensor {n}, client {k}: counts give {expected} elements")
            per_client[k].append(part)
    parts = [p for ps in per_client for p in ps]
    return torch.cat(parts) if parts else weights[0].new_empty(0)


def reconstruct_aggregate_many(
    weights: list[Tensor], clients: list[Tensor], rows: list[Tensor], cols: list[Tensor], coef: Tensor, mode: str
) -> Tensor:
    """The N results of :func:`reconstruct_aggregate` (``clients[n * K + k]``), packed in order."""
    K = len(clients) // len(weights)
    parts = [
        reconstruct_aggregate(w, clients[n * K : (n + 1) * K], rows[n], cols[n], coef, mode).reshape(-1)
        for n, w in enumerate(weights)
    ]
    return torch.cat(parts)


# --------------------------------------------------------------------------- per-round layout ops
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
    weights: list[Tensor], meta: Tensor, row_inv: Tensor, col_keep: Tensor, counts: Tensor, starts: Tensor, out: Tensor
) -> None:
    """Client k's ``weight_n[rows][:, cols]`` (the ``(R, Cin, T)`` view) into ``out[starts[k, n]:]``.
    Written into a copy first, so a call that raises on bad tables leaves ``out`` as it was."""
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
    meta: Tensor,
    row_inv: Tensor,
    col_keep: Tensor,
    counts: Tensor,
    offsets: Tensor,
    coef: Tensor,
    mode: str,
    out: Tensor,
    stats: Tensor,
) -> None:
    """:func:`reconstruct_aggregate` per tensor on the layout's keep sets, packed into ``out``;
    ``stats[k]`` = (non-finite flag, sum of squared deltas over client k's kept elements)."""
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
    meta: Tensor,
    row_inv: Tensor,
    col_keep: Tensor,
    counts: Tensor,
    offsets: Tensor,
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
    meta: Tensor,
    row_inv: Tensor,
    col_keep: Tensor,
    counts: Tensor,
    offsets: Tensor,
    coef: Tensor,
    mode: str,
    sums_in: Tensor,
    cover_in: Tensor,
    sums_out: Tensor,
    cover_out: Tensor,
    stats: Tensor,
) -> None:
    """``sums_out, cover_out = sums_in, cover_in``, then the layout's K clients folded in one
    by one in order (each as :func:`accumulate_packed` folds, with weight ``coef[k]``, none
    rejected; coefficient 0 adds nothing); ``stats[k]`` = (non-finite flag, squared delta sum)."""
    K = row_inv.shape[0]
    s = sums_in.clone()
    c = cover_in.clone()
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
