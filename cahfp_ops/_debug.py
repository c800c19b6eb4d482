"""Debug helpers for testing kernels (not part of the stable API)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ._extension import load_cpp

_state = {"poison": False}


def poison_enabled() -> bool:
    """Whether kernels should fill new outputs with garbage before writing them."""
    return _state["poison"]


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within the block, every kernel output starts as garbage (NaN / True / -7777), so an
    element a kernel fails to write is visible in the result."""
    cpp = load_cpp()
    _state["poison"] = True
    if cpp:
        torch.ops.cahfp_cpp.set_poison_outputs(True)
    try:
        yield
    finally:
        _state["poison"] = False
        if cpp:
            torch.ops.cahfp_cpp.set_poison_outputs(False)
