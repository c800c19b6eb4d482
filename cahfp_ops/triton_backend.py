"""Triton kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Not implemented yet: selecting backend ``triton`` raises ``NotImplementedError``.
"""

from __future__ import annotations

from torch import Tensor


def _missing(op: str) -> NotImplementedError:
    return NotImplementedError(f"{op}: the Triton backend is not implemented yet; use backend 'torch' or 'cpp'")


def curvature_scores(weight: Tensor, grad: Tensor | None, hess: Tensor | None, dim: int) -> Tensor:
    raise _missing("curvature_scores")


def topk_channel_masks(scores: Tensor, keep: Tensor, max_keep: int) -> tuple[Tensor, Tensor]:
    raise _missing("topk_channel_masks")


def slice_channels(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    raise _missing("slice_channels")


def reconstruct_aggregate(weight, clients, rows, cols, coef, mode) -> Tensor:
    raise _missing("reconstruct_aggregate")
