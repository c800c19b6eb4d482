"""Loading of the compiled C++ CPU kernels (``torch.ops.cahfp_cpp.*``).

The kernels are compiled on first use with ``torch.utils.cpp_extension.load``
against the installed torch (no second torch, no build isolation) and cached in
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Later imports
load the cached library in well under a second. If there is no compiler or the
build fails, :func:`load_cpp` returns False and backend ``auto`` falls back to
the pure-PyTorch reference with a single warning.
"""

from __future__ import annotations

import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

_LOCK = threading.Lock()
_STATE: dict[str, object] = {"loaded": None, "error": None}
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
    """Compile (first time) and load the C++ kernels; True when ``torch.ops.cahfp_cpp`` is usable."""
    with _LOCK:
        if _STATE["loaded"] is None:
            try:
                if not hasattr(torch.ops.cahfp_cpp, "reconstruct_aggregate"):
                    _build()
                from ._library import register_cpp_fakes

                register_cpp_fakes()
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
