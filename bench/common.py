"""Shared benchmark helpers: model shapes, client generation, timing, copy roofline, reporting.

Timing: on CUDA ``triton.testing.do_bench`` (median); on CPU the median wall time of
repeated runs. The copy roofline is the time of ``dst.copy_(src)`` moving the same
bytes (read + write) between preallocated buffers on the same device.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from cahfp_ops.fl.masks import kept_count  # re-exported for the benchmark scripts
from cahfp_ops.fl.zoo import VGG_CONFIGS

# ``CAHFP_BENCH_TINY=1``: every benchmark on models 16-64x narrower (ResNet-8 for ResNet-56), so
# that a dry run (``bench/gpu_suite.py --dry-run``, the Triton interpreter on CPU) takes seconds.
TINY = os.environ.get("CAHFP_BENCH_TINY", "0") == "1"

# CIFAR VGG-16: 13 3x3 conv layers (~14.7 M conv parameters), widths from the model zoo.
VGG16_WIDTHS = [v if not TINY else max(2, v // 64) for v in VGG_CONFIGS["vgg16"] if v != "M"]


def vgg16_conv_shapes(in_channels: int = 3) -> list[tuple[int, ...]]:
    shapes, cin = [], in_channels
    for w in VGG16_WIDTHS:
        shapes.append((w, cin, 3, 3))
        cin = w
    return shapes


def random_keep(channels: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(channels, generator=gen)[: kept_count(ratio, channels)].sort().values


def half_and_half(K: int, low: float = 0.5, high: float = 0.75) -> list[float]:
    """Half the clients pruned ``low``, half ``high``."""
    return [low if k < K // 2 else high for k in range(K)]


def make_clients(shapes, K: int, ratios: list[float], gen: torch.Generator, dtype=torch.float32, device="cpu"):
    """Per layer: (rows, cols, compact clients). A layer's input keep set is the previous
    layer's output keep set (channel coupling); the first layer keeps all inputs."""
    layers = []
    prev = [None] * K
    for shape in shapes:
        rows = [random_keep(shape[0], ratios[k], gen).to(device) for k in range(K)]
        cols = list(prev)
        clients = []
        for k in range(K):
            nc = shape[1] if cols[k] is None else cols[k].numel()
            c = torch.randn((rows[k].numel(), nc, *shape[2:]), generator=gen)
            clients.append(c.to(device=device, dtype=dtype))
        layers.append((rows, cols, clients))
        prev = rows
    return layers


def sync_fn(device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if str(device).startswith("cuda") else None


def bench_ms(fn: Callable[[], object], device, repeat: int = 7) -> float:
    """Median time of ``fn`` in ms: do_bench on CUDA, wall clock on CPU."""
    if str(device).startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    return time_fn(fn, repeat=repeat)


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


def copy_roofline_ms(total_bytes: int, repeat: int = 14, device="cpu") -> float:
    """Time of ``dst.copy_(src)`` moving ``total_bytes`` (read + write) between preallocated buffers."""
    n = max(1, total_bytes // 2 // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src), device, repeat=repeat)


def paired_copy_fraction(fn: Callable[[], object], total_bytes: int, device, repeat: int = 7) -> float:
    """The fraction of copy bandwidth ``fn`` reaches, measured paired with each call: per
    repetition a ``dst.copy_(src)`` moving ``total_bytes`` (read + write) and ``fn`` back to
    back, the median of the per-pair ratios copy time / ``fn`` time (this machine's
    bandwidth drifts within a minute: a ratio of two medians taken apart drifts with it).
    CUDA: the pair is timed with events; CPU: with the wall clock."""
    n = max(1, total_bytes // 2 // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    cuda = str(device).startswith("cuda")
    fn(), dst.copy_(src)
    ratios = []
    for _ in range(max(1, repeat)):
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            torch.cuda.synchronize()
            ev[0].record()
            dst.copy_(src)
            ev[1].record()
            fn()
            ev[2].record()
            torch.cuda.synchronize()
            t_copy, t_fn = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t1 = time.perf_counter()
            fn()
            t_copy, t_fn = t1 - t0, time.perf_counter() - t1
        ratios.append(t_copy / t_fn)
    return statistics.median(ratios)


def device_name(device) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_json(path, device, rows: list[dict], **extra) -> None:
    """``--json PATH``: the rows, with the device and versions."""
    if path is None:
        return
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device_name(device), "torch": torch.__version__, **extra,
                                "results": rows}, indent=1, default=str))  # fmt: skip


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` (dicts) with ``columns`` = (key, header, format)."""
    print(title)
    widths = [max(len(h), 9) for _, h, _ in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        cells = []
        for (key, _, fmt), w in zip(columns, widths):
            v = r.get(key, "")
            cells.append((format(v, fmt) if v != "" else "").rjust(w))
        print("  ".join(cells), flush=True)
    print()


def check_close(got, expected, rtol=1e-5, atol=1e-5) -> None:
    """Correctness first: every benchmark compares against its peers before timing."""
    if isinstance(got, (list, tuple)):
        for g, e in zip(got, expected):
            check_close(g, e, rtol, atol)
        return
    if isinstance(got, dict):
        for k in got:
            check_close(got[k], expected[k], rtol, atol)
        return
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def bench_parser(doc: str, clients: list[int], repeat: int = 5):
    """The options every benchmark takes: --device, --threads, --clients, --repeat."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--clients", type=int, nargs="+", default=clients)
    p.add_argument("--repeat", type=int, default=repeat)
    return p


def start(args) -> torch.device:
    """Apply --threads, print the run's header line, return the device."""
    import cahfp_ops

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, {device_name(dev)}, backend {cahfp_ops.resolve_backend(dev)}")
    return dev


def measure(K: int, dev, nbytes: int, fns: dict[str, Callable[[], object]], repeat: int) -> dict:
    """Time ``fns`` (``"ours"`` and its peers) side by side; GB/s, copy-roofline fraction, speedups."""
    t_copy = copy_roofline_ms(nbytes, device=dev)
    t = {name: bench_ms(fn, dev, repeat) for name, fn in fns.items()}
    row = {"K": K, "MB": nbytes / 1e6, "copy_ms": t_copy, **{f"{k}_ms": v for k, v in t.items()}}
    row.update(GBps=nbytes / t["ours"] / 1e6, roofline=paired_copy_fraction(fns["ours"], nbytes, dev, repeat))
    row.update({f"vs_{k}": t[k] / t["ours"] for k in t if k != "ours"})
    return row


def speed_columns(peers: dict[str, str], mb_header: str = "MB moved") -> list[tuple[str, str, str]]:
    """Table columns for :func:`measure` rows; ``peers``: name -> header."""
    cols = [
        ("K", "K", "d"),
        ("MB", mb_header, ".1f"),
        ("copy_ms", "copy ms", ".3f"),
        ("ours_ms", "cahfp ms", ".3f"),
        ("GBps", "GB/s", ".1f"),
        ("roofline", "of copy (paired)", ".1%"),
    ]
    cols += [(f"{k}_ms", f"{h} ms", ".3f") for k, h in peers.items()]
    cols += [(f"vs_{k}", f"vs {k}", ".1f") for k in peers]
    return cols
