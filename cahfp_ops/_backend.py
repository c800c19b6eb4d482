"""Backend selection: ``auto``, ``cpp``, ``triton`` or ``torch``.

The active backend comes from :func:`use_backend` (a context manager, innermost
wins) or else from the ``CAHFP_OPS_BACKEND`` environment variable (read at each
call, default ``auto``). ``auto`` means compiled C++ on CPU tensors and Triton on
CUDA tensors, falling back to the pure-PyTorch reference (``torch``) where the
compiled kernels are unavailable.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "cpp", "triton", "torch")
_local = threading.local()


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The requested backend name (not yet resolved for a device)."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("CAHFP_OPS_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed cahfp ops on backend ``name`` (``auto``, ``cpp``, ``triton``, ``torch``)."""
    name = _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device) -> str:
    """The concrete backend (``cpp``, ``triton`` or ``torch``) for tensors on ``device``."""
    from . import _extension

    name = get_backend()
    if name == "torch":
        return "torch"
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors only, got a {device.type} tensor")
        if not _extension.load_cpp():
            raise RuntimeError(f"backend 'cpp' requested but the C++ kernels failed to load: {_extension.load_error()}")
        return "cpp"
    if name == "triton":
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError("backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
        return "triton"
    # auto
    if device.type == "cpu":
        if _extension.load_cpp():
            return "cpp"
        _extension.warn_fallback_once()
        return "torch"
    if device.type == "cuda":
        return "triton"
    return "torch"
