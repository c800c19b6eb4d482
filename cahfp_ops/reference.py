"""Pure-PyTorch reference implementations (backend ``torch``).

The first four functions are the reference kernels behind backend ``"torch"``.
They take the canonical forms the public ops build (see ``cahfp_ops._inputs``):
weights as ``(R, Cin, T)`` views, keep sets as ``(K, m)`` int64 tensors padded
with -1, coefficients as a normalised ``(K,)`` float64 tensor. Use them through
the public API with ``cahfp_ops.use_backend("torch")``.

The last two are the plain-PyTorch peers that benchmarks compare against, on the
public list form (a list of compact client tensors, a list of 1-D keep sets):
:func:`naive_reconstruct_aggregate` (clone, assign, accumulate per client) and
:func:`indexadd_reconstruct_aggregate` (widen each delta to full rows, then
``index_add_`` along dim 0), which is also how :func:`reconstruct_aggregate` works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._inputs import acc_dtype


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
    return total.sum(dim=dims) if dims else total


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


def slice_channels(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    """Packed compact tensors: client k's ``weight[rows_k][:, cols_k]`` flattened, in client order.

    weight: ``(R, Cin, T)``. Returns a 1-D tensor of ``total`` elements, weight's dtype.
    """
    parts = [weight[_kept(rows[k])][:, _kept(cols[k])].reshape(-1) for k in range(rows.shape[0])]
    out = torch.cat(parts) if parts else weight.new_empty(0)
    if out.numel() != total:
        raise ValueError(f"slice_channels: total must be {out.numel()}, got {total}")
    return out


def reconstruct_aggregate(
    weight: Tensor, clients: Sequence[Tensor], rows: Tensor, cols: Tensor, coef: Tensor, mode: str
) -> Tensor:
    """Aggregate K compact clients into a full ``(R, Cin, T)`` tensor (see SPEC.md).

    ``reconstruct``: ``weight + sum_k p_k E_k(c_k - weight[rows_k][:, cols_k])``.
    ``overlap``: the coef-weighted mean of the clients that keep each element.
    Elements no client keeps (with a positive weight) are copied from ``weight``.
    Clients with weight 0 are skipped. Accumulates in float32 (float64 for float64).
    """
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
        result = total / den.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1)
    return torch.where(covered.unsqueeze(-1), result.to(weight.dtype), weight)


def _full_index(keep: Tensor | None, size: int, device: torch.device) -> Tensor:
    return torch.arange(size, device=device) if keep is None else keep.to(device=device, dtype=torch.int64)


def naive_reconstruct_aggregate(
    weight: Tensor,
    clients: Sequence[Tensor],
    rows: Sequence[Tensor | None],
    cols: Sequence[Tensor | None] | None = None,
    coef: Sequence[float] | None = None,
) -> Tensor:
    """The plain loop most FL code runs: per client, clone the global, assign, accumulate.

    Benchmark peer. weight: ``(R, Cin, ...)``; clients[k]: ``(len(rows[k]), len(cols[k]), ...)``.
    """
    K = len(clients)
    coef = [1.0 / K] * K if coef is None else [float(c) / sum(coef) for c in coef]
    cols = [None] * K if cols is None else cols
    out = torch.zeros_like(weight, dtype=acc_dtype(weight.dtype))
    for k in range(K):
        full = weight.clone()
        r = _full_index(rows[k], weight.shape[0], weight.device)
        if weight.dim() == 1:
            full[r] = clients[k]
        else:
            c = _full_index(cols[k], weight.shape[1], weight.device)
            full[r.unsqueeze(1), c.unsqueeze(0)] = clients[k]
        out += coef[k] * full
    return out.to(weight.dtype)


def indexadd_reconstruct_aggregate(
    weight: Tensor,
    clients: Sequence[Tensor],
    rows: Sequence[Tensor | None],
    cols: Sequence[Tensor | None] | None = None,
    coef: Sequence[float] | None = None,
) -> Tensor:
    """The best plain-PyTorch variant: per client, widen the delta to full rows and ``index_add_``.

    Benchmark peer; same arguments as :func:`naive_reconstruct_aggregate`.
    """
    K = len(clients)
    coef = [1.0 / K] * K if coef is None else [float(c) / sum(coef) for c in coef]
    cols = [None] * K if cols is None else cols
    acc = acc_dtype(weight.dtype)
    w = weight.to(acc)
    total = torch.zeros_like(w)
    for k in range(K):
        r = _full_index(rows[k], weight.shape[0], weight.device)
        if weight.dim() == 1:
            total.index_add_(0, r, coef[k] * (clients[k].to(acc) - w[r]))
            continue
        c = _full_index(cols[k], weight.shape[1], weight.device)
        wide = torch.zeros((r.numel(), *weight.shape[1:]), dtype=acc, device=weight.device)
        wide[:, c] = coef[k] * (clients[k].to(acc) - w[r][:, c])
        total.index_add_(0, r, wide)
    return (w + total).to(weight.dtype)
