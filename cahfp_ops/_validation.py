"""The input-validation switch.

Validation is on by default. Turn it off for speed, once inputs are known to be
well formed, with ``CAHFP_OPS_VALIDATE=0`` (environment), :func:`set_validation`
or the :func:`validation` context manager. With validation off the ops skip the
checks that need to look at index values (ascending, in range, coefficient signs),
which on CUDA would force a host synchronisation; the compiled kernels still
bounds-check indices, so malformed input raises instead of reading out of bounds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_state: dict[str, bool | None] = {"enabled": None}


def validation_enabled() -> bool:
    """Whether the ops check their inputs before computing."""
    if _state["enabled"] is not None:
        return bool(_state["enabled"])
    return os.environ.get("CAHFP_OPS_VALIDATE", "1").strip().lower() not in ("0", "false", "no", "off")


def set_validation(enabled: bool | None) -> None:
    """Switch input validation on or off (``None``: back to ``CAHFP_OPS_VALIDATE``)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _state["enabled"] = enabled


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Run the enclosed ops with validation switched on or off."""
    previous = _state["enabled"]
    set_validation(enabled)
    try:
        yield
    finally:
        _state["enabled"] = previous
