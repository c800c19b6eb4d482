"""Where the compiled kernels come from, and how the package degrades without them:
one short warning, a failed build remembered per process and across processes, the
compile notice kept out of progress bars."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import cahfp_ops
from cahfp_ops import cpp

FALLBACK = """
import warnings, torch
import cahfp_ops
from cahfp_ops import cpp
calls = []
real_build = cpp._jit_build
def counted():
    calls.append(1)
    return real_build()
cpp._jit_build = counted
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    w = torch.randn(4, 3)
    a = cahfp_ops.reconstruct_aggregate(w, [w[:2] + 1], [torch.tensor([0, 1])])
    b = cahfp_ops.reconstruct_aggregate(w, [w[:2] + 1], [torch.tensor([0, 1])])
msgs = [str(c.message) for c in caught if "compiled CPU kernels" in str(c.message)]
assert len(msgs) == 1, msgs
assert torch.equal(a[:2], w[:2] + 1) and torch.equal(a[2:], w[2:])
print("WARNING:", msgs[0])
print("BUILDS:", len(calls))
print("STATUS:", cpp.kernel_status().source)
"""


def _run(tmp_path, code: str, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "CAHFP_OPS_PREBUILT": "0",
        "CXX": str(tmp_path / "no-such-compiler"),
        **env,
    }
    full.pop("CAHFP_OPS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def _field(out: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith(name + ":"))


def test_fallback_warns_once_in_one_line_and_remembers_the_failure(tmp_path):
    first = _run(tmp_path, FALLBACK)
    assert first.returncode == 0, first.stderr
    warning = _field(first.stdout, "WARNING")
    assert "no C++ compiler" in warning and "\n" not in warning and len(warning) < 300, warning
    assert _field(first.stdout, "BUILDS") == "1"
    assert _field(first.stdout, "STATUS") == "unavailable"
    markers = list((tmp_path / "cache" / "cahfp_ops").glob("jit-build-failed-*.txt"))
    assert len(markers) == 1
    # A new process with the same build key does not try again, and says why.
    second = _run(tmp_path, FALLBACK)
    assert second.returncode == 0, second.stderr
    assert _field(second.stdout, "BUILDS") == "0"
    assert "earlier build failed" in _field(second.stdout, "WARNING")
    # ... unless asked to.
    third = _run(tmp_path, FALLBACK, CAHFP_OPS_REBUILD="1")
    assert third.returncode == 0, third.stderr
    assert _field(third.stdout, "BUILDS") == "1"


def test_jit_disabled_reports_why(tmp_path):
    res = _run(tmp_path, FALLBACK, CAHFP_OPS_JIT="0")
    assert res.returncode == 0, res.stderr
    assert _field(res.stdout, "BUILDS") == "0"
    assert "CAHFP_OPS_JIT=0" in _field(res.stdout, "WARNING")


def test_missing_sources_fall_back_with_a_reason(tmp_path):
    code = FALLBACK.replace(
        "calls = []",
        "calls = []\ndef gone():\n    raise FileNotFoundError('cahfp_ops C++ sources not found')\n"
        "cpp.source_dir = gone",
    )
    res = _run(tmp_path, code)
    assert res.returncode == 0, res.stderr
    assert "C++ sources not found" in _field(res.stdout, "WARNING")
    assert _field(res.stdout, "BUILDS") == "0"


def test_compile_notice_goes_through_tqdm_write(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    written = []
    monkeypatch.setattr(
        tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s))
    )
    cpp._notice("hello")
    assert written == ["hello"]


def test_build_key_follows_sources_and_compiler(monkeypatch, tmp_path):
    key = cpp.build_key()
    assert key == cpp.build_key() and len(key) == 16
    monkeypatch.setenv("CXX", str(tmp_path / "other-compiler"))
    assert cpp.build_key() != key


def test_jit_build_folder_is_keyed_by_sources_and_torch(monkeypatch):
    """Two checkouts or two torch versions never build into the same folder."""
    name = cpp.jit_name()
    assert name == f"cahfp_ops_cpu_{cpp.build_key()}"
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert cpp.jit_name() != name


def test_kernels_loaded_and_status_consistent():
    assert cpp.load_cpp(), cpp.load_error()
    status = cpp.kernel_status()
    assert status.source in ("prebuilt", "jit", "preloaded")
    assert status.isa in cpp.ISA_NAMES and status.isa_detected in cpp.ISA_NAMES
    assert cpp.ISA_NAMES.index(status.isa) <= cpp.ISA_NAMES.index(status.isa_detected)
    if os.environ.get("CAHFP_OPS_EXPECT_PREBUILT") == "1":
        assert status.source == "prebuilt", status


def _available_isas() -> list[str]:
    best = cpp.kernel_status().isa_detected
    return list(cpp.ISA_NAMES[: cpp.ISA_NAMES.index(best) + 1])


def test_unsupported_isa_is_refused():
    best = cpp.kernel_status().isa_detected
    with pytest.raises(ValueError, match="isa must be one of"):
        cpp.set_cpu_isa("sse9")
    if best != "avx512":
        with pytest.raises(ValueError, match="not supported by this CPU"):
            cpp.set_cpu_isa("avx512")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_every_cpu_variant_gives_identical_bits(dtype):
    """The runtime-dispatched variants differ in speed only: bit-identical outputs."""
    gen = torch.Generator().manual_seed(11)
    # a 3x3 conv, its bias, and a wide 3x3 conv (rows of 130 columns, short runs: the packed
    # engine's interleaved scratch and column-by-column walk)
    weights = [torch.randn(37, 19, 3, 3, generator=gen).to(dtype), torch.randn(37, generator=gen).to(dtype),
               torch.randn(12, 130, 3, 3, generator=gen).to(dtype)]  # fmt: skip
    rows = [torch.sort(torch.randperm(37, generator=gen)[:n]).values for n in (37, 20, 5)]
    cols = [torch.sort(torch.randperm(19, generator=gen)[:n]).values for n in (19, 11, 1)]
    wide_rows = [torch.sort(torch.randperm(12, generator=gen)[:n]).values for n in (12, 7, 3)]
    wide_cols = [torch.sort(torch.randperm(130, generator=gen)[:n]).values for n in (70, 60, 40)]
    clients = [  # client-major: client k's compact tensors
        [torch.randn(len(r), len(c), 3, 3, generator=gen).to(dtype), torch.randn(len(r), generator=gen).to(dtype),
         torch.randn(len(wr), len(wc), 3, 3, generator=gen).to(dtype)]
        for r, c, wr, wc in zip(rows, cols, wide_rows, wide_cols)
    ]  # fmt: skip
    keep_rows = [rows, rows, wide_rows]
    keep_cols = [cols, None, wide_cols]
    hess = torch.randn(3, 37, 19, 3, 3, generator=gen).to(dtype)
    grad = torch.randn(3, 37, 19, 3, 3, generator=gen).to(dtype)
    scores_w = torch.randn(3, 37, 19, 3, 3, generator=gen).to(dtype)
    outs = {}
    try:
        for isa in _available_isas():
            cpp.set_cpu_isa(isa)
            with cahfp_ops.use_backend("cpp"):
                agg = cahfp_ops.reconstruct_aggregate_many(weights, clients, keep_rows, keep_cols, coef=[0.5, 0.3, 0.2])
                ov = cahfp_ops.reconstruct_aggregate_many(
                    weights, clients, keep_rows, keep_cols, coef=[0.5, 0.3, 0.2], mode="overlap"
                )
                sl = cahfp_ops.slice_channels_many(weights, keep_rows, keep_cols)
                sc = cahfp_ops.curvature_scores(scores_w, grad, hess, dim=0, batched=True)
            flat = [*agg, *ov, *(t for client in sl for t in client), sc]
            outs[isa] = [t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t for t in flat]
    finally:
        cpp.set_cpu_isa(None)
    first = next(iter(outs.values()))
    for isa, got in outs.items():
        assert len(got) == len(first)
        for a, b in zip(first, got):
            assert torch.equal(a, b), isa
