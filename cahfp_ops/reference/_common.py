"""Helpers shared by the reference backend's op families."""

from __future__ import annotations

from torch import Tensor


def kept_indices(padded_row: Tensor) -> Tensor:
    """The kept indices of one -1-padded keep-set row."""
    return padded_row[padded_row >= 0]
