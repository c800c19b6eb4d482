"""Tensors placed against ``PROT_NONE`` guard pages: a read or write one element outside
them is a segmentation fault, not a silent wrong value. For subprocess tests only (a fault
ends the process; the mappings are never unmapped)."""

from __future__ import annotations

import ctypes
import mmap

import torch

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
PROT_NONE = 0


def guarded(t: torch.Tensor, at: str = "end") -> torch.Tensor:
    """A contiguous copy of ``t`` in a fresh mapping between two ``PROT_NONE`` pages, its data
    ending right before the trailing one (``at="end"``) or starting right after the leading
    one (``at="start"``). Empty tensors come back as they are (nothing to guard)."""
    t = t.detach()
    if t.numel() == 0:
        return t.clone()
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // PAGE)
    total = (pages + 2) * PAGE
    addr = _libc.mmap(None, total, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    for guard in (addr, addr + (pages + 1) * PAGE):
        if _libc.mprotect(guard, PAGE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    start = addr + PAGE + (pages * PAGE - nbytes if at == "end" else 0)
    buf = (ctypes.c_char * nbytes).from_address(start)
    out = torch.frombuffer(buf, dtype=t.dtype, count=t.numel()).view(t.shape)
    out.copy_(t)
    return out
