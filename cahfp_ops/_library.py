"""The registered operators ``torch.ops.cahfp.*``: schemas, fake kernels, backend dispatch.

Each operator takes the canonical forms built by the public functions in
``cahfp_ops.ops`` and runs on the backend chosen by ``cahfp_ops.use_backend`` /
``CAHFP_OPS_BACKEND``: compiled C++ (``torch.ops.cahfp_cpp.*``), Triton, or the
pure-PyTorch reference. The fake kernels give output shapes and dtypes without
computing, so the operators work under ``torch.compile`` and ``opcheck``.
The operators have no autograd formula: they are server-side aggregation tools.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from ._backend import resolve_backend
from ._inputs import acc_dtype


def _as_3d(t: Tensor) -> Tensor:
    """View an N-D tensor as (dim0, dim1, rest): (R,) -> (R, 1, 1), (R, C) -> (R, C, 1)."""
    if t.dim() == 1:
        return t.reshape(t.shape[0], 1, 1)
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _triton():
    try:
        from . import triton as triton_kernels
    except ImportError as exc:  # the triton package is missing
        raise RuntimeError(
            f"backend 'triton' needs the triton package ({exc}); pip install 'cahfp-ops[triton]'"
        ) from exc
    return triton_kernels


# --------------------------------------------------------------------------- curvature_scores
@torch.library.custom_op("cahfp::curvature_scores", mutates_args=())
def curvature_scores_op(weight: Tensor, grad: Tensor | None, hess: Tensor | None, dim: int) -> Tensor:
    """weight / grad / hess: ``(K_i, *S)`` (K_i in {1, K}), one dtype; -> ``(K, S[dim])``."""
    backend = resolve_backend(weight.device)
    if backend == "cpp":
        return torch.ops.cahfp_cpp.curvature_scores(weight, grad, hess, dim)
    if backend == "triton":
        return _triton().curvature_scores(weight, grad, hess, dim)
    return reference.curvature_scores(weight, grad, hess, dim)


@curvature_scores_op.register_fake
def _(weight: Tensor, grad: Tensor | None, hess: Tensor | None, dim: int) -> Tensor:
    K = max(t.shape[0] for t in (weight, grad, hess) if t is not None)
    return weight.new_empty((K, weight.shape[dim + 1]), dtype=acc_dtype(weight.dtype))


# --------------------------------------------------------------------------- topk_channel_masks
@torch.library.custom_op("cahfp::topk_channel_masks", mutates_args=())
def topk_channel_masks_op(scores: Tensor, keep: Tensor, max_keep: int) -> tuple[Tensor, Tensor]:
    """scores ``(K, C)``, keep ``(K,)`` int64 -> mask ``(K, C)`` bool, indices ``(K, max_keep)`` int64."""
    backend = resolve_backend(scores.device)
    if backend == "cpp":
        return torch.ops.cahfp_cpp.topk_channel_masks(scores, keep, max_keep)
    if backend == "triton":
        return _triton().topk_channel_masks(scores, keep, max_keep)
    return reference.topk_channel_masks(scores, keep, max_keep)


@topk_channel_masks_op.register_fake
def _(scores: Tensor, keep: Tensor, max_keep: int) -> tuple[Tensor, Tensor]:
    mask = scores.new_empty(scores.shape, dtype=torch.bool)
    indices = scores.new_empty((scores.shape[0], max_keep), dtype=torch.int64)
    return mask, indices


# --------------------------------------------------------------------------- slice_channels
@torch.library.custom_op("cahfp::slice_channels", mutates_args=())
def slice_channels_op(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    """weight N-D; rows / cols ``(K, m)`` int64 -1 padded -> packed 1-D buffer of ``total`` elements."""
    backend = resolve_backend(weight.device)
    if backend == "cpp":
        return torch.ops.cahfp_cpp.slice_channels(weight, rows, cols, total)
    w3 = _as_3d(weight.contiguous())
    if backend == "triton":
        return _triton().slice_channels(w3, rows, cols, total)
    return reference.slice_channels(w3, rows, cols, total)


@slice_channels_op.register_fake
def _(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    return weight.new_empty((total,))


# --------------------------------------------------------------------------- reconstruct_aggregate
@torch.library.custom_op("cahfp::reconstruct_aggregate", mutates_args=())
def reconstruct_aggregate_op(
    weight: Tensor, clients: list[Tensor], rows: Tensor, cols: Tensor, coef: Tensor, mode: str
) -> Tensor:
    """weight N-D; clients[k] ``(>=rows_k, >=cols_k, *S[2:])``; rows / cols ``(K, m)`` int64
    -1 padded; coef ``(K,)`` float64 summing to 1 -> tensor shaped and typed like weight."""
    backend = resolve_backend(weight.device)
    if backend == "cpp":
        return torch.ops.cahfp_cpp.reconstruct_aggregate(weight, clients, rows, cols, coef, mode)
    w3 = _as_3d(weight.contiguous())
    c3 = [_as_3d(c) for c in clients]
    if backend == "triton":
        out = _triton().reconstruct_aggregate(w3, c3, rows, cols, coef, mode)
    else:
        out = reference.reconstruct_aggregate(w3, c3, rows, cols, coef, mode)
    return out.view(weight.shape)


@reconstruct_aggregate_op.register_fake
def _(weight: Tensor, clients: list[Tensor], rows: Tensor, cols: Tensor, coef: Tensor, mode: str) -> Tensor:
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- whole-model ops
@torch.library.custom_op("cahfp::reconstruct_aggregate_many", mutates_args=())
def reconstruct_aggregate_many_op(
    weights: list[Tensor], clients: list[Tensor], rows: list[Tensor], cols: list[Tensor], coef: Tensor, mode: str
) -> Tensor:
    """N weights (one dtype), ``clients[n * K + k]`` = client k's compact tensor n, per-tensor
    canonical keep sets, one coef -> one packed buffer of the N results in order."""
    N = len(weights)
    K = len(clients) // max(N, 1)
    backend = resolve_backend(weights[0].device)
    if backend == "cpp":
        return torch.ops.cahfp_cpp.reconstruct_aggregate_many(weights, clients, rows, cols, coef, mode)
    if backend == "triton":
        w3 = [_as_3d(w.contiguous()) for w in weights]
        c3 = [[_as_3d(clients[n * K + k]) for k in range(K)] for n in range(N)]
        return _triton().reconstruct_aggregate_many(w3, c3, rows, cols, coef, mode)
    parts = [
        reconstruct_aggregate_op(weights[n], [clients[n * K + k] for k in range(K)], rows[n], cols[n], coef, mode)
        for n in range(N)
    ]
    return torch.cat([p.reshape(-1) for p in parts])


@reconstruct_aggregate_many_op.register_fake
def _(
    weights: list[Tensor], clients: list[Tensor], rows: list[Tensor], cols: list[Tensor], coef: Tensor, mode: str
) -> Tensor:
    return weights[0].new_empty((sum(w.numel() for w in weights),))


@torch.library.custom_op("cahfp::slice_channels_many", mutates_args=())
def slice_channels_many_op(
    weights: list[Tensor], rows: list[Tensor], cols: list[Tensor], row_counts: list[int], col_counts: list[int]
) -> Tensor:
    """N weights (one dtype), per-tensor canonical keep sets, kept counts ``[n * K + k]`` ->
    one packed buffer, client-major: client 0's N compact tensors, then client 1's, ..."""
    N = len(weights)
    K = rows[0].shape[0]
    rc = [row_counts[n * K : (n + 1) * K] for n in range(N)]
    cc = [col_counts[n * K : (n + 1) * K] for n in range(N)]
    backend = resolve_backend(weights[0].device)
    if backend == "cpp":
        total = sum(math.prod(weights[n].shape[2:]) * sum(map(int.__mul__, rc[n], cc[n])) for n in range(N))
        return torch.ops.cahfp_cpp.slice_channels_many(weights, rows, cols, total)
    if backend == "triton":
        w3 = [_as_3d(w.contiguous()) for w in weights]
        return _triton().slice_channels_many(w3, rows, cols, rc, cc)
    segments: list[list[Tensor]] = [[] for _ in range(K)]
    for n in range(N):
        T = math.prod(weights[n].shape[2:])
        sizes = [rc[n][k] * cc[n][k] * T for k in range(K)]
        packed = slice_channels_op(weights[n], rows[n], cols[n], sum(sizes))
        for k, part in enumerate(torch.split(packed, sizes)):
            segments[k].append(part)
    return torch.cat([p for per_client in segments for p in per_client])


@slice_channels_many_op.register_fake
def _(
    weights: list[Tensor], rows: list[Tensor], cols: list[Tensor], row_counts: list[int], col_counts: list[int]
) -> Tensor:
    K = rows[0].shape[0]
    total = 0
    for n, w in enumerate(weights):
        T = math.prod(w.shape[2:])
        total += sum(row_counts[n * K + k] * col_counts[n * K + k] * T for k in range(K))
    return weights[0].new_empty((total,))


def register_cpp_fakes() -> None:
    """Fake kernels for the compiled ``torch.ops.cahfp_cpp.*`` operators (after they load)."""
    if getattr(register_cpp_fakes, "done", False):
        return
    register_cpp_fakes.done = True  # type: ignore[attr-defined]

    torch.library.register_fake("cahfp_cpp::curvature_scores")(
        lambda weight, grad, hess, dim: weight.new_empty(
            (max(t.shape[0] for t in (weight, grad, hess) if t is not None), weight.shape[dim + 1]),
            dtype=acc_dtype(weight.dtype),
        )
    )
    torch.library.register_fake("cahfp_cpp::topk_channel_masks")(
        lambda scores, keep, max_keep: (
            scores.new_empty(scores.shape, dtype=torch.bool),
            scores.new_empty((scores.shape[0], max_keep), dtype=torch.int64),
        )
    )
    torch.library.register_fake("cahfp_cpp::slice_channels")(
        lambda weight, rows, cols, total: weight.new_empty((total,))
    )
    torch.library.register_fake("cahfp_cpp::reconstruct_aggregate")(
        lambda weight, clients, rows, cols, coef, mode: torch.empty_like(weight)
    )
    torch.library.register_fake("cahfp_cpp::reconstruct_aggregate_many")(
        lambda weights, clients, rows, cols, coef, mode: weights[0].new_empty((sum(w.numel() for w in weights),))
    )
    torch.library.register_fake("cahfp_cpp::slice_channels_many")(
        lambda weights, rows, cols, total: weights[0].new_empty((total,))
    )
