"""Large CPU output buffers on transparent huge pages.

A fresh multi-megabyte buffer is mapped page by page on first touch: for a round's packed
client models (hundreds of MB) the kernel spends most of its time in page faults and page
clearing, not in copying. :func:`empty` asks the kernel for 2 MB pages
(``madvise(MADV_HUGEPAGE)``) on buffers of at least ``_MIN_BYTES``. Measured (2 threads,
K = 100, ``bench/RESULTS.md``): slicing VGG-16 into fresh 4 KB pages 356 ms, into fresh
2 MB pages 115 ms, into a reused buffer 66 ms; ResNet-56 55 / 22 / 14 ms. The slicing
output uses it. The aggregation output (one model) uses it with ``prefault=True``: one
element of every 2 MB page is written before the kernel runs, so the pages are mapped (and
cleared by the OS) up front, 2 MB at a time. Measured on VGG-16 K = 100 (2 threads, best of
7, two repetitions): fresh 4 KB pages 88 / 87 ms, 2 MB pages faulted inside the parallel
kernel 139 / 78 ms (erratic; 132 ms in an earlier run), prefaulted 2 MB pages 78 / 76 ms,
a reused buffer 77 / 73 ms. For the slicing output (hundreds of MB) prefaulting measured
slower (148 against 114 ms): one thread clears what the kernel's threads would.
It changes nothing but speed, and is plain ``torch.empty`` where transparent huge pages
are off (``never``), off Linux, on other devices, below ``_MIN_BYTES``, or with
``CAHFP_OPS_HUGEPAGES=0``.

The returned tensor is a view at a 2 MB-aligned offset into a slightly larger allocation
(at most 2 MB more), so ``storage_offset()`` may be non-zero.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch
from torch import Tensor

_HUGE_PAGE = 2 << 20
_MIN_BYTES = 16 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise when transparent huge pages can be asked for, else None."""
    if not sys.platform.startswith("linux") or os.environ.get("CAHFP_OPS_HUGEPAGES", "1") == "0":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(numel: int, dtype: torch.dtype, device: torch.device | str, *, prefault: bool = False) -> Tensor:
    """``torch.empty(numel, dtype=dtype, device=device)``, on 2 MB pages where available;
    ``prefault``: map the huge pages now (one element of each is written)."""
    device = torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    madvise = _madvise() if device.type == "cpu" and numel * itemsize >= _MIN_BYTES else None
    if madvise is None or torch.compiler.is_compiling():
        return torch.empty(numel, dtype=dtype, device=device)
    base = torch.empty(numel + _HUGE_PAGE // itemsize, dtype=dtype)
    try:
        ptr = base.data_ptr()
    except RuntimeError:  # a tensor without storage (fake or meta)
        return base[:numel]
    start = (ptr + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    length = (numel * itemsize) & ~(_HUGE_PAGE - 1)
    if length:
        madvise(start, length, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    offset = (start - ptr) // itemsize
    out = base[offset : offset + numel]
    if prefault:
        out[:: _HUGE_PAGE // itemsize].zero_()  # contents are unspecified anyway
    return out
