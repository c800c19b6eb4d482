"""How the C++ CPU kernels are compiled: one source of truth for the wheel build
(``setup.py``) and the just-in-time build (:mod:`cahfp_ops.cpp`).

Plain data, no imports beyond the standard library: ``setup.py`` reads this file before
the package (or torch) can be imported.
"""

from __future__ import annotations

from pathlib import Path

#: Name of the compiled library inside the package (``cahfp_ops/_C.abi3.so`` in a wheel).
EXTENSION = "_C"

#: The stable-ABI release the library targets: it loads into this torch and every later one.
TORCH_TARGET = (2, 10)
TORCH_TARGET_VERSION = f"0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"

#: Oldest CPython the wheel serves (the library has no Python C-API dependency at all; the
#: tag only records it).
PY_LIMITED_API = "cp310"

#: Compiler flags. No -std flag: torch's build helpers choose the language standard. No
#: -march: the library runs on baseline x86-64 and picks AVX2 / AVX-512 at run time
#: (csrc/cpu/isa.h); -ffp-contract=off keeps those variants bit-identical.
CXX_FLAGS = [
    "-O3",
    "-g0",
    "-ffp-contract=off",
    "-fvisibility=hidden",
    "-Wno-psabi",
    f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}",
]


def sources(csrc: Path) -> list[Path]:
    """The C++ sources under a ``csrc`` directory, in a fixed order."""
    return sorted((csrc / "cpu").glob("*.cpp"))


def headers(csrc: Path) -> list[Path]:
    return sorted((csrc / "cpu").glob("*.h"))
