"""Backward formulas of the linear operators: slicing and mean aggregation.

``slice_channels`` copies entries, ``reconstruct_aggregate`` with ``reduce="mean"`` is linear
in the global tensor and in every client tensor (the coefficients are constants), so both have
exact, cheap gradients. They are written with plain torch ops on the canonical inputs of
``cahfp_ops/_operators.py`` (so they run on every device and backend alike), and accumulate in
float32 (float64 for float64), in client order: deterministic.

Per element ``e`` of a weight, with ``p_k`` the normalised coefficients, ``kept_k(e)`` client
k's membership and ``cover(e) = sum_k p_k kept_k(e)``:

* reconstruct: ``out = w + sum_k p_k kept_k (c_k - w)``, so ``dw = g (1 - cover)`` and
  ``dc_k = p_k g`` at client k's kept entries;
* overlap: ``out = sum_k p_k kept_k c_k / cover`` where ``cover > 0``, else ``w``, so
  ``dw = g [cover == 0]`` and ``dc_k = p_k g / cover`` at client k's kept entries;
* slicing: ``dw`` is the sum over clients of their gradients placed at their kept entries.

Gradients with respect to keep sets and coefficients are None (integers; the coefficients are
documented as constants and refused when they require grad).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._dtypes import acc_dtype


def _kept(padded: Tensor) -> list[Tensor]:
    """Each client's keep set from a ``(K, m)`` -1 padded table."""
    return [row[row >= 0] for row in padded]


