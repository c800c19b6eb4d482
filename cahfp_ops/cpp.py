"""The C++ CPU backend: compiled kernels behind the registered operators.

The kernels (``csrc/cpu/``) are compiled on first use with ``torch.utils.cpp_extension.load``
against the installed torch (no second torch, no build isolation) and cached in
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Later imports load the
cached library in well under a second. If there is no compiler or the build fails,
:func:`load_cpp` returns False and backend ``auto`` falls back to the pure-PyTorch reference
with a single warning.

The compiled library registers its kernels in the private operator namespace
``torch.ops._cahfp_cpp``: a loading detail, not an API. It has no fake kernels and no
autograd; only this module calls it, from inside the public ``torch.ops.cahfp.*``
operators. The six backend functions below take the canonical inputs every backend takes
(see ``cahfp_ops/_operators.py``).
"""

from __future__ import annotations

import platform
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ._debug import poison_enabled
from ._views import packed_slice_numel

_LOCK = threading.Lock()
_STATE: dict[str, object] = {"loaded": None, "error": None, "poison": False}
_EXT_NAME = "cahfp_ops_cpu"


def source_dir() -> Path:
    """Directory holding the C++ sources (``cpu/*.cpp``): installed copy or source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "cpu" / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError("cahfp_ops C++ sources not found (looked in cahfp_ops/_csrc and csrc/)")


def _isa_flags() -> tuple[str, list[str]]:
    """Extra ISA flags when this machine's CPU has AVX2 + FMA + F16C, with a name suffix.

    The suffix keeps differently targeted builds apart in a shared extensions cache.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return "", []
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "", []
    if {"avx2", "fma", "f16c"} <= flags:
        return "_avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "", []


def _build() -> None:
    from torch.utils.cpp_extension import load

    src = source_dir()
    sources = sorted(str(p) for p in (src / "cpu").glob("*.cpp"))
    suffix, isa = _isa_flags()
    # Tell the user once a build really runs (loading a cached build takes well under 2 s).
    notice = threading.Timer(
        2.0,
        lambda: print(
            "cahfp_ops: compiling the C++ CPU kernels (first use only, about a minute; cached afterwards)...",
            file=sys.stderr,
            flush=True,
        ),
    )
    notice.daemon = True
    notice.start()
    try:
        load(
            name=_EXT_NAME + suffix,
            sources=sources,
            extra_cflags=["-O3", "-fopenmp", "-std=c++17", *isa],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    finally:
        notice.cancel()


def load_cpp() -> bool:
    """Compile (first time) and load the C++ kernels; True when ``torch.ops._cahfp_cpp`` is usable."""
    with _LOCK:
        if _STATE["loaded"] is None:
            try:
                if not hasattr(torch.ops._cahfp_cpp, "reconstruct_aggregate"):
                    _build()
                _STATE["loaded"] = True
            except Exception as exc:  # no compiler, failed build, missing sources
                _STATE["loaded"] = False
                _STATE["error"] = f"{type(exc).__name__}: {exc}"
        return bool(_STATE["loaded"])


def load_error() -> str | None:
    """Why the C++ kernels could not be loaded (None when they loaded or were not tried)."""
    return _STATE["error"]  # type: ignore[return-value]


def warn_fallback_once() -> None:
    """Emit the single 'falling back to the reference' warning."""
    if not _STATE.get("warned"):
        _STATE["warned"] = True
        warnings.warn(
            "cahfp_ops: the C++ CPU kernels are unavailable "
            f"({load_error()}); backend 'auto' uses the pure-PyTorch reference on CPU.",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- backend functions
def _kernels():
    """The compiled operators, with the C++ poison switch following :mod:`cahfp_ops._debug`."""
    ops = torch.ops._cahfp_cpp
    poison = poison_enabled()
    if poison != _STATE["poison"]:
        ops.set_poison_outputs(poison)
        _STATE["poison"] = poison
    return ops


def curvature_scores(weight: Tensor, grad: Tensor | None, hess: Tensor | None, dim: int) -> Tensor:
    return _kernels().curvature_scores(weight, grad, hess, dim)


def topk_channel_masks(scores: Tensor, keep: Tensor, max_keep: int) -> tuple[Tensor, Tensor]:
    return _kernels().topk_channel_masks(scores, keep, max_keep)


def slice_channels(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    return _kernels().slice_channels(weight, rows, cols, total)


def slice_channels_many(
    weights: list[Tensor], rows: list[Tensor], cols: list[Tensor], row_counts: list[int], col_counts: list[int]
) -> Tensor:
    total = packed_slice_numel(weights, rows[0].shape[0], row_counts, col_counts)
    return _kernels().slice_channels_many(weights, rows, cols, total)


def reconstruct_aggregate(
    weight: Tensor, clients: list[Tensor], rows: Tensor, cols: Tensor, coef: Tensor, mode: str
) -> Tensor:
    return _kernels().reconstruct_aggregate(weight, clients, rows, cols, coef, mode)


def reconstruct_aggregate_many(
    weights: list[Tensor], clients: list[Tensor], rows: list[Tensor], cols: list[Tensor], coef: Tensor, mode: str
) -> Tensor:
    return _kernels().reconstruct_aggregate_many(weights, clients, rows, cols, coef, mode)
