"""Slicing compact tensors out of a weight (``cahfp::slice_channels`` and its whole-model form)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._views import as_3d
from ._common import kept_indices


def _client_slices(weight: Tensor, rows: Tensor, cols: Tensor) -> list[Tensor]:
    """Client k's ``weight[rows_k][:, cols_k]`` of the ``(R, Cin, T)`` view, flattened, for each k."""
    w3 = as_3d(weight)
    return [w3[kept_indices(rows[k])][:, kept_indices(cols[k])].reshape(-1) for k in range(rows.shape[0])]


def slice_channels(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    """Packed compact tensors: client k's ``weight[rows_k][:, cols_k]`` flattened, in client order.

    weight: N-D. Returns a 1-D tensor of ``total`` elements, weight's dtype.
    """
    parts = _client_slices(weight, rows, cols)
    out = torch.cat(parts) if parts else weight.new_empty(0)
    if out.numel() != total:
        raise ValueError(f"slice_channels: total must be {out.numel()}, got {total}")
    return out


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
