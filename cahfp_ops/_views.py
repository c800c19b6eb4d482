"""Tensor views shared by the backends and the public ops. A leaf module."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def as_3d(t: Tensor) -> Tensor:
    """View an N-D tensor as ``(dim0, dim1, rest)``: ``(R,) -> (R, 1, 1)``, ``(R, C) -> (R, C, 1)``."""
    if t.dim() == 1:
        return t.reshape(t.shape[0], 1, 1)
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def packed_views(packed: Tensor, shapes: Sequence[tuple[int, ...]], start: int | None = None) -> list[Tensor]:
    """Contiguous views of ``shapes`` laid end to end in the 1-D tensor ``packed``.

    ``as_strided`` gives one tensor object per view, which matters when a model has
    thousands of client tensors. ``start``: the storage offset of the first view (default
    ``packed.storage_offset()``: the views begin where ``packed`` begins, also when it is
    itself a view, as the huge-page buffers are; while ``torch.compile`` traces, 0: the
    buffers it traces are fresh allocations, and the offset is not traceable).
    """
    if start is None:
        start = 0 if torch.compiler.is_compiling() else packed.storage_offset()
    views, offset, strides = [], start, {}
    for shape in shapes:
        st = strides.get(shape)
        if st is None:
            acc, st = 1, []
            for d in reversed(shape):
                st.append(acc)
                acc *= d
            st = strides[shape] = tuple(reversed(st))
        views.append(packed.as_strided(shape, st, offset))
        offset += math.prod(shape)
    return views


def packed_slice_numel(
    weights: Sequence[Tensor], num_clients: int, row_counts: Sequence[int], col_counts: Sequence[int]
) -> int:
    """Elements of the packed whole-model slice: sum over tensors n and clients k of
    ``row_counts[n * K + k] * col_counts[n * K + k] * prod(weights[n].shape[2:])``."""
    K = num_clients
    total = 0
    for n, w in enumerate(weights):
        inner = math.prod(w.shape[2:])
        total += inner * sum(r * c for r, c in zip(row_counts[n * K : (n + 1) * K], col_counts[n * K : (n + 1) * K]))
    return total
