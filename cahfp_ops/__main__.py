"""``python -m cahfp_ops``: what this installation runs on; ``--self-test`` checks it.

Prints the versions, where the compiled CPU kernels came from (prebuilt, JIT-built or
unavailable, and why), the CPU code variant, threads, Triton and its interpreter, and the
backend each device resolves to. ``--self-test`` runs every op on every backend available
here against the pure-PyTorch reference, one line each; the exit status is 1 if any fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Callable

import torch

import cahfp_ops
from cahfp_ops import cpp
from cahfp_ops._interpreter import triton_interpreted


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _backends_for(device: torch.device) -> list[str]:
    """Backends that can run here on ``device`` (besides the reference itself)."""
    found = []
    if device.type == "cpu" and cpp.load_cpp():
        found.append("cpp")
    has_triton = importlib.util.find_spec("triton") is not None
    if has_triton and (device.type == "cuda" or triton_interpreted()):
        found.append("triton")
    return found


def report() -> list[str]:
    """The information lines ``python -m cahfp_ops`` prints."""
    status = cpp.kernel_status()
    lines = [
        f"cahfp-ops {cahfp_ops.__version__} ({os.path.dirname(cahfp_ops.__file__)})",
        f"python {platform.python_version()} ({sys.implementation.name}), {platform.system()} {platform.machine()}",
        f"torch {torch.__version__}, triton {_version('triton')}"
        + (f", flwr {_version('flwr')}" if importlib.util.find_spec("flwr") else ""),
    ]
    if status.source in ("prebuilt", "jit", "preloaded"):
        how = {
            "prebuilt": "prebuilt (shipped with the package)",
            "jit": "JIT-built on this machine",
            "preloaded": "loaded before cahfp_ops looked",
        }[status.source]
        lines.append(f"compiled CPU kernels: {how}: {status.path}")
        lines.append(f"CPU code variant: {status.isa} (best this CPU supports: {status.isa_detected})")
        if status.reason:
            lines.append(f"  note: {status.reason}")
    else:
        lines.append(f"compiled CPU kernels: unavailable: {status.reason}")
    lines.append(f"threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op")
    if importlib.util.find_spec("triton") is None:
        lines.append("triton: not installed (pip install 'cahfp-ops[triton]'); CUDA tensors use the reference")
    else:
        lines.append(f"triton: installed; interpreter {'on' if triton_interpreted() else 'off'} (TRITON_INTERPRET)")
    lines.append(
        f"backend setting: {cahfp_ops.get_backend()} (CAHFP_OPS_BACKEND={os.environ.get('CAHFP_OPS_BACKEND')})"
    )
    lines.append(f"validation: {'on' if cahfp_ops.validation_enabled() else 'off'}")
    for device in _devices():
        try:
            resolved = cahfp_ops.resolve_backend(device)
        except (RuntimeError, ValueError) as exc:
            resolved = f"error: {exc}"
        lines.append(
            f"device {device.type}: backend {resolved}"
            + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
        )
    if not torch.cuda.is_available():
        lines.append("device cuda: not available")
    return lines


# --------------------------------------------------------------------------- self-test
def _cases(device: torch.device) -> dict[str, Callable[[], object]]:
    """One call per op on fresh random ragged inputs (odd sizes, an empty keep set, K = 3)."""
    g = torch.Generator().manual_seed(2026)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    w = rnd(13, 7, 3, 3)
    b = rnd(13)
    rows = [torch.tensor(r, dtype=torch.int64, device=device) for r in ([0, 2, 5, 12], list(range(13)), [])]
    cols = [[1, 6], [0], list(range(7))]  # keep sets may also be lists of ints
    clients = [rnd(len(r), len(c), 3, 3) for r, c in zip(rows, cols)]
    bias_clients = [rnd(len(r)) for r in rows]
    grad, hess = rnd(3, 13, 7, 3, 3), rnd(3, 13, 7, 3, 3)
    scores = rnd(3, 13)
    coef = [0.5, 0.2, 0.3]
    return {
        "curvature_scores": lambda: cahfp_ops.curvature_scores(w, grad, hess, dim=0),
        "topk_channel_masks": lambda: cahfp_ops.topk_channel_masks(scores, [4, 13, 1]),
        "slice_channels": lambda: cahfp_ops.slice_channels(w, rows, cols),
        "slice_channels_many": lambda: cahfp_ops.slice_channels_many([w, b], [rows, rows], [cols, None]),
        "reconstruct_aggregate": lambda: cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef),
        "reconstruct_aggregate_many": lambda: cahfp_ops.reconstruct_aggregate_many(
            [w, b],
            [[c, bc] for c, bc in zip(clients, bias_clients)],
            [rows, rows],
            [cols, None],
            coef,
            mode="overlap",
        ),
    }


def _flatten(x: object) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flatten(item)]
    raise TypeError(type(x))


def self_test() -> bool:
    """Run every op on every available backend against the reference; print one line each."""
    ok = True
    for device in _devices():
        backends = _backends_for(device)
        if not backends:
            print(f"skip  {device.type:4s}  no backend besides the reference here")
        for backend in backends:
            for name, call in _cases(device).items():
                try:
                    with cahfp_ops.use_backend("torch"):
                        want = _flatten(call())
                    with cahfp_ops.use_backend(backend):
                        got = _flatten(call())
                    err = 0.0
                    for a, b in zip(got, want, strict=True):
                        if a.dtype == torch.bool or not a.is_floating_point():
                            assert torch.equal(a, b), "indices/masks differ"
                        else:
                            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                            if a.numel():
                                err = max(err, float((a.double() - b.double()).abs().max()))
                    print(f"ok    {device.type:4s}  {backend:6s}  {name:27s} max |error| vs reference {err:.1e}")
                except Exception as exc:  # report and go on
                    ok = False
                    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    print(f"FAIL  {device.type:4s}  {backend:6s}  {name:27s} {type(exc).__name__}: {message}")
    if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available() and not triton_interpreted():
        print("skip  triton: no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors)")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cahfp_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--self-test", action="store_true", help="run every op on every backend against the reference")
    args = parser.parse_args(argv)
    for line in report():
        print(line)
    if args.self_test:
        print()
        return 0 if self_test() else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
