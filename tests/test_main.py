"""``python -m cahfp_ops``: the installation report and the self-test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from cahfp_ops import __main__ as main_module
from cahfp_ops import cpp


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cahfp_ops", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def test_report_names_versions_kernels_and_backends():
    res = _run()
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for expected in ("cahfp-ops ", "torch ", "compiled CPU kernels: ", "threads: ", "triton", "device cpu: backend "):
        assert expected in out, out
    status = cpp.kernel_status()
    if status.source != "unavailable":
        assert f"CPU code variant: {status.isa}" in out


def test_self_test_passes_one_line_per_op_and_backend():
    env = {"TRITON_INTERPRET": "1"} if importlib.util.find_spec("triton") else {}
    res = _run("--self-test", **env)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
    backends = {line.split()[2] for line in lines}
    assert "cpp" in backends
    if env:
        assert "triton" in backends
    assert len(lines) == 6 * len(backends), res.stdout
    assert all(line.startswith("ok ") for line in lines)


def test_self_test_reports_a_wrong_kernel(monkeypatch, capsys):
    real = cpp.reconstruct_aggregate
    monkeypatch.setattr(cpp, "reconstruct_aggregate", lambda *a: real(*a) + 1)
    if not cpp.load_cpp():
        pytest.skip("no compiled kernels")
    assert main_module.self_test() is False
    out = capsys.readouterr().out
    assert "FAIL  cpu   cpp     reconstruct_aggregate " in out
    assert "ok    cpu   cpp     slice_channels " in out
