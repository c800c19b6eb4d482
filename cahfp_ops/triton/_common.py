"""Host-side helpers shared by the Triton kernels: launch metadata built without host syncs."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._interpreter import triton_interpreted


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def batched_inverse_maps(keeps: list[Tensor], sizes: list[int], cache: dict | None = None) -> Tensor:
    """Inverse maps of N keep-set tensors (each (K, m_n)) over concatenated channel spaces.

    Returns (K, sum(sizes)) int32; channel c of tensor n sits at column ``sum(sizes[:n]) + c``.
    A constant number of launches whatever N (one concatenation, one scatter).
    """
    K = keeps[0].shape[0]
    device = keeps[0].device
    total = sum(sizes)
    widths = [k.shape[1] for k in keeps]
    key = ("invmeta", tuple(widths), tuple(sizes), str(device))
    meta = cache.get(key) if cache is not None else None
    if meta is None:
        starts = np.cumsum([0] + sizes[:-1])
        shift = np.repeat(starts, widths)
        limit = np.repeat(sizes, widths)
        pos = np.concatenate([np.arange(w) for w in widths]) if widths else np.zeros(0)
        table = to_device_table(np.concatenate([shift, limit, pos]).astype(np.int64).tolist(), device)
        meta = table.view(3, -1)
        if cache is not None:
            cache[key] = meta
    shift, limit, pos = meta[0], meta[1], meta[2].to(torch.int32)
    inv = torch.full((K, total + 1), -1, dtype=torch.int32, device=device)
    if sum(widths):
        cat = torch.cat(keeps, dim=1)
        ok = (cat >= 0) & (cat < limit)
        idx = torch.where(ok, cat + shift, torch.full_like(cat, total))
        inv.scatter_(1, idx, pos.expand(K, -1).contiguous())
    return inv[:, :total].contiguous()


def to_device_table(values: list[int], device: torch.device) -> Tensor:
    """A small int64 table on ``device``; on CUDA copied from pinned memory without a host sync."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def element_offsets(tensors: list[Tensor], base: Tensor) -> list[int]:
    """Offsets (in elements) of each tensor's data from ``base``'s data pointer.

    The kernels address separate allocations as ``base + offset``: no packing copy.
    """
    size = base.element_size()
    b = base.data_ptr()
    out = []
    for t in tensors:
        d = t.data_ptr() - b
        if d % size:
            raise ValueError("client tensors must be aligned to their element size")
        out.append(d // size)
    return out


def block_size(n: int, gpu_cap: int, interp_cap: int = 1 << 14) -> int:
    """Elements per program: modest on a GPU, large under the interpreter (it pays per program)."""
    cap = interp_cap if triton_interpreted() else gpu_cap
    return max(16, min(cap, next_pow2(n)))
