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


def _as_3d(t: Tensor) -> Tensor:
    """View an N-D tensor as (dim0, dim1, rest): (R,) -> (R, 1, 1), (R, C) -> (R, C, 1)."""
    if t.dim() == 1:
        return t.reshape(t.shape[0], 1, 1)
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton():
    from . import triton_backend

    return triton_backend


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
    return weight.new_empty((K, weight.shape[dim + 1]), dtype=_score_dtype(weight.dtype))


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
    w3 = _as_3d(weight.contiguous())
    backend = resolve_backend(weight.device)
    if backend == "cpp":
        return torch.ops.cahfp_cpp.slice_channels(w3, rows, cols, total)
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
    w3 = _as_3d(weight.contiguous())
    c3 = [_as_3d(c) for c in clients]
    backend = resolve_backend(weight.device)
    if backend == "cpp":
        out = torch.ops.cahfp_cpp.reconstruct_aggregate(w3, c3, rows, cols, coef, mode)
    elif backend == "triton":
        out = _triton().reconstruct_aggregate(w3, c3, rows, cols, coef, mode)
    else:
        out = reference.reconstruct_aggregate(w3, c3, rows, cols, coef, mode)
    return out.view(weight.shape)


@reconstruct_aggregate_op.register_fake
def _(weight: Tensor, clients: list[Tensor], rows: Tensor, cols: Tensor, coef: Tensor, mode: str) -> Tensor:
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def register_cpp_fakes() -> None:
    """Fake kernels for the compiled ``torch.ops.cahfp_cpp.*`` operators (after they load)."""
    if getattr(register_cpp_fakes, "done", False):
        return
    register_cpp_fakes.done = True  # type: ignore[attr-defined]

    torch.library.register_fake("cahfp_cpp::curvature_scores")(
        lambda weight, grad, hess, dim: weight.new_empty(
            (max(t.shape[0] for t in (weight, grad, hess) if t is not None), weight.shape[dim + 1]),
            dtype=_score_dtype(weight.dtype),
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
