"""The C++ CPU backend: compiled kernels behind the registered operators.

Where the kernels come from, in order:

1. **prebuilt**: a wheel built with torch present ships ``cahfp_ops/_C.abi3.so``, compiled
   on PyTorch's LibTorch stable ABI (target 2.10): it loads into any torch >= 2.10 with no
   compiler. ``CAHFP_OPS_PREBUILT=0`` ignores it.
2. **jit**: otherwise (a source checkout, a package built without torch, a prebuilt library
   that failed to load) the same sources are compiled on first use with
   ``torch.utils.cpp_extension.load`` and cached in ``TORCH_EXTENSIONS_DIR`` (default
   ``~/.cache/torch_extensions``, in a folder named after the build key below, so checkouts
   and torch versions do not rebuild over each other); this needs a C++ compiler and ninja
   and takes 1.5-3 minutes once on a busy 2-core machine. ``CAHFP_OPS_JIT=0`` forbids it.
3. **unavailable**: backend ``auto`` then runs the pure-PyTorch reference on CPU, after one
   short warning. A failed build is remembered for the process and, per build key (sources,
   flags, torch version, compiler), across processes in ``~/.cache/cahfp_ops``, so later
   processes do not retry it; ``CAHFP_OPS_REBUILD=1`` retries.

``python -m cahfp_ops`` says which of these happened and why.

The library registers its kernels in the private operator namespace
``torch.ops._cahfp_cpp``: a loading detail, not an API. It has no fake kernels and no
autograd; only this module calls it, from inside the public ``torch.ops.cahfp.*``
operators. The backend functions below, one per operator (``_operators.OPERATORS``), take
the canonical inputs every backend takes
(see ``cahfp_ops/_operators.py``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import _build_config as config
from ._debug import poison_, poison_enabled
from ._layout_tables import LayoutTables
from ._views import packed_slice_numel

_LOCK = threading.Lock()
_JIT_PREFIX = "cahfp_ops_cpu"
#: Names of the CPU code variants (``csrc/cpu/isa.h``), by level.
ISA_NAMES = ("baseline", "avx2", "avx512")


@dataclass
class _State:
    loaded: bool | None = None  # None: not tried yet
    source: str = "not loaded"  # "prebuilt", "jit", "preloaded", "unavailable", "not loaded"
    path: str | None = None
    error: str | None = None
    prebuilt_error: str | None = None
    warned: bool = False
    poison: bool = False


_STATE = _State()


@dataclass(frozen=True)
class KernelStatus:
    """Where the compiled CPU kernels came from.

    source: ``"prebuilt"`` (the wheel's library), ``"jit"`` (compiled on this machine),
    ``"preloaded"`` (registered before cahfp_ops looked), ``"unavailable"``, or
    ``"not loaded"`` (not tried yet). path: the library file. reason: why they are
    unavailable, or why a prebuilt library was passed over. isa / isa_detected: the CPU
    code variant in use and the best this CPU supports (``baseline``, ``avx2``, ``avx512``).
    """

    source: str
    path: str | None
    reason: str | None
    isa: str | None
    isa_detected: str | None


def _truthy(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "no", "false", "off", "")


def source_dir() -> Path:
    """Directory holding the C++ sources (``cpu/*.cpp``): installed copy or source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "cpu" / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError("cahfp_ops C++ sources not found (looked in cahfp_ops/_csrc and csrc/)")


def prebuilt_library() -> Path | None:
    """The library a wheel ships (``cahfp_ops/_C*.so``), or None."""
    here = Path(__file__).resolve().parent
    found = sorted(here.glob(f"{config.EXTENSION}.*so")) + sorted(here.glob(f"{config.EXTENSION}.*pyd"))
    return found[0] if found else None


def _registered() -> bool:
    return hasattr(torch.ops._cahfp_cpp, "reconstruct_aggregate")


# --------------------------------------------------------------------------- JIT build
def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def build_key() -> str:
    """Hash of what a JIT build depends on: sources, flags, torch, compiler and ninja."""
    h = hashlib.sha256()
    src = source_dir()
    for path in [*config.sources(src), *config.headers(src)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(config.CXX_FLAGS).encode())
    h.update(torch.__version__.encode())
    for tool in (_compiler(), shutil.which("ninja")):
        h.update(str(tool).encode())
        if tool:
            h.update(str(os.stat(tool).st_mtime_ns).encode())
    return h.hexdigest()[:16]


def jit_name() -> str:
    """The JIT build's folder and library name under ``TORCH_EXTENSIONS_DIR``, keyed by
    :func:`build_key`: two checkouts or two torch versions never build over each other."""
    return f"{_JIT_PREFIX}_{build_key()}"


def _failure_marker() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cahfp_ops" / f"jit-build-failed-{build_key()}.txt"


def _notice(message: str) -> None:
    """Print a line on stderr without breaking an active tqdm progress bar."""
    if "tqdm" in sys.modules:
        try:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
            return
        except Exception:  # pragma: no cover - a broken tqdm must not stop the build
            pass
    print(message, file=sys.stderr, flush=True)


def _jit_build() -> str:
    from torch.utils.cpp_extension import _get_build_directory, load

    if not _compiler():
        raise RuntimeError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH)")
    if not shutil.which("ninja"):
        raise RuntimeError("ninja is not installed (pip install ninja)")
    src = source_dir()
    name = jit_name()
    build_dir = Path(_get_build_directory(name, False))
    library = build_dir / f"{name}.so"
    if not library.exists():  # a cached build loads in well under a second; a fresh one does not
        _notice("cahfp_ops: compiling the C++ CPU kernels (first use only, minutes on 2 cores; then cached)...")
    load(
        name=name,
        sources=[str(p) for p in config.sources(src)],
        extra_cflags=list(config.CXX_FLAGS),
        extra_include_paths=[str(src / "cpu")],
        is_python_module=False,
        verbose=False,
    )
    return str(library)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _load() -> None:
    state = _STATE
    library = prebuilt_library()
    if _registered():
        module = sys.modules.get(f"{__package__}.{config.EXTENSION}")  # `import cahfp_ops._C` loads it too
        if module is not None and library is not None:
            state.loaded, state.source, state.path = True, "prebuilt", str(library)
        else:
            state.loaded, state.source = True, "preloaded"
        return
    if library is not None and _truthy("CAHFP_OPS_PREBUILT"):
        try:
            torch.ops.load_library(str(library))
            if not _registered():
                raise RuntimeError("the library registered no _cahfp_cpp operators")
            state.loaded, state.source, state.path = True, "prebuilt", str(library)
            return
        except Exception as exc:
            state.prebuilt_error = f"prebuilt {library.name} failed to load ({_short(exc)})"
    if not _truthy("CAHFP_OPS_JIT"):
        reason = "no prebuilt library" if library is None else state.prebuilt_error or "prebuilt library disabled"
        state.loaded, state.source, state.error = (
            False,
            "unavailable",
            f"{reason}; JIT build disabled (CAHFP_OPS_JIT=0)",
        )
        return
    try:
        marker = _failure_marker()  # hashes the sources: fails when they are missing
    except OSError as exc:
        state.loaded, state.source, state.error = False, "unavailable", _short(exc)
        return
    if marker.exists() and not _truthy("CAHFP_OPS_REBUILD", "0"):
        previous = marker.read_text().strip().splitlines()[0]
        state.loaded, state.source = False, "unavailable"
        state.error = f"an earlier build failed ({previous}); CAHFP_OPS_REBUILD=1 retries"
        return
    try:
        state.path = _jit_build()
        state.loaded, state.source = True, "jit"
        marker.unlink(missing_ok=True)
    except Exception as exc:  # no compiler, no ninja, failed build, missing sources
        state.loaded, state.source = False, "unavailable"
        state.error = _short(exc)
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{state.error}\n\n{exc}\n")
        except OSError:
            pass


def load_cpp() -> bool:
    """Load the compiled CPU kernels (prebuilt, else compiled on first use); True when usable.

    Call it before starting a progress bar or a timer if the first call may compile.
    """
    with _LOCK:
        if _STATE.loaded is None:
            _load()
        return bool(_STATE.loaded)


def load_error() -> str | None:
    """Why the C++ kernels could not be loaded (None when they loaded or were not tried)."""
    return _STATE.error


def kernel_status() -> KernelStatus:
    """Where the compiled CPU kernels came from (tries to load them first)."""
    load_cpp()
    isa = detected = None
    if _STATE.loaded:
        active, best = _isa_levels(-2)
        isa, detected = ISA_NAMES[active], ISA_NAMES[best]
    reason = _STATE.error if not _STATE.loaded else _STATE.prebuilt_error
    return KernelStatus(_STATE.source, _STATE.path, reason, isa, detected)


def warn_fallback_once() -> None:
    """Emit the single, one-line 'falling back to the reference' warning."""
    if not _STATE.warned:
        _STATE.warned = True
        warnings.warn(
            f"cahfp_ops: compiled CPU kernels unavailable ({load_error()}); using the PyTorch reference on CPU "
            "(python -m cahfp_ops explains)",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- CPU variants
_DEVICE = None


def _device_tensor() -> Tensor:
    global _DEVICE
    if _DEVICE is None:
        _DEVICE = torch.empty(0)
    return _DEVICE


def _isa_levels(level: int) -> tuple[int, int]:
    active, best = torch.ops._cahfp_cpp.cap_isa(_device_tensor(), level)
    return int(active), int(best)


def cpu_isa() -> str:
    """The CPU code variant the kernels run (``baseline``, ``avx2`` or ``avx512``)."""
    if not load_cpp():
        raise RuntimeError(f"the C++ kernels are unavailable: {load_error()}")
    return ISA_NAMES[_isa_levels(-2)[0]]


def set_cpu_isa(name: str | None) -> str:
    """Cap the CPU code variant (``None``: the best this CPU supports); returns the one in use.

    For tests and benchmarks: every variant gives bit-identical results. A variant above
    what the CPU supports is a ValueError.
    """
    if not load_cpp():
        raise RuntimeError(f"the C++ kernels are unavailable: {load_error()}")
    if name is None:
        return ISA_NAMES[_isa_levels(-1)[0]]
    if name not in ISA_NAMES:
        raise ValueError(f"isa must be one of {ISA_NAMES} or None, got {name!r}")
    level = ISA_NAMES.index(name)
    best = _isa_levels(-2)[1]
    if level > best:
        raise ValueError(f"isa {name!r} is not supported by this CPU (best: {ISA_NAMES[best]!r})")
    return ISA_NAMES[_isa_levels(level)[0]]


# --------------------------------------------------------------------------- backend functions
def _kernels():
    """The compiled operators, with the C++ poison switch following :mod:`cahfp_ops._debug`."""
    ops = torch.ops._cahfp_cpp
    poison = poison_enabled()
    if poison != _STATE.poison:
        ops.set_poison_outputs(_device_tensor(), poison)
        _STATE.poison = poison
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


def robust_aggregate(
    weight: Tensor,
    clients: list[Tensor],
    rows: Tensor,
    cols: Tensor,
    coef: Tensor,
    mode: str,
    reduce: str,
    trim: float,
) -> Tensor:
    return _kernels().robust_aggregate(weight, clients, rows, cols, coef, mode, reduce, trim)


def reconstruct_aggregate_many(
    weights: list[Tensor], clients: list[Tensor], rows: list[Tensor], cols: list[Tensor], coef: Tensor, mode: str
) -> Tensor:
    return _kernels().reconstruct_aggregate_many(weights, clients, rows, cols, coef, mode)


def slice_packed(weights: list[Tensor], tables: LayoutTables, out: Tensor) -> None:
    _kernels().slice_packed(weights, *tables, poison_(out))


def aggregate_packed(
    weights: list[Tensor],
    clients: list[Tensor],
    parts: list[int],
    tables: LayoutTables,
    coef: Tensor,
    mode: str,
    out: Tensor,
    stats: Tensor,
    plan: int = -1,
) -> None:
    _kernels().aggregate_packed(
        weights, clients, parts, *tables, coef, mode, poison_(out), poison_(stats), plan
    )


def accumulate_packed(
    weights: list[Tensor],
    client: list[Tensor],
    parts: list[int],
    tables: LayoutTables,
    weight: float,
    max_ssq: float,
    mode: str,
    sums: Tensor,
    cover: Tensor,
    stats: Tensor,
) -> None:
    _kernels().accumulate_packed(
        weights, client, parts, *tables, weight, max_ssq, mode, sums, cover,
        poison_(stats),
    )


def fold_packed(
    weights: list[Tensor],
    clients: list[Tensor],
    parts: list[int],
    tables: LayoutTables,
    coef: Tensor,
    mode: str,
    sums_in: Tensor | None,
    cover_in: Tensor | None,
    sums_out: Tensor,
    cover_out: Tensor,
    stats: Tensor,
    plan: int = -1,
) -> None:
    if sums_in is None:  # the kernel's form of "start from zeros": both inputs empty
        sums_in = cover_in = sums_out.new_empty(0)
    if sums_out.data_ptr() != sums_in.data_ptr():
        poison_(sums_out)
    if cover_out.data_ptr() != cover_in.data_ptr():
        poison_(cover_out)
    _kernels().fold_packed(
        weights, clients, parts, *tables, coef, mode, sums_in, cover_in, sums_out,
        cover_out, poison_(stats), plan,
    )  # fmt: skip


def plan_layout(tables: LayoutTables) -> int:
    """The engine's plan of a layout's tables (checked here), kept under the id returned
    until :func:`release_layout_plan`: ``aggregate_packed`` / ``fold_packed`` calls given it
    neither check nor re-plan the tables."""
    return int(_kernels().plan_layout(*tables))


def plan_subset(plan: int, clients: Sequence[int]) -> int:
    """The plan of some clients of the plan kept under ``plan`` (client j is its client
    ``clients[j]``), kept under the id returned: their lists shared, no table re-read."""
    idx = torch.tensor(list(clients), dtype=torch.int64)
    return int(torch.ops._cahfp_cpp.plan_subset(_device_tensor(), plan, idx))


def release_layout_plan(plan: int) -> None:
    torch.ops._cahfp_cpp.release_layout_plan(_device_tensor(), plan)


def finish_partials(
    weights: list[Tensor], sums: Tensor, cover: Tensor, weight_sum: float, mode: str, out: Tensor
) -> None:
    _kernels().finish_partials(weights, sums, cover, weight_sum, mode, poison_(out))
