"""The plain-PyTorch peers the benchmarks compare against, on the public list form (a list
of compact client tensors, a list of 1-D keep sets or None).

:func:`naive_reconstruct_aggregate` is the loop most FL code runs (clone, assign, accumulate
per client); :func:`indexadd_reconstruct_aggregate` is the best plain variant (widen each
delta to full rows, then ``index_add_`` along dim 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cahfp_ops._dtypes import acc_dtype


def _full_index(keep: Tensor | None, size: int, device: torch.device) -> Tensor:
    return torch.arange(size, device=device) if keep is None else keep.to(device=device, dtype=torch.int64)


def _defaults(K: int, cols, coef) -> tuple[list, list[float]]:
    """(cols, normalised coef) with None meaning all columns / equal weights."""
    coef = [1.0 / K] * K if coef is None else [float(c) / sum(coef) for c in coef]
    return ([None] * K if cols is None else cols), coef


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
    cols, coef = _defaults(K, cols, coef)
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
    cols, coef = _defaults(K, cols, coef)
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


def plain_streaming_aggregate(
    model: dict[str, Tensor],
    clients: Sequence[dict[str, Tensor]],
    rows: dict[str, Sequence[Tensor | None]],
    cols: dict[str, Sequence[Tensor | None]],
    coef: Sequence[float],
) -> dict[str, Tensor]:
    """Plain-PyTorch streaming (what FL frameworks write): running float32 sums of weighted
    deltas, folded client by client and tensor by tensor with advanced indexing, then
    ``w + sums / sum(coef)`` where some client kept the element. Benchmark peer."""
    sums = {n: torch.zeros_like(w, dtype=acc_dtype(w.dtype)) for n, w in model.items()}
    kept = {n: torch.zeros(w.shape[:2] if w.dim() > 1 else w.shape, dtype=torch.bool) for n, w in model.items()}
    for k, client in enumerate(clients):
        for n, w in model.items():
            r = _full_index(rows.get(n, [None] * len(clients))[k], w.shape[0], w.device)
            if w.dim() == 1:
                sums[n][r] += coef[k] * (client[n].to(sums[n].dtype) - w[r].to(sums[n].dtype))
                kept[n][r] = True
                continue
            c = _full_index((cols.get(n) or [None] * len(clients))[k], w.shape[1], w.device)
            idx = (r[:, None], c[None, :])
            sums[n][idx] += coef[k] * (client[n].to(sums[n].dtype) - w[idx].to(sums[n].dtype))
            kept[n][idx] = True
    total = float(sum(coef))
    out = {}
    for n, w in model.items():
        mask = kept[n].reshape(*kept[n].shape, *([1] * (w.dim() - kept[n].dim())))
        out[n] = torch.where(mask, (w.to(sums[n].dtype) + sums[n] / total).to(w.dtype), w)
    return out
