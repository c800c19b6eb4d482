"""Atomic checkpoint files: a whole payload written to a temporary file in the target's
folder, flushed to disk, then renamed over the target, so a reader sees the old file or the
new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch


def save_atomic(payload: Any, path: str | os.PathLike) -> None:
    """``torch.save(payload)`` to ``path`` atomically (the temporary file is removed on failure)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".cahfp-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> Any:
    """What :func:`save_atomic` wrote (tensors and plain containers only: ``weights_only``)."""
    return torch.load(os.fspath(path), weights_only=True)
