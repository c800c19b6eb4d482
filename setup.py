"""Packaging: every subpackage of ``cahfp_ops``, the C++ sources, and (when torch is
importable at build time) the prebuilt CPU kernels.

Build with torch present and without build isolation, so that the one installed torch is
used and no second one is downloaded::

    pip install torch==2.13.0                 # any torch >= 2.10
    python -m build --wheel --no-isolation    # or: pip wheel --no-build-isolation .

That compiles ``csrc/cpu`` on PyTorch's LibTorch stable ABI into ``cahfp_ops/_C.abi3.so``
and tags the wheel ``cp310-abi3-<platform>``: one wheel for every CPython >= 3.10 and every
torch >= 2.10. Where torch is not importable (an isolated build, e.g. a plain
``pip install`` of the sdist), the package is built without the library and compiles the
kernels on first use instead. ``CAHFP_OPS_BUILD_EXT=0`` skips the library, ``=1`` makes
its absence an error.

``csrc/`` is also installed as ``cahfp_ops/_csrc`` for that just-in-time build.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _build_config():
    spec = importlib.util.spec_from_file_location("_cahfp_build_config", ROOT / "cahfp_ops" / "_build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_kwargs() -> dict:
    mode = os.environ.get("CAHFP_OPS_BUILD_EXT", "auto").strip().lower()
    if mode in ("0", "no", "false", "off"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        if mode in ("1", "yes", "true", "on"):
            raise RuntimeError(f"CAHFP_OPS_BUILD_EXT=1 but torch is not importable here: {exc}") from exc
        print(
            "cahfp-ops: torch is not importable at build time; building without the prebuilt kernels "
            "(they compile on first use)",
            file=sys.stderr,
        )
        return {}
    config = _build_config()
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < config.TORCH_TARGET:
        message = f"torch {torch.__version__} predates the stable ABI target {config.TORCH_TARGET}"
        if mode in ("1", "yes", "true", "on"):
            raise RuntimeError(message)
        print(f"cahfp-ops: {message}; building without the prebuilt kernels", file=sys.stderr)
        return {}
    extension = CppExtension(
        f"cahfp_ops.{config.EXTENSION}",
        [str(p.relative_to(ROOT)) for p in config.sources(ROOT / "csrc")],
        extra_compile_args={"cxx": list(config.CXX_FLAGS)},
        depends=[str(p.relative_to(ROOT)) for p in config.headers(ROOT / "csrc")],
        py_limited_api=True,
    )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
        "options": {"bdist_wheel": {"py_limited_api": config.PY_LIMITED_API}},
    }


setup(
    packages=[*find_packages(include=["cahfp_ops", "cahfp_ops.*"]), "cahfp_ops._csrc"],
    package_dir={"cahfp_ops._csrc": "csrc"},
    package_data={"cahfp_ops": ["py.typed"], "cahfp_ops._csrc": ["cpu/*.cpp", "cpu/*.h"]},
    include_package_data=False,
    **_extension_kwargs(),
)