def _masks(padded: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """``(K, size)`` 0/1 membership of each client's keep set."""
    mask = torch.zeros(padded.shape[0], size + 1, dtype=dtype, device=padded.device)
    mask.scatter_(1, torch.where(padded >= 0, padded, size), 1.0)
    return mask[:, :size]


def _gather(g: Tensor, rows: Tensor, cols: Tensor | None) -> Tensor:
    """``g[rows][:, cols]`` (1-D: ``g[rows]``)."""
    if cols is None:
        return g.index_select(0, rows)
    return g.index_select(0, rows).index_select(1, cols)


def _place(shape: torch.Size, dtype: torch.dtype, part: Tensor) -> Tensor:
    """``part`` in the leading corner of a zero tensor of ``shape`` (a stacked client's
    padding region gets no gradient)."""
    if tuple(part.shape) == tuple(shape):
        return part.to(dtype)
    out = torch.zeros(shape, dtype=dtype, device=part.device)
    out[tuple(slice(0, n) for n in part.shape)] = part.to(dtype)
    return out


def aggregate_grads(
    weight_shape: torch.Size,
    weight_dtype: torch.dtype,
    client_meta: list[tuple[torch.Size, torch.dtype]],
    rows: Tensor,
    cols: Tensor,
    coef: Tensor,
    mode: str,
    grad: Tensor,
) -> tuple[Tensor, list[Tensor]]:
    """(d weight, [d client k]) of one mean aggregation, given d out."""
    acc = acc_dtype(weight_dtype)
    g = grad.to(acc)
    one_d = len(weight_shape) == 1
    p = coef.to(acc)
    row_mask = _masks(rows, weight_shape[0], acc)
    if one_d:
        cover = (p[:, None] * row_mask).sum(0)
    else:
        col_mask = _masks(cols, weight_shape[1], acc)
        cover = torch.einsum("k,kr,kc->rc", p, row_mask, col_mask)
        cover = cover.reshape(*cover.shape, *([1] * (len(weight_shape) - 2)))
    if mode == "reconstruct":
        d_weight = g * (1 - cover)
        scaled = g
    else:
        covered = cover > 0
        d_weight = torch.where(covered, torch.zeros_like(g), g)
        scaled = torch.where(covered, g / torch.where(covered, cover, torch.ones_like(cover)), torch.zeros_like(g))
    d_clients = []
    for k, (r, (shape, dtype)) in enumerate(zip(_kept(rows), client_meta)):
        c = None if one_d else cols[k][cols[k] >= 0]
        d_clients.append(_place(shape, dtype, p[k] * _gather(scaled, r, c)))
    return d_weight.to(weight_dtype), d_clients


def slice_grad(weight_shape: torch.Size, weight_dtype: torch.dtype, rows: Tensor, cols: Tensor,
               parts: list[Tensor]) -> Tensor:  # fmt: skip
    """d weight of a slicing, given each client's d compact tensor (in client order)."""
    acc = acc_dtype(weight_dtype)
    out = torch.zeros(weight_shape, dtype=acc, device=rows.device)
    one_d = len(weight_shape) == 1
    for k, (r, part) in enumerate(zip(_kept(rows), parts)):
        if one_d:
            out[r] += part.to(acc)
        else:
            c = cols[k][cols[k] >= 0]
            out[r[:, None], c[None, :]] += part.to(acc)
    return out.to(weight_dtype)


def _split(flat: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [t.view(s) for t, s in zip(flat.split(sizes), shapes)]


def _compact_shape(weight_shape: torch.Size, r: int, c: int) -> tuple[int, ...]:
    return (r,) if len(weight_shape) == 1 else (r, c, *weight_shape[2:])


def _counts(padded: Tensor) -> list[int]:
    return (padded >= 0).sum(1).tolist()


# --------------------------------------------------------------------------- per operator
def setup_slice(ctx: Any, inputs: tuple, output: Tensor) -> None:
    weight, rows, cols, _total = inputs
    ctx.weight_meta = (weight.shape, weight.dtype)
    ctx.save_for_backward(rows, cols)


def backward_slice(ctx: Any, grad: Tensor) -> tuple:
    rows, cols = ctx.saved_tensors
    shape, dtype = ctx.weight_meta
    counts = zip(_counts(rows), [1] * rows.shape[0] if len(shape) == 1 else _counts(cols))
    parts = _split(grad, [_compact_shape(shape, r, c) for r, c in counts])
    return slice_grad(shape, dtype, rows, cols, parts), None, None, None


def setup_aggregate(ctx: Any, inputs: tuple, output: Tensor) -> None:
    weight, clients, rows, cols, coef, mode = inputs
    ctx.weight_meta = (weight.shape, weight.dtype)
    ctx.client_meta = [(c.shape, c.dtype) for c in clients]
    ctx.mode = mode
    ctx.save_for_backward(rows, cols, coef)


def backward_aggregate(ctx: Any, grad: Tensor) -> tuple:
    rows, cols, coef = ctx.saved_tensors
    d_weight, d_clients = aggregate_grads(*ctx.weight_meta, ctx.client_meta, rows, cols, coef, ctx.mode, grad)
    return d_weight, d_clients, None, None, None, None


def setup_slice_many(ctx: Any, inputs: tuple, output: Tensor) -> None:
    weights, rows, cols, row_counts, col_counts = inputs
    ctx.weight_meta = [(w.shape, w.dtype) for w in weights]
    ctx.counts = (list(row_counts), list(col_counts))
    ctx.save_for_backward(*rows, *cols)


def backward_slice_many(ctx: Any, grad: Tensor) -> tuple:
    N = len(ctx.weight_meta)
    rows, cols = ctx.saved_tensors[:N], ctx.saved_tensors[N:]
    K = rows[0].shape[0] if N else 0
    row_counts, col_counts = ctx.counts
    shapes = [_compact_shape(ctx.weight_meta[n][0], row_counts[n * K + k], col_counts[n * K + k])
              for k in range(K) for n in range(N)]  # fmt: skip
    parts = _split(grad, shapes)  # client-major: client k's tensor n at k * N + n
    d_weights = [slice_grad(*ctx.weight_meta[n], rows[n], cols[n], [parts[k * N + n] for k in range(K)])
                 for n in range(N)]  # fmt: skip
    return d_weights, [None] * N, [None] * N, None, None


def setup_aggregate_many(ctx: Any, inputs: tuple, output: Tensor) -> None:
    weights, clients, rows, cols, coef, mode = inputs
    ctx.weight_meta = [(w.shape, w.dtype) for w in weights]
    ctx.client_meta = [(c.shape, c.dtype) for c in clients]
    ctx.mode = mode
    ctx.save_for_backward(coef, *rows, *cols)


def backward_aggregate_many(ctx: Any, grad: Tensor) -> tuple:
    N = len(ctx.weight_meta)
    coef, rows, cols = ctx.saved_tensors[0], ctx.saved_tensors[1 : N + 1], ctx.saved_tensors[N + 1 :]
    K = coef.shape[0]
    grads = _split(grad, [tuple(shape) for shape, _ in ctx.weight_meta])
    d_weights, d_clients = [], []
    for n in range(N):
        meta = ctx.client_meta[n * K : (n + 1) * K]
        dw, dc = aggregate_grads(*ctx.weight_meta[n], meta, rows[n], cols[n], coef, ctx.mode, grads[n])
        d_weights.append(dw)
        d_clients += dc
    return d_weights, d_clients, [None] * N, [None] * N, None, None
