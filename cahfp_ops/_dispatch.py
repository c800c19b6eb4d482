"""Backend selection: ``auto``, ``cpp``, ``triton`` or ``torch``.

The active backend comes from :func:`use_backend` (a context manager, innermost wins, per
thread and per asyncio task: a :class:`contextvars.ContextVar`) or else from the
``CAHFP_OPS_BACKEND`` environment variable (read at each call, default ``auto``). ``auto``
means compiled C++ on CPU tensors and Triton on CUDA tensors, falling back to the
pure-PyTorch reference (``torch``) where the compiled kernels are unavailable.

Every backend is a module with one function per registered operator
(``cahfp_ops._operators.OPERATORS``, the one list) on the same canonical inputs
(:mod:`cahfp_ops.cpp`, :mod:`cahfp_ops.triton`, :mod:`cahfp_ops.reference`);
:func:`backend_for` returns the one that runs tensors on a device.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from . import cpp, reference
from ._interpreter import triton_interpreted

BACKENDS = ("auto", "cpp", "triton", "torch")
_stack: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("cahfp_ops_backend", default=())


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The requested backend name (not yet resolved for a device)."""
    stack = _stack.get()
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("CAHFP_OPS_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed cahfp ops on backend ``name`` (``auto``, ``cpp``, ``triton``, ``torch``)."""
    name = _check_name(name)
    token = _stack.set((*_stack.get(), name))
    try:
        yield name
    finally:
        _stack.reset(token)


def resolve_backend(device: torch.device) -> str:
    """The concrete backend (``cpp``, ``triton`` or ``torch``) for tensors on ``device``."""
    name = get_backend()
    if name == "torch":
        return "torch"
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors only, got a {device.type} tensor")
        if not cpp.load_cpp():
            raise RuntimeError(f"backend 'cpp' requested but the C++ kernels failed to load: {cpp.load_error()}")
        return "cpp"
    if name == "triton":
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError("backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
        return "triton"
    # auto
    if device.type == "cpu":
        if cpp.load_cpp():
            return "cpp"
        cpp.warn_fallback_once()
        return "torch"
    if device.type == "cuda":
        return "triton"
    return "torch"


def _triton() -> ModuleType:
    try:
        from . import triton as triton_backend
    except ImportError as exc:  # the triton package is missing
        raise RuntimeError(
            f"backend 'triton' needs the triton package ({exc}); pip install 'cahfp-ops[triton]'"
        ) from exc
    return triton_backend


def backend_for(device: torch.device) -> ModuleType:
    """The backend module that runs the ops on tensors on ``device``."""
    name = resolve_backend(device)
    if name == "cpp":
        return cpp
    if name == "triton":
        return _triton()
    return reference
