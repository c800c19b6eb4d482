"""The pytest-benchmark suite and its plot script run (tiny cases; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None, reason="needs pytest-benchmark")
@pytest.mark.skipif(not (BENCH / "test_bench.py").is_file(), reason="needs the source checkout")
def test_benchmark_suite_runs_and_plots(tmp_path):
    env = {**os.environ, "CAHFP_BENCH_CLIENTS": "2", "CAHFP_BENCH_MODELS": "vgg16", "MPLBACKEND": "Agg"}
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(BENCH),
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            "--benchmark-group-by=group",
            f"--benchmark-json={out}",
            "-k",
            "slice_channels or server_round",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    groups = {b["group"] for b in data["benchmarks"]}
    assert {"slice_channels vgg16-conv K=2", "slice_channels_many vgg16 K=2", "server_round vgg16 K=2"} <= groups
    impls = {b["extra_info"]["impl"] for b in data["benchmarks"]}
    assert {"reference", "plain"} <= impls and any(i.startswith("cahfp[") for i in impls)
    png = tmp_path / "speedups.png"
    res = subprocess.run(
        [sys.executable, str(BENCH / "plot_benchmarks.py"), str(out), "-o", str(png)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert png.stat().st_size > 10_000
    assert "server_round vgg16 K=2" in res.stdout
