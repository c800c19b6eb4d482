"""Tensor views shared by the backends and the public ops. A leaf module."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def as_3d(t: Tensor) -> Tensor:
    """View an N-D tensor as ``(dim0, dim1, rest)``: ``(R,) -> (R, 1, 1)``, ``(R, C) -> (R, C, 1)``."""
    if t.dim() == 1:
        return t.reshape(t.shape[0], 1, 1)
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def packed_views(packed: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    """Contiguous views of ``shapes`` laid end to end in the 1-D tensor ``packed``.

    ``as_strided`` gives one tensor object per view, which matters when a model has
    thousands of client tensors.
    """
    views, offset, strides = [], 0, {}
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
