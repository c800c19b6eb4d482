"""Shared benchmark helpers: model shapes, client generation, timing, copy roofline."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

# CIFAR VGG-16: 13 3x3 conv layers (the classifier is left out: ~14.7 M conv parameters).
VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def vgg16_conv_shapes(in_channels: int = 3) -> list[tuple[int, ...]]:
    shapes, cin = [], in_channels
    for w in VGG16_WIDTHS:
        shapes.append((w, cin, 3, 3))
        cin = w
    return shapes


def keep_count(ratio: float, channels: int) -> int:
    """Channels kept at pruning ratio ``ratio`` (SPEC.md: max(1, ceil((1 - r) * C - 1e-6)))."""
    return max(1, math.ceil((1.0 - ratio) * channels - 1e-6))


def make_clients(shapes, K: int, ratios: list[float], gen: torch.Generator, dtype=torch.float32, device="cpu"):
    """Per layer: (rows, cols, compact clients). A layer's input keep set is the previous
    layer's output keep set (channel coupling); the first layer keeps all inputs."""
    layers = []
    prev = [None] * K
    for shape in shapes:
        rows, clients = [], []
        for k in range(K):
            n = keep_count(ratios[k], shape[0])
            r = torch.randperm(shape[0], generator=gen)[:n].sort().values
            rows.append(r.to(device))
        cols = [p if p is not None else None for p in prev]
        for k in range(K):
            nc = shape[1] if cols[k] is None else cols[k].numel()
            c = torch.randn((rows[k].numel(), nc, *shape[2:]), generator=gen, dtype=torch.float32)
            clients.append(c.to(device=device, dtype=dtype))
        layers.append((rows, cols, clients))
        prev = rows
    return layers


def time_fn(fn: Callable[[], object], repeat: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median wall time in ms over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_roofline_ms(total_bytes: int, repeat: int, device="cpu") -> float:
    """Time of ``dst.copy_(src)`` moving ``total_bytes`` (read + write) between preallocated buffers."""
    n = max(1, total_bytes // 2 // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    return time_fn(lambda: dst.copy_(src), repeat=repeat, warmup=2, sync=sync)
