"""Packaging: what a wheel and an sdist hold, the metadata, and the compiled library's
dependence on PyTorch's stable ABI only."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import cahfp_ops
from cahfp_ops import cpp

ROOT = Path(__file__).resolve().parent.parent
SOURCE_CHECKOUT = (ROOT / "setup.py").is_file() and (ROOT / "csrc").is_dir()
needs_checkout = pytest.mark.skipif(not SOURCE_CHECKOUT, reason="needs the source checkout")

# Mangled C++ names in namespaces outside the stable ABI: at::, c10::, torch:: (and caffe2::).
UNSTABLE = re.compile(r"^_ZN?K?(?:St)?(?:2at|3c10|5torch|6caffe2)")


@pytest.fixture(scope="module")
def pure_wheel(tmp_path_factory) -> Path:
    """A wheel without the compiled library (fast: no compile), built once for this module."""
    if not SOURCE_CHECKOUT:
        pytest.skip("needs the source checkout")
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "CAHFP_OPS_BUILD_EXT": "0"}
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q"]
    res = subprocess.run([*cmd, "-w", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = out.glob("cahfp_ops-*.whl")
    return wheel


@needs_checkout
def test_wheel_ships_every_subpackage_and_the_sources(pure_wheel):
    wheel = pure_wheel
    assert f"-{cahfp_ops.__version__}-" in wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "cahfp_ops"
    expected = {str(p.relative_to(ROOT)) for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {"cahfp_ops/_csrc/" + str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*.cpp")}
    expected |= {"cahfp_ops/_csrc/" + str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*.h")}
    expected |= {"cahfp_ops/py.typed", f"cahfp_ops-{cahfp_ops.__version__}.dist-info/licenses/LICENSE"}
    assert expected <= names, sorted(expected - names)


@needs_checkout
def test_wheel_metadata(pure_wheel):
    wheel = pure_wheel
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"cahfp_ops-{cahfp_ops.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Requires-Dist: torch>=2.10" in meta
    assert "Requires-Python: >=3.10" in meta
    assert "Classifier: Typing :: Typed" in meta
    assert re.search(r"^Project-URL: ", meta, re.M)


@needs_checkout
@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the 'build' package")
def test_sdist_is_complete(tmp_path):
    """``python -m build --sdist --no-isolation`` works and ships tests, docs, examples, bench, LICENSE."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".git", "out", "*.so")
    shutil.copytree(ROOT, src, ignore=ignore)
    res = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("cahfp_ops-*.tar.gz")
    prefix = f"cahfp_ops-{cahfp_ops.__version__}/"
    with tarfile.open(sdist) as tf:
        names = {n[len(prefix) :] for n in tf.getnames() if n.startswith(prefix)}
    must = {
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "setup.py",
        "cahfp_ops/py.typed",
        "tests/conftest.py",
        "tests/helpers.py",
        "docs/SPEC.md",
        "docs/DESIGN.md",
        "examples/fedsim.py",
        "bench/RESULTS.md",
        "bench/common.py",
        "csrc/cpu/ops.cpp",
        "csrc/cpu/isa.h",
    }
    for folder in ("tests", "bench", "examples"):
        must |= {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert must <= names, sorted(must - names)
    assert not any(n.endswith(".so") for n in names)


# --------------------------------------------------------------------------- the compiled library
def unstable_symbols(library: str | Path) -> list[str]:
    """Undefined dynamic symbols of ``library`` in at::, c10::, torch:: or caffe2:: (mangled)."""
    out = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True, check=True)
    names = [line.split()[-1].split("@")[0] for line in out.stdout.splitlines() if line.strip()]
    return [n for n in names if UNSTABLE.match(n)]


def _needed(library: str | Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out.stdout)


needs_binutils = pytest.mark.skipif(
    shutil.which("nm") is None or shutil.which("readelf") is None, reason="needs binutils (nm, readelf)"
)


@needs_binutils
def test_symbol_check_catches_unstable_references():
    """The check itself can fail: torch's own Python binding uses at:: and c10:: freely."""
    lib = Path(torch.__file__).parent / "lib" / "libtorch_python.so"
    if not lib.is_file():
        pytest.skip("libtorch_python.so not found")
    assert len(unstable_symbols(lib)) > 100


@needs_binutils
def test_compiled_library_uses_only_the_stable_abi():
    """The loaded kernels (prebuilt or JIT-built, same sources and flags) reference no at::,
    c10:: or torch:: C++ symbol, and the prebuilt one needs neither Python nor torch_python."""
    status = cpp.kernel_status()
    if status.path is None:
        pytest.skip(f"no compiled library loaded ({status.source})")
    assert unstable_symbols(status.path) == []
    if status.source == "prebuilt":
        needed = _needed(status.path)
        assert not any(n.startswith(("libpython", "libtorch_python")) for n in needed), needed


def test_prebuilt_library_imports_as_a_module():
    """``import cahfp_ops._C`` (pkgutil, doc tools) works and counts as the prebuilt kernels."""
    if cpp.prebuilt_library() is None:
        pytest.skip("no prebuilt library in this installation")
    code = (
        "import pkgutil, importlib, cahfp_ops\n"
        "names = [m.name for m in pkgutil.walk_packages(cahfp_ops.__path__, 'cahfp_ops.')]\n"
        "assert 'cahfp_ops._C' in names, names\n"
        "importlib.import_module('cahfp_ops._C')\n"
        "from cahfp_ops import cpp\n"
        "print(cpp.kernel_status().source)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "prebuilt"


def test_installed_package_is_the_one_tested():
    """In the CI job on the built wheel, the package comes from site-packages, with the prebuilt kernels."""
    if os.environ.get("CAHFP_OPS_EXPECT_INSTALLED") != "1":
        pytest.skip("only in the installed-wheel job")
    assert "site-packages" in cahfp_ops.__file__, cahfp_ops.__file__
    assert cpp.kernel_status().source == "prebuilt"
    for tool in ("c++", "g++", "gcc", "cc"):
        found = shutil.which(tool)
        assert found is None or subprocess.run([found, "--version"], capture_output=True).returncode != 0
