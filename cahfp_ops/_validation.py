"""The input-validation switch.

Validation is on by default. Turn it off for speed, once inputs are known to be
well formed, with ``CAHFP_OPS_VALIDATE=0`` (environment, the whole process),
:func:`set_validation` or the :func:`validation` context manager. The last two act on the
calling thread or asyncio task only (a :class:`contextvars.ContextVar`, like
:func:`~cahfp_ops.use_backend`): another thread's calls stay checked, a new thread starts
from the environment setting, and overlapping blocks in different threads cannot leave the
switch off for anyone else. With validation off the ops skip the checks that need to look at
index values (ascending, in range, coefficient signs), which on CUDA would force a host
synchronisation; every backend still masks or bounds-checks indices, so malformed input
never reads or writes out of bounds.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

_enabled: contextvars.ContextVar[bool | None] = contextvars.ContextVar("cahfp_ops_validation", default=None)


def validation_enabled() -> bool:
    """Whether the ops check their inputs before computing (in this thread or task)."""
    enabled = _enabled.get()
    if enabled is not None:
        return enabled
    return os.environ.get("CAHFP_OPS_VALIDATE", "1").strip().lower() not in ("0", "false", "no", "off")


# torch.compile reads the switch once, when it traces: what ``torch.compiler.assume_constant_result``
# does, without importing torch._dynamo at import time (about 2 s in every worker process).
validation_enabled._dynamo_marked_constant = True  # type: ignore[attr-defined]


def set_validation(enabled: bool | None) -> None:
    """Switch input validation on or off for the calling thread or task (``None``: back to
    ``CAHFP_OPS_VALIDATE``)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _enabled.set(enabled)


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Run the enclosed ops (of this thread or task) with validation switched on or off."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)
