"""Dtype facts shared by every layer of the package: the storage and index dtypes the ops
accept, the accumulation dtype, and the error raised for a wrong dtype. A leaf module."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


class DTypeError(TypeError, ValueError):
    """A tensor has the wrong dtype (a ``TypeError`` and a ``ValueError``)."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 storage, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
