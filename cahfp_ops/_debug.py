"""The poison switch for testing kernels (not part of the stable API). A leaf module.

Inside :func:`poison_outputs`, every backend fills each new output with garbage (NaN for
floating outputs, True for masks, -7777 for indices) before its kernel writes it, so an
element a kernel forgets to write shows up in the result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_state = {"poison": False}


def poison_enabled() -> bool:
    """Whether backends should poison their new outputs."""
    return _state["poison"]


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within the block, every kernel output starts as garbage (see module docs)."""
    previous = _state["poison"]
    _state["poison"] = True
    try:
        yield
    finally:
        _state["poison"] = previous


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with garbage in place when the switch is on; return ``t``."""
    if _state["poison"]:
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(-7777)
    return t
