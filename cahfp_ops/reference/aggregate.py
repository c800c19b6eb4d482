"""Mean reconstruct / overlap aggregation (``cahfp::reconstruct_aggregate`` and its whole-model form)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._dtypes import acc_dtype
from .._views import as_3d
from ._common import kept_indices


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
        r, c = kept_indices(rows[k]), kept_indices(cols[k])
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
